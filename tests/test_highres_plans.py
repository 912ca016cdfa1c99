"""``nnUNetv2_dino_add_highres_plans``: a high-resolution configuration added to a real plans file, resolved by
nnU-Net's own ``inherits_from``, preprocessed by the stock ``nnUNetv2_preprocess``; every refusal leaves the file
byte-for-byte unchanged.

Works on a copy of the shared HippoTiny preprocessed folder (``hippo_workspace``), never on the original.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_dino.cli.stock_pipeline import command, run
from nnunet_dino.planning import HighResPlansError, HighResRequest, derive_highres_configuration
from nnunet_dino.planning import highres as highres_module
from nnunet_dino.planning.highres_cli import main

DATASET = "Dataset990_HippoTiny"


@pytest.fixture(scope="module")
def workspace(hippo_workspace, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("highres")
    pre = root / "nnUNet_preprocessed"
    shutil.copytree(hippo_workspace["preprocessed"], pre / DATASET)
    env = dict(hippo_workspace["env"], nnUNet_preprocessed=str(pre), nnUNet_results=str(root / "nnUNet_results"))
    plans_file = pre / DATASET / "nnUNetPlans.json"
    return {"env": env, "pre": pre, "folder": pre / DATASET, "plans_file": plans_file,
            "original": plans_file.read_bytes()}


@pytest.fixture
def in_env(workspace, monkeypatch):
    for k, v in workspace["env"].items():
        if k.startswith("nnUNet"):
            monkeypatch.setenv(k, v)
    monkeypatch.delenv("nnUNet_dino_max_tokens", raising=False)  # the default token cap, whatever the shell has
    return workspace


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def refuse(argv: list[str], folder: Path, capsys, match: str) -> None:
    before = snapshot(folder)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "refused, nothing written" in err and match in err, err
    assert snapshot(folder) == before  # byte-equal, and no backup or temporary file left behind


# ---------------------------------------------------------------------------------------------- round trip
@pytest.fixture(scope="module")
def highres(workspace) -> dict:
    """The installed command, then the stock nnUNetv2_preprocess of the new configuration (on the copy)."""
    added = run([command("nnUNetv2_dino_add_highres_plans"), "-d", "990", "--size", "128"], workspace["env"])
    plans_after = workspace["plans_file"].read_bytes()
    run([command("nnUNetv2_preprocess"), "-d", "990", "-c", "2d_128", "-np", "1"], workspace["env"])
    return {"added": added, "plans_after": plans_after}


def test_round_trip_and_stock_preprocessing_at_the_new_size(workspace, highres):
    folder = workspace["folder"]
    out = highres["added"]
    assert "Added configuration '2d_128'" in out and "nnUNetv2_preprocess -d 990 -c 2d_128" in out

    old, new = json.loads(workspace["original"]), json.loads(highres["plans_after"])
    assert {k: v for k, v in new.items() if k != "configurations"} == {k: v for k, v in old.items()
                                                                       if k != "configurations"}
    assert new["configurations"]["2d"] == old["configurations"]["2d"]  # the source is untouched
    backups = sorted(folder.glob("nnUNetPlans.json.*.bak"))
    assert len(backups) == 1 and backups[0].read_bytes() == workspace["original"]

    pm = PlansManager(new)  # nnU-Net's own inheritance resolution
    src, cfg = pm.get_configuration("2d"), pm.get_configuration("2d_128")
    assert new["configurations"]["2d_128"]["inherits_from"] == "2d"
    assert src.patch_size == [56, 40]
    assert cfg.patch_size == [128, 96]  # long side 128, aspect kept, multiples of 16
    assert cfg.spacing == pytest.approx([1.0 * 56 / 128, 1.0 * 40 / 96])  # same field of view
    assert [p * s for p, s in zip(cfg.patch_size, cfg.spacing)] == pytest.approx(
        [p * s for p, s in zip(src.patch_size, src.spacing)])
    assert cfg.median_image_size_in_voxels == pytest.approx([49 * 128 / 56, 35 * 96 / 40])
    assert cfg.batch_size == max(2, int(13 * 56 * 40 / (128 * 96)))  # area rule, at least 2
    assert cfg.data_identifier == "nnUNetPlans_2d_128"
    for key in ("normalization_schemes", "architecture", "resampling_fn_data", "resampling_fn_seg", "batch_dice",
                "preprocessor_name"):
        assert cfg.configuration[key] == src.configuration[key]  # everything else comes from 2d

    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    source_folder, new_folder = folder / "nnUNetPlans_2d", folder / "nnUNetPlans_2d_128"
    source_ds = infer_dataset_class(str(source_folder))(str(source_folder))
    new_ds = infer_dataset_class(str(new_folder))(str(new_folder))
    assert sorted(new_ds.identifiers) == sorted(source_ds.identifiers) and len(new_ds.identifiers) == 10
    in_plane = []
    for case in new_ds.identifiers:
        data, seg, _, props = new_ds.load_case(case)
        data0, seg0, _, _ = source_ds.load_case(case)
        assert data.shape[:2] == data0.shape[:2]  # same channels and slices
        expected = [int(round(s * sp0 / sp)) for s, sp0, sp in zip(data0.shape[2:], src.spacing, cfg.spacing)]
        assert list(data.shape[2:]) == expected and seg.shape[1:] == data.shape[1:]
        labels, labels0 = set(np.unique(seg[:]).tolist()), set(np.unique(seg0[:]).tolist())
        assert labels <= labels0 <= {-1, 0, 1, 2} and labels & {1, 2}  # (-1: nnU-Net's outside-of-crop marker)
        in_plane.append(data.shape[2:])
    # the plans' median image size describes the data nnUNetv2_preprocess produced (up to rounding)
    assert np.allclose(np.median(np.array(in_plane), 0), cfg.median_image_size_in_voxels, atol=1.5)


def test_the_stock_trainer_pipeline_trains_on_the_new_configuration(in_env, highres, monkeypatch):
    """What nnUNetv2_train DATASET 2d_128 FOLD -tr nnUNetTrainerMedDINOv3_CPUSmoke does up to the first step."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    monkeypatch.setenv("nnUNet_dino_weights", "random")
    cls = recursive_find_trainer_class_by_name("nnUNetTrainerMedDINOv3_CPUSmoke")
    plans = dict(json.loads(in_env["plans_file"].read_text()), continue_training=False)
    trainer = cls(plans, "2d_128", 0, json.loads((in_env["folder"] / "dataset.json").read_text()), torch.device("cpu"))
    assert trainer.configuration_manager.patch_size == [128, 96]
    assert trainer.preprocessed_dataset_folder.endswith("nnUNetPlans_2d_128")
    trainer.on_train_start()
    try:
        batch = next(trainer.dataloader_train)
        assert tuple(batch["data"].shape) == (2, 1, 128, 96)  # CPUSmoke's batch 2, the new patch
        assert trainer.network.adapter.token_hw == (8, 6)
        step = trainer.train_step(batch)
        assert np.isfinite(step["loss"])
    finally:
        trainer.disable_checkpointing = True  # no 1.3 GB checkpoint_final for a one-step check
        trainer.on_train_end()


