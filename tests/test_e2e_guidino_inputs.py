"""GuiDINO through the stock nnU-Net commands on the other inputs users bring (CPU, subprocesses, random DINO):

- 2D PNGs read by nnU-Net's NaturalImage2DIO: grey ultrasound (HC18Tiny, bundled) and RGB colonoscopy
  (KvasirTiny, research-only, read from ../shared and never shipped);
- region-based training (nnU-Net ``regions_class_order``) with nnU-Net's ResEnc-M plans
  (``-pl nnUNetPlannerResEncM`` / ``-p nnUNetResEncUNetMPlans``), combined in one short run to keep CI short
  (each part also has its own unit tests in test_guidino_network.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import BUNDLED_RAW, SHARED_RAW
from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

from nnunet_dino.cli.stock_pipeline import command, evaluate, nnunet_environment, run, train

TRAINER = "nnUNetTrainerGuiDINO_CPUPipeline"  # seconds: where only the pipeline is checked, never Dice
LEARNING_TRAINER = "nnUNetTrainerGuiDINO_CPUSmoke"  # 36 iterations: enough to find HC18's fetal heads

pytestmark = pytest.mark.e2e


def _dataset_folder(raw_root: Path, dataset_id: str) -> Path:
    return next(p for p in raw_root.iterdir() if p.name.startswith(f"Dataset{dataset_id}_"))


def _predict(dataset: str, images: Path, out: Path, env: dict, plans: str = "nnUNetPlans",
             trainer: str = TRAINER) -> None:
    run([command("nnUNetv2_predict"), "-i", str(images), "-o", str(out), "-d", dataset, "-c", "2d", "-tr", trainer,
         "-p", plans, "-f", "0", "-device", "cpu"], env)


@pytest.mark.parametrize("dataset,raw_root,channels,trainer", [("992", BUNDLED_RAW, 1, LEARNING_TRAINER),
                                                               ("991", SHARED_RAW, 3, TRAINER)],
                         ids=["HC18Tiny-grey-png", "KvasirTiny-rgb-png"])
def test_png_datasets(dataset, raw_root, channels, trainer, tmp_path):
    if not raw_root.is_dir():
        pytest.fail(f"{raw_root} is missing: KvasirTiny is research-only and read from ../shared, never shipped. "
                    f"Run the suite from a checkout that has ../shared beside it.")
    folder = _dataset_folder(raw_root, dataset)
    env = nnunet_environment(raw_root, tmp_path, nnUNet_dino_weights="random")
    run([command("nnUNetv2_plan_and_preprocess"), "-d", dataset, "-c", "2d", "-np", "1"], env)
    log = train(dataset, trainer, env)
    assert f"Using trainer '{trainer}' from:" in log
    plans = json.loads((tmp_path / "nnUNet_preprocessed" / folder.name / "nnUNetPlans.json").read_text())
    assert plans["image_reader_writer"] == "NaturalImage2DIO"
    model = tmp_path / "nnUNet_results" / folder.name / f"{trainer}__nnUNetPlans__2d"
    ckpt = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    adapter_in = ckpt["network_weights"].get("guidance.adapter.channel_projection.weight")
    assert adapter_in is None  # 1 channel is repeated to RGB, 3 channels are RGB: no learned projection
    # channel names R, G, B (not "rgb_to_0_1") make nnU-Net z-score each colour: those pass to the ViT unchanged
    schemes = plans["configurations"]["2d"]["normalization_schemes"]
    assert schemes == ["ZScoreNormalization"] * channels
    assert torch.equal(ckpt["network_weights"]["guidance.adapter.vit_scale"], torch.ones(1, 3, 1, 1))

    out = tmp_path / "pred"
    _predict(dataset, folder / "imagesTs", out, env, trainer=trainer)
    summary = evaluate(folder / "labelsTs", out, env)
    assert len(summary["metric_per_case"]) == 4
    reader = NaturalImage2DIO()
    for case in summary["metric_per_case"]:
        pred, _ = reader.read_seg(case["prediction_file"])
        ref, _ = reader.read_seg(case["reference_file"])
        image, _ = reader.read_images([str(folder / "imagesTs" / (Path(case["reference_file"]).stem + "_0000.png"))])
        assert image.shape[0] == channels
        assert pred.shape == ref.shape and set(np.unique(pred)) <= {0, 1}
    if dataset == "992":
        # Floor 0.1 on HC18's large fetal heads: the network must find the structure (an empty prediction, wrong label
        # values or misplaced output score ~0). Measured on 2026-11-22 on this 2-core CPU with random DINO weights
        # after these 36 iterations: mean Dice 0.649 (a run with test-time mirroring) and 0.334 (without); pseudo-Dice
        # 0.23 after the first 12.
        # Beating the best constant prediction (all foreground, Dice 0.334 here) would show more, but at this budget
        # one run of two tied with it, so that is not a floor CI can rely on.
        # KvasirTiny gets no floor: one run measured 0.277, barely above its constant predictor (0.24). HippoTiny:
        # see test_e2e_guidino.py (even stock nnU-Net predicts no foreground after 100 such iterations).
        assert summary["mean"]["1"]["Dice"] > 0.1, summary["mean"]


@pytest.fixture(scope="module")
def regions_resenc(tmp_path_factory):
    """HippoTiny relabelled as nested regions (whole hippocampus = 1|2, posterior = 2), planned with ResEnc-M."""
    work = tmp_path_factory.mktemp("regions")
    raw = work / "raw"
    source = BUNDLED_RAW / "Dataset990_HippoTiny"
    target = raw / "Dataset993_HippoRegions"
    target.mkdir(parents=True)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.symlink(source / sub, target / sub)
    dataset_json = json.loads((source / "dataset.json").read_text())
    dataset_json["labels"] = {"background": 0, "hippocampus": [1, 2], "posterior": 2}
    dataset_json["regions_class_order"] = [1, 2]
    (target / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    env = nnunet_environment(raw, work, nnUNet_dino_weights="random")
    run([command("nnUNetv2_plan_and_preprocess"), "-d", "993", "-c", "2d", "-np", "1", "-pl", "nnUNetPlannerResEncM"],
        env)
    log = train("993", TRAINER, env, extra=["-p", "nnUNetResEncUNetMPlans"])
    model = work / "nnUNet_results" / "Dataset993_HippoRegions" / f"{TRAINER}__nnUNetResEncUNetMPlans__2d"
    return {"work": work, "env": env, "raw": target, "log": log, "model": model}


def test_regions_with_resenc_plans_train_one_guide_per_region(regions_resenc):
    assert f"Using trainer '{TRAINER}' from:" in regions_resenc["log"]
    ckpt = torch.load(regions_resenc["model"] / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                      weights_only=False)
    weights = ckpt["network_weights"]
    assert ckpt["init_args"]["plans"]["plans_name"] == "nnUNetResEncUNetMPlans"
    arch = ckpt["init_args"]["plans"]["configurations"]["2d"]["architecture"]["network_class_name"]
    assert arch.endswith("ResidualEncoderUNet")
    assert weights["guidance.tokenbook.logit_bias"].shape == (2,)  # regions: 2 sigmoid outputs, 2 guides
    assert weights["unet.decoder.seg_layers.0.weight"].shape[0] == 2


def test_regions_prediction_follows_regions_class_order(regions_resenc):
    out = regions_resenc["work"] / "pred"
    _predict("993", regions_resenc["raw"] / "imagesTs", out, regions_resenc["env"], plans="nnUNetResEncUNetMPlans")
    summary = evaluate(regions_resenc["raw"] / "labelsTs", out, regions_resenc["env"])
    assert set(summary["mean"]) == {"(1, 2)", "2"}  # nnU-Net evaluates the regions themselves
    for case in summary["metric_per_case"]:
        pred = sitk.ReadImage(case["prediction_file"])
        ref = sitk.ReadImage(case["reference_file"])
        assert pred.GetSize() == ref.GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2}
