"""GuiDINO's total loss as one callable with nnU-Net's loss signature ``loss(output, target)``.

L = L_seg (nnU-Net's own loss, deep supervision included, unchanged) + w_g * L_guide + w_h * L_hinge.
Being a drop-in for ``trainer.loss`` lets nnU-Net's own train_step/validation_step (autocast, grad scaling,
clipping, online Dice) run untouched; the unweighted terms of the last call are kept in ``last_terms``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from ..guidance import boundary_hinge_loss, dense_targets, guide_loss
from ..networks import GuidedUNet

TERMS = ("seg_loss", "guide_loss", "hinge_loss")


class GuiDINOLoss(nn.Module):
    def __init__(self, seg_loss: nn.Module, network: Callable[[], GuidedUNet], num_outputs: int, has_regions: bool,
                 ignore_label: int | None, guide_weight: float, hinge_weight: float, hinge_margin: float):
        super().__init__()
        self.seg_loss = seg_loss
        self._network = network  # a getter: the trainer may wrap the network (compile/DDP) after building the loss
        self.num_outputs = num_outputs
        self.has_regions = has_regions
        self.ignore_label = ignore_label
        self.guide_weight = guide_weight
        self.hinge_weight = hinge_weight
        self.hinge_margin = hinge_margin
        self.last_terms: dict[str, float] = {}

    def forward(self, output, target):
        seg = self.seg_loss(output, target)
        full_output = output[0] if isinstance(output, (list, tuple)) else output
        full_target = target[0] if isinstance(target, (list, tuple)) else target
        network = self._network()
        scores, masks = network.last_guide
        onehot, valid = dense_targets(full_target, self.num_outputs, self.has_regions, self.ignore_label)
        guide = self._guide_term(network, scores, masks, onehot, valid)
        hinge = (boundary_hinge_loss(full_output, onehot, valid, self.has_regions, self.hinge_margin)
                 if self.hinge_weight > 0 else seg.new_zeros(()))
        self.last_terms = {"seg_loss": seg.detach(), "guide_loss": guide.detach(), "hinge_loss": hinge.detach()}
        return seg + self.guide_weight * guide + self.hinge_weight * hinge

    def _guide_term(self, network, scores, masks, onehot, valid) -> torch.Tensor:
        if masks.shape[1] == 1 and onehot.shape[1] > 1:  # single ("paper") guide supervises the foreground union
            onehot = onehot.amax(1, keepdim=True) if self.has_regions else 1 - onehot[:, :1]
        guidance = network.guidance  # 2D: the token grid; 3D: per plane onto its tokens (slicewise.py)
        labelled, geometric = guidance.dense_to_tokens(onehot * valid)
        labelled_fraction, _ = guidance.dense_to_tokens(valid)
        # dense_to_tokens normalises by the geometric coverage; re-normalise by the labelled (non-ignore) coverage
        targets = labelled / labelled_fraction.clamp_min(1e-6)
        weights = labelled_fraction * geometric
        return guide_loss(scores, masks, targets.clamp(0, 1), weights, use_logits=network.guidance.tokenbook.config.mode
                          == "learned")
