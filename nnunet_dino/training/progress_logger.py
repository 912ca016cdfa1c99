"""nnU-Net's local logger extended with the plugin's extra loss terms and every optimizer group's learning rate,
which also appear in progress.png.

nnU-Net logs one learning rate (``lrs``: parameter group 0). The plugin's trainers train several groups at different
rates (GuiDINO: segmentation SGD, guidance and LoRA AdamW; SegDINO/MedDINOv3: head or decoder, LoRA or ViT), so each
group's rate is logged as ``lr_<group name>`` and plotted; ``lrs`` stays as nnU-Net writes it.
"""
from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402

LR_PREFIX = "lr_"
# Rates of the plotted groups differing by more than this factor are drawn on a log axis (a 10x lower LoRA rate
# would otherwise be a flat line at the bottom of the panel).
LOG_SCALE_RATIO = 10.0


def group_names(param_groups: list[dict]) -> list[str]:
    """The ``name`` each trainer gives its groups in configure_optimizers; ``group<i>`` for an unnamed one."""
    return [str(g.get("name", f"group{i}")) for i, g in enumerate(param_groups)]


def weight_label(weight: float) -> str:
    return f"x{weight:g}" if weight else "x0, not in the total"


def log_group_learning_rates(trainer) -> None:
    """Log and print every optimizer group's learning rate for the current epoch. Call it after nnU-Net's
    on_train_epoch_start, which has just stepped the scheduler: these are the rates this epoch trains with."""
    groups = trainer.optimizer.param_groups
    names = group_names(groups)
    local = trainer.logger.local_logger
    if isinstance(local, ExtraTermsLogger):
        local.register_lr_groups(names, trainer.current_epoch)
    for name, group in zip(names, groups):
        trainer.logger.log(f"{LR_PREFIX}{name}", float(group["lr"]), trainer.current_epoch)
    trainer.print_to_log_file("Current learning rate per optimizer group: " + ", ".join(
        f"{name} {group['lr']:.4g}" for name, group in zip(names, groups)))


