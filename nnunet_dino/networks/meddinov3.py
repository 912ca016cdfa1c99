"""MedDINOv3's segmentation network: a plain DINO ViT with multi-scale token aggregation and a transposed-conv decoder.

    nnU-Net patch (B, C, H, W)
      -> DinoInputAdapter (1/3/N channels to RGB, small patches upsampled, padded to a multiple of the ViT patch)
      -> patch tokens of blocks [2, 5, 8, 11] (ViT-B), each after the final norm, concatenated: (B, 4*768, h, w)
      -> four x2 ConvTranspose2d, channels halving, each + channel LayerNorm + GELU -> 1x1 conv to the outputs
      -> padding dropped, resampled onto the patch grid: (B, num_outputs, H, W)

Decoding resolution (``max_decode_resolution``): the four x2 stages take the token grid back to the resolution of
the *ViT input*, which for nnU-Net's small patches is an upsampled copy of the patch (Hippocampus: 56x40 ->
368x256, 42x the patch's pixels), and the logits are then shrunk to the patch. With "patch" (the default) no stage
works finer than the patch: once a transposed conv's output would be finer than the patch's own pixel grid, it is
resampled onto that grid (bilinear, antialiased) before the stage's norm and activation, and every later stage
(still x2) is brought back onto it the same way; the logits are then on the patch grid and only the padding is
dropped. Pixel centres stay exactly aligned with nnU-Net's (``resample_to_pitch``). Hippocampus: 46x32 after stage
1, then 57x40 (the patch grid over the padded input) for stages 2-4. Parameter-free: the modules and weights are
the same for both settings, so checkpoints load strictly either way, but a network trained with one setting was
trained on other feature maps than the other computes. With DINOv3 weights (ViT patch 16 = the decoder's total
stride) patches the adapter does not enlarge decode exactly as before; with DINOv2's patch 14 the last stage, at
14/16 of an input pixel, is brought onto the patch grid too. "vit_input" is the former behaviour.

No skip connections and no deep supervision: the network has one output. ``decoder.deep_supervision`` exists only so
that nnU-Net's ``set_deep_supervision_enabled`` (which sets ``network.decoder.deep_supervision``) works on it
unchanged; the flag is recorded and has no effect.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbone import CTIntensity, DinoBackbone, DinoInputAdapter, LoraSettings, apply_lora, get_architecture

FINETUNE_MODES = ("full", "lora", "frozen")
DECODE_RESOLUTIONS = ("patch", "vit_input")  # see module doc


@dataclass(frozen=True)
class MedDINOv3Config:
    """Everything that shapes a MedDINOv3 network. Trainer variants override fields of this, nothing else."""
    dino_arch: str = "dinov3_vitb16"
    layers: tuple[int, ...] | None = None  # None: the four evenly spaced blocks ([2, 5, 8, 11] for ViT-B)
    drop_path_rate: float = 0.2  # in every block, as the official DINOv3 ViT applies it (timm ramps up from 0)
    finetune: str = "full"  # "full" (the paper), "lora" (base ViT frozen, adapters trained), "frozen"
    lora: LoraSettings = field(default_factory=LoraSettings)  # used when finetune == "lora"
    decoder_stages: int = 4  # x2 each: 4 stages take a /16 token grid back to full resolution
    min_short_side_tokens: int = 16  # small patches are upsampled until their short side spans this many tokens
    # CT channels: via HU into the weights' convention ("hu"), or nnU-Net's z-score as upstream fine-tuning ("nnunet")
    ct_intensity: CTIntensity = field(default_factory=CTIntensity)
    max_decode_resolution: str = "patch"  # one of DECODE_RESOLUTIONS (module doc)

    def __post_init__(self):
        if self.finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune must be one of {FINETUNE_MODES}, got {self.finetune!r}.")
        if self.max_decode_resolution not in DECODE_RESOLUTIONS:
            raise ValueError(f"max_decode_resolution must be one of {DECODE_RESOLUTIONS}, got "
                             f"{self.max_decode_resolution!r}.")
        if self.decoder_stages < 1:
            raise ValueError(f"decoder_stages must be >= 1, got {self.decoder_stages}.")
        arch = get_architecture(self.dino_arch)
        layers = self.resolved_layers()
        bad = [i for i in layers if not 0 <= i < arch.depth]
        if bad or not layers:
            raise ValueError(f"layers {self.layers} are not block indices of {self.dino_arch} (0..{arch.depth - 1}).")

    def resolved_layers(self) -> tuple[int, ...]:
        arch = get_architecture(self.dino_arch)
        return tuple(arch.default_layers if self.layers is None else self.layers)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map, at every pixel (the 'LayerNorm2d' of ConvNeXt/SAM)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class TransposedConvDecoder(nn.Module):
    """``num_stages`` x (ConvTranspose2d k2 s2 halving the channels, ChannelLayerNorm, GELU), then a 1x1 conv."""

    def __init__(self, in_channels: int, num_outputs: int, num_stages: int = 4):
        super().__init__()
        if in_channels % 2 ** num_stages:
            raise ValueError(f"{in_channels} input channels cannot be halved {num_stages} times.")
        channels = [in_channels // 2 ** i for i in range(num_stages + 1)]
        self.stages = nn.Sequential(*(
            nn.Sequential(nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2), ChannelLayerNorm(c_out, eps=1e-6),
                          nn.GELU())
            for c_in, c_out in zip(channels[:-1], channels[1:])))
        self.head = nn.Conv2d(channels[-1], num_outputs, kernel_size=1)
        self.channels = tuple(channels)
        # Read and written by nnU-Net's set_deep_supervision_enabled; this decoder has a single output regardless.
        self.deep_supervision = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(x))


def _exact_scale(size: int, scale: Fraction) -> float:
    """The float scale factor closest to ``scale`` for which F.interpolate's output size, floor(size * factor) in
    double precision, is exactly floor(size * scale): the nearest double can land just below an integer product
    (e.g. 39.999... for 40), which would lose a row of the patch."""
    target = math.floor(size * scale)
    factor = float(scale)
    while math.floor(size * factor) < target:
        factor = math.nextafter(factor, math.inf)
    while math.floor(size * factor) > target:
        factor = math.nextafter(factor, -math.inf)
    return factor


class PitchResampling(NamedTuple):
    """One resampling of a map of ``size`` pixels from ``pitch`` to ``target`` ViT-input pixels per map pixel (per
    axis), worked out once: the float scale factors F.interpolate gets (None: nothing to do), whether it shrinks
    (antialiased), and the size it gives. Plain floats and ints, so a traced forward (torch.compile) sees constants."""
    factors: tuple[float, float] | None
    antialias: bool
    out_size: tuple[int, int]
    target: tuple[Fraction, Fraction]

    @classmethod
    def between(cls, size: Sequence[int], pitch: Sequence[Fraction], target: Sequence[Fraction]) -> "PitchResampling":
        ratios = [Fraction(p) / Fraction(t) for p, t in zip(pitch, target)]
        out_size = tuple(math.floor(n * r) for n, r in zip(size, ratios))
        if all(r == 1 for r in ratios):
            return cls(None, False, tuple(size), tuple(target))
        factors = tuple(_exact_scale(n, r) for n, r in zip(size, ratios))
        return cls(factors, any(r < 1 for r in ratios), out_size, tuple(target))


def resample_to_pitch(x: torch.Tensor, pitch: Sequence[Fraction], target: Sequence[Fraction]) -> torch.Tensor:
    """Resample a (B, C, h, w) map whose pixels are ``pitch`` ViT-input pixels apart (per axis), starting at the
    input's top-left corner, onto pixels ``target`` apart: bilinear with the scale factor itself (not an output
    size), so that output pixel i is centred exactly at (i + 1/2) * target; antialiased when shrinking. Covers the
    same extent, rounded down to whole output pixels."""
    return _resample(x, PitchResampling.between(tuple(x.shape[-2:]), pitch, target))


def _resample(x: torch.Tensor, step: PitchResampling) -> torch.Tensor:
    if step.factors is None:
        return x
    return F.interpolate(x, scale_factor=step.factors, mode="bilinear", align_corners=False,
                         recompute_scale_factor=False, antialias=step.antialias)


def patch_pitch_plan(token_hw: Sequence[int], token_pitch: int, patch_pitch: Sequence[Fraction], num_stages: int
                     ) -> tuple[list[PitchResampling], PitchResampling]:
    """For each x2 decoder stage, the resampling after its transposed conv that keeps the map no finer than the
    patch (none while it is coarser), then the one that brings the logits onto the patch's pitch."""
    size, pitch = tuple(int(s) for s in token_hw), (Fraction(token_pitch),) * 2
    stages = []
    for _ in range(num_stages):
        size, pitch = tuple(2 * n for n in size), tuple(p / 2 for p in pitch)
        step = PitchResampling.between(size, pitch, tuple(max(p, t) for p, t in zip(pitch, patch_pitch)))
        stages.append(step)
        size, pitch = step.out_size, step.target
    return stages, PitchResampling.between(size, pitch, patch_pitch)


