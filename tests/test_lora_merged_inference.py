"""LoRA at inference runs merged (one Linear with a cached W + s B A) without changing what is saved or trained:
outputs equal peft's unmerged path within float rounding, the state dict is bit-for-bit the same before and after
inference, the cache follows every change of the weights (optimiser steps, a predictor loading another fold's
checkpoint, assignment), and training, autograd and torch.compile keep peft's own forward.

Random realistic-scale ViT-S weights and random lora_B (peft starts B at 0, which would make both paths trivially
equal); 2x3 tokens: cheap.
"""
from __future__ import annotations

import copy
import io
import re

import pytest
import torch

from conftest import input_image
from nnunet_dino.backbone import (DinoBackbone, LoraSettings, apply_lora, get_architecture, init_random_dino_weights_,
                                  lora_parameters)
from nnunet_dino.backbone.lora import EvalMergedLoraLinear

HW = {"dinov3_vits16": (32, 48), "dinov2_vits14": (28, 42)}
TOL = dict(rtol=1e-5, atol=1e-5)  # float32 rounding of (W + sBA)x against Wx + s B(Ax), through 12 blocks


def lora_backbone(arch="dinov3_vits16", settings=LoraSettings(), seed=0) -> DinoBackbone:
    torch.manual_seed(seed)
    bb = apply_lora(init_random_dino_weights_(DinoBackbone(get_architecture(arch))), settings)
    set_lora_b_(bb, seed + 100)
    return bb


def set_lora_b_(bb, seed, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in bb.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def features(bb, x):
    return bb.patch_features(x, [0, 5, bb.arch.depth - 1])


def unmerged(bb, x, monkeypatch):
    """peft's own forward, with the merged path switched off."""
    with monkeypatch.context() as m:
        m.setattr(EvalMergedLoraLinear, "_merged_inference_applies", lambda self, args, kwargs: False)
        with torch.no_grad():
            return features(bb, x)


def lora_a_calls(bb):
    """Counts calls of peft's LoRA A projections: none on the merged path."""
    calls = []
    for name, module in bb.vit.named_modules():
        if re.search(r"lora_A\.default$", name):
            module.register_forward_hook(lambda m, a, o: calls.append(1))
    return calls


def snapshot(module):
    return {k: (v.clone(), v._version, v.dtype) for k, v in module.state_dict().items()}


def assert_bit_identical(before, module):
    after = module.state_dict()
    assert list(after) == list(before)
    for k, v in after.items():
        value, version, dtype = before[k]
        assert v.dtype == dtype and torch.equal(v, value) and v._version == version, k


# ---------------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("arch, settings", [("dinov3_vits16", LoraSettings()), ("dinov2_vits14", LoraSettings()),
                                            ("dinov3_vits16", LoraSettings(mlp=True))],
                         ids=["dinov3-attn", "dinov2-attn", "dinov3-attn+mlp"])
def test_merged_inference_equals_peft_and_skips_the_adapter_matmuls(arch, settings, monkeypatch):
    bb = lora_backbone(arch, settings).eval()
    x = input_image(HW[arch], seed=1)
    reference = unmerged(bb, x, monkeypatch)
    calls = lora_a_calls(bb)
    with torch.no_grad():
        merged = features(bb, x)
    assert not calls  # no adapter matmul ran: every adapted layer took the merged path
    with torch.inference_mode():
        in_inference_mode = features(bb, x)
    assert not calls
    for a, b, c in zip(merged, reference, in_inference_mode):
        torch.testing.assert_close(a, b, **TOL)
        assert torch.equal(a, c)
    # the adapters matter here, so equality is not trivial
    plain = copy.deepcopy(bb)
    set_lora_b_(plain, 0, std=0.0)
    with torch.no_grad():
        assert (features(plain, x)[-1] - merged[-1]).abs().max() > 1e-2


def test_state_dict_is_bit_stable_through_inference():
    bb = lora_backbone().eval()
    before = snapshot(bb)
    x = input_image(HW["dinov3_vits16"], seed=2)
    with torch.no_grad():
        features(bb, x)
        features(bb, x)
    assert_bit_identical(before, bb)
    assert not any("merged" in k for k in bb.state_dict())
    buffer = io.BytesIO()
    torch.save(bb.state_dict(), buffer)  # what nnU-Net saves right after validation, still in eval mode
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert all(torch.equal(saved[k], v[0]) for k, v in before.items())


