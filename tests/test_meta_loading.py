"""``load_backbone`` builds the ViT on the meta device and assigns the file's tensors, instead of initialising a ViT
at random and copying over it (and, for DINOv2, building a second random ViT only for timm's key filter). The
result must be what the former path gives, bit for bit, in every layout, with nothing left on meta; loading stays
strict; networks nnU-Net builds (and the random-weights path) are fully materialised on the CPU as before.
"""
from __future__ import annotations

import pytest
import torch

from conftest import input_image
from nnunet_dino.backbone import (DinoBackbone, LoraSettings, WeightFileError, apply_lora, get_architecture,
                                  load_backbone, load_weights_into, to_canonical, read_weights)
from nnunet_dino.backbone import model as model_module
from nnunet_dino.backbone import vit_factory

CASES = [("dinov3_s", "meta"), ("dinov3_s", "hf"), ("dinov3_s", "timm_qkvb"), ("dinov3_s_nobias", "timm"),
         ("dinov3_splus", "meta"), ("dinov2_s", "meta"), ("dinov2_s", "hf"), ("dinov2_s", "timm"),
         ("dinov2_s_reg", "meta"), ("meddinov3_b", "meddinov3")]


def materialised_load(arch: str, path) -> DinoBackbone:
    """The former path: a ViT built (and randomly initialised) on the CPU, the weights copied into it."""
    backbone = DinoBackbone(get_architecture(arch))
    load_weights_into(backbone, path)
    return backbone


def all_tensors(bb: DinoBackbone) -> dict:
    return {**dict(bb.vit.named_parameters()), **{f"buffer:{k}": v for k, v in bb.vit.named_buffers()}}


@pytest.mark.parametrize("fixture, fmt", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_meta_built_load_equals_the_former_load_bit_for_bit(request, fixture, fmt):
    ws = request.getfixturevalue(fixture)
    loaded = load_backbone(weights=ws.files[fmt])
    reference = materialised_load(ws.arch, ws.files[fmt])
    assert loaded.meta_tensors() == []
    ours, theirs = all_tensors(loaded), all_tensors(reference)
    assert list(ours) == list(theirs)  # parameters and buffers (incl. DINOv3's non-persistent RoPE periods)
    for k, v in ours.items():
        ref = theirs[k]
        assert v.device.type == "cpu" and v.dtype == ref.dtype and v.shape == ref.shape, k
        assert torch.equal(v, ref), k
        assert v.is_contiguous() and v.requires_grad == ref.requires_grad, k
    # every parameter owns its storage, as after a copy (no aliasing of views split from one fused tensor)
    storages = [p.untyped_storage() for p in loaded.vit.parameters()]
    assert len({s.data_ptr() for s in storages}) == len(storages)
    assert all(s.nbytes() == p.numel() * p.element_size() for s, p in zip(storages, loaded.vit.parameters()))
    x = input_image(ws.input_hw, seed=3, batch=1)
    with torch.no_grad():
        for a, b in zip(loaded.eval().patch_features(x), reference.eval().patch_features(x)):
            assert torch.equal(a, b)


def test_no_vit_is_materialised_while_loading(monkeypatch, dinov2_s, dinov3_s):
    """DINOv2 used to build two random ViTs per load (one only for timm's filter), DINOv3 one."""
    devices = []
    original = vit_factory.create_vit

    def recording(arch, drop_path_rate=0.0, device=None):
        devices.append(device)
        return original(arch, drop_path_rate, device)

    monkeypatch.setattr(vit_factory, "create_vit", recording)  # formats imports it from here at call time
    monkeypatch.setattr(model_module, "create_vit", recording)
    load_backbone(weights=dinov2_s.files["meta"])
    load_backbone(weights=dinov3_s.files["hf"])
    assert devices == ["meta", "meta", "meta"]


def test_meta_built_backbone_with_lora_refuses_to_stay_half_empty(dinov3_s):
    """Weights never hold LoRA tensors: on a meta-built, LoRA-wrapped ViT they would stay without values."""
    bb = apply_lora(DinoBackbone(get_architecture("dinov3_vits16"), device="meta"), LoraSettings())
    state, config, resolved = read_weights(dinov3_s.files["hf"])
    with pytest.raises(RuntimeError, match=r"no values after loading.*lora_"):
        bb.load_canonical(to_canonical(state, config, source=resolved))


def test_loading_stays_strict_on_a_meta_built_vit(dinov3_s):
    state, config, resolved = read_weights(dinov3_s.files["hf"])
    canonical = to_canonical(state, config, source=resolved)
    del canonical.state_dict["blocks.3.mlp.fc1.weight"]
    with pytest.raises(WeightFileError, match="missing.*blocks.3.mlp.fc1.weight"):
        DinoBackbone(get_architecture("dinov3_vits16"), device="meta").load_canonical(canonical)
    canonical = to_canonical(*read_weights(dinov3_s.files["hf"])[:2])
    canonical.state_dict["norm.weight"] = canonical.state_dict["norm.weight"][:10]
    with pytest.raises(WeightFileError, match="do not have the shapes"):
        DinoBackbone(get_architecture("dinov3_vits16"), device="meta").load_canonical(canonical)


def test_bf16_weights_become_float32_parameters_as_before(tmp_path, dinov3_s):
    state, _, _ = read_weights(dinov3_s.files["meta"])
    path = tmp_path / "bf16_weights.pth"
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, path)
    loaded, reference = load_backbone(weights=path), materialised_load("dinov3_vits16", path)
    assert all(p.dtype == torch.float32 for p in loaded.vit.parameters())
    assert all(torch.equal(a, b) for a, b in zip(loaded.vit.state_dict().values(), reference.vit.state_dict().values()))


def test_networks_nnunet_builds_and_random_weights_are_materialised():
    """build_network_architecture (trainers and nnUNetv2_predict) overwrite the backbone afterwards with weights or a
    checkpoint: its parameters must be real CPU tensors. The random-weights path initialises every one of them."""
    from nnunet_dino.networks.segdino import SegDINOConfig, build_segdino

    net = build_segdino(SegDINOConfig(min_short_side_tokens=4), 1, 3, (64, 64), None)
    assert net.encoder.backbone.meta_tensors() == []
    assert not any(t.is_meta for t in [*net.parameters(), *net.buffers()])
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        random = load_backbone("dinov2_vits14", random_init=True)
    assert random.meta_tensors() == [] and all(torch.isfinite(p).all() for p in random.vit.parameters())
