"""SegDINO v1 and v2 as nnU-Net builds and drives them: parameter counts of the published architectures, any patch
size and channel count, a backbone that is really frozen, deep-supervision outputs at exactly nnU-Net's target
shapes under nnU-Net's own loss, and strict checkpoint round trips through the trainers' build classmethod (what
nnUNetv2_predict calls). Randomly initialised ViT-S: the structure, not the weights, is under test.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_dino.networks.dino_taps import DinoEncoderConfig, paper_tap_layers
from nnunet_dino.networks.segdino import SegDINO, SegDINOConfig, build_segdino
from nnunet_dino.networks.segdino_v2 import SegDINOv2, SegDINOv2Config, build_segdino_v2
from nnunet_dino.backbone import get_architecture
from nnunet_dino.training import SegDINOTrainer, SegDINOv2Trainer
from nnunet_dino.training.segdino_trainer import SegDINOTrainerBase

HIPPO_STRIDES = [[1, 1], [2, 2], [2, 2], [2, 2]]  # nnU-Net's 2d plans for Hippocampus (patch 56x40)
FAST = dict(min_short_side_tokens=4)  # few tokens: fast structural tests on a CPU


def plans_for(patch, strides=HIPPO_STRIDES, schemes=("ZScoreNormalization",), labels=None, regions=None):
    """A minimal nnU-Net plans dict + dataset.json for one 2d configuration."""
    plans = {"dataset_name": "Dataset999_Synthetic", "plans_name": "nnUNetPlans",
             "configurations": {"2d": {"patch_size": list(patch), "normalization_schemes": list(schemes),
                                       "batch_dice": True,
                                       "architecture": {"arch_kwargs": {"strides": copy.deepcopy(strides)}}}}}
    dataset = {"labels": labels or {"background": 0, "a": 1, "b": 2}, "channel_names": {"0": "MRI"}}
    if regions is not None:
        dataset["regions_class_order"] = regions
    pm = PlansManager(plans)
    return pm, pm.get_configuration("2d"), dataset


def trainable(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def conv(cin: int, cout: int, k: int = 1, groups: int = 1) -> int:
    return cin // groups * cout * k * k + cout  # weight + bias


# ------------------------------------------------------------------------------------------ taps and configs
def test_taps_are_the_papers_blocks():
    assert paper_tap_layers(get_architecture("dinov3_vits16")) == (2, 5, 8, 11)
    assert paper_tap_layers(get_architecture("dinov3_vitb16")) == (2, 5, 8, 11)
    assert paper_tap_layers(get_architecture("dinov3_vitl16")) == (4, 11, 17, 23)
    assert SegDINOConfig(dino_arch="dinov3_vitl16").layers(get_architecture("dinov3_vitl16")) == (4, 11, 17, 23)


@pytest.mark.parametrize("bad, message", [
    (dict(tuning="half"), "tuning must be one of"),
    (dict(tap_layers=(2, 5, 8, 12)), "out of range"),
    (dict(tap_layers=(2, 5, 11)), "exactly 4"),
    (dict(head_stride=8), "head_stride must be one of"),
    (dict(dino_arch="dinov3_vitz16"), "Unknown DINO architecture"),
])
def test_bad_configurations_fail_at_once(bad, message):
    with pytest.raises(ValueError, match=message):
        SegDINOConfig(**bad)


# ------------------------------------------------------------------------------------------ parameter counts
def expected_segdino_params(embed: int, widths, fused: int, classes: int, head_stride: int) -> int:
    """The paper's head: per tap 1x1 conv to its width and 3x3 conv to the fused width; 1x1 classifier on the
    concatenation; the H/4 head adds a stride-4 transposed conv (kernel 4) on tap 1."""
    n = sum(conv(embed, w) + conv(w, fused, 3) for w in widths) + conv(len(widths) * fused, classes)
    if head_stride == 4:
        n += widths[0] * widths[0] * 16 + widths[0]
    return n


def expected_segdino_v2_params(embed: int, d: int, classes: int, aux_heads: int = 0) -> int:
    """TPA: 4 x (1x1 embed->d, 3x3 d->d); SAD: 8 residual blocks (dw 3x3, pw 1x1, GroupNorm affine, scalar gamma);
    1x1 head (+ one per auxiliary deep-supervision output level)."""
    tpa = 4 * (conv(embed, d) + conv(d, d, 3))
    block = conv(d, d, 3, groups=d) + conv(d, d) + 2 * d + 1
    return tpa + 8 * block + (1 + aux_heads) * conv(d, classes)


def test_segdino_v1_trainable_parameters_match_the_paper():
    net = build_segdino(SegDINOConfig(**FAST), 1, 2, (64, 64), None)
    expected = expected_segdino_params(384, (96, 192, 384, 768), 128, 2, 16)
    assert trainable(net) == expected
    assert abs(expected - 2.2e6) / 2.2e6 < 0.02  # "~2.2M trainable parameters for ViT-S"
    backbone = sum(p.numel() for p in net.encoder.backbone.parameters())
    assert 21e6 < backbone < 22.5e6  # ViT-S/16 (21.6M), none of it trainable
    fine = build_segdino(SegDINOConfig(head_stride=4, **FAST), 1, 2, (64, 64), None)
    assert trainable(fine) == expected_segdino_params(384, (96, 192, 384, 768), 128, 2, 4)


def test_segdino_v2_trainable_parameters_match_the_paper():
    net = build_segdino_v2(SegDINOv2Config(**FAST), 1, 2, (64, 64), None)
    expected = expected_segdino_v2_params(384, 256, 2)
    assert trainable(net) == expected
    assert abs(expected - 3.3e6) / 3.3e6 < 0.02  # "d = 256 (~3.3M params)"
    ds = build_segdino_v2(SegDINOv2Config(deep_supervision=True, **FAST), 1, 2, (64, 64), None, HIPPO_STRIDES)
    # outputs at 1/2 and 1/4; the 1/4 one, which nnU-Net's loss weights 0, reuses the 1/2 output (no head of its own)
    assert trainable(ds) == expected_segdino_v2_params(384, 256, 2, aux_heads=1)


# ------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("patch", [(56, 40), (64, 96), (72, 100)])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_output_has_exactly_the_patch_size_for_any_patch_and_channel_count(patch, channels):
    torch.manual_seed(0)
    x = torch.randn(2, channels, *patch)
    for net in (build_segdino(SegDINOConfig(**FAST), channels, 3, patch, None),
                build_segdino(SegDINOConfig(head_stride=4, **FAST), channels, 3, patch, None),
                build_segdino_v2(SegDINOv2Config(**FAST), channels, 3, patch, None)):
        y = net(x)
        assert y.shape == (2, 3, *patch), type(net).__name__
        assert torch.isfinite(y).all()


def test_default_token_count_upsamples_small_patches_without_cropping():
    net = build_segdino(SegDINOConfig(), 1, 3, (56, 40), None)  # Hippocampus: 56x40 -> 358x256 -> 23x16 tokens
    assert min(net.encoder.token_hw) >= 16 and net.encoder.adapter.padded_hw[0] >= 358
    taps = net.encoder(torch.randn(1, 1, 56, 40))
    assert [t.shape for t in taps] == [(1, 384, *net.encoder.token_hw)] * 4


def test_tpa_builds_a_pyramid_at_half_to_one_sixteenth_and_sad_starts_as_identity():
    net = build_segdino_v2(SegDINOv2Config(**FAST), 1, 3, (64, 96), None)
    taps = net.encoder(torch.randn(1, 1, 64, 96))
    levels = net.token_pyramid(taps)
    assert [tuple(l.shape[-2:]) for l in levels] == [(32, 48), (16, 24), (8, 12), (4, 6)]  # H/2 ... H/16
    for blk in list(net.scale_aware_decoding.intra) + list(net.scale_aware_decoding.top_down):
        assert blk.gamma.item() == 0.0
        assert torch.equal(blk(levels[0]), levels[0])  # x + 0 * r
    decoded = net.scale_aware_decoding(levels)
    # with every gamma 0: x4 = l4, x_k = up(x_{k+1}) + l_k
    up = torch.nn.functional.interpolate(levels[3], size=levels[2].shape[-2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(decoded[2], up + levels[2])


def test_wrong_channel_count_or_patch_is_a_clear_error():
    net = build_segdino(SegDINOConfig(**FAST), 1, 3, (56, 40), None)
    with pytest.raises(ValueError, match=r"Expected a \(B, 1, 56, 40\) patch"):
        net(torch.randn(1, 3, 56, 40))
    with pytest.raises(ValueError, match=r"Expected a \(B, 1, 56, 40\) patch"):
        net(torch.randn(1, 1, 64, 40))


# ------------------------------------------------------------------------------------------ frozen backbone
def fake_trainer(network, epochs=10):
    return SimpleNamespace(network=network, lr_head=SegDINOTrainerBase.lr_head, lr_lora=SegDINOTrainerBase.lr_lora,
                           lr_backbone=SegDINOTrainerBase.lr_backbone,
                           weight_decay=SegDINOTrainerBase.adamw_weight_decay, num_epochs=epochs)


@pytest.mark.parametrize("builder", [
    lambda: build_segdino(SegDINOConfig(**FAST), 4, 3, (56, 40), None),
    lambda: build_segdino_v2(SegDINOv2Config(**FAST), 4, 3, (56, 40), None),
], ids=["v1", "v2"])
def test_frozen_backbone_is_really_frozen(builder):
    torch.manual_seed(0)
    net = builder().train()
    backbone = net.encoder.backbone
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not backbone.vit.training  # eval mode kept through .train()
    assert all(not m.training for m in backbone.vit.modules())
    # the ViT runs without autograd even inside a grad-enabled training step (no graph, no activation memory)
    grad_mode_in_vit = []
    backbone.vit.blocks[0].register_forward_pre_hook(lambda m, a: grad_mode_in_vit.append(torch.is_grad_enabled()))
    assert torch.is_grad_enabled()
    assert not any(t.requires_grad for t in net.encoder(torch.randn(1, 4, 56, 40)))
    assert grad_mode_in_vit == [False]
    x = torch.randn(2, 4, 56, 40)
    first, second = net(x), net(x)
    assert torch.equal(first, second)  # deterministic in train mode
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    optimizer, scheduler = SegDINOTrainerBase.configure_optimizers(fake_trainer(net))
    assert [g["name"] for g in optimizer.param_groups] == ["head"]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["lr"] == 1e-4
    for _ in range(2):
        optimizer.zero_grad()
        net(x).square().mean().backward()
        assert all(p.grad is None for p in backbone.parameters())
        assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
        optimizer.step()
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(net(x), first)  # the head did train


def test_full_fine_tuning_trains_the_backbone_and_lora_only_its_adapters():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 56, 40)
    full = build_segdino(SegDINOConfig(tuning="full", **FAST), 4, 3, (56, 40), None).train()
    assert full.encoder.backbone.vit.training
    grad_mode_in_vit = []
    first_block = full.encoder.backbone.vit.blocks[0]
    first_block.register_forward_pre_hook(lambda m, a: grad_mode_in_vit.append(torch.is_grad_enabled()))
    full(x).square().mean().backward()
    assert grad_mode_in_vit == [True]
    assert all(p.grad is not None for p in full.encoder.backbone.vit.blocks[0].parameters())
    assert full.encoder.adapter.channel_projection.weight.grad is not None
    optimizer, _ = SegDINOTrainerBase.configure_optimizers(fake_trainer(full))
    assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == [("head", 1e-4), ("backbone", 1e-5)]

    lora = build_segdino_v2(SegDINOv2Config(tuning="lora", **FAST), 4, 3, (56, 40), None).train()
    names = [n for n, p in lora.encoder.backbone.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    lora(x).square().mean().backward()
    assert all(p.grad is not None for n, p in lora.named_parameters() if "lora_" in n)
    assert any(p.grad.abs().sum() > 0 for n, p in lora.named_parameters() if "lora_B" in n)  # B starts at 0, A not
    assert lora.encoder.adapter.channel_projection.weight.requires_grad
    optimizer, _ = SegDINOTrainerBase.configure_optimizers(fake_trainer(lora))
    assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == [("head", 1e-4), ("lora", 5e-4)]
    n_lora = sum(p.numel() for p in optimizer.param_groups[1]["params"])
    assert n_lora == sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)


def test_poly_schedule_decays_every_group_from_its_own_rate():
    net = build_segdino(SegDINOConfig(tuning="full", **FAST), 1, 3, (56, 40), None)
    optimizer, scheduler = SegDINOTrainerBase.configure_optimizers(fake_trainer(net, epochs=10))
    scheduler.step(5)
    factor = (1 - 5 / 10) ** 0.9
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-4 * factor, 1e-5 * factor])


# ------------------------------------------------------------------------------------------ deep supervision
def nnunet_ds_targets(cm, seg: torch.Tensor) -> list[torch.Tensor]:
    """nnU-Net's own deep-supervision targets for a (1, H, W) segmentation: its trainer's scales and transform."""
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    scales = nnUNetTrainer._get_deep_supervision_scales(
        SimpleNamespace(enable_deep_supervision=True, configuration_manager=cm))
    return DownsampleSegForDSTransform(ds_scales=scales)(segmentation=seg)["segmentation"]


def nnunet_loss(pm, cm, dataset, deep_supervision: bool):
    """nnU-Net's own _build_loss (Dice+CE or Dice+BCE, DeepSupervisionWrapper with its weights)."""
    label_manager = pm.get_label_manager(dataset)
    fake = SimpleNamespace(label_manager=label_manager, configuration_manager=cm, is_ddp=False,
                           enable_deep_supervision=deep_supervision, _do_i_compile=lambda: False)
    fake._get_deep_supervision_scales = lambda: nnUNetTrainer._get_deep_supervision_scales(fake)
    return nnUNetTrainer._build_loss(fake), label_manager


