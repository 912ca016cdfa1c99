"""MedDINOv3 trainers for nnU-Net: ``nnUNetv2_train DATASET 2d FOLD -tr nnUNetTrainerMedDINOv3`` (or a high-resolution
configuration such as 2d_896 made by ``nnUNetv2_dino_add_highres_plans``).

Thin classes only: the logic is nnunet_dino.training.MedDINOv3Trainer, and every variant changes one attribute.
nnU-Net imports this folder's modules as top-level modules, hence the absolute imports.
"""
from dataclasses import replace

from nnunet_dino.backbone import CTIntensity, LoraSettings
from nnunet_dino.training import MedDINOv3Trainer


class nnUNetTrainerMedDINOv3(MedDINOv3Trainer):
    """DINOv3 ViT-B/16, fully fine-tuned, tokens of blocks [2, 5, 8, 11] -> transposed-conv decoder (the paper)."""


# ---- schedules (nnU-Net's naming)
class nnUNetTrainerMedDINOv3_5epochs(nnUNetTrainerMedDINOv3):
    epochs = 5


class nnUNetTrainerMedDINOv3_10epochs(nnUNetTrainerMedDINOv3):
    epochs = 10


class nnUNetTrainerMedDINOv3_50epochs(nnUNetTrainerMedDINOv3):
    epochs = 50


class nnUNetTrainerMedDINOv3_100epochs(nnUNetTrainerMedDINOv3):
    epochs = 100


class nnUNetTrainerMedDINOv3_250epochs(nnUNetTrainerMedDINOv3):
    epochs = 250


class nnUNetTrainerMedDINOv3_CPUSmoke(nnUNetTrainerMedDINOv3):
    """Exercises the whole pipeline on a small CPU (tests); far too short to learn. To keep ViT-B cheap, small patches
    are not upsampled (HippoTiny's 56x40 is padded to 64x48: 4x3 tokens) and there is no mirroring (augmentation and
    test-time), which divides the cost of nnU-Net's final validation and of prediction by 4 in 2D."""
    epochs = 1
    iterations_per_epoch = 3
    val_iterations_per_epoch = 1
    batch_size = 2
    mirroring = False
    meddinov3 = replace(MedDINOv3Trainer.meddinov3, min_short_side_tokens=1)


# ---- fine-tuning modes
class nnUNetTrainerMedDINOv3_LoRA(nnUNetTrainerMedDINOv3):
    """Base ViT frozen; LoRA (rank 8, alpha 16) on the attention projections, trained at lr_lora."""
    meddinov3 = replace(MedDINOv3Trainer.meddinov3, finetune="lora")


class nnUNetTrainerMedDINOv3_LoRA_5epochs(nnUNetTrainerMedDINOv3_LoRA):
    epochs = 5


class nnUNetTrainerMedDINOv3_LoRAMLP(nnUNetTrainerMedDINOv3):
    """LoRA on the attention and MLP layers."""
    meddinov3 = replace(MedDINOv3Trainer.meddinov3, finetune="lora", lora=LoraSettings(mlp=True))


class nnUNetTrainerMedDINOv3_frozen(nnUNetTrainerMedDINOv3):
    """Frozen ViT (deterministic features), only the decoder trains."""
    meddinov3 = replace(MedDINOv3Trainer.meddinov3, finetune="frozen")


# ---- CT intensities
class nnUNetTrainerMedDINOv3_nnunetCT(nnUNetTrainerMedDINOv3):
    """CT channels reach the ViT as nnU-Net's z-score, as in upstream MedDINOv3's fine-tuning code (the default maps
    them through HU into the weights' pretraining convention, docs/meddinov3.md)."""
    meddinov3 = replace(MedDINOv3Trainer.meddinov3, ct_intensity=CTIntensity(mode="nnunet"))


# ---- DINO sizes (weights: Meta's file of that size; MedDINOv3's CT weights exist for ViT-B only)
class nnUNetTrainerMedDINOv3_vits(nnUNetTrainerMedDINOv3):
    meddinov3 = replace(MedDINOv3Trainer.meddinov3, dino_arch="dinov3_vits16")


class nnUNetTrainerMedDINOv3_vitl(nnUNetTrainerMedDINOv3):
    meddinov3 = replace(MedDINOv3Trainer.meddinov3, dino_arch="dinov3_vitl16")


# ---- bf16 autocast instead of nnU-Net's fp16 + GradScaler (GPUs with native bf16: A100, H100, L4, RTX 30xx+;
# docs/gpu.md). Everything else is the variant named before _bf16.
from nnunet_dino.training.precision import BF16Mixin  # noqa: E402


class nnUNetTrainerMedDINOv3_bf16(BF16Mixin, nnUNetTrainerMedDINOv3):
    """MedDINOv3 (ViT-B/16, fully fine-tuned) under bf16 autocast, without a GradScaler."""


class nnUNetTrainerMedDINOv3_LoRA_bf16(BF16Mixin, nnUNetTrainerMedDINOv3_LoRA):
    pass
