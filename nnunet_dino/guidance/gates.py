"""Gates that apply guide masks to feature maps of the segmentation network.

``residual`` (default): f * (1 + tanh(W m + b)) with W, b zero-initialised. It is the identity at the start and
stays bounded in (0, 2): an uninformative guide cannot erase features, and each channel learns how much, and
which class's guide, it follows. ``multiplicative`` is the published form f * g (ablation; g = mean over guides).
"""
from __future__ import annotations

import torch
import torch.nn as nn

GATE_MODES = ("residual", "multiplicative")


class GuideGate(nn.Module):
    def __init__(self, num_guides: int, channels: int, mode: str = "residual", spatial_dims: int = 2):
        super().__init__()
        if mode not in GATE_MODES:
            raise ValueError(f"Gate mode must be one of {GATE_MODES}, got {mode!r}.")
        if spatial_dims not in (2, 3):
            raise ValueError(f"Gates act on 2D or 3D feature maps, got spatial_dims={spatial_dims}.")
        self.mode = mode
        if mode == "residual":
            self.mix = (nn.Conv2d if spatial_dims == 2 else nn.Conv3d)(num_guides, channels, 1)
            nn.init.zeros_(self.mix.weight)
            nn.init.zeros_(self.mix.bias)

    def forward(self, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if self.mode == "multiplicative":
            return features * masks.mean(dim=1, keepdim=True)
        return features * (1 + torch.tanh(self.mix(masks.to(features.dtype))))