@pytest.mark.parametrize("patch, strides", [
    ((56, 40), HIPPO_STRIDES),  # 3 outputs: 1, 1/2, 1/4
    ((128, 96), [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2], [2, 2], [2, 1]]),  # 6 outputs, anisotropic last pool
    ((80, 44), [[1, 1], [2, 2], [2, 2], [2, 1]]),  # 44 * 1/4 = 11
])
def test_deep_supervision_outputs_match_nnunet_targets_and_loss(patch, strides):
    pm, cm, dataset = plans_for(patch, strides)
    torch.manual_seed(0)
    net = SegDINOv2DSFast.build_network_architecture(pm, cm, 1, 3, enable_deep_supervision=True)
    seg = torch.randint(0, 3, (1, *patch)).float()
    targets = nnunet_ds_targets(cm, seg)
    outputs = net(torch.randn(2, 1, *patch))
    assert [tuple(o.shape) for o in outputs] == [(2, 3, *t.shape[-2:]) for t in targets]
    loss, _ = nnunet_loss(pm, cm, dataset, deep_supervision=True)
    assert type(loss).__name__ == "DeepSupervisionWrapper" and len(loss.weight_factors) == len(outputs)
    batch_targets = [torch.stack([t, t]) for t in targets]
    value = loss(outputs, batch_targets)
    assert torch.isfinite(value)
    value.backward()
    # every auxiliary head that nnU-Net's weights use (the coarsest output has weight 0) gets a gradient
    used_levels = {min(k, len(net.aux_heads)) for k, w in enumerate(loss.weight_factors) if k and w > 0}
    for level in used_levels:
        assert net.aux_heads[level - 1].weight.grad is not None
    # the predictor's build: single full-resolution output, same structure
    single = SegDINOv2DSFast.build_network_architecture(pm, cm, 1, 3, enable_deep_supervision=False)
    assert single(torch.randn(1, 1, *patch)).shape == (1, 3, *patch)


