"""GuiDINO in nnU-Net's cascade (3d_lowres, then 3d_cascade_fullres) through the stock commands, in subprocesses (CPU).

HippoTiny's images are too small for nnU-Net's planner to add a 3d_lowres configuration, so the plans variant
``nnUNetPlansCascadeTiny`` adds one the way the planner writes it: 3d_lowres at a coarser spacing with
``next_stage``, and 3d_cascade_fullres inheriting 3d_fullres with ``previous_stage``; the narrow U-Net of
test_e2e_guidino_3d.py keeps the 3D steps cheap. The low-resolution stage trains on fold ``all`` so that nnU-Net's
final validation writes the previous-stage segmentation of every training case, which the cascade stage's data
loader needs (a real cascade trains the five folds of 3d_lowres for that). Random DINO weights.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

from nnunet_dino.cli.stock_pipeline import command, run, train

REPO = Path(__file__).resolve().parents[1]
RAW = REPO / "datasets" / "nnUNet_raw" / "Dataset990_HippoTiny"
TRAINER = "nnUNetTrainerGuiDINO_CPUSmoke3d"
PLANS = "nnUNetPlansCascadeTiny"
TEST_CASE = "hippocampus_067"

pytestmark = pytest.mark.e2e


def cascade_plans(plans: dict) -> dict:
    plans = copy.deepcopy(plans)
    plans["plans_name"] = PLANS
    configurations = plans["configurations"]
    fullres = configurations["3d_fullres"]
    fullres["data_identifier"] = f"{PLANS}_3d_fullres"  # its own data: other modules preprocess nnUNetPlans' 3d
    arch = fullres["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [8 * 2 ** i for i in range(arch["n_stages"])]
    # 1.6x the spacing; a patch of 24x32x24 keeps the 3 poolings of 3d_fullres's network
    configurations["3d_lowres"] = {
        "inherits_from": "3d_fullres", "data_identifier": f"{PLANS}_3d_lowres", "next_stage": "3d_cascade_fullres",
        "spacing": [s * 1.6 for s in fullres["spacing"]], "patch_size": [24, 32, 24],
        "median_image_size_in_voxels": [round(m / 1.6) for m in fullres["median_image_size_in_voxels"]]}
    configurations["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    return plans


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _predict(inputs: Path, out: Path, configuration: str, fold: str, env: dict, extra: list[str] = ()) -> str:
    # At the training's torch threads: 3D convolutions on CPU are not bit-identical across thread counts (see
    # test_e2e_guidino_3d.py), and the predictions are compared with the trainings' validation outputs.
    env = dict(env, nnUNet_def_n_proc=env.get("nnUNet_dino_cpu_threads", "1"))
    return run([command("nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", "990", "-c", configuration,
                "-p", PLANS, "-tr", TRAINER, "-f", fold, "-device", "cpu", *extra], env)


@pytest.fixture(scope="module")
def cascade(hippo_workspace):
    env, pre, results = hippo_workspace["env"], hippo_workspace["preprocessed"], hippo_workspace["results"]
    assert env.get("nnUNet_dino_cpu_threads"), "the equality checks below need a fixed torch thread count"
    work = hippo_workspace["work"] / "guidino_cascade"
    work.mkdir()
    save_json(cascade_plans(load_json(pre / "nnUNetPlans.json")), str(pre / f"{PLANS}.json"))
    run([command("nnUNetv2_preprocess"), "-d", "990", "-plans_name", PLANS, "-c", "3d_lowres", "3d_fullres",
         "-np", "1", "1"], env)
    low_log = train("990", TRAINER, env, configuration="3d_lowres", fold="all", extra=["-p", PLANS])
    cascade_log = train("990", TRAINER, env, configuration="3d_cascade_fullres", extra=["-p", PLANS])
    low = results / f"{TRAINER}__{PLANS}__3d_lowres"
    high = results / f"{TRAINER}__{PLANS}__3d_cascade_fullres"
    val_cases = sorted(p.name[: -len(".nii.gz")] for p in (high / "fold_0" / "validation").glob("*.nii.gz"))
    inputs = work / "inputs"
    inputs.mkdir()
    for case in val_cases:
        shutil.copy(RAW / "imagesTr" / f"{case}_0000.nii.gz", inputs)
    shutil.copy(RAW / "imagesTs" / f"{TEST_CASE}_0000.nii.gz", inputs)
    # The user's two calls: the low-resolution stage, then the full-resolution stage on its segmentations. Without
    # the DINO weights setting: each checkpoint holds its ViT.
    predict_env = {k: v for k, v in env.items() if k != "nnUNet_dino_weights"}
    _predict(inputs, work / "pred_lowres", "3d_lowres", "all", predict_env)
    printed = _predict(inputs, work / "pred_cascade", "3d_cascade_fullres", "0", predict_env,
                       ["-prev_stage_predictions", str(work / "pred_lowres")])
    return {"work": work, "low": low, "high": high, "low_log": low_log, "cascade_log": cascade_log,
            "val_cases": val_cases, "inputs": inputs, "printed": printed}


def test_both_stages_train_with_the_slice_wise_guide_and_the_vit_sees_only_the_image(cascade):
    low_text = sorted((cascade["low"] / "fold_all").glob("training_log_*.txt"))[0].read_text()
    assert "GuiDINO 3D guide (3d_lowres): slice-wise" in low_text and "ViT input channels [0] of 1" in low_text
    # nnU-Net's low-resolution segmentation of every training case, for the next stage's data loader
    next_stage = cascade["low"] / "predicted_next_stage" / "3d_cascade_fullres"
    assert len(list(next_stage.glob("*.b2nd"))) == len(list((RAW / "imagesTr").glob("*_0000.nii.gz")))

    high_text = sorted((cascade["high"] / "fold_0").glob("training_log_*.txt"))[0].read_text()
    assert "GuiDINO 3D guide (3d_cascade_fullres): slice-wise" in high_text
    assert ("ViT input channels [0] of 3 (2 more: the cascade's low-resolution segmentation, not shown to the "
            "ViT)") in high_text
    weights = torch.load(cascade["high"] / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                         weights_only=False)["network_weights"]
    first_conv = next(v for k, v in weights.items() if k.startswith("unet.encoder.") and v.ndim == 5)
    assert first_conv.shape[1] == 3  # nnU-Net's own U-Net takes the image and the one-hot previous stage
    patch_embed = next(v for k, v in weights.items() if "patch_embed" in k and v.ndim == 4)
    assert patch_embed.shape[1] == 3  # the ViT's RGB stem, fed the image channel only (the adapter's choice)


def test_the_cascade_predicts_in_a_fresh_process_exactly_as_its_validation(cascade):
    assert cascade["printed"].count("RANDOMLY INITIALISED DINO weights") == 1
    for case in cascade["val_cases"]:
        # stage 1 = fold all's validation output; stage 2 = the cascade's validation, which read stage 1's
        # segmentation from nnU-Net's predicted_next_stage (resampled there, re-preprocessed here)
        assert np.array_equal(_read(cascade["work"] / "pred_lowres" / f"{case}.nii.gz"),
                              _read(cascade["low"] / "fold_all" / "validation" / f"{case}.nii.gz"))
        assert np.array_equal(_read(cascade["work"] / "pred_cascade" / f"{case}.nii.gz"),
                              _read(cascade["high"] / "fold_0" / "validation" / f"{case}.nii.gz"))
    for case in cascade["val_cases"] + [TEST_CASE]:
        out = sitk.ReadImage(str(cascade["work"] / "pred_cascade" / f"{case}.nii.gz"))
        image = sitk.ReadImage(str(cascade["inputs"] / f"{case}_0000.nii.gz"))
        assert out.GetSize() == image.GetSize() and np.allclose(out.GetSpacing(), image.GetSpacing())
        assert np.allclose(out.GetOrigin(), image.GetOrigin())
        assert set(np.unique(sitk.GetArrayFromImage(out))) <= {0, 1, 2}

