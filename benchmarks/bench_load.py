"""Load time and peak memory of ``load_backbone``: one fresh process per load, so ``ru_maxrss`` is that load's peak.

    python benchmarks/bench_load.py --synthetic dinov3_vitb16 dinov3_vitl16 dinov2_vitl14 --repeats 3
    python benchmarks/bench_load.py --weights /path/to/dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth
    python benchmarks/bench_load.py --synthetic dinov3_vitb16 --code-dir /tmp/previous_checkout  # another version

Weights: ``--weights`` (any file or folder ``load_backbone`` reads; ``--arch`` for a folder of Meta-named files) or
``--synthetic ARCH ...``: real-size random weights in Meta's .pth layout, written once into ``--work`` with the test
suite's own helpers (tests/conftest.py: a Hugging Face model with random weights converted to Meta's keys; ViT-L
takes ~1.2 GB per copy and a few GB while being written).

Each repeat runs ``load_backbone(arch, weights=...)`` in a new Python process, after the imports, and reports wall and
CPU time (``time.process_time``) of the call, the peak RSS before and after it (``ru_maxrss`` and Linux's VmHWM;
the difference is what loading costs on top of an imported torch/timm/nnunet_dino), the file size, and which
``nnunet_dino`` was imported.
``--code-dir`` puts another checkout first on the workers' PYTHONPATH (e.g. ``git archive <commit> | tar -x -C DIR``)
to measure the loader of another version with the same files and settings. ``--threads`` torch threads per worker.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
META_NAMES = {"dinov3": "{arch}_pretrain_lvd1689m", "dinov2": "{arch}_pretrain.pth"}


# ----------------------------------------------------------------------------------------------------------- worker
def worker(path: str, arch: str | None, threads: int) -> dict:
    import resource
    import time

    import torch

    torch.set_num_threads(threads)
    import nnunet_dino
    from nnunet_dino.backbone import load_backbone

    rss_before, hwm_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, vm_hwm_kib()
    t0, c0 = time.perf_counter(), time.process_time()
    backbone = load_backbone(arch, weights=path)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rss_after, hwm_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, vm_hwm_kib()
    params = sum(p.numel() for p in backbone.parameters())
    return {"arch": backbone.arch.name, "wall_s": wall, "cpu_s": cpu, "rss_before_mib": rss_before / 1024,
            "rss_peak_mib": rss_after / 1024, "rss_increase_mib": (rss_after - rss_before) / 1024,
            "vm_hwm_before_mib": hwm_before / 1024, "vm_hwm_mib": hwm_after / 1024,
            "params_m": params / 1e6, "weights_mib": params * 4 / 2**20, "nnunet_dino": nnunet_dino.__file__}


def vm_hwm_kib() -> int:
    """The process's peak RSS since its exec (Linux /proc VmHWM). ru_maxrss can instead start at the RSS of the
    forked parent (the kernel carries the pre-exec high-water mark over), so both are recorded."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("No VmHWM in /proc/self/status (Linux only).")


# ----------------------------------------------------------------------------------------------------------- files
def synthetic_file(arch_name: str, work: Path) -> Path:
    """Real-size random weights of ``arch_name`` in Meta's layout, written by a child process (so that this parent,
    which forks the measured workers, stays small), reused when already written."""
    folder = work / arch_name
    existing = sorted(folder.glob("*.pth")) if folder.exists() else []
    if not existing:
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--write-synthetic", arch_name,
                              "--work", str(work)], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"writing synthetic {arch_name} weights failed:\n{out.stderr[-3000:]}")
        existing = sorted(folder.glob("*.pth"))
    return existing[0]


