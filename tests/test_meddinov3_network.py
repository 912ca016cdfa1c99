"""MedDINOv3's network and trainer as nnU-Net builds and drives them: shapes at any patch size and channel count,
parameter counts against the paper's architecture, fine-tuning modes, drop path, optimiser groups and schedule,
no deep supervision, strict loading of the MedDINOv3 CT checkpoint, strict rebuild through the classmethod.

Built from the real plans of the bundled HippoTiny (``hippo_workspace``) with a randomly initialised ViT-B: the
structure, not the weights, is under test (except where the synthetic MedDINOv3 checkpoint is loaded).
"""
from __future__ import annotations

import copy
import os
import inspect
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from conftest import hf_reference
from nnunet_dino.networks.meddinov3 import MedDINOv3Network, TransposedConvDecoder
from nnunet_dino.training import MedDINOv3Trainer

EMBED, DEPTH, MLP = 768, 12, 3072


class FewTokens(MedDINOv3Trainer):
    """ViT-B without upsampling small patches: keeps the structural tests fast on a CPU."""
    meddinov3 = replace(MedDINOv3Trainer.meddinov3, min_short_side_tokens=1)


class FewTokensLoRA(FewTokens):
    meddinov3 = replace(FewTokens.meddinov3, finetune="lora")


class FewTokensFrozen(FewTokens):
    meddinov3 = replace(FewTokens.meddinov3, finetune="frozen")


@pytest.fixture(scope="module")
def plans(hippo_workspace) -> dict:
    return load_json(hippo_workspace["preprocessed"] / "nnUNetPlans.json")


@pytest.fixture(scope="module")
def dataset_json(hippo_workspace) -> dict:
    return load_json(hippo_workspace["preprocessed"] / "dataset.json")


def managers(plans: dict, patch=None, channels: int = 1):
    plans = copy.deepcopy(plans)
    cfg = plans["configurations"]["2d"]
    if patch is not None:
        cfg["patch_size"] = list(patch)
    cfg["normalization_schemes"] = ["ZScoreNormalization"] * channels
    cfg["use_mask_for_norm"] = [False] * channels
    pm = PlansManager(plans)
    return pm, pm.get_configuration("2d")


def build(plans, trainer=FewTokens, channels=1, outputs=3, patch=None, seed=0) -> MedDINOv3Network:
    pm, cm = managers(plans, patch, channels)
    torch.manual_seed(seed)
    return trainer.build_network_architecture(pm, cm, channels, outputs, False)


def make_trainer(cls, plans, dataset_json, tmp_path, monkeypatch, configuration="2d"):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    # Construction checks the weights setting (before nnU-Net writes into the fold folder); a test may override it.
    if not os.environ.get("nnUNet_dino_weights"):
        monkeypatch.setenv("nnUNet_dino_weights", "random")
    plans = dict(copy.deepcopy(plans), continue_training=False)  # nnU-Net 2.8 pops this from the plans dict
    return cls(plans, configuration, 0, dataset_json, torch.device("cpu"))


def count(params) -> int:
    return sum(p.numel() for p in params)


def vit_b_parameters() -> int:
    """DINOv3 ViT-B/16 as built here: Meta's layout with q/v biases (k has none), LayerScale, 4 registers."""
    embed = EMBED + 4 * EMBED + (3 * 16 * 16 * EMBED + EMBED)  # cls, registers, patch embedding
    block = (2 * EMBED  # norm1
             + 3 * EMBED * EMBED + 2 * EMBED  # q, k, v (+ q and v bias)
             + EMBED * EMBED + EMBED  # attention output projection
             + 2 * EMBED  # norm2
             + (EMBED * MLP + MLP) + (MLP * EMBED + EMBED)  # MLP
             + 2 * EMBED)  # LayerScale gammas
    return embed + DEPTH * block + 2 * EMBED  # + final norm


