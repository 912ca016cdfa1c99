"""The arms of the guide-utility benchmark (bench_guide_utility.py): GuiDINO trained with guides of KNOWN
information content, and how it is evaluated.

Every guided arm is the real GuiDINO trainer (nnU-Net's data loading, augmentation, loss with deep supervision, the
guide and hinge terms, the optimiser groups, the online validation with guide-reliance logging) on a network whose
input carries two things: the image channels, which the U-Net sees, and *guide-source* channels, which only the
guidance branch sees: the image (the real DINO chain) or the one-hot labels, from which
nnunet_dino/guidance/known_guides.py makes a guide of known information content (its docstring lists the kinds).
2D and 3D configurations alike: for a 3D patch the branch is GuiDINO's slice-wise one, and the known guides are made
per plane (``KnownSliceWiseGuidance``).

At test time the source channels are the case's own labels (or image), another case's (``shuffled``: cases taken
in a rotated order, centre-cropped/zero-padded to this case's shape), or the case's own with every guide replaced
by its spatial mean (``constant``). The U-Net always sees the case's own image.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_dino.backbone.ct_intensity import plans_intensity_properties
from nnunet_dino.guidance import dense_targets
from nnunet_dino.guidance.known_guides import known_guidance
from nnunet_dino.networks import GuidedUNet, build_guidance
from nnunet_dino.training import GuiDINOTrainer


class SourceSplitGuidedUNet(GuidedUNet):
    """GuidedUNet on [image channels | guide-source channels]: the U-Net gets the first ``n_image`` channels, the
    guidance branch the rest. ``ablation = "constant"`` replaces each guide by its spatial mean."""

    def __init__(self, *args, n_image: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.n_image = n_image
        self.ablation: str | None = None

    def forward(self, x: torch.Tensor):
        scores, masks = self.guidance(x[:, self.n_image:])
        if self.ablation == "constant":
            masks = masks.mean(dim=tuple(range(2, masks.ndim)), keepdim=True).expand_as(masks)  # 2D or 3D
        out = self.forward_with_guide(x, masks)
        self.last_guide = (scores, masks)
        return out

    def forward_with_guide(self, x: torch.Tensor, masks: torch.Tensor):
        return super().forward_with_guide(x[:, : self.n_image], masks)


def guide_source(kind: str, image: torch.Tensor, target: torch.Tensor, num_outputs: int, has_regions: bool,
                 ignore_label: int | None) -> torch.Tensor:
    """The guide-source channels for a batch: the image, or the one-hot labels (ignored pixels: all zero)."""
    if kind == "image":
        return image
    onehot, valid = dense_targets(target, num_outputs, has_regions, ignore_label)
    return onehot * valid


class _BenchSchedule:
    """Common schedule of every arm (set by the driver through class attributes), no final validation (the
    driver evaluates the fold's validation cases itself, with the guide replaced too)."""
    bench_epochs = 8
    bench_iterations = 40
    bench_val_iterations = 4
    bench_batch = 8

    def _apply_bench_schedule(self):
        self.num_epochs = self.bench_epochs
        self.num_iterations_per_epoch = self.bench_iterations
        self.num_val_iterations_per_epoch = self.bench_val_iterations
        self.configuration_manager.configuration["batch_size"] = self.bench_batch
        self.save_every = 10 ** 6  # only the final checkpoint

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("guide-utility benchmark: nnU-Net's final validation skipped (evaluated by the driver)")


class BenchStockTrainer(_BenchSchedule, nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # nnU-Net records these names: keep the signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._apply_bench_schedule()


class BenchGuidedTrainer(_BenchSchedule, GuiDINOTrainer):
    """GuiDINOTrainer whose network takes [image | guide source]; ``guide_kind`` says what the source is."""
    guide_kind = "image"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # nnU-Net records these names: keep the signature
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._apply_bench_schedule()

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        unet = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        num_output_channels, enable_deep_supervision)
        from_image = cls.guide_kind == "image"
        source_channels = num_input_channels if from_image else num_output_channels
        three_d = len(configuration_manager.patch_size) == 3
        base = build_guidance(cls.guidino, source_channels, num_output_channels, configuration_manager.patch_size,
                              configuration_manager.normalization_schemes if from_image else None,
                              plans_intensity_properties(plans_manager) if from_image else None,
                              configuration_manager.spacing if three_d else None)  # 3D: slice-wise, as GuiDINO
        guidance = known_guidance(base, cls.guide_kind, num_output_channels)
        return SourceSplitGuidedUNet(unet, guidance, cls.guidino.gate_places, cls.guidino.gate_mode, num_input_channels,
                                     n_image=num_input_channels)

    def _with_source(self, batch: dict) -> dict:
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        lm = self.label_manager
        source = guide_source(self.guide_kind, batch["data"], target, lm.num_segmentation_heads, lm.has_regions,
                              lm.ignore_label if lm.has_ignore_label else None)
        return dict(batch, data=torch.cat([batch["data"], source.to(batch["data"].dtype)], 1))

    def train_step(self, batch: dict) -> dict:
        return super().train_step(self._with_source(batch))

    def validation_step(self, batch: dict) -> dict:
        return super().validation_step(self._with_source(batch))


def fit_to_shape(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Centre-crop / zero-pad the trailing dims of ``array`` (C, ...) to ``shape``."""
    out = np.zeros((array.shape[0],) + tuple(shape), dtype=array.dtype)
    src, dst = [slice(None)], [slice(None)]
    for have, want in zip(array.shape[1:], shape):
        n = min(have, want)
        a, b = (have - n) // 2, (want - n) // 2
        src.append(slice(a, a + n))
        dst.append(slice(b, b + n))
    out[tuple(dst)] = array[tuple(src)]
    return out
