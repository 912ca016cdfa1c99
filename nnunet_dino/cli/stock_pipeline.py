"""Running the stock nnU-Net commands in subprocesses, as a user would: shared by the demo and the e2e tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def nnunet_environment(raw: Path, work: Path, **extra: str) -> dict:
    """A copy of os.environ with nnU-Net's folders and CPU-friendly settings (one process, no compile)."""
    env = dict(os.environ)
    env.update(nnUNet_raw=str(raw), nnUNet_preprocessed=str(work / "nnUNet_preprocessed"),
               nnUNet_results=str(work / "nnUNet_results"), nnUNet_def_n_proc="1", nnUNet_compile="f")
    env.update(extra)
    return env


def command(name: str) -> str:
    """A console script of the running interpreter's environment (nnUNetv2_train, ...)."""
    return str(Path(sys.executable).parent / name)


def run(args: list[str], env: dict, log: Path | None = None) -> str:
    """Run a command; raise with the tail of its output if it fails."""
    proc = subprocess.run(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed with exit code {proc.returncode}:\n{proc.stdout[-4000:]}")
    return proc.stdout


def train(dataset: str, trainer: str, env: dict, log: Path | None = None, configuration: str = "2d",
          fold: str = "0", extra: list[str] = ()) -> str:
    # nnUNet_n_proc_DA=0 only for training: planning breaks with it.
    return run([command("nnUNetv2_train"), dataset, configuration, fold, "-tr", trainer, "-device", "cpu", *extra],
               dict(env, nnUNet_n_proc_DA="0"), log)


def evaluate(labels: Path, predictions: Path, env: dict) -> dict:
    """nnUNetv2_evaluate_folder on a prediction folder; returns its summary.json."""
    run([command("nnUNetv2_evaluate_folder"), str(labels), str(predictions), "-djfile",
         str(predictions / "dataset.json"), "-pfile", str(predictions / "plans.json")], env)
    return json.loads((predictions / "summary.json").read_text())
