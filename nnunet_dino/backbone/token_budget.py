"""The ViT token budget of a 2D patch: the input adapter's geometry (upsampling to ``min_short_side_tokens``, padding
to the ViT patch) and the cap on the resulting token count.

Plain arithmetic without torch; the plans tool (nnUNetv2_dino_add_highres_plans) checks the same cap as the trainers.
nnunet_dino.backbone.input_adapter applies it when the network is built.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

# Why 4096 tokens: self-attention costs grow with the square of the token count N. Without a memory-efficient kernel
# (CPU, older GPUs, or whenever PyTorch's SDPA falls back to the eager path) each head materialises an N x N score
# matrix: 4096^2 float32 = 67 MB per head per image, i.e. 0.8 GB per layer for ViT-B's 12 heads, kept for the
# backward pass in every layer gradients flow through. In compute, attention (about 4 N^2 d FLOPs per layer)
# overtakes the token-wise layers (about 24 N d^2) at N = 6 d: 2304 tokens for ViT-S, 4608 for ViT-B. At 4096 tokens
# attention already costs about as much as the rest of a ViT-B layer (1.8x for ViT-S); beyond, the quadratic term
# dominates. 4096 still admits every recipe this plugin knows: 1024x1024 at patch 16 (64x64 tokens), MedDINOv3's
# 2d_896 (56x56 = 3136), DINOv2's 896x896 at patch 14 (64x64) and the default upsampling of small MRI patches
# (Hippocampus 56x40: 23x16 = 368). The elongated 16x768 patch of the audit (Dataset988_Elongated, upsampled to
# 256x12288 = 12,288 tokens) would need 9x the attention work of the cap, with a 604 MB score matrix per head.
DEFAULT_MAX_TOKENS = 4096
MAX_TOKENS_ENV_VAR = "nnUNet_dino_max_tokens"


class TokenBudgetError(ValueError):
    """The patch would give the ViT more tokens than the cap (see DEFAULT_MAX_TOKENS); raised at construction."""


def token_geometry(image_hw: Sequence[int], patch_size: int, min_short_side_tokens: int
                   ) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(resized_hw, padded_hw, token_hw) of a 2D patch: upsampled so the short side spans ``min_short_side_tokens``
    tokens (never downsampled), then padded to a multiple of ``patch_size``."""
    scale = max(1.0, min_short_side_tokens * patch_size / min(image_hw))
    resized = tuple(int(round(s * scale)) for s in image_hw)
    padded = tuple(math.ceil(s / patch_size) * patch_size for s in resized)
    return resized, padded, tuple(s // patch_size for s in padded)


def max_tokens_setting(explicit: int | None = None) -> int:
    """The token cap: ``explicit``, else $nnUNet_dino_max_tokens, else DEFAULT_MAX_TOKENS."""
    if explicit is not None:
        value, source = explicit, "max_tokens"
    else:
        raw = os.environ.get(MAX_TOKENS_ENV_VAR, "").strip()
        if not raw:
            return DEFAULT_MAX_TOKENS
        try:
            value, source = int(raw), MAX_TOKENS_ENV_VAR
        except ValueError:
            raise ValueError(f"{MAX_TOKENS_ENV_VAR}={raw!r} is not an integer: give the largest number of ViT tokens "
                             f"per patch to allow (default {DEFAULT_MAX_TOKENS}), or unset it.") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{source} must be a positive integer (ViT tokens per patch), got {value!r}.")
    return value


def check_token_budget(image_hw: Sequence[int], patch_size: int, min_short_side_tokens: int, max_tokens: int) -> None:
    """Raise TokenBudgetError if the patch's token grid exceeds ``max_tokens``, saying what to do instead.

    Refusing rather than silently downscaling: the token grid fixes what the ViT sees (its resolution), the cost of
    every step and the structure the predictor must rebuild, so it must stay the one the configuration implies."""
    resized, _, token_hw = token_geometry(image_hw, patch_size, min_short_side_tokens)
    tokens = math.prod(token_hw)
    if tokens <= max_tokens:
        return
    patch = "x".join(map(str, image_hw))
    how = (f"upsampled to {'x'.join(map(str, resized))} so that its short side spans min_short_side_tokens="
           f"{min_short_side_tokens} tokens of {patch_size} px" if tuple(resized) != tuple(image_hw) else
           f"at its own size, {patch_size} px per token")
    fits = [k for k in range(min_short_side_tokens - 1, 0, -1)
            if math.prod(token_geometry(image_hw, patch_size, k)[2]) <= max_tokens]
    if tuple(resized) == tuple(image_hw):
        smaller = ""
    elif fits:
        smaller = (f"use a trainer variant (subclass) with min_short_side_tokens <= {fits[0]} (the largest that fits "
                   f"this patch); or ")
    else:
        native = math.prod(token_geometry(image_hw, patch_size, 1)[2])
        smaller = f"(even without upsampling this patch has {native:,} tokens) "
    raise TokenBudgetError(
        f"The 2D patch {patch} gives the ViT a {token_hw[0]}x{token_hw[1]} token grid ({tokens:,} tokens; {how}), "
        f"more than the cap of {max_tokens:,} tokens. Attention memory and time grow with the square of the token "
        f"count: this patch needs {(tokens / max_tokens) ** 2:.1f}x the attention work of the cap. What to do: "
        f"{smaller}use a configuration with a smaller or less elongated patch (e.g. plan a 2d configuration with "
        f"another patch size); or, if the memory and time are available, raise the cap with "
        f"{MAX_TOKENS_ENV_VAR}={tokens} (for training and for nnUNetv2_predict alike: both build this network).")