def decoder_parameters(in_channels: int, outputs: int, stages: int = 4) -> int:
    total, c = 0, in_channels
    for _ in range(stages):
        total += c * (c // 2) * 2 * 2 + c // 2  # ConvTranspose2d k2 s2 (+ bias)
        total += 2 * (c // 2)  # channel LayerNorm
        c //= 2
    return total + c * outputs + outputs  # 1x1 conv


# ---------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("patch", [(56, 40), (64, 96)])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_output_is_exactly_the_patch_for_any_size_and_channel_count(plans, patch, channels):
    net = build(plans, channels=channels, outputs=3, patch=patch).eval()
    x = torch.randn(2, channels, *patch)
    with torch.no_grad():
        out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, *patch)
    assert torch.isfinite(out).all()
    assert net.adapter.padded_hw[0] % 16 == 0 and net.adapter.padded_hw[1] % 16 == 0
    tokens = net.aggregated_tokens(x)
    assert tokens.shape == (2, 4 * EMBED, *net.adapter.token_hw)  # four taps of 768 channels at H/16
    assert (net.adapter.channel_projection is not None) == (channels == 4)


def test_small_patches_are_upsampled_to_the_configured_token_count(plans):
    net = build(plans, trainer=MedDINOv3Trainer, patch=(56, 40)).eval()  # default: short side spans 16 tokens
    assert net.adapter.token_hw == (23, 16)
    with torch.no_grad():
        assert net(torch.randn(1, 1, 56, 40)).shape == (1, 3, 56, 40)


def test_multi_scale_taps_are_blocks_2_5_8_11_after_the_final_norm(plans):
    net = build(plans).eval()
    assert net.layers == (2, 5, 8, 11)
    x = torch.randn(1, 1, 56, 40)
    with torch.no_grad():
        tokens = net.aggregated_tokens(x)
        vit = net.backbone.vit
        expected = vit.forward_intermediates(net.adapter(x), indices=[2, 5, 8, 11], norm=True, output_fmt="NCHW",
                                             intermediates_only=True)
    torch.testing.assert_close(tokens, torch.cat(expected, 1))
    # After the final norm: every token of every tap has ~zero mean over channels before the norm's affine.
    normed = (tokens.view(1, 4, EMBED, -1) - vit.norm.bias.view(1, 1, EMBED, 1)) / vit.norm.weight.view(1, 1, EMBED, 1)
    assert normed.mean(2).abs().max() < 1e-3


# ---------------------------------------------------------------------------------------------- parameters
def test_parameter_counts_match_the_paper_architecture(plans):
    net = build(plans, outputs=3)
    vit = count(net.backbone.parameters())
    assert vit == vit_b_parameters() == 85_659_648  # ViT-B/16: 85.7M
    decoder = count(net.decoder.parameters())
    assert decoder == decoder_parameters(4 * EMBED, 3) == 25_076_739
    assert net.decoder.channels == (3072, 1536, 768, 384, 192)
    stages = list(net.decoder.stages)
    assert len(stages) == 4
    assert all(isinstance(s[0], torch.nn.ConvTranspose2d) and s[0].stride == (2, 2) for s in stages)
    assert all(type(s[2]) is torch.nn.GELU for s in stages)
    assert net.decoder.head.kernel_size == (1, 1) and net.decoder.head.out_channels == 3
    # Full fine-tuning (the paper's default): everything trains.
    assert count(p for p in net.parameters() if p.requires_grad) == count(net.parameters()) == vit + decoder


def test_lora_variant_trains_only_lora_and_decoder(plans):
    net = build(plans, trainer=FewTokensLoRA, channels=4, outputs=3)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith(("decoder.", "adapter.")) for n in trainable)
    lora = [p for n, p in net.named_parameters() if "lora_" in n]
    # rank 8 on q, k, v and the output projection of each of the 12 blocks: 8 * (768 + 768) per projection
    assert count(lora) == DEPTH * 4 * 8 * (EMBED + EMBED)
    assert count(p for p in net.parameters() if p.requires_grad) == (
        count(lora) + decoder_parameters(4 * EMBED, 3) + 4 * 3)  # + the 4->3 channel projection
    base = count(p for n, p in net.backbone.named_parameters() if "lora_" not in n)
    assert base == vit_b_parameters()
    net.train()
    assert net.backbone.vit.training  # LoRA trains: drop path stays active
    out = net(torch.randn(2, 4, 56, 40))
    out.square().mean().backward()
    assert all(p.grad is None for n, p in net.backbone.named_parameters() if "lora_" not in n)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in net.named_parameters() if "lora_B" in n)


