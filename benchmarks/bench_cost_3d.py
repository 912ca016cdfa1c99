"""GuiDINO 3D cost next to stock nnU-Net 3d_fullres: FLOPs per training step and per inference tile for slice
strides 1, 2, 4 (or --strides), at a dataset's own 3D plan and at a CT-like 128 x 128 x 128 plan, plus CPU time
per training step at the dataset's plan.

    python benchmarks/bench_cost_3d.py -d 4                                  # Dataset004 3d_fullres + the CT-like plan
    python benchmarks/bench_cost_3d.py -d 27 -c 3d_lowres -p nnUNetResEncUNetMPlans --ct-size 0 --cpu-steps 0
    python benchmarks/bench_cost_3d.py -d 4 --weights /data/dinov3_vits16_pretrain_lvd1689m-08c60483.pth

- Networks are built as nnU-Net builds them: ``build_network_architecture`` of nnUNetTrainer (stock) and of the
  GuiDINO trainer (--trainer, default nnUNetTrainerGuiDINO) with ``slice_stride`` set per arm, from the plans'
  configuration, with deep supervision (as trained).
- FLOPs: torch.utils.flop_counter.FlopCounterMode on the meta device (shapes only: seconds per arm, the same on
  every machine). Step = train-mode forward at the plans' batch size + backward of a loss over every output;
  tile = eval forward of one patch without autograd. Matmuls and convolutions (and their backward) are counted;
  per-element work (norms, activations, interpolation) is not. The ViT's share is that of the DinoBackbone's ViT.
- CT-like plan (--ct-size N, 0: none): nnU-Net's 3d_fullres network for an N^3 patch, built here from the dataset's
  plans (its channels and labels) with nnU-Net's rules for isotropic pooling down to a 4^3 bottleneck (N = 128:
  6 stages, 32..320 features, batch 2) and spacing 1.5 x 0.8 x 0.8 mm, so the slicing axis is axis 0 (axial planes
  of N x N).
- CPU time (--cpu-steps, 0: none): real forward + backward of the same loss on CPU at the dataset's plan (batch
  --cpu-batch-size, default the plans'), torch threads --threads, median over --cpu-steps after one untimed step;
  the ViT gets the weights setting (--weights, default $nnUNet_dino_weights, 'random' for random initialisation). Time does not depend on the weight values.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from network_flops import loss_of, network_flops  # noqa: E402  (this folder's shared FLOP counting)

REPO = Path(__file__).resolve().parents[1]


def load_plans(dataset: str, plans_name: str) -> tuple[dict, dict, Path]:
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_preprocessed:
        raise SystemExit("Set nnUNet_preprocessed: plans are read from $nnUNet_preprocessed/<dataset>/.")
    folder = Path(str(nnUNet_preprocessed)) / maybe_convert_to_dataset_name(dataset)
    for name in (f"{plans_name}.json", "dataset.json"):
        if not (folder / name).is_file():
            raise SystemExit(f"{folder / name} does not exist: plan the dataset first (nnUNetv2_plan_experiment).")
    return load_json(str(folder / f"{plans_name}.json")), load_json(str(folder / "dataset.json")), folder


def ct_like_plans(plans: dict, configuration: str, size: int) -> dict:
    """The dataset's plans with an N^3 'ct_like' configuration (see module doc)."""
    plans = copy.deepcopy(plans)
    base = plans["configurations"][configuration]
    if "inherits_from" in base:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        base = PlansManager(plans).get_configuration(configuration).configuration
    cfg = copy.deepcopy(base)
    cfg.pop("inherits_from", None)
    cfg.pop("previous_stage", None)
    n_stages, edge = 1, size
    while edge % 2 == 0 and edge // 2 >= 4:  # nnU-Net pools an axis while it stays >= 4 voxels
        n_stages, edge = n_stages + 1, edge // 2
    kwargs = cfg["architecture"]["arch_kwargs"]
    kwargs.update(n_stages=n_stages, features_per_stage=[min(32 * 2 ** i, 320) for i in range(n_stages)],
                  kernel_sizes=[[3, 3, 3]] * n_stages, strides=[[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1))
    if "n_conv_per_stage" in kwargs:
        kwargs["n_conv_per_stage"] = [2] * n_stages
        kwargs["n_conv_per_stage_decoder"] = [2] * (n_stages - 1)
    if "n_blocks_per_stage" in kwargs:  # ResEnc plans: nnU-Net's M-preset block counts, cut to n_stages
        kwargs["n_blocks_per_stage"] = ([1, 3, 4, 6, 6, 6, 6] + [6] * n_stages)[:n_stages]
        kwargs["n_conv_per_stage_decoder"] = [1] * (n_stages - 1)
    cfg.update(patch_size=[size] * 3, spacing=[1.5, 0.8, 0.8], batch_size=2)
    plans["configurations"] = {"ct_like": cfg}
    return plans


def guidino_variant(trainer: str, stride: int):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's search prints every folder it looks at
        base = recursive_find_trainer_class_by_name(trainer)
    if base is None:
        raise SystemExit(f"No trainer named {trainer}.")
    return type(f"{trainer}_stride{stride}", (base,), {"guidino": replace(base.guidino, slice_stride=stride)})


def build(cls, plans: dict, dataset_json: dict, configuration: str, device: str | None):
    import torch
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    if len(cm.patch_size) != 3:
        raise SystemExit(f"Configuration {configuration!r} has patch size {cm.patch_size}: not 3D.")
    channels = determine_num_input_channels(pm, cm, dataset_json)
    outputs = pm.get_label_manager(dataset_json).num_segmentation_heads
    with torch.device(device) if device else contextlib.nullcontext():
        net = cls.build_network_architecture(pm, cm, channels, outputs, True)
    if device:
        net = net.to(device)
    return net, channels, tuple(cm.patch_size), cm.batch_size


def count(cls, plans, dataset_json, configuration) -> dict:
    net, channels, patch, batch = build(cls, plans, dataset_json, configuration, "meta")
    flops = network_flops(net, channels, patch, batch)
    row = {"patch_size": list(patch), "batch_size": batch, "train_step_gflop": flops["train_step_gflop"],
           "train_vit_gflop": flops["train_dino_gflop"], "infer_tile_gflop": flops["infer_tile_gflop"],
           "infer_vit_gflop": flops["infer_dino_gflop"]}
    guidance = getattr(net, "guidance", None)
    if guidance is not None:
        row.update(slice_axis=guidance.slice_axis, slice_stride=guidance.slice_stride,
                   vit_planes_per_patch=len(guidance.planes_seen), planes=guidance.num_planes,
                   tokens_per_plane=list(guidance.adapter.token_hw))
    return row


def cpu_step_seconds(cls, plans, dataset_json, configuration, steps: int, weights: str | None,
                     batch_size: int | None) -> dict:
    import torch

    from nnunet_dino.backbone import init_random_dino_weights_, load_weights_into, resolve_weights_setting

    torch.manual_seed(0)
    net, channels, patch, batch = build(cls, plans, dataset_json, configuration, None)
    batch = batch_size or batch
    weights_used = None
    if hasattr(net, "guidance"):
        backbone = net.guidance.backbone
        path = resolve_weights_setting(weights, backbone.arch.name)
        if path is None:
            init_random_dino_weights_(backbone)
            weights_used = "random initialisation"
        else:
            weights_used = load_weights_into(backbone, path).describe()
    net.train()
    x = torch.randn(batch, channels, *patch)
    times, cpu = [], []
    for i in range(steps + 1):
        t, c = time.perf_counter(), time.process_time()
        loss_of(net(x)).backward()
        net.zero_grad(set_to_none=True)
        if i:  # the first step is untimed (allocator and kernel warm-up)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    return {"batch_size": batch, "steps": steps, "median_s": statistics.median(times),
            "median_cpu_s": statistics.median(cpu), "dino_weights": weights_used}


