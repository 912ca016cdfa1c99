"""GuiDINO's boundary hinge loss on hand-made label strips: which logits gradient descent raises and lowers.

Maps are 3 rows high (so the 3x3 band is that of the 1D strip) and 8 columns wide. For the strip
``bg bg c1 c1 c2 c2 bg bg`` the bands (dilate - erode, 3x3) are columns 1-4 for class 1 and 3-6 for class 2: the
image border is not an object boundary (erosion ignores outside pixels).
"""
from __future__ import annotations

import pytest
import torch

from nnunet_dino.guidance.losses import boundary_band, boundary_hinge_loss, dense_targets

STRIP = [0, 0, 1, 1, 2, 2, 0, 0]
ROWS = 3


def label_map(columns) -> torch.Tensor:
    """(1, 1, ROWS, len(columns)) label map, every row equal to ``columns``."""
    return torch.tensor(columns, dtype=torch.float32).repeat(ROWS, 1)[None, None]


def class_targets(columns, num_classes: int, ignore_label: int | None = None):
    return dense_targets(label_map(columns), num_classes, False, ignore_label)


def loss_and_grad(logits, targets, valid, has_regions, margin=1.0):
    logits = logits.clone().requires_grad_(True)
    loss = boundary_hinge_loss(logits, targets, valid, has_regions, margin)
    loss.backward()
    return loss.item(), logits.grad


def true_class_grad(grad: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """(B, H, W): the loss's gradient with respect to each pixel's true-class logit."""
    return (grad * onehot).sum(dim=1)


def columns_of(mask: torch.Tensor) -> list[int]:
    """The columns where a (ROWS, W) mask, equal in every row, is set."""
    assert torch.equal(mask, mask[:1].expand_as(mask))
    return [i for i, v in enumerate(mask[0].tolist()) if v]


def test_bands_of_the_strip():
    onehot, _ = class_targets(STRIP, 3)
    band = boundary_band(onehot)
    assert columns_of(band[0, 1]) == [1, 2, 3, 4] and columns_of(band[0, 2]) == [3, 4, 5, 6]


def test_binary_is_the_hinge_on_the_foreground_minus_background_logit():
    columns = [0, 0, 1, 1, 1, 1, 0, 0]
    onehot, valid = class_targets(columns, 2)
    logits = torch.randn(1, 2, ROWS, 8, generator=torch.Generator().manual_seed(0))
    loss, grad = loss_and_grad(logits, onehot, valid, has_regions=False)

    z = logits.clone().requires_grad_(True)
    t = 2 * onehot[:, 1] - 1
    band_columns = [1, 2, 5, 6]
    reference = torch.relu(1.0 - t * (z[:, 1] - z[:, 0]))[..., band_columns].mean()
    reference.backward()
    assert loss == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(grad, z.grad)


def test_negative_side_raises_the_true_class_not_the_largest_other():
    """A background pixel in class 1's outer band with logits (bg, c1, c2) = (0, 0.5, 1.0): the old margin
    z_1 - max(z_bg, z_2) made descent raise class 2 and leave background alone."""
    onehot, valid = class_targets(STRIP, 3)
    logits = 4.0 * onehot  # every band pixel right with margin 4 >= 1: costs nothing
    logits[0, :, :, 1] = torch.tensor([0.0, 0.5, 1.0])[:, None]
    loss, grad = loss_and_grad(logits, onehot, valid, has_regions=False)
    band_pixels = 2 * 4 * ROWS  # bands of classes 1 and 2, 4 columns each
    assert loss == pytest.approx(ROWS * 1.5 / band_pixels)  # relu(1 - (z_bg - z_1)) = 1.5 on each row
    step = 1.0 / band_pixels
    torch.testing.assert_close(grad[0, :, :, 1], torch.tensor([-step, step, 0.0])[:, None].expand(3, ROWS))
    assert float(grad.abs().sum()) == pytest.approx(2 * ROWS * step)  # nothing else moves


def test_positive_side_raises_the_class_and_lowers_its_strongest_competitor():
    onehot, valid = class_targets(STRIP, 3)
    logits = 4.0 * onehot
    logits[0, :, :, 2] = torch.tensor([0.2, 1.0, 0.7])[:, None]  # class-1 pixel, margin 1.0 - 0.7 < 1
    loss, grad = loss_and_grad(logits, onehot, valid, has_regions=False)
    assert loss == pytest.approx(ROWS * 0.7 / 24)
    step = 1.0 / 24
    torch.testing.assert_close(grad[0, :, :, 2], torch.tensor([0.0, -step, step])[:, None].expand(3, ROWS))


@pytest.mark.parametrize("seed", range(5))
def test_descent_always_raises_the_true_class_and_lowers_wrong_ones(seed):
    columns = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 0, 0, 0]  # 4 classes touching each other; interiors; background
    onehot, valid = class_targets(columns, 4)
    logits = 2 * torch.randn(1, 4, ROWS, len(columns), generator=torch.Generator().manual_seed(seed))
    _, grad = loss_and_grad(logits, onehot, valid, has_regions=False)
    true_class = onehot > 0
    assert float(grad[true_class].max()) <= 0.0
    assert float(grad[~true_class].min()) >= 0.0
    # With all logits equal every band hinge is active: the true class is raised at every band pixel, and only there.
    _, grad = loss_and_grad(torch.zeros_like(logits), onehot, valid, has_regions=False)
    in_a_band = boundary_band(onehot[:, 1:]).amax(dim=1) > 0
    assert columns_of(in_a_band[0]) == [2, 3, 5, 6, 8, 9, 11, 12]
    assert torch.equal(true_class_grad(grad, onehot) < 0, in_a_band)


