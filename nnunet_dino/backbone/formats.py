"""Conversion of every supported weight layout to the key layout of our timm-built backbone.

Canonical layouts (what ``vit_factory.create_vit`` builds):
- DINOv3: timm ``Eva`` with separate ``attn.q_proj/k_proj/v_proj`` (so LoRA can target each projection; timm's
  fused ``_qkvb`` path calls ``F.linear`` and would bypass LoRA), q/v biases always present.
- DINOv2: timm ``VisionTransformer`` (fused ``attn.qkv`` called as a module, so LoRA applies).

Every conversion is strict: keys it does not understand are reported, never dropped. The only keys dropped
are ones with no effect on patch features, each named in ``_DINOV3_IGNORED``/``_DINOV2_IGNORED``. Every tensor must
be finite, and a DINOv3 key bias, which the canonical model cannot hold, is refused in every layout.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .registry import DinoArchitecture, match_architecture
from .weight_files import HOW_TO_GET_WEIGHTS, WeightFileError

# Tensors not loaded as such: the masked-token embedding (iBOT) and the 7B/SAT-L local-crop CLS norm (pretraining
# only), the RoPE periods (the model computes its own; the stored ones are first checked against them,
# _check_rope_periods) and the k-bias mask (applied to qkv.bias first, _meta_qv_bias). Meta's DINOv3 never applies a
# k bias (its LinearKMaskedBias multiplies qkv.bias by the mask [1, 0, 1]), and the canonical timm model has none, so
# a key bias that would be applied is refused in every layout: RoPE rotates k per position, so a key bias changes
# the attention and dropping it would change the features.
_DINOV3_IGNORED = re.compile(r"^(mask_token|rope_embed\.periods|local_cls_norm\..*|blocks\.\d+\.attn\.qkv\.bias_mask)$")
_DINOV2_IGNORED = re.compile(r"^mask_token$")
# Meta's files store the RoPE periods in bf16 (relative rounding error <= 2**-9): 4x that still tells any other RoPE
# base apart (base 101 instead of 100 already moves the last period by ~1%).
_ROPE_RTOL = 2.0 ** -7


@dataclass
class CanonicalWeights:
    arch: DinoArchitecture
    state_dict: dict
    layout: str  # human-readable name of the layout the file was in
    source: str | None = None  # the file or folder read, for error messages


def _unexpected(keys, layout):
    keys = sorted(keys)
    raise WeightFileError(
        f"The {layout} weights contain {len(keys)} key(s) nnunet-dino does not know how to load: {keys[:12]}"
        f"{' ...' if len(keys) > 12 else ''}. Refusing to drop them silently. {HOW_TO_GET_WEIGHTS}"
    )


def _missing(layout, key):
    return WeightFileError(f"The {layout} weights lack the tensor {key!r}: the file is incomplete or not a full DINO "
                           f"state dict. {HOW_TO_GET_WEIGHTS}")


def _key_bias_error(layout, block, tensor, reason=""):
    return WeightFileError(
        f"Block {block} of the {layout} weights has a non-zero key bias ({tensor}{reason}), which Meta's released "
        f"DINOv3 models never apply and nnunet-dino's DINOv3 (timm's Eva, no key bias) cannot represent. RoPE "
        f"rotates keys per position, so dropping the bias would change the features: refusing to drop it. Meta's "
        f"files zero the key bias with qkv.bias_mask [1, 0, 1] (mask_k_bias=True); use weights trained that way."
    )


def _check_finite(state: dict) -> None:
    """Refuse NaN/inf anywhere in the file (nested dicts included): a damaged file or a diverged training run, whose
    features would be non-finite. Named by the file's own keys."""
    bad = []

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()) and not bool(
                    torch.isfinite(v).all()):
                bad.append(f"{prefix}{k} ({v.numel() - int(torch.isfinite(v).sum())} of {v.numel()} values)")

    walk(state, "")
    if bad:
        raise WeightFileError(
            f"The weights contain NaN or infinite values in {len(bad)} tensor(s): {bad[:10]}"
            f"{' ...' if len(bad) > 10 else ''}. The file is damaged or was saved from a diverged training run; it "
            f"would give non-finite features, so it is refused. {HOW_TO_GET_WEIGHTS}"
        )


