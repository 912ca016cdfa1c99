"""SegDINO (v1): frozen DINOv3, four taps, a light alignment head, one 1x1 classifier.

Per tap i (shallowest first): 1x1 conv embed_dim -> level_widths[i], then 3x3 conv -> fused_width (128); the four
maps are concatenated (4 x 128 = 512 channels) and a 1x1 conv gives one logit map per nnU-Net output channel.

Head resolution (``head_stride``):
- 16 (the paper): everything at the token grid H/16; logits bilinearly upsampled x16.
- 4 (the later upstream head): tap 1's projection goes through a stride-4 transposed conv before its 3x3 conv;
  the other taps' aligned maps are bilinearly upsampled to H/4; logits upsampled x4.
The final upsample goes straight onto the nnU-Net patch grid (DinoTapEncoder.to_patch_grid), so the output has
exactly the input patch size even when the input adapter enlarged or padded the patch.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dino_taps import DinoEncoderConfig, DinoTapEncoder

HEAD_STRIDES = (16, 4)


@dataclass(frozen=True)
class SegDINOConfig(DinoEncoderConfig):
    # Per-tap widths of the 1x1 projections. The paper gives ~2.2M trainable parameters for ViT-S; the doubling
    # widths 96/192/384/768 (DPT-style) are the ones that give that count (see docs/segdino.md).
    level_widths: tuple[int, int, int, int] = (96, 192, 384, 768)
    fused_width: int = 128
    head_stride: int = 16  # 16: the paper's head; 4: the later upstream head

    def __post_init__(self):
        super().__post_init__()
        if len(self.level_widths) != 4 or min(self.level_widths) < 1 or self.fused_width < 1:
            raise ValueError(f"level_widths must be 4 positive widths and fused_width positive, got "
                             f"{self.level_widths}, {self.fused_width}.")
        if self.head_stride not in HEAD_STRIDES:
            raise ValueError(f"head_stride must be one of {HEAD_STRIDES}, got {self.head_stride}.")


class SegDINOHead(nn.Module):
    """Align the four tap maps to a common width, concatenate, classify (see module doc)."""

    def __init__(self, embed_dim: int, num_classes: int, level_widths: Sequence[int], fused_width: int,
                 head_stride: int):
        super().__init__()
        self.head_stride = head_stride
        self.project = nn.ModuleList(nn.Conv2d(embed_dim, w, 1) for w in level_widths)
        # H/4 head: a learned x4 upsample of the shallowest tap (the finest detail), as the later upstream head.
        self.upsample_first = (nn.ConvTranspose2d(level_widths[0], level_widths[0], 4, stride=4)
                               if head_stride == 4 else None)
        self.align = nn.ModuleList(nn.Conv2d(w, fused_width, 3, padding=1) for w in level_widths)
        self.classify = nn.Conv2d(len(level_widths) * fused_width, num_classes, 1)

    def forward(self, taps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Token-grid tap maps -> logits at H/16 or H/4 of the ViT input."""
        aligned = []
        for i, (tap, project, align) in enumerate(zip(taps, self.project, self.align)):
            y = project(tap)
            if i == 0 and self.upsample_first is not None:
                y = self.upsample_first(y)
            aligned.append(align(y))
        if self.head_stride == 4:
            size = aligned[0].shape[-2:]
            aligned = [aligned[0]] + [F.interpolate(a, size=size, mode="bilinear", align_corners=False)
                                      for a in aligned[1:]]
        return self.classify(torch.cat(aligned, dim=1))


class SegDINO(nn.Module):
    """(B, C, H, W) nnU-Net patch -> (B, num_classes, H, W) logits. No deep supervision (see set_deep_supervision)."""

    def __init__(self, encoder: DinoTapEncoder, head: SegDINOHead):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self._deep_supervision = False

    @property
    def deep_supervision(self) -> bool:
        return self._deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool) -> None:
        if enabled:
            raise ValueError("SegDINO (v1) has a single output at the patch resolution: it cannot do deep "
                             "supervision. Use SegDINOv2 with deep_supervision=True for that.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.encoder(x))
        return self.encoder.to_patch_grid(logits, x.shape[-2:])


def build_segdino(config: SegDINOConfig, num_input_channels: int, num_outputs: int, patch_size: Sequence[int],
                  normalization_schemes: Sequence[str] | None, intensity_properties: Mapping | None = None) -> SegDINO:
    """Deterministic structure (nnUNetv2_predict rebuilds it and loads the checkpoint strictly). Pretrained DINO
    weights are loaded by the trainer at training start, never here."""
    encoder = DinoTapEncoder(config, num_input_channels, patch_size, normalization_schemes, intensity_properties)
    head = SegDINOHead(encoder.embed_dim, num_outputs, config.level_widths, config.fused_width, config.head_stride)
    return SegDINO(encoder, head)
