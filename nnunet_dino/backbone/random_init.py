"""Random DINO weights that make a real network: what ``nnUNet_dino_weights=random`` and
``load_backbone(..., random_init=True)`` give.

Why not timm's own initialisation: timm starts every LayerScale gamma at 1e-5 (DINOv3's Eva blocks ``gamma_1`` /
``gamma_2``, DINOv2's ``ls1.gamma`` / ``ls2.gamma``), so every block adds 1e-5 of its attention and MLP output to
the residual stream: the "ViT" is then a linear patch embedding plus LayerNorm. Attention, RoPE and LoRA have no
effect (LoRA's output change ~1e-7, its gradient ~1e-12), so a test, demo or benchmark on such a backbone never
exercises them. timm's trunc-normal std 0.02 on top gives near-uniform attention.

What is drawn instead, for every base tensor of the ViT (never the LoRA tensors: peft's initialisation stays, with
lora_B = 0, so LoRA starts as the identity):

- LayerScale gammas ~ U(0.5, 1.5): order 1, as in trained DINO models where blocks change the stream by amounts
  comparable to it; varied per channel so that channel-wise mistakes (e.g. swapped gammas) stay visible.
- Linear and patch-embedding weights ~ N(0, 1/fan_in): each projection preserves the variance of its input, so the
  q and k entries of a LayerNorm'ed token have variance ~1 and the attention logits q.k/sqrt(head_dim) have std ~1
  at *every* width (0.051 for ViT-S, 0.016 for the 7B's width 4096): attention weights differ by factors of e and
  more within a row, clearly non-uniform without being one-hot. Each branch outputs O(1) values, and with pre-norm
  blocks the residual stream only grows additively, by O(1) per block, never exponentially (measured std: 1.3 after
  the first block, 3.7 after ViT-S's 12, 5.5 after ViT-L's 24, so ~10 after the 7B's 40); the final norm rescales
  it. A width-independent std (e.g. 0.05) would instead give the 7B attention logits ~10x larger.
- Biases ~ N(0, 0.02): small, but not zero, as in trained models.
- LayerNorm gains ~ U(0.8, 1.2), i.e. near 1; LayerNorm biases ~ N(0, 0.02).
- CLS, register and mask tokens and DINOv2's learned position embedding ~ N(0, 1): the scale of the patch embeddings
  of a normalised image, so that neither content nor these tokens dominate.

Values are sampled on the CPU in float32 (then copied to the parameter's device and dtype), from the global torch RNG
unless a generator is given: ``torch.manual_seed(s)`` before the call reproduces the same backbone on any device.
A parameter that none of these rules covers is an error, so a new architecture cannot silently keep timm's values.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .model import DinoBackbone

LAYER_SCALE_RANGE = (0.5, 1.5)
NORM_GAIN_RANGE = (0.8, 1.2)
BIAS_STD = 0.02
TOKEN_STD = 1.0

_LAYER_SCALE_NAMES = ("gamma", "gamma_1", "gamma_2")  # timm LayerScale (DINOv2) / EvaBlock (DINOv3)
_TOKEN_NAMES = ("cls_token", "reg_token", "mask_token", "pos_embed")


def init_random_dino_weights_(backbone: DinoBackbone, generator: torch.Generator | None = None) -> DinoBackbone:
    """Overwrite, in place, every base parameter of ``backbone``'s ViT with realistic-scale random values (module
    doc); LoRA tensors (``lora_A`` / ``lora_B``) and buffers (DINOv3's RoPE periods) are left as they are. Works on
    plain and LoRA-wrapped backbones (peft keeps base weights under ``...base_layer``). ``generator``: a CPU
    generator; None uses the global torch RNG. Returns the backbone."""
    with torch.no_grad():
        for module_name, module in backbone.vit.named_modules():
            if "lora_" in module_name:
                continue
            for leaf, param in module.named_parameters(recurse=False):
                if "lora_" in leaf:
                    continue
                value = _draw(module, leaf, tuple(param.shape), generator)
                if value is None:
                    raise RuntimeError(f"init_random_dino_weights_ has no rule for {module_name}.{leaf} "
                                       f"({type(module).__name__}, shape {tuple(param.shape)}) of "
                                       f"{backbone.arch.name}; add one in nnunet_dino/backbone/random_init.py.")
                param.copy_(value)
    return backbone


def _draw(module: nn.Module, leaf: str, shape: tuple[int, ...], g: torch.Generator | None) -> torch.Tensor | None:
    if leaf in _LAYER_SCALE_NAMES:
        return _uniform(shape, *LAYER_SCALE_RANGE, g)
    if leaf in _TOKEN_NAMES:
        return _normal(shape, TOKEN_STD, g)
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        if leaf == "weight":
            fan_in = math.prod(shape[1:])  # Linear (out, in); Conv2d (out, in, kh, kw)
            return _normal(shape, 1.0 / math.sqrt(fan_in), g)
        if leaf == "bias":
            return _normal(shape, BIAS_STD, g)
    if isinstance(module, nn.LayerNorm):
        if leaf == "weight":
            return _uniform(shape, *NORM_GAIN_RANGE, g)
        if leaf == "bias":
            return _normal(shape, BIAS_STD, g)
    return None


def _normal(shape, std: float, g: torch.Generator | None) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=g)


def _uniform(shape, low: float, high: float, g: torch.Generator | None) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32).uniform_(low, high, generator=g)
