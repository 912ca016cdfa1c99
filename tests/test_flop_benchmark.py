"""benchmarks/bench_flops.py: the deterministic cost figures (FLOPs on the meta device) must not rot, and its
ratios and floors must mean what docs/benchmarks.md says. Uses a small synthetic CT plan made by nnU-Net's planner."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAINERS = ["nnUNetTrainer", "nnUNetTrainerGuiDINO", "nnUNetTrainerGuiDINO_frozen", "nnUNetTrainerSegDINO"]


def test_flop_benchmark_on_a_planned_ct_like_dataset(tmp_path):
    out = tmp_path / "flops.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_flops.py"), "--ct-size", "256",
                           "--trainers", *TRAINERS, "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (plan,) = json.loads(out.read_text())["plans"]
    rows = {r["trainer"]: r for r in plan["rows"]}
    assert rows["nnUNetTrainer"]["patch_size"] == [256, 256]  # nnU-Net's planner took the whole slice
    assert plan["batch_size"] >= 2
    stock = rows["nnUNetTrainer"]
    assert stock["train_step_x_stock"] == 1 and stock["train_dino_gflop"] == 0
    # a training step costs more than forward alone: backward of every conv roughly doubles it
    assert stock["train_step_gflop"] > 2 * plan["batch_size"] * stock["infer_tile_gflop"]
    for name in ("nnUNetTrainerGuiDINO", "nnUNetTrainerGuiDINO_frozen"):
        r = rows[name]  # nnU-Net's whole network plus the DINO branch: floor 1 + DINO / stock, above 1
        assert r["train_step_floor_x_stock"] == pytest.approx(1 + r["train_dino_gflop"] / stock["train_step_gflop"])
        assert 1.05 < r["train_step_floor_x_stock"] <= r["train_step_x_stock"]
        assert 0.05 < r["train_dino_share"] < 0.95
    # LoRA backpropagates through the ViT; the frozen ViT runs forward only
    assert rows["nnUNetTrainerGuiDINO"]["train_dino_gflop"] > 1.5 * rows["nnUNetTrainerGuiDINO_frozen"][
        "train_dino_gflop"]
    segdino = rows["nnUNetTrainerSegDINO"]  # replaces nnU-Net's network: the floor is the DINO part alone
    assert segdino["train_step_floor_x_stock"] == pytest.approx(segdino["train_dino_gflop"] / stock["train_step_gflop"])
    assert segdino["train_step_floor_x_stock"] < segdino["train_step_x_stock"]
    assert "| `nnUNetTrainerGuiDINO` |" in proc.stdout
