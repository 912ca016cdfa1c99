"""Starting GuiDINO's U-Net from the user's own stock nnU-Net model (nnunet_dino/training/unet_init.py).

Stock models are made here the way nnU-Net makes them: a stock ``nnUNetTrainer`` of a tiny 2D plan (3 stages,
32x32 patches) whose network gets random weights, then one real nnU-Net training and validation step with nnU-Net's
epoch logging (so the checkpoint holds what nnU-Net's logging stores, numpy scalars included), written by nnU-Net's
own ``save_checkpoint`` into ``fold_<k>/checkpoint_final.pth`` of the model folder nnU-Net would use. GuiDINO
trainers are constructed directly (as nnUNetv2_train does) with random DINO weights; DinoTrainerBase's
``on_train_start`` (DINO weights, data loaders) is replaced by a recorder, so everything up to the first training
step runs in-process without data.
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_dino.training import DinoTrainerBase, GuiDINOTrainer, unwrap
from nnunet_dino.training.unet_init import (INIT_UNET_ENV_VAR, RECORD_NAME, StockModelError, init_unet_from_stock,
                                            read_stock_checkpoint, resolve_setting)

DATASET = "Dataset997_UnetInit"
PATCH = (32, 32)
LABELS = {"background": 0, "a": 1, "b": 2}


class TinyGuiDINO(GuiDINOTrainer):
    """Frozen ViT-S seeing 2x2 tokens: the U-Net, not the guide, is under test."""
    guidino = replace(GuiDINOTrainer.guidino, min_short_side_tokens=2, lora=None)


def tiny_plans(n_stages: int = 3, patch=PATCH, plans_name: str = "nnUNetPlans") -> dict:
    arch = {
        "n_stages": n_stages, "features_per_stage": [8 * 2 ** i for i in range(n_stages)],
        "conv_op": "torch.nn.modules.conv.Conv2d", "kernel_sizes": [[3, 3]] * n_stages,
        "strides": [[1, 1]] + [[2, 2]] * (n_stages - 1), "n_conv_per_stage": [2] * n_stages,
        "n_conv_per_stage_decoder": [2] * (n_stages - 1), "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True}}
    config = {
        "data_identifier": f"{plans_name}_2d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": list(patch), "median_image_size_in_voxels": [40.0, 36.0], "spacing": [1.0, 1.0],
        "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                         "arch_kwargs": arch, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": True}
    return {"dataset_name": DATASET, "plans_name": plans_name, "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
            "original_median_shape_after_transp": [30, 40, 36], "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": {"2d": config},
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": {
                "max": 10.0, "mean": 1.0, "median": 1.0, "min": 0.0, "percentile_00_5": 0.0, "percentile_99_5": 9.0,
                "std": 2.0}}}


def tiny_dataset_json(labels: dict = LABELS) -> dict:
    return {"channel_names": {"0": "MRI"}, "labels": dict(labels), "numTraining": 4, "file_ending": ".nii.gz"}


@pytest.fixture
def ws(tmp_path, monkeypatch) -> Path:
    """nnU-Net's folders in tmp_path, random DINO weights, no stock-model setting; a stand-in preprocessed folder
    (nnU-Net's initialize() only looks at its file endings)."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    monkeypatch.setenv("nnUNet_dino_weights", "random")
    monkeypatch.delenv(INIT_UNET_ENV_VAR, raising=False)
    for plans_name in ("nnUNetPlans", "nnUNetPlansOther"):
        data = tmp_path / "preprocessed" / DATASET / f"{plans_name}_2d"
        data.mkdir(parents=True)
        (data / "case_0.b2nd").touch()
    return tmp_path


def make_trainer(cls, plans: dict, dataset_json: dict, fold=0, continue_training=False):
    # nnU-Net 2.8 pops continue_training from the plans dict (nnUNetv2_train puts it there)
    return cls(dict(copy.deepcopy(plans), continue_training=continue_training), "2d", fold,
               copy.deepcopy(dataset_json), torch.device("cpu"))


def stock_model(plans: dict, dataset_json: dict, folds=(0,), seed=0) -> tuple[Path, dict]:
    """A trained-looking stock nnU-Net model folder; returns it and each fold's network (eval mode)."""
    networks = {}
    for fold in folds:
        stock = make_trainer(nnUNetTrainer, plans, dataset_json, fold)
        pm = PlansManager(plans)
        torch.manual_seed(seed + 10 * fold)
        net = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("2d"), 1,
                                                       stock.label_manager.num_segmentation_heads, True)
        with torch.no_grad():  # norm gains and biases off their 1/0 start: a tensor left unloaded would show
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        stock.network = net
        stock.optimizer, stock.lr_scheduler = stock.configure_optimizers()
        stock.loss = stock._build_loss()
        one_epoch(stock)  # nnU-Net's own steps and logging: the checkpoint holds what nnU-Net's logging stores
        stock.current_epoch = 999  # nnU-Net stores current_epoch + 1: a finished 1000-epoch run
        stock.inference_allowed_mirroring_axes = (0, 1)
        stock.save_checkpoint(os.path.join(stock.output_folder, "checkpoint_final.pth"))
        networks[fold] = net.eval()
    return Path(stock.output_folder_base), networks