def _preview(t: torch.Tensor) -> str:
    v = [f"{x:.4g}" for x in t.tolist()]
    return f"[{', '.join(v)}]" if len(v) <= 4 else f"[{v[0]}, {v[1]}, {v[2]}, ..., {v[-1]}]"


def _check_rope_periods(periods: torch.Tensor, arch: DinoArchitecture, what: str, layout: str) -> None:
    """The model computes its RoPE periods itself (vit_factory.rope_periods); stored periods of other values mean the
    weights were trained with another RoPE schedule, whose features nnunet-dino would not reproduce."""
    from .vit_factory import rope_periods

    expected = rope_periods(arch)
    found = periods.detach().float().flatten()
    if found.shape != expected.shape or not torch.allclose(found, expected, rtol=_ROPE_RTOL, atol=0.0):
        raise WeightFileError(
            f"{what} of the {layout} weights gives {found.numel()} RoPE periods {_preview(found)}, but {arch.name} "
            f"computes {expected.numel()} periods {_preview(expected)} (RoPE base {arch.rope_base:g}): the model "
            f"was trained with another RoPE schedule, or the file is damaged. Its features would differ from those "
            f"nnunet-dino computes, so it is refused. {HOW_TO_GET_WEIGHTS}"
        )


def _depth(state, pattern):
    ids = {int(m.group(1)) for k in state for m in [re.match(pattern, k)] if m}
    if not ids:
        return 0
    if ids != set(range(max(ids) + 1)):
        raise WeightFileError(f"Block indices are not contiguous: {sorted(ids)}.")
    return max(ids) + 1


# ---------------------------------------------------------------------------------------------- DINOv3
def _meta_qv_bias(state: dict, i: int, dim: int, dtype, layout: str, used: set):
    """The q and v bias of block ``i`` exactly as Meta's model applies them; refuses a key bias it would apply.

    Meta's LinearKMaskedBias adds qkv.bias * qkv.bias_mask: with the mask [1, 0, 1] of every released file the
    stored k part (often non-zero) has no effect; any other mask is applied as Meta applies it. Without a mask
    (mask_k_bias=False) qkv.bias is added as it is."""
    bias_key, mask_key = f"blocks.{i}.attn.qkv.bias", f"blocks.{i}.attn.qkv.bias_mask"
    if bias_key not in state:  # MedDINOv3 and some distilled models: no qkv bias, i.e. exactly zero bias
        zero = torch.zeros(dim, dtype=dtype)
        return zero, zero
    bias = state[bias_key]
    used.add(bias_key)
    if mask_key in state:
        mask = state[mask_key]
        if mask.shape != bias.shape:
            raise WeightFileError(f"{mask_key} has shape {tuple(mask.shape)} but {bias_key} has {tuple(bias.shape)}: "
                                  f"the {layout} weights are damaged. {HOW_TO_GET_WEIGHTS}")
        bias = bias * mask.to(bias.dtype)
        reason = f", which {mask_key} does not zero"
    else:
        reason = f", with no {mask_key} to zero it"
    qb, kb, vb = bias.chunk(3, dim=0)
    if kb.any():
        raise _key_bias_error(layout, i, f"the k part of {bias_key}", reason)
    return qb, vb