class MedDINOv3Network(nn.Module):
    def __init__(self, backbone: DinoBackbone, adapter: DinoInputAdapter, layers: Sequence[int],
                 decoder: TransposedConvDecoder, max_decode_resolution: str = "patch"):
        super().__init__()
        if max_decode_resolution not in DECODE_RESOLUTIONS:
            raise ValueError(f"max_decode_resolution must be one of {DECODE_RESOLUTIONS}, got "
                             f"{max_decode_resolution!r}.")
        self.backbone = backbone
        self.adapter = adapter
        self.layers = tuple(layers)
        self.decoder = decoder
        self.max_decode_resolution = max_decode_resolution
        # In the state dict, so a checkpoint says how it was decoded: the setting changes outputs, not weights, and
        # older checkpoints (without this key) decoded at the ViT input's size (training/checkpoints.py refuses them).
        self.register_buffer("decode_at_patch_resolution",  # uint8: every DDP backend broadcasts it
                             torch.tensor(int(max_decode_resolution == "patch"), dtype=torch.uint8))
        # Fixed by the geometry, so computed once (and forward stays plain tensor code, e.g. for torch.compile).
        self.stage_resampling, self.final_resampling = patch_pitch_plan(
            adapter.token_hw, adapter.patch_size, self.patch_pitch, len(decoder.stages))

    @property
    def backbone_trains(self) -> bool:
        return any(p.requires_grad for p in self.backbone.parameters())

    def aggregated_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) nnU-Net patch -> (B, len(layers) * embed_dim, h_tokens, w_tokens)."""
        vit_input = self.adapter(x)
        # A frozen backbone needs no autograd graph: saves the activation memory of the whole ViT.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.backbone_trains):
            maps = self.backbone.patch_features(vit_input, self.layers)
        return torch.cat(maps, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.aggregated_tokens(x)
        if self.max_decode_resolution == "vit_input":
            return self._to_patch_grid(self.decoder(tokens))
        return self._decode_at_most_at_patch_resolution(tokens)

    @property
    def patch_pitch(self) -> tuple[Fraction, Fraction]:
        """ViT-input pixels per nnU-Net patch pixel, per axis (1 when the adapter does not enlarge the patch)."""
        a = self.adapter
        return tuple(Fraction(r, i) for r, i in zip(a.resized_hw, a.image_hw))

    def _decode_at_most_at_patch_resolution(self, tokens: torch.Tensor) -> torch.Tensor:
        """The decoder's own stages and head, no stage finer than the patch grid (module doc)."""
        y = tokens
        for (upsample, norm, act), step in zip(self.decoder.stages, self.stage_resampling):
            y = act(norm(_resample(upsample(y), step)))
        # Axes still coarser than the patch (e.g. fewer decoder stages) are upsampled onto it; then only the padding
        # is left to drop.
        logits = _resample(self.decoder.head(y), self.final_resampling)
        return logits[..., : self.adapter.image_hw[0], : self.adapter.image_hw[1]]

    def _to_patch_grid(self, logits: torch.Tensor) -> torch.Tensor:
        """("vit_input") Decoder output (covering the adapter's padded ViT input) -> exactly the nnU-Net patch grid."""
        a = self.adapter
        if tuple(logits.shape[-2:]) != a.padded_hw:  # decoder stride != ViT patch (e.g. DINOv2's 14)
            logits = F.interpolate(logits, size=a.padded_hw, mode="bilinear", align_corners=False)
        logits = logits[..., : a.resized_hw[0], : a.resized_hw[1]]  # drop the zero padding
        if a.resized_hw != a.image_hw:
            # Shrinking: antialiased, so every decoder pixel contributes (and receives gradient).
            logits = F.interpolate(logits, size=a.image_hw, mode="bilinear", align_corners=False, antialias=True)
        return logits


