"""GuiDINO trainers for nnU-Net: ``nnUNetv2_train DATASET 2d FOLD -tr nnUNetTrainerGuiDINO``; every trainer here also
trains ``3d_fullres``, ``3d_lowres`` and ``3d_cascade_fullres`` (slice-wise DINO guidance, docs/guidino.md#3d).

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


class nnUNetTrainerGuiDINO_CPUPipeline(nnUNetTrainerGuiDINO_CPUSmoke):
    """Seconds on 2 CPU cores: checks that every stage of nnU-Net's pipeline runs (tests that assert files, logs,
    geometry and equality, never Dice). 2 epochs of 4 iterations at batch 4, the patch's short side mapped to 4
    DINO tokens."""
    epochs = 2
    iterations_per_epoch = 4
    val_iterations_per_epoch = 1
    max_batch_size = 4
    guidino = replace(GuiDINOTrainer.guidino, min_short_side_tokens=4)


class nnUNetTrainerGuiDINO_CPUSmoke3d(nnUNetTrainerGuiDINO):
    """The smallest 3D run that exercises the whole pipeline on 2 CPU cores (tests/test_e2e_guidino_3d.py): 8
    iterations of 2 patches; the ViT on every 4th plane at 4 tokens on the short side (Hippocampus 3d_fullres: 11 of
    40 planes of 6x4 tokens each). Learns nothing useful; checks that everything runs and agrees."""
    epochs = 2
    iterations_per_epoch = 4
    val_iterations_per_epoch = 1
    max_batch_size = 2
    mirroring = False
    guidino = replace(GuiDINOTrainer.guidino, min_short_side_tokens=4, slice_stride=4)


# ---- 3D slicing (docs/guidino.md#3d): which planes the ViT sees
class nnUNetTrainerGuiDINO_stride1(nnUNetTrainerGuiDINO):
    """The ViT on every plane of a 3D patch (no interpolated planes; about twice the ViT cost of the default)."""
    guidino = replace(GuiDINOTrainer.guidino, slice_stride=1)


class nnUNetTrainerGuiDINO_stride4(nnUNetTrainerGuiDINO):
    """The ViT on every 4th plane of a 3D patch (and the last); the others interpolated."""
    guidino = replace(GuiDINOTrainer.guidino, slice_stride=4)


class nnUNetTrainerGuiDINO_sliceAxis0(nnUNetTrainerGuiDINO):
    guidino = replace(GuiDINOTrainer.guidino, slice_axis=0)


class nnUNetTrainerGuiDINO_sliceAxis1(nnUNetTrainerGuiDINO):
    guidino = replace(GuiDINOTrainer.guidino, slice_axis=1)


class nnUNetTrainerGuiDINO_sliceAxis2(nnUNetTrainerGuiDINO):
    guidino = replace(GuiDINOTrainer.guidino, slice_axis=2)


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


# ---- fine-tuning your own stock nnU-Net model (set nnUNet_dino_init_unet; docs/guidino.md)
# nnU-Net's pretraining docs fine-tune with the normal schedule, but there the network meets a new dataset. Here the
# U-Net is already trained on this very data and only the guidance is new: nnU-Net's 1e-2 at momentum 0.99 would
# first undo part of the converged solution, and 1000 epochs would repeat the stock training's cost. So the U-Net
# starts at a tenth of nnU-Net's rate on a quarter of its schedule; guidance and LoRA keep their rates (they start
# from scratch). Not benchmarked yet; nnU-Net's own recipe is the plain nnUNetTrainerGuiDINO with the same setting.
class nnUNetTrainerGuiDINO_fromStock(nnUNetTrainerGuiDINO):
    """Stock U-Net fine-tuned at 1e-3 for 250 epochs while the guidance learns. Refuses to start without a stock
    model: this schedule would under-train a U-Net from scratch."""
    epochs = 250
    lr_unet = 1e-3
    require_init_unet = True


class nnUNetTrainerGuiDINO_fromStockFrozenUNet(nnUNetTrainerGuiDINO_fromStock):
    """The stock U-Net kept exactly (rate 0): only gates, TokenBook and LoRA learn, so any change in Dice is what
    the guide adds to your model."""
    lr_unet = 0.0


# ---- the README demo (./run_demo.sh, scripts/demo.py)
class nnUNetTrainerGuiDINO_Demo(nnUNetTrainerGuiDINO_CPUSmoke):
    """The demo's schedule: 4 epochs of 20 iterations on CPU. _CPUSmoke's 36 iterations without mirroring tied with
    predicting every pixel as head on HC18Tiny (test Dice 0.33); measured on 2026-12-01 (2-core CPU, random DINO
    weights), this schedule reached test Dice 0.74 and 0.76 in two runs (5 epochs: 0.77-0.80, about 25% more time).
    Mirroring stays on (augmentation and test-time mirroring): cheap for 4 small 2D test images."""
    epochs = 4
    iterations_per_epoch = 20
    mirroring = True


# ---- bf16 autocast instead of nnU-Net's fp16 + GradScaler (GPUs with native bf16: A100, H100, L4, RTX 30xx+;
# docs/gpu.md). Everything else is the variant named before _bf16.
from nnunet_dino.training.precision import BF16Mixin  # noqa: E402


class nnUNetTrainerGuiDINO_bf16(BF16Mixin, nnUNetTrainerGuiDINO):
    """GuiDINO (ViT-S/16 + LoRA) trained under bf16 autocast, without a GradScaler (as upstream GuiDINO trained)."""


class nnUNetTrainerGuiDINO_frozen_bf16(BF16Mixin, nnUNetTrainerGuiDINO_frozen):
    pass
