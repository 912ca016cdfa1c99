"""GuiDINO's one-object optimizer (nnU-Net's SGD for the U-Net, AdamW for guidance and LoRA) behaves, for nnU-Net's
train_step, scheduler, GradScaler and checkpoints, exactly like its parts."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from nnunet_dino.training.groupwise_optimizer import GroupwiseOptimizer
from nnunet_dino.training.schedules import GroupPolyLRScheduler


def models():
    torch.manual_seed(0)
    return nn.Linear(6, 4), nn.Linear(4, 2)


def make(unet: nn.Module, guide: nn.Module) -> GroupwiseOptimizer:
    return GroupwiseOptimizer([
        torch.optim.SGD([{"params": unet.parameters(), "lr": 1e-2, "name": "segmentation"}], 1e-2, momentum=0.99,
                        nesterov=True, weight_decay=3e-5),
        torch.optim.AdamW([{"params": guide.parameters(), "lr": 1e-3, "name": "guidance"}], 1e-3,
                          weight_decay=1e-4)])


def step(opt, unet, guide, x, scaler=None):
    opt.zero_grad()
    loss = guide(torch.relu(unet(x))).square().mean()
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 12)
        scaler.step(opt)
        scaler.update()


def test_steps_equal_separate_sgd_and_adamw():
    unet, guide = models()
    ref_unet, ref_guide = copy.deepcopy(unet), copy.deepcopy(guide)
    opt = make(unet, guide)
    sgd = torch.optim.SGD(ref_unet.parameters(), 1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    adamw = torch.optim.AdamW(ref_guide.parameters(), 1e-3, weight_decay=1e-4)
    x = torch.randn(5, 6)
    for _ in range(4):
        step(opt, unet, guide, x)
        sgd.zero_grad(), adamw.zero_grad()
        ref_guide(torch.relu(ref_unet(x))).square().mean().backward()
        sgd.step(), adamw.step()
    for a, b in zip(list(unet.parameters()) + list(guide.parameters()),
                    list(ref_unet.parameters()) + list(ref_guide.parameters())):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_scheduler_sets_every_childs_rate():
    unet, guide = models()
    opt = make(unet, guide)
    scheduler = GroupPolyLRScheduler(opt, 10)
    scheduler.step(5)
    factor = (1 - 5 / 10) ** 0.9
    sgd, adamw = opt.optimizers
    assert sgd.param_groups[0]["lr"] == pytest.approx(1e-2 * factor)
    assert adamw.param_groups[0]["lr"] == pytest.approx(1e-3 * factor)


def test_checkpoint_round_trip_continues_identically():
    unet, guide = models()
    opt = make(unet, guide)
    GroupPolyLRScheduler(opt, 10)  # as configure_optimizers: the scheduler exists before training starts
    x = torch.randn(5, 6)
    for _ in range(3):
        step(opt, unet, guide, x)
    saved = copy.deepcopy({"opt": opt.state_dict(), "unet": unet.state_dict(), "guide": guide.state_dict()})
    for _ in range(2):
        step(opt, unet, guide, x)
    expected = [p.detach().clone() for p in list(unet.parameters()) + list(guide.parameters())]

    unet2, guide2 = models()
    unet2.load_state_dict(saved["unet"]), guide2.load_state_dict(saved["guide"])
    opt2 = make(unet2, guide2)
    scheduler = GroupPolyLRScheduler(opt2, 10)
    opt2.load_state_dict(saved["opt"])  # momentum buffers and Adam moments: the resumed run continues exactly
    for _ in range(2):
        step(opt2, unet2, guide2, x)
    for a, b in zip(expected, list(unet2.parameters()) + list(guide2.parameters())):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    scheduler.step(5)  # after loading, the scheduler still reaches the children's (new) group dicts
    assert opt2.optimizers[1].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 ** 0.9)


def test_grad_scaler_path_runs_and_skips_non_finite_steps():
    unet, guide = models()
    opt = make(unet, guide)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    x = torch.randn(5, 6)
    before = [p.detach().clone() for p in unet.parameters()]
    step(opt, unet, guide, x, scaler)
    assert any(not torch.equal(a, b) for a, b in zip(before, unet.parameters()))
    frozen = [p.detach().clone() for p in list(unet.parameters()) + list(guide.parameters())]
    step(opt, unet, guide, x * float("inf"), scaler)  # inf gradients: GradScaler must skip every child's step
    for a, b in zip(frozen, list(unet.parameters()) + list(guide.parameters())):
        assert torch.equal(a, b)


def test_refuses_state_of_another_optimizer_layout():
    unet, guide = models()
    plain = torch.optim.SGD(list(unet.parameters()) + list(guide.parameters()), 1e-2)
    with pytest.raises(ValueError, match="Resume with the trainer that wrote the checkpoint"):
        make(unet, guide).load_state_dict(plain.state_dict())
