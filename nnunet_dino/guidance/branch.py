"""The guidance branch: nnU-Net patch -> input adapter -> DINO patch tokens -> TokenBook guide masks."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..backbone import DinoBackbone, DinoInputAdapter
from .tokenbook import TokenBook


class DinoGuidance(nn.Module):
    spatial_dims = 2  # slicewise.SliceWiseGuidance: 3

    def __init__(self, backbone: DinoBackbone, adapter: DinoInputAdapter, tokenbook: TokenBook, layer: int):
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter
        self.tokenbook = tokenbook
        self.layer = layer % backbone.arch.depth

    @property
    def backbone_trains(self) -> bool:
        return any(p.requires_grad for p in self.backbone.parameters())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) nnU-Net patch -> (guide scores, guide masks), each (B, K, h_tokens, w_tokens)."""
        vit_input = self.adapter(x)
        # A frozen backbone needs no autograd graph: saves the activation memory of the whole ViT.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.backbone_trains):
            tokens = self.backbone.patch_features(vit_input, [self.layer])[0]
        return self.tokenbook(tokens)

    def guide_to(self, masks: torch.Tensor, out_shape) -> torch.Tensor:
        """Resample token-grid guides (B, K, h, w) onto a stage grid ``out_shape`` (H', W') of the patch."""
        return self.adapter.token_map_to(masks, out_shape)

    def dense_to_tokens(self, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Area-average a dense (B, K, H, W) map onto the token grid: (map, valid fraction of each token)."""
        return self.adapter.dense_to_tokens(dense)
