"""CT channels: from nnU-Net's CT normalisation back to Hounsfield units, then into the loaded weights' convention.

nnU-Net's ``CTNormalization`` clips a CT channel to the [p0.5, p99.5] of its foreground voxels (in HU) and z-scores
it with the foreground mean and std, all taken from the plans' ``foreground_intensity_properties_per_channel``. No
DINO weights were pretrained on that, so (``CTIntensity(mode="hu")``, the default) each CT channel is mapped back to
HU and then into the convention of the weights that were loaded:

- MedDINOv3 CT weights (pretraining key ``meddinov3_ct``): HU clipped to [-1000, 1000], then (hu - 65.11) / 178.02,
  repeated to 3 channels (``registry.HU_PRETRAINING``).
- Natural-image weights (LVD, SAT): their images were in [0, 1] before their mean/std normalisation. A CT channel is
  windowed into [0, 1], by default over the dataset's own foreground [p0.5, p99.5]: exactly the range nnU-Net kept,
  so the ViT loses nothing beyond what nnU-Net already clipped, gets the full [0, 1] contrast, and the window adapts
  to the dataset (lung, abdomen, bone) without a choice by the user. ``CTIntensity(window=(-160, 240))`` (W400/L40,
  soft tissue) or any other fixed HU window can be chosen instead. The adapter then applies the weights' mean/std,
  as for an RGB channel.

``CTIntensity(mode="nnunet")`` feeds nnU-Net's z-score unchanged: what upstream MedDINOv3's fine-tuning code does, and
what this plugin did before the HU mapping existed.

Per input channel, everything in buffers (checkpoints carry the mapping; nnUNetv2_predict reproduces training):

    hu = x * hu_scale + hu_shift            nnU-Net's z-score -> HU (foreground std and mean)
    hu = clamp(hu, hu_min, hu_max)          the HU range of the weights' convention
    y  = (hu - out_offset) / out_divisor    -> the weights' space ([0, 1] for natural-image weights)

Non-CT channels get the identity (1, 0, -inf, inf, 0, 1), which leaves their values bit-identical.

What cannot be recovered: nnU-Net clipped each CT channel to its foreground [p0.5, p99.5] before the plugin sees it.
Everything outside (in an abdominal-organ dataset: lung, air, dense bone) is already clamped to the range's ends.
nnU-Net's range usually lies inside [-1000, 1000], so MedDINOv3's own clip rarely acts.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from .registry import HU_PRETRAINING, PIXEL_STATS

CT_SCHEME = "CTNormalization"  # nnU-Net's scheme name for CT channels
CT_INTENSITY_MODES = ("hu", "nnunet")
# The foreground statistics nnU-Net's CTNormalization reads from the plans.
_PROPERTY_KEYS = ("mean", "std", "percentile_00_5", "percentile_99_5")
_NNUNET_STD_EPS = 1e-8  # CTNormalization divides by max(std, 1e-8) for float32 data


@dataclass(frozen=True)
class CTIntensity:
    """How CT-normalised channels reach the ViT (see module doc).

    mode: "hu" maps through Hounsfield units into the convention of the loaded weights; "nnunet" passes nnU-Net's
        z-score unchanged (upstream MedDINOv3's fine-tuning convention).
    window: the HU range mapped to [0, 1] for natural-image weights; None = the dataset's foreground [p0.5, p99.5].
        MedDINOv3's CT weights always get their own pretraining convention.
    """
    mode: str = "hu"
    window: tuple[float, float] | None = None

    def __post_init__(self):
        if self.mode not in CT_INTENSITY_MODES:
            raise ValueError(f"CTIntensity mode must be one of {CT_INTENSITY_MODES}, got {self.mode!r}.")
        if self.window is not None:
            if self.mode != "hu":
                raise ValueError(f"CTIntensity window {self.window} only applies with mode 'hu' (mode 'nnunet' feeds "
                                 f"nnU-Net's z-score unchanged); drop the window or use mode 'hu'.")
            if (len(self.window) != 2 or not all(math.isfinite(v) for v in self.window)
                    or not self.window[0] < self.window[1]):
                raise ValueError(f"CTIntensity window must be (low, high) in HU with low < high, got {self.window}.")


@dataclass(frozen=True)
class ForegroundHU:
    """One CT channel's foreground statistics in HU, as nnU-Net's CTNormalization used them."""
    mean: float
    std: float
    p00_5: float
    p99_5: float


def plans_intensity_properties(plans_manager) -> dict | None:
    """The plans' per-channel foreground intensity properties (keyed by channel index as a string), or None when the
    plans have none (nnU-Net's accessor raises a KeyError then; CT channels are refused later with a clear error)."""
    plans = plans_manager.plans
    return plans.get("foreground_intensity_properties_per_channel",
                     plans.get("foreground_intensity_properties_by_modality"))


def foreground_hu(intensity_properties: Mapping | None, channel: int) -> ForegroundHU:
    if intensity_properties is None:
        raise ValueError(
            f"Input channel {channel} is CT-normalised ({CT_SCHEME}), but no foreground intensity properties were "
            f"given, so its HU values cannot be restored. Pass the plans' foreground_intensity_properties_per_channel "
            f"(plans_manager.foreground_intensity_properties_per_channel) to the network builder, or set "
            f"ct_intensity=CTIntensity(mode='nnunet') to feed nnU-Net's CT z-score to the ViT unchanged.")
    props = intensity_properties.get(str(channel), intensity_properties.get(channel))
    missing = [k for k in _PROPERTY_KEYS if props is None or k not in props]
    if missing:
        raise ValueError(
            f"Input channel {channel} is CT-normalised ({CT_SCHEME}), but the foreground intensity properties lack "
            f"{missing} for it (channels present: {sorted(map(str, intensity_properties))}). Use the plans written by "
            f"nnUNetv2_plan_and_preprocess for this dataset, or set ct_intensity=CTIntensity(mode='nnunet').")
    return ForegroundHU(float(props["mean"]), max(float(props["std"]), _NNUNET_STD_EPS),
                        float(props["percentile_00_5"]), float(props["percentile_99_5"]))


class CTChannelMap(nn.Module):
    """Per input channel: nnU-Net's CT z-score -> HU -> the loaded weights' convention (identity for other channels).

    ``projected``: the channels are then mixed by the adapter's learnable 1x1 projection, after which no pretraining
    statistics are applied (the other channels are z-scored, i.e. already standardised). CT channels then go straight
    to the ViT space of a grey image: the window's [0, 1], standardised with the RGB-averaged mean/std of the weights.
    """

    def __init__(self, normalization_schemes: Sequence[str], intensity_properties: Mapping | None,
                 config: CTIntensity, projected: bool):
        super().__init__()
        self.foreground = {c: foreground_hu(intensity_properties, c)
                           for c, scheme in enumerate(normalization_schemes) if scheme == CT_SCHEME}
        if not self.foreground:
            raise ValueError(f"CTChannelMap needs at least one {CT_SCHEME} channel, got {list(normalization_schemes)}.")
        self.window = config.window
        self.projected = projected
        n = len(normalization_schemes)
        for name, value in (("hu_scale", 1.0), ("hu_shift", 0.0), ("hu_min", -math.inf), ("hu_max", math.inf),
                            ("out_offset", 0.0), ("out_divisor", 1.0)):
            self.register_buffer(name, torch.full((1, n, 1, 1), value))
        for c, fg in self.foreground.items():
            self.hu_scale[0, c] = fg.std
            self.hu_shift[0, c] = fg.mean

    @property
    def ct_channels(self) -> tuple[int, ...]:
        return tuple(self.foreground)

    def set_pretraining(self, pretraining: str) -> None:
        """HU range and output affine of the weights' convention (module doc)."""
        convention = HU_PRETRAINING.get(pretraining)
        stats = PIXEL_STATS[pretraining]
        for c, fg in self.foreground.items():
            if convention is not None:
                low, high = convention.clip
                offset, divisor = convention.mean, convention.std
            else:
                low, high = self.window or (fg.p00_5, fg.p99_5)
                if not high > low:
                    raise ValueError(
                        f"CT channel {c}: the foreground range [p0.5, p99.5] = [{low}, {high}] HU is empty, so it "
                        f"cannot be windowed into [0, 1]. Choose a fixed window, e.g. "
                        f"ct_intensity=CTIntensity(window=(-160.0, 240.0)).")
                offset, divisor = low, high - low
                if self.projected and stats is not None:
                    grey_mean, grey_std = (sum(s) / len(s) for s in stats)
                    offset, divisor = low + grey_mean * (high - low), grey_std * (high - low)
            self.hu_min[0, c], self.hu_max[0, c] = low, high
            self.out_offset[0, c], self.out_divisor[0, c] = offset, divisor

    def outputs_unit_range(self, pretraining: str) -> bool:
        """Whether CT channels leave in [0, 1] for these weights (the adapter then applies their RGB statistics)."""
        return pretraining not in HU_PRETRAINING and not (self.projected and PIXEL_STATS[pretraining] is not None)

    def to_hounsfield(self, x: torch.Tensor) -> torch.Tensor:
        """Undo nnU-Net's CT z-score (CT channels; others unchanged). Values nnU-Net clipped stay at its clip bounds."""
        return x * self.hu_scale + self.hu_shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hu = torch.clamp(self.to_hounsfield(x), self.hu_min, self.hu_max)
        return (hu - self.out_offset) / self.out_divisor

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Refused even by load_state_dict(strict=False) (torch passes strict=True here regardless): keeping the
        # mapping built from the plans would silently feed the ViT other inputs than the checkpoint was trained on.
        names = [name for name, _ in self.named_buffers(recurse=False)]
        if not any(prefix + name in state_dict for name in names):
            error_msgs.append(
                f"The checkpoint has no CT intensity mapping ({prefix}*): it was trained before CT channels were "
                f"mapped through Hounsfield units, on nnU-Net's CT z-score. Load it into a network built with "
                f"ct_intensity=CTIntensity(mode='nnunet') (a trainer variant setting it; nnU-Net takes the trainer "
                f"class from the checkpoint's 'trainer_name'), or retrain.")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
