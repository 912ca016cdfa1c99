"""MedDINOv3Trainer: nnU-Net's trainer with MedDINOv3's network and optimisation (AdamW, two learning rates, linear
decay), and without deep supervision.

Everything configurable is a class attribute; trainer variants (trainers/) override one attribute each.
"""
from __future__ import annotations

import torch

from ..backbone import DinoBackbone, LoadReport, plans_intensity_properties
from ..networks.meddinov3 import MedDINOv3Config, build_meddinov3
from .checkpoints import install_checkpoint_hooks
from .dino_trainer_base import DinoTrainerBase, require_2d_patch, unwrap
from .progress_logger import ExtraTermsLogger, log_group_learning_rates
from .schedules import GroupPolyLRScheduler


class MedDINOv3Trainer(DinoTrainerBase):
    meddinov3: MedDINOv3Config = MedDINOv3Config()
    lr_decoder: float = 3e-4  # decoder and the input channel projection
    lr_vit: float = 3e-5  # every ViT weight, when fully fine-tuned (the paper's setting)
    lr_lora: float = 3e-4  # zero-initialised adapters need the larger rate (not in the paper: it fine-tunes fully)
    adamw_betas: tuple[float, float] = (0.9, 0.98)
    adamw_weight_decay: float = 0.05

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        require_2d_patch(type(self), plans, configuration)  # MedDINOv3 decodes one 2D token map
        super().__init__(plans, configuration, fold, dataset_json, device)
        # One output: nnU-Net then builds neither deep-supervision targets (_get_deep_supervision_scales -> None)
        # nor the DeepSupervisionWrapper around its Dice+CE loss (_build_loss).
        self.enable_deep_supervision = False
        self.initial_lr = self.lr_decoder
        self.weight_decay = self.adamw_weight_decay
        # nnU-Net's logger plots group 0's rate only; this one logs and plots every group's (lr_<name>).
        self.logger.local_logger = ExtraTermsLogger()

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        # nnU-Net's signature, as a classmethod: the predictor calls it on the class stored in the checkpoint, so a
        # variant's configuration rebuilds exactly the trained structure. enable_deep_supervision is accepted for that
        # signature only: the network always has a single output (MedDINOv3 has no deep supervision).
        return install_checkpoint_hooks(build_meddinov3(
            cls.meddinov3, num_input_channels, num_output_channels, configuration_manager.patch_size,
            configuration_manager.normalization_schemes, plans_intensity_properties(plans_manager)))

    @classmethod
    def dino_architecture_names(cls) -> list[str]:
        return [cls.meddinov3.dino_arch]

    def initialize(self):
        if self.enable_deep_supervision:
            raise ValueError(f"{self.__class__.__name__}: the MedDINOv3 network has a single output, so "
                             f"enable_deep_supervision must stay False (a subclass set it to True).")
        super().initialize()

    def dino_backbones(self) -> list[DinoBackbone]:
        return [unwrap(self.network).backbone]

    def on_backbone_loaded(self, backbone: DinoBackbone, report: LoadReport) -> None:
        # CT channels: via HU into MedDINOv3's HU clip + z-score, or an HU window into [0, 1] + the LVD/SAT stats;
        # channels nnU-Net rescaled to [0, 1]: the LVD/SAT stats (none for MedDINOv3's CT weights).
        unwrap(self.network).adapter.set_pretraining(report.pretraining)

    def parameter_groups(self) -> list[dict]:
        """AdamW groups: 'decoder' (decoder + input projection) and, unless the ViT is frozen, 'vit' (every ViT
        weight, full fine-tuning) or 'lora' (the adapters only)."""
        net = unwrap(self.network)
        head = [p for m in (net.decoder, net.adapter) for p in m.parameters() if p.requires_grad]
        vit = [p for p in net.backbone.parameters() if p.requires_grad]
        groups = [{"params": head, "lr": self.lr_decoder, "name": "decoder"}]
        if vit:
            lora = self.meddinov3.finetune == "lora"
            groups.append({"params": vit, "lr": self.lr_lora if lora else self.lr_vit,
                           "name": "lora" if lora else "vit"})
        grouped = {id(p) for g in groups for p in g["params"]}
        trainable = {id(p) for p in net.parameters() if p.requires_grad}
        if grouped != trainable:  # a new trainable module must be assigned a learning rate deliberately
            raise RuntimeError(f"{len(trainable - grouped)} trainable parameters are in no optimiser group.")
        return groups

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.lr_decoder, betas=self.adamw_betas,
                                      weight_decay=self.adamw_weight_decay)
        # linear decay to 0 (the paper) = nnU-Net's poly schedule with exponent 1, per group from its own lr
        return optimizer, GroupPolyLRScheduler(optimizer, self.num_epochs, exponent=1.0)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()  # steps the scheduler
        log_group_learning_rates(self)
