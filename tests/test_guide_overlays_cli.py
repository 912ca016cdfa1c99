"""nnUNetv2_dino_guide_overlays without a trained model: safe checkpoint loading (a crafted checkpoint runs nothing,
a real-shaped one loads), a fast ``-h`` that imports neither torch nor nnU-Net, argument errors, label-folder
discovery, slice choice, fold averaging and the drawing. The run on a trained model is
tests/test_e2e_guidino.py::test_guide_overlays.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from nnunet_dino.cli import guide_overlays as go
from nnunet_dino.training.safe_checkpoint import UnsafeCheckpointError, load_checkpoint_safely

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- checkpoints
class _Payload:
    """What audit C7 put into checkpoint_final.pth: unpickling it runs a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def nnunet_like_checkpoint(trainer: str = "nnUNetTrainerGuiDINO") -> dict:
    """Shaped like nnU-Net's save_checkpoint output for a plugin trainer, with the types a real one holds."""
    weights = OrderedDict(w=torch.randn(3, 2), b=torch.zeros(3))
    weights["_nnunet_dino"] = {"format": 1, "arch": "dinov3_vits16", "lora": True, "places": ["encoder_0"],
                               "note": None}  # another engineer's plain-typed record: must load too
    return {
        "network_weights": weights,
        "optimizer_state": {"state": {0: {"momentum_buffer": torch.ones(3, 2)}},
                            "param_groups": [{"lr": 0.01, "momentum": 0.99, "nesterov": True, "params": [0, 1],
                                              "name": "segmentation"}]},
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float32(0.25), np.float32(0.5)], "ema_fg_dice": [np.float64(0.3)],
                    "dice_per_class_or_region": [[np.float32(0.1), np.float32(0.2)]], "train_losses": [1.5, 1.2],
                    "lrs": [0.01, 0.0069], "epoch_start_timestamps": [1796148991.02], "counts": [np.int64(3)]},
        "_best_ema": np.float32(0.3),
        "current_epoch": 2,
        "init_args": {"plans": {"plans_name": "nnUNetPlans", "configurations": {"2d": {"patch_size": [56, 40]}}},
                      "configuration": "2d", "fold": 0, "dataset_json": {"labels": {"background": 0, "a": 1},
                                                                         "file_ending": ".nii.gz"},
                      "device": torch.device("cpu")},
        "trainer_name": trainer,
        "inference_allowed_mirroring_axes": (0, 1),
    }


