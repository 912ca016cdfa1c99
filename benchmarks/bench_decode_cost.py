"""What decoding at the patch's own resolution saves: FLOPs (machine-independent) and CPU step time of SegDINOv2 and
MedDINOv3 with ``max_decode_resolution="patch"`` (the default) against "vit_input" (the former behaviour), next to
stock nnU-Net, at a dataset's own plans.

    python benchmarks/bench_decode_cost.py -d 4                          # Dataset004_Hippocampus, 2d, batch 8
    python benchmarks/bench_decode_cost.py -d 4 --flops-only             # seconds: FLOPs only
    python benchmarks/bench_decode_cost.py -d 27 -c 2d --trainers nnUNetTrainer nnUNetTrainerMedDINOv3_vits

The plans and dataset.json are read from ``$nnUNet_preprocessed/<dataset>/`` (only planning is needed, e.g.
``nnUNetv2_plan_experiment -d 4``: no preprocessed data is read). Each (trainer, setting) runs in its own process,
one after the other, and builds the network exactly as nnU-Net does (the trainer's ``build_network_architecture``
with the plans, deep supervision as the trainer trains; trainers are found by name as nnU-Net finds them; the
setting is changed through the trainer's network configuration, nothing else). Per arm:

* FLOPs (``torch.utils.flop_counter.FlopCounterMode``, on the meta device: shapes only, no weights, no time) of a
  training step = forward in train mode + backward of a loss over every output, at ``--batch-size``, and of one
  inference tile (eval, no autograd, batch 1), with the share of the DINO backbone (DinoBackbone modules). The
  counter counts matrix multiplications and convolutions (and their backward); per-element work (norms,
  activations, resampling) is not counted, which is why the step time is measured too.
* CPU time (``time.process_time``, ``--threads`` torch threads) and wall time of ``--steps`` training steps after
  ``--warmup``: zero_grad, forward, loss (mean of squares over every output; its cost is negligible), backward,
  AdamW step over the trainable parameters (the same optimiser for every arm, so that its per-parameter cost is
  counted); and of ``--infer-steps`` inference tiles. Random input, random (timm + nnU-Net) initialisation: cost
  does not depend on values. Peak RSS (ru_maxrss) of the arm's process.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import fields, is_dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from network_flops import build, count_flops, loss_of, trains_with_deep_supervision  # noqa: E402  (this folder's shared FLOP counting)

DEFAULT_TRAINERS = ["nnUNetTrainer", "nnUNetTrainerSegDINOv2", "nnUNetTrainerMedDINOv3"]
SETTINGS = ("patch", "vit_input")
REFERENCE = "nnUNetTrainer"


# ----------------------------------------------------------------------------------------------------------- worker
def decode_config_attribute(cls) -> str | None:
    """The class attribute holding the network configuration with ``max_decode_resolution``, if any."""
    for name in dir(cls):
        value = getattr(cls, name, None)
        if is_dataclass(value) and not isinstance(value, type) and any(
                f.name == "max_decode_resolution" for f in fields(value)):
            return name
    return None


def trainer_with_setting(cls, setting: str | None):
    attribute = decode_config_attribute(cls)
    if setting is None or attribute is None:
        return cls
    config = replace(getattr(cls, attribute), max_decode_resolution=setting)
    return type(f"{cls.__name__}__{setting}", (cls,), {attribute: config})


def time_steps(cls, plans_dir, configuration, batch, warmup, steps, infer_steps) -> dict:
    import torch

    torch.manual_seed(0)
    net, channels, patch, _ = build(cls, plans_dir, configuration)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(batch, channels, *patch)
    net.train()
    wall, cpu = [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        loss_of(net(x)).backward()
        optimizer.step()
        if i >= warmup:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    net.eval()
    tile = torch.randn(1, channels, *patch)
    infer_cpu = []
    with torch.no_grad():
        net(tile)
        for _ in range(infer_steps):
            c0 = time.process_time()
            net(tile)
            infer_cpu.append(time.process_time() - c0)
    return {"step_wall_s": wall, "step_cpu_s": cpu, "step_cpu_s_median": statistics.median(cpu),
            "step_wall_s_median": statistics.median(wall), "infer_tile_cpu_s": infer_cpu,
            "infer_tile_cpu_s_median": statistics.median(infer_cpu) if infer_cpu else None,
            "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
            "trainable_m": sum(p.numel() for p in params) / 1e6}


def worker(args) -> dict:
    import resource

    import torch
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    torch.set_num_threads(args.threads)
    cls = trainer_with_setting(recursive_find_trainer_class_by_name(args.worker), args.setting)
    plans_dir = Path(args.plans_dir)
    result = {"trainer": args.worker, "setting": args.setting, "deep_supervision": trains_with_deep_supervision(cls)}
    result.update(count_flops(cls, plans_dir, args.configuration, args.batch_size))
    if not args.flops_only:
        result.update(time_steps(cls, plans_dir, args.configuration, args.batch_size, args.warmup, args.steps,
                                 args.infer_steps))
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


# ----------------------------------------------------------------------------------------------------------- parent
def plans_folder(dataset: str) -> Path:
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_preprocessed:
        raise SystemExit("Set nnUNet_preprocessed (the plans are read from $nnUNet_preprocessed/<dataset>/).")
    folder = Path(nnUNet_preprocessed) / maybe_convert_to_dataset_name(dataset)
    for name in ("nnUNetPlans.json", "dataset.json"):
        if not (folder / name).is_file():
            raise SystemExit(f"{folder / name} does not exist: plan the dataset first (nnUNetv2_plan_experiment -d "
                             f"{dataset}).")
    return folder


def arms(trainers: list[str]) -> list[tuple[str, str | None]]:
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    out = []
    for name in trainers:
        cls = recursive_find_trainer_class_by_name(name)
        if cls is None:
            raise SystemExit(f"No trainer named {name} (nnU-Net's trainer search).")
        out += [(name, s) for s in SETTINGS] if decode_config_attribute(cls) else [(name, None)]
    return out


def run_arm(name, setting, args, plans_dir) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--plans-dir", str(plans_dir),
           "-c", args.configuration, "--batch-size", str(args.batch_size), "--threads", str(args.threads),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--infer-steps", str(args.infer_steps)]
    cmd += ["--setting", setting] if setting else []
    cmd += ["--flops-only"] if args.flops_only else []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{name} ({setting}) failed:\n{out.stderr[-4000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {name} [{setting or '-'}]: {row['train_step_gflop']:.0f} GFLOP/step"
          + (f", {row['step_cpu_s_median']:.2f} CPU s/step" if "step_cpu_s_median" in row else ""), flush=True)
    return row


def markdown(rows: list[dict]) -> str:
    ref = next((r for r in rows if r["trainer"] == REFERENCE), None)
    timed = all("step_cpu_s_median" in r for r in rows)

    def ratio(r, key):
        return f"{r[key] / ref[key]:.1f}x" if ref and r.get(key) else "-"

    head = ["trainer", "decode", "train step GFLOP", "x stock", "DINO share", "inference tile GFLOP", "x stock"]
    head += ["step CPU s (median)", "x stock", "tile CPU s (median)", "x stock", "peak RSS MiB"] if timed else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['trainer']}`", r["setting"] or "-", f"{r['train_step_gflop']:.1f}",
                 ratio(r, "train_step_gflop"), f"{r['train_dino_share']:.0%}", f"{r['infer_tile_gflop']:.2f}",
                 ratio(r, "infer_tile_gflop")]
        if timed:
            cells += [f"{r['step_cpu_s_median']:.2f}", ratio(r, "step_cpu_s_median"),
                      f"{r['infer_tile_cpu_s_median']:.3f}", ratio(r, "infer_tile_cpu_s_median"),
                      f"{r['peak_rss_mib']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", help="dataset id or name (plans under $nnUNet_preprocessed)")
    p.add_argument("-c", "--configuration", default="2d")
    p.add_argument("--trainers", nargs="+", default=DEFAULT_TRAINERS)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--infer-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--flops-only", action="store_true")
    p.add_argument("--out", help="write the rows and settings as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)
    p.add_argument("--plans-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if not args.dataset:
        p.error("-d/--dataset is required")
    plans_dir = plans_folder(args.dataset)
    load_before = os.getloadavg()
    rows = [run_arm(name, setting, args, plans_dir) for name, setting in arms(args.trainers)]
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
              "plans": str(plans_dir), "configuration": args.configuration, "batch_size": args.batch_size,
              "threads": args.threads, "warmup": args.warmup, "steps": args.steps, "infer_steps": args.infer_steps,
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "rows": rows}
    print(markdown(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
