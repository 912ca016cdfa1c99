"""The training loop shared by the guide-reliance tests (2D: test_guide_reliance.py, 3D: test_guide_reliance_3d.py).

A GuidedUNet whose guidance is a known-guide branch (nnunet_dino/guidance/known_guides.py) fed the one-hot labels,
trained with GuiDINO's loss (nnU-Net's Dice+CE + guide + hinge) and the trainer's optimiser recipe (nnU-Net's SGD
for the U-Net, AdamW for TokenBook and gates), then scored on fresh samples with the real guide and with the
replacement guides of the reliance metric (shuffled across the batch, spatially constant).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunet_dino.networks import GuidedUNet
from nnunet_dino.training import GuiDINOTrainer
from nnunet_dino.training.groupwise_optimizer import GroupwiseOptimizer
from nnunet_dino.training.guide_reliance import ablated_guides
from nnunet_dino.training.guidino_loss import GuiDINOLoss

Batches = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]  # (n, generator) -> images, labels


def onehot(labels: torch.Tensor, num_classes: int = 2) -> torch.Tensor:
    """(B, 1, ...) labels -> (B, K, ...) one-hot float: the guide source (what DINO's tokens would encode)."""
    return F.one_hot(labels[:, 0], num_classes).movedim(-1, 1).float()


def foreground_dice(output: torch.Tensor, labels: torch.Tensor) -> float:
    p, r = output.argmax(1) == 1, labels[:, 0] == 1
    return float(2 * (p & r).sum() / (p.sum() + r.sum()).clamp_min(1))


def train_and_ablate(net: GuidedUNet, batches: Batches, steps: int, batch_size: int, eval_size: int) -> dict:
    """Train ``net`` for ``steps`` on ``batches(batch_size, g)``; foreground Dice on ``eval_size`` fresh samples with
    the real guide ('real') and each replacement guide ('shuffled', 'constant')."""
    seg_loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                              weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    t = GuiDINOTrainer
    loss_fn = GuiDINOLoss(seg_loss, lambda: net, 2, False, None, t.guide_loss_weight, t.hinge_loss_weight,
                          t.hinge_margin)
    guidance = [p for m in (net.gates, net.guidance.tokenbook) for p in m.parameters()]
    optimizer = GroupwiseOptimizer([
        torch.optim.SGD(net.unet.parameters(), 1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5),
        torch.optim.AdamW(guidance, t.lr_guidance, weight_decay=t.guidance_weight_decay)])
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        images, labels = batches(batch_size, g)
        scores, masks = net.guidance(onehot(labels))
        output = net.forward_with_guide(images, masks)
        net.last_guide = (scores, masks)
        loss = loss_fn(output, labels)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        optimizer.step()
    net.eval()
    images, labels = batches(eval_size, torch.Generator().manual_seed(99))
    with torch.no_grad():
        _, masks = net.guidance(onehot(labels))
        dice = {"real": foreground_dice(net.forward_with_guide(images, masks), labels)}
        for name, replaced in ablated_guides(masks).items():
            dice[name] = foreground_dice(net.forward_with_guide(images, replaced), labels)
    return dice
