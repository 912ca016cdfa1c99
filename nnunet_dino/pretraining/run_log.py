"""The loss log (CSV, one row per step) and its plot (PNG) in the output folder."""
from __future__ import annotations

import csv
import os
from pathlib import Path

from .losses import LOSS_NAMES

LOG_NAME = "pretrain_log.csv"
PLOT_NAME = "pretrain_losses.png"
COLUMNS = ("step", "stage", "lr", "momentum", "teacher_temp", *LOSS_NAMES, "seconds")


class RunLog:
    def __init__(self, folder: Path, keep_steps_below: int):
        """Opens the log of ``folder``; rows of steps >= ``keep_steps_below`` (written after the checkpoint a run
        resumes from) are dropped, so the log matches the state the run continues from."""
        self.path = Path(folder) / LOG_NAME
        self.rows: list[dict] = []
        if self.path.is_file():
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) < keep_steps_below]
        self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)

    def append(self, row: dict) -> None:
        row = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
        self.rows.append(row)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS).writerow(row)

    def final_losses(self, last: int = 20) -> dict:
        """Mean of each loss over the last ``last`` logged steps."""
        tail = self.rows[-last:]
        return {k: sum(float(r[k]) for r in tail) / len(tail) for k in LOSS_NAMES} if tail else {}

    def plot(self) -> Path | None:
        if not self.rows:
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [int(r["step"]) for r in self.rows]
        fig, axes = plt.subplots(1, len(LOSS_NAMES), figsize=(4 * len(LOSS_NAMES), 3.2))
        for ax, name in zip(axes, LOSS_NAMES):
            ax.plot(steps, [float(r[name]) for r in self.rows], lw=0.8)
            ax.set_title(name)
            ax.set_xlabel("step")
            previous = None
            for s, r in zip(steps, self.rows):  # stage boundaries
                if previous is not None and r["stage"] != previous:
                    ax.axvline(s, color="grey", ls="--", lw=0.6)
                previous = r["stage"]
        fig.tight_layout()
        out = self.path.with_name(PLOT_NAME)
        tmp = out.with_name(f".{out.name}.partial-{os.getpid()}.png")
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        os.replace(tmp, out)
        return out