def test_a_crafted_checkpoint_runs_nothing_and_is_refused_clearly(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "checkpoint_final.pth"
    torch.save(dict(nnunet_like_checkpoint(), extra=_Payload(marker)), path)
    assert "system" in str(torch.serialization.get_unsafe_globals_in_checkpoint(path))  # the payload is there
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint_safely(path)
    assert not marker.exists()  # the command did not run
    msg = str(err.value)
    assert str(path) in msg and "system" in msg and "Nothing from it was run" in msg
    assert "weights_only=False" in msg and "code" in msg  # why: stock nnU-Net would run it


def test_the_payload_would_run_with_a_full_pickle_load(tmp_path):
    """The test above can fail: the same file does create the marker when loaded as stock nnU-Net loads it."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"extra": _Payload(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_an_nnunet_shaped_checkpoint_loads_with_its_values(tmp_path):
    path = tmp_path / "checkpoint_final.pth"
    saved = nnunet_like_checkpoint()
    torch.save(saved, path)
    loaded = load_checkpoint_safely(path)
    assert loaded["trainer_name"] == "nnUNetTrainerGuiDINO" and loaded["current_epoch"] == 2
    assert torch.equal(loaded["network_weights"]["w"], saved["network_weights"]["w"])
    assert loaded["network_weights"]["_nnunet_dino"] == saved["network_weights"]["_nnunet_dino"]
    assert loaded["logging"]["mean_fg_dice"] == [np.float32(0.25), np.float32(0.5)]
    assert isinstance(loaded["logging"]["mean_fg_dice"][0], np.float32)
    assert loaded["logging"]["counts"] == [3] and loaded["_best_ema"] == np.float32(0.3)
    assert loaded["init_args"]["device"] == torch.device("cpu") and loaded["init_args"]["plans"] == saved["init_args"][
        "plans"]
    assert loaded["inference_allowed_mirroring_axes"] == (0, 1) and loaded["grad_scaler_state"] is None


def test_a_gpu_trained_checkpoint_with_a_grad_scaler_loads(tmp_path):
    path = tmp_path / "checkpoint_final.pth"
    ckpt = dict(nnunet_like_checkpoint(), grad_scaler_state={"scale": 65536.0, "growth_factor": 2.0,
                                                             "backoff_factor": 0.5, "growth_interval": 2000,
                                                             "_growth_tracker": 0})
    ckpt["init_args"]["device"] = torch.device("cuda", 0)
    torch.save(ckpt, path)
    loaded = load_checkpoint_safely(path)
    assert loaded["grad_scaler_state"]["scale"] == 65536.0 and loaded["init_args"]["device"] == torch.device("cuda", 0)


def test_a_checkpoint_written_under_numpy_1_loads(tmp_path):
    """numpy 1 pickles its scalars as numpy.core.multiarray.scalar (numpy 2: numpy._core...). The legacy torch format
    pickles with GLOBAL 'module\\nname\\n', so the name can be rewritten in place to what numpy 1 wrote."""
    buf = io.BytesIO()
    torch.save({"network_weights": {"w": torch.ones(2)}, "trainer_name": "t", "init_args": {},
                "logging": {"mean_fg_dice": [np.float32(0.5)]}}, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    assert data.count(b"numpy._core.multiarray\nscalar") == 1
    path = tmp_path / "old.pth"
    path.write_bytes(data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar"))
    assert load_checkpoint_safely(path)["logging"]["mean_fg_dice"] == [np.float32(0.5)]


def test_an_object_array_is_refused(tmp_path):
    """numpy arrays (and object dtypes with them) are not on the list: nnU-Net's checkpoints hold none."""
    path = tmp_path / "c.pth"
    torch.save(dict(nnunet_like_checkpoint(), extra=np.array([{"a": 1}], dtype=object)), path)
    with pytest.raises(UnsafeCheckpointError, match="Refusing to load"):
        load_checkpoint_safely(path)


def test_files_that_are_not_nnunet_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        load_checkpoint_safely(tmp_path / "missing.pth")
    path = tmp_path / "weights.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"not an nnU-Net checkpoint: it lacks \['network_weights'"):
        load_checkpoint_safely(path)


def _model_folder(tmp_path: Path, checkpoints: dict) -> Path:
    folder = tmp_path / "Dataset990_HippoTiny" / "nnUNetTrainerGuiDINO__nnUNetPlans__2d"
    for fold, ckpt in checkpoints.items():
        (folder / f"fold_{fold}").mkdir(parents=True)
        torch.save(ckpt, folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


def test_the_overlay_tool_never_unpickles_a_crafted_checkpoint(tmp_path):
    """C7: the same payload through the plugin's own tool (its model loading, before any network is built)."""
    marker = tmp_path / "PWNED"
    folder = _model_folder(tmp_path, {0: dict(nnunet_like_checkpoint(), extra=_Payload(marker))})
    (tmp_path / "in").mkdir()
    with pytest.raises(UnsafeCheckpointError, match="Refusing to load"):
        go.write_guide_overlays(str(folder), str(tmp_path / "in"), str(tmp_path / "out"), 0, log=lambda m: None)
    assert not marker.exists()


def test_the_overlay_command_refuses_a_crafted_checkpoint(tmp_path):
    """As the audit ran it: the console command, nnUNet_results pointing at a folder with the crafted checkpoint."""
    marker = tmp_path / "PWNED"
    _model_folder(tmp_path / "results", {0: dict(nnunet_like_checkpoint(), extra=_Payload(marker))})
    (tmp_path / "in").mkdir()
    env = dict(os.environ, nnUNet_results=str(tmp_path / "results"), nnUNet_raw=str(tmp_path / "raw"),
               nnUNet_preprocessed=str(tmp_path / "pre"))
    proc = subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_dino_guide_overlays"), "-i",
                           str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-d", "Dataset990_HippoTiny"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Refusing to load" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_missing_folds_and_mixed_models_are_named(tmp_path):
    folder = _model_folder(tmp_path, {0: nnunet_like_checkpoint(), 1: nnunet_like_checkpoint("nnUNetTrainerOther")})
    with pytest.raises(SystemExit, match=r"fold_3/checkpoint_final.pth.*Folds with checkpoint_final.pth: "
                                         r"\['fold_0', 'fold_1'\]"):
        go.load_model(folder, [0, 3], "checkpoint_final.pth", log=lambda m: None)
    with pytest.raises(SystemExit, match="folds of one model only"):
        go.load_model(folder, [0, 1], "checkpoint_final.pth", log=lambda m: None)
    with pytest.raises(SystemExit, match="No trained model folder"):
        go.load_model(tmp_path / "nope", [0], "checkpoint_final.pth", log=lambda m: None)


# ---------------------------------------------------------------------------------------------- command line
def test_help_is_fast_imports_no_torch_and_shows_defaults():
    code = ("import sys\nfrom nnunet_dino.cli.guide_overlays import main\ntry:\n    main(['-h'])\n"
            "except SystemExit as e:\n    assert e.code == 0\n"
            "print('HEAVY', sorted(m for m in ('torch', 'nnunetv2', 'numpy', 'matplotlib') if m in sys.modules))")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout  # before: torch was imported before argparse (13 s)
    assert elapsed < 10, elapsed  # a bare interpreter; generous for a busy machine
    help_text = " ".join(proc.stdout.split())
    for part in ("(default: nnUNetTrainerGuiDINO)", "(default: nnUNetPlans)", "(default: checkpoint_final.pth)",
                 "(default: 2d)", "{cpu,cuda,mps}", "-nt THREADS, --threads THREADS", "(default: 1)",
                 "--labels FOLDER", "--slices", "averaged"):
        assert part in help_text, part


@pytest.mark.parametrize("extra,match", [
    (["-f", "0", "x"], "fold numbers"),
    (["-f", "0", "0"], "given twice"),
    (["-f", "-1"], "fold numbers"),
    (["--slices", "max", "3"], "not a mix"),
    (["--slices", "-2"], "non-negative slice indices"),
    (["--slices", "4", "4"], "twice"),
    (["-nt", "0"], "must be >= 1"),
    (["-device", "tpu"], "invalid choice"),
    (["-device", "cuda:0"], "invalid choice"),
])
def test_argument_errors_stop_before_any_work(tmp_path, capsys, extra, match):
    with pytest.raises(SystemExit) as err:
        go.main(["-i", str(tmp_path), "-o", str(tmp_path / "out"), "-d", "990", *extra])
    assert err.value.code == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_input_or_labels_folders_are_argument_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        go.main(["-i", str(tmp_path / "nope"), "-o", str(tmp_path / "out"), "-d", "990"])
    assert err.value.code == 2 and "is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        go.main(["-i", str(tmp_path), "-o", str(tmp_path / "out"), "-d", "990", "--labels", str(tmp_path / "x")])
    assert err.value.code == 2 and "--labels" in capsys.readouterr().err


def test_fold_and_slice_values():
    assert go.parse_folds("0") == [0] and go.parse_folds(["0", "1", "all"]) == [0, 1, "all"]
    assert go.parse_slices("max") == "max" and go.parse_slices(["all"]) == "all"
    assert go.parse_slices(["10", "3"]) == [10, 3]


# ---------------------------------------------------------------------------------------------- labels, slices
def _touch(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"")
    return folder


def test_labels_are_found_next_to_the_input_then_in_the_raw_dataset(tmp_path, monkeypatch):
    ds = tmp_path / "raw" / "Dataset990_X"
    images = _touch(ds / "imagesTs", "a_0000.nii.gz", "b_0000.nii.gz")
    _touch(ds / "labelsTs", "a.nii.gz", "b.nii.gz")
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    found, _ = go.find_labels_folder(images, ["a", "b"], ".nii.gz", "Dataset990_X")
    assert found == (ds / "labelsTs").resolve()

    elsewhere = _touch(tmp_path / "mine", "a_0000.nii.gz")  # not an imagesXx folder: the raw dataset's labels
    _touch(ds / "labelsTr", "a.nii.gz")
    (ds / "labelsTs" / "a.nii.gz").unlink()
    found, looked = go.find_labels_folder(elsewhere, ["a"], ".nii.gz", "Dataset990_X")
    assert found == ds / "labelsTr" and looked == [ds / "labelsTs", ds / "labelsTr"]

    found, _ = go.find_labels_folder(elsewhere, ["a", "zzz"], ".nii.gz", "Dataset990_X")  # a case without label
    assert found is None


def test_an_explicit_labels_folder_must_have_every_case(tmp_path):
    labels = _touch(tmp_path / "gt", "a.nii.gz")
    assert go._case_labels(labels, tmp_path, ["a"], ".nii.gz", None, lambda m: None) == {"a": str(labels / "a.nii.gz")}
    with pytest.raises(SystemExit, match=r"has no b.nii.gz \(and 1 more cases\)"):
        go._case_labels(labels, tmp_path, ["a", "b", "c"], ".nii.gz", None, lambda m: None)


class _Plans:
    transpose_forward = [0, 1, 2]


PROPS = {"bbox_used_for_cropping": [[2, 8], [0, 4], [0, 4]], "shape_before_cropping": [10, 4, 4]}


def test_slices_are_numbered_as_in_the_input_image():
    pred = np.zeros((6, 4, 4), dtype=np.int8)  # the 6 slices nnU-Net kept (input slices 2..7)
    pred[4, 1, 1] = 1
    assert go._slice_plan("max", pred, None, PROPS, _Plans(), "c") == [(4, 6, "")]
    assert go._slice_plan([2, 7], pred, None, PROPS, _Plans(), "c") == [(0, 2, ""), (5, 7, "")]
    assert [p[1] for p in go._slice_plan("all", pred, None, PROPS, _Plans(), "c")] == list(range(2, 8))
    with pytest.raises(SystemExit, match=r"c has slices 0..9"):
        go._slice_plan([10], pred, None, PROPS, _Plans(), "c")
    with pytest.raises(SystemExit, match=r"outside the region nnU-Net keeps .*slices 2..7"):
        go._slice_plan([1], pred, None, PROPS, _Plans(), "c")


def test_with_nothing_predicted_the_slice_says_how_it_was_chosen():
    empty = np.zeros((6, 4, 4), dtype=np.int8)
    gt = empty.copy()
    gt[1, 0, 0] = 2
    assert go._slice_plan("max", empty, gt, PROPS, _Plans(), "c") == [(1, 3, " (nothing predicted; most ground truth)")]
    assert go._slice_plan("max", empty, None, PROPS, _Plans(), "c") == [(3, 5, " (nothing predicted; middle slice)")]


# ---------------------------------------------------------------------------------------------- folds, drawing
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.zeros(()))


class _FakePredictor:
    """Logits = w, guide maps = 10 w (told apart by the guide wrapper's ``guided`` attribute)."""
    network = None

    def predict_sliding_window_return_logits(self, data):
        net = self.network
        return torch.full((2, *data.shape[1:]), float((net.guided if hasattr(net, "guided") else net).w) *
                          (10 if hasattr(net, "guided") else 1))


def test_several_folds_are_averaged_like_an_ensemble():
    net = _Net()
    model = {"network": net, "parameters": [{"w": torch.tensor(1.0)}, {"w": torch.tensor(3.0)}]}
    predictor = _FakePredictor()
    logits, guides = go._predict(predictor, model, torch.zeros(1, 2, 3, 3), 2)
    assert torch.allclose(logits, torch.full_like(logits, 2.0)) and torch.allclose(guides, torch.full_like(guides, 20))
    assert predictor.network is net  # left on the segmentation network


def test_the_png_has_a_colour_bar_and_a_ground_truth_panel(tmp_path, monkeypatch):
    import matplotlib.figure

    figures = []
    real_savefig = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    image, guides = np.random.rand(1, 8, 6), np.random.rand(2, 8, 6)
    seg, gt = np.zeros((8, 6), np.int8), np.ones((8, 6), np.int8)
    go._render_png(image, guides, seg, gt, ["bg", "a"], "case slice 3", tmp_path / "with.png")
    go._render_png(image, guides, seg, None, ["bg", "a"], "case slice 3", tmp_path / "without.png")
    titles = [[ax.get_title() for ax in f.axes] for f in figures]
    assert titles[0][:5] == ["image", "guide: bg", "guide: a", "prediction", "ground truth"]
    assert "ground truth" not in titles[1]
    for f in figures:  # the colour bar is an extra axes labelled with the guide values, 0 to 1
        bars = [ax for ax in f.axes if ax.get_ylabel() == "guide value"]
        assert len(bars) == 1 and bars[0].get_ylim() == pytest.approx((0, 1))
    assert (tmp_path / "with.png").stat().st_size > 0 and (tmp_path / "without.png").stat().st_size > 0
