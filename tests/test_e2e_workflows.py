"""Stock nnU-Net workflows beyond one train/predict that users rely on, run with the plugin as a user runs them (CPU).

- A user's own variant: a subclass of a plugin variant (imported from ``nnunet_dino.trainers``) in the user's own
  ``nnUNet_extTrainer`` folder, trained by ``nnUNetv2_train`` on folds 0 and 1 (the .pth hook appends the plugin's
  folder after the user's).
- ``nnUNetv2_predict -f 0 1`` (nnU-Net averages the folds' logits) and ``nnUNetv2_ensemble`` of two
  ``--save_probabilities`` predictions (it averages probabilities).
- ``nnUNetv2_export_model_to_zip`` -> ``nnUNetv2_install_pretrained_model_from_zip`` into a fresh nnUNet_results ->
  ``nnUNetv2_predict`` without ``nnUNet_dino_weights``: the same predictions as the original model folder.
- ``nnUNetv2_train ... --val --npz``: validation re-run writes .npz/.pkl, checkpoints untouched.

The user variant is as cheap as a training can be (one epoch of 2 iterations at batch 2, a ViT input of 4x3 tokens,
one torch thread): the point is the pipeline, not Dice. DINO weights are random (nnUNet_dino_weights=random).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_dino.cli.stock_pipeline import command, run, train

pytestmark = pytest.mark.e2e

USER_TRAINER = "nnUNetTrainerGuiDINO_UserTiny"
USER_TRAINER_FILE = '''
from dataclasses import replace

import torch

from nnunet_dino.trainers import nnUNetTrainerGuiDINO_CPUSmoke


class nnUNetTrainerGuiDINO_UserTiny(nnUNetTrainerGuiDINO_CPUSmoke):
    epochs = 1
    iterations_per_epoch = 2
    val_iterations_per_epoch = 1
    max_batch_size = 2
    guidino = replace(nnUNetTrainerGuiDINO_CPUSmoke.guidino, min_short_side_tokens=2)

    def initialize(self):  # training and --val both start here
        # nnUNetv2_train -device cpu uses every core; on a shared 2-core machine one thread is several times faster.
        torch.set_num_threads(1)
        super().initialize()
'''
CASE = "hippocampus_067"  # one held-out test volume keeps each prediction short


@pytest.fixture(scope="module")
def flows(hippo_workspace):
    work = hippo_workspace["work"] / "workflows"
    ext = work / "my_trainers"
    ext.mkdir(parents=True)
    (ext / "my_variants.py").write_text(USER_TRAINER_FILE)
    env = dict(hippo_workspace["env"], nnUNet_extTrainer=str(ext))  # the plugin's hook appends its own folder
    logs = {fold: train("990", USER_TRAINER, env, fold=fold) for fold in ("0", "1")}
    inputs = work / "inputs"
    inputs.mkdir()
    shutil.copy(hippo_workspace["raw"] / "imagesTs" / f"{CASE}_0000.nii.gz", inputs)
    return {"work": work, "env": env, "ext": ext, "logs": logs, "inputs": inputs,
            "model": hippo_workspace["results"] / f"{USER_TRAINER}__nnUNetPlans__2d",
            "preprocessed": hippo_workspace["preprocessed"], "predictions": {}, "predict_logs": {}}


def predict(flows, name: str, folds: tuple, env: dict | None = None) -> Path:
    """nnUNetv2_predict of the input case with --save_probabilities (cached per name within the module). Sequential
    (-npp 0 -nps 0: no worker processes, each of which would import torch again); tests/test_e2e_guidino.py covers
    the default multi-process path."""
    if name not in flows["predictions"]:
        out = flows["work"] / name
        args = [command("nnUNetv2_predict"), "-i", str(flows["inputs"]), "-o", str(out), "-d", "990", "-c", "2d",
                "-tr", USER_TRAINER, "-f", *folds, "--save_probabilities", "-device", "cpu", "-npp", "0", "-nps", "0"]
        flows["predict_logs"][name] = run(args, env or flows["env"])
        flows["predictions"][name] = out
    return flows["predictions"][name]


def _probabilities(folder: Path) -> np.ndarray:
    return np.load(folder / f"{CASE}.npz")["probabilities"]


def _segmentation(folder: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{CASE}.nii.gz")))


def _assert_input_geometry(path: Path, image_path: Path):
    out, image = sitk.ReadImage(str(path)), sitk.ReadImage(str(image_path))
    assert out.GetSize() == image.GetSize()
    assert np.allclose(out.GetSpacing(), image.GetSpacing()) and np.allclose(out.GetOrigin(), image.GetOrigin())
    assert np.allclose(out.GetDirection(), image.GetDirection())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_user_variant_of_a_plugin_trainer_trains_with_stock_command(flows):
    import torch

    for fold, log in flows["logs"].items():
        assert f"Using trainer '{USER_TRAINER}' from: {flows['ext']}" in log  # the user's folder, first in the variable
        ckpt = torch.load(flows["model"] / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu",
                          weights_only=False)
        assert ckpt["trainer_name"] == USER_TRAINER
        assert len(ckpt["logging"]["train_losses"]) == 1  # the subclass's schedule (1 epoch), not its parent's (3)
        assert any("tokenbook.prototypes" in k for k in ckpt["network_weights"])  # still a GuiDINO network


def test_fold_ensemble_and_nnunet_ensemble(flows):
    p0, p1 = _probabilities(predict(flows, "pred_f0", ("0",))), _probabilities(predict(flows, "pred_f1", ("1",)))
    both = predict(flows, "pred_f01", ("0", "1"))
    image = flows["inputs"] / f"{CASE}_0000.nii.gz"
    for folder in (flows["predictions"]["pred_f0"], flows["predictions"]["pred_f1"], both):
        assert {f"{CASE}.nii.gz", f"{CASE}.npz", f"{CASE}.pkl"} <= {p.name for p in folder.iterdir()}
        _assert_input_geometry(folder / f"{CASE}.nii.gz", image)
    size = sitk.ReadImage(str(image)).GetSize()
    p01 = _probabilities(both)
    assert p0.shape == p1.shape == p01.shape == (3, *size[::-1])
    for p in (p0, p1, p01):
        assert np.allclose(p.sum(0), 1, atol=1e-4)
    # The two folds are different models, so the ensemble is informative.
    assert np.abs(p0 - p1).max() > 1e-2

    # -f 0 1: nnU-Net averages the folds' logits, i.e. the softmax of the mean log-probability (the per-voxel
    # log-sum-exp cancels): a normalised geometric mean of the single-fold probabilities, both folds weighted equally.
    # Up to nnU-Net's float16 accumulation of logits (measured 2026-12-01: max 2.4e-4, mean 2e-5); a single fold
    # deviates by ~0.7 and the mean of the probabilities (what nnUNetv2_ensemble computes) by ~0.3.
    with np.errstate(divide="ignore"):
        mean_log = (np.log(p0.astype(np.float64)) + np.log(p1.astype(np.float64))) / 2
    expected = np.exp(mean_log - mean_log.max(0, keepdims=True))
    expected /= expected.sum(0, keepdims=True)
    tolerance = 2e-3
    assert np.abs(p01 - expected).max() < tolerance and np.abs(p01 - expected).mean() < 1e-4
    for other in (p0, p1, (p0.astype(np.float64) + p1) / 2):
        assert np.abs(p01 - other).max() > 10 * tolerance
    assert np.array_equal(_segmentation(both), p01.argmax(0))

    # nnUNetv2_ensemble averages the probabilities of the two folders.
    ensembled = flows["work"] / "ensemble_f0_f1"
    run([command("nnUNetv2_ensemble"), "-i", str(flows["predictions"]["pred_f0"]), str(flows["predictions"]["pred_f1"]),
         "-o", str(ensembled), "-np", "1", "--save_npz"], flows["env"])
    _assert_input_geometry(ensembled / f"{CASE}.nii.gz", image)
    mean = (p0.astype(np.float64) + p1) / 2
    assert np.abs(_probabilities(ensembled) - mean).max() < 1e-6
    assert np.array_equal(_segmentation(ensembled), mean.argmax(0))


def test_exported_model_installs_and_predicts_without_dino_weights(flows):
    archive = flows["work"] / "model.zip"
    run([command("nnUNetv2_export_model_to_zip"), "-d", "990", "-o", str(archive), "-c", "2d", "-tr", USER_TRAINER,
         "-f", "0", "1"], flows["env"])
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
    for fold in ("0", "1"):
        assert any(n.endswith(f"{USER_TRAINER}__nnUNetPlans__2d/fold_{fold}/checkpoint_final.pth") for n in names)
    # Default (not slim) checkpoints: no DINO tensor file beside them that the zip would lack.
    assert not any("dino_frozen" in n or n.endswith(".safetensors") for n in names)

    # Somewhere else: a fresh nnUNet_results, no DINO weights configured; the user's trainer file is still needed
    # (the checkpoint names its trainer class), the DINO file is not (the checkpoint carries the whole network).
    installed_results = flows["work"] / "installed_results"
    env = {k: v for k, v in flows["env"].items() if k != "nnUNet_dino_weights"}
    env["nnUNet_results"] = str(installed_results)
    run([command("nnUNetv2_install_pretrained_model_from_zip"), str(archive)], env)
    model = installed_results / "Dataset990_HippoTiny" / f"{USER_TRAINER}__nnUNetPlans__2d"
    for fold in ("0", "1"):
        assert _sha256(model / f"fold_{fold}" / "checkpoint_final.pth") == _sha256(
            flows["model"] / f"fold_{fold}" / "checkpoint_final.pth")
    installed = predict(flows, "pred_installed_f01", ("0", "1"), env=env)
    original = predict(flows, "pred_f01", ("0", "1"))
    assert np.array_equal(_segmentation(installed), _segmentation(original))
    assert np.abs(_probabilities(installed) - _probabilities(original)).max() < 1e-6
    # The installed model still says that its DINO weights were random (the record travels inside the checkpoint;
    # dino_weights.json is not in the zip).
    assert "nnunet-dino: this model was trained with dinov3_vits16: RANDOMLY INITIALISED DINO weights" in \
        flows["predict_logs"]["pred_installed_f01"]


def test_validation_rerun_writes_npz_and_leaves_checkpoints_untouched(flows):
    fold = flows["model"] / "fold_1"
    validation = fold / "validation"
    watched = sorted(fold.glob("checkpoint_*.pth")) + [fold / "dino_weights.json"]
    assert fold / "checkpoint_final.pth" in watched
    before = {p.name: _sha256(p) for p in watched}
    segs_before = {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in validation.glob("*.nii.gz")}
    summary_before = json.loads((validation / "summary.json").read_text())
    assert segs_before and not list(validation.glob("*.npz"))  # trained without --npz
    split = json.loads((flows["preprocessed"] / "splits_final.json").read_text())[1]["val"]
    assert sorted(n[: -len(".nii.gz")] for n in segs_before) == sorted(split)

    env = {k: v for k, v in flows["env"].items() if k != "nnUNet_dino_weights"}  # --val needs no DINO file
    log = train("990", USER_TRAINER, env, fold="1", extra=["--val", "--npz"])
    assert "Mean Validation Dice" in log
    for case in split:
        probabilities = np.load(validation / f"{case}.npz")["probabilities"]
        assert probabilities.shape[0] == 3 and np.allclose(probabilities.sum(0), 1, atol=1e-4)
        assert probabilities.shape[1:] == segs_before[f"{case}.nii.gz"].shape
        assert (validation / f"{case}.pkl").is_file()
        # The same network validated again: the same segmentation.
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(validation / f"{case}.nii.gz"))),
                              segs_before[f"{case}.nii.gz"])
    assert json.loads((validation / "summary.json").read_text())["foreground_mean"] == summary_before["foreground_mean"]
    after = sorted(fold.glob("checkpoint_*.pth")) + [fold / "dino_weights.json"]
    assert {p.name: _sha256(p) for p in after} == before  # no checkpoint written, changed or removed
