"""The path GPU users run, proven on CPU: torch.compile, mixed precision and 2-process DDP for every trainer family.

Families (tests/gpu_paths_helpers.py, HippoTiny's 2d plans, few DINO tokens): GuiDINO with LoRA, GuiDINO frozen,
SegDINO v1, SegDINOv2 with deep supervision, MedDINOv3 (full fine-tuning, drop path; ViT-S instead of ViT-B for a
quarter of the memory). The DDP + compile runs cut the ViT to its first 4 of 12 identical blocks (compile time is
tracing time, and the blocks are most of each graph); the precision tests use the full depth.

- **DDP + compile** (one spawn of 2 gloo ranks for everything, module fixture ``ddp_runs``): per family, nnU-Net's
  own ``initialize`` (compile when ``_do_i_compile``, then ``DDP(network, device_ids=...)`` without
  ``find_unused_parameters``, see the helper module for the two CPU-forced differences), the DINO weights loaded after
  the wrap, then 3 of nnU-Net's own ``train_step`` calls on different data per rank, once eager and once compiled
  (``aot_eager``: Dynamo + AOTAutograd without code generation). Checked: no error, every trainable tensor identical
  on both ranks after every step (and every tensor, frozen DINO and buffers included, at the end), compiled = eager
  (outputs and gradients of step 1 within 1e-5 of their largest value, losses of all steps within 1e-5 relative),
  no recompilation after step 1, no graph break, every trainable tensor in the loss.
- **Checkpoints** of those runs (``DDP(compiled(network))`` and ``DDP(network)``) load strictly into the network
  ``nnUNetv2_predict`` builds, with LoRA tensors non-zero, and predict exactly what the trained network predicts.
- **Mixed precision**: nnU-Net autocasts on CUDA only; its CUDA branch (``autocast(device_type)`` in the thread's
  autocast dtype, GradScaler) is run here on the CPU. A training step in bf16 (the ``_bf16`` mixin) and in fp16 with
  nnU-Net's GradScaler path is finite and close to fp32; CPU autocast keeps LayerNorm and softmax in fp16 (CUDA runs
  them in fp32), so this is the stricter setting. The fp16-risky points of the DINO branch are stressed separately.
- **benchmarks/bench_gpu.py** runs with ``--tiny`` on CPU.
"""
from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

import gpu_paths_helpers as helpers
import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
from nnunet_dino.backbone import DinoBackbone, get_architecture, init_random_dino_weights_
from nnunet_dino.guidance import TokenBook
from nnunet_dino.training import unwrap
from nnunet_dino.training.checkpoints import PROVENANCE_KEY
from nnunet_dino.training.precision import AutocastPrecisionMixin, BF16Mixin, autocast_dtype, get_autocast_dtype

REPO = Path(__file__).resolve().parents[1]
FAMILIES = list(helpers.FAMILIES)
MODES = ("eager", "compiled")
STEPS = 3
# nnU-Net's own U-Net leaves the head of its coarsest output out of the loss (deep-supervision weight 0; 1e-6 only
# in DDP without compile, to avoid DDP's unused-parameter error): stock nnUNetTrainer does the same, so GuiDINO,
# which keeps nnU-Net's network, inherits it. Not a parameter of this plugin. (SegDINOv2 builds no head for that
# output: networks/segdino_v2.py.)
NNUNET_OWN_UNUSED = ("unet.decoder.seg_layers.0.",)


