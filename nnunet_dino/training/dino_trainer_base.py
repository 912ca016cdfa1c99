"""Behaviour shared by every nnunet-dino trainer, on top of nnU-Net's nnUNetTrainer.

- Schedule overrides as class attributes, so a variant is one line (``epochs = 5``).
- 2D-only check at construction (before any data is touched).
- Pretrained DINO weights loaded at training start from the documented setting; missing setting = immediate
  error; random weights only when explicitly requested and then logged loudly. Not done when resuming: the
  checkpoint carries the whole network, DINO included.
- ``dino_weights.json`` in the output folder records what was loaded, so every result can say whether real
  DINO weights were used.
"""
from __future__ import annotations

import json
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch._dynamo import OptimizedModule

from ..backbone import (WEIGHTS_ENV_VAR, DinoBackbone, LoadReport, init_random_dino_weights_, load_weights_into,
                        resolve_weights_setting, warn_random_init)


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The plain module behind DDP and torch.compile wrappers."""
    if hasattr(network, "module") and isinstance(network, torch.nn.parallel.DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


class DinoTrainerBase(nnUNetTrainer):
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    val_iterations_per_epoch: int | None = None
    batch_size: int | None = None  # overrides the plans' batch size (memory, benchmarks)
    max_batch_size: int | None = None  # caps it (CPU smoke runs: never more than the plans' memory-based choice)
    dino_weights: str | None = None  # None: read $nnUNet_dino_weights
    mirroring: bool = True  # nnU-Net's mirror augmentation and test-time mirroring; off only to make CPU runs cheap

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # Checked before nnU-Net's __init__, which already creates the output folder.
        patch_size = PlansManager(plans).get_configuration(configuration).patch_size
        if len(patch_size) != 2:
            raise ValueError(
                f"{self.__class__.__name__} works on 2D patches, but configuration {configuration!r} has patch size "
                f"{patch_size}. Train the '2d' configuration (3D volumes are then used slice by slice): "
                f"nnUNetv2_train DATASET 2d FOLD -tr {self.__class__.__name__}")
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.epochs is not None:
            self.num_epochs = self.epochs
        if self.iterations_per_epoch is not None:
            self.num_iterations_per_epoch = self.iterations_per_epoch
        if self.val_iterations_per_epoch is not None:
            self.num_val_iterations_per_epoch = self.val_iterations_per_epoch
        if self.batch_size is not None:
            self.configuration_manager.configuration["batch_size"] = self.batch_size
        if self.max_batch_size is not None:
            planned = self.configuration_manager.batch_size
            self.configuration_manager.configuration["batch_size"] = min(planned, self.max_batch_size)
        self._network_from_checkpoint = False

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.mirroring:  # as nnU-Net's nnUNetTrainerNoMirroring; the predictor reads it from the checkpoint
            mirror_axes = self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    # -------------------------------------------------------------------------------- DINO weights
    def dino_backbones(self) -> list[DinoBackbone]:
        """The backbones whose pretrained weights are loaded at training start (subclasses say where they are)."""
        raise NotImplementedError

    def on_backbone_loaded(self, backbone: DinoBackbone, report: LoadReport) -> None:
        """Hook for subclasses, e.g. to match input normalisation to the weights' pretraining data."""

    def load_dino_weights(self) -> list[LoadReport]:
        reports = []
        for backbone in self.dino_backbones():
            path = resolve_weights_setting(self.dino_weights, backbone.arch.name)
            if path is None:
                # timm's own init (LayerScale 1e-5) would leave near-identity blocks: attention and LoRA inert.
                init_random_dino_weights_(backbone)
                warn_random_init(backbone.arch.name)
                report = LoadReport(backbone.arch.name, "none", "none", backbone.arch.default_pretraining, True)
                self.print_to_log_file("#" * 80 + f"\nWARNING: {report.describe()}\n" + "#" * 80)
            else:
                report = load_weights_into(backbone, path)
                self.print_to_log_file(f"DINO weights: {report.describe()}")
            self.on_backbone_loaded(backbone, report)
            reports.append(report)
        with open(os.path.join(self.output_folder, "dino_weights.json"), "w") as f:
            json.dump({"weights_setting": self.dino_weights or os.environ.get(WEIGHTS_ENV_VAR),
                       "backbones": [vars(r) for r in reports]}, f, indent=2)
        return reports

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        if not self._network_from_checkpoint:
            self.load_dino_weights()  # fails within seconds of the start if no weights are configured
        super().on_train_start()

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        self._network_from_checkpoint = True
