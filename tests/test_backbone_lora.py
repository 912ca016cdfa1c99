"""LoRA on the DINO backbone: live on every targeted projection, trains only itself, survives checkpoints, merges."""
from __future__ import annotations

import copy
import io
import re

import pytest
import torch
import torch.nn as nn

from conftest import input_image
from nnunet_dino.backbone import (DinoBackbone, LoraSettings, WeightFileError, apply_lora, get_architecture,
                                  load_backbone, load_weights_into, lora_parameters, merge_lora)

SETTINGS = LoraSettings()  # rank 8, alpha 16, dropout 0.05, attention projections


@pytest.fixture(scope="module")
def bases(dinov3_s, dinov2_s, dinov3_splus):
    """Pretrained (synthetic) backbones, loaded once; tests deep-copy them before wrapping."""
    return {
        "dinov3": (load_backbone(weights=dinov3_s.files["meta"]), dinov3_s),
        "dinov2": (load_backbone(weights=dinov2_s.files["hf"]), dinov2_s),
        "dinov3_swiglu": (load_backbone(weights=dinov3_splus.files["meta"]), dinov3_splus),
    }


def _feats(bb, ws):
    with torch.no_grad():
        return bb.patch_features(input_image(ws.input_hw, seed=11), layers=[0, bb.arch.depth - 1])


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _wrapped(bases, family, settings=SETTINGS):
    base, ws = bases[family]
    return apply_lora(copy.deepcopy(base), settings), base, ws


def _set_lora_b(bb, name_regex=r".*", seed=0, std=0.05):
    """Give the matching lora_B matrices random values (peft initialises them to zero)."""
    g = torch.Generator().manual_seed(seed)
    hit = []
    with torch.no_grad():
        for name, p in bb.vit.named_parameters():
            if "lora_B" in name and re.search(name_regex, name):
                p.copy_(torch.randn(p.shape, generator=g) * std)
                hit.append(name)
    assert hit, name_regex
    return hit


# ---------------------------------------------------------------------------------------------- adapters are live
@pytest.mark.parametrize("family", ["dinov3", "dinov2"])
def test_lora_starts_as_identity_then_changes_outputs(family, bases):
    bb, base, ws = _wrapped(bases, family)
    ref = _feats(base, ws)
    assert _max_diff(_feats(bb, ws), ref) < 1e-6  # B = 0: a fresh adapter is the identity
    _set_lora_b(bb)
    assert _max_diff(_feats(bb, ws), ref) > 1e-2


TARGETS = [("dinov3", m) for m in ("q_proj", "k_proj", "v_proj", "proj")] + [("dinov2", m) for m in ("qkv", "proj")]


@pytest.mark.parametrize("family,module", TARGETS, ids=[f"{f}-{m}" for f, m in TARGETS])
def test_each_adapted_projection_is_used_in_the_forward_pass(family, module, bases):
    """Guards against LoRA being silently bypassed (e.g. timm's *_qkvb DINOv3 computes qkv with F.linear)."""
    bb, base, ws = _wrapped(bases, family)
    assert isinstance(bb.vit.blocks[0].attn.get_submodule(module).base_layer, nn.Linear)
    hit = _set_lora_b(bb, rf"^blocks\.0\.attn\.{module}\.lora_B")
    assert len(hit) == 1
    assert _max_diff(_feats(bb, ws), _feats(base, ws)) > 1e-3


def test_lora_targets_every_block(bases):
    for family, expected in (("dinov3", {"q_proj", "k_proj", "v_proj", "proj"}), ("dinov2", {"qkv", "proj"})):
        bb, _, _ = _wrapped(bases, family)
        adapted = {n.rsplit(".", 1)[0] for n, _ in bb.vit.named_modules() if n.endswith(".lora_A")}
        assert adapted == {f"blocks.{i}.attn.{m}" for i in range(bb.arch.depth) for m in expected}


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("family", ["dinov3", "dinov2"])
def test_only_lora_parameters_train(family, bases):
    bb, base, ws = _wrapped(bases, family)
    trainable = {n for n, p in bb.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert trainable == {n for n, p in bb.named_parameters() if "lora_" in n}
    assert len(list(lora_parameters(bb))) == len(trainable)
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    bb.train()  # as nnU-Net does; LoRA dropout active
    opt = torch.optim.SGD(bb.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01)
    loss = sum(f.pow(2).mean() for f in bb.patch_features(input_image(ws.input_hw, seed=12), layers=[5, 11]))
    loss.backward()
    opt.step()
    after = bb.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed), sorted(changed)[:5]
    bb.eval()
    assert _max_diff(_feats(bb, ws), _feats(base, ws)) > 1e-4


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("family", ["dinov3", "dinov2"])
def test_lora_state_survives_save_and_load(family, bases):
    """What nnU-Net does: torch.save(state_dict) in training; at prediction build_network_architecture rebuilds the
    same structure (no pretrained weights) and loads the checkpoint strictly."""
    bb, _, ws = _wrapped(bases, family)
    _set_lora_b(bb, seed=3)
    buf = io.BytesIO()
    torch.save(bb.state_dict(), buf)
    fresh = apply_lora(DinoBackbone(get_architecture(bb.arch.name)), SETTINGS)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    fresh.eval()
    for a, b in zip(_feats(bb, ws), _feats(fresh, ws)):
        assert torch.equal(a, b)
    other = apply_lora(DinoBackbone(get_architecture(bb.arch.name)), LoraSettings(rank=4))
    with pytest.raises(RuntimeError, match="size mismatch"):  # another LoRA structure does not fit the checkpoint
        other.load_state_dict(bb.state_dict(), strict=True)


