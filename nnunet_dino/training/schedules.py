"""nnU-Net's poly learning-rate schedule applied to each parameter group from its own initial learning rate.

nnU-Net's PolyLRScheduler writes one lr into every group; GuiDINO trains the segmentation network, the guidance
modules and the LoRA adapters at different rates, each decaying with nnU-Net's (1 - epoch/max)^0.9.
"""
from __future__ import annotations

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler


class GroupPolyLRScheduler(PolyLRScheduler):
    def __init__(self, optimizer, max_steps: int, exponent: float = 0.9, current_step: int | None = None):
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        super().__init__(optimizer, optimizer.param_groups[0]["initial_lr"], max_steps, exponent, current_step)

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        factor = (1 - current_step / self.max_steps) ** self.exponent
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