def write_synthetic_file(arch_name: str, work: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    import torch
    from conftest import hf_dinov2, hf_dinov3, hub_state, meta_dinov2_state, meta_dinov3_state, save_meta_named

    from nnunet_dino.backbone import get_architecture

    arch = get_architecture(arch_name)
    folder = work / arch_name
    if arch.swiglu:
        raise SystemExit(f"--synthetic supports the non-SwiGLU architectures only, not {arch_name}.")
    common = dict(dim=arch.embed_dim, depth=arch.depth, heads=arch.num_heads, seed=0)
    if arch.family == "dinov3":
        hf = hf_dinov3(intermediate=4 * arch.embed_dim, **common)
        state = meta_dinov3_state(hf, hub_state(hf, folder / "hf"))
        path = save_meta_named(state, folder, META_NAMES["dinov3"].format(arch=arch_name))
    else:
        hf = hf_dinov2(registers=arch.num_registers, **common)
        state = meta_dinov2_state(hf, hub_state(hf, folder / "hf"))
        path = folder / META_NAMES["dinov2"].format(arch=arch_name)
        torch.save(state, path)
    for f in (folder / "hf").iterdir():  # only the Meta file is measured
        f.unlink()
    (folder / "hf").rmdir()
    return path


# ----------------------------------------------------------------------------------------------------------- parent
def run_worker(path: Path, arch: str | None, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if args.code_dir:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(args.code_dir).resolve()), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(path), "--threads", str(args.threads)]
    if arch:
        cmd += ["--arch", arch]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=args.code_dir or REPO)
    if out.returncode != 0:
        raise SystemExit(f"worker failed for {path}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(path: Path, runs: list[dict]) -> dict:
    first = runs[0]
    return {"file": str(path), "file_mib": path.stat().st_size / 2**20 if path.is_file() else None,
            "arch": first["arch"], "params_m": first["params_m"], "weights_mib": first["weights_mib"],
            "nnunet_dino": first["nnunet_dino"], "repeats": len(runs),
            "wall_s_median": statistics.median(r["wall_s"] for r in runs),
            "cpu_s_median": statistics.median(r["cpu_s"] for r in runs),
            "rss_peak_mib_max": max(r["rss_peak_mib"] for r in runs),
            "rss_increase_mib_median": statistics.median(r["rss_increase_mib"] for r in runs),
            "vm_hwm_mib_max": max(r["vm_hwm_mib"] for r in runs),
            "vm_hwm_before_mib_median": statistics.median(r["vm_hwm_before_mib"] for r in runs), "runs": runs}


def markdown(rows: list[dict]) -> str:
    lines = ["| arch | params (M) | file (MiB) | load wall s (median) | load CPU s (median) | peak RSS, ru_maxrss "
             "(MiB) | peak RSS, VmHWM (MiB) | VmHWM after the imports, before the load (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['params_m']:.1f} | {r['file_mib']:.0f} | {r['wall_s_median']:.2f} | "
                     f"{r['cpu_s_median']:.2f} | {r['rss_peak_mib_max']:.0f} | {r['vm_hwm_mib_max']:.0f} | "
                     f"{r['vm_hwm_before_mib_median']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", nargs="+", help="weight files/folders to load")
    src.add_argument("--synthetic", nargs="+", metavar="ARCH", help="write and load real-size random Meta files")
    p.add_argument("--arch", help="architecture name (needed for a folder of Meta-named files)")
    p.add_argument("--work", default="/tmp/nnunet_dino_bench_load", help="where --synthetic files are written")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--code-dir", help="measure the nnunet_dino of this checkout instead of this one")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--write-synthetic", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.write_synthetic:
        print(write_synthetic_file(args.write_synthetic, Path(args.work)))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.arch, args.threads)))
        return
    if not (args.weights or args.synthetic):
        p.error("give --weights or --synthetic")
    targets = ([(Path(w), args.arch) for w in args.weights] if args.weights else
               [(synthetic_file(a, Path(args.work)), a) for a in args.synthetic])
    rows = [summarise(path, [run_worker(path, arch, args) for _ in range(args.repeats)]) for path, arch in targets]
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
              "load_average": os.getloadavg(), "threads": args.threads, "code_dir": args.code_dir, "rows": rows}
    print(markdown(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