def _dinov3_from_meta(state: dict, layout: str, periods_name: str = "The tensor 'rope_embed.periods'"
                      ) -> CanonicalWeights:
    """Meta's official DINOv3 layout (also MedDINOv3's backbone) -> canonical. ``periods_name`` says where the RoPE
    periods came from (other layouts express their RoPE settings as Meta's periods)."""
    dim = state["cls_token"].shape[-1]
    depth = _depth(state, r"blocks\.(\d+)\.")
    swiglu = "blocks.0.mlp.w1.weight" in state
    heads = None
    if "rope_embed.periods" in state:  # periods has head_dim/4 entries
        heads = dim // (4 * state["rope_embed.periods"].numel())
    arch = match_architecture("dinov3", dim, depth, state["storage_tokens"].shape[1], swiglu,
                              state["patch_embed.proj.weight"].shape[-1], heads)
    if "rope_embed.periods" in state:
        _check_rope_periods(state["rope_embed.periods"], arch, periods_name, layout)
    out, used = {}, set()

    def take(src, dst):
        out[dst] = state[src]
        used.add(src)

    take("cls_token", "cls_token")
    take("storage_tokens", "reg_token")
    for p in ("patch_embed.proj", "norm"):
        take(f"{p}.weight", f"{p}.weight")
        take(f"{p}.bias", f"{p}.bias")
    mlp_names = {"w1": "fc1_g", "w2": "fc1_x", "w3": "fc2"} if swiglu else {"fc1": "fc1", "fc2": "fc2"}
    for i in range(depth):
        b = f"blocks.{i}."
        for n in ("norm1", "norm2", "attn.proj"):
            take(b + n + ".weight", b + n + ".weight")
            take(b + n + ".bias", b + n + ".bias")
        for src, dst in mlp_names.items():
            take(f"{b}mlp.{src}.weight", f"{b}mlp.{dst}.weight")
            take(f"{b}mlp.{src}.bias", f"{b}mlp.{dst}.bias")
        take(b + "ls1.gamma", b + "gamma_1")
        take(b + "ls2.gamma", b + "gamma_2")
        q, k, v = state[b + "attn.qkv.weight"].chunk(3, dim=0)
        used.add(b + "attn.qkv.weight")
        out[b + "attn.q_proj.weight"], out[b + "attn.k_proj.weight"], out[b + "attn.v_proj.weight"] = q, k, v
        out[b + "attn.q_proj.bias"], out[b + "attn.v_proj.bias"] = _meta_qv_bias(state, i, dim, q.dtype, layout, used)
    _reject_leftovers(state, used, _DINOV3_IGNORED, layout)
    return CanonicalWeights(arch, out, layout)


def _dinov3_from_timm(state: dict) -> CanonicalWeights:
    """timm's Eva DINOv3 layout (fused qkv with q_bias/v_bias, or already split) -> Meta layout -> canonical."""
    meta = {}
    for k, v in state.items():
        k2 = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        k2 = k2.replace("mlp.fc1_g", "mlp.w1").replace("mlp.fc1_x", "mlp.w2")
        meta[k2] = v
    swiglu = "blocks.0.mlp.w1.weight" in meta
    if swiglu:
        meta = {k.replace("mlp.fc2", "mlp.w3"): v for k, v in meta.items()}
    for i in range(_depth(meta, r"blocks\.(\d+)\.")):
        b = f"blocks.{i}.attn."
        # Split projections (q_proj/k_proj/v_proj) or the fused _qkvb variant (qkv + q_bias/v_bias; its k_bias
        # buffer is not saved by timm, but refused like any key bias if a file has one).
        names = ("q_proj.bias", "k_proj.bias", "v_proj.bias") if b + "q_proj.weight" in meta else (
            "q_bias", "k_bias", "v_bias")
        if b + "q_proj.weight" in meta:
            meta[b + "qkv.weight"] = torch.cat([meta.pop(b + f"{n}_proj.weight") for n in "qkv"])
        qb, kb, vb = (meta.pop(b + n, None) for n in names)
        if kb is not None and kb.any():
            raise _key_bias_error("timm DINOv3", i, f"blocks.{i}.attn.{names[1]}")
        if qb is not None or vb is not None:  # an absent bias is exactly a zero bias
            zero = torch.zeros_like(qb if qb is not None else vb)
            meta[b + "qkv.bias"] = torch.cat([qb if qb is not None else zero, zero, vb if vb is not None else zero])
    return _dinov3_from_meta(meta, "timm DINOv3")


