"""GuiDINO on 3d_fullres end to end through the stock nnU-Net commands, in subprocesses (CPU).

One tiny training of the bundled Dataset990_HippoTiny, shared by every check below: ``nnUNetv2_preprocess -c
3d_fullres`` on the workspace's plans, then a plans variant with a narrow U-Net (``-p nnUNetPlansTiny3d``: the
planned 40x56x40 patch, so one sliding-window tile per case, but 8..64 instead of 32..256 features: the stock
3D U-Net alone took 10 s per step on this 2-core machine) trained by ``nnUNetTrainerGuiDINO_CPUSmoke3d`` (8
iterations, ViT-S on every 4th plane). Random DINO weights: no pretrained weights exist here.
"""
from __future__ import annotations

import copy
import json
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

from nnunet_dino.cli.stock_pipeline import command, evaluate, run, train
from nnunet_dino.training.checkpoints import PROVENANCE_KEY

REPO = Path(__file__).resolve().parents[1]
RAW = REPO / "datasets" / "nnUNet_raw" / "Dataset990_HippoTiny"
TRAINER = "nnUNetTrainerGuiDINO_CPUSmoke3d"
PLANS = "nnUNetPlansTiny3d"
CONFIGURATION = "3d_fullres"
TEST_CASES = ("hippocampus_067", "hippocampus_170")  # two of the four test images: one 3D prediction is ~10 s here

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def hippo3d(hippo_workspace):
    env, pre = hippo_workspace["env"], hippo_workspace["preprocessed"]
    work = hippo_workspace["work"] / "guidino_3d"
    work.mkdir()
    run([command("nnUNetv2_preprocess"), "-d", "990", "-c", CONFIGURATION, "-np", "1"], env)
    plans = copy.deepcopy(load_json(pre / "nnUNetPlans.json"))
    plans["plans_name"] = PLANS
    arch = plans["configurations"][CONFIGURATION]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [8 * 2 ** i for i in range(arch["n_stages"])]
    save_json(plans, str(pre / f"{PLANS}.json"))  # same data_identifier: reuses the 3d_fullres data
    for folder, suffix in (("imagesTs", "_0000.nii.gz"), ("labelsTs", ".nii.gz")):
        (work / folder).mkdir()
        for case in TEST_CASES:
            shutil.copy(RAW / folder / f"{case}{suffix}", work / folder)
    shutil.copytree(work / "imagesTs", work / "overlay_inputs")  # before the validation cases join imagesTs
    log = train("990", TRAINER, env, configuration=CONFIGURATION, extra=["-p", PLANS])
    model = hippo_workspace["results"] / f"{TRAINER}__{PLANS}__{CONFIGURATION}"
    return {"work": work, "env": env, "train_log": log, "model": model, "preprocessed": pre, "plans": plans}


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _predict(inputs: Path, out: Path, env: dict) -> str:
    # nnUNetv2_train's final validation runs the sliding window at the training's torch threads (cpu_count(), or
    # nnUNet_dino_cpu_threads); nnUNetv2_predict caps torch at nnUNet_def_n_proc threads. 3D convolutions on CPU are
    # not bit-identical across thread counts (one voxel of 64,925 differed at 1 vs 2 threads; the 2D ones were), so
    # prediction runs at the training's count here.
    threads = env.get("nnUNet_dino_cpu_threads") or str(multiprocessing.cpu_count())
    env = dict(env, nnUNet_def_n_proc=threads)
    return run([command("nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", "990", "-c", CONFIGURATION,
                "-p", PLANS, "-tr", TRAINER, "-f", "0", "-device", "cpu"], env)


def test_3d_training_ran_with_the_slice_wise_guide(hippo3d):
    fold = hippo3d["model"] / "fold_0"
    assert f"Using trainer '{TRAINER}' from:" in hippo3d["train_log"]
    log_text = sorted(fold.glob("training_log_*.txt"))[0].read_text()
    # Hippocampus 3d_fullres is isotropic (1 mm): axis 0 by the tie-break; 40 planes, every 4th and the last.
    assert ("GuiDINO 3D guide (3d_fullres): slice-wise: planes perpendicular to patch axis 0 (56x40, 6x4 tokens "
            "each), the ViT on 11 of 40 planes (stride 4") in log_text
    assert "ViT input channels [0] of 1" in log_text
    assert json.loads((fold / "dino_weights.json").read_text())["backbones"][0]["random_init"] is True
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    weights = ckpt["network_weights"]
    assert weights["guidance.slicing"].tolist() == [0, 4]
    gates = [k for k in weights if k.startswith("gates.") and k.endswith("mix.weight")]
    assert len(gates) == 4 and all(weights[k].ndim == 5 for k in gates)  # 1x1x1 gates on every 3D encoder stage
    logged = ckpt["logging"]
    for phase in ("train", "val"):
        for term in ("seg_loss", "guide_loss", "hinge_loss"):
            assert len(logged[f"{phase}_{term}"]) == 2 and all(np.isfinite(logged[f"{phase}_{term}"]))
    assert all(np.isfinite(logged["val_guide_reliance_shuffled"]))  # batch 2: the guides can be swapped


@pytest.fixture(scope="module")
def predicted(hippo3d):
    """One fresh-process nnUNetv2_predict, without the DINO weights setting, of the fold's validation cases and two
    test images (one call: its start-up, not the cases, is most of its time here)."""
    fold = hippo3d["model"] / "fold_0"
    val_cases = sorted(p.name[: -len(".nii.gz")] for p in (fold / "validation").glob("*.nii.gz"))
    assert val_cases
    inputs, labels = hippo3d["work"] / "imagesTs", hippo3d["work"] / "labelsTs"
    for case in val_cases:
        shutil.copy(RAW / "imagesTr" / f"{case}_0000.nii.gz", inputs)
        shutil.copy(RAW / "labelsTr" / f"{case}.nii.gz", labels)
    env = {k: v for k, v in hippo3d["env"].items() if k != "nnUNet_dino_weights"}  # the checkpoint has the ViT
    out = hippo3d["work"] / "pred"
    printed = _predict(inputs, out, env)
    return {"val_cases": val_cases, "inputs": inputs, "labels": labels, "out": out, "printed": printed}


def test_predict_3d_in_fresh_process_matches_validation_and_geometry(hippo3d, predicted):
    fold = hippo3d["model"] / "fold_0"
    assert predicted["printed"].count("RANDOMLY INITIALISED DINO weights") == 1
    for case in predicted["val_cases"] + list(TEST_CASES):
        out = sitk.ReadImage(str(predicted["out"] / f"{case}.nii.gz"))
        image = sitk.ReadImage(str(predicted["inputs"] / f"{case}_0000.nii.gz"))
        assert out.GetSize() == image.GetSize() and np.allclose(out.GetSpacing(), image.GetSpacing())
    for case in predicted["val_cases"]:
        assert np.array_equal(_read(predicted["out"] / f"{case}.nii.gz"), _read(fold / "validation" / f"{case}.nii.gz"))


def test_predict_3d_and_evaluate(hippo3d, predicted):
    summary = evaluate(predicted["labels"], predicted["out"], hippo3d["env"])
    assert set(summary["mean"]) == {"1", "2"}
    assert len(summary["metric_per_case"]) == len(TEST_CASES) + len(predicted["val_cases"])
    for case in summary["metric_per_case"]:
        assert set(np.unique(_read(Path(case["prediction_file"])))) <= {0, 1, 2}
        for label in ("1", "2"):
            dice = case["metrics"][label]["Dice"]
            assert np.isnan(dice) or 0.0 <= dice <= 1.0


def test_3d_resume_restores_network_and_optimizer(hippo3d, monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    for k, v in hippo3d["env"].items():
        if k.startswith("nnUNet"):
            monkeypatch.setenv(k, v)
    monkeypatch.delenv("nnUNet_dino_weights")  # resuming needs no DINO file
    pre = hippo3d["preprocessed"]
    plans = dict(load_json(pre / f"{PLANS}.json"), continue_training=True)  # what nnUNetv2_train --c passes
    trainer = recursive_find_trainer_class_by_name(TRAINER)(plans, CONFIGURATION, 0, load_json(pre / "dataset.json"),
                                                            torch.device("cpu"))
    ckpt_path = hippo3d["model"] / "fold_0" / "checkpoint_final.pth"
    trainer.load_checkpoint(str(ckpt_path))
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    saved = dict(ckpt["network_weights"])
    saved.pop(PROVENANCE_KEY)
    state = trainer.network.state_dict()
    assert state.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(state[k], v), k
    for child, stored in zip(trainer.optimizer.state_dict()["optimizers"], ckpt["optimizer_state"]["optimizers"]):
        assert stored["state"]
        for idx, s in stored["state"].items():
            for key, value in s.items():
                assert torch.equal(child["state"][idx][key], value), (idx, key)
    assert trainer.current_epoch == 2


def test_3d_guide_overlays_png_and_nifti_in_input_geometry(hippo3d):
    out = hippo3d["work"] / "overlays"
    run([command("nnUNetv2_dino_guide_overlays"), "-i", str(hippo3d["work"] / "overlay_inputs"), "-o", str(out),
         "-d", "990", "-c", CONFIGURATION, "-p", PLANS, "-tr", TRAINER, "--nifti", "--slices", "3", "20",
         "--labels", str(hippo3d["work"] / "labelsTs")], hippo3d["env"])
    case = "hippocampus_067"
    assert sorted(p.name for p in out.glob(f"{case}_slice*_guides.png")) == [
        f"{case}_slice003_guides.png", f"{case}_slice020_guides.png"]
    assert len(list(out.glob("*_guides.png"))) == 2 * len(TEST_CASES)  # 2 planes per case
    image = sitk.ReadImage(str(RAW / "imagesTs" / f"{case}_0000.nii.gz"))
    for k in range(3):
        guide = sitk.ReadImage(str(out / f"{case}_guide_{k}.nii.gz"))
        assert guide.GetSize() == image.GetSize() and np.allclose(guide.GetSpacing(), image.GetSpacing())
        values = sitk.GetArrayFromImage(guide)
        assert values.min() >= 0 and values.max() <= 1 and values.std() > 0
