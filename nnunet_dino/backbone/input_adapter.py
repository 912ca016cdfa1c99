"""From an nnU-Net patch (B, C, H, W; normalised by nnU-Net) to the ViT's input space, and back.

Channels: 1 channel is repeated to RGB; 3 channels are taken as RGB; any other count goes through a learnable
1x1 projection to 3 channels initialised to the channel mean (so training starts from the grey-level view).

Intensities:
- z-scored (MRI/US): already has the first two moments the pretrained ViT saw after its own normalisation
  ((p - mean) / std), so it passes unchanged;
- rescaled to [0, 1] (RGB PNGs; 1 or 3 channels): normalised per RGB channel with the statistics of the weights'
  pretraining data (ImageNet for LVD, SAT statistics; none for MedDINOv3, which never saw [0, 1] images). With other
  channel counts they enter the projection as they are;
- CT (clipped and z-scored by nnU-Net), per input channel before the projection: mapped back to Hounsfield units
  with the plans' foreground intensity properties, then into the weights' convention (MedDINOv3: its HU clip and
  z-score; natural-image weights: an HU window into [0, 1], then their statistics), see ct_intensity.py;
  ``CTIntensity(mode="nnunet")`` passes nnU-Net's z-score unchanged instead.
Every mapping is kept in buffers, so checkpoints carry it and prediction reproduces training exactly.

Geometry: patches are upsampled (bilinear) so that the short side spans ``min_short_side_tokens`` tokens, then
zero-padded (the mean in ViT space) at the bottom/right to a multiple of the patch size. Nothing is cropped; the
helpers below map token maps back onto the original patch grid.

Token budget: the resulting token grid may have at most ``max_tokens`` tokens (default DEFAULT_MAX_TOKENS = 4096,
``$nnUNet_dino_max_tokens`` or the ``max_tokens`` argument to change it). The upsampling rule alone has no bound: an
elongated 16x768 patch becomes 256x12288, i.e. 12,288 tokens. Beyond the cap the adapter refuses at construction,
i.e. when the trainer builds its network in ``initialize`` (before any training) and when the predictor rebuilds it,
with the patch, the grid, the cap and what to do (TokenBudgetError); see ``DEFAULT_MAX_TOKENS`` for the number.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# The token budget is plain arithmetic in a torch-free module (the plans tool checks the same cap); re-exported here,
# next to the geometry it bounds.
from .token_budget import (DEFAULT_MAX_TOKENS, MAX_TOKENS_ENV_VAR, TokenBudgetError, check_token_budget,
                                     max_tokens_setting, token_geometry)
from .ct_intensity import CT_SCHEME, CTChannelMap, CTIntensity
from .registry import PIXEL_STATS

# nnU-Net normalisation schemes whose output lies in [0, 1] rather than being standardised.
UNIT_RANGE_SCHEMES = ("RGBTo0_1Normalization", "RescaleTo01Normalization")

__all__ = ["DEFAULT_MAX_TOKENS", "MAX_TOKENS_ENV_VAR", "UNIT_RANGE_SCHEMES", "DinoInputAdapter", "TokenBudgetError",
           "check_token_budget", "max_tokens_setting", "token_geometry"]


class DinoInputAdapter(nn.Module):
    def __init__(self, in_channels: int, patch_size: int, image_hw: Sequence[int], min_short_side_tokens: int = 16,
                 normalization_schemes: Sequence[str] | None = None, pretraining: str = "lvd1689m",
                 intensity_properties: Mapping | None = None, ct_intensity: CTIntensity = CTIntensity(),
                 max_tokens: int | None = None):
        """``intensity_properties``: the plans' foreground_intensity_properties_per_channel, needed for CT channels
        unless ``ct_intensity.mode == "nnunet"``. ``max_tokens``: the token cap (None: $nnUNet_dino_max_tokens, else
        DEFAULT_MAX_TOKENS); a larger token grid raises TokenBudgetError."""
        super().__init__()
        if len(image_hw) != 2:
            raise ValueError(f"DinoInputAdapter works on 2D patches; got patch size {tuple(image_hw)}. Use the 2d "
                             f"configuration (3D volumes are trained slice-wise).")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}.")
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.image_hw = tuple(int(s) for s in image_hw)
        if min(self.image_hw) < 1:
            raise ValueError(f"Patch size {self.image_hw} has an empty axis.")
        check_token_budget(self.image_hw, patch_size, min_short_side_tokens, max_tokens_setting(max_tokens))
        self.resized_hw, self.padded_hw, self.token_hw = token_geometry(self.image_hw, patch_size,
                                                                        min_short_side_tokens)
        self.channel_projection = nn.Conv2d(in_channels, 3, 1, bias=False) if in_channels not in (1, 3) else None
        if self.channel_projection is not None:
            nn.init.constant_(self.channel_projection.weight, 1.0 / in_channels)
        schemes = list(normalization_schemes or ["ZScoreNormalization"] * in_channels)
        if len(schemes) != in_channels:
            raise ValueError(f"{len(schemes)} normalisation schemes for {in_channels} channels.")
        self.ct_map = (CTChannelMap(schemes, intensity_properties, ct_intensity, self.channel_projection is not None)
                       if ct_intensity.mode == "hu" and CT_SCHEME in schemes else None)
        # What the RGB-space affine below sees: a mapped CT channel arrives in [0, 1] for natural-image weights.
        mapped_ct = [self.ct_map is not None and s == CT_SCHEME for s in schemes]
        if in_channels == 1:
            schemes, mapped_ct = schemes * 3, mapped_ct * 3
        elif in_channels != 3:
            # The projection mixes channels; nnU-Net inputs are standardised and CT channels already in ViT space.
            schemes, mapped_ct = ["ZScoreNormalization"] * 3, [False] * 3
        self._unit_range = [s in UNIT_RANGE_SCHEMES for s in schemes]
        self._mapped_ct = mapped_ct
        self.register_buffer("vit_scale", torch.ones(1, 3, 1, 1))
        self.register_buffer("vit_shift", torch.zeros(1, 3, 1, 1))
        self.set_pretraining(pretraining)

    def set_pretraining(self, pretraining: str) -> None:
        """Match the intensity affine to the pretraining data of the loaded weights (see module doc)."""
        if pretraining not in PIXEL_STATS:
            raise ValueError(f"Unknown pretraining data {pretraining!r}; known: {list(PIXEL_STATS)}.")
        stats = PIXEL_STATS[pretraining]
        unit_range = self._unit_range
        if self.ct_map is not None:
            self.ct_map.set_pretraining(pretraining)
            ct_unit = self.ct_map.outputs_unit_range(pretraining)
            unit_range = [u or (ct and ct_unit) for u, ct in zip(unit_range, self._mapped_ct)]
        scale, shift = torch.ones(3), torch.zeros(3)
        if stats is not None:
            mean, std = torch.tensor(stats[0]), torch.tensor(stats[1])
            unit = torch.tensor(unit_range)
            scale = torch.where(unit, 1.0 / std, scale)
            shift = torch.where(unit, -mean / std, shift)
        self.vit_scale.copy_(scale.view(1, 3, 1, 1))
        self.vit_shift.copy_(shift.view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != self.image_hw:
            raise ValueError(f"Expected a (B, {self.in_channels}, {self.image_hw[0]}, {self.image_hw[1]}) patch, got "
                             f"{tuple(x.shape)}.")
        if self.ct_map is not None:
            x = self.ct_map(x)
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        elif self.channel_projection is not None:
            x = self.channel_projection(x)
        x = x * self.vit_scale + self.vit_shift
        if self.resized_hw != self.image_hw:
            x = F.interpolate(x, size=self.resized_hw, mode="bilinear", align_corners=False)
        return self._pad(x)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        pad_h, pad_w = (p - r for p, r in zip(self.padded_hw, self.resized_hw))
        return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x

    def padded_grid(self, out_hw: Sequence[int]) -> tuple[int, int]:
        """The grid over the whole padded ViT input at the resolution at which ``out_hw`` spans the patch: what
        ``token_map_to`` resamples onto before it drops the padding (networks cap their decoders at it)."""
        full = tuple(int(round(int(o) * p / r)) for o, p, r in zip(out_hw, self.padded_hw, self.resized_hw))
        return tuple(max(f, int(o)) for f, o in zip(full, out_hw))

    def token_map_to(self, fmap: torch.Tensor, out_hw: Sequence[int]) -> torch.Tensor:
        """Resample a token-grid map onto the original patch grid scaled to ``out_hw`` (dropping the padding)."""
        out_hw = tuple(int(s) for s in out_hw)
        up = F.interpolate(fmap, size=self.padded_grid(out_hw), mode="bilinear", align_corners=False)
        return up[..., : out_hw[0], : out_hw[1]]

    def dense_to_tokens(self, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Area-average a dense (B, K, H, W) map onto the token grid. Returns (map, valid) where ``valid`` is the
        fraction of each token covering the real patch (0 for pure padding)."""
        if self.resized_hw != self.image_hw:
            dense = F.interpolate(dense, size=self.resized_hw, mode="bilinear", align_corners=False)
        ones = torch.ones_like(dense[:, :1])
        pooled = F.avg_pool2d(self._pad(dense), self.patch_size)
        valid = F.avg_pool2d(self._pad(ones), self.patch_size)
        return pooled / valid.clamp_min(1e-6), valid
