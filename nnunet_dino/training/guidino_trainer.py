"""GuiDINOTrainer: nnU-Net's trainer with a GuidedUNet, GuiDINO's losses and per-group learning rates.

Every configuration: 2d, and 3d_fullres / 3d_lowres / 3d_cascade_fullres with the slice-wise guide volume
(guidance/slicewise.py; axis and stride from ``guidino.slice_axis`` / ``slice_stride``).

Everything configurable is a class attribute; trainer variants (trainers/) override one attribute each.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from ..backbone import DinoBackbone, LoadReport, lora_parameters, plans_intensity_properties
from ..guidance import SliceWiseGuidance
from ..networks import GuiDINOConfig, build_guided_unet
from .checkpoints import install_checkpoint_hooks
from .dino_trainer_base import DinoTrainerBase, unwrap
from .groupwise_optimizer import GroupwiseOptimizer
from .guide_reliance import ABLATIONS, ablated_guides, hard_counts, mean_dice
from .guidino_loss import TERMS, GuiDINOLoss
from .progress_logger import ExtraTermsLogger, log_group_learning_rates, weight_label
from .schedules import GroupPolyLRScheduler
from .unet_init import INIT_UNET_ENV_VAR, init_unet_from_stock

# Pseudo Dice a replaced guide must cost before the end-of-training note says the network uses DINO.
RELIANCE_NOTICE_LEVEL = 0.01


class GuiDINOTrainer(DinoTrainerBase):
    guidino: GuiDINOConfig = GuiDINOConfig()
    guide_loss_weight: float = 0.1
    hinge_loss_weight: float = 0.05
    hinge_margin: float = 1.0
    # nnU-Net's network keeps nnU-Net's SGD (1e-2, momentum 0.99, Nesterov). The guidance modules (TokenBook, gates,
    # input channel projection) and LoRA use AdamW as upstream's LoRA runs did: with SGD at momentum 0.99 less of the
    # TokenBook's information reached the prediction (guide reliance 0.10 vs 0.16, benchmarks/bench_guide_utility.py)
    # and a two-appearance class was not learned (docs/guidino.md, docs/benchmarks.md).
    # Every group follows nnU-Net's poly decay from its own rate. "sgd" restores the former all-SGD recipe.
    guidance_optimizer: str = "adamw"  # "adamw" | "sgd"
    lr_guidance: float = 1e-3  # with "sgd": 1e-2
    lr_lora: float = 5e-4  # with "sgd": 1e-3
    guidance_weight_decay: float = 1e-4
    # Starting the U-Net from the user's own stock nnU-Net model (training/unet_init.py, docs/guidino.md). None reads
    # $nnUNet_dino_init_unet, as DINO weights read theirs: stock nnUNetv2_train needs no new flag, and a variant can
    # still hard-wire a model folder or file here.
    init_unet: str | None = None
    require_init_unet: bool = False  # the _fromStock variants: their schedule only makes sense from a trained U-Net
    lr_unet: float | None = None  # the U-Net's ("segmentation") group; None: nnU-Net's initial_lr (1e-2)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.lr_unet is not None:  # nnU-Net's __init__ sets initial_lr on the instance: a class attribute can't
            self.initial_lr = self.lr_unet
        reliance_terms = tuple(f"guide_reliance_{a}" for a in ABLATIONS)
        self.logger.local_logger = ExtraTermsLogger(TERMS, val_only_terms=reliance_terms,
                                                    term_weights=self.loss_term_weights())
        self._loss_weights_logged = False

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        # A classmethod (nnU-Net's is static): the predictor calls it on the class stored in the checkpoint, so a
        # variant's configuration rebuilds exactly the trained structure.
        unet = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        num_output_channels, enable_deep_supervision)
        # The spacing only chooses the slicing axis of 3D patches (2D plans built by hand may not carry one).
        spacing = configuration_manager.spacing if len(configuration_manager.patch_size) == 3 else None
        return install_checkpoint_hooks(build_guided_unet(
            unet, cls.guidino, num_input_channels, num_output_channels, configuration_manager.patch_size,
            configuration_manager.normalization_schemes, plans_intensity_properties(plans_manager), spacing))

    @classmethod
    def dino_architecture_names(cls) -> list[str]:
        return [cls.guidino.dino_arch]

    def dino_backbones(self) -> list[DinoBackbone]:
        return [unwrap(self.network).guidance.backbone]

    def on_backbone_loaded(self, backbone: DinoBackbone, report: LoadReport) -> None:
        unwrap(self.network).guidance.adapter.set_pretraining(report.pretraining)

    def initialize(self):
        super().initialize()
        guidance = unwrap(self.network).guidance
        if isinstance(guidance, SliceWiseGuidance):  # which planes and which input channels the ViT sees
            self.print_to_log_file(f"GuiDINO 3D guide ({self.configuration_name}): {guidance.describe()}.")

    def on_train_start(self):
        # Fresh runs only: a resumed run's checkpoint holds the U-Net it trained (the stock start is in its
        # unet_init.json); --val never gets here. Before the DINO weights and the data: a wrong model fails at once.
        if not self.was_initialized:
            self.initialize()
        if not self._network_from_checkpoint:
            self._unet_init = init_unet_from_stock(self)
        elif self.init_unet or os.environ.get(INIT_UNET_ENV_VAR):
            self.print_to_log_file(f"Resuming: the U-Net comes from this run's checkpoint; the stock model setting "
                                   f"({INIT_UNET_ENV_VAR} / init_unet) is not used.")
        super().on_train_start()

    def extra_provenance(self) -> dict:
        record = getattr(self, "_unet_init", None)  # travels with the checkpoint, unlike unet_init.json
        return {"unet_init": {k: record[k] for k in ("checkpoint", "sha256", "checkpoint_trainer", "checkpoint_fold")}
                } if record else {}

    def _build_loss(self):
        lm = self.label_manager
        return GuiDINOLoss(super()._build_loss(), lambda: unwrap(self.network), lm.num_segmentation_heads,
                           lm.has_regions, lm.ignore_label if lm.has_ignore_label else None,
                           self.guide_loss_weight, self.hinge_loss_weight, self.hinge_margin)

    def configure_optimizers(self):
        net = unwrap(self.network)
        lora = list(lora_parameters(net.guidance.backbone))
        guidance = [p for m in (net.gates, net.guidance.tokenbook, net.guidance.adapter) for p in m.parameters()
                    if p.requires_grad]
        segmentation = [{"params": [p for p in net.unet.parameters() if p.requires_grad], "lr": self.initial_lr,
                         "name": "segmentation"}]
        dino = [{"params": guidance, "lr": self.lr_guidance, "name": "guidance"}]
        if lora:
            dino.append({"params": lora, "lr": self.lr_lora, "name": "lora"})
        if self.guidance_optimizer == "sgd":
            optimizer = torch.optim.SGD(segmentation + dino, self.initial_lr, weight_decay=self.weight_decay,
                                        momentum=0.99, nesterov=True)
        elif self.guidance_optimizer == "adamw":
            optimizer = GroupwiseOptimizer([
                torch.optim.SGD(segmentation, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                nesterov=True),
                torch.optim.AdamW(dino, self.lr_guidance, weight_decay=self.guidance_weight_decay)])
        else:
            raise ValueError(f"guidance_optimizer must be 'adamw' or 'sgd', got {self.guidance_optimizer!r}.")
        return optimizer, GroupPolyLRScheduler(optimizer, self.num_epochs)

    # -------------------------------------------------------------------------------- logging of the loss terms
    def train_step(self, batch: dict) -> dict:
        out = super().train_step(batch)
        out.update({k: v.cpu().numpy() for k, v in self.loss.last_terms.items()})
        return out

    def validation_step(self, batch: dict) -> dict:
        out = super().validation_step(batch)
        out.update({k: v.cpu().numpy() for k, v in self.loss.last_terms.items()})
        out.update(self._reliance_counts(batch))
        return out

    @torch.no_grad()
    def _reliance_counts(self, batch: dict) -> dict:
        """Hard counts of the same validation batch predicted with the guide replaced (see guide_reliance.py)."""
        net = unwrap(self.network)
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        target = target.to(self.device, non_blocking=True)
        out = {}
        for name, masks in ablated_guides(net.last_guide[1]).items():
            with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
                output = net.forward_with_guide(data, masks)
            output = output[0] if isinstance(output, (list, tuple)) else output
            counts = hard_counts(output, target, self.label_manager)
            out.update({f"{name}_{k}_hard": v for k, v in zip(("tp", "fp", "fn"), counts)})
        return out

    def loss_term_weights(self) -> dict[str, float]:
        """Each logged term's weight in the total loss (GuiDINOLoss: seg + w_guide * guide + w_hinge * hinge)."""
        return {"seg_loss": 1.0, "guide_loss": self.guide_loss_weight, "hinge_loss": self.hinge_loss_weight}

    def on_train_epoch_start(self):
        super().on_train_epoch_start()  # nnU-Net steps the scheduler and logs group 0's rate as 'lrs'
        if not self._loss_weights_logged:  # once per process: fresh and resumed runs both state it
            formula = self.logger.local_logger.total_loss_formula()
            self.print_to_log_file(f"Loss-term weights: {formula} (hinge margin {self.hinge_margin:g}); the loss "
                                   f"terms logged each epoch are unweighted.")
            self._loss_weights_logged = True
        log_group_learning_rates(self)

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        self._log_terms("train", train_outputs)

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        super().on_validation_epoch_end(val_outputs)
        self._log_terms("val", val_outputs)
        self._log_reliance(val_outputs)

    def _summed_counts(self, outputs: list[dict], prefix: str) -> tuple[np.ndarray, ...] | None:
        if not all(f"{prefix}tp_hard" in o for o in outputs):
            return None
        counts = [np.sum([o[f"{prefix}{c}_hard"] for o in outputs], 0) for c in ("tp", "fp", "fn")]
        if self.is_ddp:  # as nnU-Net sums its own counts over the ranks
            counts = [np.sum(_all_gather(c), 0) for c in counts]
        return tuple(counts)

    def _log_reliance(self, outputs: list[dict]) -> None:
        dice = mean_dice(*self._summed_counts(outputs, ""))
        parts = []
        for name in ABLATIONS:
            counts = self._summed_counts(outputs, f"{name}_")
            reliance = float("nan") if counts is None else dice - mean_dice(*counts)
            self.logger.log(f"val_guide_reliance_{name}", reliance, self.current_epoch)
            parts.append(f"{name} {reliance:+.4f}")
        self.print_to_log_file("guide reliance (pseudo Dice lost with the guide replaced): " + ", ".join(parts))

    def on_train_end(self):
        log = self.logger.local_logger.my_fantastic_logging
        last = {name: log[f"val_guide_reliance_{name}"][-1] for name in ABLATIONS
                if log.get(f"val_guide_reliance_{name}") and np.isfinite(log[f"val_guide_reliance_{name}"][-1])}
        if last:
            verdict = ("the network uses the DINO guide" if max(last.values()) >= RELIANCE_NOTICE_LEVEL else
                       "WARNING: the network barely uses the DINO guide; its prediction would be about as good "
                       "without it")
            self.print_to_log_file("Guide reliance at the last epoch: " + ", ".join(
                f"{k} {v:+.4f}" for k, v in last.items()) + f" pseudo Dice. {verdict}.")
        super().on_train_end()

    def _log_terms(self, phase: str, outputs: list[dict]) -> None:
        means = {t: float(np.mean([o[t] for o in outputs])) for t in TERMS}
        for term, value in means.items():
            self.logger.log(f"{phase}_{term}", value, self.current_epoch)
        weights = self.loss_term_weights()
        self.print_to_log_file(f"{phase} loss terms: " + ", ".join(
            f"{k} {v:.4f} ({weight_label(weights[k])})" for k, v in means.items()))


def _all_gather(array: np.ndarray) -> list[np.ndarray]:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, array)
    return gathered
