"""Every supported weight layout loads strictly, infers its architecture, and reproduces the independent reference.

The reference is the Hugging Face ``transformers`` model the synthetic checkpoint was written from (see
conftest.py); every layout holding the same weights must also give the same patch features as every other.
"""
from __future__ import annotations

import copy
import itertools
import logging

import pytest
import torch

from conftest import hf_reference, input_image, save_meta_named
from nnunet_dino.backbone import DinoBackbone, WeightFileError, get_architecture, load_backbone, to_canonical
from nnunet_dino.backbone.vit_factory import rope_periods

# (weight-set fixture, format label, expected pretraining tag used for input normalisation)
CASES = [
    ("dinov3_s", "meta", "lvd1689m"),
    ("dinov3_s", "hf", "lvd1689m"),
    ("dinov3_s", "timm_qkvb", "lvd1689m"),
    ("dinov3_s_nobias", "timm", "lvd1689m"),
    ("dinov3_splus", "meta", "lvd1689m"),
    ("dinov3_splus", "hf", "lvd1689m"),
    ("dinov3_splus", "timm_qkvb", "lvd1689m"),
    ("dinov2_s", "meta", "lvd142m"),
    ("dinov2_s", "hf", "lvd142m"),
    ("dinov2_s", "timm", "lvd142m"),
    ("dinov2_s_reg", "meta", "lvd142m"),
    ("dinov2_s_reg", "hf", "lvd142m"),
    ("dinov2_s_reg", "timm", "lvd142m"),
    ("meddinov3_b", "meddinov3", "meddinov3_ct"),
]
ATOL = 1e-5


@pytest.fixture(scope="module")
def loaded(request):
    """(weight set, format) -> (backbone arch name, load report, features of all blocks); each file loaded once."""
    cache = {}

    def get(ws_name, fmt):
        if (ws_name, fmt) not in cache:
            ws = request.getfixturevalue(ws_name)
            bb = load_backbone(weights=ws.files[fmt])
            x = input_image(ws.input_hw)
            with torch.no_grad():
                feats = bb.patch_features(x, layers=range(bb.arch.depth))
            cache[(ws_name, fmt)] = (bb.arch.name, bb.load_report, feats)
        return cache[(ws_name, fmt)]

    return get


@pytest.fixture(scope="module")
def references(request):
    cache = {}

    def get(ws_name):
        if ws_name not in cache:
            ws = request.getfixturevalue(ws_name)
            depth = ws.reference.config.num_hidden_layers
            cache[ws_name] = hf_reference(ws.reference, input_image(ws.input_hw), range(depth))
        return cache[ws_name]

    return get


def _assert_maps_close(ours, ref, what):
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape, f"{what}: block {i} shape {tuple(a.shape)} != {tuple(b.shape)}"
        err = (a - b).abs().max().item()
        assert err <= ATOL, f"{what}: block {i} differs by {err:.3g} (atol {ATOL})"