def _hf_name(meta_key: str, top: dict, prefix: str, layers: dict, attention: str) -> str:
    """The Hugging Face name of the tensor a conversion looked up by its Meta name ``meta_key`` (the inverse of
    ``_rename_hf``; ``attention`` stands for a layer's fused qkv); ``meta_key`` itself when there is none."""
    for hf, meta in top.items():
        if meta == meta_key:
            return hf
    m = re.match(r"blocks\.(\d+)\.(.+)$", meta_key)
    if not m:
        return meta_key
    i, rest = m.groups()
    if rest.startswith("attn.qkv."):
        return f"{prefix}{i}.{attention}"
    for hf, meta in layers.items():
        if rest == meta:
            return f"{prefix}{i}.{hf}"
        if rest.startswith(meta + "."):
            return f"{prefix}{i}.{hf}{rest[len(meta):]}"
    return meta_key


def _rename_hf(state: dict, top: dict, layer_prefix: str, layers: dict, attention: str, layout: str):
    """Both Hugging Face layouts: rename top-level and per-layer keys to Meta's names, and collect each layer's
    q/k/v tensors (as 'q.weight', 'k.bias', ...) for fusing. Any key not understood is an error."""
    meta, unknown, qkv = {}, [], {}
    for k, v in state.items():
        if k in top:
            meta[top[k]] = v
            continue
        m = re.match(layer_prefix + r"(\d+)\.(.+)$", k)
        if not m:
            unknown.append(k)
            continue
        i, rest = int(m.group(1)), m.group(2)
        a = re.match(attention, rest)
        if a:
            qkv.setdefault(i, {})[f"{a.group(1)[0]}.{a.group(2)}"] = v
            continue
        base, _, kind = rest.rpartition(".")
        if rest in layers:
            meta[f"blocks.{i}.{layers[rest]}"] = v
        elif base in layers:
            meta[f"blocks.{i}.{layers[base]}.{kind}"] = v
        else:
            unknown.append(k)
    if unknown:
        _unexpected(unknown, layout)
    return meta, qkv


def _dinov3_from_hf(state: dict, config: dict) -> CanonicalWeights:
    """Hugging Face DINOv3ViTModel layout -> Meta layout -> canonical."""
    gated = bool(config.get("use_gated_mlp", False))
    top = {"embeddings.cls_token": "cls_token", "embeddings.register_tokens": "storage_tokens",
           "embeddings.mask_token": "mask_token", "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.bias": "patch_embed.proj.bias", "norm.weight": "norm.weight",
           "norm.bias": "norm.bias"}
    layer = {"norm1": "norm1", "norm2": "norm2", "attention.o_proj": "attn.proj", "layer_scale1.lambda1": "ls1.gamma",
             "layer_scale2.lambda1": "ls2.gamma", "mlp.down_proj": "mlp.w3" if gated else "mlp.fc2",
             "mlp.up_proj": "mlp.w2" if gated else "mlp.fc1", "mlp.gate_proj": "mlp.w1"}
    # Files on disk (hub, save_pretrained) say layer.N; transformers>=5 renames that to model.layer.N in memory.
    layout = "Hugging Face DINOv3"
    prefix = "model.layer." if any(k.startswith("model.layer.") for k in state) else "layer."
    meta, qkv = _rename_hf(state, top, r"(?:model\.)?layer\.", layer, r"attention\.([qkv])_proj\.(weight|bias)$",
                           layout)
    for i, parts in qkv.items():
        for n in "qkv":
            if f"{n}.weight" not in parts:
                raise _missing(layout, f"{prefix}{i}.attention.{n}_proj.weight")
        if "k.bias" in parts and parts["k.bias"].any():
            raise _key_bias_error(layout, i, f"{prefix}{i}.attention.k_proj.bias")
        meta[f"blocks.{i}.attn.qkv.weight"] = torch.cat([parts["q.weight"], parts["k.weight"], parts["v.weight"]])
        if "q.bias" in parts or "v.bias" in parts:
            ref = parts["q.weight"].new_zeros(parts["q.weight"].shape[0])
            meta[f"blocks.{i}.attn.qkv.bias"] = torch.cat([parts.get("q.bias", ref), ref, parts.get("v.bias", ref)])
    heads = config.get("num_attention_heads")
    theta = float(config.get("rope_theta", 100.0))  # DINOv3ViTConfig's default
    if heads and "embeddings.cls_token" in state:
        # Expressed as Meta's RoPE periods (HF: 1 / inv_freq = theta ** arange(0, 1, 4 / head_dim)), so that
        # _dinov3_from_meta checks the head count and the RoPE schedule the same way for every layout.
        head_dim = state["embeddings.cls_token"].shape[-1] // int(heads)
        meta["rope_embed.periods"] = theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32)
    try:
        return _dinov3_from_meta(meta, layout, f"config.json (rope_theta={theta:g}, num_attention_heads={heads})")
    except KeyError as e:  # name the tensor as the Hugging Face file calls it, not by its Meta name
        raise _missing(layout, _hf_name(e.args[0], top, prefix, layer, "attention.q_proj.weight")) from e


