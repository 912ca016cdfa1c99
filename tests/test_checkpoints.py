"""The plugin's checkpoints: provenance inside them, slim storage of frozen DINO weights, atomic writes that survive
a full disk, and the weights setting checked before nnU-Net writes anything.

A real GuiDINO trainer (nnU-Net's __init__ and initialize on the bundled HippoTiny plans, ViT-S with LoRA, few
tokens) writes checkpoints with nnU-Net's own ``save_checkpoint``; they are read back the way nnU-Net's predictor
does (``build_network_architecture`` on the trainer class, then strict ``load_state_dict``).
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

import nnunet_dino.training.checkpoints as checkpoints
from nnunet_dino.backbone import WeightFileError
from nnunet_dino.training import GuiDINOTrainer
from nnunet_dino import atomic_files
from nnunet_dino.atomic_files import NoSpaceLeftError, write_atomically
from nnunet_dino.training.checkpoints import PROVENANCE_KEY


class TinyGuiDINO(GuiDINOTrainer):
    guidino = replace(GuiDINOTrainer.guidino, min_short_side_tokens=4)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def results(hippo_workspace, tmp_path, monkeypatch) -> Path:
    """nnUNet_results for the trainer and the predictor (nnU-Net 2.8 reads it from the environment when used)."""
    root = tmp_path / "nnUNet_results"
    monkeypatch.setenv("nnUNet_results", str(root))
    monkeypatch.setenv("nnUNet_preprocessed", str(hippo_workspace["preprocessed"].parent))
    monkeypatch.setattr(checkpoints, "_frozen_cache", {})
    monkeypatch.setattr(checkpoints, "_announced", set())
    return root


def make_trainer(hippo_workspace, weights: str, slim: bool = False) -> TinyGuiDINO:
    plans = dict(load_json(hippo_workspace["preprocessed"] / "nnUNetPlans.json"), continue_training=False)
    dataset_json = load_json(hippo_workspace["preprocessed"] / "dataset.json")
    cls = type("TinyGuiDINO", (TinyGuiDINO,), {"dino_weights": weights, "slim_checkpoints": slim})
    trainer = cls(plans, "2d", 0, dataset_json, torch.device("cpu"))
    trainer.initialize()
    trainer.load_dino_weights()
    return trainer


def predictor_network(trainer: GuiDINOTrainer, checkpoint_file: Path) -> torch.nn.Module:
    """What nnUNetPredictor.initialize_from_trained_model_folder does with a checkpoint."""
    checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
    pm = PlansManager(checkpoint["init_args"]["plans"])
    network = type(trainer).build_network_architecture(pm, pm.get_configuration("2d"), 1, 3, False)
    network.load_state_dict(checkpoint["network_weights"])  # strict, as nnU-Net's predictor
    return network


def assert_same_network(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoint_records_random_dino_weights_and_the_predictor_says_so(hippo_workspace, results, capsys):
    trainer = make_trainer(hippo_workspace, "random")
    path = Path(trainer.output_folder) / "checkpoint_final.pth"
    trainer.save_checkpoint(str(path))
    record = torch.load(path, map_location="cpu", weights_only=False)["network_weights"][PROVENANCE_KEY]
    (backbone,) = record["dino_weights"]
    assert backbone["random_init"] is True and backbone["arch"] == "dinov3_vits16"
    assert backbone["pretraining"] == "none (random initialisation)"  # not 'lvd1689m', which it never saw
    assert load_json(Path(trainer.output_folder) / "dino_weights.json")["backbones"] == record["dino_weights"]
    capsys.readouterr()
    assert_same_network(predictor_network(trainer, path), trainer.network)
    assert "trained with dinov3_vits16: RANDOMLY INITIALISED DINO weights" in capsys.readouterr().out


def test_resume_logs_where_the_dino_weights_came_from(hippo_workspace, results):
    trainer = make_trainer(hippo_workspace, "random")
    path = Path(trainer.output_folder) / "checkpoint_latest.pth"
    trainer.save_checkpoint(str(path))
    resumed = make_trainer(hippo_workspace, "random")
    lines = []
    resumed.print_to_log_file = lambda *args, **kwargs: lines.append(" ".join(map(str, args)))
    resumed.load_checkpoint(str(path))
    assert resumed._network_from_checkpoint
    assert any("Network restored from" in line and "RANDOMLY INITIALISED" in line for line in lines), lines
    assert_same_network(resumed.network, trainer.network)


def test_slim_checkpoints_store_frozen_dino_once_and_load_strictly(hippo_workspace, results, dinov3_s, tmp_path,
                                                                   monkeypatch):
    """Meta-layout weights, LoRA: the frozen base weights leave the checkpoints (by at least their size), live once
    in the model folder, and come back bit-exactly from there or, with that file gone, from the DINO weight file
    the model was trained with; a different DINO file is refused."""
    weights = tmp_path / "dino" / dinov3_s.files["meta"].name
    weights.parent.mkdir()
    weights.write_bytes(dinov3_s.files["meta"].read_bytes())
    full = make_trainer(hippo_workspace, str(weights))
    full_path = tmp_path / "full.pth"
    full.save_checkpoint(str(full_path))
    slim = make_trainer(hippo_workspace, str(weights), slim=True)
    slim_path = Path(slim.output_folder) / "checkpoint_best.pth"
    slim.save_checkpoint(str(slim_path))
    stored = list(Path(slim.output_folder_base).glob("dino_frozen-*.safetensors"))
    assert len(stored) == 1
    frozen_bytes = stored[0].stat().st_size
    assert frozen_bytes > 80e6  # ViT-S base weights, fp32
    assert slim_path.stat().st_size < full_path.stat().st_size - 0.95 * frozen_bytes
    slim.save_checkpoint(str(Path(slim.output_folder) / "checkpoint_final.pth"))  # second save: file reused
    assert list(Path(slim.output_folder_base).glob("dino_frozen-*.safetensors")) == stored

    monkeypatch.delenv("nnUNet_dino_weights", raising=False)
    assert_same_network(predictor_network(slim, slim_path), slim.network)  # found in the model folder

    stored[0].unlink()
    monkeypatch.setattr(checkpoints, "_frozen_cache", {})
    assert_same_network(predictor_network(slim, slim_path), slim.network)  # re-read from the recorded DINO file

    weights.rename(weights.with_name("moved.pth"))
    monkeypatch.setattr(checkpoints, "_frozen_cache", {})
    with pytest.raises(WeightFileError, match="slim nnunet-dino checkpoint") as err:
        predictor_network(slim, slim_path)
    assert "dino_frozen-" in str(err.value) and "nnUNet_dino_weights" in str(err.value)

    monkeypatch.setenv("nnUNet_dino_weights", str(dinov3_s.files["hf"]))  # a ViT-S, but other tensors (q/v bias)
    other = make_trainer(hippo_workspace, str(dinov3_s.files["hf"]))
    if checkpoints.tensors_sha256({k: v for k, v in other.network.state_dict().items()
                                   if k in checkpoints.frozen_dino_keys(other.network)}) != slim._frozen[1]:
        with pytest.raises(WeightFileError, match="not the ones this model was trained with"):
            predictor_network(slim, slim_path)
    else:  # the HF copy holds the very same tensors: then it must be accepted
        assert_same_network(predictor_network(slim, slim_path), slim.network)


def test_write_failure_leaves_the_previous_checkpoint_intact(tmp_path):
    target = tmp_path / "checkpoint_latest.pth"
    torch.save({"epoch": 1}, target)
    before = sha256(target)

    def dies_halfway(tmp):
        Path(tmp).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 82937344 vs 82937232")

    with pytest.raises(RuntimeError, match="unexpected pos"):
        write_atomically(target, dies_halfway, 1000)
    assert sha256(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_latest.pth"]  # no partial file left


def test_full_disk_is_refused_before_writing_with_a_clear_message(hippo_workspace, results, monkeypatch):
    trainer = make_trainer(hippo_workspace, "random")
    path = Path(trainer.output_folder) / "checkpoint_best.pth"
    trainer.save_checkpoint(str(path))
    before = sha256(path)
    monkeypatch.setattr(atomic_files, "free_bytes", lambda folder: 5 * 2 ** 20)
    with pytest.raises(NoSpaceLeftError, match="No space left on device") as err:
        trainer.save_checkpoint(str(path))
    assert "MB needed" in str(err.value) and "intact" in str(err.value) and "continue with --c" in str(err.value)
    assert sha256(path) == before


def test_a_write_that_runs_out_of_space_says_so(tmp_path, monkeypatch):
    free = iter([10 ** 12, 10])  # enough before the write, none after it: the disk filled up meanwhile

    monkeypatch.setattr(atomic_files, "free_bytes", lambda folder: next(free))

    def torch_style_failure(tmp):
        raise RuntimeError("basic_ios::clear: iostream error")

    with pytest.raises(NoSpaceLeftError, match="No space left on device"):
        write_atomically(tmp_path / "checkpoint_final.pth", torch_style_failure, 10 ** 6)
    assert not any(tmp_path.iterdir())


def test_missing_weights_setting_is_refused_before_nnunet_creates_the_fold_folder(hippo_workspace, results,
                                                                                   monkeypatch):
    monkeypatch.delenv("nnUNet_dino_weights", raising=False)
    plans = dict(load_json(hippo_workspace["preprocessed"] / "nnUNetPlans.json"), continue_training=False)
    dataset_json = load_json(hippo_workspace["preprocessed"] / "dataset.json")
    with pytest.raises(WeightFileError, match="No DINO weights configured"):
        TinyGuiDINO(copy.deepcopy(plans), "2d", 0, dataset_json, torch.device("cpu"))
    with pytest.raises(WeightFileError, match="does not exist"):
        type("T", (TinyGuiDINO,), {"dino_weights": "/nonexistent/dinov3.pth"})(
            copy.deepcopy(plans), "2d", 0, dataset_json, torch.device("cpu"))
    assert not results.exists()  # no stray training_log_*.txt, no fold folder


def test_a_checkpoint_decoded_at_another_resolution_is_refused_not_silently_changed(hippo_workspace):
    """SegDINOv2 now decodes at most at the patch's resolution; weights trained the old way (decoding at the ViT
    input's resolution: every checkpoint without the decode key) would load with the same weights but predict
    differently, so loading refuses them, and accepts them into a network built the old way."""
    from dataclasses import replace as dc_replace

    from nnunet_dino.training import SegDINOv2Trainer

    pm = PlansManager(load_json(hippo_workspace["preprocessed"] / "nnUNetPlans.json"))

    def build(resolution="patch"):
        cls = type("T", (SegDINOv2Trainer,), {"segdino_v2": dc_replace(SegDINOv2Trainer.segdino_v2,
                                                                         max_decode_resolution=resolution)})
        return cls.build_network_architecture(pm, pm.get_configuration("2d"), 1, 3, False)

    trained = build()
    state = trained.state_dict()
    build().load_state_dict(state)  # its own state dict (and nnU-Net's -pretrained_weights path) loads
    old = {k: v for k, v in state.items() if k != checkpoints.DECODE_KEY}  # written before 2026-12-01
    with pytest.raises(ValueError, match="trained with max_decode_resolution='vit_input'.*predictions would"):
        build().load_state_dict(old)
    build("vit_input").load_state_dict(old)  # the old decoding: loads strictly
    with pytest.raises(ValueError, match="trained with max_decode_resolution='patch'"):
        build("vit_input").load_state_dict(state)