def test_deep_supervision_switch_and_clear_errors():
    pm, cm, _ = plans_for((56, 40))
    v1 = SegDINOFast.build_network_architecture(pm, cm, 1, 3, enable_deep_supervision=True)
    assert isinstance(v1, SegDINO) and not v1.deep_supervision  # v1 has a single output whatever is asked
    with pytest.raises(ValueError, match="cannot do deep supervision"):
        v1.deep_supervision = True
    v2 = SegDINOv2Fast.build_network_architecture(pm, cm, 1, 3, enable_deep_supervision=True)
    assert not v2.deep_supervision
    with pytest.raises(ValueError, match="built without deep-supervision heads"):
        v2.deep_supervision = True
    ds = SegDINOv2DSFast.build_network_architecture(pm, cm, 1, 3, enable_deep_supervision=True)
    assert isinstance(ds(torch.randn(1, 1, 56, 40)), list)
    # what the trainers' set_deep_supervision_enabled does around nnU-Net's final validation
    for trainer_cls, net, expected in ((SegDINOFast, v1, False), (SegDINOv2DSFast, ds, True)):
        fake = SimpleNamespace(network=net, enable_deep_supervision=trainer_cls.network_has_deep_supervision())
        SegDINOTrainerBase.set_deep_supervision_enabled(fake, False)
        assert net.deep_supervision is False
        SegDINOTrainerBase.set_deep_supervision_enabled(fake, True)
        assert net.deep_supervision is expected


