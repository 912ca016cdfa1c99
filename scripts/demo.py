"""The README demo: GuiDINO on the bundled Dataset990_HippoTiny with the stock nnU-Net commands, on CPU.

plan+preprocess -> train a short GuiDINO run -> predict the 4 held-out NIfTIs in a new process -> evaluate with
nnUNetv2_evaluate_folder -> guide overlays. Uses $nnUNet_dino_weights when set; otherwise random DINO weights,
announced as such, because no pretrained weights can be downloaded by a script.
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from nnunet_dino.cli.stock_pipeline import command, evaluate, nnunet_environment, run, train

REPO = Path(__file__).resolve().parents[1]
DATASET = "Dataset990_HippoTiny"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trainer", default="nnUNetTrainerGuiDINO_CPUSmoke")
    parser.add_argument("--out", default=str(REPO / "demo_output"))
    parser.add_argument("--fresh", action="store_true", help="delete earlier demo output first")
    args = parser.parse_args()
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    raw = REPO / "datasets" / "nnUNet_raw"
    weights = os.environ.get("nnUNet_dino_weights")
    if not weights:
        print("=" * 78 + "\nnnUNet_dino_weights is not set: this demo runs with RANDOMLY INITIALISED DINO weights.\n"
              "Its Dice says nothing about pretrained DINO. Set nnUNet_dino_weights to Meta's file to use them.\n"
              + "=" * 78, flush=True)
        weights = "random"
    env = nnunet_environment(raw, out, nnUNet_dino_weights=weights)
    logs = out / "logs"
    print("[1/5] nnUNetv2_plan_and_preprocess", flush=True)
    run([command("nnUNetv2_plan_and_preprocess"), "-d", "990", "-c", "2d", "-np", "1"], env, logs / "plan.log")
    print(f"[2/5] nnUNetv2_train 990 2d 0 -tr {args.trainer} -device cpu", flush=True)
    train("990", args.trainer, env, logs / "train.log")
    pred = out / "predictions"
    print("[3/5] nnUNetv2_predict on imagesTs", flush=True)
    run([command("nnUNetv2_predict"), "-i", str(raw / DATASET / "imagesTs"), "-o", str(pred), "-d", "990", "-c", "2d",
         "-tr", args.trainer, "-f", "0", "-device", "cpu"], env, logs / "predict.log")
    print("[4/5] nnUNetv2_evaluate_folder", flush=True)
    summary = evaluate(raw / DATASET / "labelsTs", pred, env)
    print("[5/5] nnUNetv2_dino_guide_overlays", flush=True)
    overlays = out / "guide_overlays"
    run([command("nnUNetv2_dino_guide_overlays"), "-i", str(raw / DATASET / "imagesTs"), "-o", str(overlays), "-d",
         "990", "-tr", args.trainer, "--nifti"], env, logs / "overlays.log")
    print("\nPer-class Dice on the 4 held-out cases (nnUNetv2_evaluate_folder):")
    for label, metrics in summary["mean"].items():
        print(f"  label {label}: Dice {metrics['Dice']:.4f}")
    print(f"  mean foreground Dice: {summary['foreground_mean']['Dice']:.4f}")
    print(f"DINO weights used: {'RANDOM INITIALISATION (not pretrained)' if weights == 'random' else weights}")
    print(f"Predictions: {pred}\nGuide overlays: {overlays}\nLogs: {logs}")


if __name__ == "__main__":
    main()