def test_frozen_variant_trains_only_the_decoder_and_is_deterministic(plans):
    net = build(plans, trainer=FewTokensFrozen).train()
    assert {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad} == {"decoder"}
    assert not net.backbone.vit.training
    x = torch.randn(1, 1, 56, 40)
    with torch.no_grad():
        torch.testing.assert_close(net.aggregated_tokens(x), net.aggregated_tokens(x), rtol=0, atol=0)


def test_drop_path_is_0_2_in_every_block_and_active_in_training(plans):
    net = build(plans)
    rates = [getattr(getattr(blk, name), "drop_prob", 0.0) for blk in net.backbone.vit.blocks
             for name in ("drop_path1", "drop_path2")]
    assert rates == [0.2] * 2 * DEPTH  # every block's attention and MLP branch, as the official DINOv3 ViT does
    x = torch.randn(2, 1, 56, 40)
    with torch.no_grad():
        net.train()
        torch.manual_seed(1)
        a = net.aggregated_tokens(x)
        torch.manual_seed(2)
        b = net.aggregated_tokens(x)
        net.eval()
        c, d = net.aggregated_tokens(x), net.aggregated_tokens(x)
    assert not torch.allclose(a, b)  # stochastic depth drops residual branches in training
    torch.testing.assert_close(c, d, rtol=0, atol=0)  # and never at inference


# ---------------------------------------------------------------------------------------------- trainer
def test_optimizer_has_decoder_and_vit_groups_with_linear_decay_to_zero(plans, dataset_json, tmp_path, monkeypatch):
    trainer = make_trainer(FewTokens, plans, dataset_json, tmp_path, monkeypatch)
    trainer.num_epochs = 10
    trainer.network = build(plans)
    optimizer, scheduler = trainer.configure_optimizers()
    assert type(optimizer) is torch.optim.AdamW
    groups = optimizer.param_groups
    assert [g["name"] for g in groups] == ["decoder", "vit"]
    assert [g["lr"] for g in groups] == [3e-4, 3e-5]
    assert all(g["weight_decay"] == 0.05 and g["betas"] == (0.9, 0.98) for g in groups)
    assert count(groups[0]["params"]) == count(trainer.network.decoder.parameters())
    assert count(groups[1]["params"]) == count(trainer.network.backbone.parameters())
    for epoch in range(10):  # nnU-Net steps the scheduler with the epoch at every epoch start
        scheduler.step(epoch)
        assert [g["lr"] for g in groups] == pytest.approx([3e-4 * (1 - epoch / 10), 3e-5 * (1 - epoch / 10)])
    scheduler.step(10)
    assert [g["lr"] for g in groups] == [0.0, 0.0]

    lora = make_trainer(FewTokensLoRA, plans, dataset_json, tmp_path / "lora", monkeypatch)
    lora.network = build(plans, trainer=FewTokensLoRA)
    optimizer, _ = lora.configure_optimizers()
    assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == [("decoder", 3e-4), ("lora", 3e-4)]
    assert all("lora_" in n for n, p in lora.network.named_parameters()
               if any(p is q for q in optimizer.param_groups[1]["params"]))


def test_no_deep_supervision_anywhere(plans, dataset_json, tmp_path, monkeypatch):
    trainer = make_trainer(FewTokens, plans, dataset_json, tmp_path, monkeypatch)
    assert trainer.enable_deep_supervision is False
    assert trainer._get_deep_supervision_scales() is None  # no DS targets in the data pipeline
    loss = trainer._build_loss()
    assert type(loss) is DC_and_CE_loss  # nnU-Net's Dice+CE, not wrapped in DeepSupervisionWrapper
    # nnU-Net's own set_deep_supervision_enabled (not overridden) works on the network and changes nothing.
    assert type(trainer).set_deep_supervision_enabled is nnUNetTrainer.set_deep_supervision_enabled
    trainer.network = build(plans).eval()
    x = torch.randn(2, 1, 56, 40)
    with torch.no_grad():
        reference = trainer.network(x)
        for enabled in (True, False):
            trainer.set_deep_supervision_enabled(enabled)
            assert trainer.network.decoder.deep_supervision is enabled
            out = trainer.network(x)
            assert isinstance(out, torch.Tensor)
            torch.testing.assert_close(out, reference, rtol=0, atol=0)
    trainer.enable_deep_supervision = True
    with pytest.raises(ValueError, match="single output"):
        trainer.initialize()


