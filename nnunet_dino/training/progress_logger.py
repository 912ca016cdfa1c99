"""nnU-Net's local logger extended with the plugin's extra loss terms, which also appear in progress.png."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402


class ExtraTermsLogger(LocalLogger):
    """Logs ``train_<term>`` and ``val_<term>`` for each extra loss term, one value per epoch like nnU-Net."""

    def __init__(self, terms: tuple[str, ...], verbose: bool = False):
        super().__init__(verbose)
        self.terms = terms
        for term in terms:
            self.my_fantastic_logging[f"train_{term}"] = []
            self.my_fantastic_logging[f"val_{term}"] = []

    def load_checkpoint(self, checkpoint: dict):
        for term in self.terms:  # a checkpoint from a run that logged fewer terms still resumes
            checkpoint.setdefault(f"train_{term}", [])
            checkpoint.setdefault(f"val_{term}", [])
        super().load_checkpoint(checkpoint)

    def plot_progress_png(self, output_folder):
        log = self.my_fantastic_logging
        epoch = min(len(v) for k, v in log.items() if not k.startswith(("train_", "val_")) or k in
                    ("train_losses", "val_losses")) - 1
        if epoch < 0:
            return
        x = list(range(epoch + 1))
        fig, axes = plt.subplots(4, 1, figsize=(16, 28))
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
        fig.tight_layout()
        fig.savefig(os.path.join(output_folder, "progress.png"))
        plt.close(fig)
