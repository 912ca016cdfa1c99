"""SegDINO v1 and v2 trainers for nnU-Net: ``nnUNetv2_train DATASET 2d FOLD -tr nnUNetTrainerSegDINO`` (or
``nnUNetTrainerSegDINOv2``).

Thin classes only: the logic is nnunet_dino.training.SegDINOTrainer / SegDINOv2Trainer, and every variant changes
one attribute. nnU-Net imports this folder's modules as top-level modules, hence the absolute imports.
"""
from dataclasses import replace

from nnunet_dino.training import SegDINOTrainer, SegDINOv2Trainer


# ==================================================================================================== SegDINO (v1)
class _CPUSmokeSchedule:
    """Seconds of training on 2 CPU cores: exercises the pipeline (tests). Far too short to learn. A 2-token minimum
    (Hippocampus' 56x40 patch is only padded, to 4x3 tokens) and no mirroring (nor test-time mirroring: 4x cheaper
    validation and prediction) keep it cheap."""
    epochs = 2
    iterations_per_epoch = 4
    val_iterations_per_epoch = 1
    max_batch_size = 4
    mirroring = False  # DinoTrainerBase: no mirror augmentation, no test-time mirroring


class nnUNetTrainerSegDINO(SegDINOTrainer):
    """The paper: frozen DINOv3 ViT-S/16, taps [2, 5, 8, 11], head at H/16 with a x16 bilinear upsample."""


# ---- schedules (nnU-Net's naming)
class nnUNetTrainerSegDINO_5epochs(nnUNetTrainerSegDINO):
    epochs = 5


class nnUNetTrainerSegDINO_10epochs(nnUNetTrainerSegDINO):
    epochs = 10


class nnUNetTrainerSegDINO_50epochs(nnUNetTrainerSegDINO):
    epochs = 50


class nnUNetTrainerSegDINO_100epochs(nnUNetTrainerSegDINO):
    epochs = 100


class nnUNetTrainerSegDINO_250epochs(nnUNetTrainerSegDINO):
    epochs = 250


class nnUNetTrainerSegDINO_CPUSmoke(_CPUSmokeSchedule, nnUNetTrainerSegDINO):
    segdino = replace(SegDINOTrainer.segdino, min_short_side_tokens=2)


# ---- head resolution, tuning, size
class nnUNetTrainerSegDINO_quarterResHead(nnUNetTrainerSegDINO):
    """The later upstream head: features fused at H/4 (tap 1 through a x4 transposed conv), x4 upsample."""
    segdino = replace(SegDINOTrainer.segdino, head_stride=4)


class nnUNetTrainerSegDINO_lora(nnUNetTrainerSegDINO):
    """LoRA (rank 8, alpha 16, attention projections) on the otherwise frozen DINO."""
    segdino = replace(SegDINOTrainer.segdino, tuning="lora")


class nnUNetTrainerSegDINO_fullFT(nnUNetTrainerSegDINO):
    """The whole ViT trains (lr 1e-5; head 1e-4)."""
    segdino = replace(SegDINOTrainer.segdino, tuning="full")


class nnUNetTrainerSegDINO_vitb(nnUNetTrainerSegDINO):
    segdino = replace(SegDINOTrainer.segdino, dino_arch="dinov3_vitb16")


class nnUNetTrainerSegDINO_vitl(nnUNetTrainerSegDINO):
    """ViT-L/16: taps [4, 11, 17, 23] as in the paper."""
    segdino = replace(SegDINOTrainer.segdino, dino_arch="dinov3_vitl16")


# ==================================================================================================== SegDINOv2
class nnUNetTrainerSegDINOv2(SegDINOv2Trainer):
    """Frozen DINOv3 ViT-S/16, Token Pyramid Adaptation + Scale-Aware Decoding (d 256), single output."""


class nnUNetTrainerSegDINOv2_5epochs(nnUNetTrainerSegDINOv2):
    epochs = 5


class nnUNetTrainerSegDINOv2_10epochs(nnUNetTrainerSegDINOv2):
    epochs = 10


class nnUNetTrainerSegDINOv2_50epochs(nnUNetTrainerSegDINOv2):
    epochs = 50


class nnUNetTrainerSegDINOv2_100epochs(nnUNetTrainerSegDINOv2):
    epochs = 100


class nnUNetTrainerSegDINOv2_250epochs(nnUNetTrainerSegDINOv2):
    epochs = 250


class nnUNetTrainerSegDINOv2_CPUSmoke(_CPUSmokeSchedule, nnUNetTrainerSegDINOv2):
    segdino_v2 = replace(SegDINOv2Trainer.segdino_v2, min_short_side_tokens=2)


class nnUNetTrainerSegDINOv2_deepSupervision(nnUNetTrainerSegDINOv2):
    """Deep supervision from the SAD levels at nnU-Net's deep-supervision scales, with nnU-Net's weights."""
    segdino_v2 = replace(SegDINOv2Trainer.segdino_v2, deep_supervision=True)


class nnUNetTrainerSegDINOv2_deepSupervision_CPUSmoke(nnUNetTrainerSegDINOv2_CPUSmoke):
    segdino_v2 = replace(nnUNetTrainerSegDINOv2_CPUSmoke.segdino_v2, deep_supervision=True)


class nnUNetTrainerSegDINOv2_lora(nnUNetTrainerSegDINOv2):
    segdino_v2 = replace(SegDINOv2Trainer.segdino_v2, tuning="lora")


class nnUNetTrainerSegDINOv2_fullFT(nnUNetTrainerSegDINOv2):
    segdino_v2 = replace(SegDINOv2Trainer.segdino_v2, tuning="full")


class nnUNetTrainerSegDINOv2_vitb(nnUNetTrainerSegDINOv2):
    segdino_v2 = replace(SegDINOv2Trainer.segdino_v2, dino_arch="dinov3_vitb16")


class nnUNetTrainerSegDINOv2_vitl(nnUNetTrainerSegDINOv2):
    segdino_v2 = replace(SegDINOv2Trainer.segdino_v2, dino_arch="dinov3_vitl16")


# ==================================================================================================== bf16
# bf16 autocast instead of nnU-Net's fp16 + GradScaler (GPUs with native bf16: A100, H100, L4, RTX 30xx+;
# docs/gpu.md). Everything else is the variant named before _bf16.
from nnunet_dino.training.precision import BF16Mixin  # noqa: E402


class nnUNetTrainerSegDINO_bf16(BF16Mixin, nnUNetTrainerSegDINO):
    pass


class nnUNetTrainerSegDINOv2_bf16(BF16Mixin, nnUNetTrainerSegDINOv2):
    pass


class nnUNetTrainerSegDINOv2_deepSupervision_bf16(BF16Mixin, nnUNetTrainerSegDINOv2_deepSupervision):
    pass