def test_regions_get_one_output_each_and_nnunet_region_loss(plans, dataset_json, tmp_path, monkeypatch):
    regions = dict(copy.deepcopy(dataset_json), labels={"background": 0, "hippocampus": [1, 2], "posterior": 2},
                   regions_class_order=[1, 2])
    trainer = make_trainer(FewTokens, plans, regions, tmp_path, monkeypatch)
    heads = trainer.label_manager.num_segmentation_heads
    assert heads == 2
    net = FewTokens.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, heads, False)
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 1, 56, 40)).shape == (1, 2, 56, 40)
    assert type(trainer._build_loss()) is DC_and_BCE_loss


def test_3d_configuration_is_refused_at_construction(plans, dataset_json, tmp_path, monkeypatch):
    plans3d = copy.deepcopy(plans)
    cfg = copy.deepcopy(plans3d["configurations"]["2d"])
    cfg.update(patch_size=[32, 48, 32], spacing=[1.0, 1.0, 1.0])
    plans3d["configurations"]["3d_fullres"] = cfg
    with pytest.raises(ValueError, match="works on 2D patches"):
        make_trainer(FewTokens, plans3d, dataset_json, tmp_path, monkeypatch, configuration="3d_fullres")


# ---------------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("trainer", [FewTokens, FewTokensLoRA])
def test_meddinov3_ct_checkpoint_loads_strictly_into_the_trainer_network(plans, dataset_json, tmp_path, monkeypatch,
                                                                           meddinov3_b, trainer):
    t = make_trainer(trainer, plans, dataset_json, tmp_path, monkeypatch)
    t.network = build(plans, trainer=trainer)
    t.dino_weights = str(meddinov3_b.files["meddinov3"])
    t.network.adapter.set_pretraining("lvd1689m")
    (report,) = t.load_dino_weights()
    assert report.layout == "MedDINOv3 CT checkpoint" and report.pretraining == "meddinov3_ct"
    assert not report.random_init
    recorded = json.loads((Path(t.output_folder) / "dino_weights.json").read_text())
    assert recorded["backbones"][0]["pretraining"] == "meddinov3_ct"
    net = t.network.eval()
    assert torch.all(net.adapter.vit_scale == 1) and torch.all(net.adapter.vit_shift == 0)  # no ImageNet mapping
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        ours = net.backbone.patch_features(x, net.layers)
    for a, b in zip(ours, hf_reference(meddinov3_b.reference, x, net.layers)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_official_dinov3_weights_of_another_size_are_refused(plans, dataset_json, tmp_path, monkeypatch, dinov3_s):
    t = make_trainer(FewTokens, plans, dataset_json, tmp_path, monkeypatch)
    t.network = build(plans)
    t.dino_weights = str(dinov3_s.files["meta"])
    with pytest.raises(Exception, match="dinov3_vits16.*dinov3_vitb16|dinov3_vitb16.*dinov3_vits16"):
        t.load_dino_weights()


# ---------------------------------------------------------------------------------------------- rebuild
@pytest.mark.parametrize("trainer", [FewTokens, FewTokensLoRA])
def test_classmethod_rebuilds_the_structure_for_strict_loading(plans, trainer):
    attr = inspect.getattr_static(trainer, "build_network_architecture")
    assert isinstance(attr, classmethod)
    assert list(inspect.signature(trainer.build_network_architecture).parameters) == list(
        inspect.signature(nnUNetTrainer.build_network_architecture).parameters)  # nnU-Net's stock signature
    trained = build(plans, trainer=trainer, seed=0).eval()
    rebuilt = build(plans, trainer=trainer, seed=1).eval()  # what nnUNetv2_predict does, other random init
    x = torch.randn(1, 1, 56, 40)
    with torch.no_grad():
        assert not torch.allclose(trained(x), rebuilt(x))
        rebuilt.load_state_dict(trained.state_dict(), strict=True)
        torch.testing.assert_close(rebuilt(x), trained(x), rtol=0, atol=0)
    assert isinstance(rebuilt.decoder, TransposedConvDecoder)
