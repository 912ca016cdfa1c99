"""nnU-Net's local logger extended with the plugin's extra loss terms, which also appear in progress.png."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402


class ExtraTermsLogger(LocalLogger):
    """Logs ``train_<term>`` and ``val_<term>`` for each extra loss term, and ``val_<term>`` for each validation-only
    term (guide reliance), one value per epoch like nnU-Net."""

    def __init__(self, terms: tuple[str, ...], verbose: bool = False, val_only_terms: tuple[str, ...] = ()):
        super().__init__(verbose)
        self.terms = terms
        self.val_only_terms = val_only_terms
        for key in self._keys():
            self.my_fantastic_logging[key] = []

    def _keys(self) -> list[str]:
        return [f"{p}_{t}" for t in self.terms for p in ("train", "val")] + [f"val_{t}" for t in self.val_only_terms]

    def load_checkpoint(self, checkpoint: dict):
        for key in self._keys():  # a checkpoint from a run that logged fewer terms still resumes
            checkpoint.setdefault(key, [])
        super().load_checkpoint(checkpoint)

    def plot_progress_png(self, output_folder):
        log = self.my_fantastic_logging
        epoch = min(len(v) for k, v in log.items() if not k.startswith(("train_", "val_")) or k in
                    ("train_losses", "val_losses")) - 1
        if epoch < 0:
            return
        x = list(range(epoch + 1))
        fig, axes = plt.subplots(5 if self.val_only_terms else 4, 1, figsize=(16, 35 if self.val_only_terms else 28))
        ax = axes[0]
        ax.plot(x, log["train_losses"][: epoch + 1], "b-", label="loss_tr (total)", linewidth=3)
        ax.plot(x, log["val_losses"][: epoch + 1], "r-", label="loss_val (total)", linewidth=3)
        ax2 = ax.twinx()
        ax2.plot(x, log["mean_fg_dice"][: epoch + 1], "g:", label="pseudo dice", linewidth=2)
        ax2.plot(x, log["ema_fg_dice"][: epoch + 1], "g-", label="pseudo dice (mov. avg.)", linewidth=3)
        ax.set(xlabel="epoch", ylabel="loss")
        ax2.set_ylabel("pseudo dice")
        ax.legend(loc="upper left")
        ax2.legend(loc="upper right")
        ax = axes[1]
        for i, term in enumerate(self.terms):
            color = f"C{i}"
            ax.plot(x, log[f"train_{term}"][: epoch + 1], color=color, ls="-", label=f"{term} (train)", linewidth=3)
            ax.plot(x, log[f"val_{term}"][: epoch + 1], color=color, ls="--", label=f"{term} (val)", linewidth=2)
        ax.set(xlabel="epoch", ylabel="unweighted loss term", title="loss terms")
        ax.legend(loc="upper right")
        ax = axes[2]
        durations = [e - s for e, s in zip(log["epoch_end_timestamps"][: epoch + 1], log["epoch_start_timestamps"])]
        ax.plot(x, durations, "b-", label="epoch duration", linewidth=3)
        ax.set(xlabel="epoch", ylabel="time [s]", ylim=(0, max(durations + [1e-3]) * 1.1))
        ax.legend(loc="upper left")
        ax = axes[3]
        ax.plot(x, log["lrs"][: epoch + 1], "b-", label="learning rate (segmentation network)", linewidth=3)
        ax.set(xlabel="epoch", ylabel="learning rate")
        ax.legend(loc="upper right")
        if self.val_only_terms:
            ax = axes[4]
            for i, term in enumerate(self.val_only_terms):
                values = log[f"val_{term}"][: epoch + 1]
                ax.plot(x[-len(values):] if values else [], values, color=f"C{i}", label=term, linewidth=3)
            ax.axhline(0, color="k", lw=1)
            ax.set(xlabel="epoch", ylabel="pseudo Dice lost", title="guide reliance: pseudo Dice lost when the DINO "
                   "guide is replaced (about 0: the network ignores DINO)")
            ax.legend(loc="upper left")
        fig.tight_layout()
        fig.savefig(os.path.join(output_folder, "progress.png"))
        plt.close(fig)