def set_uniform_drop_path(backbone: DinoBackbone, rate: float) -> None:
    """The same stochastic-depth rate in every block (the official DINOv3 ViT's ``drop_path_rate``, which upstream
    MedDINOv3 sets to 0.2); timm builds a linear ramp from 0 instead. Structure only: no parameters change."""
    from timm.layers import DropPath

    for block in backbone.vit.blocks:
        for name in ("drop_path1", "drop_path2"):
            setattr(block, name, DropPath(rate) if rate > 0 else nn.Identity())


def build_meddinov3(config: MedDINOv3Config, num_input_channels: int, num_outputs: int, patch_size: Sequence[int],
                    normalization_schemes: Sequence[str] | None,
                    intensity_properties: Mapping | None = None) -> MedDINOv3Network:
    """Deterministic structure (the predictor rebuilds it, then loads the checkpoint strictly). Pretrained DINO
    weights are loaded by the trainer at training start, never here."""
    arch = get_architecture(config.dino_arch)
    backbone = DinoBackbone(arch)
    set_uniform_drop_path(backbone, config.drop_path_rate)
    if config.finetune == "lora":
        apply_lora(backbone, config.lora)
    elif config.finetune == "frozen":
        backbone.freeze()
    adapter = DinoInputAdapter(num_input_channels, arch.patch_size, patch_size, config.min_short_side_tokens,
                               normalization_schemes, arch.default_pretraining, intensity_properties,
                               config.ct_intensity)
    layers = config.resolved_layers()
    decoder = TransposedConvDecoder(len(layers) * arch.embed_dim, num_outputs, config.decoder_stages)
    return MedDINOv3Network(backbone, adapter, layers, decoder, config.max_decode_resolution)