# ---------------------------------------------------------------------------------------------- cache validity
def test_cache_follows_training_steps(monkeypatch):
    """nnU-Net's loop: train steps, then validation in eval mode, then training again."""
    bb = lora_backbone()
    x = input_image(HW["dinov3_vits16"], seed=3)
    optimizer = torch.optim.AdamW(lora_parameters(bb), lr=1e-2)
    for _ in range(2):
        bb.train()
        optimizer.zero_grad()
        features(bb, x)[-1].square().mean().backward()
        optimizer.step()
        bb.eval()
        with torch.no_grad():
            merged = features(bb, x)
        for a, b in zip(merged, unmerged(bb, x, monkeypatch)):
            torch.testing.assert_close(a, b, **TOL)
    layer = bb.vit.blocks[0].attn.q_proj
    assert isinstance(layer, EvalMergedLoraLinear) and layer._merged_cache is not None
    bb.train()
    assert layer._merged_cache is None  # the copy is freed for training


@pytest.mark.parametrize("assign", [False, True])
def test_cache_follows_a_predictor_loading_each_fold(assign, monkeypatch):
    """nnUNetPredictor loads one state dict per fold into the same network (copy_: in place); assign replaces the
    tensors. Either way the next inference must use the new weights, never a stale merged copy."""
    bb = lora_backbone(seed=0).eval()
    fold1 = lora_backbone(seed=1).state_dict()
    fresh = lora_backbone(seed=1).eval()
    x = input_image(HW["dinov3_vits16"], seed=4)
    with torch.no_grad():
        first = features(bb, x)
        bb.load_state_dict({k: v.clone() for k, v in fold1.items()}, strict=True, assign=assign)
        second = features(bb, x)
        expected = features(fresh, x)
    assert (first[-1] - second[-1]).abs().max() > 1e-2
    for a, b in zip(second, expected):
        assert torch.equal(a, b)
    for a, b in zip(second, unmerged(bb, x, monkeypatch)):
        torch.testing.assert_close(a, b, **TOL)


def test_cache_follows_in_place_edits_of_base_and_adapter_weights(monkeypatch):
    bb = lora_backbone().eval()
    x = input_image(HW["dinov3_vits16"], seed=5)
    layer = bb.vit.blocks[3].attn.v_proj
    for tensor in (layer.base_layer.weight, layer.lora_B["default"].weight, layer.lora_A["default"].weight):
        with torch.no_grad():
            before = features(bb, x)[-1]
            tensor.mul_(1.5)
            after = features(bb, x)[-1]
        assert (after - before).abs().max() > 1e-4
        torch.testing.assert_close(after, unmerged(bb, x, monkeypatch)[-1], **TOL)


# ---------------------------------------------------------------------------------------------- where peft's path stays
def test_training_and_autograd_keep_peft_forward():
    bb = lora_backbone()
    x = input_image(HW["dinov3_vits16"], seed=6)
    calls = lora_a_calls(bb)
    bb.train()
    with torch.no_grad():
        features(bb, x)  # train mode: LoRA dropout is active, no merged weight
    assert calls
    calls.clear()
    bb.eval()
    out = features(bb, x)[-1]  # eval but autograd on (e.g. a gradient-based probe): must reach the adapters
    assert calls
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in bb.named_parameters() if "lora_B" in n)


def test_compiled_code_keeps_peft_forward(monkeypatch):
    bb = lora_backbone().eval()
    calls = lora_a_calls(bb)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        features(bb, input_image(HW["dinov3_vits16"], seed=7))
    assert calls


def test_copies_rebuild_their_own_cache():
    bb = lora_backbone().eval()
    x = input_image(HW["dinov3_vits16"], seed=8)
    with torch.no_grad():
        reference = features(bb, x)
        clone = copy.deepcopy(bb)
        assert clone.vit.blocks[0].attn.q_proj._merged_cache is None
        set_lora_b_(clone, 5)
        changed = features(clone, x)
        again = features(bb, x)
    assert (changed[-1] - reference[-1]).abs().max() > 1e-2
    assert all(torch.equal(a, b) for a, b in zip(again, reference))
    buffer = io.BytesIO()
    torch.save(bb, buffer)  # whole-module pickling works (the cache is not pickled)
    assert buffer.tell() > 0


def test_every_lora_layer_is_the_eval_merged_one_with_peft_keys():
    bb = lora_backbone(settings=LoraSettings(mlp=True))
    layers = [m for m in bb.vit.modules() if type(m).__name__.endswith("Linear") and hasattr(m, "lora_A")]
    assert layers and all(type(m) is EvalMergedLoraLinear for m in layers)
    reference = DinoBackbone(get_architecture("dinov3_vits16"))
    from peft import LoraConfig, inject_adapter_in_model

    s = LoraSettings(mlp=True)
    inject_adapter_in_model(LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout,
                                       target_modules=s.target_regex("dinov3"), bias="none"), reference.vit)
    assert list(bb.vit.state_dict()) == list(reference.vit.state_dict())  # checkpoints of either load strictly