def test_regions_use_one_output_per_region_with_nnunets_bce_dice():
    pm, cm, dataset = plans_for((56, 40), labels={"background": 0, "whole": [1, 2], "core": 2}, regions=[1, 2])
    loss, label_manager = nnunet_loss(pm, cm, dataset, deep_supervision=False)
    assert label_manager.has_regions and label_manager.num_segmentation_heads == 2
    net = SegDINOFast.build_network_architecture(pm, cm, 1, label_manager.num_segmentation_heads, False)
    seg = torch.randint(0, 3, (2, 1, 56, 40))
    target = torch.cat([(seg >= 1), (seg == 2)], 1).float()
    value = loss(net(torch.randn(2, 1, 56, 40)), target)
    assert type(loss).__name__ == "DC_and_BCE_loss" and torch.isfinite(value)


# ------------------------------------------------------------------------------------------ checkpoint round trip
class SegDINOFast(SegDINOTrainer):
    segdino = replace(SegDINOTrainer.segdino, **FAST)


class SegDINOv2Fast(SegDINOv2Trainer):
    segdino_v2 = replace(SegDINOv2Trainer.segdino_v2, **FAST)


class SegDINOv2DSFast(SegDINOv2Trainer):
    segdino_v2 = replace(SegDINOv2Trainer.segdino_v2, deep_supervision=True, **FAST)


