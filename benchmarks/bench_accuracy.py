"""Accuracy benchmark: stock nnU-Net vs GuiDINO, same plans, same schedule, stock commands, held-out test set.

    python benchmarks/bench_accuracy.py --work /tmp/bench_work            # both arms (resumes / skips finished steps)
    python benchmarks/bench_accuracy.py --work /tmp/bench_work --arms stock
    python benchmarks/bench_accuracy.py --work /tmp/other -d 992 --raw /path/to/nnUNet_raw   # any dataset with
                                                                                            # imagesTs + labelsTs

Steps, each a stock nnU-Net command in a subprocess (as a user would run it); DATASET = -d (default 4,
Dataset004_Hippocampus):
  1. nnUNetv2_plan_and_preprocess -d DATASET -c CONF          (CONF = -c, default 2d; also 3d_fullres: the same
                                                              trainer names train 3D; skipped if the data exist)
  2. per arm: nnUNetv2_train DATASET CONF 0 -tr <arm trainer> -device <dev> (benchmarks/trainers/nnUNetTrainerBench.py:
     identical epochs x iterations x batch for both arms; resumed with --c from checkpoint_latest.pth; skipped if
     checkpoint_final.pth exists)
  3. nnUNetv2_predict on imagesTs with fold 0's final checkpoint (skipped if already complete)
  4. nnUNetv2_evaluate_folder against labelsTs -> per-class Dice
Training and prediction run under ``nice -n <niceness>`` so the machine's other work keeps priority.

The DINO weights are whatever ``nnUNet_dino_weights`` says; unset, they are random (``random``) and every result
this script writes is labelled "random DINO weights". Results: <work>/accuracy_results.json and a markdown table on
stdout (and in --out if given).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from nnunet_dino.cli.stock_pipeline import command, evaluate, nnunet_environment  # noqa: E402

BENCH_TRAINERS = Path(__file__).resolve().parent / "trainers"
ARMS = {"stock": "nnUNetTrainerBenchStock", "guidino": "nnUNetTrainerBenchGuiDINO"}


def dataset_folder(raw: Path, dataset: str) -> Path:
    """The raw folder of ``dataset`` (an id like 4 / 004 or a full name like Dataset004_Hippocampus)."""
    if dataset.isdigit():
        found = sorted(raw.glob(f"Dataset{int(dataset):03d}_*"))
        if len(found) != 1:
            raise SystemExit(f"Dataset id {dataset}: expected one Dataset{int(dataset):03d}_* folder in {raw}, "
                             f"found {[f.name for f in found]}.")
        return found[0]
    folder = raw / dataset
    if not folder.is_dir():
        raise SystemExit(f"No dataset folder {folder}.")
    return folder


def label_names(raw_dataset: Path) -> dict[str, str]:
    """Foreground label value (as nnU-Net's summary.json keys it) -> name from dataset.json."""
    labels = json.loads((raw_dataset / "dataset.json").read_text())["labels"]
    return {str(v): k for k, v in labels.items() if isinstance(v, int) and v != 0 and k != "ignore"}


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S} UTC] {msg}", flush=True)


