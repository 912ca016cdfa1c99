"""The network a pretraining step trains: the DINO ViT, its iBOT mask token and lightly's DINO/iBOT projection heads.

The student and its EMA teacher are two instances of ``PretrainNetwork``. The ViT is the project's ``DinoBackbone``
(timm, canonical layout), so the exported weights are exactly the tensors the trainers load. Masked tokens are
replaced by the learnable ``mask_token`` after the patch embedding and before positions are added, as in DINOv2 /
DINOv3 (RoPE and learned position embeddings both still tell the model where a masked token is).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from lightly.models.modules.heads import DINOProjectionHead

from ..backbone import DinoBackbone


class PretrainNetwork(nn.Module):
    def __init__(self, backbone: DinoBackbone, dino_prototypes: int, ibot_prototypes: int, hidden_dim: int,
                 bottleneck_dim: int):
        super().__init__()
        self.backbone = backbone
        dim = backbone.arch.embed_dim
        # DINOv2/v3 start the mask token at zero.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dino_head = DINOProjectionHead(dim, hidden_dim, bottleneck_dim, dino_prototypes)
        self.ibot_head = DINOProjectionHead(dim, hidden_dim, bottleneck_dim, ibot_prototypes)

    @property
    def vit(self) -> nn.Module:
        return self.backbone.vit

    def tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS (B, D), patch tokens (B, h*w, D)) after the final norm; ``mask`` (B, h, w) bool replaces those
        patch embeddings by the mask token."""
        vit = self.vit
        x = vit.patch_embed(x)  # (B, h, w, D): dynamic_img_size
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype).view(1, 1, 1, -1), x)
        if self.backbone.arch.family == "dinov3":
            x, rope = vit._pos_embed(x)
            x = vit.norm_pre(x)
            for blk in vit.blocks:
                x = blk(x, rope=rope)
        else:
            x = vit._pos_embed(x)
            x = vit.patch_drop(x)
            x = vit.norm_pre(x)
            x = vit.blocks(x)
        x = vit.norm(x)
        return x[:, 0], x[:, self.backbone.arch.num_prefix_tokens:]

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None, mask: torch.Tensor | None
                ) -> dict[str, torch.Tensor]:
        """One call for everything a step needs of this network (DDP hooks only ``forward``).

        global_crops (2B, 3, H, W), local_crops (nB, 3, h, w) or None, mask (2B, h', w') or None. Returns the
        global CLS tokens and patch tokens, the DINO-head logits of every crop (globals first) and the iBOT-head
        logits of the masked patch tokens (all patch tokens' logits are never computed: iBOT only needs these)."""
        cls_g, patches_g = self.tokens(global_crops, mask)
        cls_all = cls_g
        if local_crops is not None:
            cls_all = torch.cat([cls_g, self.tokens(local_crops)[0]])
        out = {"cls_global": cls_g, "patches_global": patches_g, "dino_logits": self.dino_head(cls_all)}
        if mask is not None:
            out["ibot_logits"] = self.ibot_head(patches_g[mask.flatten(1)])
        return out

    def teacher_ibot_logits(self, patches: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.ibot_head(patches[mask.flatten(1)])
