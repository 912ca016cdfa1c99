"""Building the ViT of a registered architecture on timm's implementation, in our canonical layout."""
from __future__ import annotations

import contextlib
import types

import timm
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

from .registry import DinoArchitecture


def create_vit(arch: DinoArchitecture, drop_path_rate: float = 0.0, device: str | torch.device | None = None
               ) -> nn.Module:
    """A randomly initialised timm ViT for ``arch`` without classifier head.

    DINOv3: separate q/k/v projections with q/v bias (see formats.py for why). DINOv2: built for Meta's 518px
    position grid and interpolated to other sizes on the fly (dynamic_img_size).

    ``device="meta"``: every parameter without storage, so nothing is allocated or randomly initialised (timm's
    init runs on shapes only): for code that needs shapes, or that assigns the weights of a file
    (DinoBackbone.load_canonical). timm computes DINOv3's RoPE periods (a non-persistent buffer, in no weight file)
    on the CPU explicitly, so they are real either way; DinoBackbone checks that nothing is left on meta."""
    kwargs = dict(pretrained=False, num_classes=0, drop_path_rate=drop_path_rate)
    if arch.family == "dinov3":
        # The RoPE base is passed, not left to timm's default, so that the periods the model computes are the ones
        # rope_periods() gives and weight files are checked against.
        kwargs.update(qkv_fused=False, qkv_bias=True, rope_temperature=arch.rope_base)
    else:
        kwargs.update(img_size=518, dynamic_img_size=True)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = timm.create_model(arch.timm_name, **kwargs)
    if arch.family == "dinov2" and arch.num_registers == 0:
        model._pos_embed = types.MethodType(_dinov2_pos_embed, model)
    return model


def rope_periods(arch: DinoArchitecture) -> torch.Tensor:
    """The float32 RoPE periods of a DINOv3 ``arch`` (head_dim/4 of them): base ** (4 i / head_dim), the schedule of
    Meta's RopePositionEmbedding, Hugging Face's DINOv3 (1 / inv_freq) and timm's RotaryEmbeddingDinoV3."""
    if arch.rope_base is None:
        raise ValueError(f"{arch.name} has no RoPE.")
    quarter = arch.head_dim // 4
    return arch.rope_base ** (2.0 * torch.arange(quarter, dtype=torch.float32) / (arch.head_dim // 2))


def _dinov2_pos_embed(self, x: torch.Tensor) -> torch.Tensor:
    """timm's VisionTransformer._pos_embed for DINOv2 without registers, but resampling the 37x37 position grid
    without antialiasing, as Meta's and Hugging Face's DINOv2 do (timm antialiases, which changes the features at
    every size but 518x518; the register models are antialiased by Meta as well, so they keep timm's path)."""
    B, H, W, C = x.shape
    pos_embed = resample_abs_pos_embed(self.pos_embed, new_size=(H, W), old_size=self.patch_embed.grid_size,
                                       num_prefix_tokens=self.num_prefix_tokens, antialias=False)
    x = torch.cat([self.cls_token.expand(B, -1, -1), x.view(B, -1, C)], dim=1) + pos_embed
    return self.pos_drop(x)