def ratios(rows: list[dict]) -> None:
    stock = rows[0]
    for r in rows:
        r["train_step_vs_stock"] = r["train_step_gflop"] / stock["train_step_gflop"]
        r["infer_tile_vs_stock"] = r["infer_tile_gflop"] / stock["infer_tile_gflop"]


def markdown(result: dict) -> str:
    lines = []
    for plan in result["plans"]:
        lines += [f"**{plan['label']}** (patch {'x'.join(map(str, plan['rows'][0]['patch_size']))}, batch "
                  f"{plan['rows'][0]['batch_size']})", "",
                  "| arm | ViT planes / patch | GFLOP / step | vs stock | ViT share | GFLOP / tile | vs stock "
                  "| ViT share |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in plan["rows"]:
            planes = f"{r['vit_planes_per_patch']} of {r['planes']}" if "planes" in r else "-"
            lines.append(f"| {r['arm']} | {planes} | {r['train_step_gflop']:.1f} | {r['train_step_vs_stock']:.2f}x | "
                         f"{r['train_vit_gflop'] / r['train_step_gflop']:.0%} | {r['infer_tile_gflop']:.1f} | "
                         f"{r['infer_tile_vs_stock']:.2f}x | {r['infer_vit_gflop'] / r['infer_tile_gflop']:.0%} |")
        lines.append("")
    if result.get("cpu"):
        lines += [f"CPU, dataset plan, batch {result['cpu'][0]['batch_size']}, "
                  f"{result['machine']['threads']} thread(s):",
                  "", "| arm | s / step (median) | CPU s / step | vs stock |", "|---|---|---|---|"]
        stock = result["cpu"][0]["median_cpu_s"]
        for r in result["cpu"]:
            lines.append(f"| {r['arm']} | {r['median_s']:.2f} | {r['median_cpu_s']:.2f} | "
                         f"{r['median_cpu_s'] / stock:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-d", required=True, help="dataset id or name (plans from $nnUNet_preprocessed)")
    ap.add_argument("-c", default="3d_fullres", help="3D configuration")
    ap.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    ap.add_argument("--trainer", default="nnUNetTrainerGuiDINO")
    ap.add_argument("--strides", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--ct-size", type=int, default=128, help="edge of the CT-like cubic patch; 0: no CT-like plan")
    ap.add_argument("--cpu-steps", type=int, default=3, help="timed CPU steps per arm at the dataset plan; 0: none")
    ap.add_argument("--cpu-batch-size", type=int, default=None, help="batch of the CPU timing (default: the plans')")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weights", default=None, help="DINO weights for the CPU timing (default $nnUNet_dino_weights; "
                                                    "'random': random initialisation)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cost_3d.json")
    args = ap.parse_args(argv)
    if any(s < 1 for s in args.strides):
        ap.error(f"--strides must be >= 1, got {args.strides}.")
    if args.ct_size and (args.ct_size < 8 or args.ct_size % 8):
        ap.error(f"--ct-size must be a multiple of 8 (>= 8) or 0, got {args.ct_size}.")

    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    torch.set_num_threads(args.threads)
    plans, dataset_json, folder = load_plans(args.d, args.p)
    if args.c not in plans["configurations"]:
        raise SystemExit(f"{folder / args.p}.json has no configuration {args.c!r} ({sorted(plans['configurations'])}).")
    arms = [("nnUNetTrainer (stock)", nnUNetTrainer)] + [
        (f"{args.trainer}, stride {s}", guidino_variant(args.trainer, s)) for s in args.strides]
    targets = [(f"{plans['dataset_name']} {args.c}", plans, args.c)]
    if args.ct_size:
        targets.append((f"CT-like {args.ct_size}^3 (spacing 1.5 x 0.8 x 0.8)",
                        ct_like_plans(plans, args.c, args.ct_size), "ct_like"))
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "benchmarks/bench_cost_3d.py", *(argv or sys.argv[1:])]),
              "counter": "FlopCounterMode on the meta device (matmul + conv, fwd + bwd)",
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": args.threads},
              "plans": [], "cpu": []}
    for label, p, cfg in targets:
        rows = []
        for arm, cls in arms:
            rows.append({"arm": arm, **count(cls, p, dataset_json, cfg)})
            print(f"[{label}] {arm}: {rows[-1]['train_step_gflop']:.1f} GFLOP/step, "
                  f"{rows[-1]['infer_tile_gflop']:.1f} GFLOP/tile", flush=True)
        ratios(rows)
        result["plans"].append({"label": label, "configuration": cfg, "rows": rows})
    if args.cpu_steps:
        for arm, cls in arms:
            row = {"arm": arm, **cpu_step_seconds(cls, plans, dataset_json, args.c, args.cpu_steps, args.weights,
                                   args.cpu_batch_size)}
            result["cpu"].append(row)
            print(f"[CPU] {arm}: {row['median_s']:.2f} s/step ({row['median_cpu_s']:.2f} CPU s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
