"""nnUNetv2_dino_pretrain on the command line: help, clear early errors, and (e2e) a short run on real nnU-Net
preprocessed data whose weight file the trainers' loader accepts."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from nnunet_dino.backbone import DinoBackbone, get_architecture, init_random_dino_weights_, load_backbone
from nnunet_dino.backbone.meta_export import canonical_to_meta, save_meta_named
from nnunet_dino.cli.pretrain import main

TINY = ["--stages", "dino", "--steps", "2", "--batch_size", "4", "--global_tokens", "2", "--local_tokens", "1",
        "--n_local_crops", "1", "--prototypes", "32", "-device", "cpu", "-nt", "1"]


def test_help_returns_at_once():
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "nnunet_dino.cli.pretrain", "-h"], capture_output=True, text=True,
                         check=True).stdout
    assert time.perf_counter() - t0 < 10
    assert "--weights" in out and "--stages" in out and "--c" in out


@pytest.fixture
def empty_nnunet(tmp_path, monkeypatch):
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    return tmp_path


def test_missing_preprocessed_data_is_a_clear_error(empty_nnunet, capsys):
    raw = empty_nnunet / "nnUNet_raw" / "Dataset998_Unplanned"
    raw.mkdir()
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": {"background": 0},
                                                  "numTraining": 0, "file_ending": ".nii.gz"}))
    out = empty_nnunet / "out"
    for dataset, says in (("998", "No preprocessed data for Dataset998_Unplanned"), ("997", "was not found")):
        assert main(["-d", dataset, "-o", str(out), "--weights", "random", *TINY]) == 2
        err = capsys.readouterr().err
        assert says in err and "nnUNetv2_plan_and_preprocess -d" in err, err
    assert not out.exists()


def test_weights_of_another_architecture_are_refused(empty_nnunet, capsys):
    torch.manual_seed(0)
    vits = init_random_dino_weights_(DinoBackbone(get_architecture("dinov3_vits16")))
    path = save_meta_named(canonical_to_meta(vits.arch, vits.vit.state_dict()), empty_nnunet / "w",
                           "dinov3_vits16_pretrain_mine")
    out = empty_nnunet / "out"
    assert main(["-d", "998", "-o", str(out), "--arch", "dinov3_vits16plus", "--weights", str(path), *TINY]) == 2
    err = capsys.readouterr().err
    assert "holds dinov3_vits16 weights" in err and "--arch dinov3_vits16" in err, err
    assert not out.exists()


@pytest.mark.e2e
def test_short_run_on_preprocessed_hippotiny_loads_in_the_trainers_loader(hippo_workspace, tmp_path, monkeypatch):
    for k, v in hippo_workspace["env"].items():
        if k.startswith("nnUNet"):
            monkeypatch.setenv(k, v)
    out = tmp_path / "pt"
    assert main(["-d", "990", "-c", "2d", "-o", str(out), "--weights", "random", "--tag", "hippotiny",
                 "--exclude_cases", "hippocampus_064", *TINY]) == 0
    (path,) = out.glob("dinov3_vits16_pretrain_hippotiny-*.pth")
    record = json.loads((out / "pretrain_provenance.json").read_text())
    assert record["excluded_cases"] == ["hippocampus_064"] and record["number_of_cases"] == 9
    assert record["number_of_slices"] > 100 and record["initial_weights"]["source"] == "random"
    # What a trainer does with nnUNet_dino_weights=<file>: resolve the setting, load strictly (hash checked).
    from nnunet_dino.backbone import resolve_weights_setting
    monkeypatch.setenv("nnUNet_dino_weights", str(path))
    bb = load_backbone("dinov3_vits16", weights=resolve_weights_setting(None, "dinov3_vits16"))
    assert bb.load_report.layout == "Meta DINOv3" and bb.load_report.pretraining == "lvd1689m"
    # A second start into the same folder without --c is refused.
    assert main(["-d", "990", "-o", str(out), "--weights", "random", "--tag", "hippotiny",
                 "--exclude_cases", "hippocampus_064", *TINY]) == 2


def test_images_ts_are_preprocessed_as_nnunet_preprocesses_training_cases_and_cached(hippo_workspace, tmp_path,
                                                                                     monkeypatch):
    """--include_imagesTs: each imagesTs image goes through nnU-Net's own preprocessor with the plans, so a training
    image placed in imagesTs gives exactly the array nnUNetv2_preprocess wrote for it; the result is cached."""
    from nnunetv2.preprocessing.preprocessors import default_preprocessor
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_dino.pretraining import PretrainDataError
    from nnunet_dino.pretraining.data import SliceSource

    source = hippo_workspace["raw"]
    raw = tmp_path / "raw" / source.name
    raw.mkdir(parents=True)
    (raw / "dataset.json").write_bytes((source / "dataset.json").read_bytes())
    case = "hippocampus_064"
    for k, v in hippo_workspace["env"].items():
        if k.startswith("nnUNet"):
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    with pytest.raises(PretrainDataError, match="--include_imagesTs: .*imagesTs does not exist"):
        SliceSource(["990"], include_images_ts=True, cache_folder=tmp_path / "cache")
    (raw / "imagesTs").mkdir()
    (raw / "imagesTs" / "copy_064_0000.nii.gz").write_bytes((source / "imagesTr" / f"{case}_0000.nii.gz").read_bytes())

    slices = SliceSource(["990"], include_images_ts=True, exclude_cases={"hippocampus_290"},
                         cache_folder=tmp_path / "cache")
    folder = hippo_workspace["preprocessed"] / "nnUNetPlans_2d"
    stock = infer_dataset_class(str(folder))(str(folder)).load_case(case)[0]
    from_ts = [r for r in slices.refs if r.source == "imagesTs"]
    assert {r.case for r in from_ts} == {"copy_064"} and len(from_ts) == stock.shape[1]
    for ref in from_ts:
        assert torch.equal(slices.load(ref), torch.from_numpy(np.asarray(stock[:, ref.z], dtype=np.float32)))
    assert slices.cases[source.name] == 10  # 9 training cases (one excluded) + the imagesTs one
    assert slices.excluded == ["hippocampus_290"]

    # cached: a second index reads the .npy instead of preprocessing again
    def must_not_run(*args, **kwargs):
        raise AssertionError("imagesTs preprocessed again although cached")

    monkeypatch.setattr(default_preprocessor.DefaultPreprocessor, "run_case", must_not_run)
    again = SliceSource(["990"], include_images_ts=True, cache_folder=tmp_path / "cache")
    assert sum(r.source == "imagesTs" for r in again.refs) == len(from_ts)
