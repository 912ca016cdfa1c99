"""DinoBackbone: a timm ViT of a registered architecture that returns patch-token maps."""
from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from .formats import CanonicalWeights
from .registry import DinoArchitecture
from .vit_factory import create_vit
from .weight_files import HOW_TO_GET_WEIGHTS, WeightFileError

log = logging.getLogger("nnunet_dino")


@dataclass
class LoadReport:
    arch: str
    layout: str
    source: str
    pretraining: str
    random_init: bool = False

    def describe(self) -> str:
        if self.random_init:
            return (f"{self.arch}: RANDOMLY INITIALISED DINO weights (explicitly requested; realistic-scale random "
                    f"weights, LayerScale ~1). Results are NOT those of a pretrained foundation model.")
        # ``pretraining`` names the input convention the weights expect (the stats of Meta's data sets), which
        # self-pretrained files inherit; it does not say that the file is one of Meta's releases.
        return (f"{self.arch}: pretrained weights from {self.source} [{self.layout} layout; input convention "
                f"{self.pretraining}]")


class DinoBackbone(nn.Module):
    """Patch-token features of a DINOv3/DINOv2 ViT.

    ``patch_features`` returns, per requested block, the (B, C, H/p, W/p) map of the *last* h*w tokens after the
    final norm: CLS and register tokens are never taken as patches. When frozen, the ViT always runs in eval mode,
    so features are deterministic (timm's DINOv3 has no train-time RoPE jitter; dropout/drop-path are off)."""

    def __init__(self, arch: DinoArchitecture, drop_path_rate: float = 0.0, device: str | torch.device | None = None):
        """``device="meta"``: the ViT's parameters have shapes only (create_vit); ``load_canonical`` then assigns the
        weights' own tensors instead of copying them into randomly initialised ones. Everything that builds a
        network for nnU-Net (whose checkpoint or weights are copied in later) uses the default, a real CPU build."""
        super().__init__()
        self.arch = arch
        self.vit = create_vit(arch, drop_path_rate, device=device)
        self.frozen = False

    def meta_tensors(self) -> list[str]:
        """Names of the ViT's parameters and buffers that have no storage (meta device)."""
        return [n for n, t in itertools.chain(self.vit.named_parameters(), self.vit.named_buffers()) if t.is_meta]

    @property
    def patch_size(self) -> int:
        return self.arch.patch_size

    @property
    def embed_dim(self) -> int:
        return self.arch.embed_dim

    def freeze(self) -> "DinoBackbone":
        """Freeze every base weight (LoRA tensors, if any, stay trainable) and pin eval mode."""
        for name, p in self.vit.named_parameters():
            p.requires_grad_("lora_" in name)
        self.frozen = True
        self.vit.eval()
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen and not any(p.requires_grad for p in self.vit.parameters()):
            self.vit.eval()  # a fully frozen ViT is a fixed feature extractor: never stochastic
        return self

    def patch_features(self, x: torch.Tensor, layers: Sequence[int] | None = None) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"patch_features expects (B, 3, H, W) in the backbone's input space, got {tuple(x.shape)}; "
                             f"use DinoInputAdapter to map nnU-Net patches.")
        p = self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"H and W must be multiples of the patch size {p}, got {tuple(x.shape[-2:])}; "
                             f"DinoInputAdapter pads (never crops) to such sizes.")
        layers = list(self.arch.default_layers if layers is None else layers)
        bad = [i for i in layers if not 0 <= i < self.arch.depth]
        if bad:
            raise ValueError(f"Block indices {bad} out of range for {self.arch.name} with {self.arch.depth} blocks.")
        return self.vit.forward_intermediates(x, indices=layers, norm=True, output_fmt="NCHW", intermediates_only=True)

    # ------------------------------------------------------------------------------------------ weights
    def load_canonical(self, weights: CanonicalWeights) -> None:
        """Strictly load converted weights into the (possibly LoRA-wrapped) ViT. Missing or unexpected keys
        are an error that names them; LoRA tensors are the only model keys weights may not provide."""
        if weights.arch.name != self.arch.name:
            raise WeightFileError(
                f"The weights are {weights.arch.name} ({weights.layout} layout) but this backbone is {self.arch.name}. "
                f"Use weights of {self.arch.name}, or choose the matching architecture/trainer variant."
            )
        model_keys = self.vit.state_dict().keys()
        # peft wraps a Linear as X.base_layer; map X.weight -> X.base_layer.weight where that happened.
        target = {}
        for k, v in weights.state_dict.items():
            mod, _, leaf = k.rpartition(".")
            wrapped = f"{mod}.base_layer.{leaf}"
            target[wrapped if wrapped in model_keys else k] = v
        missing = [k for k in model_keys if k not in target and "lora_" not in k]
        unexpected = [k for k in target if k not in model_keys]
        source = f"{weights.source}: " if weights.source else ""
        if missing or unexpected:
            raise WeightFileError(
                f"{source}Weights do not fit {self.arch.name}: missing {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
                f"{' ...' if len(unexpected) > 10 else ''}."
            )
        self._check_shapes(target, weights, source)
        if self.meta_tensors():
            self._assign(target)
        else:
            result = self.vit.load_state_dict(target, strict=False)
            assert not result.unexpected_keys and all("lora_" in k for k in result.missing_keys), result

    def _assign(self, target: dict) -> None:
        """Load into a ViT built on the meta device: the weights' tensors become the parameters (no copy into
        random values), as tensors of the ViT's own dtype and memory layout that share storage with nothing, i.e.
        exactly what copying into a CPU-built ViT gives. Anything still on meta afterwards is an error."""
        model_state = self.vit.state_dict()
        result = self.vit.load_state_dict(_owned_tensors(target, model_state), strict=False, assign=True)
        assert not result.unexpected_keys, result
        left = self.meta_tensors()
        if left:
            raise RuntimeError(
                f"{self.arch.name}: {len(left)} tensor(s) have no values after loading the weights into a ViT built "
                f"on the meta device: {left[:5]}{' ...' if len(left) > 5 else ''}. The weights cover only the base "
                f"ViT (e.g. LoRA tensors are never in them): build on the CPU (DinoBackbone(arch)) and load with "
                f"load_weights_into.")

    def _check_shapes(self, target: dict, weights: CanonicalWeights, source: str) -> None:
        """Every tensor must have the shape the architecture gives it; torch's own size-mismatch error names neither
        the file nor a remedy. (The architecture was inferred from a few tensors only, so others can still differ,
        e.g. a patch embedding cut down to one input channel.)"""
        model_state = self.vit.state_dict()
        wrong = [f"{k}: expected {tuple(model_state[k].shape)}, found {tuple(v.shape)}"
                 for k, v in target.items() if tuple(v.shape) != tuple(model_state[k].shape)]
        if wrong:
            raise WeightFileError(
                f"{source}{len(wrong)} tensor(s) of the {weights.layout} weights do not have the shapes of "
                f"{self.arch.name}: {wrong[:5]}{' ...' if len(wrong) > 5 else ''}. The file is damaged or holds a "
                f"modified model (e.g. a patch embedding adapted to other input channels: nnunet-dino maps any number "
                f"of image channels to the 3 RGB channels itself, with DinoInputAdapter). Use the original weights. "
                f"{HOW_TO_GET_WEIGHTS}"
            )


def _owned_tensors(target: dict, model_state: dict) -> dict:
    """``target``'s tensors converted to the dtype of the model's entry and made contiguous; a tensor that would
    share storage with another (views of one fused tensor, e.g. q/k/v split from Meta's qkv) or that is a part of
    a larger storage is copied, so that every parameter owns its storage, as after load_state_dict's copy."""
    out, seen = {}, set()
    for k, v in target.items():
        v = v.to(dtype=model_state[k].dtype).contiguous()
        storage = v.untyped_storage()
        shared = storage.data_ptr() in seen or storage.nbytes() != v.numel() * v.element_size()
        out[k] = v.clone() if shared else v
        seen.add(out[k].untyped_storage().data_ptr())
    return out
