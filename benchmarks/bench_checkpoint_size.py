"""Checkpoint size of each trainer, complete and slim (``nnUNet_dino_slim_checkpoints=1``), against stock nnU-Net.

    python benchmarks/bench_checkpoint_size.py -d 4 [-c 2d] [-p nnUNetPlans] [--trainers NAME ...] [--out-dir DIR]

For each trainer (found by name as nnU-Net does), built from the dataset's plans (``nnUNet_preprocessed`` must hold
them: ``nnUNetv2_plan_experiment -d ID`` is enough, no preprocessing needed), in its own subprocess:
``initialize()``, the DINO weights of ``nnUNet_dino_weights`` (``random`` if unset; the size does not depend on the
values), one optimiser step on a random batch (so SGD momentum and AdamW moments exist, as in any real checkpoint),
then nnU-Net's ``save_checkpoint`` twice: complete, and slim (plus the frozen-DINO file written once per model
folder). Sizes are those of the files on disk. One checkpoint of each kind per fold is written by nnU-Net at the end
(``checkpoint_final``), ``checkpoint_best`` whenever the EMA pseudo Dice improves and ``checkpoint_latest`` every 50
epochs until the end (then deleted), so a finished fold keeps two.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_TRAINERS = ["nnUNetTrainer", "nnUNetTrainerGuiDINO", "nnUNetTrainerGuiDINO_frozen", "nnUNetTrainerSegDINO",
                    "nnUNetTrainerSegDINOv2", "nnUNetTrainerMedDINOv3", "nnUNetTrainerMedDINOv3_LoRA"]


def _worker(args) -> dict:
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    torch.set_num_threads(1)
    dataset = maybe_convert_to_dataset_name(args.d)
    pre = Path(os.environ["nnUNet_preprocessed"]) / dataset
    plans_file = pre / f"{args.p}.json"
    if not plans_file.is_file():
        raise SystemExit(f"No plans {plans_file}: run nnUNetv2_plan_experiment -d {args.d} first.")
    plans = dict(load_json(plans_file), continue_training=False)
    cls = recursive_find_trainer_class_by_name(args.worker)
    trainer = cls(plans, args.c, 0, load_json(pre / "dataset.json"), torch.device("cpu"))
    trainer.initialize()
    is_dino = hasattr(trainer, "load_dino_weights")
    if is_dino:
        trainer.load_dino_weights()
    net = trainer.network
    x = torch.randn(2, trainer.num_input_channels, *trainer.configuration_manager.patch_size)
    outputs = net(x)
    loss = sum(o.float().mean() for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs]))
    loss.backward()
    trainer.optimizer.step()
    sizes = {}
    modes = [("complete", False), ("slim", True)] if is_dino else [("complete", False)]
    for mode, slim in modes:
        if is_dino:
            trainer.slim_checkpoints = slim
        path = Path(trainer.output_folder) / f"checkpoint_{mode}.pth"
        trainer.save_checkpoint(str(path))
        sizes[mode] = path.stat().st_size
    frozen = list(Path(trainer.output_folder_base).glob("dino_frozen-*.safetensors"))
    return {"trainer": args.worker, "checkpoint_bytes": sizes,
            "frozen_file_bytes": frozen[0].stat().st_size if frozen else 0,
            "parameters": sum(p.numel() for p in net.parameters()),
            "trainable": sum(p.numel() for p in net.parameters() if p.requires_grad),
            "patch_size": list(trainer.configuration_manager.patch_size)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", required=True, help="dataset name or id with plans in nnUNet_preprocessed")
    parser.add_argument("-c", default="2d")
    parser.add_argument("-p", default="nnUNetPlans")
    parser.add_argument("--trainers", nargs="+", default=DEFAULT_TRAINERS)
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "nnUNet_preprocessed" not in os.environ:
        raise SystemExit("Set nnUNet_preprocessed to the folder holding the dataset's plans.")
    if args.worker:
        print("RESULT " + json.dumps(_worker(args)))
        return
    rows = []
    for name in args.trainers:
        with tempfile.TemporaryDirectory() as results:
            env = dict(os.environ, nnUNet_results=results, nnUNet_dino_weights=os.environ.get(
                "nnUNet_dino_weights", "random"), OMP_NUM_THREADS="1")
            proc = subprocess.run([sys.executable, __file__, "-d", args.d, "-c", args.c, "-p", args.p, "--worker",
                                   name], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}")
            rows.append(json.loads(lines[-1][len("RESULT "):]))
            print(f"{name}: {rows[-1]['checkpoint_bytes']}", flush=True)
    stock = next((r["checkpoint_bytes"]["complete"] for r in rows if r["trainer"] == "nnUNetTrainer"), None)
    table = ["| trainer | parameters (trainable) | checkpoint, complete | checkpoint, slim | frozen DINO file "
             "(once per model folder) | complete / stock | slim / stock |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        complete, slim = r["checkpoint_bytes"]["complete"], r["checkpoint_bytes"].get("slim")
        mb = lambda b: f"{b / 2 ** 20:.1f} MB" if b else "–"  # noqa: E731
        ratio = lambda b: f"{b / stock:.1f}x" if b and stock else "–"  # noqa: E731
        table.append(f"| {r['trainer']} | {r['parameters'] / 1e6:.1f}M ({r['trainable'] / 1e6:.1f}M) | {mb(complete)} "
                     f"| {mb(slim)} | {mb(r['frozen_file_bytes'])} | {ratio(complete)} | {ratio(slim)} |")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
            "dataset": args.d, "configuration": args.c, "plans": args.p,
            "dino_weights": os.environ.get("nnUNet_dino_weights", "random")}
    (out / "checkpoint_size.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / "checkpoint_size.md").write_text("\n".join([f"{meta}", "", *table, ""]))
    print("\n".join(table))


if __name__ == "__main__":
    main()
