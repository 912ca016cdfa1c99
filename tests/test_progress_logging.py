"""progress.png and the training log show what the total loss is made of and every optimizer group's learning rate.

In process and cheap: the logger is fed values directly, and the trainers' epoch hooks run on a real optimizer
recipe without any training step.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from batchgenerators.utilities.file_and_folder_operations import load_json
import matplotlib.pyplot as plt
from matplotlib.image import imread

from nnunet_dino.training import GuiDINOTrainer, MedDINOv3Trainer, SegDINOTrainer
from nnunet_dino.training.guide_reliance import ABLATIONS
from nnunet_dino.training.guidino_loss import TERMS
from nnunet_dino.training.progress_logger import ExtraTermsLogger
from nnunet_dino.training.schedules import GroupPolyLRScheduler

RELIANCE = tuple(f"guide_reliance_{a}" for a in ABLATIONS)
WEIGHTS = {"seg_loss": 1.0, "guide_loss": 0.1, "hinge_loss": 0.05}


def fill_epoch(logger: ExtraTermsLogger, epoch: int, lrs: dict[str, float] | None = None) -> None:
    """One epoch of every key, as the trainer logs them (values arbitrary but distinct)."""
    base = {"mean_fg_dice": 0.1 * epoch, "dice_per_class_or_region": [0.1 * epoch], "train_losses": 1.0 - 0.1 * epoch,
            "val_losses": 1.1 - 0.1 * epoch, "lrs": 1e-2 * 0.9 ** epoch, "epoch_start_timestamps": 10.0 * epoch,
            "epoch_end_timestamps": 10.0 * epoch + 5}
    for key, value in base.items():
        logger.log(key, value, epoch)
    logger.log("ema_fg_dice", 0.1 * epoch, epoch)  # the MetaLogger derives it; the local logger just stores it
    for key in logger._keys():
        logger.log(key, 0.5 + epoch, epoch)
    if lrs:
        logger.register_lr_groups(list(lrs), epoch)
        for name, lr in lrs.items():
            logger.log(f"lr_{name}", lr * 0.9 ** epoch, epoch)


def panels(fig) -> dict[str, object]:
    """Axes by y label (the twin axis of the first panel excluded)."""
    return {ax.get_ylabel(): ax for ax in fig.axes if ax.get_ylabel() != "pseudo dice"}


def line_labels(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]


def test_figure_labels_weights_plots_every_group_and_keeps_legends_off_the_curves(tmp_path):
    logger = ExtraTermsLogger(TERMS, val_only_terms=RELIANCE, term_weights=WEIGHTS)
    groups = {"segmentation": 1e-2, "guidance": 1e-3, "lora": 5e-4}
    for epoch in range(3):
        fill_epoch(logger, epoch, groups)
    fig = logger.progress_figure()
    try:
        axes = panels(fig)
        terms = axes["unweighted loss term"]
        assert line_labels(terms) == [f"{t} ({w}) {p}" for t, w in
                                      (("seg_loss", "x1"), ("guide_loss", "x0.1"), ("hinge_loss", "x0.05"))
                                      for p in ("train", "val")]
        total = axes["loss"]
        assert total.get_title() == "total loss = seg_loss + 0.1 x guide_loss + 0.05 x hinge_loss"
        lr = axes["learning rate (log scale)"]  # 1e-2 vs 5e-4: 20x apart, so a log axis
        assert lr.get_yscale() == "log"
        assert line_labels(lr) == list(groups)
        for line, (name, value) in zip(lr.get_lines(), groups.items()):
            np.testing.assert_allclose(line.get_ydata(), [value * 0.9 ** e for e in range(3)])
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            legend = ax.get_legend()
            if legend is None:
                continue
            # outside its panel: the legend's box starts right of the axes' plotting area
            assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1, ax.get_ylabel()
    finally:
        plt.close(fig)
    logger.plot_progress_png(str(tmp_path))
    image = imread(tmp_path / "progress.png")
    # 5 panels (total, loss terms, epoch time, learning rates, guide reliance) of 7 inches at 100 dpi
    assert image.shape[:2] == (3500, 1600)


def test_learning_rates_within_10x_stay_on_a_linear_axis_and_plain_loggers_skip_the_terms_panel(tmp_path):
    logger = ExtraTermsLogger()  # SegDINO / MedDINOv3: no extra terms, only the groups' rates
    for epoch in range(2):
        fill_epoch(logger, epoch, {"head": 1e-4, "lora": 5e-4})
    fig = logger.progress_figure()
    axes = panels(fig)
    assert "unweighted loss term" not in axes and len(fig.axes) == 4  # total (+ twin), time, learning rate
    assert axes["learning rate"].get_yscale() == "linear"
    assert line_labels(axes["learning rate"]) == ["head", "lora"]
    plt.close(fig)
    logger.plot_progress_png(str(tmp_path))
    assert imread(tmp_path / "progress.png").shape[:2] == (2100, 1600)


def test_resuming_a_checkpoint_from_before_these_keys_keeps_one_entry_per_epoch(tmp_path):
    """A checkpoint written before lr_<group> and the guide-reliance terms were logged: the missing epochs are NaN,
    the next epoch lands at its own index and the plot still draws (lists of other lengths broke matplotlib)."""
    old = ExtraTermsLogger(TERMS)  # an older run: no reliance terms, no per-group rates
    for epoch in range(2):
        fill_epoch(old, epoch)
    checkpoint = copy.deepcopy(old.get_checkpoint())
    assert not any(k.startswith(("lr_", "val_guide_reliance")) for k in checkpoint)

    new = ExtraTermsLogger(TERMS, val_only_terms=RELIANCE, term_weights=WEIGHTS)
    new.load_checkpoint(checkpoint)
    log = new.my_fantastic_logging
    for key in (f"val_{t}" for t in RELIANCE):
        assert len(log[key]) == 2 and all(math.isnan(v) for v in log[key])
    fill_epoch(new, 2, {"segmentation": 1e-2, "guidance": 1e-3})
    assert len(log["lr_segmentation"]) == 3 and math.isnan(log["lr_segmentation"][0])
    assert log["lr_segmentation"][2] == pytest.approx(1e-2 * 0.81)
    assert log["val_guide_reliance_shuffled"][2] == 2.5
    new.plot_progress_png(str(tmp_path))
    assert (tmp_path / "progress.png").stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------- the trainers
@pytest.fixture(scope="module")
def hippo_plans(hippo_workspace):
    pre = hippo_workspace["preprocessed"]
    return load_json(pre / "nnUNetPlans.json"), load_json(pre / "dataset.json")


def make_trainer(cls, hippo_plans, tmp_path, monkeypatch):
    plans, dataset_json = hippo_plans
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    monkeypatch.setenv("nnUNet_dino_weights", "random")  # checked at construction; no weights are loaded here
    trainer = cls(dict(copy.deepcopy(plans), continue_training=False), "2d", 0, dataset_json, torch.device("cpu"))
    trainer.disable_checkpointing = True  # the hooks below are under test, not checkpoint writing
    return trainer


def run_epoch_start(trainer) -> None:
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()


def log_text(trainer) -> str:
    return Path(trainer.log_file).read_text()


def assert_logged_rates_are_the_optimizers(trainer, epoch: int) -> None:
    log = trainer.logger.local_logger.my_fantastic_logging
    for group in trainer.optimizer.param_groups:
        # what this epoch trains with: the scheduler has stepped to epoch `epoch` before the value is logged
        expected = group["initial_lr"] * (1 - epoch / trainer.num_epochs) ** trainer.lr_scheduler.exponent
        assert group["lr"] == pytest.approx(expected)
        assert log[f"lr_{group['name']}"][epoch] == group["lr"]
    assert log["lrs"][epoch] == trainer.optimizer.param_groups[0]["lr"]  # nnU-Net's own key is unchanged


def test_guidino_logs_loss_weights_once_and_every_groups_rate_each_epoch(hippo_plans, tmp_path, monkeypatch):
    from dataclasses import replace

    class FewTokens(GuiDINOTrainer):  # a small ViT input keeps building the network cheap
        guidino = replace(GuiDINOTrainer.guidino, min_short_side_tokens=4)

    trainer = make_trainer(FewTokens, hippo_plans, tmp_path, monkeypatch)
    pm, cm = trainer.plans_manager, trainer.configuration_manager
    trainer.network = FewTokens.build_network_architecture(pm, cm, 1, trainer.label_manager.num_segmentation_heads)
    trainer.num_epochs = 4
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["segmentation", "guidance", "lora"]

    foreground = trainer.label_manager.num_segmentation_heads - 1  # nnU-Net's hard counts leave out background
    prefixes = ("", *(f"{a}_" for a in ABLATIONS))  # the plain prediction and each replaced-guide prediction
    counts = {f"{p}{c}_hard": np.ones(foreground) for p in prefixes for c in ("tp", "fp", "fn")}
    for epoch in range(2):
        run_epoch_start(trainer)
        assert_logged_rates_are_the_optimizers(trainer, epoch)
        outputs = [{"loss": np.array(1.0), **{t: np.array(0.5) for t in TERMS}}]
        trainer.on_train_epoch_end(outputs)
        trainer.on_validation_epoch_end([dict(outputs[0], **counts)])
        trainer.on_epoch_end()

    text = log_text(trainer)
    assert text.count("Loss-term weights: total loss = seg_loss + 0.1 x guide_loss + 0.05 x hinge_loss "
                      "(hinge margin 1)") == 1
    assert "Current learning rate per optimizer group: segmentation 0.01, guidance 0.001, lora 0.0005" in text
    factor = 0.75 ** 0.9
    assert (f"Current learning rate per optimizer group: segmentation {1e-2 * factor:.4g}, guidance "
            f"{1e-3 * factor:.4g}, lora {5e-4 * factor:.4g}") in text
    assert text.count("train loss terms: seg_loss 0.5000 (x1), guide_loss 0.5000 (x0.1), hinge_loss 0.5000 "
                      "(x0.05)") == 2
    fig = trainer.logger.local_logger.progress_figure()
    assert line_labels(panels(fig)["learning rate (log scale)"]) == ["segmentation", "guidance", "lora"]
    plt.close(fig)
    assert (Path(trainer.output_folder) / "progress.png").is_file()  # written by nnU-Net's on_epoch_end


def _named_adamw(groups: dict[str, float]) -> torch.optim.AdamW:
    return torch.optim.AdamW([{"params": [nn.Parameter(torch.zeros(1))], "lr": lr, "name": name}
                              for name, lr in groups.items()])


@pytest.mark.parametrize("cls,groups", [(SegDINOTrainer, {"head": 1e-4, "lora": 5e-4}),
                                        (MedDINOv3Trainer, {"decoder": 3e-4, "vit": 3e-5})],
                         ids=["SegDINO", "MedDINOv3"])
def test_segdino_and_meddinov3_log_every_groups_rate(cls, groups, hippo_plans, tmp_path, monkeypatch):
    trainer = make_trainer(cls, hippo_plans, tmp_path, monkeypatch)
    trainer.network = nn.Linear(1, 1)  # nnU-Net's on_train_epoch_start only switches it to train mode
    trainer.num_epochs = 5
    trainer.optimizer = _named_adamw(groups)  # the groups these trainers' configure_optimizers make
    trainer.lr_scheduler = GroupPolyLRScheduler(trainer.optimizer, trainer.num_epochs,
                                                exponent=1.0 if cls is MedDINOv3Trainer else 0.9)
    for epoch in range(3):
        run_epoch_start(trainer)
        assert_logged_rates_are_the_optimizers(trainer, epoch)
        trainer.current_epoch += 1  # what nnU-Net's on_epoch_end does last (the rest needs a validation)
    assert isinstance(trainer.logger.local_logger, ExtraTermsLogger)
    assert log_text(trainer).count("Current learning rate per optimizer group: ") == 3
