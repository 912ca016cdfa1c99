"""Deterministic cost figures: FLOPs per training step and per inference tile of stock nnU-Net and every plugin
trainer family, at a dataset's own plans and at a CT-like 2D plan that nnU-Net's planner makes for 512 x 512
slices, with the ratio to stock, the DINO backbone's share, and the floor each ratio cannot go below.

    python benchmarks/bench_flops.py -d 4                                 # Dataset004 plans + the 512 x 512 CT plan
    python benchmarks/bench_flops.py -d 27 -c 2d -p nnUNetResEncUNetMPlans --ct-size 0   # another dataset only
    python benchmarks/bench_flops.py -d 4 --trainers nnUNetTrainer nnUNetTrainerGuiDINO_vitb

FLOPs are counted on the meta device (benchmarks/network_flops.py): shapes only, seconds per trainer, the same on
every machine. Batch size: the plans' own (what nnU-Net trains with); ratios do not depend on it.

The CT-like plan is made by nnU-Net's own ExperimentPlanner (``nnUNetv2_plan_experiment``), in a temporary folder,
from a synthetic fingerprint: 100 CT volumes of 512 x 512 x 120 voxels at 0.78 x 0.78 x 2.5 mm, one foreground
label; its 2d configuration is nnU-Net's default network for such data (patch 512 x 512, 8 stages, batch 12).

Floor of each ratio: the part of the step that no change to the plugin's own modules can remove, over stock's
step. GuiDINO keeps nnU-Net's whole network and adds the DINO branch, so its floor is 1 + DINO / stock (the ViT's
forward, and with LoRA its backward through the ViT too, are needed for the guide). SegDINO and MedDINOv3 replace
nnU-Net's network by a head on the ViT, so their floor is DINO / stock (a head costing nothing).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from network_flops import count_flops  # noqa: E402

DEFAULT_TRAINERS = ["nnUNetTrainer", "nnUNetTrainerGuiDINO", "nnUNetTrainerGuiDINO_frozen", "nnUNetTrainerSegDINO",
                    "nnUNetTrainerSegDINOv2", "nnUNetTrainerSegDINOv2_deepSupervision", "nnUNetTrainerMedDINOv3"]
REFERENCE = "nnUNetTrainer"
CT_DATASET = "Dataset900_SyntheticCT"


def ct_like_plans(work: Path, size: int, slices: int = 120, cases: int = 100) -> Path:
    """Plan a synthetic CT dataset with nnU-Net's planner; returns its preprocessed folder (plans + dataset.json)."""
    import numpy as np
    import SimpleITK as sitk

    raw, pre = work / "raw" / CT_DATASET, work / "preprocessed" / CT_DATASET
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    pre.mkdir(parents=True)
    # One tiny example file: the planner only opens a case to choose the image reader; sizes come from the fingerprint.
    for folder, name in (("imagesTr", "ct_000_0000.nii.gz"), ("labelsTr", "ct_000.nii.gz")):
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 2, 2), np.int16)), str(raw / folder / name))
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": 1,
               "file_ending": ".nii.gz"}
    (raw / "dataset.json").write_text(json.dumps(dataset))
    fingerprint = {
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 1500.0, "mean": 60.0, "median": 55.0, "min": -1000.0, "percentile_00_5": -150.0,
            "percentile_99_5": 300.0, "std": 80.0}},
        "median_relative_size_after_cropping": 1.0,
        "shapes_after_crop": [[slices, size, size]] * cases,
        "spacings": [[2.5, 0.78, 0.78]] * cases,
    }
    (pre / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
    env = dict(os.environ, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
               nnUNet_results=str(work / "results"))
    planner = Path(sys.executable).with_name("nnUNetv2_plan_experiment")
    out = subprocess.run([str(planner), "-d", CT_DATASET.split("_")[0][len("Dataset"):]], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"nnUNetv2_plan_experiment failed on the synthetic CT fingerprint:\n{out.stderr[-3000:]}")
    (pre / "dataset.json").write_text(json.dumps(dataset))
    return pre


def dataset_plans(dataset: str) -> Path:
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_preprocessed:
        raise SystemExit("Set nnUNet_preprocessed (plans are read from $nnUNet_preprocessed/<dataset>/).")
    return Path(str(nnUNet_preprocessed)) / maybe_convert_to_dataset_name(dataset)


def plans_batch_size(plans_dir: Path, plans_name: str, configuration: str) -> int:
    plans = json.loads((plans_dir / f"{plans_name}.json").read_text())
    if configuration not in plans["configurations"]:
        raise SystemExit(f"{plans_dir / plans_name}.json has no configuration {configuration!r} "
                         f"(it has {sorted(plans['configurations'])}).")
    return int(plans["configurations"][configuration]["batch_size"])


def count_plan(label: str, plans_dir: Path, plans_name: str, configuration: str, trainers: list[str],
               batch_size: int | None) -> dict:
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    for name in ("dataset.json", f"{plans_name}.json"):
        if not (plans_dir / name).is_file():
            raise SystemExit(f"{plans_dir / name} does not exist: plan the dataset first "
                             f"(nnUNetv2_plan_experiment -d <id>, with -pl/-overwrite_plans_name for {plans_name}).")
    batch = batch_size or plans_batch_size(plans_dir, plans_name, configuration)
    rows = []
    for name in trainers:
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's trainer search prints every folder it inspects
            cls = recursive_find_trainer_class_by_name(name)
        if cls is None:
            raise SystemExit(f"No trainer named {name} (nnU-Net's trainer search).")
        row = {"trainer": name, **count_flops(cls, plans_dir, configuration, batch, plans_name)}
        rows.append(row)
        print(f"  [{label}] {name}: {row['train_step_gflop']:.1f} GFLOP/step, {row['infer_tile_gflop']:.2f} "
              f"GFLOP/tile", flush=True)
    add_ratios(rows)
    return {"label": label, "plans": str(plans_dir / f"{plans_name}.json"), "configuration": configuration,
            "batch_size": batch, "rows": rows}


def keeps_nnunet_network(trainer: str) -> bool:
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunet_dino.training import GuiDINOTrainer

    with contextlib.redirect_stdout(io.StringIO()):
        cls = recursive_find_trainer_class_by_name(trainer)
    return not hasattr(cls, "dino_architecture_names") or issubclass(cls, GuiDINOTrainer)


def add_ratios(rows: list[dict]) -> None:
    ref = next((r for r in rows if r["trainer"] == REFERENCE), None)
    if ref is None:
        return
    for r in rows:
        for key in ("train_step", "infer_tile"):
            total, dino, stock = r[f"{key}_gflop"], r[f"{key.split('_')[0]}_dino_gflop"], ref[f"{key}_gflop"]
            r[f"{key}_x_stock"] = total / stock
            r[f"{key}_floor_x_stock"] = (stock + dino) / stock if keeps_nnunet_network(r["trainer"]) else dino / stock


def markdown(plan: dict) -> str:
    head = ["trainer", "train step GFLOP", "x stock", "floor", "DINO share", "tile GFLOP", "x stock", "floor",
            "DINO share"]
    lines = [f"{plan['label']}: `{plan['configuration']}`, patch {plan['rows'][0]['patch_size']}, batch "
             f"{plan['batch_size']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in plan["rows"]:
        def x(key):
            return f"{r[key]:.1f}x" if key in r else "-"
        lines.append("| " + " | ".join([
            f"`{r['trainer']}`", f"{r['train_step_gflop']:.1f}", x("train_step_x_stock"),
            x("train_step_floor_x_stock"), f"{r['train_dino_share']:.0%}", f"{r['infer_tile_gflop']:.2f}",
            x("infer_tile_x_stock"), x("infer_tile_floor_x_stock"), f"{r['infer_dino_share']:.0%}"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", help="dataset id or name (plans under $nnUNet_preprocessed); optional if "
                                           "--ct-size is given")
    p.add_argument("-c", "--configuration", default="2d")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--trainers", nargs="+", default=DEFAULT_TRAINERS)
    p.add_argument("--batch-size", type=int, help="default: each plan's own")
    p.add_argument("--ct-size", type=int, default=512, help="in-plane size of the synthetic CT plan (0: none)")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    if not args.dataset and not args.ct_size:
        p.error("give -d/--dataset, --ct-size, or both")
    plans = []
    if args.dataset:
        folder = dataset_plans(args.dataset)
        plans.append(count_plan(folder.name, folder, args.plans, args.configuration, args.trainers, args.batch_size))
    if args.ct_size:
        with tempfile.TemporaryDirectory() as work:
            folder = ct_like_plans(Path(work), args.ct_size)
            plans.append(count_plan(f"CT-like {args.ct_size} x {args.ct_size} (nnU-Net's planner)", folder,
                                    "nnUNetPlans", "2d", args.trainers, args.batch_size))
            plans[-1]["plans"] = "synthetic (temporary)"
    import torch
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.platform(), "torch": torch.__version__,
              "counter": "torch.utils.flop_counter.FlopCounterMode on the meta device (matmul + conv, fwd + bwd)",
              "plans": plans}
    print("\n\n".join(markdown(plan) for plan in plans))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
