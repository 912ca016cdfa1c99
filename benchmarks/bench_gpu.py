"""The GPU check, prepared: one command a maintainer with one H100/H200 runs (under 8 minutes), one JSON back.

    python benchmarks/bench_gpu.py                       # CUDA, 512x512, compiled as nnU-Net does; see --help
    python benchmarks/bench_gpu.py --tiny --device cpu   # the same code on a CPU in under a minute (the test suite)

For stock ``nnUNetTrainer`` and every trainer family (GuiDINO with LoRA, GuiDINO frozen, SegDINO, SegDINOv2 with
deep supervision, MedDINOv3), first under nnU-Net's own precision (fp16 autocast + GradScaler), then under bf16 (the
``_bf16`` variants; stock: nnUNetTrainer + the same mixin), all in this one process, one arm after the other:

* the trainer is built on a synthetic 2D CT-like plan (512x512 patch, nnU-Net's default 8-stage PlainConvUNet for it,
  batch 12, CTNormalization, 3 labels) and ``trainer.initialize()`` runs as in ``nnUNetv2_train``: on CUDA it
  compiles the network with ``torch.compile`` (nnU-Net's default; ``--no-compile`` sets ``nnUNet_compile=f``);
* ``--warmup`` + ``--steps`` of nnU-Net's own ``train_step`` on synthetic batches already on the device (the first
  step includes compilation: reported as ``first_step_s``); median step time of the timed ones (CUDA synchronised);
  peak memory (``torch.cuda.max_memory_allocated``) over the steps; the GradScaler's scale before and after and how
  many steps it skipped because of inf/NaN gradients (an fp16 overflow shows up here first);
* the largest absolute value of every ViT block's output (the residual stream) in one forward under the arm's
  autocast, and the fp16 headroom 65504 / that value: with pretrained weights (``nnUNet_dino_weights``) the number
  that says whether fp16 is safe for them;
* prediction as ``nnUNetv2_predict`` does it (nnUNetPredictor, tile step 0.5, Gaussian, mirroring, its fp16
  autocast, the network uncompiled as nnUNetv2_predict leaves it by default) of ``--predict-cases`` synthetic
  volumes of ``--predict-slices`` 512x512 slices, one untimed first; median seconds per case and peak memory.

Ratios: every arm against stock nnUNetTrainer under fp16 (step, prediction, training memory), and bf16 against
the same trainer's fp16. A time budget (``--budget-s``, default 420 s) is checked before each arm: arms that no
longer fit are recorded as skipped (fp16 arms run first). DINO weights: ``nnUNet_dino_weights`` if set, otherwise
``random`` (recorded): time and memory do not depend on weight values, the fp16 headroom does.

Output: ``--out`` (default benchmarks/results/gpu_<device>.json) and a markdown table on stdout.

``--compile-check [BACKEND]`` (default inductor) runs something else instead: for every family's network (built
as nnU-Net builds it, zero-initialised trainable tensors given small random values so that every gradient is
informative, dropout and drop path off so that both runs are deterministic) one forward + backward eagerly and one
compiled with that backend (the first call compiles: its time is reported), and the largest differences of outputs
and gradients. On CPU this is the inductor run the test suite cannot afford (minutes per network); results in
docs/gpu.md.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FP16_MAX = 65504.0
FAMILIES = ["nnUNetTrainer", "nnUNetTrainerGuiDINO", "nnUNetTrainerGuiDINO_frozen", "nnUNetTrainerSegDINO",
            "nnUNetTrainerSegDINOv2_deepSupervision", "nnUNetTrainerMedDINOv3"]
# --tiny: few tokens and ViT-S everywhere, so that a 2-core CPU runs all 12 arms in about a minute
TINY_TOKENS = {"guidino": 2, "segdino": 1, "segdino_v2": 1, "meddinov3": 1}


# ---------------------------------------------------------------------------------------------- synthetic plans
def unet_arch(n_stages: int) -> dict:
    features = [min(32 * 2 ** i, 512) for i in range(n_stages)]
    return {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": n_stages, "features_per_stage": features,
                            "conv_op": "torch.nn.modules.conv.Conv2d", "kernel_sizes": [[3, 3]] * n_stages,
                            "strides": [[1, 1]] + [[2, 2]] * (n_stages - 1), "n_conv_per_stage": [2] * n_stages,
                            "n_conv_per_stage_decoder": [2] * (n_stages - 1), "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def synthetic_workspace(work: Path, patch: int, batch_size: int) -> Path:
    """nnUNet_preprocessed/Dataset999_GPUBench with plans, dataset.json and a placeholder data folder: what a trainer
    reads before its data loaders start (none are used: batches are synthetic)."""
    import numpy as np

    n_stages = min(8, int(np.log2(patch)) - 1)  # 512 -> 8 stages down to 4x4, as nnU-Net plans it; 64 -> 5
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    config = {"data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor",
              "batch_size": batch_size, "patch_size": [patch, patch], "median_image_size_in_voxels": [patch, patch],
              "spacing": [0.78, 0.78], "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
              "resampling_fn_data": "resample_data_or_seg_to_shape",
              "resampling_fn_seg": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": resampling,
              "resampling_fn_seg_kwargs": dict(resampling, is_seg=True, order=1),
              "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
              "resampling_fn_probabilities_kwargs": dict(resampling, order=1), "architecture": unet_arch(n_stages),
              "batch_dice": True}
    plans = {"dataset_name": "Dataset999_GPUBench", "plans_name": "nnUNetPlans",
             "original_median_spacing_after_transp": [2.5, 0.78, 0.78],
             "original_median_shape_after_transp": [100, patch, patch], "image_reader_writer": "SimpleITKIO",
             "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": {"2d": config},
             "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
             "foreground_intensity_properties_per_channel": {"0": {
                 "max": 3071.0, "mean": 99.0, "median": 102.0, "min": -1024.0, "percentile_00_5": -150.0,
                 "percentile_99_5": 290.0, "std": 70.0}}}
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "lesion": 2},
               "numTraining": 4, "file_ending": ".nii.gz"}
    folder = work / "nnUNet_preprocessed" / plans["dataset_name"]
    (folder / config["data_identifier"]).mkdir(parents=True, exist_ok=True)
    (folder / "nnUNetPlans.json").write_text(json.dumps(plans, indent=1))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=1))
    np.savez(folder / config["data_identifier"] / "case_000.npz", data=np.zeros((1, 1, 8, 8), np.float32))
    return folder


# ---------------------------------------------------------------------------------------------- trainers
def trainer_class(name: str, precision: str, tiny: bool):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    import nnunet_dino.trainers as plugin
    from nnunet_dino.training.precision import BF16Mixin

    if name == "nnUNetTrainer":
        cls = nnUNetTrainer if precision == "fp16" else type("nnUNetTrainer_bf16", (BF16Mixin, nnUNetTrainer), {})
    else:
        cls = getattr(plugin, name + ("_bf16" if precision == "bf16" else ""))
    if tiny:
        overrides = {}
        for attr, tokens in TINY_TOKENS.items():
            config = getattr(cls, attr, None)
            if config is not None:
                extra = {"dino_arch": "dinov3_vits16"} if attr == "meddinov3" else {}
                overrides[attr] = replace(config, min_short_side_tokens=tokens, **extra)
        cls = type(cls.__name__, (cls,), overrides)
    return cls


def synthetic_batch(trainer, seed: int, device):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    b = trainer.configuration_manager.batch_size
    patch = tuple(trainer.configuration_manager.patch_size)
    data = torch.randn(b, 1, *patch, generator=g)
    coarse = torch.randint(0, trainer.label_manager.num_segmentation_heads, (b, 1, max(1, patch[0] // 16),
                                                                             max(1, patch[1] // 16)), generator=g)
    target = F.interpolate(coarse.float(), size=patch, mode="nearest")
    if trainer.enable_deep_supervision:
        target = [F.interpolate(target, size=[round(p * s) for p, s in zip(patch, scale)], mode="nearest").to(device)
                  for scale in trainer._get_deep_supervision_scales()]
    else:
        target = target.to(device)
    return {"data": data.to(device), "target": target}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gb(device) -> float | None:
    import torch

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)
    return None


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def run_arm(name: str, precision: str, args, preprocessed: Path, device) -> dict:
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_dino.backbone import DinoBackbone
    from nnunet_dino.training import unwrap
    from nnunet_dino.training.precision import get_autocast_dtype

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    cls = trainer_class(name, precision, args.tiny)
    plans = dict(load_json(preprocessed / "nnUNetPlans.json"), continue_training=False)
    trainer = cls(plans, "2d", 0, load_json(preprocessed / "dataset.json"), device)
    arm = {"trainer": name, "precision": precision, "class": cls.__name__, "device": str(device)}
    t0 = time.perf_counter()
    trainer.initialize()
    if hasattr(trainer, "load_dino_weights"):
        trainer.load_dino_weights()
    trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
    trainer.network.train()
    net = unwrap(trainer.network)
    arm.update(build_s=round(time.perf_counter() - t0, 2), compiled=type(trainer.network).__name__ == "OptimizedModule",
               autocast=(str(getattr(trainer, "autocast_dtype", None) or get_autocast_dtype("cuda"))
                         .replace("torch.", "") if device.type == "cuda" else None),
               grad_scaler=trainer.grad_scaler is not None,
               parameters=sum(p.numel() for p in net.parameters()),
               trainable=sum(p.numel() for p in net.parameters() if p.requires_grad),
               batch_size=trainer.configuration_manager.batch_size)
    batches = [synthetic_batch(trainer, seed, device) for seed in range(2)]
    scaler = trainer.grad_scaler
    arm["grad_scale_start"] = scaler.get_scale() if scaler is not None else None
    _reset_peak(device)
    times, losses, skipped = [], [], 0
    for i in range(args.warmup + args.steps):
        scale = scaler.get_scale() if scaler is not None else None
        _sync(device)
        ts = time.perf_counter()
        loss = trainer.train_step(batches[i % 2])["loss"]
        _sync(device)
        times.append(time.perf_counter() - ts)
        losses.append(float(loss))
        if scaler is not None and scaler.get_scale() < scale:
            skipped += 1
    timed = times[args.warmup:]
    arm.update(first_step_s=round(times[0], 3), step_s={"median": statistics.median(timed), "all": timed},
               losses=losses, loss_last=losses[-1], nonfinite_losses=sum(not (l == l and abs(l) < float("inf"))
                                                                          for l in losses),
               grad_scale_end=scaler.get_scale() if scaler is not None else None, scaler_skipped_steps=skipped,
               peak_mem_train_gb=_peak_gb(device))
    del batches
    # the residual stream's largest value in every ViT block, under this arm's autocast (fp16 headroom)
    trainer.set_deep_supervision_enabled(False)
    net.eval()
    backbones = [m for m in net.modules() if isinstance(m, DinoBackbone)]
    if backbones:
        peaks = []
        hooks = [blk.register_forward_hook(lambda m, i, o: peaks.append(float(o.detach().abs().max())))
                 for b in backbones for blk in b.vit.blocks]
        x = torch.randn(1, 1, *trainer.configuration_manager.patch_size, device=device)
        with torch.no_grad(), trainer_autocast(trainer, device):
            net(x)
        for h in hooks:
            h.remove()
        arm.update(vit_block_peak_abs=max(peaks), fp16_headroom=round(FP16_MAX / max(peaks), 1))
    # prediction as nnUNetv2_predict does it
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(net, trainer.plans_manager, trainer.configuration_manager, None,
                                    trainer.dataset_json, cls.__name__, trainer.inference_allowed_mirroring_axes)
    patch = trainer.configuration_manager.patch_size
    case = torch.randn(1, args.predict_slices, *patch, generator=torch.Generator().manual_seed(5))
    predictor.predict_sliding_window_return_logits(case)  # untimed first case
    _reset_peak(device)
    pt = []
    for _ in range(args.predict_cases):
        _sync(device)
        ts = time.perf_counter()
        logits = predictor.predict_sliding_window_return_logits(case)
        _sync(device)
        pt.append(time.perf_counter() - ts)
    arm.update(predict_s=statistics.median(pt), predict_finite=bool(torch.isfinite(logits).all()),
               peak_mem_predict_gb=_peak_gb(device))
    del trainer, net, predictor
    return arm


def trainer_autocast(trainer, device):
    """The autocast nnU-Net's train_step uses for this trainer (the _bf16 mixin's dtype included)."""
    import torch
    from nnunetv2.utilities.helpers import dummy_context

    from nnunet_dino.training.precision import get_autocast_dtype

    if device.type != "cuda":
        return dummy_context()
    return torch.autocast("cuda", dtype=getattr(trainer, "autocast_dtype", None) or get_autocast_dtype("cuda"))


# ---------------------------------------------------------------------------------------------- compile check
def compile_check_one(name: str, args, preprocessed: Path, device, backend: str) -> dict:
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from torch._dynamo.utils import counters

    from nnunet_dino.backbone import DinoBackbone, init_random_dino_weights_

    cls = trainer_class(name, "fp16", args.tiny)
    pm = PlansManager(load_json(preprocessed / "nnUNetPlans.json"))
    cm = pm.get_configuration("2d")
    ds = name == "nnUNetTrainer" or name.startswith("nnUNetTrainerGuiDINO") or "deepSupervision" in name

    def build():
        torch.manual_seed(0)
        net = cls.build_network_architecture(pm, cm, 1, 3, ds)
        for m in net.modules():
            if isinstance(m, DinoBackbone):
                init_random_dino_weights_(m)
            if isinstance(m, torch.nn.Dropout):  # peft's LoRA dropout
                m.p = 0.0
            if hasattr(m, "drop_prob"):  # timm's DropPath (MedDINOv3)
                m.drop_prob = 0.0
        with torch.no_grad():
            for p in net.parameters():
                if p.requires_grad and not p.any():
                    p.normal_(0.0, 0.1)
        return net.to(device).train()

    x = torch.randn(2, 1, *cm.patch_size, generator=torch.Generator().manual_seed(1)).to(device)

    def step(net):
        for p in net.parameters():
            p.grad = None
        out = net(x)
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        loss = sum(((i + 1) * o.float()).sin().mean() for i, o in enumerate(outs))
        last_guide = getattr(getattr(net, "_orig_mod", net), "last_guide", None)
        if last_guide is not None:  # GuiDINO's guide loss reads it
            loss = loss + last_guide[0].float().sin().mean()
        loss.backward()
        return [o.detach().float() for o in outs], {n: p.grad.detach().float() for n, p in
                                                    getattr(net, "_orig_mod", net).named_parameters()
                                                    if p.grad is not None}

    eager, compiled = build(), build()
    t = time.perf_counter()
    out_e, grad_e = step(eager)
    _sync(device)
    eager_s = time.perf_counter() - t
    torch._dynamo.reset()
    counters.clear()
    opt = torch.compile(compiled, backend=backend)
    t = time.perf_counter()
    out_c, grad_c = step(opt)
    _sync(device)
    first_s = time.perf_counter() - t
    t = time.perf_counter()
    step(opt)
    _sync(device)
    second_s = time.perf_counter() - t
    scale = max(float(g.abs().max()) for g in grad_e.values())
    worst = max(((float((grad_e[n] - grad_c[n]).abs().max()) / max(float(grad_e[n].abs().max()), 1e-30), n)
                 for n in grad_e if float(grad_e[n].abs().max()) >= 1e-4 * scale), default=(0.0, ""))
    return {"trainer": name, "backend": backend, "device": str(device), "compile_s": round(first_s, 1),
            "eager_step_s": round(eager_s, 3), "compiled_step_s": round(second_s, 3),
            "output_rel": max(float((a - b).abs().max()) / max(float(a.abs().max()), 1e-30)
                              for a, b in zip(out_e, out_c)),
            "grad_rel_to_max": max(float((grad_e[n] - grad_c[n]).abs().max()) for n in grad_e) / scale,
            "grad_rel_worst_tensor": [worst[1], worst[0]],
            "graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": {k[:200]: int(v) for k, v in counters["graph_break"].items()}}


# ---------------------------------------------------------------------------------------------- report
def add_ratios(arms: list[dict]) -> None:
    done = {(a["trainer"], a["precision"]): a for a in arms if "step_s" in a}
    stock = done.get(("nnUNetTrainer", "fp16"))
    for arm in done.values():
        r = {}
        if stock:
            r["step_vs_stock_fp16"] = round(arm["step_s"]["median"] / stock["step_s"]["median"], 2)
            r["predict_vs_stock_fp16"] = round(arm["predict_s"] / stock["predict_s"], 2)
            if arm["peak_mem_train_gb"] and stock["peak_mem_train_gb"]:
                r["train_mem_vs_stock_fp16"] = round(arm["peak_mem_train_gb"] / stock["peak_mem_train_gb"], 2)
        fp16 = done.get((arm["trainer"], "fp16"))
        if arm["precision"] == "bf16" and fp16:
            r["step_bf16_vs_fp16"] = round(arm["step_s"]["median"] / fp16["step_s"]["median"], 2)
            if arm["peak_mem_train_gb"] and fp16["peak_mem_train_gb"]:
                r["train_mem_bf16_vs_fp16"] = round(arm["peak_mem_train_gb"] / fp16["peak_mem_train_gb"], 2)
        arm["ratios"] = r


def markdown(result: dict) -> str:
    rows = ["| trainer | precision | compiled | first step s | step s | x stock | predict s/case | x stock | "
            "train GB | predict GB | scaler skipped | fp16 headroom |", "|" + "---|" * 12]
    for a in result["arms"]:
        if "step_s" not in a:
            why = a.get("skipped") or "ERROR: " + a.get("error", "")[-80:]
            rows.append(f"| {a['trainer']} | {a['precision']} | {why}" + " |" * 10)
            continue
        r = a.get("ratios", {})
        rows.append(f"| {a['trainer']} | {a['precision']} | {a['compiled']} | {a['first_step_s']:.1f} | "
                    f"{a['step_s']['median']:.3f} | {r.get('step_vs_stock_fp16', '')} | {a['predict_s']:.2f} | "
                    f"{r.get('predict_vs_stock_fp16', '')} | {a['peak_mem_train_gb']} | {a['peak_mem_predict_gb']} | "
                    f"{a['scaler_skipped_steps']} | {a.get('fp16_headroom', '')} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="64x64 patch, batch 2, ViT-S with 1-2 tokens per side, "
                                                       "1 warm-up + 2 timed steps, 1 predicted case of 2 slices")
    p.add_argument("--trainers", nargs="+", default=FAMILIES, help=f"default: {' '.join(FAMILIES)}")
    p.add_argument("--precisions", nargs="+", default=["fp16", "bf16"], choices=["fp16", "bf16"])
    p.add_argument("--patch", type=int, default=None, help="square patch edge (default 512; --tiny: 64)")
    p.add_argument("--batch-size", type=int, default=None, help="default 12 (nnU-Net's 2D batch at 512x512); --tiny: 2")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps, the first compiles (default 3; --tiny 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; --tiny 2)")
    p.add_argument("--predict-cases", type=int, default=None, help="timed cases (default 2; --tiny 1)")
    p.add_argument("--predict-slices", type=int, default=None, help="slices per case (default 8; --tiny 2)")
    p.add_argument("--no-compile", action="store_true", help="nnUNet_compile=f (nnU-Net compiles on CUDA by default)")
    p.add_argument("--compile-check", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="only compare each network compiled with BACKEND (default inductor) against eager")
    p.add_argument("--budget-s", type=float, default=420.0, help="no new arm starts after this many seconds")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--work", type=Path, default=None, help="synthetic nnUNet_preprocessed / nnUNet_results (temp)")
    p.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/gpu_<device>.json)")
    args = p.parse_args(argv)
    tiny = {"patch": 64, "batch_size": 2, "warmup": 1, "steps": 2, "predict_cases": 1, "predict_slices": 2}
    full = {"patch": 512, "batch_size": 12, "warmup": 3, "steps": 10, "predict_cases": 2, "predict_slices": 8}
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    preprocessed = synthetic_workspace(work, args.patch, args.batch_size)
    os.environ.update(nnUNet_preprocessed=str(preprocessed.parent), nnUNet_results=str(work / "nnUNet_results"),
                      nnUNet_raw=str(work / "nnUNet_raw"))
    os.environ.setdefault("nnUNet_dino_weights", "random")
    if args.no_compile:
        os.environ["nnUNet_compile"] = "f"
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available (use --device cpu --tiny for the CPU check)")

    started = time.perf_counter()
    arms = []
    if args.compile_check:
        checks = []
        for name in args.trainers:
            print(f"[{time.perf_counter() - started:6.0f} s] compile check {name} ({args.compile_check})", flush=True)
            try:
                checks.append(compile_check_one(name, args, preprocessed, device, args.compile_check))
            except Exception as e:
                checks.append({"trainer": name, "error": f"{type(e).__name__}: {e}",
                               "traceback": traceback.format_exc()})
            print(json.dumps({k: v for k, v in checks[-1].items() if k != "traceback"}), flush=True)
        out = args.out or REPO / "benchmarks" / "results" / f"compile_check_{args.compile_check}_{device.type}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        out.write_text(json.dumps({"date": datetime.datetime.now().isoformat(timespec="seconds"), "settings": settings,
                                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                                   "elapsed_s": round(time.perf_counter() - started, 1), "checks": checks}, indent=1))
        print(f"written {out}")
        return 1 if any("error" in c for c in checks) else 0
    for precision in args.precisions:
        for name in args.trainers:
            elapsed = time.perf_counter() - started
            if elapsed > args.budget_s:
                arms.append({"trainer": name, "precision": precision, "skipped": f"time budget ({elapsed:.0f} s)"})
                continue
            print(f"[{elapsed:6.0f} s] {name} {precision}", flush=True)
            try:
                arms.append(run_arm(name, precision, args, preprocessed, device))
            except Exception as e:  # one failing arm must not lose the others' numbers
                arms.append({"trainer": name, "precision": precision, "error": f"{type(e).__name__}: {e}",
                             "traceback": traceback.format_exc()})
                print(traceback.format_exc(), file=sys.stderr, flush=True)
    add_ratios(arms)
    import nnunetv2

    env = {"python": platform.python_version(), "torch": torch.__version__, "nnunetv2": nnunetv2.__version__
           if hasattr(nnunetv2, "__version__") else None, "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
                   cuda=torch.version.cuda, bf16_native=torch.cuda.is_bf16_supported())
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "dino_weights": os.environ.get("nnUNet_dino_weights"),
              "compile_setting": os.environ.get("nnUNet_compile", "unset (nnU-Net: compile on CUDA)"),
              "environment": env, "elapsed_s": round(time.perf_counter() - started, 1),
              "max_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2), "arms": arms}
    out = args.out or REPO / "benchmarks" / "results" / f"gpu_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    print(f"\n{len(arms)} arms in {result['elapsed_s']} s; written {out}")
    return 1 if any("error" in a for a in arms) else 0


if __name__ == "__main__":
    sys.exit(main())
