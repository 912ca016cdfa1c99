"""Guide reliance: how much of the prediction's quality comes from the DINO guide.

Measured during nnU-Net's online validation: each validation batch is predicted once with its own guide (nnU-Net's
pseudo Dice) and again with the guide replaced, while the U-Net sees the same images:

- ``shuffled``: every patch gets the guide of another patch of the batch (rolled by one along the batch);
- ``constant``: every guide map is replaced by its own spatial mean (the guide's level, none of its layout).

Reliance = pseudo Dice with the real guide - pseudo Dice with the replaced one. About 0 means the trained network
ignores DINO; a clear positive value means the guide's spatial information reaches the prediction.
"""
from __future__ import annotations

import numpy as np
import torch
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn

ABLATIONS = ("shuffled", "constant")


def ablated_guides(masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """The replacement guides of ``masks`` (B, K, h, w), or 3D guide volumes (B, K, n, h, w); ``shuffled`` needs at
    least two patches."""
    out = {"constant": masks.mean(dim=tuple(range(2, masks.ndim)), keepdim=True).expand_as(masks)}
    if masks.shape[0] > 1:
        out["shuffled"] = masks.roll(1, dims=0)
    return out


def hard_counts(output: torch.Tensor, target: torch.Tensor, label_manager) -> tuple[np.ndarray, ...]:
    """Foreground (tp, fp, fn) of the hard prediction, computed exactly as nnU-Net's validation_step does for its
    pseudo Dice (argmax or sigmoid > 0.5, ignore label masked out, background dropped for label training)."""
    axes = [0] + list(range(2, output.ndim))
    if label_manager.has_regions:
        prediction = (torch.sigmoid(output) > 0.5).long()
    else:
        prediction = torch.zeros(output.shape, device=output.device, dtype=torch.float16)
        prediction.scatter_(1, output.argmax(1)[:, None], 1)
    mask = None
    if label_manager.has_ignore_label:
        if label_manager.has_regions:
            mask = ~target[:, -1:] if target.dtype == torch.bool else 1 - target[:, -1:]
            target = target[:, :-1]
        else:
            mask = (target != label_manager.ignore_label).float()
            target = torch.where(target == label_manager.ignore_label, torch.zeros_like(target), target)
    tp, fp, fn, _ = get_tp_fp_fn_tn(prediction, target, axes=axes, mask=mask)
    counts = tuple(c.detach().cpu().numpy() for c in (tp, fp, fn))
    return counts if label_manager.has_regions else tuple(c[1:] for c in counts)


def mean_dice(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> float:
    """nnU-Net's global pseudo Dice: per class over the summed counts, then the mean over classes (NaN-aware)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.nanmean(2 * tp / (2 * tp + fp + fn)))