def one_epoch(trainer: nnUNetTrainer) -> None:
    """One training and one validation step of nnU-Net on a synthetic batch, with nnU-Net's epoch bookkeeping
    (progress plot and best-checkpoint writing of on_epoch_end left out)."""
    g = torch.Generator().manual_seed(5)
    target = torch.randint(0, trainer.label_manager.num_segmentation_heads, (2, 1, *PATCH), generator=g).float()
    steps = [[round(1 / f) for f in scale] for scale in trainer._get_deep_supervision_scales()]
    batch = {"data": torch.randn(2, 1, *PATCH, generator=g),
             "target": [target[..., ::sy, ::sx] for sy, sx in steps]}  # one per deep-supervision output
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    trainer.on_train_epoch_end([trainer.train_step(batch)])
    trainer.on_validation_epoch_start()
    trainer.on_validation_epoch_end([trainer.validation_step(batch)])
    trainer.logger.log("epoch_end_timestamps", time.time(), trainer.current_epoch)
    trainer._best_ema = trainer.logger.get_value("ema_fg_dice", step=-1)


@pytest.fixture
def train_start_calls(monkeypatch) -> list:
    """Replaces DinoTrainerBase.on_train_start (DINO weights, data loaders): records the U-Net it finds."""
    calls = []
    monkeypatch.setattr(DinoTrainerBase, "on_train_start", lambda self: calls.append(
        {k: v.clone() for k, v in unwrap(self.network).unet.state_dict().items()}))
    return calls


