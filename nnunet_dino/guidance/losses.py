"""GuiDINO's auxiliary losses: guide supervision and the boundary-focused hinge loss.

Both take nnU-Net's full-resolution target as it arrives in a batch: a label map (B, 1, *spatial) for class
training, or region masks (B, R, *spatial) (+ a trailing ignore channel when an ignore label is used) for regions;
*spatial is (H, W) in 2D and (D, H, W) in 3D.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_targets(target: torch.Tensor, num_outputs: int, has_regions: bool, ignore_label: int | None):
    """(per-output binary targets (B, K, *spatial) float, valid-pixel mask (B, 1, *spatial) float)."""
    if has_regions:
        if ignore_label is not None:
            valid = 1.0 - target[:, -1:].float()
            target = target[:, :-1]
        else:
            valid = torch.ones_like(target[:, :1], dtype=torch.float32)
        return target.float(), valid
    labels = target[:, 0].long()
    valid = torch.ones_like(labels, dtype=torch.float32)
    if ignore_label is not None:
        valid = (labels != ignore_label).float()
        labels = torch.where(labels == ignore_label, torch.zeros_like(labels), labels)
    onehot = F.one_hot(labels, num_outputs).movedim(-1, 1).float()
    return onehot, valid[:, None]


def guide_loss(guide_scores: torch.Tensor, guide_masks: torch.Tensor, token_targets: torch.Tensor,
               token_weights: torch.Tensor, use_logits: bool) -> torch.Tensor:
    """Guide vs area-averaged soft targets on the token grid, weighted by how much of each token is real, labelled
    image. ``use_logits``: BCE on logits (learned TokenBook); otherwise MSE on the masks (published form)."""
    if guide_masks.shape[1] == 1 and token_targets.shape[1] > 1:  # single (paper) guide: foreground vs background
        token_targets = token_targets[:, 1:].sum(1, keepdim=True).clamp(max=1.0)
    if use_logits:
        per_token = F.binary_cross_entropy_with_logits(guide_scores.float(), token_targets, reduction="none")
    else:
        per_token = (guide_masks.float() - token_targets) ** 2
    weights = token_weights.expand_as(per_token)
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


def boundary_band(mask: torch.Tensor) -> torch.Tensor:
    """dilate(mask) - erode(mask) with a 3x3 (2D, (B, K, H, W)) or 3x3x3 (3D, (B, K, D, H, W)) structuring element
    (morphological gradient), in {0, 1}."""
    pool = {4: F.max_pool2d, 5: F.max_pool3d}.get(mask.ndim)
    if pool is None:
        raise ValueError(f"boundary_band takes (B, K, H, W) or (B, K, D, H, W) masks, got shape {tuple(mask.shape)}.")
    dilated = pool(mask, 3, stride=1, padding=1)
    eroded = -pool(-mask, 3, stride=1, padding=1)
    return dilated - eroded


def boundary_hinge_loss(logits: torch.Tensor, binary_targets: torch.Tensor, valid: torch.Tensor, has_regions: bool,
                        margin: float = 1.0) -> torch.Tensor:
    """relu(m - s) averaged over the boundary band B_c = dilate(y_c) - erode(y_c) of each foreground class/region
    c, where s is a signed margin that is >= m exactly when the pixel is classified correctly with margin m.

    Regions (sigmoid outputs, t = 2 y_c - 1): s = t * z_c, z_c the region's logit.
    Classes (softmax outputs; background is not a boundary class), with y the pixel's true class:
    - inside c (y = c): s = z_c - max_{k != c} z_k, the quantity whose sign decides the argmax;
    - outside c (y != c, c's outer band): s = z_y - z_c, the true class against c. Not z_c's distance to the
      largest other logit, which could be a third, wrong class: descent would raise that one, never the true class.
    Either way descent raises the true class's logit and lowers a wrong one, and the binary case is the hinge on
    z_1 - z_0. ``binary_targets`` is the one-hot label map for classes; ``valid`` (B, 1, *spatial) is 0 on ignored
    pixels, which therefore get no gradient. 2D or 3D (the band is then 3x3x3)."""
    logits = logits.float()
    if has_regions:
        y = binary_targets
        signed_margin = (2 * y - 1) * logits
    else:
        others = _largest_other_logit(logits)
        true_logit = (binary_targets * logits).sum(dim=1, keepdim=True)  # z_y
        y, z = binary_targets[:, 1:], logits[:, 1:]
        signed_margin = torch.where(y > 0, z - others[:, 1:], true_logit - z)
    band = boundary_band(y) * valid
    hinge = F.relu(margin - signed_margin)
    return (hinge * band).sum() / band.sum().clamp_min(1.0)


def _largest_other_logit(logits: torch.Tensor) -> torch.Tensor:
    """max_{k != c} z_k for every class c: (B, K, *spatial)."""
    k = logits.shape[1]
    if logits.ndim == 4:
        eye = torch.eye(k, device=logits.device, dtype=torch.bool).view(1, k, k, 1, 1)
        return logits[:, None].expand(-1, k, -1, -1, -1).masked_fill(eye, float("-inf")).amax(dim=2)
    # 3D: the masked (B, K, K, D, H, W) tensor would take K times the logits' memory (3.3 GB for 14 classes at
    # 128^3, batch 2). The largest other logit is the top logit, except at the top class, where it is the second.
    if k == 1:
        return torch.full_like(logits, float("-inf"))
    top2, top2_index = logits.topk(2, dim=1)
    classes = torch.arange(k, device=logits.device).view(1, k, *([1] * (logits.ndim - 2)))
    return torch.where(classes == top2_index[:, :1], top2[:, 1:2], top2[:, :1])
