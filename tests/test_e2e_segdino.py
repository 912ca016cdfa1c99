"""SegDINO v1 and v2 end to end through the stock nnU-Net commands, in subprocesses, as a user runs them (CPU).

Short trainings of the bundled Dataset990_HippoTiny (3D NIfTI volumes trained slice-wise in 2d): SegDINO v1 and
SegDINOv2 with deep supervision (the superset of SegDINOv2's path: TPA, SAD, plus the auxiliary heads that the
predictor must rebuild and load strictly; plain SegDINOv2 is covered by tests/test_segdino_networks.py, and left out
here to keep this module within minutes on a 2-core machine), each from a synthetic DINOv3 ViT-S file in Meta's
format (conftest's ``dinov3_s``: random weights, but a real file, so that "frozen" can be checked against the weights
that were loaded), then nnUNetv2_predict in a fresh process without the DINO file, and nnUNetv2_evaluate_folder.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_dino.backbone import load_backbone
from nnunet_dino.cli.stock_pipeline import command, evaluate, run, train
from nnunet_dino.training.checkpoints import DECODE_KEY, PROVENANCE_KEY

REPO = Path(__file__).resolve().parents[1]
HIPPO = REPO / "datasets" / "nnUNet_raw" / "Dataset990_HippoTiny"

V1 = "nnUNetTrainerSegDINO_CPUSmoke"
V2_DS = "nnUNetTrainerSegDINOv2_deepSupervision_CPUSmoke"
TRAINERS = (V1, V2_DS)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def segdino(hippo_workspace, dinov3_s):
    work = hippo_workspace["work"] / "segdino"
    work.mkdir()
    weights = dinov3_s.files["meta"]
    env = dict(hippo_workspace["env"], nnUNet_dino_weights=str(weights))
    logs = {t: train("990", t, env, log=work / f"train_{t}.log") for t in TRAINERS}
    return {"work": work, "env": env, "weights": weights, "logs": logs, "results": hippo_workspace["results"]}


def fold_of(segdino, trainer: str) -> Path:
    return segdino["results"] / f"{trainer}__nnUNetPlans__2d" / "fold_0"


def checkpoint(segdino, trainer: str) -> dict:
    return torch.load(fold_of(segdino, trainer) / "checkpoint_final.pth", map_location="cpu", weights_only=False)


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.mark.parametrize("trainer", TRAINERS)
def test_plugin_trainer_ran_with_the_configured_dino_file(segdino, trainer):
    log, fold = segdino["logs"][trainer], fold_of(segdino, trainer)
    assert f"Using trainer '{trainer}' from:" in log  # found through nnUNet_extTrainer, no fallback
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file()
    record = json.loads((fold / "dino_weights.json").read_text())["backbones"]
    assert len(record) == 1 and record[0]["random_init"] is False
    assert Path(record[0]["source"]).resolve() == Path(segdino["weights"]).resolve()
    ckpt = checkpoint(segdino, trainer)
    assert ckpt["trainer_name"] == trainer
    assert all(np.isfinite(ckpt["logging"]["train_losses"]))


@pytest.mark.parametrize("trainer", TRAINERS)
def test_backbone_stayed_frozen_and_only_the_head_was_optimised(segdino, trainer):
    ckpt = checkpoint(segdino, trainer)
    weights = ckpt["network_weights"]
    loaded = load_backbone(weights=segdino["weights"]).vit.state_dict()  # what the trainer loaded at the start
    prefix = "encoder.backbone.vit."
    saved = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    assert saved.keys() == loaded.keys()
    changed = [k for k in loaded if not torch.equal(saved[k], loaded[k])]
    assert not changed, f"frozen DINO weights changed in training: {changed[:5]}"
    # the optimiser held only the head, and the head did move (its AdamW state is non-zero)
    groups = ckpt["optimizer_state"]["param_groups"]
    assert [g["name"] for g in groups] == ["head"]
    # Not parameters: the checkpoint's provenance record and SegDINOv2's decode-resolution buffer.
    head_tensors = [k for k in weights if not k.startswith("encoder.") and k not in (PROVENANCE_KEY, DECODE_KEY)]
    assert len(groups[0]["params"]) == len(head_tensors)
    states = ckpt["optimizer_state"]["state"].values()
    assert states and any(s["exp_avg"].abs().sum() > 0 for s in states)
    # the trainer's log states the trainable parameter count, which is the head's size
    count = int(re.search(r"([\d,]+) trainable of", segdino["logs"][trainer]).group(1).replace(",", ""))
    assert count == sum(weights[k].numel() for k in head_tensors)
    if trainer == V1:
        assert 2.18e6 < count < 2.25e6  # the paper's ~2.2M (3 output channels here)
    else:
        assert 3.25e6 < count < 3.35e6  # ~3.3M


def test_deep_supervision_trained_with_nnunets_wrapper_and_single_output_without(segdino):
    ds = json.loads((fold_of(segdino, V2_DS) / "debug.json").read_text())
    assert ds["enable_deep_supervision"] == "True" and ds["loss"].startswith("DeepSupervisionWrapper")
    assert any(k.startswith("aux_heads.") for k in checkpoint(segdino, V2_DS)["network_weights"])
    plain = json.loads((fold_of(segdino, V1) / "debug.json").read_text())
    assert plain["enable_deep_supervision"] == "False" and plain["loss"].startswith("DC_and_CE_loss")


@pytest.mark.parametrize("trainer", TRAINERS)
def test_predict_in_a_fresh_process_and_evaluate(segdino, trainer):
    out = segdino["work"] / f"test_pred_{trainer}"
    env = {k: v for k, v in segdino["env"].items() if k != "nnUNet_dino_weights"}  # prediction needs no DINO file
    run([command("nnUNetv2_predict"), "-i", str(HIPPO / "imagesTs"), "-o", str(out), "-d", "990", "-c", "2d",
         "-tr", trainer, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"], env)  # no extra worker processes
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (HIPPO / "imagesTs").glob("*_0000.nii.gz"))
    assert sorted(p.name[: -len(".nii.gz")] for p in out.glob("*.nii.gz")) == cases
    for case in cases:
        predicted = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        image = sitk.ReadImage(str(HIPPO / "imagesTs" / f"{case}_0000.nii.gz"))
        assert predicted.GetSize() == image.GetSize()
        assert np.allclose(predicted.GetSpacing(), image.GetSpacing())
        assert np.allclose(predicted.GetOrigin(), image.GetOrigin())
        assert np.allclose(predicted.GetDirection(), image.GetDirection())
        assert set(np.unique(_read(out / f"{case}.nii.gz"))) <= {0, 1, 2}
    summary = evaluate(HIPPO / "labelsTs", out, env)
    assert set(summary["mean"]) == {"1", "2"} and len(summary["metric_per_case"]) == len(cases)
    # No Dice floor: a few CPU iterations from random DINO weights learn nothing (see test_e2e_guidino.py).
    for label in ("1", "2"):
        dice = summary["mean"][label]["Dice"]
        assert np.isnan(dice) or 0.0 <= dice <= 1.0
