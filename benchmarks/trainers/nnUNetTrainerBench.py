"""Benchmark-only trainers: the SAME schedule (epochs x iterations x batch size) for the stock and the GuiDINO arm of
benchmarks/bench_accuracy.py. Registered by that script through ``nnUNet_extTrainer`` (this folder first); not part
of the installed plugin.

Schedule: ``BENCH_EPOCHS`` epochs x ``BENCH_ITERATIONS`` training iterations at batch ``BENCH_BATCH`` (nnU-Net's plans
ask for batch 292 at Hippocampus 2d; far too slow on 2 CPU cores, so both arms use the same small batch), poly LR per
epoch as nnU-Net does. Both arms keep nnU-Net's data augmentation, loss, optimiser (SGD 1e-2, nesterov) and deep
supervision. The environment variables ``nnUNet_bench_epochs``/``_iterations``/``_val_iterations``/``_batch`` change
the schedule for both arms at once (smoke runs); they are read at import, so set them before nnUNetv2_train starts.

nnU-Net's final validation of fold 0 (a prediction of the ~42 validation cases) is skipped: the accuracy benchmark
evaluates on the 52 held-out test cases instead, and the skipped step would cost the GuiDINO arm minutes of CPU.
A checkpoint is written every ``save_every`` epochs so an interrupted arm resumes with ``nnUNetv2_train ... --c``.
"""
import os
from dataclasses import replace

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_dino.training import GuiDINOTrainer
from nnunet_dino.training.dino_trainer_base import cpu_threads_setting

BENCH_EPOCHS = int(os.environ.get("nnUNet_bench_epochs", 12))
BENCH_ITERATIONS = int(os.environ.get("nnUNet_bench_iterations", 40))
BENCH_VAL_ITERATIONS = int(os.environ.get("nnUNet_bench_val_iterations", 4))
BENCH_BATCH = int(os.environ.get("nnUNet_bench_batch", 8))
BENCH_SAVE_EVERY = 5


class _BenchSchedule:
    """Mixin: identical schedule, periodic checkpoints, no final validation."""

    def _apply_bench_schedule(self):
        # Same threading for both arms: the GuiDINO arm limits itself by $nnUNet_dino_cpu_threads, stock nnU-Net
        # would take every core.
        threads = cpu_threads_setting()
        if threads is not None and self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.num_epochs = BENCH_EPOCHS
        self.num_iterations_per_epoch = BENCH_ITERATIONS
        self.num_val_iterations_per_epoch = BENCH_VAL_ITERATIONS
        self.configuration_manager.configuration["batch_size"] = BENCH_BATCH
        self.save_every = BENCH_SAVE_EVERY

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("Benchmark trainer: nnU-Net's final validation of the fold is skipped (the accuracy "
                               "benchmark evaluates the held-out test set instead).")


class nnUNetTrainerBenchStock(_BenchSchedule, nnUNetTrainer):
    """Stock nnU-Net (nnUNetTrainer) with the benchmark schedule."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._apply_bench_schedule()


class nnUNetTrainerBenchGuiDINO(_BenchSchedule, GuiDINOTrainer):
    """nnUNetTrainerGuiDINO (ViT-S/16 + LoRA r 8) with the benchmark schedule and the CPU token budget of
    nnUNetTrainerGuiDINO_CPUSmoke (short side of the patch = 8 DINO tokens instead of 16: ~1/4 of the tokens)."""
    guidino = replace(GuiDINOTrainer.guidino, min_short_side_tokens=8)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._apply_bench_schedule()