@pytest.mark.parametrize("family", ["dinov3", "dinov2"])
def test_merge_lora_keeps_outputs_and_removes_adapters(family, bases):
    bb, base, ws = _wrapped(bases, family, LoraSettings(mlp=True))
    _set_lora_b(bb, seed=4)
    with_lora = _feats(bb, ws)
    assert _max_diff(with_lora, _feats(base, ws)) > 1e-2
    merge_lora(bb)
    assert _max_diff(_feats(bb, ws), with_lora) < 1e-5
    assert not any("lora_" in n for n, _ in bb.named_parameters())
    assert not any("lora" in type(m).__name__.lower() or "lora_" in n for n, m in bb.named_modules())
    assert set(bb.vit.state_dict()) == set(base.vit.state_dict())  # a plain backbone again (exportable)
    assert type(bb.vit.blocks[0].attn.proj) is nn.Linear


# ---------------------------------------------------------------------------------------------- MLP targets
@pytest.mark.parametrize("family,mlp_modules", [("dinov3", {"fc1", "fc2"}), ("dinov2", {"fc1", "fc2"}),
                                                ("dinov3_swiglu", {"fc1_g", "fc1_x", "fc2"})])
def test_mlp_lora_adapts_mlp_layers(family, mlp_modules, bases):
    bb, base, ws = _wrapped(bases, family, LoraSettings(mlp=True))
    adapted = {n for n, _ in bb.vit.named_modules() if n.endswith(".lora_A")}
    assert {n.split(".")[3] for n in adapted if ".mlp." in n} == mlp_modules
    assert any(".attn." in n for n in adapted)
    hit = _set_lora_b(bb, r"\.mlp\.", seed=5)
    assert len(hit) == len(mlp_modules) * bb.arch.depth
    assert _max_diff(_feats(bb, ws), _feats(base, ws)) > 1e-3

    mlp_only, _, _ = _wrapped(bases, family, LoraSettings(attention=False, mlp=True))
    adapted = {n for n, _ in mlp_only.vit.named_modules() if n.endswith(".lora_A")}
    assert adapted and all(".mlp." in n for n in adapted)


def test_lora_settings_are_validated():
    with pytest.raises(ValueError):
        LoraSettings(rank=0)
    with pytest.raises(ValueError):
        LoraSettings(attention=False, mlp=False)


# ---------------------------------------------------------------------------------------------- pretrained into LoRA
@pytest.mark.parametrize("family,fmt", [("dinov3", "meta"), ("dinov3", "timm_qkvb"), ("dinov2", "meta")])
def test_pretrained_weights_load_into_a_lora_wrapped_backbone(family, fmt, bases):
    """The trainer builds the LoRA-wrapped network first (build_network_architecture) and loads DINO weights into
    it: base weights land in the wrapped layers' base_layer, adapters are left alone."""
    base, ws = bases[family]
    bb = apply_lora(DinoBackbone(base.arch), SETTINGS)
    lora_b = _set_lora_b(bb, seed=6)
    lora_before = {n: p.clone() for n, p in bb.vit.named_parameters() if "lora_" in n}
    report = load_weights_into(bb, ws.files[fmt])
    assert report.arch == base.arch.name and not report.random_init
    assert all(torch.equal(lora_before[n], p) for n, p in bb.vit.named_parameters() if "lora_" in n)
    base_sd = base.vit.state_dict()
    for name, value in bb.vit.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(value, base_sd[name.replace(".base_layer.", ".")]), name
    with torch.no_grad():  # with the adapters zeroed it is exactly the pretrained model
        for n, p in bb.vit.named_parameters():
            if n in lora_b:
                p.zero_()
    assert _max_diff(_feats(bb, ws), _feats(base, ws)) < 1e-6


def test_weights_of_another_architecture_do_not_load_into_a_lora_backbone(bases, dinov3_splus):
    bb = apply_lora(DinoBackbone(bases["dinov3"][0].arch), SETTINGS)
    with pytest.raises(WeightFileError, match="dinov3_vits16plus"):
        load_weights_into(bb, dinov3_splus.files["hf"])