class SegDINOLoraFast(SegDINOTrainer):
    segdino = replace(SegDINOTrainer.segdino, tuning="lora", head_stride=4, **FAST)


def randomize(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return net


@pytest.mark.parametrize("trainer_cls", [SegDINOFast, SegDINOv2Fast, SegDINOv2DSFast, SegDINOLoraFast])
def test_checkpoint_round_trip_through_the_build_classmethod_is_strict_and_exact(trainer_cls):
    pm, cm, _ = plans_for((56, 40))
    trained = randomize(trainer_cls.build_network_architecture(pm, cm, 1, 3, True), seed=1).eval()
    rebuilt = trainer_cls.build_network_architecture(pm, cm, 1, 3, enable_deep_supervision=False)
    result = rebuilt.load_state_dict(trained.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    rebuilt.eval()
    if isinstance(trained, SegDINOv2) and trained.supports_deep_supervision:
        trained.deep_supervision = False
    x = torch.randn(1, 1, 56, 40)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), trained(x))


def test_every_deep_supervision_head_is_trained_by_a_weighted_output():
    """No parameter outside the loss (DDP without find_unused_parameters fails on one): the coarsest output, which
    nnU-Net weights 0, has no head of its own and is the previous output resized."""
    pm, cm, dataset = plans_for((56, 40))
    net = SegDINOv2DSFast.build_network_architecture(pm, cm, 1, 3, enable_deep_supervision=True)
    randomize(net, seed=3)
    outputs = net(torch.randn(2, 1, 56, 40))
    assert len(outputs) == 3 and len(net.aux_heads) == 1
    expected = torch.nn.functional.interpolate(outputs[1], size=outputs[2].shape[-2:], mode="bilinear",
                                               align_corners=False)
    assert torch.equal(outputs[2], expected)
    loss, _ = nnunet_loss(pm, cm, dataset, deep_supervision=True)
    assert loss.weight_factors[-1] == 0
    targets = [torch.stack([t, t]) for t in nnunet_ds_targets(cm, torch.randint(0, 3, (1, 56, 40)).float())]
    loss(outputs, targets).backward()
    untrained = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert untrained == [], untrained


