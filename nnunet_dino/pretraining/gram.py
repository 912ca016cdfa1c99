"""Gram anchoring (DINOv3, section 4.2): keep the student's patch-similarity structure close to that of an earlier
teacher (the "Gram teacher"), which counters the degradation of dense features in long self-distillation.

    G(P) = normalize(P) normalize(P)^T   (cosine similarities between all patch tokens of one image)
    L    = mean over images and token pairs of (G(P_student) - G(P_gram_teacher))^2

Zero exactly when the two sets of patch features agree up to a positive per-token scale; it compares structure, not
the features themselves, so the student may move as long as its patches keep their relations.

Which crops: the global crops that iBOT's block masking left intact (``images``; half of them by default). There the
student and the Gram teacher see the same input, so the loss measures only how far the student's similarity
structure drifted; on masked crops it would also penalise the (intended) effect of the mask tokens on every token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gram_matrix(patches: torch.Tensor) -> torch.Tensor:
    """(B, N, D) patch tokens -> (B, N, N) cosine similarities."""
    p = F.normalize(patches.float(), dim=-1)
    return p @ p.transpose(1, 2)


def gram_anchoring_loss(student_patches: torch.Tensor, gram_teacher_patches: torch.Tensor,
                        images: torch.Tensor | None = None) -> torch.Tensor:
    """``images``: (B,) bool, the crops to compare (None: all); zero when none is selected."""
    if images is not None:
        if not bool(images.any()):
            return student_patches.sum() * 0.0
        student_patches, gram_teacher_patches = student_patches[images], gram_teacher_patches[images]
    if student_patches.shape != gram_teacher_patches.shape:
        raise ValueError(f"Gram anchoring compares equal token sets; got {tuple(student_patches.shape)} and "
                         f"{tuple(gram_teacher_patches.shape)}.")
    return F.mse_loss(gram_matrix(student_patches), gram_matrix(gram_teacher_patches.detach()))
