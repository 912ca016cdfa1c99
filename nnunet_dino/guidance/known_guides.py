"""Guides of KNOWN information content, to measure whether a trained GuiDINO network uses its guide.

``KnownGuidance`` replaces what the DINO chain computes by a guide made from a *source* map given to it (for the
synthetic kinds: the one-hot labels (B, K, H, W) at the patch's resolution), on the adapter's token grid:

- ``image``: the source is the image; the real chain (adapter -> ViT -> TokenBook), unchanged;
- ``oracle``: the label fraction of each token is the guide (nothing to learn); ``oracle_blurred``: blurred by a
  Gaussian of sigma 1 token; ``oracle_coarse``: averaged over 2x2 tokens; ``oracle_noisy``: plus N(0, 0.3) noise,
  fresh in every forward, clipped to [0, 1];
- ``tokens``: synthetic DINO tokens that carry the class only through directions the TokenBook must learn:
  token = sum_k fraction_k * d_{k, m} + N(0, 1) per dimension, with two random directions d_{k,0}, d_{k,1} of norm
  sqrt(width) per class and a random mode m per token (every class has two appearances), then standardised per
  token as DINO's final norm does;
- ``noise_tokens``: the same noise with no class signal (an uninformative guide).

In 3D (``KnownSliceWiseGuidance``) the same guides are made per plane of the slice-wise branch's guide volume: the
oracle kinds from every plane's label fractions, the synthetic tokens only at the planes the ViT would see and
interpolated in between exactly as its tokens are, then the real TokenBook per plane. ``known_guidance`` picks the
class for a built branch.

Used by benchmarks/bench_guide_utility.py and the guide-reliance tests; never by the trainers users run.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .branch import DinoGuidance
from .slicewise import SliceWiseGuidance
from .slicing import interpolate_planes

SYNTHETIC_KINDS = ("oracle", "oracle_blurred", "oracle_coarse", "oracle_noisy", "tokens", "noise_tokens")
GUIDE_KINDS = ("image",) + SYNTHETIC_KINDS


class _KnownSource:
    """What both known-guide branches share: the kind and the fixed class directions of the synthetic tokens."""

    def _init_known(self, kind: str, num_classes: int, seed: int) -> None:
        if kind not in GUIDE_KINDS:
            raise ValueError(f"guide kind must be one of {GUIDE_KINDS}, got {kind!r}")
        self.kind = kind
        dim = self.backbone.arch.embed_dim
        g = torch.Generator().manual_seed(seed)  # fixed: the directions are part of the task, not of a run
        directions = F.normalize(torch.randn(num_classes, 2, dim, generator=g), dim=-1) * math.sqrt(dim)
        self.register_buffer("directions", directions, persistent=False)

    def synthetic_tokens(self, fractions: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) label fractions per token -> (B, dim, h, w) tokens of kind ``tokens`` or ``noise_tokens``."""
        b, k, h, w = fractions.shape
        dim = self.directions.shape[-1]
        noise = torch.randn(b, dim, h, w, device=fractions.device)
        if self.kind == "noise_tokens":
            return _standardise(noise)
        modes = torch.randint(0, 2, (b, 1, 1, h, w), device=fractions.device).bool()
        d = self.directions[:, :, :, None, None]  # (K, 2, dim, 1, 1)
        chosen = torch.where(modes, d[None, :, 1], d[None, :, 0])  # (B, K, dim, h, w)
        signal = (fractions[:, :, None] * chosen).sum(1)  # (B, dim, h, w)
        return _standardise(signal + noise)


class KnownGuidance(_KnownSource, DinoGuidance):
    """DinoGuidance whose guide comes from one of the sources above (``image``: the real chain, unchanged)."""

    def __init__(self, base: DinoGuidance, kind: str, num_classes: int, seed: int = 1234):
        super().__init__(base.backbone, base.adapter, base.tokenbook, base.layer)
        self._init_known(kind, num_classes, seed)

    def forward(self, source: torch.Tensor):
        if self.kind == "image":
            return super().forward(source)
        fractions, _ = self.adapter.dense_to_tokens(source)  # (B, K, h, w) label fraction per token
        if self.kind.startswith("oracle"):
            return _oracle_guide(fractions, self.kind)
        return self.tokenbook(self.synthetic_tokens(fractions))


class KnownSliceWiseGuidance(_KnownSource, SliceWiseGuidance):
    """SliceWiseGuidance (3D) whose guide volume comes from one of the sources above, plane by plane."""

    def __init__(self, base: SliceWiseGuidance, kind: str, num_classes: int, seed: int = 1234):
        super().__init__(base.backbone, base.adapter, base.tokenbook, base.layer, base.patch_size, base.slice_axis,
                         base.slice_stride, base.input_channels)
        self._init_known(kind, num_classes, seed)

    def forward(self, source: torch.Tensor):
        if self.kind == "image":
            return super().forward(source)
        fractions, _ = self.dense_to_tokens(source)  # (B, K, n, h, w) label fraction per token and plane
        b, k, n, h, w = fractions.shape
        if self.kind.startswith("oracle"):
            scores, masks = _oracle_guide(fractions.transpose(1, 2).reshape(b * n, k, h, w), self.kind)
            return self._stack(scores, b), self._stack(masks, b)
        sampled = fractions[:, :, self.planes_seen].transpose(1, 2)  # (B, m, K, h, w): the planes the ViT sees
        m = sampled.shape[1]
        tokens = self.synthetic_tokens(sampled.reshape(b * m, k, h, w))
        tokens = tokens.reshape(b, m, *tokens.shape[1:])
        if m != n:
            tokens = interpolate_planes(tokens, self._plane_lower, self._plane_upper, self._plane_weight)
        return self.guides_from_tokens(tokens)


def known_guidance(base: DinoGuidance, kind: str, num_classes: int, seed: int = 1234) -> DinoGuidance:
    """The known-guide branch of ``kind`` for a built 2D or slice-wise 3D branch."""
    cls = KnownSliceWiseGuidance if isinstance(base, SliceWiseGuidance) else KnownGuidance
    return cls(base, kind, num_classes, seed)


def _oracle_guide(fractions: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    masks = degrade(fractions, kind).clamp(0, 1)
    return torch.logit(masks.clamp(1e-4, 1 - 1e-4)), masks


def _standardise(tokens: torch.Tensor) -> torch.Tensor:
    return (tokens - tokens.mean(1, keepdim=True)) / tokens.std(1, keepdim=True).clamp_min(1e-6)


def degrade(fractions: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "oracle":
        return fractions
    if kind == "oracle_blurred":
        x = torch.arange(-3, 4, dtype=fractions.dtype, device=fractions.device)
        kernel = torch.exp(-x ** 2 / 2)
        kernel = kernel / kernel.sum()
        c = fractions.shape[1]
        out = F.conv2d(F.pad(fractions, (3, 3, 0, 0), mode="replicate"), kernel.view(1, 1, 1, 7).repeat(c, 1, 1, 1),
                       groups=c)
        return F.conv2d(F.pad(out, (0, 0, 3, 3), mode="replicate"), kernel.view(1, 1, 7, 1).repeat(c, 1, 1, 1),
                        groups=c)
    if kind == "oracle_coarse":
        h, w = fractions.shape[-2:]
        pooled = F.avg_pool2d(fractions, 2, ceil_mode=True)
        return F.interpolate(pooled, scale_factor=2, mode="nearest")[..., :h, :w]
    if kind == "oracle_noisy":
        return fractions + 0.3 * torch.randn_like(fractions)
    raise ValueError(kind)
