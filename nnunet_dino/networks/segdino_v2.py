"""SegDINOv2: frozen DINOv3 + Token Pyramid Adaptation (TPA) + Scale-Aware Decoding (SAD).

TPA turns the four single-scale taps into a pseudo pyramid: per tap a 1x1 projection to width d, a bilinear
upsample by 8/4/2/1 (shallowest tap to the finest scale) and a 3x3 conv, giving l1..l4 at H/2, H/4, H/8, H/16 of
the ViT input.

Decoding resolution (``max_decode_resolution``): nnU-Net's small patches are upsampled for the ViT (Hippocampus:
56x40 -> 368x256), so H/2 of the ViT input can be far finer than the patch (184x128, 10x its pixels), and every
pixel decoded beyond the patch's own resolution is resampled away again at the end. With "patch" (the default) no
level is finer than the patch: each level's grid is capped, per axis, at the padded ViT input expressed at the
patch's resolution (``DinoInputAdapter.padded_grid``: 58x40 for Hippocampus, so l1 and l2 are both 58x40, l3 46x32,
l4 23x16); a level is never made coarser than its own token grid. The output keeps the patch size and the same
final resampling. Parameter-free: the modules and their weights are the same for both settings, so checkpoints
load strictly either way, but a network trained with one setting was trained on other feature maps than the other
computes. Patches the adapter does not enlarge decode exactly as before (the cap is never reached there).
"vit_input" is the former behaviour (levels at H/2 ... H/16 of the ViT input whatever the patch).

SAD decodes it with residual depthwise blocks (dw 3x3 -> pw 1x1 -> GroupNorm -> GELU, output x + gamma * r with a
scalar gamma initialised to 0, so every block starts as the identity): one intra-scale block per level, then
top-down x4 = blk(l4), x_k = blk(up(x_{k+1}) + l_k) for k = 3, 2, 1; a 1x1 head on x1 (H/2) and a resize to the
input patch.

Deep supervision (optional, ``deep_supervision=True``): nnU-Net supervises outputs at the scales
[1, 1/2, 1/4, ...] of the patch given by the plans' pooling. Output 0 is the head on x1; output k >= 1 is a 1x1
head on the k-th coarser decoded level x_{k+1} (x4 for every k >= 3), each resized to exactly the shape of
nnU-Net's downsampled target (nnunet_deep_supervision_shapes). The coarsest output is the exception: nnU-Net's
trainer weights it 0 (1e-6 under DDP without compile, only to avoid DDP's unused-parameter error), so a head of its
own would be a parameter no loss trains; it is the previous output resized to its shape instead. The auxiliary
heads are part of the structure whenever the configuration asks for deep supervision, so the predictor (which
builds with deep supervision off) loads the trained checkpoint strictly. Checkpoints written before 2026-12-02 have
one more head (the untrained one of the coarsest output when the plans give at most four outputs); its tensors are
dropped on loading, with a message, since they never reached a loss or a prediction.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .dino_taps import DinoEncoderConfig, DinoTapEncoder

TPA_UPSAMPLING = (8, 4, 2, 1)  # tap 1 (shallowest) -> H/2, ..., tap 4 (deepest) -> H/16
DECODE_RESOLUTIONS = ("patch", "vit_input")  # see module doc


@dataclass(frozen=True)
class SegDINOv2Config(DinoEncoderConfig):
    width: int = 256  # d
    deep_supervision: bool = False
    max_decode_resolution: str = "patch"  # one of DECODE_RESOLUTIONS (module doc)

    def __post_init__(self):
        super().__post_init__()
        if self.width < 1:
            raise ValueError(f"width must be positive, got {self.width}.")
        if self.max_decode_resolution not in DECODE_RESOLUTIONS:
            raise ValueError(f"max_decode_resolution must be one of {DECODE_RESOLUTIONS}, got "
                             f"{self.max_decode_resolution!r}.")


def nnunet_deep_supervision_shapes(patch_size: Sequence[int], pool_op_kernel_sizes: Sequence[Sequence[int]]
                                   ) -> list[tuple[int, ...]]:
    """The target shapes nnU-Net trains deep supervision on: its trainer's scales (1 / cumulative pooling, the
    coarsest dropped) applied with its DownsampleSegForDSTransform's rounding."""
    scales = (1 / np.cumprod(np.vstack(pool_op_kernel_sizes), axis=0))[:-1]
    return [tuple(round(int(p) * float(s)) for p, s in zip(patch_size, scale)) for scale in scales]


