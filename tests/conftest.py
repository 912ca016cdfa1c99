"""Synthetic DINO checkpoints in every supported layout, built independently of nnunet_dino's converters.

Every checkpoint starts from a Hugging Face ``transformers`` model with random weights (the independent reference
implementation). Each tensor is randomised: weights ~ N(0, 0.05), LayerNorm and layer-scale gains ~ U(0.5, 1.5).
(timm initialises layer-scale gammas at 1e-5, making the blocks near no-ops, and HF zeroes every bias: either would
hide format or LoRA mistakes.)
From the HF model the helpers below write, with key mappings spelled out here rather than imported from
nnunet_dino:

- Meta's official DINOv3 .pth (named like Meta's files, with the real sha256 prefix), incl. bf16 RoPE periods,
  a random (masked) k-part of the qkv bias and the bias_mask buffer;
- Meta's DINOv2 .pth;
- Hugging Face folders (save_pretrained, safetensors);
- timm safetensors, produced by timm's own checkpoint filter from the Meta dict;
- the MedDINOv3 CT checkpoint ({'teacher': {'backbone.*', 'dino_head.*', 'ibot_head.*'}}), ViT-B/16, no qkv bias.

Checkpoints are session-scoped: each real-size architecture is built once per test session.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn as nn

# One thread by default: on a small shared machine two contending OpenMP threads ran ~8x slower than one.
torch.set_num_threads(int(os.environ.get("NNUNET_DINO_TEST_THREADS", "1")))
# The same for the plugin's trainings in subprocesses (nnUNetv2_train -device cpu would take every core), which
# run_tests.sh's two pytest workers would otherwise oversubscribe. nnUNetv2_predict already runs on
# nnUNet_def_n_proc (1 here) threads.
os.environ.setdefault("nnUNet_dino_cpu_threads", os.environ.get("NNUNET_DINO_TEST_THREADS", "1"))

# A non-square input: 2x3 tokens for DINOv3 (patch 16), 2x3 tokens for DINOv2 (patch 14).
DINOV3_INPUT_HW = (32, 48)
DINOV2_INPUT_HW = (28, 42)


def input_image(hw, seed=123, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *hw, generator=g)


# ---------------------------------------------------------------------------------------------- randomisation
def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Give every tensor of ``model`` a non-trivial random value (see module doc)."""
    g = torch.Generator().manual_seed(seed)
    gains = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            gains.add(f"{module_name}.weight" if module_name else "weight")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in gains or "lambda1" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


# ---------------------------------------------------------------------------------------------- HF models
def hf_dinov3(*, dim=384, depth=12, heads=6, intermediate=1536, swiglu=False, qkv_bias=True, seed=0):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    config = DINOv3ViTConfig(
        hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=intermediate,
        num_register_tokens=4, patch_size=16, use_gated_mlp=swiglu, hidden_act="silu" if swiglu else "gelu",
        query_bias=qkv_bias, value_bias=qkv_bias, key_bias=False, layer_norm_eps=1e-5, rope_theta=100.0,
    )
    return randomize_(DINOv3ViTModel(config), seed)


def hf_dinov2(*, registers=0, dim=384, depth=12, heads=6, seed=0):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    common = dict(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, mlp_ratio=4, image_size=518,
                  patch_size=14, layer_norm_eps=1e-6, qkv_bias=True)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **common))
    else:
        model = Dinov2Model(Dinov2Config(**common))
    return randomize_(model, seed)


@torch.no_grad()
def hf_reference(model, x, layers):
    """Independent reference: per requested block, the final-norm'ed patch tokens (the last h*w tokens) of the HF
    model as (B, C, h, w); the last block is taken from ``last_hidden_state`` (HF applies the final norm there)."""
    out = model(pixel_values=x, output_hidden_states=True)
    p = model.config.patch_size
    h, w = x.shape[-2] // p, x.shape[-1] // p
    hidden = out.hidden_states
    depth = model.config.num_hidden_layers
    assert len(hidden) in (depth, depth + 1)
    offset = len(hidden) - depth  # 1 when the embedding output is included
    final_norm = model.norm if hasattr(model, "norm") else model.layernorm
    # HF's last_hidden_state is post-norm (so it is what Meta calls x_norm_patchtokens); the per-block hidden
    # states are pre-norm.
    torch.testing.assert_close(final_norm(hidden[-1]), out.last_hidden_state, rtol=0, atol=1e-6)
    maps = []
    for i in layers:
        tokens = out.last_hidden_state if i == depth - 1 else final_norm(hidden[i + offset])
        patches = tokens[:, -h * w:]
        maps.append(patches.transpose(1, 2).reshape(x.shape[0], -1, h, w))
    return maps


