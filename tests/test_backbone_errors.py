"""Weight files that must be refused, with messages that tell the user what is wrong and what to do."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import warnings

import pytest
import torch

from conftest import save_meta_named
from nnunet_dino.backbone import (HOW_TO_GET_WEIGHTS, RANDOM_INIT_VALUE, WEIGHTS_ENV_VAR, WeightFileError,
                                  load_backbone, resolve_weights_setting, to_canonical, verify_meta_hash)

HOW_TO_MARKERS = ("ai.meta.com", "nnUNet_dino_weights")


def _says_how_to_get_weights(msg: str) -> bool:
    return all(m in msg for m in HOW_TO_MARKERS)


# ---------------------------------------------------------------------------------------------- integrity
def test_wrong_sha256_suffix_is_refused(dinov3_s, tmp_path):
    real = dinov3_s.files["meta"]
    actual = hashlib.sha256(real.read_bytes()).hexdigest()[:8]
    wrong = "00000000" if actual != "00000000" else "11111111"
    renamed = tmp_path / f"dinov3_vits16_pretrain_lvd1689m-{wrong}.pth"
    renamed.symlink_to(real)
    with pytest.raises(WeightFileError) as e:
        load_backbone(weights=renamed)
    msg = str(e.value)
    assert wrong in msg and actual in msg and "sha256" in msg


def test_truncated_download_is_refused(dinov3_s, tmp_path):
    """A partial download keeps Meta's name; the hash in the name catches it before anything is unpickled."""
    real = dinov3_s.files["meta"]
    truncated = tmp_path / real.name
    with open(real, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(real.stat().st_size // 2))
    with pytest.raises(WeightFileError, match="sha256"):
        load_backbone(weights=truncated)


# ---------------------------------------------------------------------------------------------- not there
def test_missing_path_explains_how_to_get_weights(tmp_path):
    with pytest.raises(WeightFileError) as e:
        load_backbone(weights=tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
    assert "does not exist" in str(e.value) and _says_how_to_get_weights(str(e.value))


def test_directory_without_weights_lists_what_was_found(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "dinov3_vits16_linear_head.pth").write_bytes(b"")
    with pytest.raises(WeightFileError) as e:
        load_backbone("dinov3_vits16", weights=tmp_path)
    msg = str(e.value)
    assert "notes.txt" in msg and "dinov3_vits16_linear_head.pth" in msg and _says_how_to_get_weights(msg)
    with pytest.raises(WeightFileError):
        load_backbone(weights=tmp_path)


def test_hf_folder_without_weights_lists_what_was_found(dinov3_s, tmp_path):
    (tmp_path / "config.json").write_text((dinov3_s.files["hf"] / "config.json").read_text())
    (tmp_path / "README.md").write_text("x")
    with pytest.raises(WeightFileError) as e:
        load_backbone(weights=tmp_path)
    assert "model.safetensors" in str(e.value) and "README.md" in str(e.value)


# ---------------------------------------------------------------------------------------------- not DINO
def _fake_supervised_vit_s16():
    """Keys and shapes of a supervised timm ViT-S/16 (patch 16, learned pos-embed): not a DINO model."""
    sd = {"cls_token": torch.zeros(1, 1, 384), "pos_embed": torch.zeros(1, 197, 384),
          "patch_embed.proj.weight": torch.zeros(384, 3, 16, 16), "patch_embed.proj.bias": torch.zeros(384),
          "norm.weight": torch.ones(384), "norm.bias": torch.zeros(384), "head.weight": torch.zeros(1000, 384)}
    for i in range(12):
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.zeros(1152, 384)
    return sd


OTHER_FAMILIES = {
    "resnet": lambda: {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64),
                       "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1), "fc.weight": torch.zeros(1000, 2048)},
    "openai_clip_vit": lambda: {"visual.class_embedding": torch.zeros(768), "visual.positional_embedding":
                                torch.zeros(197, 768), "visual.conv1.weight": torch.zeros(768, 3, 16, 16),
                                "visual.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(2304, 768),
                                "token_embedding.weight": torch.zeros(10, 512)},
    "supervised_timm_vit_s16": _fake_supervised_vit_s16,
}


@pytest.mark.parametrize("family", list(OTHER_FAMILIES))
def test_weights_of_another_family_are_refused(family, tmp_path):
    path = tmp_path / f"{family}.pth"
    torch.save(OTHER_FAMILIES[family](), path)
    with pytest.raises(WeightFileError) as e:
        load_backbone(weights=path)
    assert _says_how_to_get_weights(str(e.value))


def test_dinov3_convnext_file_is_refused(tmp_path):
    """Meta also ships DINOv3 ConvNeXts under the same naming scheme; they are not ViTs."""
    sd = {"downsample_layers.0.0.weight": torch.zeros(96, 3, 4, 4), "stages.0.0.dwconv.weight": torch.zeros(96, 1, 7, 7),
          "norm.weight": torch.ones(768)}
    path = save_meta_named(sd, tmp_path, "dinov3_convnext_tiny_pretrain_lvd1689m")
    with pytest.raises(WeightFileError, match="not a DINOv3/DINOv2 ViT"):
        load_backbone(weights=path)


def test_hf_folder_of_another_model_type_is_refused(dinov3_s, tmp_path):
    import json

    config = json.loads((dinov3_s.files["hf"] / "config.json").read_text())
    config["model_type"] = "vit"
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(dinov3_s.files["hf"] / "model.safetensors")
    with pytest.raises(WeightFileError, match="'vit'"):
        load_backbone(weights=tmp_path)


# ---------------------------------------------------------------------------------------------- strictness
@pytest.mark.parametrize("ws_name", ["dinov3_s", "dinov2_s"])
def test_unknown_extra_key_is_named_not_dropped(ws_name, request, tmp_path):
    state = dict(request.getfixturevalue(ws_name).meta_state)
    state["blocks.3.attn.extra_scale"] = torch.ones(6)
    path = tmp_path / "finetuned.pth"
    torch.save(state, path)
    with pytest.raises(WeightFileError, match=r"blocks\.3\.attn\.extra_scale"):
        load_backbone(weights=path)


@pytest.mark.parametrize("ws_name", ["dinov3_s", "dinov2_s"])
def test_missing_key_is_named(ws_name, request, tmp_path):
    state = dict(request.getfixturevalue(ws_name).meta_state)
    del state["blocks.5.norm2.bias"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(WeightFileError, match=r"blocks\.5\.norm2\.bias"):
        load_backbone(weights=path)


def test_truncated_depth_is_refused(dinov3_s, tmp_path):
    """A state dict missing its last block describes no registered architecture."""
    state = {k: v for k, v in dinov3_s.meta_state.items() if not k.startswith("blocks.11.")}
    path = tmp_path / "eleven_blocks.pth"
    torch.save(state, path)
    with pytest.raises(WeightFileError, match="11 blocks"):
        load_backbone(weights=path)


def test_meddinov3_unknown_teacher_key_is_refused(tmp_path):
    path = tmp_path / "meddino.pth"
    torch.save({"teacher": {"backbone.cls_token": torch.zeros(1, 1, 768), "projector.weight": torch.zeros(4, 4)}},
               path)
    with pytest.raises(WeightFileError, match="projector.weight"):
        load_backbone(weights=path)


# ---------------------------------------------------------------------------------------------- unsafe pickles
UNPICKLED = []


def _record_unpickling():
    UNPICKLED.append(True)
    return "pwned"


class CodeCarrier:
    """Unpickling this runs _record_unpickling: a stand-in for a malicious checkpoint."""

    def __reduce__(self):
        return (_record_unpickling, ())


def test_pickled_code_is_never_run(tmp_path):
    path = tmp_path / "dinov3_vits16_custom.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 384), "trainer_state": CodeCarrier()}, path)
    with pytest.raises(WeightFileError, match="weights_only"):
        load_backbone(weights=path)
    assert UNPICKLED == []


def test_unknown_suffix_is_refused(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"\x00")
    with pytest.raises(WeightFileError, match=r"\.npz"):
        load_backbone(weights=path)


def test_damaged_safetensors_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightFileError, match="safetensors"):
        load_backbone(weights=path)


# ---------------------------------------------------------------------------------------------- configuration
def test_load_backbone_needs_weights_or_explicit_random_init():
    with pytest.raises(WeightFileError) as e:
        load_backbone()
    assert _says_how_to_get_weights(str(e.value))
    with pytest.raises(WeightFileError):
        load_backbone("dinov3_vits16")
    with pytest.raises(ValueError):
        load_backbone(random_init=True)  # which architecture?
    with pytest.raises(ValueError):
        load_backbone("dinov3_vits16", weights="/nonexistent.pth", random_init=True)


@pytest.fixture
def meta_folder(tmp_path, dinov3_s, dinov3_splus, dinov2_s, dinov2_s_reg):
    """A folder as a user keeps Meta's downloads (symlinks to the session checkpoints)."""
    folder = tmp_path / "dino_weights"
    folder.mkdir()
    for ws in (dinov3_s, dinov3_splus, dinov2_s, dinov2_s_reg):
        (folder / ws.files["meta"].name).symlink_to(ws.files["meta"])
    return folder


def test_resolve_reads_env_var_and_picks_the_architectures_file(meta_folder, monkeypatch, dinov3_s, dinov3_splus,
                                                                dinov2_s, dinov2_s_reg):
    monkeypatch.setenv(WEIGHTS_ENV_VAR, str(meta_folder))
    for ws in (dinov3_s, dinov3_splus, dinov2_s, dinov2_s_reg):
        resolved = resolve_weights_setting(None, ws.arch)
        assert resolved == meta_folder / ws.files["meta"].name, ws.arch
    with pytest.raises(WeightFileError, match="dinov3_vitb16"):
        resolve_weights_setting(None, "dinov3_vitb16")  # not downloaded
    # A file path is used as is, and an explicit value wins over the environment.
    monkeypatch.setenv(WEIGHTS_ENV_VAR, str(dinov3_s.files["hf"]))
    assert resolve_weights_setting(None, "dinov3_vits16") == dinov3_s.files["hf"]
    assert resolve_weights_setting(str(meta_folder), "dinov3_vits16") == meta_folder / dinov3_s.files["meta"].name


def test_resolve_refuses_an_ambiguous_folder(meta_folder, monkeypatch, dinov3_s):
    second = meta_folder / "dinov3_vits16_pretrain_sat493m-0123abcd.pth"
    second.symlink_to(dinov3_s.files["meta"])
    monkeypatch.setenv(WEIGHTS_ENV_VAR, str(meta_folder))
    with pytest.raises(WeightFileError) as e:
        resolve_weights_setting(None, "dinov3_vits16")
    assert second.name in str(e.value) and dinov3_s.files["meta"].name in str(e.value)
    assert resolve_weights_setting(None, "dinov3_vits16plus").name.startswith("dinov3_vits16plus_")


def test_resolve_random_and_unset(monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV_VAR, RANDOM_INIT_VALUE)
    assert resolve_weights_setting(None, "dinov3_vits16") is None
    for unset in (None, "", "  "):
        if unset is None:
            monkeypatch.delenv(WEIGHTS_ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(WEIGHTS_ENV_VAR, unset)
        with pytest.raises(WeightFileError) as e:
            resolve_weights_setting(None, "dinov3_vits16")
        msg = str(e.value)
        assert WEIGHTS_ENV_VAR in msg and "dinov3_vits16" in msg and HOW_TO_GET_WEIGHTS in msg


def test_random_init_is_loud(caplog):
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        bb = load_backbone("dinov3_vits16", random_init=True)
    assert bb.load_report.random_init and "RANDOMLY INITIALISED" in bb.load_report.describe()
    assert any("RANDOMLY INITIALISED" in r.getMessage() for r in caplog.records)


def test_pretrained_load_does_not_warn(dinov3_s):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bb = load_backbone(weights=dinov3_s.files["hf"])
    assert not bb.load_report.random_init and "RANDOMLY" not in bb.load_report.describe()
    assert os.fspath(dinov3_s.files["hf"]) in bb.load_report.describe()


def test_hf_folder_with_nonzero_key_bias_is_refused(tmp_path):
    # RoPE rotates k per position, so a k bias changes attention: it must not be dropped silently.
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    cfg = DINOv3ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                          num_register_tokens=4, patch_size=16, key_bias=True)
    model = DINOv3ViTModel(cfg)
    with torch.no_grad():
        model.model.layer[3].attention.k_proj.bias.fill_(0.5)
    model.save_pretrained(tmp_path)
    with pytest.raises(WeightFileError, match="non-zero key bias"):
        load_backbone(weights=tmp_path)


# ---------------------------------------------------------------------------------------------- audit 2026-12-01
class _Hang(BaseException):
    """Not an Exception, so that no `except Exception` in the loader can turn a hang into a passing refusal."""


@contextlib.contextmanager
def _must_finish_within(seconds: int):
    """Turns a hang (hashing /dev/zero, opening a FIFO) into a failure of this test instead of a stuck suite."""
    def on_alarm(signum, frame):
        raise _Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _special_file(kind, tmp_path, dinov3_s):
    """(path to load, path the message must name, what it must say it is)."""
    meta_name = "dinov3_vits16_pretrain_lvd1689m-00000000.pth"  # hash-named: the sha256 check would read it all
    if kind == "dev_zero_meta_named":
        (tmp_path / meta_name).symlink_to("/dev/zero")
        return tmp_path / meta_name, tmp_path / meta_name, "character device"
    if kind == "fifo_meta_named":
        os.mkfifo(tmp_path / meta_name)
        return tmp_path / meta_name, tmp_path / meta_name, "named pipe"
    if kind == "fifo_plain_name":  # no hash check: torch.load's open() would block instead
        os.mkfifo(tmp_path / "weights.pth")
        return tmp_path / "weights.pth", tmp_path / "weights.pth", "named pipe"
    assert kind == "hf_safetensors_dev_zero"
    (tmp_path / "config.json").write_text((dinov3_s.files["hf"] / "config.json").read_text())
    (tmp_path / "model.safetensors").symlink_to("/dev/zero")
    return tmp_path, tmp_path / "model.safetensors", "character device"


@pytest.mark.skipif(not os.path.exists("/dev/zero") or not hasattr(os, "mkfifo"), reason="needs /dev/zero and FIFOs")
@pytest.mark.parametrize("kind", ["dev_zero_meta_named", "fifo_meta_named", "fifo_plain_name",
                                  "hf_safetensors_dev_zero"])
def test_device_or_fifo_is_refused_at_once(kind, tmp_path, dinov3_s):
    """A29: only regular files are read (after resolving links); a device or pipe used to hang the sha256 check."""
    path, named, what = _special_file(kind, tmp_path, dinov3_s)
    with _must_finish_within(20), pytest.raises(WeightFileError) as e:
        load_backbone(weights=path)
    msg = str(e.value)
    assert str(named) in msg and what in msg and "not a regular file" in msg
    if kind == "dev_zero_meta_named":
        assert "/dev/zero" in msg
        with _must_finish_within(20), pytest.raises(WeightFileError, match="character device"):
            verify_meta_hash(path)  # public helper: refuses by itself too


def test_empty_file_is_called_empty(tmp_path):
    """A4: say the file is empty, without the misleading 'save a plain state dict' advice."""
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(WeightFileError) as e:
        load_backbone(weights=path)
    msg = str(e.value)
    assert str(path) in msg and "empty (0 bytes)" in msg and "Download it again" in msg
    assert "plain state dict" not in msg and "unpickle" not in msg


def test_invalid_hf_config_json_is_named(dinov3_s, tmp_path):
    """A22: a WeightFileError naming config.json, not a raw JSONDecodeError."""
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").symlink_to(dinov3_s.files["hf"] / "model.safetensors")
    with pytest.raises(WeightFileError) as e:
        load_backbone(weights=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "config.json") in msg and "not valid JSON" in msg and "line 1 column 2" in msg


def _hf_folder_without(dinov3_s, tmp_path, key):
    from safetensors.torch import load_file, save_file

    state = load_file(str(dinov3_s.files["hf"] / "model.safetensors"))
    del state[key]
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((dinov3_s.files["hf"] / "config.json").read_text())
    return tmp_path


@pytest.mark.parametrize("key", ["layer.3.mlp.up_proj.weight", "layer.5.attention.k_proj.weight",
                                 "embeddings.register_tokens"])
def test_missing_hf_tensor_is_named_by_its_hf_key(key, dinov3_s, tmp_path):
    """A19: the message names the tensor as the Hugging Face file calls it (not blocks.3.mlp.fc1.weight)."""
    folder = _hf_folder_without(dinov3_s, tmp_path, key)
    with pytest.raises(WeightFileError) as e:
        load_backbone(weights=folder)
    msg = str(e.value)
    assert f"lack the tensor {key!r}" in msg and str(folder) in msg


@pytest.mark.parametrize("key,damage", [("blocks.3.mlp.fc1.weight", "nan_all"), ("norm.weight", "inf_one")])
def test_non_finite_tensor_is_named(key, damage, dinov3_s, tmp_path):
    """A25: NaN/inf weights are refused, naming the file and the tensor (they used to give NaN features)."""
    state = dict(dinov3_s.meta_state)
    bad = state[key].clone()
    if damage == "nan_all":
        bad.fill_(float("nan"))
    else:
        bad.view(-1)[7] = float("inf")
    state[key] = bad
    path = tmp_path / "damaged.pth"
    torch.save(state, path)
    with pytest.raises(WeightFileError) as e:
        load_backbone(weights=path)
    msg = str(e.value)
    n = bad.numel() if damage == "nan_all" else 1
    assert str(path) in msg and "NaN or infinite" in msg and f"{key} ({n} of {bad.numel()} values)" in msg


def test_wrong_shape_tensor_is_named_with_both_shapes(dinov3_s, tmp_path):
    """A26: a 1-channel patch embedding gives a WeightFileError with key, expected and found shapes, not torch's
    raw size-mismatch RuntimeError."""
    state = dict(dinov3_s.meta_state)
    state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"][:, :1].clone()
    path = tmp_path / "one_channel.pth"
    torch.save(state, path)
    with pytest.raises(WeightFileError) as e:
        load_backbone(weights=path)
    msg = str(e.value)
    assert str(path) in msg and "patch_embed.proj.weight: expected (384, 3, 16, 16), found (384, 1, 16, 16)" in msg
    assert "DinoInputAdapter" in msg


def test_rope_periods_of_another_schedule_are_refused(dinov3_s, tmp_path):
    """A24: the stored RoPE period values are checked (bf16 rounding tolerated), not only their number."""
    state = dict(dinov3_s.meta_state)
    state["rope_embed.periods"] = state["rope_embed.periods"] * 7
    path = tmp_path / "rope_times_7.pth"
    torch.save(state, path)
    with pytest.raises(WeightFileError) as e:
        load_backbone(weights=path)
    msg = str(e.value)
    assert str(path) in msg and "'rope_embed.periods'" in msg and "RoPE base 100" in msg


def test_hf_rope_theta_of_another_schedule_is_refused(dinov3_s, tmp_path):
    """A24, Hugging Face layout: the RoPE base is read from config.json and checked the same way."""
    config = json.loads((dinov3_s.files["hf"] / "config.json").read_text())
    config["rope_theta"] = 1000.0
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(dinov3_s.files["hf"] / "model.safetensors")
    with pytest.raises(WeightFileError) as e:
        load_backbone(weights=tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "rope_theta=1000" in msg and "RoPE base 100" in msg


def _blocks_bias_mask_off(state, blocks):
    state = dict(state)
    for i in blocks:
        state[f"blocks.{i}.attn.qkv.bias_mask"] = torch.ones_like(state[f"blocks.{i}.attn.qkv.bias_mask"])
    return state


@pytest.mark.parametrize("variant", ["mask_activates_k_bias", "no_mask_nonzero_k_bias"])
def test_meta_file_with_an_active_key_bias_is_refused(variant, dinov3_s, tmp_path):
    """A23: Meta's model adds qkv.bias * qkv.bias_mask. A mask that keeps the (non-zero) k part, or no mask at all,
    means a key bias the canonical model cannot hold: refused, like the Hugging Face case (A20), never dropped."""
    if variant == "mask_activates_k_bias":
        state, block = _blocks_bias_mask_off(dinov3_s.meta_state, [4, 7]), 4
        reason = "which blocks.4.attn.qkv.bias_mask does not zero"
    else:
        state = {k: v for k, v in dinov3_s.meta_state.items() if not k.endswith("bias_mask")}
        block, reason = 0, "with no blocks.0.attn.qkv.bias_mask to zero it"
    path = save_meta_named(state, tmp_path, "dinov3_vits16_pretrain_lvd1689m")
    with pytest.raises(WeightFileError) as e:
        load_backbone(weights=path)
    msg = str(e.value)
    assert str(path) in msg and f"Block {block} of the Meta DINOv3 weights has a non-zero key bias" in msg
    assert f"the k part of blocks.{block}.attn.qkv.bias" in msg and reason in msg


def test_timm_file_with_a_key_bias_is_refused(dinov3_s, tmp_path):
    """A23 in timm's split-projection layout: a non-zero k_proj.bias used to be popped silently."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in to_canonical(dinov3_s.meta_state).state_dict.items()}
    state["blocks.2.attn.k_proj.bias"] = torch.full((384,), 0.1)
    path = tmp_path / "timm_split.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightFileError) as e:
        load_backbone(weights=path)
    msg = str(e.value)
    assert str(path) in msg and "Block 2 of the timm DINOv3 weights has a non-zero key bias" in msg
    assert "blocks.2.attn.k_proj.bias" in msg


def test_training_checkpoint_wrapper_is_refused_with_advice(dinov3_s, tmp_path):
    """A28: {'model': sd, 'epoch': ...} is ambiguous (which entry holds the weights to use?): refused, saying where
    the tensors are and how to extract them. (A lone {'state_dict': sd} is unwrapped: test_backbone_formats.py.)"""
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": dinov3_s.meta_state, "epoch": 3}, path)
    with pytest.raises(WeightFileError) as e:
        load_backbone(weights=path)
    msg = str(e.value)
    assert str(path) in msg and "nested under 'model'" in msg and "['epoch']" in msg
    assert f"torch.save(torch.load('{path}', weights_only=True)['model']" in msg


def test_tensors_nested_under_another_key_are_pointed_out(dinov3_s, tmp_path):
    path = tmp_path / "net.pth"
    torch.save({"net": dinov3_s.meta_state}, path)
    with pytest.raises(WeightFileError) as e:
        load_backbone(weights=path)
    msg = str(e.value)
    assert str(path) in msg and "nested under ['net']" in msg