# ---------------------------------------------------------------------------------------------- DINOv2
def _dinov2_from_meta_or_timm(state: dict, layout: str, num_heads: int | None = None) -> CanonicalWeights:
    """Meta's DINOv2 layout and timm's are nearly the same; timm's own filter handles registers, pos-embed and
    packed SwiGLU, after which the result is checked strictly against the built model."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    from .vit_factory import create_vit

    dim = state["cls_token"].shape[-1]
    depth = _depth(state, r"blocks\.(\d+)\.")
    regs_key = "register_tokens" if "register_tokens" in state else "reg_token"
    regs = state[regs_key].shape[1] if regs_key in state else 0
    swiglu = "blocks.0.mlp.w12.weight" in state or "blocks.0.mlp.w3.weight" in state
    arch = match_architecture("dinov2", dim, depth, regs, swiglu, state["patch_embed.proj.weight"].shape[-1], num_heads)
    # Only for timm's filter, which reads the target's shapes: on the meta device, never allocated or initialised.
    model = create_vit(arch, device="meta")
    # timm's filter converts Meta's layout (register tokens outside the position grid, packed SwiGLU) only when it
    # sees Meta's mask_token, which it then drops itself (= _DINOV2_IGNORED): so it must not be removed beforehand.
    out = checkpoint_filter_fn(dict(state), model)  # a copy: timm pops from the dict
    return CanonicalWeights(arch, out, layout)


def _dinov2_from_hf(state: dict, config: dict) -> CanonicalWeights:
    """Hugging Face Dinov2Model / Dinov2WithRegistersModel -> Meta layout -> DINOv2 path."""
    top = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
           "embeddings.position_embeddings": "pos_embed", "embeddings.register_tokens": "register_tokens",
           "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    layer = {"norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj", "mlp.fc1": "mlp.fc1",
             "mlp.fc2": "mlp.fc2", "mlp.weights_in": "mlp.w12", "mlp.weights_out": "mlp.w3",
             "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}
    meta, qkv = _rename_hf(state, top, r"encoder\.layer\.", layer,
                           r"attention\.attention\.(query|key|value)\.(weight|bias)$", "Hugging Face DINOv2")
    for i, p in qkv.items():
        for kind in ("weight", "bias"):
            for n, hf in (("q", "query"), ("k", "key"), ("v", "value")):
                if f"{n}.{kind}" not in p:
                    raise _missing("Hugging Face DINOv2", f"encoder.layer.{i}.attention.attention.{hf}.{kind}")
            meta[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([p[f"q.{kind}"], p[f"k.{kind}"], p[f"v.{kind}"]])
    return _dinov2_from_meta_or_timm(meta, "Hugging Face DINOv2", config.get("num_attention_heads"))


# ---------------------------------------------------------------------------------------------- dispatch
def _reject_leftovers(state, used, ignored, layout):
    left = [k for k in state if k not in used and not ignored.match(k)]
    if left:
        _unexpected(left, layout)


def _unwrap_meddinov3(state: dict) -> dict:
    """MedDINOv3's released file: {'teacher': {'backbone.*': ..., 'dino_head.*': ..., 'ibot_head.*': ...}}."""
    teacher = state["teacher"]
    out = {}
    for k, v in teacher.items():
        if k.startswith(("dino_head.", "ibot_head.")):
            continue  # self-supervised projection heads: not part of the backbone
        if not k.startswith("backbone."):
            _unexpected([k], "MedDINOv3 teacher")
        out[k[len("backbone."):]] = v
    return out


