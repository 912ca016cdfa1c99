"""GuiDINO's network and losses as nnU-Net builds and drives them: the planned U-Net (PlainConvUNet or ResEnc) with
guide gates, any patch size, any channel count, labels or regions, and the clear errors for inputs it cannot take.

Built from real plans of the bundled HippoTiny (``hippo_workspace``), with a randomly initialised ViT-S: the
structure, not the weights, is under test.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_dino.cli.stock_pipeline import command, run
from nnunet_dino.guidance import TokenBookConfig
from nnunet_dino.networks import GuidedUNet
from nnunet_dino.training import GuiDINOTrainer
from nnunet_dino.training.guidino_loss import GuiDINOLoss


class SmallGuiDINO(GuiDINOTrainer):
    """ViT-S with few tokens: keeps these structural tests fast on a CPU."""
    guidino = replace(GuiDINOTrainer.guidino, min_short_side_tokens=4)


@pytest.fixture(scope="module")
def plans(hippo_workspace) -> dict:
    """The default plans and nnU-Net's ResEnc-M plans (``nnUNetv2_plan_experiment -pl nnUNetPlannerResEncM``)."""
    pre = hippo_workspace["preprocessed"]
    if not (pre / "nnUNetResEncUNetMPlans.json").exists():
        run([command("nnUNetv2_plan_experiment"), "-d", "990", "-pl", "nnUNetPlannerResEncM"], hippo_workspace["env"])
    return {"default": load_json(pre / "nnUNetPlans.json"), "resenc": load_json(pre / "nnUNetResEncUNetMPlans.json")}


def build(plans: dict, trainer=SmallGuiDINO, channels: int = 1, outputs: int = 3, patch=None, schemes=None,
          deep_supervision: bool = True) -> GuidedUNet:
    plans = copy.deepcopy(plans)
    cfg = plans["configurations"]["2d"]
    if patch is not None:
        cfg["patch_size"] = list(patch)
    if schemes is not None:
        cfg["normalization_schemes"] = list(schemes)
        cfg["use_mask_for_norm"] = [False] * len(schemes)
        # A CT channel is mapped through HU with its foreground statistics, which the MRI plans lack for it.
        properties = plans["foreground_intensity_properties_per_channel"]
        for c in (c for c, s in enumerate(schemes) if s == "CTNormalization"):
            properties.setdefault(str(c), {"mean": 60.0, "std": 50.0, "percentile_00_5": -100.0,
                                           "percentile_99_5": 250.0})
    pm = PlansManager(plans)
    torch.manual_seed(0)
    return trainer.build_network_architecture(pm, pm.get_configuration("2d"), channels, outputs, deep_supervision)


def patch_of(plans: dict) -> tuple[int, int]:
    return tuple(plans["configurations"]["2d"]["patch_size"])


@pytest.mark.parametrize("kind,unet_type", [("default", PlainConvUNet), ("resenc", ResidualEncoderUNet)])
def test_the_planned_unet_is_guided_at_every_encoder_stage(plans, kind, unet_type):
    net = build(plans[kind])
    assert type(net.unet) is unet_type  # the network the plans describe, not a hard-coded one
    n_stages = plans[kind]["configurations"]["2d"]["architecture"]["arch_kwargs"]["n_stages"]
    assert sorted(net.gates) == sorted(f"encoder_{i}" for i in range(n_stages))
    x = torch.randn(2, 1, *patch_of(plans[kind]))
    outputs = net(x)
    # deep supervision outputs at nnU-Net's scales: full resolution first, then halvings per the pooling kernels
    assert outputs[0].shape == (2, 3, *x.shape[-2:])
    assert len(outputs) == n_stages - 1
    sum(o.float().mean() for o in outputs).backward()
    proto_grad = net.guidance.tokenbook.prototypes.grad
    assert proto_grad is None or not proto_grad.any()  # zero-initialised gates: the seg loss alone cannot move the guide
    assert all(g.mix.weight.grad is not None for g in net.gates.values())


def test_gates_start_as_identity_so_an_uninformative_guide_changes_nothing(plans):
    net = build(plans["default"]).eval()
    x = torch.randn(2, 1, *patch_of(plans["default"]))
    unguided = copy.deepcopy(net.unet)
    for module in unguided.modules():
        module._forward_hooks.clear()  # the same weights without the gates
    with torch.no_grad():
        guided = net(x)
        plain = unguided(x)
    for g, p in zip(guided, plain):
        assert torch.equal(g, p)
    with torch.no_grad():  # once a gate has learned something, the guide does act on the features
        net.gates["encoder_0"].mix.bias.fill_(0.5)
        assert not torch.equal(net(x)[0], plain[0])


