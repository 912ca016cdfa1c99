"""LoRA on the DINO backbone through peft: configuration (LoraSettings) apart from mechanism (apply/merge).

Inference with merged adapters (``EvalMergedLoraLinear``): peft's unmerged forward computes base(x) + s * B(A(x))
for every adapted projection, two extra small matmuls per layer per call (+16 % of the backbone's inference time
measured on GuiDINO). Merging in place (peft's ``merge_adapter``) would change the base tensors nnU-Net saves: it
writes checkpoints right after validation, with the network still in eval mode, and its predictor loads a state
dict per fold into the same network, so a merged base weight would be saved, and unmerging drifts by float
rounding. Instead each adapted layer, whenever it runs in eval mode with autograd off (nnU-Net's validation and
prediction), computes one Linear with a *cached* merged weight W + s * B A and leaves every parameter untouched.
The cache is a plain attribute (never in the state dict), rebuilt when the base weight or any LoRA tensor changes
(their ``_version`` counters, which in-place updates such as load_state_dict and optimiser steps bump, plus their
identity, storage, device and dtype), dropped when the layer goes back to training, and costs one extra copy of the
adapted weights while held (ViT-S attention: 7.1 M values). Training, autograd and torch.compile (which traces and
fuses the plain peft forward) keep peft's unmerged forward.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.lora import Linear as PeftLoraLinear

from .model import DinoBackbone

# Module names inside timm's blocks, per family (see formats.py for the canonical layouts).
_ATTENTION_TARGETS = {"dinov3": ("q_proj", "k_proj", "v_proj", "proj"), "dinov2": ("qkv", "proj")}
_MLP_TARGETS = {"dinov3": ("fc1", "fc2", "fc1_g", "fc1_x"), "dinov2": ("fc1", "fc2")}


@dataclass(frozen=True)
class LoraSettings:
    """GuiDINO's defaults: rank 8, alpha 16, dropout 0.05 on the attention projections."""
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    attention: bool = True
    mlp: bool = False

    def __post_init__(self):
        if self.rank < 1 or not (self.attention or self.mlp):
            raise ValueError(f"LoRA needs rank >= 1 and at least one of attention/mlp targets: {self}")

    def target_regex(self, family: str) -> str:
        names = (_ATTENTION_TARGETS[family] if self.attention else ()) + (_MLP_TARGETS[family] if self.mlp else ())
        groups = []
        if self.attention:
            groups.append(rf"attn\.({'|'.join(_ATTENTION_TARGETS[family])})")
        if self.mlp:
            groups.append(rf"mlp\.({'|'.join(_MLP_TARGETS[family])})")
        assert names
        return rf"blocks\.\d+\.({'|'.join(groups)})$"


def apply_lora(backbone: DinoBackbone, settings: LoraSettings) -> DinoBackbone:
    """Inject LoRA adapters into the backbone's ViT (in place). Base weights are frozen; LoRA tensors are ordinary
    parameters of the network, so nnU-Net's checkpoints carry them. Deterministic structure: safe to call in
    build_network_architecture."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.target_regex(backbone.arch.family), bias="none")
    inject_adapter_in_model(config, backbone.vit)
    _use_eval_merged_layers(backbone.vit)
    backbone.freeze()
    n_lora = sum(1 for _ in lora_parameters(backbone))
    if n_lora == 0:
        raise RuntimeError(f"LoRA matched no module of {backbone.arch.name} with {settings}.")
    return backbone


class EvalMergedLoraLinear(PeftLoraLinear):
    """peft's LoRA Linear that runs as one Linear with a cached merged weight in eval mode without autograd (module
    doc); identical structure, parameters and state dict."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self._merged_inference_applies(args, kwargs):
            return super().forward(x, *args, **kwargs)
        return F.linear(x, self._merged_weight(), self.get_base_layer().bias)

    def _merged_inference_applies(self, args, kwargs) -> bool:
        """Only where W + s B A is exactly what peft computes: eval (LoRA dropout off), no autograd (a cached weight
        has no graph), eager (under torch.compile the traced peft forward is fused instead), plain LoRA on a Linear
        (no DoRA-style variant, no LoRA bias, no per-call adapter selection, adapters active and not merged)."""
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling() or args or kwargs:
            return False
        if self.disable_adapters or self.merged or type(self.get_base_layer()) is not nn.Linear:
            return False
        active = self._active_lora_adapters()
        return bool(active) and not any(a in self.lora_variant or self.lora_bias[a] for a in active)

    def _active_lora_adapters(self) -> tuple[str, ...]:
        return tuple(a for a in self.active_adapters if a in self.lora_A)

    def _cache_key(self) -> tuple:
        """Changes whenever a tensor the merged weight depends on may have changed."""
        active = self._active_lora_adapters()
        tensors = [self.get_base_layer().weight]
        for a in active:
            tensors += [self.lora_A[a].weight, self.lora_B[a].weight]
        return (active, tuple(float(self.scaling[a]) for a in active),
                tuple((id(t), t._version, t.data_ptr(), t.device, t.dtype, tuple(t.shape)) for t in tensors))

    def _merged_weight(self) -> torch.Tensor:
        key = self._cache_key()
        cached = getattr(self, "_merged_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        weight = self.get_base_layer().weight
        merged = weight.clone()
        for a in self._active_lora_adapters():
            merged += self.get_delta_weight(a).to(weight.dtype)  # peft's own delta: (B @ A) * scaling
        self._merged_cache = (key, merged)
        return merged

    def clear_merged_cache(self) -> None:
        self._merged_cache = None

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self.clear_merged_cache()  # training uses peft's forward; free the copy
        return self

    def merge(self, *args, **kwargs) -> None:
        # peft merges through .data, which bumps no version counter: never reuse a weight cached before.
        self.clear_merged_cache()
        super().merge(*args, **kwargs)

    def unmerge(self, *args, **kwargs) -> None:
        self.clear_merged_cache()
        super().unmerge(*args, **kwargs)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_merged_cache"] = None  # copies and pickles rebuild it from their own tensors
        return state


def _use_eval_merged_layers(vit: nn.Module) -> None:
    """Give every LoRA layer peft injected the eval-merged forward (same object, same parameters: only the class
    changes, so keys, values and identities of every tensor stay as peft made them)."""
    from peft.tuners.lora import LoraLayer

    for name, module in vit.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if type(module) is not PeftLoraLinear:
            raise RuntimeError(f"LoRA layer {name} is a {type(module).__name__}, not peft's lora.Linear; "
                               f"EvalMergedLoraLinear supports only the latter (nnunet_dino/backbone/lora.py).")
        module.__class__ = EvalMergedLoraLinear
        module.clear_merged_cache()


def lora_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    return (p for n, p in module.named_parameters() if "lora_" in n)


def merge_lora(backbone: DinoBackbone) -> DinoBackbone:
    """Fold every adapter into its base weight and restore plain Linear layers (for export). Outputs are
    unchanged up to float rounding."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(backbone.vit.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = backbone.vit.get_submodule(parent_name) if parent_name else backbone.vit
            setattr(parent, child, module.get_base_layer())
    return backbone
