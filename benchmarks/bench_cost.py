"""Cost benchmark: what each trainer costs relative to stock nnU-Net, at identical plans, patch and batch size.

    python benchmarks/bench_cost.py --preprocessed /tmp/bench_work/nnUNet_preprocessed/Dataset004_Hippocampus \\
        --raw-images /work/shared/data/nnUNet_raw/Dataset004_Hippocampus/imagesTs --device cpu --threads 2

For every trainer (default: stock nnUNetTrainer and every plugin base trainer, see DEFAULT_TRAINERS), in a SEPARATE
subprocess run one after the other (so peak memory of one arm never mixes with another's):
  * the trainer class is found by name the way nnU-Net does (recursive_find_trainer_class_by_name; a name that is
    not found is an error), constructed from the preprocessed dataset's plans + dataset.json, its batch size set to
    --batch-size (the same for every arm; the plans' own patch size is kept), then ``trainer.initialize()``;
  * ``--warmup + --steps`` real batches are drawn first from the trainer's own training dataloader (nnU-Net's
    augmentation, single-threaded), so data loading is NOT in the timed region; then each batch goes through
    ``trainer.train_step(batch)`` -- nnU-Net's real forward + loss + backward + optimiser step, with its autocast and
    GradScaler on CUDA -- timed with perf_counter (torch.cuda.synchronize before and after on GPU); the first
    --warmup steps are discarded; median, IQR, mean over the rest;
  * inference: an nnUNetPredictor (tile step 0.5, Gaussian, mirroring on, as nnUNetv2_predict) built with
    ``manual_initialization`` from the trainer's network (deep supervision off) and plans, as nnU-Net's own final
    validation does; each of --infer-cases real test images (read with the plans' reader, untimed) goes through
    ``predictor.predict_single_npy_array`` = preprocessing + sliding window with TTA + resampling to the original
    shape; --infer-warmup untimed cases first; median seconds per case. File export and multiprocessing are not
    timed; --disable-tta switches mirroring off;
  * every timed region also records the process CPU time (time.process_time): the robust number on a loaded machine;
  * peak memory: ru_maxrss of the worker process (CPU; never decreases, so the process peak), and
    torch.cuda.max_memory_allocated / max_memory_reserved (GPU), separately for training and for inference;
  * parameters: total and trainable (requires_grad) of trainer.network;
  * --probe-steps extra steps with every DinoBackbone.patch_features wrapped: backbone calls per step / per case,
    its forward time and share of the step, token grid, dtype and autocast state it ran in.
The parent prints one table with ratios to stock nnUNetTrainer and writes JSON + markdown (--out-dir).

DINO weights: none are loaded (the trainers load them in on_train_start, which is not called); the backbone keeps
its random initialisation, and every result is labelled "random DINO weights". Time and memory do not depend on the
weight values.
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
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_TRAINERS = Path(__file__).resolve().parent / "trainers"
REFERENCE = "nnUNetTrainer"
DEFAULT_TRAINERS = ["nnUNetTrainer", "nnUNetTrainerGuiDINO", "nnUNetTrainerGuiDINO_frozen", "nnUNetTrainerSegDINO",
                    "nnUNetTrainerSegDINOv2", "nnUNetTrainerMedDINOv3"]


# ----------------------------------------------------------------------------------------------------------- worker
class _Probe:
    """Wraps every DinoBackbone.patch_features of a network (the one entry point all plugin networks use) to count
    its calls and time its forward, and to record the token grid and the dtype it runs in."""

    def __init__(self, net, sync, timing: bool = True):
        self.backbones = [m for m in net.modules() if type(m).__name__ == "DinoBackbone"]
        self.sync = sync if timing else (lambda: None)
        self.timing = timing
        self.reset()
        for bb in self.backbones:
            original = bb.patch_features

            def timed(x, layers=None, _orig=original):
                self.sync()
                t0, c0 = time.perf_counter(), time.process_time()
                out = _orig(x, layers)
                self.sync()
                self.seconds += time.perf_counter() - t0
                self.cpu_seconds += time.process_time() - c0
                self.calls += 1
                self.info = {"vit_input": list(x.shape), "token_grid": list(out[0].shape[-2:]),
                             "out_dtype": str(out[0].dtype),
                             "grad": bool(out[0].requires_grad), "autocast": torch_autocast_state(x)}
                return out

            bb.patch_features = timed

    def reset(self):
        self.seconds, self.cpu_seconds, self.calls, self.info = 0.0, 0.0, 0, None

    def summary(self, n: int, per: str) -> dict:
        return {f"backbone_forward_s_{per}": self.seconds / max(n, 1) if self.timing else None,
                f"backbone_forward_cpu_s_{per}": self.cpu_seconds / max(n, 1) if self.timing else None, f"backbone_calls_{per}": self.calls / max(n, 1),
                "backbones": len(self.backbones), "last_call": self.info}

    def remove(self):
        for bb in self.backbones:
            del bb.patch_features


def torch_autocast_state(x) -> str | None:
    import torch
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return str(torch.get_autocast_dtype("cuda"))
    return None


def install_probe(net, sync, timing: bool = True) -> _Probe | None:
    probe = _Probe(net, sync, timing)
    return probe if probe.backbones else None


def dino_probe(trainer, batches, sync) -> dict | None:
    """Extra train steps with the backbone timer on: backbone forward time and calls per step vs the whole step."""
    probe = install_probe(trainer.network, sync)
    if probe is None:
        return None
    steps, cpu = [], []
    for b in batches:
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train_step(b)
        sync()
        steps.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    out = probe.summary(len(batches), "per_step")
    out["probed_step_mean_s"] = statistics.fmean(steps)
    out["backbone_forward_share"] = out["backbone_forward_s_per_step"] / out["probed_step_mean_s"]
    out["probed_step_mean_cpu_s"] = statistics.fmean(cpu)
    out["backbone_forward_cpu_share"] = out["backbone_forward_cpu_s_per_step"] / out["probed_step_mean_cpu_s"]
    out["backbone_trainable_params"] = sum(p.numel() for bb in probe.backbones for p in bb.parameters()
                                           if p.requires_grad)
    probe.remove()
    return out


def worker(args: argparse.Namespace) -> dict:
    import resource

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    def rss_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB

    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    cls = recursive_find_trainer_class_by_name(args.worker)
    if cls is None:
        raise RuntimeError(f"Trainer {args.worker!r} not found in nnU-Net or nnUNet_extTrainer "
                           f"({os.environ.get('nnUNet_extTrainer')}).")
    pre = Path(args.preprocessed)
    plans = load_json(str(pre / f"{args.plans}.json"))
    dataset_json = load_json(str(pre / "dataset.json"))
    plans["continue_training"] = False  # nnunetv2 2.8's run_training passes this through the plans dict
    torch.manual_seed(0)
    np.random.seed(0)
    trainer = cls(plans=plans, configuration=args.configuration, fold=0, dataset_json=dataset_json, device=device)
    plans_batch = trainer.configuration_manager.batch_size
    trainer.configuration_manager.configuration["batch_size"] = args.batch_size  # identical for every arm
    trainer.initialize()
    rss_after_init = rss_mib()
    net = trainer.network
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)

    # ---- training step
    trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
    dl_train, dl_val = trainer.get_dataloaders()
    n = args.warmup + args.steps
    batches = [next(dl_train) for _ in range(n)]
    assert batches[0]["data"].shape[0] == args.batch_size, batches[0]["data"].shape
    patch = list(batches[0]["data"].shape[2:])
    net.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu_times = [], []
    for b in batches:
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train_step(b)
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    steady, steady_cpu = times[args.warmup:], cpu_times[args.warmup:]
    q = np.percentile(steady, [25, 50, 75])
    qc = np.percentile(steady_cpu, [25, 50, 75])
    train = {"median_s": float(q[1]), "iqr_s": [float(q[0]), float(q[2])], "mean_s": statistics.fmean(steady),
             "cpu_median_s": float(qc[1]), "cpu_iqr_s": [float(qc[0]), float(qc[2])],
             "n_steps": len(steady), "warmup_steps": args.warmup, "all_step_s": times, "all_step_cpu_s": cpu_times,
             "peak_rss_mib": rss_mib()}
    if cuda:
        train.update(peak_allocated_mib=torch.cuda.max_memory_allocated(device) / 2**20,
                     peak_reserved_mib=torch.cuda.max_memory_reserved(device) / 2**20)
    # ---- where the time goes: the DINO backbone's forward, measured in extra (untimed above) steps
    train["dino_probe"] = dino_probe(trainer, batches[: args.probe_steps], sync) if args.probe_steps else None
    del batches
    trainer.optimizer.zero_grad(set_to_none=True)

    # ---- inference through nnU-Net's predictor
    trainer.set_deep_supervision_enabled(False)
    net.eval()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=not args.disable_tta,
                                perform_everything_on_device=cuda, device=device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(net, trainer.plans_manager, trainer.configuration_manager,
                                    [{k: v.clone() for k, v in net.state_dict().items()}], trainer.dataset_json,
                                    trainer.__class__.__name__, trainer.inference_allowed_mirroring_axes)
    reader = trainer.plans_manager.image_reader_writer_class()
    n_files = args.infer_cases + args.infer_warmup
    files = sorted(Path(args.raw_images).glob("*_0000.nii.gz"))[:n_files]
    if len(files) < n_files:
        raise RuntimeError(f"Need {n_files} images in {args.raw_images}, found {len(files)}.")
    cases = [reader.read_images([str(f)]) for f in files]
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    per_case, per_case_cpu, shapes = [], [], []
    probe = None
    if args.probe_steps:  # on GPU only counts calls: synchronising around the backbone would distort the timing
        probe = install_probe(net, sync, timing=not cuda)
    for i, (img, props) in enumerate(cases):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        seg = predictor.predict_single_npy_array(img, props, None, None, False)
        sync()
        if i >= args.infer_warmup:
            per_case.append(time.perf_counter() - t0)
            per_case_cpu.append(time.process_time() - c0)
            shapes.append(list(seg.shape))
        elif probe is not None:
            probe.reset()
    infer_probe = None
    if probe is not None:
        infer_probe = probe.summary(len(per_case), "per_case")
        probe.remove()
    infer = {"dino_probe": infer_probe, "median_s_per_case": statistics.median(per_case), "mean_s_per_case": statistics.fmean(per_case),
             "cpu_median_s_per_case": statistics.median(per_case_cpu), "all_case_cpu_s": per_case_cpu,
             "n_cases": len(per_case), "all_case_s": per_case, "case_shapes": shapes,
             "cases": [f.name for f in files[args.infer_warmup:]], "warmup_cases": args.infer_warmup, "peak_rss_mib": rss_mib(), "mirroring": not args.disable_tta,
             "tile_step_size": 0.5}
    if cuda:
        infer.update(peak_allocated_mib=torch.cuda.max_memory_allocated(device) / 2**20,
                     peak_reserved_mib=torch.cuda.max_memory_reserved(device) / 2**20)
    guidance = {}
    inner = getattr(net, "_orig_mod", net)
    if hasattr(inner, "guidance"):
        ad = inner.guidance.adapter
        guidance = {"dino_arch": inner.guidance.backbone.arch.name, "vit_input_hw": list(ad.padded_hw),
                    "token_hw": list(ad.token_hw), "tokens": ad.token_hw[0] * ad.token_hw[1]}
    return {"trainer": args.worker, "class_module": cls.__module__, "plans_batch_size": plans_batch,
            "batch_size": args.batch_size, "patch_size": patch, "params_total": total, "params_trainable": trainable,
            "rss_after_initialize_mib": rss_after_init, "train_step": train, "inference": infer,
            "torch_threads": torch.get_num_threads(), "autocast": cuda, "device": str(device),
            "loadavg_after": os.getloadavg(), "guidance": guidance}


# ----------------------------------------------------------------------------------------------------------- parent
def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for pkg in ("torch", "nnunetv2", "timm", "peft", "numpy", "dynamic_network_architectures", "nnunet-dino"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def machine(device: str) -> dict:
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "hostname": platform.node()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines()
                                  if ln.startswith("Model name")), None)
    except OSError:
        pass
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0]
        info["mem_total_gib"] = round(int(mem.split()[1]) / 2**20, 1)
    except OSError:
        pass
    if device == "cuda":
        import torch
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def fmt_ratio(x, ref):
    return f"{x / ref:.2f}x" if ref else "n/a"


def markdown(results: dict) -> str:
    rows = results["results"]
    ref = next(r for r in rows if r["trainer"] == REFERENCE)
    cuda = results["device"] == "cuda"
    head = ["trainer", "params total (M)", "trainable (M)", "step wall s, median [IQR]", "x stock", "step CPU s",
            "x stock", "inference wall s/case", "x stock", "inference CPU s/case", "x stock",
            "GPU peak alloc/reserved train (MiB)" if cuda else "peak RSS (MiB)",
            "GPU peak alloc/reserved infer (MiB)" if cuda else None,
            "DINO fwd calls/step", "DINO fwd share of step CPU" if not cuda else "DINO fwd share of step",
            "DINO token grid"]
    head = [h for h in head if h is not None]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rts, rti = ref["train_step"], ref["inference"]
    for r in rows:
        ts, inf = r["train_step"], r["inference"]
        cells = [f"`{r['trainer']}`", f"{r['params_total'] / 1e6:.2f}", f"{r['params_trainable'] / 1e6:.2f}",
                 f"{ts['median_s']:.3f} [{ts['iqr_s'][0]:.3f}, {ts['iqr_s'][1]:.3f}]",
                 fmt_ratio(ts["median_s"], rts["median_s"]),
                 f"{ts['cpu_median_s']:.3f}", fmt_ratio(ts["cpu_median_s"], rts["cpu_median_s"]),
                 f"{inf['median_s_per_case']:.2f}", fmt_ratio(inf["median_s_per_case"], rti["median_s_per_case"]),
                 f"{inf['cpu_median_s_per_case']:.2f}",
                 fmt_ratio(inf["cpu_median_s_per_case"], rti["cpu_median_s_per_case"])]
        if cuda:
            cells += [f"{ts['peak_allocated_mib']:.0f} / {ts['peak_reserved_mib']:.0f}",
                      f"{inf['peak_allocated_mib']:.0f} / {inf['peak_reserved_mib']:.0f}"]
        else:  # ru_maxrss never decreases: one process-lifetime peak (training, then inference)
            cells += [f"{max(ts['peak_rss_mib'], inf['peak_rss_mib']):.0f}"]
        pr = ts.get("dino_probe")
        if pr:
            grid = pr["last_call"]["token_grid"] if pr["last_call"] else None
            share = pr["backbone_forward_share"] if cuda else pr["backbone_forward_cpu_share"]
            cells += [f"{pr['backbone_calls_per_step']:.0f}", f"{100 * share:.0f}%",
                      f"{grid[0]}x{grid[1]}" if grid else "?"]
        else:
            cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    r0 = rows[0]
    note = (f"\n{results['date_utc']}, device {results['device']}, {results['threads']} torch thread(s), "
            f"batch {r0['batch_size']} x patch {r0['patch_size']} (plans' batch {r0['plans_batch_size']}), "
            f"{r0['train_step']['n_steps']} timed steps after {r0['train_step']['warmup_steps']} warm-up, "
            f"{r0['inference']['n_cases']} inference case(s) after {r0['inference']['warmup_cases']} warm-up, "
            f"mirroring {'on' if r0['inference']['mirroring'] else 'off'}, load average before "
            f"{', '.join(f'{x:.1f}' for x in results['loadavg_before'])}, **random DINO weights**.")
    return "\n".join(lines) + "\n" + note + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preprocessed", type=Path, help="nnUNet_preprocessed/DatasetXXX_Name (required)")
    ap.add_argument("--raw-images", type=Path, help="folder of raw test images (*_0000.nii.gz) (required)")
    ap.add_argument("--plans", default="nnUNetPlans")
    ap.add_argument("--configuration", default="2d")
    ap.add_argument("--trainers", nargs="+", default=DEFAULT_TRAINERS)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2, help="torch threads, the same for every arm (CPU)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--infer-cases", type=int, default=5)
    ap.add_argument("--infer-warmup", type=int, default=1, help="untimed inference cases first")
    ap.add_argument("--disable-tta", action="store_true", help="no mirroring at inference (nnUNetv2_predict "
                    "--disable_tta); default: mirroring on, as nnUNetv2_predict")
    ap.add_argument("--probe-steps", type=int, default=3,
                    help="extra train steps timing the DINO backbone's forward (0: off); also probes inference")
    ap.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--tag", default=None, help="file name stem of the outputs (default: cost_<device>)")
    ap.add_argument("--render", type=Path, help="only re-render the markdown table of an existing results JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.render:
        print(markdown(json.loads(args.render.read_text())))
        return
    if args.preprocessed is None or args.raw_images is None:
        ap.error("--preprocessed and --raw-images are required")
    if args.worker:
        result = worker(args)
        Path(args.worker_out).write_text(json.dumps(result, indent=2))
        return

    weights = os.environ.get("nnUNet_dino_weights", "random")
    if weights != "random":
        print(f"Note: nnUNet_dino_weights={weights} is ignored: the cost benchmark never loads DINO weights.")
    ext = os.pathsep.join([str(BENCH_TRAINERS)] + [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep)
                                                   if p])
    if REFERENCE not in args.trainers:
        raise SystemExit(f"The trainer list must contain the reference {REFERENCE} (ratios are to stock nnU-Net).")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda, but torch sees no CUDA device.")
    results = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "device": args.device, "threads": args.threads, "dino_weights": "random DINO weights",
               "machine": machine(args.device), "versions": versions(), "args": {k: str(v) for k, v in
                                                                                 vars(args).items()},
               "loadavg_before": os.getloadavg(), "results": []}
    with tempfile.TemporaryDirectory(prefix="nnunet_dino_bench_") as tmp:
        env = dict(os.environ, nnUNet_extTrainer=ext, nnUNet_dino_weights="random", nnUNet_compile="f",
                   nnUNet_n_proc_DA="0", nnUNet_def_n_proc=str(args.threads),
                   nnUNet_preprocessed=str(args.preprocessed.parent), nnUNet_results=str(Path(tmp) / "results"),
                   nnUNet_raw=str(Path(tmp) / "raw"))
        for name in args.trainers:
            out = Path(tmp) / f"{name}.json"
            skip = ("worker", "worker_out", "trainers", "out_dir", "tag", "disable_tta", "render")
            cmd = [sys.executable, __file__, "--worker", name, "--worker-out", str(out)] + [
                a for k, v in vars(args).items() if k not in skip for a in (f"--{k.replace('_', '-')}", str(v))] + (
                ["--disable-tta"] if args.disable_tta else [])
            print(f"[{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}] {name} ...", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"Worker for {name} failed (exit {proc.returncode}):\n{proc.stdout[-5000:]}")
            r = json.loads(out.read_text())
            r["worker_wall_s"] = time.perf_counter() - t0
            results["results"].append(r)
            write_outputs(args, results, final=False)
            print(f"    train step {r['train_step']['median_s']:.3f} s (CPU {r['train_step']['cpu_median_s']:.3f} s), "
                  f"inference {r['inference']['median_s_per_case']:.2f} s/case, params "
                  f"{r['params_trainable'] / 1e6:.2f}/{r['params_total'] / 1e6:.2f} M, load {os.getloadavg()[0]:.1f}",
                  flush=True)
    write_outputs(args, results, final=True)


def write_outputs(args, results: dict, final: bool) -> None:
    """After every arm (a partial table survives an interrupted run), and at the end."""
    results["complete"] = final
    md = markdown(results) if any(r["trainer"] == REFERENCE for r in results["results"]) else ""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.tag or f"cost_{args.device}"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (args.out_dir / f"{stem}.md").write_text(md + ("" if final else "\n(partial: run still in progress)\n"))
    if final:
        print("\n" + md)
        print(f"Wrote {args.out_dir / (stem + '.json')} and {args.out_dir / (stem + '.md')}")


if __name__ == "__main__":
    main()
