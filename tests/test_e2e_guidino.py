"""GuiDINO end to end through the stock nnU-Net commands, in subprocesses, as a user runs it (CPU).

One short training of the bundled Dataset990_HippoTiny (3D NIfTI volumes trained slice-wise in 2d) is shared by
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
from nnunet_dino.training.checkpoints import PROVENANCE_KEY

REPO = Path(__file__).resolve().parents[1]
RAW = REPO / "datasets" / "nnUNet_raw"

TRAINER = "nnUNetTrainerGuiDINO_CPUPipeline"  # pipeline checks only: HippoTiny gets no Dice floor

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def hippo(hippo_workspace):
    env = hippo_workspace["env"]
    work = hippo_workspace["work"] / "guidino"
    work.mkdir()
    log = train("990", TRAINER, env)
    model = hippo_workspace["results"] / f"{TRAINER}__nnUNetPlans__2d"
    return {"work": work, "env": env, "train_log": log, "model": model, "preprocessed": hippo_workspace["preprocessed"],
            "results": hippo_workspace["results"]}


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_plugin_trainer_ran_and_logged_its_terms(hippo):
    fold = hippo["model"] / "fold_0"
    assert f"Using trainer '{TRAINER}' from:" in hippo["train_log"]  # found through nnUNet_extTrainer, no fallback
    assert (fold / "checkpoint_final.pth").is_file()
    assert (fold / "progress.png").stat().st_size > 10_000
    weights = json.loads((fold / "dino_weights.json").read_text())
    assert weights["backbones"][0]["random_init"] is True  # results here are labelled as random-DINO
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == TRAINER
    logged = ckpt["logging"]
    for phase in ("train", "val"):
        for term in ("seg_loss", "guide_loss", "hinge_loss"):
            values = logged[f"{phase}_{term}"]
            assert len(values) == len(logged["train_losses"]) and all(np.isfinite(values))
    for ablation in ("shuffled", "constant"):  # guide reliance: one finite value per epoch, in the log too
        values = logged[f"val_guide_reliance_{ablation}"]
        assert len(values) == len(logged["train_losses"]) and all(np.isfinite(values))
    log_text = sorted(fold.glob("training_log_*.txt"))[0].read_text()  # the first training (a later test resumes)
    assert log_text.count("guide reliance (pseudo Dice lost with the guide replaced)") == len(logged["train_losses"])
    assert "Guide reliance at the last epoch" in log_text
    threads = hippo["env"]["nnUNet_dino_cpu_threads"]  # conftest caps the subprocess trainings (default 1)
    assert f"CPU threads: {threads} (nnUNet_dino_cpu_threads)." in log_text
    keys = ckpt["network_weights"].keys()
    assert any("lora_A" in k for k in keys) and any("tokenbook.prototypes" in k for k in keys)


@pytest.fixture(scope="module")
def predicted(hippo):
    """One fresh-process nnUNetv2_predict, without the DINO weights setting, of the fold's validation cases and the
    test images (one call: the predictor's start-up, not the cases, is most of its time here)."""
    fold = hippo["model"] / "fold_0"
    val_cases = sorted(p.name[: -len(".nii.gz")] for p in (fold / "validation").glob("*.nii.gz"))
    assert val_cases
    inputs, labels = hippo["work"] / "inputs", hippo["work"] / "labels"
    shutil.copytree(RAW / "Dataset990_HippoTiny" / "imagesTs", inputs)
    shutil.copytree(RAW / "Dataset990_HippoTiny" / "labelsTs", labels)
    for case in val_cases:
        shutil.copy(RAW / "Dataset990_HippoTiny" / "imagesTr" / f"{case}_0000.nii.gz", inputs)
        shutil.copy(RAW / "Dataset990_HippoTiny" / "labelsTr" / f"{case}.nii.gz", labels)
    out = hippo["work"] / "pred"
    env = {k: v for k, v in hippo["env"].items() if k != "nnUNet_dino_weights"}  # prediction needs no DINO file
    printed = run([command("nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", "990", "-c", "2d", "-tr",
                   TRAINER, "-f", "0", "-device", "cpu"], env)
    return {"val_cases": val_cases, "inputs": inputs, "labels": labels, "out": out, "printed": printed}


def test_predict_in_fresh_process_matches_validation_and_geometry(hippo, predicted):
    fold, out, inputs = hippo["model"] / "fold_0", predicted["out"], predicted["inputs"]
    # The checkpoint says which DINO weights the model was trained with, and prediction says it once.
    assert predicted["printed"].count("this model was trained with dinov3_vits16: RANDOMLY INITIALISED DINO "
                                      "weights") == 1
    for case in sorted(p.name[: -len("_0000.nii.gz")] for p in inputs.glob("*_0000.nii.gz")):
        predicted_image = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        image = sitk.ReadImage(str(inputs / f"{case}_0000.nii.gz"))
        assert predicted_image.GetSize() == image.GetSize()
        assert np.allclose(predicted_image.GetSpacing(), image.GetSpacing())
        assert np.allclose(predicted_image.GetOrigin(), image.GetOrigin())
    for case in predicted["val_cases"]:
        assert np.array_equal(_read(out / f"{case}.nii.gz"), _read(fold / "validation" / f"{case}.nii.gz"))


def test_predict_test_set_and_evaluate(hippo, predicted):
    summary = evaluate(predicted["labels"], predicted["out"], hippo["env"])
    assert set(summary["mean"]) == {"1", "2"}
    n_test = len(list((RAW / "Dataset990_HippoTiny" / "imagesTs").glob("*_0000.nii.gz")))
    assert len(summary["metric_per_case"]) == n_test + len(predicted["val_cases"])
    for case in summary["metric_per_case"]:
        labels = set(np.unique(_read(Path(case["prediction_file"]))))
        assert labels <= {0, 1, 2}
    # No Dice floor above 0 at this budget: measured 2026-11-22 on this 2-core CPU machine, stock nnUNetTrainer with
    # the same 100-iteration schedule still predicts only background (Dice 0.0). What must hold is a valid evaluation.
    for label in ("1", "2"):
        assert 0.0 <= summary["mean"][label]["Dice"] <= 1.0 or np.isnan(summary["mean"][label]["Dice"])


def test_resume_restores_every_piece(hippo, monkeypatch):
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    for k, v in hippo["env"].items():
        if k.startswith("nnUNet"):
            monkeypatch.setenv(k, v)
    monkeypatch.delenv("nnUNet_dino_weights")  # resuming must not need the DINO file
    pre = hippo["preprocessed"]
    cls = recursive_find_trainer_class_by_name(TRAINER)
    plans = load_json(pre / "nnUNetPlans.json")
    plans["continue_training"] = True  # what nnUNetv2_train --c passes (nnU-Net 2.8 reads it from the plans dict)
    trainer = cls(plans, "2d", 0, load_json(pre / "dataset.json"), torch.device("cpu"))
    ckpt_path = hippo["model"] / "fold_0" / "checkpoint_final.pth"
    trainer.load_checkpoint(str(ckpt_path))
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    state = trainer.network.state_dict()
    saved = dict(ckpt["network_weights"])
    record = saved.pop(PROVENANCE_KEY)  # which DINO weights: travels inside the checkpoint (export, predict)
    assert record["dino_weights"][0]["random_init"] is True
    assert state.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(state[k], v), k
    restored = trainer.optimizer.state_dict()
    assert restored["types"] == ["SGD", "AdamW"]  # nnU-Net's SGD for its U-Net, AdamW for guidance and LoRA
    saved_children = ckpt["optimizer_state"]["optimizers"]
    names = [[g["name"] for g in child["param_groups"]] for child in restored["optimizers"]]
    assert names == [["segmentation"], ["guidance", "lora"]]
    for child, saved in zip(restored["optimizers"], saved_children):
        assert [g["lr"] for g in child["param_groups"]] == [g["lr"] for g in saved["param_groups"]]
        assert saved["state"], "a trained optimizer has state"
        for idx, s in saved["state"].items():
            for key, value in s.items():  # SGD momentum buffers; AdamW step, exp_avg, exp_avg_sq
                assert torch.equal(child["state"][idx][key], value), (idx, key)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [
        g["lr"] for child in saved_children for g in child["param_groups"]]  # the scheduler sees the restored groups
    trainer.on_train_start()  # does not ask for DINO weights: they come from the checkpoint
    trainer.on_train_end()


def test_training_without_weights_stops_at_once_with_instructions(hippo):
    env = {k: v for k, v in hippo["env"].items() if k != "nnUNet_dino_weights"}
    with pytest.raises(RuntimeError) as err:
        train("990", "nnUNetTrainerGuiDINO_5epochs", env)
    assert "No DINO weights configured" in str(err.value) and "nnUNet_dino_weights" in str(err.value)
    model = hippo["results"] / "nnUNetTrainerGuiDINO_5epochs__nnUNetPlans__2d"
    assert not model.exists()  # refused before nnU-Net's __init__ writes a training log into fold_0


def test_training_with_weights_of_another_kind_is_refused(hippo, tmp_path):
    foreign = tmp_path / "resnet50.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 2048)}, foreign)
    env = dict(hippo["env"], nnUNet_dino_weights=str(foreign))
    with pytest.raises(RuntimeError) as err:
        train("990", "nnUNetTrainerGuiDINO_10epochs", env)
    assert "not a DINOv3/DINOv2 ViT" in str(err.value)


def test_guide_overlays(hippo):
    out = hippo["work"] / "overlays"
    run([command("nnUNetv2_dino_guide_overlays"), "-i", str(RAW / "Dataset990_HippoTiny" / "imagesTs"), "-o", str(out),
         "-d", "990", "-tr", TRAINER, "--nifti"], hippo["env"])
    pngs = sorted(out.glob("*_guides.png"))
    assert len(pngs) == 4
    image = sitk.ReadImage(str(RAW / "Dataset990_HippoTiny" / "imagesTs" / "hippocampus_067_0000.nii.gz"))
    guide = sitk.ReadImage(str(out / "hippocampus_067_guide_1.nii.gz"))
    assert guide.GetSize() == image.GetSize()
    values = sitk.GetArrayFromImage(guide)
    assert values.min() >= 0 and values.max() <= 1