# ---------------------------------------------------------------------------------------------- Meta layouts
def hub_state(hf_model, folder: Path) -> dict:
    """save_pretrained(folder) and read the tensors back: the Hugging Face *file* layout (as on the hub), which is
    stable across transformers versions (v5 renames some keys in memory only)."""
    from safetensors.torch import load_file

    hf_model.save_pretrained(folder)
    return load_file(str(folder / "model.safetensors"))


def meta_dinov3_state(hf_model, sd: dict, seed=1) -> dict:
    """HF DINOv3ViTModel (its file layout ``sd``) -> the key layout of Meta's official DINOv3 .pth files (written
    out by hand here)."""
    cfg = hf_model.config
    g = torch.Generator().manual_seed(seed)
    dim, head_dim = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "storage_tokens": sd["embeddings.register_tokens"],
        "mask_token": sd["embeddings.mask_token"].reshape(1, dim),
        # Meta: periods = base ** (2 * arange(D/4) / (D/2)); stored in bf16 in the released files.
        "rope_embed.periods": (cfg.rope_theta ** (4 * torch.arange(head_dim // 4, dtype=torch.float32) / head_dim)
                               ).to(torch.bfloat16),
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
    }
    mlp = ({"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"} if cfg.use_gated_mlp
           else {"up_proj": "fc1", "down_proj": "fc2"})
    for i in range(cfg.num_hidden_layers):
        src, dst = f"layer.{i}.", f"blocks.{i}."
        for n in ("norm1", "norm2"):
            out[f"{dst}{n}.weight"], out[f"{dst}{n}.bias"] = sd[f"{src}{n}.weight"], sd[f"{src}{n}.bias"]
        a = src + "attention."
        out[dst + "attn.qkv.weight"] = torch.cat([sd[a + "q_proj.weight"], sd[a + "k_proj.weight"],
                                                  sd[a + "v_proj.weight"]])
        if a + "q_proj.bias" in sd:
            # Meta stores a k bias too but masks it out (LinearKMaskedBias); make it non-zero so that a loader
            # ignoring the mask would be caught.
            k_bias = torch.randn(dim, generator=g)
            out[dst + "attn.qkv.bias"] = torch.cat([sd[a + "q_proj.bias"], k_bias, sd[a + "v_proj.bias"]])
            out[dst + "attn.qkv.bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
        out[dst + "attn.proj.weight"], out[dst + "attn.proj.bias"] = sd[a + "o_proj.weight"], sd[a + "o_proj.bias"]
        out[dst + "ls1.gamma"] = sd[src + "layer_scale1.lambda1"]
        out[dst + "ls2.gamma"] = sd[src + "layer_scale2.lambda1"]
        for hf_name, meta_name in mlp.items():
            out[f"{dst}mlp.{meta_name}.weight"] = sd[f"{src}mlp.{hf_name}.weight"]
            out[f"{dst}mlp.{meta_name}.bias"] = sd[f"{src}mlp.{hf_name}.bias"]
    out["norm.weight"], out["norm.bias"] = sd["norm.weight"], sd["norm.bias"]
    assert len(set(map(id, out.values()))) == len(out)
    return out


def meta_dinov2_state(hf_model, sd: dict) -> dict:
    """HF Dinov2Model / Dinov2WithRegistersModel (file layout ``sd``) -> Meta's DINOv2 .pth key layout."""
    cfg = hf_model.config
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "pos_embed": sd["embeddings.position_embeddings"],
        "mask_token": sd["embeddings.mask_token"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"],
    }
    if "embeddings.register_tokens" in sd:
        out["register_tokens"] = sd["embeddings.register_tokens"]
    for i in range(cfg.num_hidden_layers):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.qkv.{kind}"] = torch.cat(
                [sd[f"{src}attention.attention.{n}.{kind}"] for n in ("query", "key", "value")])
            out[f"{dst}attn.proj.{kind}"] = sd[f"{src}attention.output.dense.{kind}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[f"{dst}{n}.{kind}"] = sd[f"{src}{n}.{kind}"]
        out[dst + "ls1.gamma"] = sd[src + "layer_scale1.lambda1"]
        out[dst + "ls2.gamma"] = sd[src + "layer_scale2.lambda1"]
    return out


# Meta's naming (<prefix>-<first 8 hex of the sha256>.pth), written atomically: the package's own writer, which
# nnUNetv2_dino_pretrain uses for its output (only the name and the hash; the key layouts above stay independent).
from nnunet_dino.backbone.meta_export import save_meta_named  # noqa: E402


# ---------------------------------------------------------------------------------------------- timm layouts
def timm_safetensors(timm_name: str, meta_state: dict, path: Path, module: str, **kwargs) -> Path:
    """A timm model filled from the Meta dict by timm's *own* checkpoint filter, saved with safetensors."""
    import importlib

    import timm
    from safetensors.torch import save_file

    model = timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)
    filter_fn = importlib.import_module(f"timm.models.{module}").checkpoint_filter_fn
    model.load_state_dict(filter_fn({k: v.clone() for k, v in meta_state.items()}, model), strict=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(path))
    return path


# ---------------------------------------------------------------------------------------------- bundles
@dataclass
class WeightSet:
    """One set of random weights, the HF reference model holding them, and the files that store them."""
    arch: str
    reference: nn.Module
    input_hw: tuple
    files: dict = field(default_factory=dict)  # format label -> path
    meta_state: dict | None = None

    @property
    def patch_size(self):
        return self.reference.config.patch_size


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("dino_ckpts")


@pytest.fixture(scope="session")
def dinov3_s(ckpt_root) -> WeightSet:
    """dinov3_vits16 with non-zero q/v biases: Meta .pth, HF folder, timm safetensors (_qkvb variant)."""
    hf = hf_dinov3(seed=0)
    meta = meta_dinov3_state(hf, hub_state(hf, ckpt_root / "hf_v3s"))
    ws = WeightSet("dinov3_vits16", hf, DINOV3_INPUT_HW, meta_state=meta)
    ws.files["hf"] = ckpt_root / "hf_v3s"
    ws.files["meta"] = save_meta_named(meta, ckpt_root / "meta_v3s", "dinov3_vits16_pretrain_lvd1689m")
    ws.files["timm_qkvb"] = timm_safetensors("vit_small_patch16_dinov3_qkvb", meta,
                                             ckpt_root / "timm_v3s_qkvb.safetensors", "eva")
    return ws


@pytest.fixture(scope="session")
def dinov3_s_nobias(ckpt_root, dinov3_s) -> WeightSet:
    """The same weights without q/v bias, as stored by timm's default (fused qkv, no bias) DINOv3 model."""
    hf = hf_dinov3(qkv_bias=False, seed=0)
    missing, unexpected = hf.load_state_dict(dinov3_s.reference.state_dict(), strict=False)
    assert not missing and unexpected and all(k.endswith(("q_proj.bias", "v_proj.bias")) for k in unexpected)
    hf.eval()
    meta = meta_dinov3_state(hf, hub_state(hf, ckpt_root / "hf_v3s_nobias"))
    assert "blocks.0.attn.qkv.bias" not in meta
    ws = WeightSet("dinov3_vits16", hf, DINOV3_INPUT_HW, meta_state=meta)
    ws.files["timm"] = timm_safetensors("vit_small_patch16_dinov3", meta, ckpt_root / "timm_v3s.safetensors", "eva")
    return ws


@pytest.fixture(scope="session")
def dinov3_splus(ckpt_root) -> WeightSet:
    """dinov3_vits16plus (SwiGLU): Meta .pth, HF folder, timm safetensors (_qkvb)."""
    hf = hf_dinov3(swiglu=True, seed=10)
    meta = meta_dinov3_state(hf, hub_state(hf, ckpt_root / "hf_v3splus"))
    ws = WeightSet("dinov3_vits16plus", hf, DINOV3_INPUT_HW, meta_state=meta)
    ws.files["hf"] = ckpt_root / "hf_v3splus"
    ws.files["meta"] = save_meta_named(meta, ckpt_root / "meta_v3splus", "dinov3_vits16plus_pretrain_lvd1689m")
    ws.files["timm_qkvb"] = timm_safetensors("vit_small_plus_patch16_dinov3_qkvb", meta,
                                             ckpt_root / "timm_v3splus_qkvb.safetensors", "eva")
    return ws


def _dinov2_set(ckpt_root, arch, registers, seed, meta_name, timm_name, tag) -> WeightSet:
    hf = hf_dinov2(registers=registers, seed=seed)
    meta = meta_dinov2_state(hf, hub_state(hf, ckpt_root / f"hf_{tag}"))
    ws = WeightSet(arch, hf, DINOV2_INPUT_HW, meta_state=meta)
    ws.files["hf"] = ckpt_root / f"hf_{tag}"
    (ckpt_root / f"meta_{tag}").mkdir()
    ws.files["meta"] = ckpt_root / f"meta_{tag}" / meta_name  # Meta's DINOv2 names carry no hash
    torch.save(meta, ws.files["meta"])
    ws.files["timm"] = timm_safetensors(timm_name, meta, ckpt_root / f"timm_{tag}.safetensors", "vision_transformer",
                                        img_size=518)
    return ws


@pytest.fixture(scope="session")
def dinov2_s(ckpt_root) -> WeightSet:
    """dinov2_vits14: Meta .pth, HF folder (Dinov2Model), timm safetensors."""
    return _dinov2_set(ckpt_root, "dinov2_vits14", 0, 20, "dinov2_vits14_pretrain.pth", "vit_small_patch14_dinov2",
                       "v2s")


@pytest.fixture(scope="session")
def dinov2_s_reg(ckpt_root) -> WeightSet:
    """dinov2_vits14_reg: Meta .pth, HF folder (Dinov2WithRegistersModel), timm safetensors."""
    return _dinov2_set(ckpt_root, "dinov2_vits14_reg", 4, 30, "dinov2_vits14_reg4_pretrain.pth",
                       "vit_small_patch14_reg4_dinov2", "v2sreg")


@pytest.fixture(scope="session")
def meddinov3_b(ckpt_root) -> WeightSet:
    """MedDINOv3's released CT checkpoint layout: ViT-B/16, 4 registers, no qkv bias, SSL heads alongside."""
    hf = hf_dinov3(dim=768, depth=12, heads=12, intermediate=3072, qkv_bias=False, seed=40)
    meta = meta_dinov3_state(hf, hub_state(hf, ckpt_root / "hf_v3b_nobias"))
    assert "blocks.0.attn.qkv.bias" not in meta
    g = torch.Generator().manual_seed(41)
    teacher = {f"backbone.{k}": v for k, v in meta.items()}
    teacher.update({
        "dino_head.mlp.0.weight": torch.randn(64, 768, generator=g), "dino_head.mlp.0.bias": torch.randn(64, generator=g),
        "dino_head.last_layer.weight_g": torch.randn(128, 1, generator=g),
        "ibot_head.mlp.0.weight": torch.randn(64, 768, generator=g), "ibot_head.mlp.0.bias": torch.randn(64, generator=g),
    })
    ws = WeightSet("dinov3_vitb16", hf, DINOV3_INPUT_HW, meta_state=meta)
    path = ckpt_root / "meddinov3" / "model.pth"
    path.parent.mkdir()
    torch.save({"teacher": teacher}, path)
    ws.files["meddinov3"] = path
    return ws


# ---------------------------------------------------------------------------------------------- e2e workspace
REPO = Path(__file__).resolve().parents[1]
BUNDLED_RAW = REPO / "datasets" / "nnUNet_raw"  # HippoTiny and HC18Tiny, shipped with attribution
SHARED_RAW = REPO.parent / "shared" / "data" / "nnUNet_raw"  # KvasirTiny (research-only: used from here, never shipped)


@pytest.fixture(scope="session")
def hippo_workspace(tmp_path_factory) -> dict:
    """Dataset990_HippoTiny planned and preprocessed once (``nnUNetv2_plan_and_preprocess -c 2d``) for every e2e
    module. Each module trains its own trainer into the shared nnUNet_results (trainer names differ) and writes its
    other outputs under ``work / <module name>``. Random DINO weights: no pretrained weights exist here."""
    from nnunet_dino.cli.stock_pipeline import command, nnunet_environment, run

    work = tmp_path_factory.mktemp("hippo")
    env = nnunet_environment(BUNDLED_RAW, work, nnUNet_dino_weights="random")
    run([command("nnUNetv2_plan_and_preprocess"), "-d", "990", "-c", "2d", "-np", "1"], env)
    return {"work": work, "env": env, "raw": BUNDLED_RAW / "Dataset990_HippoTiny",
            "preprocessed": work / "nnUNet_preprocessed" / "Dataset990_HippoTiny",
            "results": work / "nnUNet_results" / "Dataset990_HippoTiny"}