def test_correct_boundary_pixels_with_the_margin_cost_nothing():
    onehot, valid = class_targets(STRIP, 3)
    loss, grad = loss_and_grad(1.0 * onehot, onehot, valid, has_regions=False)  # margin exactly m = 1
    assert loss == 0.0 and float(grad.abs().max()) == 0.0
    loss, _ = loss_and_grad(0.999 * onehot, onehot, valid, has_regions=False)
    assert loss > 0.0


def test_regions_use_each_sigmoid_logit_alone():
    region_a = label_map([0, 0, 1, 1, 1, 1, 0, 0])[:, 0]
    region_b = label_map([0, 0, 0, 0, 1, 1, 0, 0])[:, 0]  # inside region a, as nnU-Net's nested regions
    targets = torch.stack([region_a, region_b], dim=1)
    valid = torch.ones(1, 1, ROWS, 8)
    logits = torch.randn(1, 2, ROWS, 8, generator=torch.Generator().manual_seed(1))
    loss, grad = loss_and_grad(logits, targets, valid, has_regions=True)

    band = boundary_band(targets)
    assert columns_of(band[0, 0]) == [1, 2, 5, 6] and columns_of(band[0, 1]) == [3, 4, 5, 6]
    t = 2 * targets - 1
    reference = (torch.relu(1.0 - t * logits) * band).sum() / band.sum()
    assert loss == pytest.approx(reference.item(), rel=1e-6)
    assert float((grad * t).max()) <= 0.0  # descent raises logits inside each region, lowers them outside
    assert torch.equal(grad != 0, (band > 0) & (1.0 - t * logits > 0))  # only active band pixels, each region alone
    loss, _ = loss_and_grad(2.0 * t, targets, valid, has_regions=True)
    assert loss == 0.0


def test_ignored_pixels_get_no_gradient_and_do_not_change_the_loss():
    columns = [0, 0, 1, 1, 2, 2, 9, 9]  # 9 = ignore label, in class 2's outer band
    onehot, valid = class_targets(columns, 3, ignore_label=9)
    assert float(onehot[0, 0, :, 6:].min()) == 1.0  # dense_targets sets ignored labels to background
    logits = torch.randn(1, 3, ROWS, 8, generator=torch.Generator().manual_seed(2))
    loss, grad = loss_and_grad(logits, onehot, valid, has_regions=False)
    assert float(grad[..., 6:].abs().max()) == 0.0
    assert float(grad[..., :6].abs().max()) > 0.0
    changed = logits.clone()
    changed[..., 6:] = torch.tensor([-5.0, 3.0, 7.0])[:, None, None]
    assert loss_and_grad(changed, onehot, valid, has_regions=False)[0] == loss
    # The normaliser counts labelled band pixels only: class 2's band loses column 6 (3 of its 4 columns stay).
    correct = 4.0 * onehot
    correct[0, :, :, 3] = torch.tensor([0.0, 0.0, 0.0])[:, None]  # a class-1 pixel, margin 0 in both bands
    loss, _ = loss_and_grad(correct, onehot, valid, has_regions=False)
    assert loss == pytest.approx(2 * ROWS * 1.0 / ((4 + 3) * ROWS))


def test_object_touching_the_image_border_has_no_band_along_the_border():
    columns = [1, 1, 0, 0, 0, 0, 2, 2]
    onehot, valid = class_targets(columns, 3)
    band = boundary_band(onehot)
    assert columns_of(band[0, 1]) == [1, 2] and columns_of(band[0, 2]) == [5, 6]
    logits = torch.zeros(1, 3, ROWS, 8)
    _, grad = loss_and_grad(logits, onehot, valid, has_regions=False)
    assert float(grad[..., [0, 3, 4, 7]].abs().max()) == 0.0  # border and interior pixels: no boundary
    assert float(true_class_grad(grad, onehot)[..., [1, 2, 5, 6]].max()) < 0.0
