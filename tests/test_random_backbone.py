"""A randomly initialised DINO backbone (``nnUNet_dino_weights=random``, ``load_backbone(random_init=True)``) is a real
network: its blocks, attention, RoPE and LoRA all change the features, so tests and demos on random weights exercise
them. timm's own initialisation (LayerScale 1e-5) fails each check below by orders of magnitude; the thresholds lie
between the two, measured on 2026-12-01 (ViT-S, 64x64 input, 1 thread):

| check | timm's init | init_random_dino_weights_ | threshold |
|---|---|---|---|
| shuffled patches, DINOv3 (relative change; RoPE) | 1.5e-7 | 0.30 (5e-7 with RoPE angles 0) | > 0.05 |
| shuffled patches, DINOv2 (position embedding) | 0.040 | 0.65 | > 0.2 |
| lora_B ~ N(0, 0.02): relative feature change | ~4e-7 | 0.12 | > 1e-2 |
| gradient norm reaching lora_B (MSE to a random target) | ~3e-7 | 0.15 | > 1e-2 |
| 8 Adam steps on LoRA towards another LoRA's output: loss | unchanged (1.7e-13) | 0.0157 -> 0.0027 | < 0.5x |
"""
from __future__ import annotations

import pytest
import torch

from nnunet_dino.backbone import (DinoBackbone, LoraSettings, apply_lora, get_architecture, init_random_dino_weights_,
                                  load_backbone)

HW = {"dinov3": (64, 64), "dinov2": (56, 56)}  # 4x4 tokens


def random_backbone(arch: str, seed: int = 0) -> DinoBackbone:
    torch.manual_seed(seed)
    return init_random_dino_weights_(DinoBackbone(get_architecture(arch))).eval()


def last_tokens(bb: DinoBackbone, x: torch.Tensor) -> torch.Tensor:
    """(B, C, h*w) last-block patch tokens after the final norm."""
    return bb.patch_features(x, [bb.arch.depth - 1])[0].flatten(2)


def relative_change(new: torch.Tensor, ref: torch.Tensor) -> float:
    return float((new - ref).norm() / ref.norm())


def image(hw, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, *hw, generator=torch.Generator().manual_seed(seed))


def permutation_change(bb: DinoBackbone) -> float:
    """How far the tokens of an image whose patches were shuffled are from the shuffled tokens of the image. A
    network without position information (patch embedding + near-identity blocks, or uniform attention) is
    permutation-equivariant and gives ~0; position-dependent, non-uniform attention gives O(1)."""
    hw, p = HW[bb.arch.family], bb.patch_size
    h, w = hw[0] // p, hw[1] // p
    x = image(hw, seed=1)
    perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(2))
    patches = x.unfold(2, p, p).unfold(3, p, p).reshape(1, 3, h * w, p, p)[:, :, perm]
    shuffled = patches.reshape(1, 3, h, w, p, p).permute(0, 1, 2, 4, 3, 5).reshape(x.shape)
    with torch.no_grad():
        return relative_change(last_tokens(bb, shuffled), last_tokens(bb, x)[:, :, perm])


def lora_backbone(arch: str) -> DinoBackbone:
    return apply_lora(random_backbone(arch), LoraSettings(dropout=0.0)).eval()


def lora_b(bb: DinoBackbone) -> list[torch.nn.Parameter]:
    return [p for n, p in bb.named_parameters() if "lora_B" in n]


@pytest.mark.parametrize("arch,gamma_names", [("dinov3_vits16", ("gamma_1", "gamma_2")),
                                              ("dinov2_vits14_reg", ("ls1.gamma", "ls2.gamma"))])
def test_layer_scale_is_order_one_and_everything_is_drawn(arch, gamma_names):
    timm_default = DinoBackbone(get_architecture(arch))
    bb = random_backbone(arch)
    gammas = [p.detach() for n, p in bb.vit.named_parameters() if n.endswith(gamma_names)]
    assert len(gammas) == 2 * bb.arch.depth
    assert all(0.5 <= float(g.min()) and float(g.max()) <= 1.5 and float(g.mean()) > 0.9 for g in gammas)
    # Every base tensor was redrawn: none keeps timm's value (LayerScale 1e-5, zero biases, unit norm gains, ...).
    before = dict(timm_default.vit.named_parameters())
    kept = [n for n, p in bb.vit.named_parameters() if torch.equal(p, before[n])]
    assert not kept


def test_attention_and_rope_shape_the_features():
    bb = random_backbone("dinov3_vits16")
    assert permutation_change(DinoBackbone(get_architecture("dinov3_vits16")).eval()) < 1e-4  # timm's init: inert
    assert permutation_change(bb) > 0.05
    # ... and it is RoPE that carries the position: with every rotation angle 0 the network is equivariant again.
    bb.vit.rope.periods.fill_(float("inf"))
    assert permutation_change(bb) < 1e-4


