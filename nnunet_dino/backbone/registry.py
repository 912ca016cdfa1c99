"""The one place that names every supported DINO architecture (timm-style registry).

To add a DINO variant: add one ``DinoArchitecture`` to ``ARCHITECTURES``. Everything else (building,
weight-file inference, LoRA targets, trainer size variants) reads from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

# Pixel statistics of the pretraining data (images in [0, 1], then (p - mean) / std per RGB channel); the input
# adapter maps nnU-Net intensities into this space.
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SAT_STATS = ((0.430, 0.411, 0.296), (0.213, 0.156, 0.143))
PIXEL_STATS = {
    "lvd1689m": IMAGENET_STATS,  # DINOv3 web images
    "lvd142m": IMAGENET_STATS,  # DINOv2
    "sat493m": SAT_STATS,  # DINOv3 satellite
    # MedDINOv3 was pretrained on CT in Hounsfield units (HU_PRETRAINING below), not on [0, 1] images: channels
    # nnU-Net rescaled to [0, 1] get no further mapping.
    "meddinov3_ct": None,
}


class HUConvention(NamedTuple):
    """Weights pretrained on CT in Hounsfield units: HU clipped to ``clip``, then (hu - mean) / std."""
    clip: tuple[float, float]
    mean: float
    std: float


# MedDINOv3's pretraining data pipeline: HU clipped to [-1000, 1000], z-scored with its CT corpus' mean and std,
# repeated to 3 channels. (Not nnU-Net's per-dataset CT normalisation, which only its fine-tuning code used.)
HU_PRETRAINING = {"meddinov3_ct": HUConvention((-1000.0, 1000.0), 65.11, 178.02)}


@dataclass(frozen=True)
class DinoArchitecture:
    name: str  # our canonical name; equals the prefix of Meta's file names
    family: str  # "dinov3" (RoPE, patch 16, storage tokens) or "dinov2" (learned pos-embed, patch 14)
    timm_name: str  # timm model the backbone is built on
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    num_registers: int
    swiglu: bool
    default_pretraining: str  # key of PIXEL_STATS used unless the weights say otherwise
    # DINOv3: base of the RoPE period schedule (Meta's pos_embed_rope_base; every released DINOv3 uses 100). The
    # backbone is built with it and weight files' stored periods are checked against it. None: no RoPE (DINOv2).
    rope_base: float | None = None

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def default_layers(self) -> tuple[int, ...]:
        """Four evenly spaced blocks ending at the last one: [2, 5, 8, 11] for 12 blocks, as the papers tap."""
        d = self.depth
        return (d // 4 - 1, d // 2 - 1, 3 * d // 4 - 1, d - 1)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_registers


def _v3(name, timm_name, dim, depth, heads, swiglu):
    return DinoArchitecture(name, "dinov3", timm_name, 16, dim, depth, heads, 4, swiglu, "lvd1689m", rope_base=100.0)


def _v2(name, timm_name, dim, depth, heads, regs, swiglu):
    return DinoArchitecture(name, "dinov2", timm_name, 14, dim, depth, heads, regs, swiglu, "lvd142m")


ARCHITECTURES: dict[str, DinoArchitecture] = {
    a.name: a
    for a in (
        _v3("dinov3_vits16", "vit_small_patch16_dinov3", 384, 12, 6, False),
        _v3("dinov3_vits16plus", "vit_small_plus_patch16_dinov3", 384, 12, 6, True),
        _v3("dinov3_vitb16", "vit_base_patch16_dinov3", 768, 12, 12, False),
        _v3("dinov3_vitl16", "vit_large_patch16_dinov3", 1024, 24, 16, False),
        _v3("dinov3_vith16plus", "vit_huge_plus_patch16_dinov3", 1280, 32, 20, True),
        _v3("dinov3_vit7b16", "vit_7b_patch16_dinov3", 4096, 40, 32, True),
        _v2("dinov2_vits14", "vit_small_patch14_dinov2", 384, 12, 6, 0, False),
        _v2("dinov2_vitb14", "vit_base_patch14_dinov2", 768, 12, 12, 0, False),
        _v2("dinov2_vitl14", "vit_large_patch14_dinov2", 1024, 24, 16, 0, False),
        _v2("dinov2_vitg14", "vit_giant_patch14_dinov2", 1536, 40, 24, 0, True),
        _v2("dinov2_vits14_reg", "vit_small_patch14_reg4_dinov2", 384, 12, 6, 4, False),
        _v2("dinov2_vitb14_reg", "vit_base_patch14_reg4_dinov2", 768, 12, 12, 4, False),
        _v2("dinov2_vitl14_reg", "vit_large_patch14_reg4_dinov2", 1024, 24, 16, 4, False),
        _v2("dinov2_vitg14_reg", "vit_giant_patch14_reg4_dinov2", 1536, 40, 24, 4, True),
    )
}


def get_architecture(name: str) -> DinoArchitecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"Unknown DINO architecture {name!r}. Known: {', '.join(ARCHITECTURES)}."
        ) from None


def match_architecture(family: str, embed_dim: int, depth: int, num_registers: int, swiglu: bool,
                       patch_size: int, num_heads: int | None = None) -> DinoArchitecture:
    """The registered architecture with exactly these structural facts (read off a weight file)."""
    for arch in ARCHITECTURES.values():
        if (arch.family, arch.embed_dim, arch.depth, arch.num_registers, arch.swiglu, arch.patch_size) == (
            family, embed_dim, depth, num_registers, swiglu, patch_size
        ) and (num_heads is None or num_heads == arch.num_heads):
            return arch
    raise ValueError(
        f"The weights describe a {family} ViT with width {embed_dim}, {depth} blocks, {num_registers} registers, "
        f"patch {patch_size}, {'SwiGLU' if swiglu else 'GELU'} MLP"
        + (f", {num_heads} heads" if num_heads else "")
        + f", which matches no supported architecture ({', '.join(ARCHITECTURES)})."
    )
