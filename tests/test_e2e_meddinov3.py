"""MedDINOv3 end to end through the stock nnU-Net commands, in subprocesses, as a user runs it (CPU).

One short training of the bundled Dataset990_HippoTiny (3D NIfTI volumes trained slice-wise in 2d) with
``nnUNetTrainerMedDINOv3_CPUSmoke`` (ViT-B, no patch upsampling, no mirroring: cheap enough for a CPU) is shared by
the assertions below. DINO weights are random (nnUNet_dino_weights=random): no pretrained weights exist here.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_dino.cli.stock_pipeline import command, evaluate, run, train

REPO = Path(__file__).resolve().parents[1]
RAW = REPO / "datasets" / "nnUNet_raw" / "Dataset990_HippoTiny"

TRAINER = "nnUNetTrainerMedDINOv3_CPUSmoke"

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def hippo(hippo_workspace):
    env = hippo_workspace["env"]
    work = hippo_workspace["work"] / "meddinov3"
    work.mkdir()
    log = train("990", TRAINER, env, log=work / "train.log")
    model = hippo_workspace["results"] / f"{TRAINER}__nnUNetPlans__2d"
    return {"work": work, "env": env, "train_log": log, "model": model}


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_plugin_trainer_trained_the_meddinov3_network(hippo):
    fold = hippo["model"] / "fold_0"
    assert f"Using trainer '{TRAINER}' from:" in hippo["train_log"]  # found through nnUNet_extTrainer, no fallback
    assert (fold / "checkpoint_final.pth").is_file()
    weights = json.loads((fold / "dino_weights.json").read_text())
    assert weights["backbones"][0]["arch"] == "dinov3_vitb16" and weights["backbones"][0]["random_init"] is True
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == TRAINER
    keys = ckpt["network_weights"].keys()
    assert "decoder.head.weight" in keys and "backbone.vit.blocks.11.attn.q_proj.weight" in keys
    assert not any("lora_" in k for k in keys)  # full fine-tuning
    assert ckpt["network_weights"]["decoder.head.weight"].shape[:2] == (3, 192)  # background + 2 labels
    groups = ckpt["optimizer_state"]["param_groups"]
    assert [g["name"] for g in groups] == ["decoder", "vit"] and [g["initial_lr"] for g in groups] == [3e-4, 3e-5]
    assert ckpt["init_args"]["configuration"] == "2d" and ckpt["inference_allowed_mirroring_axes"] is None
    logged = ckpt["logging"]
    assert len(logged["train_losses"]) == 1 and np.isfinite(logged["train_losses"]).all()


@pytest.fixture(scope="module")
def predictions(hippo):
    """One nnUNetv2_predict run in a fresh process on the 4 test images plus one validation case (one process start
    and one load of the ViT-B checkpoint for both checks below). The validation case's prediction is then moved
    aside, so the prediction folder holds exactly the test set for nnUNetv2_evaluate_folder."""
    fold = hippo["model"] / "fold_0"
    val_case = sorted(p.name[: -len(".nii.gz")] for p in (fold / "validation").glob("*.nii.gz"))[0]
    inputs = hippo["work"] / "inputs"
    shutil.copytree(RAW / "imagesTs", inputs)
    shutil.copy(RAW / "imagesTr" / f"{val_case}_0000.nii.gz", inputs)
    out = hippo["work"] / "test_pred"
    env = {k: v for k, v in hippo["env"].items() if k != "nnUNet_dino_weights"}  # prediction needs no DINO file
    log = run([command("nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", "990", "-c", "2d", "-tr",
               TRAINER, "-f", "0", "-device", "cpu"], env)
    val_out = hippo["work"] / "val_pred"
    val_out.mkdir()
    shutil.move(out / f"{val_case}.nii.gz", val_out / f"{val_case}.nii.gz")
    return {"log": log, "test": out, "val": val_out / f"{val_case}.nii.gz",
            "val_reference": fold / "validation" / f"{val_case}.nii.gz"}


def test_predict_in_fresh_process_reproduces_validation(predictions):
    assert "old build_network_architecture signature" not in predictions["log"]
    # The network nnUNetv2_predict rebuilt (classmethod) and loaded strictly gives exactly the result of nnU-Net's
    # validation at the end of training.
    assert np.array_equal(_read(predictions["val"]), _read(predictions["val_reference"]))


def test_predict_test_set_and_evaluate(hippo, predictions):
    out = predictions["test"]
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (RAW / "imagesTs").glob("*_0000.nii.gz"))
    assert len(cases) == 4 and sorted(p.name for p in out.glob("*.nii.gz")) == [f"{c}.nii.gz" for c in cases]
    for case in cases:
        predicted = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        image = sitk.ReadImage(str(RAW / "imagesTs" / f"{case}_0000.nii.gz"))
        assert predicted.GetSize() == image.GetSize()
        assert np.allclose(predicted.GetSpacing(), image.GetSpacing())
        assert np.allclose(predicted.GetOrigin(), image.GetOrigin())
        assert np.allclose(predicted.GetDirection(), image.GetDirection())
        assert set(np.unique(sitk.GetArrayFromImage(predicted))) <= {0, 1, 2}
    summary = evaluate(RAW / "labelsTs", out, hippo["env"])
    assert set(summary["mean"]) == {"1", "2"} and len(summary["metric_per_case"]) == 4
    # No Dice floor: a few random-weight iterations cannot learn (see the GuiDINO e2e). A valid evaluation must hold.
    for label in ("1", "2"):
        dice = summary["mean"][label]["Dice"]
        assert np.isnan(dice) or 0.0 <= dice <= 1.0