def streamed(args: list[str], env: dict, logfile: Path) -> float:
    """Run a command with its output appended to a log file as it comes; return its wall time; raise on failure."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(logfile, "a") as f:
        f.write(f"\n$ {' '.join(args)}\n")
        f.flush()
        rc = subprocess.call(args, env=env, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise RuntimeError(f"{' '.join(args)} failed with exit code {rc}; see {logfile}")
    return time.perf_counter() - t0


def snapshot_code(dest: Path) -> dict:
    """Copy the plugin package and the trainers the arms need to ``dest`` (once; reused when resuming), so a run of
    an hour is not broken, or silently changed, by edits to the checkout while it runs. Returns what was copied."""
    if not (dest / "nnunet_dino").is_dir():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(REPO / "nnunet_dino", tmp / "nnunet_dino", ignore=ignore)
        (tmp / "trainers").mkdir()
        for name in ("NNUNET_DINO_TRAINERS", "nnUNetTrainerGuiDINO.py"):
            shutil.copy2(REPO / "trainers" / name, tmp / "trainers" / name)
        shutil.copytree(BENCH_TRAINERS, tmp / "bench_trainers", ignore=ignore)
        git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--short"], capture_output=True, text=True).stdout
        (tmp / "SNAPSHOT.json").write_text(json.dumps({
            "source": str(REPO), "git_head": git.strip(), "git_status_short": dirty.splitlines(),
            "taken_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}, indent=2))
        # The snapshot must import (the checkout may be mid-edit): fail now, not an hour into the run.
        subprocess.run([sys.executable, "-c", "import nnunet_dino.training, nnunet_dino.backbone"],
                       env=dict(os.environ, PYTHONPATH=str(tmp)), check=True)
        tmp.rename(dest)
    return json.loads((dest / "SNAPSHOT.json").read_text())


def bench_schedule(trainers_folder: Path) -> dict:
    """The schedule both arms' trainers use: nnUNetTrainerBench.py (in ``trainers_folder``, the snapshot's) reads
    it from the nnUNet_bench_* environment at import, and the training subprocesses inherit this environment."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bench_trainers", trainers_folder / "nnUNetTrainerBench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {"epochs": module.BENCH_EPOCHS, "iterations": module.BENCH_ITERATIONS,
            "val_iterations": module.BENCH_VAL_ITERATIONS, "batch": module.BENCH_BATCH}


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def save_results(path: Path, results: dict, own_arms: list[str]) -> None:
    """Merge into the file as it is now: this instance's arms from ``results``, every other arm from the file, so
    instances running different --arms at the same time never overwrite each other."""
    current = load_results(path)
    arms = current.get("arms", {})
    arms.update({a: results["arms"][a] for a in own_arms if a in results["arms"]})
    for a, rec in arms.items():
        if a not in own_arms:
            results["arms"][a] = rec
    merged = dict(current, **{k: v for k, v in results.items() if k != "arms"})
    merged["arms"] = arms
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=2))
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", type=Path, default=Path(os.environ.get("nnUNet_raw", "/work/shared/data/nnUNet_raw")),
                    help="nnUNet_raw folder holding the dataset, imagesTs and labelsTs included (default: $nnUNet_raw)")
    ap.add_argument("-d", "--dataset", default="4", help="dataset id or name (default 4: Dataset004_Hippocampus)")
    ap.add_argument("--work", type=Path, required=True, help="nnUNet_preprocessed/_results and predictions go here")
    ap.add_argument("-c", "--configuration", default="2d",
                    help="nnU-Net configuration both arms train and predict (default 2d; e.g. 3d_fullres)")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--niceness", type=int, default=15)
    ap.add_argument("--disable-tta", action="store_true",
                    help="predict without test-time mirroring (nnUNetv2_predict --disable_tta), for every arm")
    ap.add_argument("--out", type=Path, help="also write the results JSON here")
    ap.add_argument("--no-snapshot", action="store_true",
                    help="run the checkout's code directly instead of a copy taken at the first run")
    args = ap.parse_args()
    raw_dataset = dataset_folder(args.raw, args.dataset)
    DATASET, dataset_id = raw_dataset.name, str(int(raw_dataset.name[7:10]))
    labels = label_names(raw_dataset)
    file_ending = json.loads((raw_dataset / "dataset.json").read_text())["file_ending"]
    for sub in ("imagesTs", "labelsTs"):
        if not (raw_dataset / sub).is_dir():
            raise SystemExit(f"{raw_dataset / sub} is missing: this benchmark evaluates a held-out test set.")

    weights = os.environ.get("nnUNet_dino_weights", "random")
    bench_trainers, extra = BENCH_TRAINERS, {}
    snapshot = None
    if not args.no_snapshot:
        snap_dir = args.work / "code_snapshot"
        snapshot = snapshot_code(snap_dir)
        bench_trainers = snap_dir / "bench_trainers"
        # PYTHONPATH precedes site-packages: the start-up hook then registers the snapshot's trainers folder.
        extra["PYTHONPATH"] = os.pathsep.join([str(snap_dir)] + [p for p in os.environ.get("PYTHONPATH", "").split(
            os.pathsep) if p])
    ext = os.pathsep.join([str(bench_trainers)] + [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep)
                                                   if p])
    env = nnunet_environment(args.raw, args.work, nnUNet_extTrainer=ext, nnUNet_dino_weights=weights, **extra)
    nice = ["nice", "-n", str(args.niceness)] if args.niceness else []
    logs = args.work / "logs"
    results_file = args.work / "accuracy_results.json"
    results = load_results(results_file)
    conf = args.configuration
    results.update(dataset=DATASET, configuration=conf, fold=0, device=args.device, dino_weights=weights,
                   test_time_mirroring=not args.disable_tta,
                   dino_weights_label="random DINO weights" if weights == "random" else weights)
    results.setdefault("arms", {})
    results["code_snapshot"] = snapshot

    pre = args.work / "nnUNet_preprocessed" / DATASET
    plans_file = pre / "nnUNetPlans.json"
    data_identifier = (json.loads(plans_file.read_text())["configurations"].get(conf, {}).get("data_identifier")
                       if plans_file.exists() else None)
    if data_identifier is None or not (pre / data_identifier).is_dir():
        log(f"planning and preprocessing ({conf})")
        streamed(nice + [command("nnUNetv2_plan_and_preprocess"), "-d", dataset_id, "-c", conf, "-np", "1"], env,
                 logs / f"plan_and_preprocess_{conf}.log")

    for arm in args.arms:
        trainer = ARMS[arm]
        rec = results["arms"].setdefault(arm, {"trainer": trainer})
        fold_dir = args.work / "nnUNet_results" / DATASET / f"{trainer}__nnUNetPlans__{conf}" / "fold_0"
        if not (fold_dir / "checkpoint_final.pth").exists():
            resume = ["--c"] if (fold_dir / "checkpoint_latest.pth").exists() else []
            log(f"{arm}: training {trainer}{' (resuming)' if resume else ''}; log {logs / f'train_{arm}.log'}")
            train_env = dict(env, nnUNet_n_proc_DA="0") if args.device == "cpu" else env
            seconds = streamed(nice + [command("nnUNetv2_train"), dataset_id, conf, "0", "-tr", trainer, "-device",
                                       args.device, *resume], train_env, logs / f"train_{arm}.log")
            rec["train_wall_s"] = rec.get("train_wall_s", 0.0) + seconds
            save_results(results_file, results, args.arms)
        log(f"{arm}: trained")
        pred = args.work / "predictions" / arm
        n_test = len(list((args.raw / DATASET / "imagesTs").glob(f"*_0000{file_ending}")))  # one file per case
        if not (pred / "summary.json").exists() or len(list(pred.glob(f"*{file_ending}"))) != n_test:
            log(f"{arm}: predicting {n_test} test cases")
            seconds = streamed(nice + [command("nnUNetv2_predict"), "-i", str(args.raw / DATASET / "imagesTs"), "-o",
                                       str(pred), "-d", dataset_id, "-c", conf, "-tr", trainer, "-f", "0", "-device",
                                       args.device, "-npp", "1", "-nps", "1",
                                       *(["--disable_tta"] if args.disable_tta else [])], env,
                               logs / f"predict_{arm}.log")
            rec["predict_wall_s"] = seconds
            rec["predict_cases"] = n_test
            summary = evaluate(args.raw / DATASET / "labelsTs", pred, env)
        else:
            summary = json.loads((pred / "summary.json").read_text())
        rec["dice"] = {labels.get(k, k): v["Dice"] for k, v in summary["mean"].items()}
        rec["dice"]["mean"] = summary["foreground_mean"]["Dice"]
        rec["n_cases"] = len(summary["metric_per_case"])
        rec["summary_json"] = str(pred / "summary.json")
        plans = json.loads((fold_dir.parent / "plans.json").read_text())
        rec["plans_batch_size"] = plans["configurations"][conf]["batch_size"]  # the arms' trainers set their own
        rec["patch_size"] = plans["configurations"][conf]["patch_size"]
        rec["bench_schedule"] = bench_schedule(bench_trainers)
        save_results(results_file, results, args.arms)
        log(f"{arm}: Dice {rec['dice']}")

    results["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    save_results(results_file, results, args.arms)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    print(f"\nAccuracy, {DATASET} {conf} fold 0, test set via nnUNetv2_evaluate_folder "
          f"({results['dino_weights_label']}):\n")
    names = list(labels.values())
    print("| arm | trainer | " + " | ".join(f"Dice {n}" for n in names) + " | mean Dice | train wall (s) | "
          "predict wall (s) |")
    print("|---|---|" + "---|" * len(names) + "---|---|---|")
    for arm, rec in results["arms"].items():
        if "dice" in rec:
            d = rec["dice"]
            print(f"| {arm} | {rec['trainer']} | " + " | ".join(f"{d[n]:.4f}" for n in names) + f" | {d['mean']:.4f} | "
                  f"{rec.get('train_wall_s', float('nan')):.0f} | {rec.get('predict_wall_s', float('nan')):.0f} |")


if __name__ == "__main__":
    main()