@pytest.mark.parametrize("patch", [(56, 40), (64, 96), (48, 200), (40, 56)])
@pytest.mark.parametrize("channels,schemes", [(1, ["ZScoreNormalization"]),
                                              (2, ["ZScoreNormalization", "ZScoreNormalization"]),
                                              (3, ["RGBTo0_1Normalization"] * 3),
                                              (4, ["ZScoreNormalization", "CTNormalization", "ZScoreNormalization",
                                                   "ZScoreNormalization"])])
def test_any_patch_and_channel_count_gives_full_size_outputs(plans, patch, channels, schemes):
    net = build(plans["default"], channels=channels, patch=patch, schemes=schemes, deep_supervision=False).eval()
    x = torch.randn(1, channels, *patch)
    with torch.no_grad():
        out = net(x)
        scores, masks = net.last_guide
    assert out.shape == (1, 3, *patch)
    adapter = net.guidance.adapter
    assert min(adapter.resized_hw) >= 4 * 16 and all(r >= p for r, p in zip(adapter.resized_hw, patch))  # never cropped
    assert masks.shape == (1, 3, *adapter.token_hw) and masks.min() >= 0 and masks.max() <= 1


def test_default_patch_upsampling_gives_the_vit_enough_tokens(plans):
    net = build(plans["default"], trainer=GuiDINOTrainer)
    adapter = net.guidance.adapter
    assert patch_of(plans["default"]) == (56, 40)
    assert min(adapter.token_hw) == 16  # 40 px would be 2.5 tokens of a 16-px ViT without resampling


def test_wrong_input_channels_or_patch_give_a_clear_error(plans):
    net = build(plans["default"], channels=1, deep_supervision=False)
    with pytest.raises(ValueError, match=r"Expected a \(B, 1, 56, 40\) patch, got \(1, 2, 56, 40\)"):
        net(torch.randn(1, 2, 56, 40))
    with pytest.raises(ValueError, match=r"got \(1, 1, 64, 40\)"):
        net(torch.randn(1, 1, 64, 40))


def test_one_guide_per_region_and_per_class(plans):
    assert build(plans["default"], outputs=3).guidance.tokenbook.num_guides == 3  # bg + 2 classes
    assert build(plans["default"], outputs=2).guidance.tokenbook.num_guides == 2  # 2 regions (sigmoid outputs)

    class Paper(SmallGuiDINO):
        guidino = replace(SmallGuiDINO.guidino, tokenbook=TokenBookConfig(mode="paper"))

    assert build(plans["default"], trainer=Paper, outputs=3).guidance.tokenbook.num_guides == 1


def _loss(net, num_outputs, has_regions, ignore_label, hinge_weight=0.05):
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    if has_regions:
        seg = DC_and_BCE_loss({}, {"batch_dice": True, "do_bg": True, "smooth": 1e-5, "ddp": False},
                              use_ignore_label=ignore_label is not None, dice_class=MemoryEfficientSoftDiceLoss)
    else:
        seg = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                             ignore_label=ignore_label, dice_class=MemoryEfficientSoftDiceLoss)
    return GuiDINOLoss(seg, lambda: net, num_outputs, has_regions, ignore_label, 0.1, hinge_weight, 1.0)


def test_loss_with_labels_and_ignore_label_trains_the_guide(plans):
    from nnunet_dino.backbone import init_random_dino_weights_

    net = build(plans["default"], outputs=3, deep_supervision=False)
    # What nnUNet_dino_weights=random gives at training start. With timm's init (LayerScale 1e-5) LoRA's gradient
    # here was 6e-8 in all (1e-10 for some adapters): LoRA would only nominally be trained.
    init_random_dino_weights_(net.guidance.backbone)
    x = torch.randn(2, 1, 56, 40)
    target = torch.zeros(2, 1, 56, 40)
    target[:, :, 10:30, 10:20] = 1
    target[:, :, 30:45, 10:20] = 2
    target[:, :, :, :4] = 3  # ignore label: the guide and hinge terms must not see it
    loss_fn = _loss(net, 3, False, ignore_label=3)
    loss = loss_fn(net(x), target)
    terms = loss_fn.last_terms
    assert torch.isfinite(loss) and terms["guide_loss"] > 0 and terms["hinge_loss"] > 0
    loss.backward()
    assert net.guidance.tokenbook.prototypes.grad.norm() > 1e-2  # the guide loss supervises the TokenBook (0.17)
    # lora_B starts at 0, so only lora_B has a gradient at the first step; every adapter must get a real one.
    lora_b_grads = [p.grad.norm() for n, p in net.guidance.backbone.named_parameters() if "lora_B" in n]
    assert len(lora_b_grads) == 48  # q, k, v, proj of 12 blocks
    assert torch.stack(lora_b_grads).norm() > 1e-3  # measured 2e-2 (timm's init: 6e-8)
    assert min(lora_b_grads) > 1e-6  # measured 1.2e-4 (timm's init: 1.5e-10)