# ============================================================================================ DDP + torch.compile
@pytest.fixture(scope="module")
def ddp_runs(hippo_workspace, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("ddp")
    reports = helpers.run_ddp(hippo_workspace["preprocessed"], work / "nnUNet_results", work / "out", FAMILIES,
                              steps=STEPS)
    for report in reports:
        assert "error" not in report, f"rank {report['rank']} failed:\n{report['error']}"
    return {"reports": reports, "out": work / "out"}


def runs_of(ddp_runs, family: str, mode: str) -> list[dict]:
    return [report["families"][family][mode] for report in ddp_runs["reports"]]


def test_ddp_is_wrapped_as_nnunet_wraps_it(ddp_runs):
    for report in ddp_runs["reports"]:
        # nnU-Net's initialize called DDP once per trainer with device_ids only: no find_unused_parameters
        assert report["ddp_calls"] == [["device_ids"]] * (len(FAMILIES) * len(MODES))
        for family in FAMILIES:
            assert report["families"][family]["eager"]["wrapped"] == "DistributedDataParallel"
            assert report["families"][family]["compiled"]["inner"] == "OptimizedModule"  # DDP(compiled network)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_ddp_ranks_hold_identical_tensors_after_every_step(ddp_runs, family, mode):
    for run in runs_of(ddp_runs, family, mode):
        assert len(run["losses"]) == STEPS and all(math.isfinite(v) for v in run["losses"]) and run["finite"]
        assert run["rank_mismatch"] == [[]] * STEPS, run["rank_mismatch"]  # trainable tensors, after each step
        assert run["state_mismatch_end"] == []  # everything: frozen DINO weights, buffers
    a, b = runs_of(ddp_runs, family, mode)
    assert a["losses"] != b["losses"]  # the ranks did see different data


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_trainable_tensor_is_in_the_loss(ddp_runs, family, mode):
    """Over 3 steps every trainable tensor gets a non-zero gradient (zero-initialised LoRA B and SegDINOv2's gamma
    make some of them zero at step 1 only). DDP without find_unused_parameters would also fail on one without any
    gradient; under compile such a tensor gets zeros instead, so this is the check that sees it."""
    for run in runs_of(ddp_runs, family, mode):
        unused = [n for n in run["never_trained"] if not n.startswith(NNUNET_OWN_UNUSED)]
        assert unused == [], f"{family} ({mode}): trainable tensors that no loss term reaches: {unused}"


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_network_matches_eager(ddp_runs, family):
    for run in runs_of(ddp_runs, family, "compiled"):
        d = run["vs_eager"]
        assert d["output_rel"] <= 1e-5, d  # step-1 outputs, relative to their largest value
        assert d["grad_rel_to_max"] <= 1e-5, d  # step-1 gradients (DDP-averaged, clipped), relative to the largest
        assert d["grad_rel_worst_tensor"][1] <= 1e-3, d  # each tensor relative to its own largest gradient
        assert d["loss_rel"] <= 1e-5, d  # every step's loss


@pytest.mark.parametrize("family", FAMILIES)
def test_no_recompilation_from_one_step_to_the_next(ddp_runs, family):
    """Steps 2 and 3 ran with torch._dynamo.config.error_on_recompile (a recompile would have raised) and compiled no
    further graph."""
    for run in runs_of(ddp_runs, family, "compiled"):
        assert run["graphs_after_step_1"] >= 1
        assert run["graphs_end"] == run["graphs_after_step_1"]


@pytest.mark.parametrize("family", FAMILIES)
def test_network_compiles_without_graph_breaks(ddp_runs, family):
    """A graph break silently leaves part of the network uncompiled (Dynamo skips the frame), losing compile's speed."""
    for run in runs_of(ddp_runs, family, "compiled"):
        assert run["graph_breaks"] == {}, f"{family}: graph breaks under torch.compile: {run['graph_breaks']}"


# ============================================================================================ checkpoints
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_of_a_ddp_run_loads_strictly_into_the_predictor_network(ddp_runs, family, mode):
    path = ddp_runs["out"] / f"{family}_{mode}.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    weights = checkpoint["network_weights"]
    assert not [k for k in weights if k.startswith(("module.", "_orig_mod.")) or "._orig_mod." in k]
    assert isinstance(weights[PROVENANCE_KEY], dict)
    # what nnUNetPredictor.initialize_from_trained_model_folder does
    pm = PlansManager(checkpoint["init_args"]["plans"])
    cls = helpers.SHALLOW_FAMILIES[family]
    assert checkpoint["trainer_name"] == cls.__name__
    network = cls.build_network_architecture(pm, pm.get_configuration("2d"), 1, 3, False)
    network.load_state_dict(weights)  # strict
    lora = {n: p for n, p in network.named_parameters() if "lora_B" in n}
    if family == "guidino_lora":
        assert lora and all(p.abs().max() > 0 for p in lora.values())  # trained adapters, not zeros
    reference = torch.load(ddp_runs["out"] / f"{family}_{mode}_prediction.pt")
    with torch.no_grad():
        assert torch.equal(network.eval()(reference["x"]), reference["y"])


# ============================================================================================ mixed precision
@contextlib.contextmanager
def nnunet_cuda_autocast_branch_on_cpu(monkeypatch):
    """nnU-Net's train_step: ``autocast(device.type, enabled=True) if device.type == 'cuda' else dummy_context()``.
    With dummy_context replaced by ``torch.autocast('cpu')`` the CPU takes the CUDA branch: autocast in the
    thread's autocast dtype, which is what the _bf16 mixin sets."""
    with monkeypatch.context() as m:
        m.setattr(nnunet_trainer_module, "dummy_context", lambda: torch.autocast("cpu"))
        yield


@pytest.fixture
def results(hippo_workspace, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "nnUNet_results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(hippo_workspace["preprocessed"].parent))
    monkeypatch.setenv("nnUNet_dino_weights", "random")
    return tmp_path / "nnUNet_results"


def precision_trainer(hippo_workspace, family: str):
    cls = type(f"{helpers.FAMILIES[family].__name__}_bf16", (BF16Mixin, helpers.FAMILIES[family]), {})
    trainer = helpers.make_trainer(cls, hippo_workspace["preprocessed"])
    helpers.start_training(trainer)
    return trainer


def record_dtypes(network: nn.Module) -> tuple[list, list]:
    """Output dtypes of every conv / linear layer (U-Net, heads, ViT) during the forward passes that follow."""
    seen = []
    handles = [m.register_forward_hook(lambda mod, i, o: seen.append(o.dtype)) for m in network.modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    return seen, handles


def step(trainer, batch, initial: dict, mode: str, monkeypatch) -> dict:
    """One of nnU-Net's train_step from ``initial`` weights: 'fp32' (nnU-Net on CPU), 'fp16' (nnU-Net's CUDA path:
    fp16 autocast + GradScaler), 'bf16' (the trainer's own train_step, i.e. the _bf16 mixin's)."""
    net = unwrap(trainer.network)
    with torch.no_grad():  # back to the initial weights, in place (not through the checkpoint load hooks)
        for key, tensor in net.state_dict(keep_vars=True).items():
            tensor.copy_(initial[key])
    seen, handles = record_dtypes(net)
    torch.manual_seed(0)
    base_step = super(AutocastPrecisionMixin, trainer).train_step  # the family's own (no mixin)
    try:
        if mode == "fp32":
            loss = base_step(batch)["loss"]
        elif mode == "fp16":
            trainer.grad_scaler = torch.amp.GradScaler("cpu")
            with nnunet_cuda_autocast_branch_on_cpu(monkeypatch), autocast_dtype("cpu", torch.float16):
                loss = base_step(batch)["loss"]
            scale = trainer.grad_scaler.get_scale()
            trainer.grad_scaler = None
        else:
            with nnunet_cuda_autocast_branch_on_cpu(monkeypatch):
                loss = trainer.train_step(batch)["loss"]
    finally:
        for h in handles:
            h.remove()
    grads = {n: p.grad.detach().double().clone() for n, p in net.named_parameters()
             if p.requires_grad and p.grad is not None}
    return {"loss": float(loss), "grads": grads, "dtypes": set(seen), "scale": scale if mode == "fp16" else None}


def cosine(a: dict, b: dict, names) -> float:
    x = torch.cat([a[n].flatten() for n in names])
    y = torch.cat([b[n].flatten() for n in names])
    return float(x @ y / (x.norm() * y.norm()))


def is_dino_branch(name: str) -> bool:
    return not name.startswith("unet.")  # GuiDINO: guidance.* and gates.*; the other families are all DINO branch


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_and_fp16_training_steps_are_finite_and_close_to_fp32(hippo_workspace, results, family, monkeypatch):
    """Tolerances: loss within 1e-3 (bf16) / 5e-4 (fp16) relative; cosine of the gradients with fp32's >= 0.95
    (bf16) / 0.99 (fp16) over all trainable tensors and >= 0.98 (bf16) over the DINO branch (TokenBook, gates, LoRA,
    heads, decoders). Measured 2026-12-01: bf16 0.969 all / 0.992 DINO branch for GuiDINO, >= 0.999 for the others;
    fp16 >= 0.995. Stock nnU-Net's own U-Net scores 0.978 under the same bf16 autocast: its InstanceNorm'ed stages,
    which GuiDINO's gradients pass through, are what keeps GuiDINO's cosine below the other families'. fp16 runs on a
    batch of 1: fp16 convolution backward has no fast CPU kernel (about 250x slower than bf16)."""
    trainer = precision_trainer(hippo_workspace, family)
    assert trainer.grad_scaler is None  # the _bf16 mixin: no GradScaler
    net = unwrap(trainer.network)
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    batch = helpers.make_batch(trainer, seed=0)
    small = helpers.make_batch(trainer, seed=0, batch_size=1)
    fp32 = step(trainer, batch, initial, "fp32", monkeypatch)
    bf16 = step(trainer, batch, initial, "bf16", monkeypatch)
    fp32_small = step(trainer, small, initial, "fp32", monkeypatch)
    fp16 = step(trainer, small, initial, "fp16", monkeypatch)
    assert fp32["dtypes"] == {torch.float32} and bf16["dtypes"] == {torch.bfloat16}
    assert fp16["dtypes"] == {torch.float16}
    assert fp16["scale"] == 2.0 ** 16  # GradScaler found no inf/NaN at its initial scale (no skipped step)
    names = sorted(fp32["grads"])
    dino = [n for n in names if is_dino_branch(n) and fp32["grads"][n].abs().max() > 0]
    for run in (bf16, fp16):
        assert sorted(run["grads"]) == names and all(bool(torch.isfinite(g).all()) for g in run["grads"].values())
    assert abs(bf16["loss"] - fp32["loss"]) <= 1e-3 * abs(fp32["loss"])
    assert abs(fp16["loss"] - fp32_small["loss"]) <= 5e-4 * abs(fp32_small["loss"])
    assert cosine(fp32["grads"], bf16["grads"], names) >= 0.95
    assert cosine(fp32["grads"], bf16["grads"], dino) >= 0.98
    assert cosine(fp32_small["grads"], fp16["grads"], names) >= 0.99


def test_bf16_variants_train_in_bf16_without_grad_scaler(hippo_workspace, results, monkeypatch):
    """Every ``*_bf16`` trainer nnU-Net can find is its base variant plus BF16Mixin; one of them (GuiDINO with LoRA,
    few tokens) computes its training step in bf16 where nnU-Net autocasts, has no GradScaler, and leaves the
    thread's autocast dtype as it found it."""
    import nnunet_dino.trainers as plugin_trainers

    variants = {n: c for n, c in vars(plugin_trainers).items() if n.startswith("nnUNetTrainer") and n.endswith("_bf16")}
    assert {"nnUNetTrainerGuiDINO_bf16", "nnUNetTrainerGuiDINO_frozen_bf16", "nnUNetTrainerSegDINO_bf16",
            "nnUNetTrainerSegDINOv2_bf16", "nnUNetTrainerSegDINOv2_deepSupervision_bf16",
            "nnUNetTrainerMedDINOv3_bf16", "nnUNetTrainerMedDINOv3_LoRA_bf16"} <= set(variants)
    for name, cls in variants.items():
        base = getattr(plugin_trainers, name[: -len("_bf16")])
        assert cls.__mro__[1:3] == (BF16Mixin, AutocastPrecisionMixin) and cls.__mro__[3] is base, name

    cls = type("TinyGuiDINO_bf16", (variants["nnUNetTrainerGuiDINO_bf16"],),
               {"guidino": helpers.TinyGuiDINO.guidino, "batch_size": 2})
    trainer = helpers.make_trainer(cls, hippo_workspace["preprocessed"])
    assert trainer.grad_scaler is None and trainer.my_init_kwargs.keys() == {"plans", "configuration", "fold",
                                                                            "dataset_json", "device"}
    helpers.start_training(trainer)
    seen, _ = record_dtypes(unwrap(trainer.network))
    before = get_autocast_dtype("cpu")
    with nnunet_cuda_autocast_branch_on_cpu(monkeypatch):
        loss = trainer.train_step(helpers.make_batch(trainer, seed=3))["loss"]
    assert math.isfinite(float(loss))
    assert set(seen) == {torch.bfloat16}  # U-Net convs, gates, ViT linears, TokenBook projection
    assert get_autocast_dtype("cpu") == before


# ---------------------------------------------------------------------------- the fp16-risky points of the DINO branch
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tokenbook_similarities_are_safe_under_autocast_even_for_huge_tokens(dtype):
    """Cosine similarities are bounded whatever the token norm: tokens 1000x larger than a LayerNorm'ed ViT's (whose
    sum of squares over 384 channels would overflow fp16 several times over) give finite guides, within 2e-2 of
    fp32 (fp16: 2e-3), gradients included. CUDA computes norm, logsumexp and the sigmoid's exp in fp32 anyway; CPU
    autocast keeps them in the lower precision, the harder case here."""
    torch.manual_seed(0)
    book = TokenBook(384, 3)
    tokens = (torch.randn(2, 384, 6, 4) * 1000).requires_grad_()
    logits32, masks32 = book(tokens)
    (g32,) = torch.autograd.grad(logits32.sum(), tokens)
    with torch.autocast("cpu", dtype=dtype):
        logits, masks = book(tokens)
        (g,) = torch.autograd.grad(logits.float().sum(), tokens)
    tol = 2e-3 if dtype == torch.float16 else 2e-2
    assert torch.isfinite(logits).all() and torch.isfinite(g).all()
    assert (masks.float() - masks32).abs().max() <= tol
    assert (logits.float() - logits32).abs().max() <= tol * float(book.logit_scale)  # logit = scale * soft-max cos
    assert float((g - g32).norm() / g32.norm()) <= 10 * tol


def stressed_vit(residual: float = 1.0, attention: float = 1.0) -> DinoBackbone:
    """The plugin's realistic random ViT-S/16, with the patch embedding scaled by ``residual`` (the residual stream
    grows with it) and the q/k projections by ``attention`` (the attention logits grow with its square)."""
    torch.manual_seed(0)
    backbone = DinoBackbone(get_architecture("dinov3_vits16"))
    init_random_dino_weights_(backbone)
    with torch.no_grad():
        backbone.vit.patch_embed.proj.weight.mul_(residual)
        for block in backbone.vit.blocks:
            for proj in (block.attn.q_proj, block.attn.k_proj):
                proj.weight.mul_(attention)
                proj.bias.mul_(attention) if proj.bias is not None else None
    return backbone.eval()


def run_vit(backbone: DinoBackbone, dtype) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Last-block tokens in fp32 and under CPU autocast; the residual stream's and the attention logits' largest
    absolute values (fp32)."""
    x = torch.randn(1, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    peaks, qk = [], {}
    hooks = [b.register_forward_hook(lambda m, i, o: peaks.append(float(o.abs().max()))) for b in backbone.vit.blocks]
    for b in backbone.vit.blocks:
        hooks.append(b.attn.q_proj.register_forward_hook(lambda m, i, o: qk.setdefault("q", []).append(o)))
        hooks.append(b.attn.k_proj.register_forward_hook(lambda m, i, o: qk.setdefault("k", []).append(o)))
    with torch.no_grad():
        ref = backbone.patch_features(x, [11])[0]
        heads, dim = backbone.arch.num_heads, backbone.arch.head_dim
        logits = max(float((q.view(1, -1, heads, dim).transpose(1, 2) @ k.view(1, -1, heads, dim).transpose(1, 2)
                            .transpose(-1, -2)).abs().max()) / dim ** 0.5 for q, k in zip(qk["q"], qk["k"]))
        for h in hooks:
            h.remove()
        with torch.autocast("cpu", dtype=dtype):
            out = backbone.patch_features(x, [11])[0]
    return ref, out, max(peaks), logits


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vit_layernorm_and_residual_stream_are_safe_under_autocast_at_large_activations(dtype):
    """The ViT's residual stream stays in the autocast dtype (fp16 on GPUs) and every LayerNorm reads it; its sum of
    squares over 384 channels overflows fp16 from values of ~13 on. Scaled until its largest value is in the
    thousands (a trained ViT's outlier channels; fp16's limit is 65504), the tokens after the final norm stay finite
    and within 5e-3 (fp16) / 3e-2 (bf16) of fp32, relative to their largest value: LayerNorm accumulates in fp32
    (CUDA autocast even runs it in fp32)."""
    ref, out, peak, _ = run_vit(stressed_vit(residual=1000.0), dtype)
    assert 1e3 <= peak <= 65504 / 4
    assert torch.isfinite(out).all()
    assert float((out.float() - ref).abs().max() / ref.abs().max()) <= (5e-3 if dtype == torch.float16 else 3e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vit_attention_does_not_overflow_under_autocast_at_huge_logits(dtype):
    """Attention logits q.k/sqrt(d) of ~1e3-1e4 (10-100x a trained ViT's): the fused attention kernel timm uses
    (scaled_dot_product_attention; on GPUs flash / memory-efficient attention) keeps its softmax in fp32, so nothing
    overflows. At such logits the softmax is near one-hot and decided by differences the low-precision q and k cannot
    resolve, so the values themselves are not compared."""
    backbone = stressed_vit(attention=24.0)
    assert all(getattr(b.attn, "fused_attn", False) for b in backbone.vit.blocks)
    ref, out, _, logits = run_vit(backbone, dtype)
    assert 1e3 <= logits
    assert torch.isfinite(ref).all() and torch.isfinite(out).all()


# ============================================================================================ benchmarks/bench_gpu.py
def test_gpu_benchmark_script_runs_on_cpu_with_tiny_settings(tmp_path):
    """The maintainer's GPU script, every arm (6 trainers x fp16/bf16) on CPU with its --tiny settings: it must not
    rot between GPU runs. (On CPU nnU-Net neither compiles nor autocasts: this checks the script, not the GPU.)"""
    out = tmp_path / "bench_gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--tiny", "--device", "cpu",
                           "--threads", "1", "--out", str(out), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["settings"]["tiny"] is True
    arms = {(a["trainer"], a["precision"]): a for a in result["arms"]}
    assert set(arms) == {(t, p) for t in ("nnUNetTrainer", "nnUNetTrainerGuiDINO", "nnUNetTrainerGuiDINO_frozen",
                                          "nnUNetTrainerSegDINO", "nnUNetTrainerSegDINOv2_deepSupervision",
                                          "nnUNetTrainerMedDINOv3") for p in ("fp16", "bf16")}
    for arm in arms.values():
        assert arm.get("error") is None, arm
        assert arm["step_s"]["median"] > 0 and arm["predict_s"] > 0 and arm["predict_finite"]
        assert math.isfinite(arm["loss_last"]) and arm["nonfinite_losses"] == 0
        assert arm["ratios"]["step_vs_stock_fp16"] > 0
    assert arms[("nnUNetTrainerGuiDINO", "bf16")]["class"] == "nnUNetTrainerGuiDINO_bf16"
    assert arms[("nnUNetTrainerGuiDINO", "bf16")]["grad_scaler"] is False
    assert arms[("nnUNetTrainerGuiDINO", "fp16")]["fp16_headroom"] > 1
