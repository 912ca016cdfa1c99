"""Guide-utility benchmark: does information in the guide reach GuiDINO's prediction?

Trains, with the SAME schedule and seeds, stock nnU-Net and GuiDINO with guides of known information content
(arms: see ARMS and guide_utility_arms.py), on any preprocessed nnU-Net dataset and configuration (2d, or 3D such as
3d_fullres: GuiDINO's slice-wise branch, with the known guides made per plane), then evaluates
every arm on the fold's validation cases (never trained on) in nnU-Net's preprocessed space, with nnU-Net's own
sliding-window predictor, three times: with the real guide, with the guide of another case ("shuffled") and with a
spatially constant guide ("constant"). Guide reliance = Dice(real) - Dice(replaced).

    export nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=/unused   # results go under --work
    nnUNetv2_plan_and_preprocess -d 4 -c 2d -np 1                             # once
    python benchmarks/bench_guide_utility.py -d 4 --work /tmp/gu --seeds 0 1 2 --jobs 2
    python benchmarks/bench_guide_utility.py -d 4 -c 3d_fullres --work /tmp/gu3d --batch 2   # after -c 3d_fullres

DINO weights for the arms that run the real ViT (``vit``, ``vit_paper``): ``nnUNet_dino_weights`` as for any
GuiDINO training; unset, the script uses ``random`` (realistic-scale random weights) and labels the results so.
Idempotent: a finished (arm, seed) is skipped; results: <work>/guide_utility.json and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent

# arm -> (guide source kind, trainer attribute overrides). "stock" is nnU-Net's own trainer.
ARMS: dict[str, tuple[str | None, dict]] = {
    "stock": (None, {}),
    "oracle": ("oracle", {}),
    "oracle_blurred": ("oracle_blurred", {}),
    "oracle_coarse": ("oracle_coarse", {}),
    "oracle_noisy": ("oracle_noisy", {}),
    "tokens": ("tokens", {}),
    "tokens_sgd": ("tokens", {"guidance_optimizer": "sgd", "lr_guidance": 1e-2, "lr_lora": 1e-3}),
    "tokens_paper": ("tokens", {"paper": True}),
    "noise_tokens": ("noise_tokens", {}),
    "vit": ("image", {}),
    "vit_paper": ("image", {"paper": True}),
}
DEFAULT_ARMS = ["stock", "oracle", "oracle_blurred", "oracle_coarse", "oracle_noisy", "tokens", "tokens_sgd",
                "tokens_paper", "noise_tokens", "vit"]


def trainer_class(arm: str, args):
    from nnunet_dino.guidance import TokenBookConfig
    from guide_utility_arms import BenchGuidedTrainer, BenchStockTrainer

    kind, overrides = ARMS[arm]
    schedule = dict(bench_epochs=args.epochs, bench_iterations=args.iterations,
                    bench_val_iterations=args.val_iterations, bench_batch=args.batch)
    if kind is None:
        return type(f"nnUNetTrainerGU_{arm}", (BenchStockTrainer,), schedule)
    overrides = dict(overrides)
    guidino = replace(BenchGuidedTrainer.guidino, min_short_side_tokens=args.min_tokens)
    if overrides.pop("paper", False):
        guidino = replace(guidino, tokenbook=TokenBookConfig(mode="paper"), gate_places=("bottleneck",),
                          gate_mode="multiplicative")
    return type(f"nnUNetTrainerGU_{arm}", (BenchGuidedTrainer,),
                dict(schedule, guide_kind=kind, guidino=guidino, **overrides))


# ------------------------------------------------------------------------------------------------ one run
def run_one(arm: str, seed: int, args) -> dict:
    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunet_dino.training.dino_trainer_base import unwrap

    from guide_utility_arms import fit_to_shape

    torch.set_num_threads(args.threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    name = maybe_convert_to_dataset_name(args.dataset)
    pre = Path(os.environ["nnUNet_preprocessed"]) / name
    plans, dataset_json = load_json(pre / f"{args.plans}.json"), load_json(pre / "dataset.json")
    plans["continue_training"] = False  # nnU-Net 2.8 reads it from the plans dict, as nnUNetv2_train passes it
    cls = trainer_class(arm, args)
    trainer = cls(plans, args.configuration, args.fold, dataset_json, device=torch.device(args.device))
    if trainer.label_manager.has_regions:
        raise SystemExit(f"{name} is trained with regions; this benchmark evaluates label datasets only.")
    t0 = time.time()
    trainer.run_training()
    train_s = time.time() - t0

    trainer.set_deep_supervision_enabled(False)  # as nnU-Net's own final validation does
    net = unwrap(trainer.network).eval()
    lm = trainer.label_manager
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device(args.device),
                                allow_tqdm=False)
    predictor.manual_initialization(net, trainer.plans_manager, trainer.configuration_manager, None, dataset_json,
                                    cls.__name__, None)
    _, val_keys = trainer.do_split()
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, val_keys)
    cases = [dataset.load_case(k)[:2] for k in val_keys]
    cases = [(np.asarray(d, dtype=np.float32), np.asarray(s)) for d, s in cases]
    kind = getattr(cls, "guide_kind", None)
    conditions = ["real"] if kind is None else ["real", "shuffled", "constant"]
    dice = {c: [] for c in conditions}
    ignore = lm.ignore_label if lm.has_ignore_label else None
    three_d = len(trainer.configuration_manager.patch_size) == 3
    for i, (data, seg) in enumerate(cases):
        for condition in conditions:
            x = torch.from_numpy(data)
            if kind is not None:
                src_data, src_seg = cases[(i + 1) % len(cases)] if condition == "shuffled" else (data, seg)
                source = _source_volume(kind, src_data, src_seg, lm, ignore, three_d)
                x = torch.cat([x, torch.from_numpy(fit_to_shape(source, data.shape[1:]))], 0)
            net.ablation = "constant" if condition == "constant" else None
            with torch.no_grad():
                logits = predictor.predict_sliding_window_return_logits(x).float()
            dice[condition].append(case_dice(logits, seg, lm))
    result = {"arm": arm, "seed": seed, "guide_kind": kind, "train_seconds": round(train_s, 1),
              "validation_cases": len(cases)}
    for condition, per_case in dice.items():
        per_class = np.nanmean(np.array(per_case), 0)
        result[f"dice_{condition}"] = float(np.nanmean(per_class))
        result[f"dice_{condition}_per_class"] = [float(v) for v in per_class]
    log = trainer.logger.local_logger.my_fantastic_logging
    for name_ in ("shuffled", "constant"):
        values = log.get(f"val_guide_reliance_{name_}", [])
        result[f"logged_reliance_{name_}_last_epoch"] = float(values[-1]) if values else None
    result["dino_weights"] = os.environ.get("nnUNet_dino_weights", "random")
    return result


def _source_volume(kind, data, seg, lm, ignore, three_d: bool):
    """The guide-source channels of a whole preprocessed case (C, Z, Y, X), as guide_source makes them for batches
    (2D: each Z slice is one sample; 3D: the case is one)."""
    import numpy as np
    import torch

    from guide_utility_arms import guide_source

    if kind == "image":
        return data
    seg = torch.from_numpy(np.asarray(seg, dtype=np.int64)).clamp_min(0)  # (1, Z, Y, X)
    if three_d:
        return guide_source(kind, None, seg[None], lm.num_segmentation_heads, False, ignore)[0].numpy().astype(
            np.float32)
    slices = seg.permute(1, 0, 2, 3)  # (Z, 1, Y, X)
    onehot = guide_source(kind, None, slices, lm.num_segmentation_heads, False, ignore)  # (Z, K, Y, X)
    return onehot.permute(1, 0, 2, 3).numpy().astype(np.float32)


def case_dice(logits, seg, lm):
    """Per-class Dice of one case (NaN where prediction and reference are both empty), labels or regions."""
    import numpy as np

    prediction = logits.argmax(0).numpy()
    reference = np.asarray(seg[0])
    out = []
    for label in lm.foreground_labels:
        p, r = prediction == label, reference == label
        if lm.has_ignore_label:
            valid = reference != lm.ignore_label
            p, r = p & valid, r & valid
        denom = p.sum() + r.sum()
        out.append(np.nan if denom == 0 else 2 * (p & r).sum() / denom)
    return out


# ------------------------------------------------------------------------------------------------ driver
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name (preprocessed for -c)")
    p.add_argument("-c", "--configuration", default="2d", help="2d or a 3D configuration (e.g. 3d_fullres)")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("-f", "--fold", type=int, default=0)
    p.add_argument("--work", required=True, type=Path, help="results and per-run nnUNet_results folders")
    p.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--iterations", type=int, default=40, help="training iterations per epoch")
    p.add_argument("--val-iterations", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--min-tokens", type=int, default=8, help="DINO tokens on the patch's short side")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (subprocesses)")
    p.add_argument("--run-one", nargs=2, metavar=("ARM", "SEED"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _schedule(args) -> dict:
    return dict(dataset=str(args.dataset), configuration=args.configuration, plans=args.plans, fold=args.fold,
                epochs=args.epochs, iterations=args.iterations, val_iterations=args.val_iterations, batch=args.batch,
                min_tokens=args.min_tokens, device=args.device)


def _launch(arm: str, seed: int, args) -> Path:
    out = args.work / "runs" / f"{arm}_seed{seed}.json"
    if out.exists():
        return out
    env = dict(os.environ, nnUNet_results=str(args.work / "results" / f"seed{seed}"), nnUNet_n_proc_DA="0",
               OMP_NUM_THREADS=str(args.threads), nnUNet_compile="f")
    env.setdefault("nnUNet_dino_weights", "random")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-one", arm, str(seed)] + sys.argv[1:]
    log = args.work / "logs" / f"{arm}_seed{seed}.log"
    with open(log, "w") as f:
        rc = subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=HERE)
    if rc != 0:
        raise RuntimeError(f"{arm} seed {seed} failed (exit {rc}); see {log}")
    return out


def render(results: dict) -> str:
    import numpy as np

    rows = ["| arm | guide | Dice (mean +- sd over seeds) | Dice per seed | reliance: shuffled | reliance: constant | "
            "vs stock | logged reliance (last epoch, shuffled) |", "|---|---|---|---|---|---|---|---|"]
    runs = results["runs"]
    stock = [r["dice_real"] for r in runs if r["arm"] == "stock"]
    for arm in [a for a in ARMS if any(r["arm"] == a for r in runs)]:
        rs = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        real = np.array([r["dice_real"] for r in rs])
        cell = lambda v: f"{np.mean(v):.3f} +- {np.std(v):.3f}"  # noqa: E731
        per_seed = " / ".join(f"{v:.3f}" for v in real)
        if rs[0]["guide_kind"] is None:
            rows.append(f"| {arm} | none | {cell(real)} | {per_seed} | | | | |")
            continue
        shuffled = real - np.array([r["dice_shuffled"] for r in rs])
        constant = real - np.array([r["dice_constant"] for r in rs])
        delta = f"{np.mean(real) - np.mean(stock):+.3f}" if stock else ""
        logged = [r["logged_reliance_shuffled_last_epoch"] for r in rs
                  if r["logged_reliance_shuffled_last_epoch"] is not None]
        logged_cell = f"{np.mean(logged):+.3f}" if logged else ""
        rows.append(f"| {arm} | {rs[0]['guide_kind']} | {cell(real)} | {per_seed} | {cell(shuffled)} | "
                    f"{cell(constant)} | {delta} | {logged_cell} |")
    return "\n".join(rows)


def _check_preprocessed(args) -> None:
    """Fail before any training, saying what to run, if the dataset is not preprocessed for the configuration."""
    root = os.environ.get("nnUNet_preprocessed")
    if not root:
        raise SystemExit("Set nnUNet_preprocessed (and run nnUNetv2_plan_and_preprocess for the dataset) first.")
    folder = next((f for f in Path(root).glob("Dataset*") if f.name == str(args.dataset)
                   or (str(args.dataset).isdigit() and f.name.startswith(f"Dataset{int(args.dataset):03d}_"))), None)
    plans = folder / f"{args.plans}.json" if folder else None
    configuration = None
    if plans is not None and plans.is_file():
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        manager = PlansManager(str(plans))
        if args.configuration in manager.available_configurations:
            configuration = manager.get_configuration(args.configuration)
    if configuration is None or not (folder / configuration.data_identifier).is_dir():
        raise SystemExit(f"Dataset {args.dataset} has no preprocessed '{args.configuration}' configuration with plans "
                         f"{args.plans} under {root}. Run: nnUNetv2_plan_and_preprocess -d {args.dataset} -c "
                         f"{args.configuration}")


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    if args.run_one:
        arm, seed = args.run_one[0], int(args.run_one[1])
        result = dict(run_one(arm, seed, args), schedule=_schedule(args))
        out = args.work / "runs" / f"{arm}_seed{seed}.json"
        out.write_text(json.dumps(result, indent=2))
        return
    _check_preprocessed(args)
    for sub in ("runs", "logs", "results"):
        (args.work / sub).mkdir(parents=True, exist_ok=True)
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        paths = list(pool.map(lambda job: _launch(*job, args), jobs))
    runs = [json.loads(p.read_text()) for p in paths]
    bad = [r["arm"] for r in runs if r["schedule"] != _schedule(args)]
    if bad:
        raise RuntimeError(f"{bad}: stored runs used another schedule; delete {args.work / 'runs'} or match it.")
    results = {"machine": f"{platform.node()} {platform.processor()} {os.cpu_count()} cores",
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_seconds": round(time.time() - t0),
               "schedule": _schedule(args), "dino_weights": os.environ.get("nnUNet_dino_weights", "random"),
               "runs": runs}
    (args.work / "guide_utility.json").write_text(json.dumps(results, indent=2))
    print(render(results))


if __name__ == "__main__":
    main()
