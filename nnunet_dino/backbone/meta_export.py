"""Writing a backbone in Meta's own file layout, named as Meta names its files.

The inverse of ``formats._dinov3_from_meta`` / ``formats._dinov2_from_meta_or_timm``: our canonical (timm) state dict
-> Meta's DINOv3 / DINOv2 keys, so that a file written here loads through ``load_backbone`` like Meta's own releases
(and in Meta's code). File names follow Meta's convention ``<prefix>-<first 8 hex digits of the sha256>.pth``, which
``weight_files.verify_meta_hash`` checks on every load, so a truncated copy is caught.

- DINOv3: q/k/v are fused into ``attn.qkv`` with the k part of the bias zero and ``qkv.bias_mask`` [1, 0, 1], exactly
  as Meta's LinearKMaskedBias stores it; ``rope_embed.periods`` is written from the architecture's RoPE schedule.
- DINOv2: Meta's keys; for the register models the class token's position embedding, which timm folds into the class
  token, is written as zero (Meta's model adds it back: cls + 0 = the folded token), so the round trip is exact.
- ``mask_token`` (iBOT's masked-patch embedding, unused for features) is written when given, else zero.

Writes are atomic (``atomic_files.write_atomically``: a temporary file in the target folder renamed into place,
after a free-space check), so an interrupted write never leaves a partial file under a Meta name.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..atomic_files import write_atomically
from .registry import DinoArchitecture
from .vit_factory import rope_periods


def canonical_to_meta(arch: DinoArchitecture, state: dict, mask_token: torch.Tensor | None = None) -> dict:
    """Our canonical state dict of ``arch`` (``DinoBackbone.vit.state_dict()``) in Meta's key layout."""
    state = {k: v.detach().cpu() for k, v in state.items()}
    mask = (mask_token.detach().cpu().reshape(1, arch.embed_dim) if mask_token is not None
            else torch.zeros(1, arch.embed_dim, dtype=state["cls_token"].dtype))
    out = _dinov3_to_meta(arch, state) if arch.family == "dinov3" else _dinov2_to_meta(arch, state)
    out["mask_token"] = mask.clone()
    # Every tensor owns its storage: torch.save would otherwise write shared or oversized storages.
    return {k: v.contiguous().clone() for k, v in out.items()}


def _dinov3_to_meta(arch: DinoArchitecture, s: dict) -> dict:
    out = {"cls_token": s.pop("cls_token"), "storage_tokens": s.pop("reg_token"),
           "rope_embed.periods": rope_periods(arch)}
    for p in ("patch_embed.proj", "norm"):
        out[f"{p}.weight"], out[f"{p}.bias"] = s.pop(f"{p}.weight"), s.pop(f"{p}.bias")
    mlp = {"fc1_g": "w1", "fc1_x": "w2", "fc2": "w3"} if arch.swiglu else {"fc1": "fc1", "fc2": "fc2"}
    dim = arch.embed_dim
    for i in range(arch.depth):
        b = f"blocks.{i}."
        for n in ("norm1", "norm2", "attn.proj"):
            out[f"{b}{n}.weight"], out[f"{b}{n}.bias"] = s.pop(f"{b}{n}.weight"), s.pop(f"{b}{n}.bias")
        for src, dst in mlp.items():
            out[f"{b}mlp.{dst}.weight"], out[f"{b}mlp.{dst}.bias"] = (s.pop(f"{b}mlp.{src}.weight"),
                                                                      s.pop(f"{b}mlp.{src}.bias"))
        out[b + "ls1.gamma"], out[b + "ls2.gamma"] = s.pop(b + "gamma_1"), s.pop(b + "gamma_2")
        q, k, v = (s.pop(f"{b}attn.{n}_proj.weight") for n in "qkv")
        out[b + "attn.qkv.weight"] = torch.cat([q, k, v])
        qb, vb = s.pop(b + "attn.q_proj.bias"), s.pop(b + "attn.v_proj.bias")
        out[b + "attn.qkv.bias"] = torch.cat([qb, torch.zeros_like(qb), vb])
        out[b + "attn.qkv.bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)]).to(qb.dtype)
    _check_consumed(s, arch)
    return out


def _dinov2_to_meta(arch: DinoArchitecture, s: dict) -> dict:
    out = {}
    if arch.num_registers:
        # timm folded Meta's class-token position embedding into cls_token (no_embed_class); write it back as zero.
        pos = s.pop("pos_embed")
        out["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
        out["register_tokens"] = s.pop("reg_token")
    else:
        out["pos_embed"] = s.pop("pos_embed")
    out["cls_token"] = s.pop("cls_token")
    for k in list(s):
        m = k.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.") if arch.swiglu else k
        out[m] = s.pop(k)
    return out


def _check_consumed(left: dict, arch: DinoArchitecture) -> None:
    if left:
        raise ValueError(f"canonical_to_meta: {len(left)} tensor(s) of {arch.name} have no place in Meta's layout: "
                         f"{sorted(left)[:10]}. The state dict is not a canonical {arch.name}.")


def meta_file_prefix(arch: DinoArchitecture, tag: str) -> str:
    """The name Meta's convention gives weights of ``arch`` pretrained on ``tag`` (before ``-<sha8>.pth``);
    ``find_meta_file`` finds it in a folder: DINOv2 register models are called ``..._reg4_pretrain``."""
    base = f"{arch.name[:-4]}_reg4" if arch.name.endswith("_reg") else arch.name
    return f"{base}_pretrain_{tag}"


def save_meta_named(state: dict, folder: str | os.PathLike, prefix: str) -> Path:
    """``torch.save(state)`` into ``folder`` as ``<prefix>-<first 8 hex of its sha256>.pth`` (atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    nbytes = sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    tmp = folder / f".{prefix}.unhashed-{os.getpid()}"
    write_atomically(tmp, lambda p: torch.save(state, p), nbytes)
    try:
        digest = hashlib.sha256()
        with open(tmp, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        final = folder / f"{prefix}-{digest.hexdigest()[:8]}.pth"
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final
