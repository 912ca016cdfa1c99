"""GuiDINOTrainer: nnU-Net's trainer with a GuidedUNet, GuiDINO's losses and per-group learning rates.

Everything configurable is a class attribute; trainer variants (trainers/) override one attribute each.
"""
from __future__ import annotations

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from ..backbone import DinoBackbone, LoadReport, lora_parameters
from ..networks import GuiDINOConfig, build_guided_unet
from .dino_trainer_base import DinoTrainerBase, unwrap
from .guidino_loss import TERMS, GuiDINOLoss
from .progress_logger import ExtraTermsLogger
from .schedules import GroupPolyLRScheduler


class GuiDINOTrainer(DinoTrainerBase):
    guidino: GuiDINOConfig = GuiDINOConfig()
    guide_loss_weight: float = 0.1
    hinge_loss_weight: float = 0.05
    hinge_margin: float = 1.0
    # SGD with nnU-Net's momentum and poly decay for every group; the segmentation network keeps nnU-Net's 1e-2.
    lr_guidance: float = 1e-2  # TokenBook, gates, input channel projection
    lr_lora: float = 1e-3

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.logger.local_logger = ExtraTermsLogger(TERMS)

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        # A classmethod (nnU-Net's is static): the predictor calls it on the class stored in the checkpoint, so a
        # variant's configuration rebuilds exactly the trained structure.
        unet = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        num_output_channels, enable_deep_supervision)
        return build_guided_unet(unet, cls.guidino, num_input_channels, num_output_channels,
                                 configuration_manager.patch_size, configuration_manager.normalization_schemes)

    def dino_backbones(self) -> list[DinoBackbone]:
        return [unwrap(self.network).guidance.backbone]

    def on_backbone_loaded(self, backbone: DinoBackbone, report: LoadReport) -> None:
        unwrap(self.network).guidance.adapter.set_pretraining(report.pretraining)

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
        groups = [{"params": [p for p in net.unet.parameters() if p.requires_grad], "lr": self.initial_lr,
                   "name": "segmentation"},
                  {"params": guidance, "lr": self.lr_guidance, "name": "guidance"}]
        if lora:
            groups.append({"params": lora, "lr": self.lr_lora, "name": "lora"})
        optimizer = torch.optim.SGD(groups, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                    nesterov=True)
        return optimizer, GroupPolyLRScheduler(optimizer, self.num_epochs)

    # -------------------------------------------------------------------------------- logging of the loss terms
    def train_step(self, batch: dict) -> dict:
        out = super().train_step(batch)
        out.update({k: v.cpu().numpy() for k, v in self.loss.last_terms.items()})
        return out

    def validation_step(self, batch: dict) -> dict:
        out = super().validation_step(batch)
        out.update({k: v.cpu().numpy() for k, v in self.loss.last_terms.items()})
        return out

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        self._log_terms("train", train_outputs)

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        super().on_validation_epoch_end(val_outputs)
        self._log_terms("val", val_outputs)

    def _log_terms(self, phase: str, outputs: list[dict]) -> None:
        means = {t: float(np.mean([o[t] for o in outputs])) for t in TERMS}
        for term, value in means.items():
            self.logger.log(f"{phase}_{term}", value, self.current_epoch)
        self.print_to_log_file(f"{phase} loss terms: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
