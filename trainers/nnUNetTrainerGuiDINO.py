"""GuiDINO trainers for nnU-Net: ``nnUNetv2_train DATASET 2d FOLD -tr nnUNetTrainerGuiDINO``.

Thin classes only: the logic is nnunet_dino.training.GuiDINOTrainer, and every variant changes one attribute.
nnU-Net imports this folder's modules as top-level modules, hence the absolute imports.
"""
from dataclasses import replace

from nnunet_dino.backbone import LoraSettings
from nnunet_dino.guidance import TokenBookConfig
from nnunet_dino.training import GuiDINOTrainer


class nnUNetTrainerGuiDINO(GuiDINOTrainer):
    """DINOv3 ViT-S/16 with LoRA guiding nnU-Net's own network (encoder stages and bottleneck)."""


# ---- schedules (nnU-Net's naming)
class nnUNetTrainerGuiDINO_5epochs(nnUNetTrainerGuiDINO):
    epochs = 5


class nnUNetTrainerGuiDINO_10epochs(nnUNetTrainerGuiDINO):
    epochs = 10


class nnUNetTrainerGuiDINO_50epochs(nnUNetTrainerGuiDINO):
    epochs = 50


class nnUNetTrainerGuiDINO_100epochs(nnUNetTrainerGuiDINO):
    epochs = 100


class nnUNetTrainerGuiDINO_250epochs(nnUNetTrainerGuiDINO):
    epochs = 250


class nnUNetTrainerGuiDINO_CPUSmoke(nnUNetTrainerGuiDINO):
    """A couple of minutes on 2 CPU cores: exercises the whole pipeline (smoke tests, README demo). Too short to
    learn small structures: on 2026-11-22 stock nnUNetTrainer with even 100 such iterations still predicted only
    background on HippoTiny (large ones, like HC18's fetal heads, are found: see tests/test_e2e_guidino_inputs.py)."""
    epochs = 3
    iterations_per_epoch = 12
    val_iterations_per_epoch = 2
    max_batch_size = 8
    mirroring = False  # 4x cheaper validation and prediction on CPU
    guidino = replace(GuiDINOTrainer.guidino, min_short_side_tokens=8)


# ---- ablations
class nnUNetTrainerGuiDINO_noHinge(nnUNetTrainerGuiDINO):
    hinge_loss_weight = 0.0


class nnUNetTrainerGuiDINO_frozen(nnUNetTrainerGuiDINO):
    """Frozen DINO (no LoRA): deterministic features, lower memory."""
    guidino = replace(GuiDINOTrainer.guidino, lora=None)


class nnUNetTrainerGuiDINO_paper(nnUNetTrainerGuiDINO):
    """Ablation: the published TokenBook and gating (mean over prototypes, mask 0.5 s + 0.5, one foreground guide,
    pure multiplication at the bottleneck) inside this plugin's otherwise unchanged training. It is not upstream's
    whole recipe: it keeps LoRA, the hinge loss (0.05), this plugin's optimiser groups, 16 prototypes (upstream:
    (image/16)^2), a 256-d projection (upstream: token width) and area-averaged guide targets (upstream: nearest
    downsampling). docs/guidino.md lists these; benchmarks/bench_guide_utility.py measures it (``tokens_paper``)."""
    guidino = replace(GuiDINOTrainer.guidino, tokenbook=TokenBookConfig(mode="paper"), gate_places=("bottleneck",),
                      gate_mode="multiplicative")


class nnUNetTrainerGuiDINO_sgdGuidance(nnUNetTrainerGuiDINO):
    """The former recipe: nnU-Net's SGD (momentum 0.99) for everything, guidance 1e-2, LoRA 1e-3 (ablation)."""
    guidance_optimizer = "sgd"
    lr_guidance = 1e-2
    lr_lora = 1e-3


class nnUNetTrainerGuiDINO_decoderGates(nnUNetTrainerGuiDINO):
    """Gate every stage: input, encoder, bottleneck and decoder."""
    guidino = replace(GuiDINOTrainer.guidino, gate_places=("input", "encoder", "bottleneck", "decoder"))


class nnUNetTrainerGuiDINO_loraMLP(nnUNetTrainerGuiDINO):
    guidino = replace(GuiDINOTrainer.guidino, lora=LoraSettings(mlp=True))


# ---- DINOv3 sizes (weights: Meta's file of that size)
class nnUNetTrainerGuiDINO_vitsplus(nnUNetTrainerGuiDINO):
    guidino = replace(GuiDINOTrainer.guidino, dino_arch="dinov3_vits16plus")


class nnUNetTrainerGuiDINO_vitb(nnUNetTrainerGuiDINO):
    guidino = replace(GuiDINOTrainer.guidino, dino_arch="dinov3_vitb16")


class nnUNetTrainerGuiDINO_vitl(nnUNetTrainerGuiDINO):
    guidino = replace(GuiDINOTrainer.guidino, dino_arch="dinov3_vitl16")
