"""MedDINOv3's segmentation network: a plain DINO ViT with multi-scale token aggregation and a transposed-conv decoder.

    nnU-Net patch (B, C, H, W)
      -> DinoInputAdapter (1/3/N channels to RGB, small patches upsampled, padded to a multiple of the ViT patch)
      -> patch tokens of blocks [2, 5, 8, 11] (ViT-B), each after the final norm, concatenated: (B, 4*768, h, w)
      -> four x2 ConvTranspose2d, channels halving, each + channel LayerNorm + GELU -> 1x1 conv to the outputs
      -> padding dropped, resampled onto the patch grid: (B, num_outputs, H, W)

No skip connections and no deep supervision: the network has one output. ``decoder.deep_supervision`` exists only so
that nnU-Net's ``set_deep_supervision_enabled`` (which sets ``network.decoder.deep_supervision``) works on it
unchanged; the flag is recorded and has no effect.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbone import CTIntensity, DinoBackbone, DinoInputAdapter, LoraSettings, apply_lora, get_architecture

FINETUNE_MODES = ("full", "lora", "frozen")


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

    def __post_init__(self):
        if self.finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune must be one of {FINETUNE_MODES}, got {self.finetune!r}.")
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


class MedDINOv3Network(nn.Module):
    def __init__(self, backbone: DinoBackbone, adapter: DinoInputAdapter, layers: Sequence[int],
                 decoder: TransposedConvDecoder):
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter
        self.layers = tuple(layers)
        self.decoder = decoder

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
        return self._to_patch_grid(self.decoder(self.aggregated_tokens(x)))

    def _to_patch_grid(self, logits: torch.Tensor) -> torch.Tensor:
        """Decoder output (covering the adapter's padded ViT input) -> exactly the nnU-Net patch grid."""
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
    return MedDINOv3Network(backbone, adapter, layers, decoder)
