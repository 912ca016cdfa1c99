"""Multi-crop views of nnU-Net-normalised 2D slices, with augmentations that suit medical images.

Geometry is expressed relative to the *trainer's view*: a global crop at scale 1 is a window of the plans' patch size
(times ``crop_extent``), i.e. what the trainers cut from a slice; smaller scales zoom in (DINO's random resized crop).
Windows may extend past the slice, where they are zero (the dataset mean after nnU-Net's normalisation, and what
nnU-Net pads with). One ``grid_sample`` per crop does the crop, resize, mirroring and an aspect jitter at once.

Augmentations (no colour jitter, solarisation or greyscale conversion: grey images have no colour, and CT/MRI
intensities carry meaning): mirroring on both axes, multiplicative brightness and contrast, gamma, Gaussian blur
(strong on the first global crop, weak on the second, as DINO), Gaussian noise; 3-channel images get a mild
per-channel gain instead of hue/saturation changes. Every draw comes from an explicit torch.Generator, so a step's
crops depend only on (seed, step, rank): resuming reproduces them exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CropAugmentation:
    brightness: tuple[float, float] = (0.75, 1.25)
    brightness_p: float = 0.8
    contrast: tuple[float, float] = (0.75, 1.25)
    contrast_p: float = 0.8
    gamma: tuple[float, float] = (0.7, 1.5)
    gamma_p: float = 0.3
    blur_sigma: tuple[float, float] = (0.1, 1.5)  # in output voxels
    noise_std: tuple[float, float] = (0.0, 0.1)
    noise_p: float = 0.1
    channel_gain: tuple[float, float] = (0.9, 1.1)  # 3-channel inputs only
    aspect: tuple[float, float] = (3 / 4, 4 / 3)


def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _p(g: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=g)) < p


def crop_window(image: torch.Tensor, out_hw: tuple[int, int], window_hw: tuple[float, float],
                scale: tuple[float, float], g: torch.Generator, aug: CropAugmentation) -> torch.Tensor:
    """A random window of ``scale`` x the area of ``window_hw`` (voxels), at a random aspect and position in the
    slice, resampled to ``out_hw`` and randomly mirrored. image: (C, H, W)."""
    _, H, W = image.shape
    area = _u(g, *scale) * window_hw[0] * window_hw[1]
    log_aspect = _u(g, math.log(aug.aspect[0]), math.log(aug.aspect[1]))
    ratio = math.exp(log_aspect) * window_hw[0] / window_hw[1]  # height / width, around the window's own aspect
    h, w = math.sqrt(area * ratio), math.sqrt(area / ratio)
    # Centre anywhere that keeps the window on the slice where possible (centred when the window is larger).
    cy = _u(g, min(h / 2, H / 2), max(H - h / 2, H / 2))
    cx = _u(g, min(w / 2, W / 2), max(W - w / 2, W / 2))
    sy = -1.0 if _p(g, 0.5) else 1.0
    sx = -1.0 if _p(g, 0.5) else 1.0
    # affine_grid works in normalised coordinates [-1, 1] of the input (align_corners=False).
    theta = torch.tensor([[sx * w / W, 0.0, 2 * cx / W - 1], [0.0, sy * h / H, 2 * cy / H - 1]],
                         dtype=image.dtype).unsqueeze(0)
    grid = F.affine_grid(theta, [1, image.shape[0], *out_hw], align_corners=False)
    return F.grid_sample(image.unsqueeze(0), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[0]
    y = x.unsqueeze(0)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return y[0]


def augment_intensity(x: torch.Tensor, g: torch.Generator, aug: CropAugmentation, blur_p: float) -> torch.Tensor:
    """Intensity augmentations on one crop (C, h, w) in nnU-Net's normalised space."""
    if x.shape[0] == 3 and _p(g, 0.8):
        gains = torch.tensor([_u(g, *aug.channel_gain) for _ in range(3)], dtype=x.dtype).view(3, 1, 1)
        x = x * gains
    if _p(g, aug.brightness_p):
        x = x * _u(g, *aug.brightness)
    if _p(g, aug.contrast_p):
        mean = x.mean()
        x = (x - mean) * _u(g, *aug.contrast) + mean
    if _p(g, aug.gamma_p):
        # nnU-Net's gamma: rescale to [0, 1], apply, restore the original range.
        lo, hi = x.min(), x.max()
        span = (hi - lo).clamp_min(1e-6)
        x = ((x - lo) / span) ** _u(g, *aug.gamma) * span + lo
    if _p(g, blur_p):
        x = _blur(x, _u(g, *aug.blur_sigma))
    if _p(g, aug.noise_p):
        x = x + torch.randn(x.shape, generator=g, dtype=x.dtype) * _u(g, *aug.noise_std)
    return x


@dataclass(frozen=True)
class MultiCropGeometry:
    global_hw: tuple[int, int]  # output size of a global crop, in voxels (= the window at scale 1)
    local_hw: tuple[int, int]
    global_scale: tuple[float, float]
    local_scale: tuple[float, float]
    n_local: int


def multi_crop(image: torch.Tensor, geo: MultiCropGeometry, g: torch.Generator,
               aug: CropAugmentation = CropAugmentation()) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """2 global and ``n_local`` local crops of one slice (C, H, W)."""
    window = tuple(float(s) for s in geo.global_hw)
    globals_ = [augment_intensity(crop_window(image, geo.global_hw, window, geo.global_scale, g, aug), g, aug, blur_p)
                for blur_p in (1.0, 0.1)]
    locals_ = [augment_intensity(crop_window(image, geo.local_hw, window, geo.local_scale, g, aug), g, aug, 0.5)
               for _ in range(geo.n_local)]
    return globals_, locals_
