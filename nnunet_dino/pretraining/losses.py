"""The pretraining objective: lightly's DINO, iBOT and KoLeo losses on Sinkhorn-Knopp targets, plus Gram anchoring.

    total = dino + ibot_weight * ibot + koleo_weight * koleo + gram_weight * gram

- DINO (lightly ``DINOLoss``): cross-entropy between the teacher's SK-centred CLS distribution on each global crop
  and the student's on every *other* crop (2 global + n local; a crop is never matched with itself).
- iBOT (lightly ``IBOTPatchLoss``): the student's prediction at block-masked patch positions against the teacher's
  SK-centred distribution of the unmasked tokens there, averaged per image.
- KoLeo (lightly ``KoLeoLoss``): spreads the student's CLS tokens of each global crop within the batch (DINOv2).
- Gram anchoring (gram.py, ours): only in stages with ``gram_weight > 0``, on the unmasked global crops.
How lightly's losses receive SK targets is explained in sinkhorn.py (their centre stays at zero: momentum 1).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss

from .gram import gram_anchoring_loss
from .sinkhorn import sinkhorn_knopp_log

LOSS_NAMES = ("total", "dino", "ibot", "koleo", "gram")


class PretrainObjective(nn.Module):
    def __init__(self, dino_prototypes: int, ibot_prototypes: int, student_temp: float, sinkhorn_iterations: int,
                 ibot_weight: float, koleo_weight: float):
        super().__init__()
        # center_momentum=1: the running-mean centre stays zero; SK does the centring (sinkhorn.py).
        self.dino = DINOLoss(dino_prototypes, student_temp=student_temp, center_momentum=1.0)
        self.ibot = IBOTPatchLoss(ibot_prototypes, student_temp=student_temp, center_momentum=1.0)
        self.koleo = KoLeoLoss()
        self.sinkhorn_iterations = sinkhorn_iterations
        self.ibot_weight = ibot_weight
        self.koleo_weight = koleo_weight

    def forward(self, student: dict, teacher: dict, mask: torch.Tensor, n_views: int, teacher_temp: float,
                gram_teacher_patches: torch.Tensor | None, gram_weight: float) -> dict[str, torch.Tensor]:
        """student/teacher: PretrainNetwork outputs (teacher without local crops, plus 'ibot_logits' of the masked
        tokens); n_views: crops per image (2 global + locals)."""
        t_log_q = sinkhorn_knopp_log(teacher["dino_logits"], teacher_temp, self.sinkhorn_iterations)
        teacher_views = list((t_log_q * teacher_temp).chunk(2))
        student_views = list(student["dino_logits"].float().chunk(n_views))
        dino = self.dino(teacher_views, student_views, teacher_temp=teacher_temp)
        i_log_q = sinkhorn_knopp_log(teacher["ibot_logits"], teacher_temp, self.sinkhorn_iterations)
        ibot = self.ibot(i_log_q * teacher_temp, student["ibot_logits"].float(), mask, teacher_temp=teacher_temp)
        koleo = sum(self.koleo(c.float()) for c in student["cls_global"].chunk(2))
        total = dino + self.ibot_weight * ibot + self.koleo_weight * koleo
        gram = torch.zeros((), device=total.device)
        if gram_teacher_patches is not None and gram_weight > 0:
            gram = gram_anchoring_loss(student["patches_global"], gram_teacher_patches, ~mask.flatten(1).any(1))
            total = total + gram_weight * gram
        return {"total": total, "dino": dino, "ibot": ibot, "koleo": koleo, "gram": gram}