def test_dinov2_position_embedding_shapes_the_features():
    assert permutation_change(DinoBackbone(get_architecture("dinov2_vits14")).eval()) < 0.1  # timm's init: 0.042
    assert permutation_change(random_backbone("dinov2_vits14")) > 0.2


def test_same_seed_same_backbone_and_load_backbone_uses_it():
    a, b = random_backbone("dinov3_vits16", seed=7), random_backbone("dinov3_vits16", seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    torch.manual_seed(7)
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        loaded = load_backbone("dinov3_vits16", random_init=True)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), loaded.parameters()))


def test_init_leaves_lora_at_identity_and_redraws_base_layers():
    bb = apply_lora(DinoBackbone(get_architecture("dinov3_vits16")), LoraSettings(dropout=0.0))
    lora_a_before = {n: p.clone() for n, p in bb.named_parameters() if "lora_A" in n}
    q_before = bb.vit.blocks[0].attn.q_proj.base_layer.weight.clone()
    init_random_dino_weights_(bb)
    assert all(float(p.detach().abs().max()) == 0.0 for p in lora_b(bb))  # LoRA still starts as the identity
    assert all(torch.equal(p, lora_a_before[n]) for n, p in bb.named_parameters() if "lora_A" in n)
    q_after = bb.vit.blocks[0].attn.q_proj.base_layer.weight
    assert not torch.equal(q_after, q_before) and abs(float(q_after.std()) - 384 ** -0.5) < 0.005


def test_lora_changes_the_features_and_receives_a_real_gradient():
    bb = lora_backbone("dinov3_vits16")
    x = image(HW["dinov3"], seed=3, batch=2)
    with torch.no_grad():
        base = last_tokens(bb, x)
        g = torch.Generator().manual_seed(4)
        for p in lora_b(bb):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        adapted = last_tokens(bb, x)
        for p in lora_b(bb):
            p.zero_()
    assert relative_change(adapted, base) > 1e-2  # timm's init: 4e-7

    target = torch.randn(base.shape, generator=torch.Generator().manual_seed(5))
    ((last_tokens(bb, x) - target) ** 2).mean().backward()
    grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in lora_b(bb)))
    assert grad_norm > 1e-2  # timm's init: 3e-7


def test_a_few_adam_steps_on_lora_fit_a_reachable_target():
    """The target is the backbone itself under another LoRA (lora_B ~ N(0, 0.02)): reachable by training lora_B."""
    bb = lora_backbone("dinov3_vits16")
    x = image(HW["dinov3"], seed=6, batch=2)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in lora_b(bb):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        target = last_tokens(bb, x)
        for p in lora_b(bb):
            p.zero_()
    params = [p for n, p in bb.named_parameters() if "lora_" in n]
    optimizer = torch.optim.Adam(params, lr=2e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = ((last_tokens(bb, x) - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert min(float(p.detach().abs().mean()) for p in lora_b(bb)) > 1e-3  # every adapter moved off zero


def test_trainers_random_setting_gives_the_same_realistic_backbone(tmp_path):
    """DinoTrainerBase.load_dino_weights with nnUNet_dino_weights=random on a LoRA-wrapped backbone (as GuiDINO
    builds it); the trainer stands without nnU-Net's __init__ (plans, data), which this path does not use."""
    from nnunet_dino.training.dino_trainer_base import DinoTrainerBase

    class OneBackbone(DinoTrainerBase):
        def dino_backbones(self):
            return [self.backbone]

    trainer = object.__new__(OneBackbone)
    trainer.backbone = apply_lora(DinoBackbone(get_architecture("dinov3_vits16")), LoraSettings(dropout=0.0))
    trainer.dino_weights, trainer.output_folder = "random", str(tmp_path)
    trainer.print_to_log_file = lambda *args, **kwargs: None
    torch.manual_seed(7)
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        (report,) = trainer.load_dino_weights()
    assert report.random_init and (tmp_path / "dino_weights.json").is_file()
    expected = DinoBackbone(get_architecture("dinov3_vits16"))
    torch.manual_seed(7)
    init_random_dino_weights_(expected)  # the same draws: the init is the only consumer of the seeded RNG
    ours = {n.replace(".base_layer", ""): p for n, p in trainer.backbone.named_parameters() if "lora_" not in n}
    assert ours.keys() == dict(expected.named_parameters()).keys()
    assert all(torch.equal(ours[n], p) for n, p in expected.named_parameters())
    assert all(float(p.detach().abs().max()) == 0.0 for p in lora_b(trainer.backbone))
    assert permutation_change(trainer.backbone.eval()) > 0.05