class ResidualDepthwiseBlock(nn.Module):
    """x + gamma * GELU(GroupNorm(pw1x1(dw3x3(x)))), gamma a scalar starting at 0."""

    def __init__(self, width: int, groups: int = 32):
        super().__init__()
        self.depthwise = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.pointwise = nn.Conv2d(width, width, 1)
        self.norm = nn.GroupNorm(math.gcd(groups, width), width)
        self.act = nn.GELU()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.act(self.norm(self.pointwise(self.depthwise(x))))


class TokenPyramidAdaptation(nn.Module):
    def __init__(self, embed_dim: int, width: int):
        super().__init__()
        self.project = nn.ModuleList(nn.Conv2d(embed_dim, width, 1) for _ in TPA_UPSAMPLING)
        self.refine = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in TPA_UPSAMPLING)

    def forward(self, taps: Sequence[torch.Tensor], max_hw: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Four token-grid maps -> [l1 (H/2), l2 (H/4), l3 (H/8), l4 (H/16)], no level finer than ``max_hw`` per
        axis (None: no cap)."""
        levels = []
        for tap, factor, project, refine in zip(taps, TPA_UPSAMPLING, self.project, self.refine):
            y = project(tap)
            size = level_size(tap.shape[-2:], factor, max_hw)
            if size != tuple(tap.shape[-2:]):
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            levels.append(refine(y))
        return levels


def level_size(token_hw: Sequence[int], factor: int, max_hw: Sequence[int] | None) -> tuple[int, int]:
    """The grid of a pyramid level: ``factor`` x the token grid, capped per axis at ``max_hw`` but never below the
    token grid itself (a level is only ever upsampled from its tap, never shrunk)."""
    size = tuple(int(t) * factor for t in token_hw)
    if max_hw is None:
        return size
    return tuple(max(min(s, int(m)), int(t)) for s, m, t in zip(size, max_hw, token_hw))


class ScaleAwareDecoder(nn.Module):
    def __init__(self, width: int, num_levels: int = 4):
        super().__init__()
        self.intra = nn.ModuleList(ResidualDepthwiseBlock(width) for _ in range(num_levels))
        self.top_down = nn.ModuleList(ResidualDepthwiseBlock(width) for _ in range(num_levels))

    def forward(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """[l1..l4] finest first -> decoded [x1..x4], finest first."""
        refined = [blk(level) for blk, level in zip(self.intra, levels)]
        decoded = [self.top_down[-1](refined[-1])]
        for k in range(len(refined) - 2, -1, -1):
            up = F.interpolate(decoded[0], size=refined[k].shape[-2:], mode="bilinear", align_corners=False)
            decoded.insert(0, self.top_down[k](up + refined[k]))
        return decoded


class SegDINOv2(nn.Module):
    """(B, C, H, W) nnU-Net patch -> (B, K, H, W) logits, or with deep supervision on a list of logits at
    nnU-Net's deep-supervision shapes (full resolution first)."""

    def __init__(self, encoder: DinoTapEncoder, width: int, num_classes: int,
                 deep_supervision_shapes: Sequence[Sequence[int]] | None, max_decode_resolution: str = "patch"):
        super().__init__()
        if max_decode_resolution not in DECODE_RESOLUTIONS:
            raise ValueError(f"max_decode_resolution must be one of {DECODE_RESOLUTIONS}, got "
                             f"{max_decode_resolution!r}.")
        self.encoder = encoder
        self.max_decode_resolution = max_decode_resolution
        # In the state dict, so a checkpoint says how it was decoded: the setting changes outputs, not weights, and
        # older checkpoints (without this key) decoded at the ViT input's size (training/checkpoints.py refuses them).
        self.register_buffer("decode_at_patch_resolution",  # uint8: every DDP backend broadcasts it
                             torch.tensor(int(max_decode_resolution == "patch"), dtype=torch.uint8))
        self.level_cap = encoder.adapter.padded_grid(encoder.patch_hw) if max_decode_resolution == "patch" else None
        self.token_pyramid = TokenPyramidAdaptation(encoder.embed_dim, width)
        # Not called 'decoder': nnU-Net's stock set_deep_supervision_enabled would silently set a flag on it.
        self.scale_aware_decoding = ScaleAwareDecoder(width)
        self.head = nn.Conv2d(width, num_classes, 1)
        self.ds_shapes = [tuple(s) for s in deep_supervision_shapes] if deep_supervision_shapes else None
        if self.ds_shapes is not None:
            if len(self.ds_shapes) < 2 or self.ds_shapes[0] != tuple(encoder.patch_hw):
                raise ValueError(f"Deep supervision needs nnU-Net's shapes starting at the patch size "
                                 f"{encoder.patch_hw} and at least one coarser one, got {self.ds_shapes}.")
            # One head per decoded level below x1 (x2, x3, x4) that an output with a non-zero loss weight uses;
            # the coarsest output (weight 0) has none (module doc).
            n_aux = min(len(self.ds_shapes) - 2, len(TPA_UPSAMPLING) - 1)
            self.aux_heads = nn.ModuleList(nn.Conv2d(width, num_classes, 1) for _ in range(n_aux))
            self._register_load_state_dict_pre_hook(self._drop_untrained_head_of_older_checkpoints)
        else:
            self.aux_heads = None
        self._deep_supervision = False
        self.dropped_untrained_head = False  # set when an older checkpoint's extra head was dropped on loading

    def _drop_untrained_head_of_older_checkpoints(self, state_dict, prefix, *args):
        stale = [k for k in state_dict if k.startswith(f"{prefix}aux_heads.{len(self.aux_heads)}.")]
        if stale and len(self.aux_heads) + 1 == len(self.ds_shapes) - 1:
            for k in stale:
                del state_dict[k]
            self.dropped_untrained_head = True
            print(f"nnunet-dino: dropped {', '.join(k[len(prefix):] for k in stale)} from this checkpoint: the head "
                  f"of the coarsest deep-supervision output, which nnU-Net's loss weights 0, so it was never "
                  f"trained and never used in prediction (no longer built since 2026-12-02).", flush=True)

    @property
    def supports_deep_supervision(self) -> bool:
        return self.ds_shapes is not None

    @property
    def deep_supervision(self) -> bool:
        return self._deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool) -> None:
        if enabled and not self.supports_deep_supervision:
            raise ValueError("This SegDINOv2 was built without deep-supervision heads (deep_supervision=False in "
                             "its configuration); use a deep-supervision variant to train with it.")
        self._deep_supervision = bool(enabled)

    def forward(self, x: torch.Tensor):
        decoded = self.scale_aware_decoding(self.token_pyramid(self.encoder(x), self.level_cap))
        out = self.encoder.to_patch_grid(self.head(decoded[0]), x.shape[-2:])
        if not self._deep_supervision:
            return out
        outputs = [out]
        for k, shape in enumerate(self.ds_shapes[1:], start=1):
            if k == len(self.ds_shapes) - 1:  # the coarsest output, weight 0 in nnU-Net's loss: no head of its own
                # (no antialiasing: a weight-0 output, and CPU has no bf16 antialiased kernel)
                outputs.append(F.interpolate(outputs[-1], size=shape, mode="bilinear", align_corners=False))
                break
            level = min(k, len(self.aux_heads))  # x_{k+1}, the coarsest (x4) for every further output
            outputs.append(self.encoder.to_patch_grid(self.aux_heads[level - 1](decoded[level]), shape))
        return outputs


