"""SegDINO v1 / v2 trainers: nnU-Net's trainer with a SegDINO network, nnU-Net's own loss, AdamW.

- Loss: nnU-Net's (Dice+CE for labels, Dice+BCE for regions; with deep supervision its DeepSupervisionWrapper and
  normalised weights), unchanged. Upstream trains with BCE only and binary targets.
- Optimiser: AdamW as upstream (head 1e-4, torch's default weight decay 1e-2), with nnU-Net's poly decay per
  parameter group (GroupPolyLRScheduler): head, and where they train LoRA adapters (5e-4) or the whole ViT (1e-5).
- Deep supervision: only SegDINOv2 with ``deep_supervision=True`` has it; everything else trains a single output,
  so ``enable_deep_supervision`` is switched off before nnU-Net builds its loss and data loaders.

Everything configurable is a class attribute; trainer variants (trainers/) override one attribute each.
"""
from __future__ import annotations

import torch

from ..backbone import DinoBackbone, LoadReport, plans_intensity_properties
from ..networks.segdino import SegDINOConfig, build_segdino
from ..networks.segdino_v2 import SegDINOv2Config, build_segdino_v2
from .checkpoints import install_checkpoint_hooks
from .dino_trainer_base import DinoTrainerBase, require_2d_patch, unwrap
from .progress_logger import ExtraTermsLogger, log_group_learning_rates
from .schedules import GroupPolyLRScheduler


class SegDINOTrainerBase(DinoTrainerBase):
    lr_head: float = 1e-4  # upstream's AdamW learning rate
    lr_lora: float = 5e-4  # LoRA variants (GuiDINO upstream's LoRA rate)
    lr_backbone: float = 1e-5  # full fine-tuning variants: the pretrained ViT moves 10x slower than the head
    adamw_weight_decay: float = 1e-2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        require_2d_patch(type(self), plans, configuration)  # SegDINO decodes one 2D token map
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.lr_head  # what nnU-Net logs as the learning rate (group 0: the head)
        self.weight_decay = self.adamw_weight_decay
        self.enable_deep_supervision = self.network_has_deep_supervision()
        # nnU-Net's logger plots group 0's rate only; this one logs and plots every group's (lr_<name>).
        self.logger.local_logger = ExtraTermsLogger()

    @classmethod
    def network_has_deep_supervision(cls) -> bool:
        return False

    def initialize(self):
        super().initialize()
        net = unwrap(self.network)
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        total = sum(p.numel() for p in net.parameters())
        encoder = net.encoder
        self.print_to_log_file(f"{type(net).__name__}: {trainable:,} trainable of {total:,} parameters; DINO "
                               f"{encoder.backbone.arch.name} {encoder.tuning}, taps {list(encoder.layers)}, "
                               f"ViT input {encoder.adapter.padded_hw} for patch {encoder.patch_hw}.")

    # -------------------------------------------------------------------------------- DINO weights
    def dino_backbones(self) -> list[DinoBackbone]:
        return [unwrap(self.network).encoder.backbone]

    def on_backbone_loaded(self, backbone: DinoBackbone, report: LoadReport) -> None:
        unwrap(self.network).encoder.adapter.set_pretraining(report.pretraining)

    # -------------------------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        net = unwrap(self.network)
        vit = net.encoder.backbone.vit
        in_vit = {id(p) for p in vit.parameters()}
        head = [p for p in net.parameters() if p.requires_grad and id(p) not in in_vit]
        lora = [p for n, p in vit.named_parameters() if p.requires_grad and "lora_" in n]
        backbone = [p for n, p in vit.named_parameters() if p.requires_grad and "lora_" not in n]
        groups = [{"params": head, "lr": self.lr_head, "name": "head"}]
        if lora:
            groups.append({"params": lora, "lr": self.lr_lora, "name": "lora"})
        if backbone:
            groups.append({"params": backbone, "lr": self.lr_backbone, "name": "backbone"})
        optimizer = torch.optim.AdamW(groups, lr=self.lr_head, weight_decay=self.weight_decay)
        return optimizer, GroupPolyLRScheduler(optimizer, self.num_epochs)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()  # steps the scheduler
        log_group_learning_rates(self)

    # -------------------------------------------------------------------------------- deep supervision
    def set_deep_supervision_enabled(self, enabled: bool):
        # nnU-Net calls this before training (with enable_deep_supervision), and with False / True around its final
        # validation, also when deep supervision is off: a network without it must stay single-output.
        unwrap(self.network).deep_supervision = bool(enabled) and self.enable_deep_supervision


class SegDINOTrainer(SegDINOTrainerBase):
    segdino: SegDINOConfig = SegDINOConfig()

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        # A classmethod (nnU-Net's is static): the predictor calls it on the class stored in the checkpoint, so a
        # variant's configuration rebuilds exactly the trained structure. SegDINO (v1) has a single output whatever
        # enable_deep_supervision says.
        return install_checkpoint_hooks(build_segdino(
            cls.segdino, num_input_channels, num_output_channels, configuration_manager.patch_size,
            configuration_manager.normalization_schemes, plans_intensity_properties(plans_manager)))

    @classmethod
    def dino_architecture_names(cls) -> list[str]:
        return [cls.segdino.dino_arch]


class SegDINOv2Trainer(SegDINOTrainerBase):
    segdino_v2: SegDINOv2Config = SegDINOv2Config()

    @classmethod
    def network_has_deep_supervision(cls) -> bool:
        return cls.segdino_v2.deep_supervision

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        # Auxiliary heads exist whenever the configuration has deep supervision (strict loading in the predictor,
        # which passes enable_deep_supervision=False); the flag only switches the extra outputs on.
        return install_checkpoint_hooks(build_segdino_v2(
            cls.segdino_v2, num_input_channels, num_output_channels, configuration_manager.patch_size,
            configuration_manager.normalization_schemes, configuration_manager.pool_op_kernel_sizes,
            enable_deep_supervision, intensity_properties=plans_intensity_properties(plans_manager)))

    @classmethod
    def dino_architecture_names(cls) -> list[str]:
        return [cls.segdino_v2.dino_arch]

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        try:
            super().load_checkpoint(filename_or_checkpoint)
        except ValueError as e:  # the optimiser state of an older run still holds the dropped head's tensors
            if not getattr(unwrap(self.network), "dropped_untrained_head", False):
                raise
            raise RuntimeError(
                "This checkpoint was written before 2026-12-02 by a SegDINOv2 with deep supervision that still had "
                "a head for its coarsest output (never trained: nnU-Net weights that output 0). Its network predicts "
                "unchanged with nnUNetv2_predict, but its optimiser state cannot continue training in this version. "
                "Start this fold's training again (without --c), or finish it with the nnunet-dino version that "
                "began it.") from e
