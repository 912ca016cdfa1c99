"""The README demo: GuiDINO on a bundled dataset with the stock nnU-Net commands, on CPU.

plan+preprocess -> train a short GuiDINO run -> predict the 4 held-out images in a new process -> evaluate with
nnUNetv2_evaluate_folder -> guide overlays -> the guide reliance of the last epoch. Uses $nnUNet_dino_weights when
set; otherwise random DINO weights, announced as such, because no pretrained weights can be downloaded by a script.

Default dataset: 992 (HC18Tiny, 2D fetal-head ultrasound PNGs), whose large structure a few minutes of CPU training
find. 990 (HippoTiny, 3D MRI NIfTI) is the harder case: its small structures need far more training than a demo has,
so expect Dice near 0 there.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np

from nnunet_dino.cli.stock_pipeline import command, evaluate, nnunet_environment, run, train

REPO = Path(__file__).resolve().parents[1]
# id -> (folder, what the images are, whether the overlay tool can also write NIfTI guide maps for them, a note
# printed with the Dice)
DATASETS = {
    "992": ("Dataset992_HC18Tiny", "2D fetal-head ultrasound PNGs", False, ""),
    "990": ("Dataset990_HippoTiny", "3D hippocampus MRI NIfTI volumes", True,
            "  HippoTiny's small structures need far more training than this demo: Dice near 0 is expected here."),
}
WEIGHTS_HINT = "export nnUNet_dino_weights=/path/to/dinov3_vits16_pretrain_lvd1689m-08c60483.pth"


def constant_foreground_dice(labels: Path, plans_file: Path, file_ending: str) -> dict[str, float]:
    """Mean per-case Dice of the trivial prediction 'every pixel is label L', per label: the figure a network has
    to beat before its Dice means anything (on HC18 the head covers a large part of each image)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name

    reader = recursive_find_reader_writer_by_name(load_json(plans_file)["image_reader_writer"])()
    per_label: dict[str, list[float]] = {}
    for path in sorted(labels.glob(f"*{file_ending}")):
        seg, _ = reader.read_seg(str(path))
        for label in (int(v) for v in np.unique(seg) if v > 0):
            per_label.setdefault(str(label), []).append(2 * np.sum(seg == label) / (np.sum(seg == label) + seg.size))
    return {k: float(np.mean(v)) for k, v in per_label.items()}


def last_epoch_guide_reliance(checkpoint: Path) -> dict[str, float]:
    """val_guide_reliance_<ablation> of the last epoch, from the checkpoint's logging, loaded with
    weights_only=True (no code from the file runs)."""
    from nnunet_dino.training.safe_checkpoint import load_checkpoint_safely

    logging = load_checkpoint_safely(checkpoint)["logging"]
    prefix = "val_guide_reliance_"
    return {k[len(prefix):]: float(v[-1]) for k, v in logging.items() if k.startswith(prefix) and v}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="992", choices=sorted(DATASETS),
                        help="992: HC18Tiny ultrasound (default); 990: HippoTiny MRI")
    parser.add_argument("--trainer", default="nnUNetTrainerGuiDINO_Demo")
    parser.add_argument("--out", default=str(REPO / "demo_output"))
    parser.add_argument("--fresh", action="store_true", help="delete earlier demo output first")
    args = parser.parse_args()
    start = time.time()
    dataset_id = args.dataset
    name, description, nifti, note = DATASETS[dataset_id]
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    raw = REPO / "datasets" / "nnUNet_raw"
    folder = raw / name
    weights = os.environ.get("nnUNet_dino_weights")
    if not weights:
        print("=" * 78 + "\nnnUNet_dino_weights is not set: this demo runs with RANDOMLY INITIALISED DINO weights.\n"
              "Its Dice says nothing about pretrained DINO. To use Meta's pretrained DINOv3 ViT-S/16:\n"
              f"  {WEIGHTS_HINT}\n" + "=" * 78, flush=True)
        weights = "random"
    env = nnunet_environment(raw, out, nnUNet_dino_weights=weights)
    logs = out / "logs"
    steps: list[tuple[str, float]] = []

    def step(title: str, action):
        print(f"[{len(steps) + 1}/5] {title}", flush=True)
        t0 = time.time()
        result = action()
        steps.append((title.split()[0], time.time() - t0))
        return result

    print(f"Dataset {name}: {description}; trainer {args.trainer}; output {out}", flush=True)
    step("nnUNetv2_plan_and_preprocess", lambda: run(
        [command("nnUNetv2_plan_and_preprocess"), "-d", dataset_id, "-c", "2d", "-np", "1"], env, logs / "plan.log"))
    step(f"nnUNetv2_train {dataset_id} 2d 0 -tr {args.trainer} -device cpu",
         lambda: train(dataset_id, args.trainer, env, logs / "train.log"))
    pred = out / "predictions"
    step("nnUNetv2_predict on imagesTs (a new process: only the saved model is used)", lambda: run(
        [command("nnUNetv2_predict"), "-i", str(folder / "imagesTs"), "-o", str(pred), "-d", dataset_id, "-c", "2d",
         "-tr", args.trainer, "-f", "0", "-device", "cpu"], env, logs / "predict.log"))
    summary = step("nnUNetv2_evaluate_folder", lambda: evaluate(folder / "labelsTs", pred, env))
    overlays = out / "guide_overlays"
    step("nnUNetv2_dino_guide_overlays", lambda: run(
        [command("nnUNetv2_dino_guide_overlays"), "-i", str(folder / "imagesTs"), "-o", str(overlays), "-d",
         dataset_id, "-tr", args.trainer, *(["--nifti"] if nifti else [])], env, logs / "overlays.log"))

    model = out / "nnUNet_results" / name / f"{args.trainer}__nnUNetPlans__2d" / "fold_0"
    dataset_json = json.loads((folder / "dataset.json").read_text())
    label_names = {str(v): k for k, v in dataset_json["labels"].items()}
    trivial = constant_foreground_dice(folder / "labelsTs", pred / "plans.json", dataset_json["file_ending"])
    n_cases = len(summary["metric_per_case"])
    print(f"\nPer-class Dice on the {n_cases} held-out cases (nnUNetv2_evaluate_folder):")
    for label, metrics in summary["mean"].items():
        extra = f"   (predicting everything as {label_names.get(label, label)}: {trivial[label]:.4f})" \
            if label in trivial else ""
        print(f"  label {label} ({label_names.get(label, '?')}): Dice {metrics['Dice']:.4f}{extra}")
    print(f"  mean foreground Dice: {summary['foreground_mean']['Dice']:.4f}")
    if note:
        print(note)
    reliance = last_epoch_guide_reliance(model / "checkpoint_final.pth")
    if reliance:
        print("Guide reliance at the last epoch (validation pseudo Dice lost when the DINO guide is replaced): "
              + ", ".join(f"{k} {v:+.4f}" for k, v in reliance.items() if math.isfinite(v)))
        print("  About 0 means the prediction does not depend on DINO yet"
              + (": expected with random DINO weights and a run this short." if weights == "random" else "."))
    print(f"DINO weights used: {'RANDOM INITIALISATION (not pretrained)' if weights == 'random' else weights}")
    if weights == "random":
        print(f"  for Meta's pretrained weights: {WEIGHTS_HINT}")
    print(f"Predictions: {pred}\nGuide overlays: {overlays}\nTraining curves: {model / 'progress.png'}\nLogs: {logs}")
    print("Wall time: " + ", ".join(f"{n} {s:.0f} s" for n, s in steps) + f"; total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