def test_loss_with_regions_and_ignore_channel(plans):
    net = build(plans["default"], outputs=2, deep_supervision=False)
    x = torch.randn(2, 1, 56, 40)
    target = torch.zeros(2, 3, 56, 40)  # regions: hippocampus (1+2), posterior (2), then nnU-Net's ignore channel
    target[:, 0, 10:45, 10:20] = 1
    target[:, 1, 30:45, 10:20] = 1
    target[:, 2, :, :4] = 1
    loss_fn = _loss(net, 2, True, ignore_label=3)
    loss = loss_fn(net(x), target)
    assert torch.isfinite(loss) and loss_fn.last_terms["guide_loss"] > 0 and loss_fn.last_terms["hinge_loss"] > 0
    loss.backward()
    assert net.guidance.tokenbook.prototypes.grad.abs().sum() > 0


def test_ignored_pixels_do_not_change_the_auxiliary_terms(plans):
    """What the network says on ignored pixels (and on tokens made only of them) must not move guide or hinge."""
    net = build(plans["default"], outputs=3, deep_supervision=False).eval()
    assert net.guidance.adapter.token_hw == (6, 4)  # 56x40 -> 90x64 (4 tokens on the short side) -> padded 96x64
    with torch.no_grad():
        out = net(torch.randn(1, 1, 56, 40))
    scores, masks = net.last_guide
    target = torch.zeros(1, 1, 56, 40)
    target[:, :, 10:30, 5:15] = 1
    target[:, :, 30:45, 5:15] = 2
    target[:, :, :, 20:] = 3  # right half ignored: token column 3 (x >= 30 of 40) lies entirely inside it
    loss_fn = _loss(net, 3, False, ignore_label=3)
    with torch.no_grad():
        loss_fn(out, target)
        before = dict(loss_fn.last_terms)
        changed_out = out.clone()
        changed_out[..., 20:] = torch.randn_like(changed_out[..., 20:]) * 10
        changed_scores = scores.clone()
        changed_scores[..., 3:] = torch.randn_like(changed_scores[..., 3:]) * 10
        net.last_guide = (changed_scores, torch.sigmoid(changed_scores))
        loss_fn(changed_out, target)
    assert before["hinge_loss"] > 0 and before["guide_loss"] > 0
    assert torch.allclose(before["hinge_loss"], loss_fn.last_terms["hinge_loss"])
    assert torch.allclose(before["guide_loss"], loss_fn.last_terms["guide_loss"])


@pytest.mark.parametrize("recipe", ["adamw", "sgd"])
def test_optimizer_recipes_cover_every_trainable_tensor_once(hippo_workspace, plans, tmp_path, monkeypatch, recipe):
    """Default: nnU-Net's SGD for the U-Net, AdamW for guidance (1e-3) and LoRA (5e-4), as one optimizer object;
    ``nnUNetTrainerGuiDINO_sgdGuidance``: the former all-SGD recipe. Every group decays from its own rate."""
    import importlib

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "trainers"))  # as nnU-Net imports them
    variants = importlib.import_module("nnUNetTrainerGuiDINO")
    cls = variants.nnUNetTrainerGuiDINO if recipe == "adamw" else variants.nnUNetTrainerGuiDINO_sgdGuidance
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_dino_weights", "random")  # construction checks the setting
    dataset_json = load_json(hippo_workspace["preprocessed"] / "dataset.json")
    trainer = cls(dict(copy.deepcopy(plans["default"]), continue_training=False), "2d", 0, dataset_json,
                  torch.device("cpu"))
    trainer.network = build(plans["default"], trainer=cls)
    trainer.num_epochs = 10
    optimizer, scheduler = trainer.configure_optimizers()
    if recipe == "adamw":
        assert [type(o) for o in optimizer.optimizers] == [torch.optim.SGD, torch.optim.AdamW]
        sgd, adamw = optimizer.optimizers
        assert [g["name"] for g in sgd.param_groups] == ["segmentation"]
        assert sgd.defaults["momentum"] == 0.99 and sgd.defaults["nesterov"]
        assert [(g["name"], g["lr"]) for g in adamw.param_groups] == [("guidance", 1e-3), ("lora", 5e-4)]
    else:
        assert type(optimizer) is torch.optim.SGD
        assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == [
            ("segmentation", 1e-2), ("guidance", 1e-2), ("lora", 1e-3)]
    grouped = [p for g in optimizer.param_groups for p in g["params"]]
    trainable = [p for p in trainer.network.parameters() if p.requires_grad]
    assert len(grouped) == len({id(p) for p in grouped}) == len(trainable)  # each exactly once, none left out
    initial = [g["lr"] for g in optimizer.param_groups]
    scheduler.step(5)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([lr * 0.5 ** 0.9 for lr in initial])