def test_an_older_deep_supervision_checkpoint_with_the_untrained_head_still_predicts(capsys):
    pm, cm, _ = plans_for((56, 40))
    trained = randomize(SegDINOv2DSFast.build_network_architecture(pm, cm, 1, 3, False), seed=4).eval()
    older = dict(trained.state_dict())
    older["aux_heads.1.weight"] = torch.randn_like(older["aux_heads.0.weight"])  # what versions before wrote
    older["aux_heads.1.bias"] = torch.randn_like(older["aux_heads.0.bias"])
    rebuilt = SegDINOv2DSFast.build_network_architecture(pm, cm, 1, 3, enable_deep_supervision=False)
    rebuilt.load_state_dict(older, strict=True)
    assert rebuilt.dropped_untrained_head and "dropped aux_heads.1.weight, aux_heads.1.bias" in capsys.readouterr().out
    x = torch.randn(1, 1, 56, 40)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), trained(x))
    older["aux_heads.2.weight"] = older["aux_heads.1.weight"]  # anything else unexpected is still refused
    with pytest.raises(RuntimeError, match="aux_heads.2.weight"):
        SegDINOv2DSFast.build_network_architecture(pm, cm, 1, 3, False).load_state_dict(older, strict=True)


def test_structures_differ_so_strict_loading_catches_a_wrong_variant():
    pm, cm, _ = plans_for((56, 40))
    ds = SegDINOv2DSFast.build_network_architecture(pm, cm, 1, 3, False)
    plain = SegDINOv2Fast.build_network_architecture(pm, cm, 1, 3, False)
    with pytest.raises(RuntimeError, match="aux_heads"):
        plain.load_state_dict(ds.state_dict())


def test_the_registered_trainers_are_what_nnunet_finds():
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    for name, base, check in [
        ("nnUNetTrainerSegDINO", SegDINOTrainer, lambda c: c.segdino == SegDINOConfig()),
        ("nnUNetTrainerSegDINO_quarterResHead", SegDINOTrainer, lambda c: c.segdino.head_stride == 4),
        ("nnUNetTrainerSegDINO_CPUSmoke", SegDINOTrainer, lambda c: c.epochs == 2 and not c.mirroring),
        ("nnUNetTrainerSegDINO_vitl", SegDINOTrainer, lambda c: c.segdino.dino_arch == "dinov3_vitl16"),
        ("nnUNetTrainerSegDINOv2", SegDINOv2Trainer, lambda c: c.segdino_v2 == SegDINOv2Config()),
        ("nnUNetTrainerSegDINOv2_deepSupervision", SegDINOv2Trainer,
         lambda c: c.network_has_deep_supervision()),
        ("nnUNetTrainerSegDINOv2_lora", SegDINOv2Trainer, lambda c: c.segdino_v2.tuning == "lora"),
        ("nnUNetTrainerSegDINOv2_fullFT", SegDINOv2Trainer, lambda c: c.segdino_v2.tuning == "full"),
    ]:
        cls = recursive_find_trainer_class_by_name(name)
        assert cls.__name__ == name and issubclass(cls, base) and check(cls), name
    assert SegDINOv2Config().width == 256 and isinstance(SegDINOv2Config(), DinoEncoderConfig)