@torch.no_grad()
def predict(net: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    net.eval()
    out = net(x)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def unet_state(trainer) -> dict:
    return {k: v.clone() for k, v in unwrap(trainer.network).unet.state_dict().items()}


def record(trainer) -> dict:
    return json.loads((Path(trainer.output_folder) / RECORD_NAME).read_text())


def log_text(trainer) -> str:
    return Path(trainer.log_file).read_text()


# ---------------------------------------------------------------------------------------------- the start
def test_first_prediction_is_the_stock_models_prediction(ws, monkeypatch, train_start_calls):
    plans, dsj = tiny_plans(), tiny_dataset_json()
    model_folder, stock = stock_model(plans, dsj, folds=(0, 1))
    monkeypatch.setenv(INIT_UNET_ENV_VAR, str(model_folder))
    trainer = make_trainer(TinyGuiDINO, plans, dsj, fold=1)
    trainer.initialize()
    x = torch.randn(2, 1, *PATCH, generator=torch.Generator().manual_seed(3))
    expected = predict(stock[1], x)
    assert not torch.equal(predict(trainer.network, x)[0], expected[0])  # before: nnU-Net's random start

    trainer.on_train_start()

    # Bit-equal, not close: the gates are exactly the identity at the start (f * (1 + tanh(0))), and the U-Net runs
    # the same kernels on the same tensors in the same process as the stock network.
    got = predict(trainer.network, x)
    assert len(got) == len(expected) == 2  # every deep-supervision output
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    assert not torch.equal(got[0], predict(stock[0], x)[0])  # fold-aware: fold 1's model, not fold 0's
    assert len(train_start_calls) == 1  # nnU-Net's start (DINO weights, data) ran after, on the loaded U-Net
    assert all(torch.equal(train_start_calls[0][k], v) for k, v in unet_state(trainer).items())

    checkpoint = model_folder / "fold_1" / "checkpoint_final.pth"
    r = record(trainer)
    assert r["checkpoint"] == str(checkpoint.resolve())
    assert r["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert (r["fold"], r["checkpoint_fold"], r["per_fold"], r["checkpoint_epochs"]) == (1, 1, True, 1000)
    assert (r["checkpoint_trainer"], r["trainer"]) == ("nnUNetTrainer", "TinyGuiDINO")
    assert r["set_by"] == f"${INIT_UNET_ENV_VAR}" and r["tensors"] == len(unet_state(trainer))
    log = log_text(trainer)
    assert f"U-Net initialised from the stock nnU-Net model {checkpoint.resolve()}" in log
    assert "WARNING" not in log


def test_one_checkpoint_file_serves_any_fold_and_the_log_says_so(ws, train_start_calls):
    plans, dsj = tiny_plans(), tiny_dataset_json()
    model_folder, stock = stock_model(plans, dsj, folds=(0,))

    class HardWired(TinyGuiDINO):  # a variant naming one file (the trainer attribute form of the setting)
        init_unet = str(model_folder / "fold_0" / "checkpoint_final.pth")

    trainer = make_trainer(HardWired, plans, dsj, fold=2)
    trainer.on_train_start()  # initialises the trainer itself, as nnU-Net's run_training does
    x = torch.randn(1, 1, *PATCH)
    assert torch.equal(predict(trainer.network, x)[0], predict(stock[0], x)[0])
    r = record(trainer)
    assert (r["fold"], r["checkpoint_fold"], r["per_fold"], r["set_by"]) == (2, 0, False, "init_unet attribute")
    log = log_text(trainer)
    assert "it is used for every fold (this is fold 2)" in log
    assert "WARNING: the stock model was trained as fold 0, this is fold 2" in log


def test_prefixed_keys_load_like_nnunets_own_loading(ws, train_start_calls, tmp_path):
    plans, dsj = tiny_plans(), tiny_dataset_json()
    model_folder, stock = stock_model(plans, dsj)
    source = model_folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(source, weights_only=False)  # made by this test: trusted
    checkpoint["network_weights"] = {f"module._orig_mod.{k}": v for k, v in checkpoint["network_weights"].items()}
    torch.save(checkpoint, tmp_path / "wrapped.pth")
    trainer = make_trainer(TinyGuiDINO, plans, dsj)
    trainer.init_unet = str(tmp_path / "wrapped.pth")
    trainer.on_train_start()
    x = torch.randn(1, 1, *PATCH)
    assert torch.equal(predict(trainer.network, x)[0], predict(stock[0], x)[0])


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("change,message", [
    ("stages", r"arch_kwargs.n_stages: stock model 4, this training 3"),
    ("classes", r"output channels: stock model 4, this training 3"),
    ("patch", r"patch size: stock model \[48, 32\], this training \[32, 32\]"),
])
def test_a_model_of_other_plans_is_refused_naming_the_difference(ws, train_start_calls, change, message):
    plans, dsj = tiny_plans(), tiny_dataset_json()
    stock_plans, stock_dsj = plans, dsj
    if change == "stages":
        stock_plans = tiny_plans(n_stages=4, plans_name="nnUNetPlansOther")
    elif change == "classes":
        stock_dsj = tiny_dataset_json({**LABELS, "c": 3})
    else:
        stock_plans = tiny_plans(patch=(48, 32), plans_name="nnUNetPlansOther")
    model_folder, _ = stock_model(stock_plans, stock_dsj)
    trainer = make_trainer(TinyGuiDINO, plans, dsj)
    trainer.init_unet = str(model_folder)
    trainer.initialize()
    before = unet_state(trainer)
    with pytest.raises(StockModelError, match=message) as e:
        trainer.on_train_start()
    assert "same plans and configuration" in str(e.value)
    assert not train_start_calls  # refused before nnU-Net's start, i.e. before any training step
    assert all(torch.equal(before[k], v) for k, v in unet_state(trainer).items())  # nothing half-loaded
    assert not (Path(trainer.output_folder) / RECORD_NAME).exists()


def test_tensors_that_are_not_the_plans_unet_are_refused(ws, train_start_calls, tmp_path):
    plans, dsj = tiny_plans(), tiny_dataset_json()
    model_folder, _ = stock_model(plans, dsj)
    checkpoint = torch.load(model_folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
    weights = checkpoint["network_weights"]
    weights.pop("decoder.seg_layers.0.weight")  # nnU-Net's -pretrained_weights would skip these: strict here
    weights["decoder.extra_head.weight"] = torch.zeros(3)
    torch.save(checkpoint, tmp_path / "other_network.pth")
    trainer = make_trainer(TinyGuiDINO, plans, dsj)
    trainer.init_unet = str(tmp_path / "other_network.pth")
    with pytest.raises(StockModelError, match=r"1 of the U-Net's \d+ tensors missing: \['decoder.seg_layers.0.weight'\]"
                                              r"; 1 unexpected: \['decoder.extra_head.weight'\]"):
        trainer.on_train_start()
    assert not train_start_calls


def test_a_guidino_checkpoint_is_refused(ws, train_start_calls, tmp_path):
    plans, dsj = tiny_plans(), tiny_dataset_json()
    guided = make_trainer(TinyGuiDINO, plans, dsj)
    guided.initialize()
    guided.save_checkpoint(str(tmp_path / "guidino.pth"))  # the trainer's own checkpoint, as nnU-Net writes it
    trainer = make_trainer(TinyGuiDINO, plans, dsj, fold=1)
    trainer.init_unet = str(tmp_path / "guidino.pth")
    with pytest.raises(StockModelError, match=r"is a GuiDINO checkpoint \(trainer TinyGuiDINO\).*--c"):
        trainer.on_train_start()


def test_a_missing_fold_is_refused_listing_the_folds_present(tmp_path):
    model = tmp_path / "nnUNetTrainer__nnUNetPlans__2d"
    for fold, name in ((0, "checkpoint_final.pth"), (2, "checkpoint_latest.pth"), (3, "checkpoint_final.pth")):
        (model / f"fold_{fold}").mkdir(parents=True)
        (model / f"fold_{fold}" / name).touch()
    assert resolve_setting(str(model), 3).checkpoint == (model / "fold_3" / "checkpoint_final.pth").resolve()
    with pytest.raises(StockModelError, match=r"no fold_1/checkpoint_final.pth for fold 1, the fold being trained\. "
                                              r"Folds present: fold_0, fold_3, fold_2 \(unfinished"):
        resolve_setting(str(model), 1)
    with pytest.raises(StockModelError, match=r"is a fold folder\. Give the model folder above it"):
        resolve_setting(str(model / "fold_0"), 0)
    with pytest.raises(StockModelError, match="no such file or folder"):
        resolve_setting(str(tmp_path / "nowhere"), 0)
    assert resolve_setting(None, 0) is None  # nothing configured (the environment variable is unset here)


class Payload:
    """Unpickling this creates a folder: stands for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pth"
    torch.save({"network_weights": {"w": torch.zeros(1)}, "init_args": {"plans": Payload(marker)}}, path)
    with pytest.raises(StockModelError, match=r"Refused to read .*evil.pth: unpickling it needs posix.mkdir\. A "
                                              r"pickle can run arbitrary code"):
        read_stock_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what nnU-Net's own loading does: the payload is real
    assert marker.exists()


def test_only_numpy_scalars_are_allowed_beyond_tensors(tmp_path):
    import datetime

    import numpy as np

    scalars = {"network_weights": {"w": torch.ones(1)}, "logging": [np.float32(0.5), np.float64(0.25), np.int64(3)]}
    torch.save(scalars, tmp_path / "scalars.pth")
    checkpoint, sha256 = read_stock_checkpoint(tmp_path / "scalars.pth")
    assert checkpoint["logging"] == [0.5, 0.25, 3] and len(sha256) == 64
    torch.save({"logging": [datetime.date(2026, 12, 1)]}, tmp_path / "date.pth")  # names only what is not allowed
    with pytest.raises(StockModelError, match=r"needs datetime\.date\. A pickle"):
        read_stock_checkpoint(tmp_path / "date.pth")


def test_the_fine_tuning_variants(ws, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "trainers"))  # as nnU-Net imports them
    variants = importlib.import_module("nnUNetTrainerGuiDINO")
    plans, dsj = tiny_plans(), tiny_dataset_json()
    trainer = make_trainer(variants.nnUNetTrainerGuiDINO_fromStock, plans, dsj)
    assert (trainer.num_epochs, trainer.initial_lr) == (250, 1e-3)
    with pytest.raises(StockModelError, match=rf"fine-tunes a stock nnU-Net model.*Set {INIT_UNET_ENV_VAR}"):
        init_unet_from_stock(trainer)  # never trains a U-Net from scratch on this schedule
    frozen = make_trainer(variants.nnUNetTrainerGuiDINO_fromStockFrozenUNet, plans, dsj, fold=1)
    frozen.network = frozen.build_network_architecture(frozen.plans_manager, frozen.configuration_manager, 1, 3)
    optimizer, _ = frozen.configure_optimizers()
    rates = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert rates["segmentation"] == 0.0 and rates["guidance"] == GuiDINOTrainer.lr_guidance


# ---------------------------------------------------------------------------------------------- resume
def test_resume_keeps_its_own_unet_and_a_fresh_run_without_setting_drops_the_old_record(ws, monkeypatch,
                                                                                        train_start_calls):
    plans, dsj = tiny_plans(), tiny_dataset_json()
    model_folder, _ = stock_model(plans, dsj)
    monkeypatch.setenv(INIT_UNET_ENV_VAR, str(model_folder))
    first = make_trainer(TinyGuiDINO, plans, dsj)
    first.on_train_start()
    stock_start = unet_state(first)
    with torch.no_grad():  # what training does to the U-Net
        for p in unwrap(first.network).unet.parameters():
            p.mul_(1.5)
    trained = unet_state(first)
    checkpoint = Path(first.output_folder) / "checkpoint_latest.pth"
    first.save_checkpoint(str(checkpoint))
    first_record = (Path(first.output_folder) / RECORD_NAME).read_text()

    resumed = make_trainer(TinyGuiDINO, plans, dsj, continue_training=True)  # nnUNetv2_train --c
    resumed.load_checkpoint(str(checkpoint))
    resumed.on_train_start()
    state = unet_state(resumed)
    assert all(torch.equal(state[k], trained[k]) for k in state)
    assert not all(torch.equal(state[k], stock_start[k]) for k in state)
    assert (Path(resumed.output_folder) / RECORD_NAME).read_text() == first_record  # still this run's start
    assert "the stock model setting (nnUNet_dino_init_unet / init_unet) is not used" in log_text(resumed)

    monkeypatch.delenv(INIT_UNET_ENV_VAR)
    fresh = make_trainer(TinyGuiDINO, plans, dsj)  # a new run from scratch in the same fold folder
    fresh.on_train_start()
    assert not (Path(fresh.output_folder) / RECORD_NAME).exists()
    assert f"Removed {RECORD_NAME} of an earlier run" in log_text(fresh)