def build_segdino_v2(config: SegDINOv2Config, num_input_channels: int, num_outputs: int, patch_size: Sequence[int],
                     normalization_schemes: Sequence[str] | None,
                     pool_op_kernel_sizes: Sequence[Sequence[int]] | None = None,
                     enable_deep_supervision: bool = False,
                     intensity_properties: Mapping | None = None) -> SegDINOv2:
    """Deterministic structure (nnUNetv2_predict rebuilds it and loads the checkpoint strictly). With
    ``config.deep_supervision`` the plans' ``pool_op_kernel_sizes`` fix the auxiliary outputs; the runtime switch
    ``enable_deep_supervision`` only chooses whether they are returned."""
    encoder = DinoTapEncoder(config, num_input_channels, patch_size, normalization_schemes, intensity_properties)
    shapes = None
    if config.deep_supervision:
        if pool_op_kernel_sizes is None:
            raise ValueError("SegDINOv2 with deep supervision needs the plans' pool_op_kernel_sizes.")
        shapes = nnunet_deep_supervision_shapes(patch_size, pool_op_kernel_sizes)
    network = SegDINOv2(encoder, config.width, num_outputs, shapes, config.max_decode_resolution)
    network.deep_supervision = enable_deep_supervision and config.deep_supervision
    return network
