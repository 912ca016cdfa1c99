"""The guidance branch for 3D patches: the 2D ViT on planes of the patch, stacked into a 3D guide volume.

(B, C, D0, D1, D2) patch -> image channels only -> the sampled planes perpendicular to ``slice_axis`` (slicing.py),
all B*m of them through the input adapter and the ViT in one call -> per-plane token maps, linearly interpolated
onto every plane -> TokenBook per plane -> guide volume (B, K, n, h, w): plane-major, n planes along the slicing
axis, each an h x w token map of the plane. ``guide_to`` resamples it onto any stage's 3D grid (patch axis order).

The ViT's token budget (backbone/token_budget.py) bounds each plane's token grid, checked when the adapter is built:
attention runs per plane, so batching the planes grows the cost linearly, not quadratically.

Cascade (3d_cascade_fullres): nnU-Net appends the low-resolution segmentation as one-hot channels after the image
channels; only the first ``adapter.in_channels`` (the image's) reach the ViT (``vit_channels``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..backbone import DinoBackbone, DinoInputAdapter
from .branch import DinoGuidance
from .slicing import (SLICE_AXIS_ENV_VAR, SLICE_STRIDE_ENV_VAR, check_slice_axis, check_slice_stride,
                      interpolate_planes, interpolation_plan, sampled_planes)
from .tokenbook import TokenBook


class SlicingMismatchError(RuntimeError):
    """A checkpoint trained with another slice axis or stride than the network being loaded was built with."""


class SliceWiseGuidance(DinoGuidance):
    spatial_dims = 3

    def __init__(self, backbone: DinoBackbone, adapter: DinoInputAdapter, tokenbook: TokenBook, layer: int,
                 patch_size: Sequence[int], slice_axis: int, slice_stride: int, input_channels: int):
        super().__init__(backbone, adapter, tokenbook, layer)
        self.patch_size = tuple(int(s) for s in patch_size)
        if len(self.patch_size) != 3:
            raise ValueError(f"SliceWiseGuidance needs a 3D patch, got {self.patch_size}.")
        self.slice_axis = check_slice_axis(slice_axis)
        self.slice_stride = check_slice_stride(slice_stride)
        plane_hw = tuple(s for i, s in enumerate(self.patch_size) if i != self.slice_axis)
        if tuple(adapter.image_hw) != plane_hw:
            raise ValueError(f"the adapter is built for {adapter.image_hw} images, but planes perpendicular to axis "
                             f"{self.slice_axis} of the patch {self.patch_size} are {plane_hw}.")
        if input_channels < adapter.in_channels:
            raise ValueError(f"{input_channels} input channels, fewer than the {adapter.in_channels} image channels.")
        self.input_channels = int(input_channels)
        self.num_planes = self.patch_size[self.slice_axis]
        self.planes_seen = sampled_planes(self.num_planes, self.slice_stride)
        lower, upper, weight = interpolation_plan(self.num_planes, self.slice_stride)
        self.register_buffer("_plane_lower", lower, persistent=False)
        self.register_buffer("_plane_upper", upper, persistent=False)
        self.register_buffer("_plane_weight", weight, persistent=False)
        # In the checkpoint: a model must be rebuilt with the slicing it was trained with (checked on loading).
        self.register_buffer("slicing", torch.tensor([self.slice_axis, self.slice_stride]))
        self.register_load_state_dict_pre_hook(self._check_slicing)

    @property
    def vit_channels(self) -> tuple[int, ...]:
        """The input channels the ViT sees (the image's; not the cascade's low-res segmentation)."""
        return tuple(range(self.adapter.in_channels))

    def describe(self) -> str:
        extra = self.input_channels - self.adapter.in_channels
        (ph, pw), (th, tw) = self.adapter.image_hw, self.adapter.token_hw
        return (f"slice-wise: planes perpendicular to patch axis {self.slice_axis} ({ph}x{pw}, {th}x{tw} tokens "
                f"each), the ViT on {len(self.planes_seen)} of {self.num_planes} planes (stride {self.slice_stride}, last plane "
                f"included; the others interpolated); ViT input channels {list(self.vit_channels)} of "
                f"{self.input_channels}" + (f" ({extra} more: the cascade's low-resolution segmentation, not shown to "
                                            f"the ViT)" if extra else ""))

    def _check_slicing(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                       error_msgs):
        saved = state_dict.get(prefix + "slicing")
        if saved is None or torch.equal(saved.cpu().long(), self.slicing.cpu().long()):
            return
        axis, stride = (int(v) for v in saved)
        raise SlicingMismatchError(
            f"This checkpoint was trained with slice axis {axis} and slice stride {stride}; the network was built with "
            f"axis {self.slice_axis} and stride {self.slice_stride}. Set {SLICE_AXIS_ENV_VAR}={axis} and "
            f"{SLICE_STRIDE_ENV_VAR}={stride} (or unset them, if the training used the trainer's defaults).")

    # ------------------------------------------------------------------------------------------ forward
    def planes(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D0, D1, D2) patch -> (B * m, C_image, H, W): the sampled planes of the image channels."""
        if x.ndim != 5 or x.shape[1] != self.input_channels or tuple(x.shape[2:]) != self.patch_size:
            raise ValueError(f"Expected a (B, {self.input_channels}, {', '.join(map(str, self.patch_size))}) patch, "
                             f"got {tuple(x.shape)}.")
        image = x[:, : self.adapter.in_channels].movedim(2 + self.slice_axis, 1)  # (B, n, C, H, W)
        picked = image[:, self.planes_seen]
        return picked.reshape(-1, *picked.shape[2:])

    def plane_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Token maps of every plane, (B, n, dim, h, w): computed by the ViT at the sampled planes (one batched
        call), linearly interpolated in between."""
        b = x.shape[0]
        vit_input = self.adapter(self.planes(x))
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.backbone_trains):
            tokens = self.backbone.patch_features(vit_input, [self.layer])[0]
        tokens = tokens.reshape(b, len(self.planes_seen), *tokens.shape[1:])
        if len(self.planes_seen) == self.num_planes:
            return tokens
        return interpolate_planes(tokens, self._plane_lower, self._plane_upper, self._plane_weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, D0, D1, D2) patch -> (guide scores, guide masks), each (B, K, n, h, w)."""
        return self.guides_from_tokens(self.plane_tokens(x))

    def guides_from_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = tokens.shape[:2]
        scores, masks = self.tokenbook(tokens.reshape(b * n, *tokens.shape[2:]))
        return self._stack(scores, b), self._stack(masks, b)

    @staticmethod
    def _stack(planes: torch.Tensor, batch: int) -> torch.Tensor:
        """(B * n, K, h, w) -> (B, K, n, h, w)."""
        return planes.reshape(batch, -1, *planes.shape[1:]).transpose(1, 2)

    # ------------------------------------------------------------------------------------------ geometry
    def _to_planes(self, volume: torch.Tensor) -> torch.Tensor:
        """(B, K, D0, D1, D2) in patch axis order -> (B * n, K, H, W), planes perpendicular to the slicing axis."""
        planes = volume.movedim(2 + self.slice_axis, 1)
        return planes.reshape(-1, *planes.shape[2:])

    def guide_to(self, volume: torch.Tensor, out_shape: Sequence[int]) -> torch.Tensor:
        """Resample a guide volume (B, K, n, h, w) onto a stage grid ``out_shape`` (3 sizes, patch axis order):
        linearly along the planes, then in-plane as the 2D adapter does (bilinear, padding dropped)."""
        out_shape = tuple(int(s) for s in out_shape)
        b, k, n, h, w = volume.shape
        planes_out = out_shape[self.slice_axis]
        in_plane = tuple(s for i, s in enumerate(out_shape) if i != self.slice_axis)
        if planes_out != n:
            volume = F.interpolate(volume, size=(planes_out, h, w), mode="trilinear", align_corners=False)
        planes = volume.transpose(1, 2).reshape(b * planes_out, k, h, w)
        planes = self.adapter.token_map_to(planes, in_plane)
        return self._stack(planes, b).movedim(2, 2 + self.slice_axis)

    def dense_to_tokens(self, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Area-average a dense (B, K, D0, D1, D2) map onto the guide volume's grid: per plane onto its tokens.
        Returns (map, valid), each (B, K or 1, n, h, w); ``valid`` is the fraction of each token covering the patch."""
        b = dense.shape[0]
        pooled, valid = self.adapter.dense_to_tokens(self._to_planes(dense))
        return self._stack(pooled, b), self._stack(valid, b)