class ExtraTermsLogger(LocalLogger):
    """Logs ``train_<term>`` and ``val_<term>`` for each extra loss term, ``val_<term>`` for each validation-only
    term (guide reliance) and ``lr_<group>`` for each optimizer group, one value per epoch like nnU-Net.

    ``term_weights`` (term -> weight in the total loss) only labels the plot: the logged terms are unweighted.
    """

    def __init__(self, terms: tuple[str, ...] = (), verbose: bool = False, val_only_terms: tuple[str, ...] = (),
                 term_weights: dict[str, float] | None = None):
        super().__init__(verbose)
        self.terms = terms
        self.val_only_terms = val_only_terms
        self.term_weights = dict(term_weights or {})
        for key in self._keys():
            self.my_fantastic_logging[key] = []

    def _keys(self) -> list[str]:
        return [f"{p}_{t}" for t in self.terms for p in ("train", "val")] + [f"val_{t}" for t in self.val_only_terms]

    def register_lr_groups(self, names: list[str], epoch: int) -> None:
        """Adds ``lr_<name>`` keys not logged yet. Epochs before ``epoch`` (a run resumed from a checkpoint written
        before these keys existed) get NaN, so every list keeps one entry per epoch and LocalLogger.log appends at
        the right index."""
        for name in names:
            self.my_fantastic_logging.setdefault(f"{LR_PREFIX}{name}", [math.nan] * epoch)

    def load_checkpoint(self, checkpoint: dict):
        # A checkpoint from a run that logged fewer terms still resumes: the missing epochs are NaN (gaps in the
        # plot), so the lists stay aligned with the epochs.
        epochs = len(checkpoint.get("epoch_end_timestamps", []))
        for key in self._keys():
            checkpoint.setdefault(key, [math.nan] * epochs)
        super().load_checkpoint(checkpoint)

    def lr_keys(self) -> list[str]:
        return [k for k in self.my_fantastic_logging if k.startswith(LR_PREFIX)]

    def total_loss_formula(self) -> str | None:
        if not self.term_weights:
            return None
        parts = [t if w == 1 else f"{w:g} x {t}" for t, w in self.term_weights.items() if w]
        return "total loss = " + " + ".join(parts)

    def _term_label(self, term: str) -> str:
        return f"{term} ({weight_label(self.term_weights[term])})" if term in self.term_weights else term

    def progress_figure(self):
        """The progress plot as a matplotlib figure (None before the first epoch ends); the caller closes it."""
        log = self.my_fantastic_logging
        epoch = min(len(v) for k, v in log.items() if not k.startswith(("train_", "val_")) or k in
                    ("train_losses", "val_losses")) - 1
        if epoch < 0:
            return None
        x = list(range(epoch + 1))
        panels = ["total"] + (["terms"] if self.terms else []) + ["time", "lr"] + (
            ["reliance"] if self.val_only_terms else [])
        fig, axes = plt.subplots(len(panels), 1, figsize=(16, 7 * len(panels)))
        axes = dict(zip(panels, axes))
        # Legends sit to the right of each panel, outside the axes: inside, they covered the curves' last epochs.
        outside = dict(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)

        ax = axes["total"]
        ax.plot(x, log["train_losses"][: epoch + 1], "b-", label="loss_tr (total)", linewidth=3)
        ax.plot(x, log["val_losses"][: epoch + 1], "r-", label="loss_val (total)", linewidth=3)
        ax2 = ax.twinx()
        ax2.plot(x, log["mean_fg_dice"][: epoch + 1], "g:", label="pseudo dice", linewidth=2)
        ax2.plot(x, log["ema_fg_dice"][: epoch + 1], "g-", label="pseudo dice (mov. avg.)", linewidth=3)
        ax.set(xlabel="epoch", ylabel="loss", title=self.total_loss_formula() or "")
        ax2.set_ylabel("pseudo dice")
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax2.legend(handles, [h.get_label() for h in handles], **dict(outside, bbox_to_anchor=(1.06, 1.0)))

        if "terms" in axes:
            ax = axes["terms"]
            for i, term in enumerate(self.terms):
                color, label = f"C{i}", self._term_label(term)
                ax.plot(x, log[f"train_{term}"][: epoch + 1], color=color, ls="-", label=f"{label} train", linewidth=3)
                ax.plot(x, log[f"val_{term}"][: epoch + 1], color=color, ls="--", label=f"{label} val", linewidth=2)
            ax.set(xlabel="epoch", ylabel="unweighted loss term",
                   title="loss terms, unweighted (weight in the total loss in brackets)")
            ax.legend(**outside)

        ax = axes["time"]
        durations = [e - s for e, s in zip(log["epoch_end_timestamps"][: epoch + 1], log["epoch_start_timestamps"])]
        ax.plot(x, durations, "b-", label="epoch duration", linewidth=3)
        ax.set(xlabel="epoch", ylabel="time [s]", ylim=(0, max(durations + [1e-3]) * 1.1))
        ax.legend(**outside)

        ax = axes["lr"]
        lr_keys = [k for k in self.lr_keys() if any(math.isfinite(v) for v in log[k][: epoch + 1])]
        series = {k[len(LR_PREFIX):]: log[k][: epoch + 1] for k in lr_keys} or {"group 0": log["lrs"][: epoch + 1]}
        for i, (name, values) in enumerate(series.items()):
            ax.plot(x, values, color=f"C{i}", label=name, linewidth=3)
        ax.set(xlabel="epoch", ylabel="learning rate", title="learning rate per optimizer group")
        positive = [v for values in series.values() for v in values if math.isfinite(v) and v > 0]
        if positive and max(positive) / min(positive) > LOG_SCALE_RATIO:
            ax.set_yscale("log")
            ax.set_ylabel("learning rate (log scale)")
        ax.legend(**outside)

        if "reliance" in axes:
            ax = axes["reliance"]
            for i, term in enumerate(self.val_only_terms):
                values = log[f"val_{term}"][: epoch + 1]
                ax.plot(x[-len(values):] if values else [], values, color=f"C{i}", label=term, linewidth=3)
            ax.axhline(0, color="k", lw=1)
            ax.set(xlabel="epoch", ylabel="pseudo Dice lost", title="guide reliance: pseudo Dice lost when the DINO "
                   "guide is replaced (about 0: the network ignores DINO)")
            ax.legend(**outside)
        for ax in axes.values():  # whole epochs only: short runs otherwise get ticks at 0.25, 0.5, ...
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        return fig

    def plot_progress_png(self, output_folder):
        fig = self.progress_figure()
        if fig is None:
            return
        fig.savefig(os.path.join(output_folder, "progress.png"))
        plt.close(fig)
