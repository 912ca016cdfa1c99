"""DinoTapEncoder: nnU-Net patch -> input adapter -> DINO -> patch-token maps of several blocks ("taps").

The encoder SegDINO v1 and v2 share. The backbone is tuned in one of three ways:

- ``frozen`` (the papers): every ViT weight has requires_grad False, the ViT is pinned to eval mode (DinoBackbone
  keeps it there through ``.train()``), and the forward runs without autograd, so the backbone cannot change
  and costs no activation memory. Upstream SegDINO never froze it (the optimizer received every parameter).
- ``lora``: peft adapters on the attention projections (LoraSettings); base weights frozen.
- ``full``: every ViT weight trains.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..backbone import (CTIntensity, DinoArchitecture, DinoBackbone, DinoInputAdapter, LoraSettings, apply_lora,
                        get_architecture)

TUNING_MODES = ("frozen", "lora", "full")

# SegDINO's taps (0-based block indices): [2, 5, 8, 11] for 12-block ViTs, [4, 11, 17, 23] for ViT-L.
_PAPER_TAPS = {12: (2, 5, 8, 11), 24: (4, 11, 17, 23)}


def paper_tap_layers(arch: DinoArchitecture) -> tuple[int, ...]:
    """The blocks SegDINO taps for ``arch``; four evenly spaced blocks ending at the last for other depths."""
    return _PAPER_TAPS.get(arch.depth, arch.default_layers)


@dataclass(frozen=True)
class DinoEncoderConfig:
    """Fields every DINO-tap network shares. Trainer variants override fields, nothing else."""
    dino_arch: str = "dinov3_vits16"
    tap_layers: tuple[int, ...] | None = None  # None: paper_tap_layers(arch)
    tuning: str = "frozen"  # one of TUNING_MODES
    lora: LoraSettings = field(default_factory=LoraSettings)  # used when tuning == "lora"
    min_short_side_tokens: int = 16
    ct_intensity: CTIntensity = field(default_factory=CTIntensity)  # CT channels: via HU into the weights' convention

    def __post_init__(self):
        if self.tuning not in TUNING_MODES:
            raise ValueError(f"tuning must be one of {TUNING_MODES}, got {self.tuning!r}.")
        arch = get_architecture(self.dino_arch)
        layers = self.layers(arch)
        if len(layers) != 4:
            raise ValueError(f"SegDINO taps exactly 4 blocks, got tap_layers={layers}.")
        bad = [i for i in layers if not 0 <= i < arch.depth]
        if bad:
            raise ValueError(f"tap_layers {bad} out of range for {arch.name} with {arch.depth} blocks.")
        if self.min_short_side_tokens < 1:
            raise ValueError(f"min_short_side_tokens must be >= 1, got {self.min_short_side_tokens}.")

    def layers(self, arch: DinoArchitecture) -> tuple[int, ...]:
        return tuple(self.tap_layers) if self.tap_layers is not None else paper_tap_layers(arch)


class DinoTapEncoder(nn.Module):
    def __init__(self, config: DinoEncoderConfig, in_channels: int, patch_hw: Sequence[int],
                 normalization_schemes: Sequence[str] | None, intensity_properties: Mapping | None = None):
        super().__init__()
        arch = get_architecture(config.dino_arch)
        self.layers = config.layers(arch)
        self.tuning = config.tuning
        self.backbone = DinoBackbone(arch)
        if config.tuning == "frozen":
            self.backbone.freeze()
        elif config.tuning == "lora":
            apply_lora(self.backbone, config.lora)
        self.adapter = DinoInputAdapter(in_channels, arch.patch_size, patch_hw, config.min_short_side_tokens,
                                        normalization_schemes, arch.default_pretraining, intensity_properties,
                                        config.ct_intensity)
        if config.tuning == "frozen" and self.adapter.channel_projection is not None:
            # Its gradient would have to flow through the whole ViT, which a frozen forward never records: it
            # stays at its initialisation (the channel mean). The LoRA and full variants train it.
            self.adapter.channel_projection.requires_grad_(False)

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    @property
    def token_hw(self) -> tuple[int, int]:
        return self.adapter.token_hw

    @property
    def patch_hw(self) -> tuple[int, int]:
        return self.adapter.image_hw

    @property
    def backbone_trains(self) -> bool:
        return any(p.requires_grad for p in self.backbone.parameters())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W) nnU-Net patch -> one (B, embed_dim, h_tokens, w_tokens) map per tap, shallowest first."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.backbone_trains):
            return self.backbone.patch_features(self.adapter(x), self.layers)

    def to_patch_grid(self, fmap: torch.Tensor, out_hw: Sequence[int]) -> torch.Tensor:
        """Bilinearly resample a map spanning the (resized, padded) ViT input onto the nnU-Net patch grid scaled to
        ``out_hw``, dropping the padding. For a patch the adapter did not resize this is a plain upsample."""
        return self.adapter.token_map_to(fmap, out_hw)