def test_existing_configuration_is_refused_then_replaced_with_overwrite(in_env, highres, capsys):
    folder = in_env["folder"]
    refuse(["-d", "990", "--size", "128"], folder, capsys, "already have a configuration '2d_128'")
    n_backups = len(list(folder.glob("*.bak")))
    before = in_env["plans_file"].read_bytes()
    assert main(["-d", "990", "--size", "128", "--overwrite", "--batch-size", "3"]) == 0
    assert len(list(folder.glob("*.bak"))) == n_backups + 1
    assert PlansManager(str(in_env["plans_file"])).get_configuration("2d_128").batch_size == 3
    assert any(b.read_bytes() == before for b in folder.glob("*.bak"))


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("argv,match", [
    (["-d", "990", "--size", "120"], "not positive multiples of the ViT patch 16"),
    (["-d", "990", "--size", "128", "--arch", "dinov2_vitb14"], "not positive multiples of the ViT patch 14"),
    (["-d", "990", "--size", "128", "--patch-multiple", "14"], "not positive multiples of the ViT patch 14"),
    (["-d", "990", "--size", "0"], "not positive multiples"),
    (["-d", "990", "--size", "48"], "not larger than the long side of the source patch 56x40"),
    (["-d", "990", "--size", "128", "128"], "would stretch pixels"),
    (["-d", "990", "--size", "128", "96", "64"], "Give one size N"),
    (["-d", "990", "--size", "128", "--source", "3d_fullres"], "'3d_fullres' is 3D"),  # nnU-Net plans it too
    (["-d", "990", "--size", "128", "--source", "2d_huge"], "no configuration '2d_huge'"),
    (["-d", "990", "--size", "128", "--name", "2d"], "cannot replace its own source"),
    (["-d", "990", "--size", "128", "--name", "a__b"], "no '__'"),
    (["-d", "990", "--size", "128", "--arch", "dinov9_giant"], "Unknown DINO architecture"),
    (["-d", "990", "--size", "128", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["-d", "991", "--size", "128"], "Unknown dataset 991"),
    (["-d", "Dataset991_Nope", "--size", "128"], "Unknown dataset 'Dataset991_Nope'"),
    (["-d", "990", "-p", "NoSuchPlans", "--size", "128"], "No plans file"),
    # E11: absurd sizes (a typo of 896, or worse) exceed the DINO trainers' token cap
    (["-d", "990", "--size", "1600000"], "cap of 4,096 tokens"),
    (["-d", "990", "--size", "8960"], "560x400 = 224,000 tokens"),
    (["-d", "990", "--size", "1216"], "--size 1200 is the largest long side that fits"),
    (["-d", "990", "--size", "1600000", "--patch-multiple", "14"], "cap of 4,096 tokens"),  # not "use 1600004"
    (["-d", "990", "--size", "1600000", "1142864"], "cap of 4,096 tokens"),
])
def test_refusals_leave_the_plans_file_unchanged(in_env, capsys, argv, match):
    refuse(argv, in_env["folder"], capsys, match)


def _variant(in_env, tmp_path, edit) -> Path:
    """A plans file next to the real one (same folder layout), edited by ``edit``."""
    plans = json.loads(in_env["plans_file"].read_text())
    edit(plans)
    path = tmp_path / "edited" / "nnUNetPlans.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(plans, indent=4))
    return path


def test_plans_without_a_2d_configuration_are_refused(in_env, tmp_path, capsys):
    def only_3d(plans):
        cfg = plans["configurations"]["2d"]
        cfg.update(patch_size=[40, 56, 40], spacing=[1.0, 1.0, 1.0], data_identifier="nnUNetPlans_3d_fullres")
        plans["configurations"] = {"3d_fullres": cfg}

    path = _variant(in_env, tmp_path, only_3d)
    refuse(["--plans-file", str(path), "--size", "128"], path.parent, capsys, "no 2D configuration")

    def with_3d(plans):
        cfg = copy.deepcopy(plans["configurations"]["2d"])
        cfg.update(patch_size=[40, 56, 40], spacing=[1.0, 1.0, 1.0], data_identifier="nnUNetPlans_3d_fullres")
        plans["configurations"]["3d_fullres"] = cfg

    path = _variant(in_env, tmp_path / "b", with_3d)
    refuse(["--plans-file", str(path), "--size", "128", "--source", "3d_fullres"], path.parent, capsys, "is 3D")


def test_configurations_not_made_by_this_command_are_never_overwritten(in_env, tmp_path, capsys):
    path = _variant(in_env, tmp_path, lambda p: p["configurations"].__setitem__(
        "2d_mine", {"inherits_from": "2d", "batch_size": 4}))
    refuse(["--plans-file", str(path), "--size", "128", "--name", "2d_mine", "--overwrite"], path.parent, capsys,
           "was not made by this command")


def test_invalid_json_is_refused(tmp_path, capsys):
    path = tmp_path / "nnUNetPlans.json"
    path.write_text('{"configurations": {"2d": ')
    refuse(["--plans-file", str(path), "--size", "128"], tmp_path, capsys, "not valid JSON")


@pytest.mark.parametrize("step,target", [("creating a temporary file", "tempfile.mkstemp"),
                                         ("writing the backup", "shutil.copy2"), ("replacing", "os.replace")])
def test_a_failed_write_leaves_the_file_and_nothing_else(in_env, tmp_path, monkeypatch, step, target):
    """An OSError at any step of the write is a refusal naming the step and the reason; no temporary file and no
    backup are left (the original is still in place, so the backup would only be clutter)."""
    path = _variant(in_env, tmp_path, lambda p: None)
    before = snapshot(path.parent)

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device (simulated)")

    module, attr = target.split(".")
    monkeypatch.setattr(getattr(highres_module, module), attr, broken)
    with pytest.raises(HighResPlansError, match=f"{step}.*No space left on device .simulated.*is unchanged"):
        highres_module.add_highres_configuration(path, HighResRequest((128,), name="2d_fail"))
    assert snapshot(path.parent) == before


def _writes_are_blocked(folder: Path) -> bool:
    """Whether the permission bits of ``folder`` really stop writes (not for root, nor on some file systems)."""
    probe = folder / ".probe"
    try:
        probe.write_text("x")
    except OSError:
        return True
    probe.unlink()
    return False


def test_a_read_only_plans_folder_is_refused_with_the_file_and_the_reason(in_env, tmp_path, monkeypatch, capsys):
    """E10: a raw OSError traceback before. As root chmod blocks nothing, so the read-only file system is then
    simulated where the first write happens (the temporary file): either way the refusal must be seen."""
    path = _variant(in_env, tmp_path, lambda p: None)
    folder = path.parent
    folder.chmod(0o555)
    try:
        if not _writes_are_blocked(folder):
            real_mkstemp = highres_module.tempfile.mkstemp

            def read_only(*args, dir=None, **kwargs):
                if Path(dir) == folder:
                    raise OSError(30, "Read-only file system", str(folder / ".nnUNetPlans.json.x.tmp"))
                return real_mkstemp(*args, dir=dir, **kwargs)

            monkeypatch.setattr(highres_module.tempfile, "mkstemp", read_only)
        before = snapshot(folder)
        assert main(["--plans-file", str(path), "--size", "128", "--name", "2d_read_only"]) == 2
        err = capsys.readouterr().err
        assert "refused, nothing written" in err and f"creating a temporary file in {folder}" in err, err
        assert ("Read-only file system" in err or "Permission denied" in err) and "--plans-file" in err, err
        assert "Traceback" not in err
        assert snapshot(folder) == before
    finally:
        folder.chmod(0o755)


def test_the_token_cap_follows_the_trainers_setting(in_env, monkeypatch):
    """The bound on --size is the DINO trainers' own cap ($nnUNet_dino_max_tokens), so the two never disagree."""
    from nnunet_dino.backbone.input_adapter import DinoInputAdapter

    plans = json.loads(in_env["plans_file"].read_text())
    monkeypatch.delenv("nnUNet_dino_max_tokens", raising=False)
    _, cfg, _ = derive_highres_configuration(plans, HighResRequest((1200,)))  # the largest that fits: 75x54 tokens
    assert cfg["patch_size"] == [1200, 864]
    DinoInputAdapter(1, 16, cfg["patch_size"])  # ... and the trainers' adapter accepts it
    with pytest.raises(HighResPlansError, match="cap of 4,096 tokens"):
        derive_highres_configuration(plans, HighResRequest((1216,)))  # 76x54 = 4104 tokens
    monkeypatch.setenv("nnUNet_dino_max_tokens", "4104")
    _, cfg, _ = derive_highres_configuration(plans, HighResRequest((1216,)))
    assert cfg["patch_size"] == [1216, 864]
    monkeypatch.setenv("nnUNet_dino_max_tokens", "a lot")
    with pytest.raises(HighResPlansError, match="is not an integer"):
        derive_highres_configuration(plans, HighResRequest((1216,)))


def test_dinov2_multiple_and_long_side_rule(in_env):
    plans = json.loads(in_env["plans_file"].read_text())
    name, cfg, _ = derive_highres_configuration(plans, HighResRequest((126,), patch_multiple=14))
    assert name == "2d_126" and cfg["patch_size"] == [126, 84]  # 40 * 126/56 = 90 -> nearest multiple of 14
    with pytest.raises(HighResPlansError, match="multiples of the ViT patch 14"):
        derive_highres_configuration(plans, HighResRequest((128,), patch_multiple=14))
