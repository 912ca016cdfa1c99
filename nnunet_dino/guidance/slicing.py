"""Which 2D planes of a 3D patch the ViT sees, and how the maps of the planes it skips are filled in.

- **Axis**: the planes are perpendicular to one axis of nnU-Net's (transposed) patch. Default: the axis with the
  coarsest spacing in the configuration's plans, so anisotropic CT (e.g. 2.5 x 0.7 x 0.7 mm) is sliced axially and
  every plane the ViT sees is a full-resolution in-plane image, as DINO was pretrained on. Ties (isotropic data, or
  two equally coarse axes; spacings within 0.1% count as equal) go to the lowest axis index: nnU-Net's
  ``transpose_forward`` puts the out-of-plane axis of the dataset first, so axis 0 is the natural slicing axis
  there too. Override: ``GuiDINOConfig.slice_axis`` in a trainer variant, else ``$nnUNet_dino_slice_axis``.
- **Stride k**: the ViT runs on planes 0, k, 2k, ... and always on the last plane, so no plane lies beyond the last
  computed one; the per-plane token maps in between are linearly interpolated from the two computed neighbours.
  ViT cost per patch: ceil((n - 1) / k) + 1 planes instead of n. Override: ``GuiDINOConfig.slice_stride``, else
  ``$nnUNet_dino_slice_stride``, else DEFAULT_SLICE_STRIDE.

Both choices shape the trained network (the axis fixes the ViT's input geometry, the stride what the TokenBook
learned from), so the network records them and refuses a checkpoint trained with others (slicewise.py).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

SLICE_AXIS_ENV_VAR = "nnUNet_dino_slice_axis"
SLICE_STRIDE_ENV_VAR = "nnUNet_dino_slice_stride"
# Every 2nd plane: half the ViT cost of stride 1 at Hippocampus and CT-like plans (docs/benchmarks.md, "GuiDINO 3D
# cost"), while neighbouring planes of a 3D patch (1 voxel apart after nnU-Net's resampling) carry nearly the same
# image, so the interpolated token maps lose little.
DEFAULT_SLICE_STRIDE = 2
SPACING_TIE_TOLERANCE = 1e-3


def coarsest_spacing_axis(spacing: Sequence[float]) -> int:
    """The axis with the largest spacing; ties (within 0.1%) go to the lowest index (see module doc)."""
    if len(spacing) == 0 or any(not float(s) > 0 for s in spacing):
        raise ValueError(f"spacing must be positive per axis, got {list(spacing)}.")
    coarsest = max(float(s) for s in spacing)
    return next(i for i, s in enumerate(spacing) if float(s) >= coarsest * (1 - SPACING_TIE_TOLERANCE))


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer.") from None


def check_slice_axis(axis, ndim: int = 3, source: str = "slice_axis") -> int:
    if isinstance(axis, bool) or not isinstance(axis, int) or not 0 <= axis < ndim:
        raise ValueError(f"{source} must be an axis of the {ndim}D patch (0..{ndim - 1}, in nnU-Net's transposed axis "
                         f"order), got {axis!r}.")
    return axis


def check_slice_stride(stride, source: str = "slice_stride") -> int:
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"{source} must be an integer >= 1 (1: the ViT sees every plane), got {stride!r}.")
    return stride


def resolve_slice_axis(configured: int | None, spacing: Sequence[float]) -> int:
    """``configured`` (a trainer variant's GuiDINOConfig.slice_axis), else $nnUNet_dino_slice_axis, else the coarsest
    spacing axis."""
    if configured is not None:
        return check_slice_axis(configured, len(spacing))
    from_env = _env_int(SLICE_AXIS_ENV_VAR)
    if from_env is not None:
        return check_slice_axis(from_env, len(spacing), SLICE_AXIS_ENV_VAR)
    return coarsest_spacing_axis(spacing)


def resolve_slice_stride(configured: int | None) -> int:
    """``configured`` (GuiDINOConfig.slice_stride), else $nnUNet_dino_slice_stride, else DEFAULT_SLICE_STRIDE."""
    if configured is not None:
        return check_slice_stride(configured)
    from_env = _env_int(SLICE_STRIDE_ENV_VAR)
    if from_env is not None:
        return check_slice_stride(from_env, SLICE_STRIDE_ENV_VAR)
    return DEFAULT_SLICE_STRIDE


def sampled_planes(num_planes: int, stride: int) -> list[int]:
    """The planes the ViT runs on: 0, k, 2k, ... and the last one."""
    check_slice_stride(stride)
    if num_planes < 1:
        raise ValueError(f"a patch needs at least one plane, got {num_planes}.")
    planes = list(range(0, num_planes, stride))
    if planes[-1] != num_planes - 1:
        planes.append(num_planes - 1)
    return planes


def interpolation_plan(num_planes: int, stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every plane i: (lower, upper) positions in the list of sampled planes and the weight t of the upper one,
    so that map_i = (1 - t) * map_lower + t * map_upper. At a sampled plane lower == upper and t == 0: exact."""
    sampled = sampled_planes(num_planes, stride)
    lower, upper, weight = [], [], []
    for i in range(num_planes):
        j = max(p for p, s in enumerate(sampled) if s <= i)
        if sampled[j] == i:
            lower.append(j), upper.append(j), weight.append(0.0)
        else:
            lower.append(j), upper.append(j + 1)
            weight.append((i - sampled[j]) / (sampled[j + 1] - sampled[j]))
    return torch.tensor(lower), torch.tensor(upper), torch.tensor(weight)


def interpolate_planes(sampled_maps: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, weight: torch.Tensor
                       ) -> torch.Tensor:
    """(B, m, ...) maps of the m sampled planes -> (B, n, ...) maps of every plane (interpolation_plan's n)."""
    t = weight.to(sampled_maps.dtype).view(1, -1, *([1] * (sampled_maps.ndim - 2)))
    return sampled_maps[:, lower] * (1 - t) + sampled_maps[:, upper] * t
