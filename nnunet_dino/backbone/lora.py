"""LoRA on the DINO backbone through peft: configuration (LoraSettings) apart from mechanism (apply/merge)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch.nn as nn

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
    backbone.freeze()
    n_lora = sum(1 for _ in lora_parameters(backbone))
    if n_lora == 0:
        raise RuntimeError(f"LoRA matched no module of {backbone.arch.name} with {settings}.")
    return backbone


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
