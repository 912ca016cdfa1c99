"""Behaviour shared by every nnunet-dino trainer, on top of nnU-Net's nnUNetTrainer.

- Schedule overrides as class attributes, so a variant is one line (``epochs = 5``).
- ``require_2d_patch`` for the trainer families that work on 2D patches only (SegDINO, MedDINOv3): called at
  construction, before any data is touched. GuiDINO also trains 3D configurations (slice-wise guidance).
- Pretrained DINO weights loaded at training start from the documented setting; missing setting = immediate
  error; random weights only when explicitly requested and then logged loudly. Not done when resuming: the
  checkpoint carries the whole network, DINO included.
- ``dino_weights.json`` in the output folder records what was loaded, so every result can say whether real
  DINO weights were used; the same record travels inside every checkpoint (checkpoints.py), so an exported model
  still says it, the predictor prints it and a resumed run logs it.
- Checkpoints are written atomically after a free-space check, and optionally slim (frozen DINO weights stored
  once per model folder): checkpoints.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from nnunetv2.paths import nnUNet_results
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch._dynamo import OptimizedModule

from ..backbone import (WEIGHTS_ENV_VAR, DinoBackbone, LoadReport, WeightFileError, init_random_dino_weights_,
                        load_weights_into, resolve_weights_setting, warn_random_init)
from .checkpoints import (RECORD_FORMAT, checkpoint_view, describe_provenance, frozen_dino_keys, frozen_file_name,
                          slim_checkpoints_requested, store_frozen_tensors, tensor_bytes, tensors_sha256,
                          write_checkpoint_atomically)

CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The plain module behind DDP and torch.compile wrappers."""
    if hasattr(network, "module") and isinstance(network, torch.nn.parallel.DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


def require_2d_patch(trainer_class: type, plans: dict, configuration: str) -> None:
    """Refuse a 3D configuration before nnU-Net's __init__ creates the output folder, saying what to run instead."""
    patch_size = PlansManager(plans).get_configuration(configuration).patch_size
    if len(patch_size) != 2:
        name = trainer_class.__name__
        raise ValueError(
            f"{name} works on 2D patches, but configuration {configuration!r} has patch size {patch_size}. Train the "
            f"'2d' configuration (3D volumes are then used slice by slice): nnUNetv2_train DATASET 2d FOLD -tr {name}. "
            f"(GuiDINO trainers, nnUNetTrainerGuiDINO and its variants, also train 3D configurations.)")


CPU_THREADS_ENV_VAR = "nnUNet_dino_cpu_threads"


def cpu_threads_setting() -> int | None:
    """$nnUNet_dino_cpu_threads as a positive int, None when unset; anything else is refused."""
    value = os.environ.get(CPU_THREADS_ENV_VAR, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{CPU_THREADS_ENV_VAR}={value!r}: expected a positive number of CPU threads (e.g. 1), or "
                         f"unset it to let nnU-Net use every core.")
    return int(value)


class DinoTrainerBase(nnUNetTrainer):
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    val_iterations_per_epoch: int | None = None
    batch_size: int | None = None  # overrides the plans' batch size (memory, benchmarks)
    max_batch_size: int | None = None  # caps it (CPU smoke runs: never more than the plans' memory-based choice)
    dino_weights: str | None = None  # None: read $nnUNet_dino_weights
    mirroring: bool = True  # nnU-Net's mirror augmentation and test-time mirroring; off only to make CPU runs cheap
    slim_checkpoints: bool | None = None  # None: read $nnUNet_dino_slim_checkpoints (checkpoints.py)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # Checked before nnU-Net's __init__, which already creates the output folder.
        self._check_weights_setting_early(plans, configuration, fold)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._limit_cpu_threads()
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
        self._provenance: dict | None = None  # what the DINO weights were: from load_dino_weights or the checkpoint
        self._frozen: tuple[list[str], str] | None = None  # slim mode: frozen keys and their sha256, computed once
        if self.slim_checkpoints is None:
            self.slim_checkpoints = slim_checkpoints_requested()

    @classmethod
    def dino_architecture_names(cls) -> list[str]:
        """The DINO architectures the network is built with (known before the network is)."""
        raise NotImplementedError

    def _check_weights_setting_early(self, plans: dict, configuration: str, fold) -> None:
        """Refuse a missing or wrong DINO weights setting before nnU-Net's __init__ writes into the fold folder.

        Skipped when the fold already has a checkpoint: ``--c`` and ``--val`` restore the whole network from it and
        need no weight file (the full check then runs at training start if training does start from scratch)."""
        if nnUNet_results.is_set():  # nnU-Net 2.8's lazy path: read from the environment now
            pm = PlansManager(plans)
            fold_dir = (Path(nnUNet_results.get()) / pm.dataset_name /
                        f"{self.__class__.__name__}__{pm.plans_name}__{configuration}" / f"fold_{fold}")
            if any((fold_dir / name).is_file() for name in CHECKPOINT_NAMES):
                return
        for arch in self.dino_architecture_names():
            path = resolve_weights_setting(self.dino_weights, arch)
            if path is not None and not path.exists():
                raise WeightFileError(f"DINO weights not found: {path} does not exist (set by "
                                      f"{'dino_weights' if self.dino_weights else WEIGHTS_ENV_VAR}).")

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

    def extra_provenance(self) -> dict:
        """Hook for subclasses: more of what the model started from, recorded in every checkpoint (plain types)."""
        return {}

    def load_dino_weights(self) -> list[LoadReport]:
        reports = []
        for backbone in self.dino_backbones():
            path = resolve_weights_setting(self.dino_weights, backbone.arch.name)
            if path is None:
                # timm's own init (LayerScale 1e-5) would leave near-identity blocks: attention and LoRA inert.
                init_random_dino_weights_(backbone)
                warn_random_init(backbone.arch.name)
                # pretraining here only selects the input normalisation (the architecture's default convention).
                report = LoadReport(backbone.arch.name, "none", "none", backbone.arch.default_pretraining, True)
                self.print_to_log_file("#" * 80 + f"\nWARNING: {report.describe()}\n" + "#" * 80)
            else:
                report = load_weights_into(backbone, path)
                self.print_to_log_file(f"DINO weights: {report.describe()}")
            self.on_backbone_loaded(backbone, report)
            reports.append(report)
        self._provenance = {"format": RECORD_FORMAT,
                            "weights_setting": self.dino_weights or os.environ.get(WEIGHTS_ENV_VAR),
                            "dino_weights": [_report_record(r) for r in reports], **self.extra_provenance()}
        with open(os.path.join(self.output_folder, "dino_weights.json"), "w") as f:
            json.dump({"weights_setting": self._provenance["weights_setting"],
                       "backbones": self._provenance["dino_weights"]}, f, indent=2)
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
        record = getattr(unwrap(self.network), "loaded_provenance", None)  # set by the network's load hook
        if record is not None:
            self._provenance = {k: v for k, v in record.items() if k != "slim"}
        where = filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else "a checkpoint"
        self.print_to_log_file(f"Network restored from {where} (epoch {self.current_epoch}); DINO weights: "
                               f"{describe_provenance(record) if record else 'not recorded (older checkpoint)'}. "
                               f"The DINO weight file is not read again.")

    def _limit_cpu_threads(self) -> None:
        # nnUNetv2_train -device cpu sets torch to every core before the trainer exists; several trainings (or test
        # workers) sharing a small CPU run several times faster with one thread each.
        threads = cpu_threads_setting()
        if threads is not None and self.device.type == "cpu":
            torch.set_num_threads(threads)
            self.print_to_log_file(f"CPU threads: {threads} ({CPU_THREADS_ENV_VAR}).")

    # -------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, plus the DINO provenance record, optionally slim, written atomically."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        net = unwrap(self.network)
        record = dict(self._provenance or {"format": RECORD_FORMAT, "dino_weights": []})
        strip = []
        if self.slim_checkpoints:
            slim = self._store_frozen_once(net)
            if slim["keys"]:  # a fully fine-tuned ViT has nothing frozen: the checkpoint stays complete
                record["slim"], strip = slim, slim["keys"]
        size = tensor_bytes(net.state_dict()) - sum(tensor_bytes(net.get_parameter(k)) for k in strip) + \
            tensor_bytes(self.optimizer.state_dict())
        with checkpoint_view(net, record, strip):
            write_checkpoint_atomically(filename, super().save_checkpoint, size)

    def _store_frozen_once(self, net: torch.nn.Module) -> dict:
        if self._frozen is None:
            keys = frozen_dino_keys(net)
            state = net.state_dict()
            tensors = {k: state[k] for k in keys}
            self._frozen = (keys, tensors_sha256(tensors))
            if not keys:
                self.print_to_log_file("Slim checkpoints requested, but no DINO weight is frozen: checkpoints stay "
                                       "complete.")
            else:
                path = store_frozen_tensors(self.output_folder_base, tensors, self._frozen[1])
                self.print_to_log_file(f"Slim checkpoints: {len(keys)} frozen DINO tensors "
                                       f"({tensor_bytes(tensors) / 2 ** 20:.0f} MB) stored once in {path}.")
        keys, sha = self._frozen
        return {"keys": keys, "sha256": sha, "file": frozen_file_name(sha),
                "dataset": self.plans_manager.dataset_name, "model_folder": os.path.basename(self.output_folder_base)}


def _report_record(report: LoadReport) -> dict:
    """A LoadReport as recorded: a random backbone says so instead of naming a pretraining set it never saw."""
    record = vars(report).copy()
    if report.random_init:
        record["pretraining"] = "none (random initialisation)"
        record["input_normalisation"] = report.pretraining
    return record
