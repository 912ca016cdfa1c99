"""GuidedUNet: nnU-Net's own network (whatever the plans build) gated by DINO guide masks.

Gates are attached with forward hooks on the stage modules that every nnU-Net U-Net exposes
(``encoder.stages`` and ``decoder.stages``: PlainConvUNet, ResidualEncoderUNet, any number of stages), so the
segmentation network stays exactly the one the plans describe and nothing of its forward is re-implemented.
2D and 3D alike: for 3D patches the guide is a volume computed slice-wise (guidance/slicewise.py) and the gates are
1x1x1 convolutions; the 2D network and its state-dict keys are the same as before 3D existed.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..backbone import CTIntensity, DinoBackbone, DinoInputAdapter, LoraSettings, apply_lora, get_architecture
from ..guidance import DinoGuidance, GuideGate, SliceWiseGuidance, TokenBook, TokenBookConfig
from ..guidance.slicing import check_slice_axis, check_slice_stride, resolve_slice_axis, resolve_slice_stride

GATE_PLACES = ("input", "encoder", "bottleneck", "decoder")


@dataclass(frozen=True)
class GuiDINOConfig:
    """Everything that shapes a GuiDINO network. Trainer variants override fields of this, nothing else."""
    dino_arch: str = "dinov3_vits16"
    dino_layer: int = -1  # GuiDINO uses the last block's tokens
    lora: LoraSettings | None = field(default_factory=LoraSettings)  # None: frozen backbone
    min_short_side_tokens: int = 16
    ct_intensity: CTIntensity = field(default_factory=CTIntensity)  # CT channels: via HU into the weights' convention
    tokenbook: TokenBookConfig = field(default_factory=TokenBookConfig)
    gate_places: tuple[str, ...] = ("encoder", "bottleneck")
    gate_mode: str = "residual"
    # 3D configurations only (guidance/slicing.py): None reads $nnUNet_dino_slice_axis / $nnUNet_dino_slice_stride,
    # else the coarsest-spacing axis and DEFAULT_SLICE_STRIDE.
    slice_axis: int | None = None
    slice_stride: int | None = None

    def __post_init__(self):
        if self.slice_axis is not None:
            check_slice_axis(self.slice_axis)
        if self.slice_stride is not None:
            check_slice_stride(self.slice_stride)
        bad = [p for p in self.gate_places if p not in GATE_PLACES]
        if bad or not self.gate_places:
            raise ValueError(f"gate_places must be a non-empty subset of {GATE_PLACES}, got {self.gate_places}.")
        if self.gate_mode == "multiplicative" and self.tokenbook.mode == "learned":
            # f * mean_k(g_k) over complementary per-class guides is ~0.5 everywhere: a gate without information.
            raise ValueError("gate_mode='multiplicative' multiplies by the mean of the guides; with the learned "
                             "TokenBook's per-class guides (which sum to ~1) that is ~0.5 everywhere and carries no "
                             "information. Use gate_mode='residual', or the single-guide TokenBook mode='paper'.")
        get_architecture(self.dino_arch)


class GuidedUNet(nn.Module):
    def __init__(self, unet: nn.Module, guidance: DinoGuidance, gate_places: Sequence[str], gate_mode: str,
                 num_input_channels: int):
        super().__init__()
        if not (hasattr(unet, "encoder") and hasattr(unet.encoder, "stages") and hasattr(unet, "decoder")
                and hasattr(unet.decoder, "stages")):
            raise TypeError(f"{type(unet).__name__} does not expose encoder.stages/decoder.stages like nnU-Net's U-Nets; "
                            f"GuiDINO cannot attach its gates to it.")
        self.unet = unet
        self.guidance = guidance
        num_guides = guidance.tokenbook.num_guides
        enc_channels = list(unet.encoder.output_channels)
        dims = guidance.spatial_dims
        self.gates = nn.ModuleDict()
        self._hooked: dict[str, nn.Module] = {}
        if "input" in gate_places:
            self.gates["input"] = GuideGate(num_guides, num_input_channels, gate_mode, dims)
        n_enc = len(unet.encoder.stages)
        for i, stage in enumerate(unet.encoder.stages):
            place = "bottleneck" if i == n_enc - 1 else "encoder"
            if place in gate_places:
                self._attach(f"encoder_{i}", stage, GuideGate(num_guides, enc_channels[i], gate_mode, dims))
        if "decoder" in gate_places:
            for s, stage in enumerate(unet.decoder.stages):
                self._attach(f"decoder_{s}", stage, GuideGate(num_guides, enc_channels[-(s + 2)], gate_mode, dims))
        self._masks: torch.Tensor | None = None
        self.last_guide: tuple[torch.Tensor, torch.Tensor] | None = None

    def _attach(self, name: str, stage: nn.Module, gate: GuideGate) -> None:
        self.gates[name] = gate
        stage.register_forward_hook(self._make_hook(name))

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            return self.gates[name](output, self._masks_for(output))
        return hook

    def _masks_for(self, features: torch.Tensor) -> torch.Tensor:
        if self._masks is None:
            raise RuntimeError("GuidedUNet stages must run inside GuidedUNet.forward (guide masks not computed).")
        return self.guidance.guide_to(self._masks, features.shape[2:]).to(features.dtype)

    @property
    def decoder(self):
        """nnU-Net toggles deep supervision through ``network.decoder.deep_supervision``."""
        return self.unet.decoder

    @property
    def encoder(self):
        return self.unet.encoder

    def forward(self, x: torch.Tensor):
        scores, masks = self.guidance(x)
        out = self.forward_with_guide(x, masks)
        self.last_guide = (scores, masks)  # read by the trainer's guide loss and by the overlay tool
        return out

    def forward_with_guide(self, x: torch.Tensor, masks: torch.Tensor):
        """The gated U-Net on ``x`` with given guide masks (B, K, h_tokens, w_tokens), in 3D the guide volume
        (B, K, planes, h_tokens, w_tokens), instead of the ones DINO
        computes from ``x``: how the guide-reliance metric asks what the prediction would be without DINO's
        guide (shuffled across the batch, or constant)."""
        self._masks = masks
        try:
            if "input" in self.gates:
                x = self.gates["input"](x, self._masks_for(x))
            return self.unet(x)
        finally:
            self._masks = None


def build_guidance(config: GuiDINOConfig, num_input_channels: int, num_outputs: int, patch_size: Sequence[int],
                   normalization_schemes: Sequence[str] | None,
                   intensity_properties: Mapping | None = None, spacing: Sequence[float] | None = None
                   ) -> DinoGuidance:
    """The guidance branch of ``config``: ViT (LoRA-wrapped or frozen), input adapter and TokenBook; for a 3D
    ``patch_size`` the slice-wise branch, its slicing axis chosen from ``spacing`` (the configuration's, in patch
    axis order) unless configured. In 3D the adapter takes the image channels only (``normalization_schemes`` has
    one per image channel): the cascade's extra segmentation channels never reach the ViT."""
    if len(patch_size) not in (2, 3):
        raise ValueError(f"GuiDINO works on 2D or 3D patches, got patch size {tuple(patch_size)}.")
    arch = get_architecture(config.dino_arch)
    backbone = DinoBackbone(arch)
    if config.lora is not None:
        apply_lora(backbone, config.lora)
    else:
        backbone.freeze()
    if len(patch_size) == 2:
        adapter = DinoInputAdapter(num_input_channels, arch.patch_size, patch_size, config.min_short_side_tokens,
                                   normalization_schemes, arch.default_pretraining, intensity_properties,
                                   config.ct_intensity)
        tokenbook = TokenBook(arch.embed_dim, num_outputs, config.tokenbook)
        return DinoGuidance(backbone, adapter, tokenbook, config.dino_layer)
    if spacing is None or len(spacing) != 3:
        raise ValueError(f"A 3D patch needs the configuration's 3D spacing to choose the slicing axis, got {spacing}.")
    axis = resolve_slice_axis(config.slice_axis, spacing)
    stride = resolve_slice_stride(config.slice_stride)
    image_channels = len(normalization_schemes) if normalization_schemes else num_input_channels
    plane_hw = [s for i, s in enumerate(patch_size) if i != axis]
    adapter = DinoInputAdapter(image_channels, arch.patch_size, plane_hw, config.min_short_side_tokens,
                               normalization_schemes, arch.default_pretraining, intensity_properties,
                               config.ct_intensity)
    tokenbook = TokenBook(arch.embed_dim, num_outputs, config.tokenbook)
    return SliceWiseGuidance(backbone, adapter, tokenbook, config.dino_layer, patch_size, axis, stride,
                             num_input_channels)


def build_guided_unet(unet: nn.Module, config: GuiDINOConfig, num_input_channels: int, num_outputs: int,
                      patch_size: Sequence[int], normalization_schemes: Sequence[str] | None,
                      intensity_properties: Mapping | None = None,
                      spacing: Sequence[float] | None = None) -> GuidedUNet:
    """Deterministic structure (the predictor rebuilds it, then loads the checkpoint strictly). Pretrained DINO
    weights are loaded by the trainer at training start, never here."""
    guidance = build_guidance(config, num_input_channels, num_outputs, patch_size, normalization_schemes,
                              intensity_properties, spacing)
    return GuidedUNet(unet, guidance, config.gate_places, config.gate_mode, num_input_channels)