def to_canonical(state: dict, hf_config: dict | None = None, source=None) -> CanonicalWeights:
    """Detect the layout of ``state`` and convert it; raises WeightFileError for anything else. ``source`` (the
    file or folder read) is named in every error and kept in the result."""
    try:
        canonical = _convert(state, hf_config)
    except WeightFileError as e:
        if source is None:
            raise
        raise WeightFileError(f"{source}: {e}") from e
    canonical.source = None if source is None else str(source)
    return canonical


def _convert(state: dict, hf_config: dict | None) -> CanonicalWeights:
    try:
        _check_finite(state)
        return _to_canonical(state, hf_config)
    except WeightFileError:
        raise
    except KeyError as e:  # a tensor the detected layout requires is absent (truncated or partial state dict)
        raise WeightFileError(f"The weights lack the tensor {e.args[0]!r}: the file is incomplete or not a full "
                              f"DINO state dict. {HOW_TO_GET_WEIGHTS}") from e
    except ValueError as e:  # match_architecture: the structure read off the file is no registered architecture
        raise WeightFileError(f"{e} {HOW_TO_GET_WEIGHTS}") from e
    except RuntimeError as e:  # torch: tensors of a layer whose shapes do not fit together (cat, chunk, reshape)
        raise WeightFileError(f"The tensors' shapes do not fit together ({str(e).splitlines()[0]}): the file is "
                              f"damaged or not an unmodified DINO model. {HOW_TO_GET_WEIGHTS}") from e


def _to_canonical(state: dict, hf_config: dict | None) -> CanonicalWeights:
    if hf_config is not None:
        model_type = hf_config.get("model_type", "")
        if model_type == "dinov3_vit":
            return _dinov3_from_hf(state, hf_config)
        if model_type in ("dinov2", "dinov2_with_registers"):
            return _dinov2_from_hf(state, hf_config)
        raise WeightFileError(
            f"The Hugging Face folder holds a {model_type!r} model; nnunet-dino loads dinov3_vit, dinov2 and "
            f"dinov2_with_registers. {HOW_TO_GET_WEIGHTS}"
        )
    if "teacher" in state and isinstance(state["teacher"], dict):
        canonical = _dinov3_from_meta(_unwrap_meddinov3(state), "MedDINOv3 CT checkpoint")
        return canonical
    if "storage_tokens" in state:
        return _dinov3_from_meta(state, "Meta DINOv3")
    if "reg_token" in state and "blocks.0.gamma_1" in state:
        return _dinov3_from_timm(state)
    if "pos_embed" in state and "blocks.0.attn.qkv.weight" in state:
        return _dinov2_from_meta_or_timm(state, "Meta/timm DINOv2")
    sample = sorted(state)[:8]
    nested = sorted(str(k) for k, v in state.items() if isinstance(v, dict))
    hint = (f" The tensors are nested under {nested[:5]}: save the dict of DINO tensors itself as a plain state dict "
            f"(torch.save(checkpoint[key], 'dino_weights.pth')) and load that." if nested else "")
    raise WeightFileError(
        f"These weights are not a DINOv3/DINOv2 ViT in any supported layout (first keys: {sample}).{hint} Supported: "
        f"Meta's official .pth files, Hugging Face folders, timm safetensors and the MedDINOv3 CT checkpoint. "
        f"{HOW_TO_GET_WEIGHTS}"
    )