@pytest.mark.parametrize("ws_name,fmt,pretraining", CASES, ids=[f"{w}-{f}" for w, f, _ in CASES])
def test_format_loads_and_matches_reference(ws_name, fmt, pretraining, loaded, references, request):
    ws = request.getfixturevalue(ws_name)
    arch_name, report, feats = loaded(ws_name, fmt)
    assert arch_name == ws.arch  # inferred from the file alone
    assert report.arch == ws.arch and not report.random_init
    assert report.pretraining == pretraining
    h, w = (s // ws.patch_size for s in ws.input_hw)
    assert feats[0].shape == (2, ws.reference.config.hidden_size, h, w)
    _assert_maps_close(feats, references(ws_name), f"{ws_name}/{fmt} vs Hugging Face reference")


SAME_WEIGHTS = {}
for _ws, _fmt, _ in CASES:
    SAME_WEIGHTS.setdefault(_ws, []).append(_fmt)
PAIRS = [(ws, a, b) for ws, fmts in SAME_WEIGHTS.items() for a, b in itertools.combinations(fmts, 2)]


@pytest.mark.parametrize("ws_name,fmt_a,fmt_b", PAIRS, ids=[f"{w}-{a}-{b}" for w, a, b in PAIRS])
def test_formats_holding_same_weights_agree(ws_name, fmt_a, fmt_b, loaded):
    _assert_maps_close(loaded(ws_name, fmt_a)[2], loaded(ws_name, fmt_b)[2], f"{ws_name}: {fmt_a} vs {fmt_b}")


def test_nobias_timm_file_differs_from_biased_weights(loaded):
    """Guards the comparison above: q/v biases matter, so two sets differing only in them must differ."""
    a, b = loaded("dinov3_s", "meta")[2][-1], loaded("dinov3_s_nobias", "timm")[2][-1]
    assert (a - b).abs().max().item() > 1e-2


def test_default_layers_are_the_papers_taps(loaded, dinov3_s):
    bb = load_backbone(weights=dinov3_s.files["meta"])
    assert bb.arch.default_layers == (2, 5, 8, 11)
    with torch.no_grad():
        default = bb.patch_features(input_image(dinov3_s.input_hw))
    full = loaded("dinov3_s", "meta")[2]
    _assert_maps_close(default, [full[i] for i in (2, 5, 8, 11)], "default layers")


@pytest.mark.parametrize("ws_name,fmt,name", [
    ("dinov3_s", "meta", "dinov3_vits16"),
    ("dinov3_splus", "hf", "dinov3_vits16plus"),
    ("dinov2_s_reg", "timm", "dinov2_vits14_reg"),
])
def test_explicit_matching_name_loads(ws_name, fmt, name, loaded, request):
    ws = request.getfixturevalue(ws_name)
    bb = load_backbone(name, weights=ws.files[fmt])
    assert isinstance(bb, DinoBackbone) and bb.arch.name == name
    with torch.no_grad():
        feats = bb.patch_features(input_image(ws.input_hw), layers=[bb.arch.depth - 1])
    _assert_maps_close(feats, loaded(ws_name, fmt)[2][-1:], "explicit name")


@pytest.mark.parametrize("ws_name,fmt,wrong", [
    ("dinov3_s", "meta", "dinov3_vits16plus"),
    ("dinov3_s", "hf", "dinov3_vitb16"),
    ("dinov2_s", "timm", "dinov2_vits14_reg"),
    ("meddinov3_b", "meddinov3", "dinov3_vits16"),
])
def test_explicit_mismatching_name_is_refused(ws_name, fmt, wrong, request):
    ws = request.getfixturevalue(ws_name)
    with pytest.raises(WeightFileError) as e:
        load_backbone(wrong, weights=ws.files[fmt])
    assert ws.arch in str(e.value) and wrong in str(e.value)


def test_folder_of_meta_files_with_name(dinov3_s, dinov3_splus, dinov2_s, dinov2_s_reg, tmp_path, loaded):
    """A folder holding several of Meta's files (as downloaded) resolves to the file of the named architecture."""
    for ws in (dinov3_s, dinov3_splus, dinov2_s, dinov2_s_reg):
        (tmp_path / ws.files["meta"].name).symlink_to(ws.files["meta"])
    for ws_name, ws in [("dinov3_s", dinov3_s), ("dinov3_splus", dinov3_splus), ("dinov2_s", dinov2_s),
                        ("dinov2_s_reg", dinov2_s_reg)]:
        bb = load_backbone(ws.arch, weights=tmp_path)
        assert bb.arch.name == ws.arch
        assert bb.load_report.source.endswith(ws.files["meta"].name)
    with torch.no_grad():
        feats = bb.patch_features(input_image(dinov2_s_reg.input_hw), layers=[11])
    _assert_maps_close(feats, loaded("dinov2_s_reg", "meta")[2][-1:], "folder load")
    with pytest.raises(WeightFileError, match="name the architecture"):
        load_backbone(weights=tmp_path)


# ---------------------------------------------------------------------------------------------- audit 2026-12-01
def _features(path, ws):
    bb = load_backbone(weights=path)
    with torch.no_grad():
        return bb, bb.patch_features(input_image(ws.input_hw), layers=range(bb.arch.depth))


def test_meta_file_without_bias_mask_and_zero_key_bias_loads_exactly(dinov3_s, references, tmp_path):
    """A23: without bias_mask Meta's model adds qkv.bias as it is; a zero k part is then exactly no key bias."""
    state = {k: v for k, v in dinov3_s.meta_state.items() if not k.endswith("bias_mask")}
    for i in range(12):
        q, _k, v = state[f"blocks.{i}.attn.qkv.bias"].chunk(3)
        state[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    _, feats = _features(save_meta_named(state, tmp_path, "dinov3_vits16_pretrain_lvd1689m"), dinov3_s)
    _assert_maps_close(feats, references("dinov3_s"), "Meta file without bias_mask vs Hugging Face reference")


def test_meta_bias_mask_is_applied_as_meta_applies_it(dinov3_s, tmp_path):
    """A23: the effective bias is qkv.bias * qkv.bias_mask (Meta's LinearKMaskedBias), so a mask scaling the q part
    gives the features of a reference whose q bias is scaled the same way (the k part stays masked: irrelevant)."""
    state = dict(dinov3_s.meta_state)
    for i in range(12):
        mask = state[f"blocks.{i}.attn.qkv.bias_mask"].clone()
        mask[:384] = 0.5
        state[f"blocks.{i}.attn.qkv.bias_mask"] = mask
    reference = copy.deepcopy(dinov3_s.reference)
    with torch.no_grad():
        for layer in reference.model.layer if hasattr(reference, "model") else reference.layer:
            layer.attention.q_proj.bias.mul_(0.5)
    path = tmp_path / "half_q_bias.pth"
    torch.save(state, path)
    _, feats = _features(path, dinov3_s)
    ref = hf_reference(reference, input_image(dinov3_s.input_hw), range(12))
    _assert_maps_close(feats, ref, "q bias halved by bias_mask vs Hugging Face reference")


def test_timm_split_projection_file_loads_exactly(dinov3_s, references, tmp_path):
    """timm's split-projection DINOv3 layout (q_proj/k_proj/v_proj), with a zero k_proj.bias: loads and matches."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in to_canonical(dinov3_s.meta_state).state_dict.items()}
    state.update({f"blocks.{i}.attn.k_proj.bias": torch.zeros(384) for i in range(12)})
    path = tmp_path / "timm_split.safetensors"
    save_file(state, str(path))
    bb, feats = _features(path, dinov3_s)
    assert bb.load_report.layout == "timm DINOv3"
    _assert_maps_close(feats, references("dinov3_s"), "timm split layout vs Hugging Face reference")


def test_lone_state_dict_wrapper_is_unwrapped_and_logged(dinov3_s, references, tmp_path, caplog):
    """A28: {'state_dict': sd} holds nothing but the weights: they are loaded from there (logged), exactly."""
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": dinov3_s.meta_state}, path)
    with caplog.at_level(logging.INFO, logger="nnunet_dino"):
        bb, feats = _features(path, dinov3_s)
    assert any("nested under 'state_dict'" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    assert bb.load_report.layout == "Meta DINOv3"
    _assert_maps_close(feats, references("dinov3_s"), "{'state_dict': ...} vs Hugging Face reference")


def test_rope_periods_are_those_the_built_model_computes():
    """A24: the periods files are checked against (vit_factory.rope_periods) are the timm model's own."""
    arch = get_architecture("dinov3_vits16")
    bb = DinoBackbone(arch)
    torch.testing.assert_close(rope_periods(arch), bb.vit.rope.periods, rtol=0, atol=0)
