"""CT channels in the DINO input adapter: nnU-Net's CT normalisation undone to Hounsfield units, then the convention
of the loaded weights (MedDINOv3: HU clip [-1000, 1000] and z-score 65.11 / 178.02; natural-image weights: an HU
window into [0, 1], then their mean/std), kept in buffers; other channels exactly as before; the "nnunet" override;
and the plans' intensity properties reaching the adapter through every trainer's build_network_architecture.

The CT data are made by nnU-Net's own CTNormalization from a synthetic HU slice, with intensity properties computed
as nnU-Net's fingerprint does (foreground voxels' mean, std, 0.5 and 99.5 percentiles).
"""
from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_dino.backbone import HU_PRETRAINING, PIXEL_STATS, CTIntensity, DinoInputAdapter
from nnunet_dino.training import GuiDINOTrainer, MedDINOv3Trainer, SegDINOTrainer, SegDINOv2Trainer

HW = (32, 48)
MEDDINO_CLIP, MEDDINO_MEAN, MEDDINO_STD = (-1000.0, 1000.0), 65.11, 178.02


def synthetic_ct_slice(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An abdominal-looking HU slice (air, lung, fat, an organ with a lesion, bone) and the organ mask (the
    foreground nnU-Net's fingerprint would take its statistics from)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: HW[0], : HW[1]]
    hu = np.full(HW, -1000.0) + rng.normal(0, 10, HW)  # air
    body = ((yy - 16) / 15) ** 2 + ((xx - 24) / 22) ** 2 < 1
    hu[body] = rng.normal(-100, 20, body.sum())  # fat
    lung = body & (yy < 10)
    hu[lung] = rng.normal(-850, 40, lung.sum())
    organ = ((yy - 18) / 7) ** 2 + ((xx - 20) / 9) ** 2 < 1
    hu[organ] = rng.normal(50, 15, organ.sum())
    hu[organ & (xx > 24)] = rng.normal(120, 10, (organ & (xx > 24)).sum())  # lesion
    bone = body & (yy > 26) & (abs(xx - 24) < 4)
    hu[bone] = rng.uniform(700, 1600, bone.sum())
    return hu.astype(np.float32), organ


def fingerprint(hu: np.ndarray, mask: np.ndarray) -> dict:
    """nnU-Net's foreground intensity properties of one channel."""
    fg = hu[mask].astype(np.float64)
    return {"mean": float(fg.mean()), "std": float(fg.std()), "percentile_00_5": float(np.percentile(fg, 0.5)),
            "percentile_99_5": float(np.percentile(fg, 99.5)), "min": float(fg.min()), "max": float(fg.max()),
            "median": float(np.median(fg))}


def nnunet_ct(hu: np.ndarray, props: dict) -> torch.Tensor:
    """nnU-Net's own CTNormalization of a HU slice: (1, 1, H, W)."""
    x = CTNormalization(use_mask_for_norm=False, intensityproperties=props).run(hu.copy())
    return torch.from_numpy(x)[None, None]


def rgb_stats(pretraining: str) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.tensor(s).view(1, 3, 1, 1) for s in PIXEL_STATS[pretraining])


@pytest.fixture(scope="module")
def ct():
    hu, organ = synthetic_ct_slice()
    props = fingerprint(hu, organ)
    return {"hu": hu, "organ": organ, "props": props, "x": nnunet_ct(hu, props)}


def ct_adapter(props_per_channel: dict, channels=1, schemes=("CTNormalization",), **kwargs) -> DinoInputAdapter:
    return DinoInputAdapter(channels, 16, HW, min_short_side_tokens=2, normalization_schemes=list(schemes),
                            intensity_properties=props_per_channel, **kwargs)


# ---------------------------------------------------------------------------------------------- HU round trip
def test_hounsfield_units_are_recovered_from_nnunets_ct_normalisation(ct):
    a = ct_adapter({"0": ct["props"]})
    hu, props = torch.from_numpy(ct["hu"]), ct["props"]
    low, high = props["percentile_00_5"], props["percentile_99_5"]
    recovered = a.ct_map.to_hounsfield(ct["x"])[0, 0]
    inside = (hu >= low) & (hu <= high)
    organ = torch.from_numpy(ct["organ"])
    assert (inside & organ).sum() >= 0.98 * organ.sum()  # [p0.5, p99.5] keeps 99% of the foreground
    assert (recovered[inside] - hu[inside]).abs().max() < 1e-3
    # What nnU-Net clipped is lost: lung, air (below p0.5) and bone (above p99.5) come back at the clip bounds.
    assert (hu < low - 100).sum() > 100 and (hu > high + 100).sum() > 10
    torch.testing.assert_close(recovered[hu < low], torch.full_like(recovered[hu < low], low), atol=1e-3, rtol=0)
    torch.testing.assert_close(recovered[hu > high], torch.full_like(recovered[hu > high], high), atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------------------------- conventions
def test_meddinov3_weights_get_their_pretraining_hu_convention():
    assert HU_PRETRAINING["meddinov3_ct"] == (MEDDINO_CLIP, MEDDINO_MEAN, MEDDINO_STD)
    # A whole-body foreground: nnU-Net's clip range [-1024, 1800] extends past MedDINOv3's, so its clip acts too.
    props = {"mean": -200.0, "std": 500.0, "percentile_00_5": -1024.0, "percentile_99_5": 1800.0}
    hu = np.linspace(-1200, 2500, HW[0] * HW[1], dtype=np.float32).reshape(HW)
    x = nnunet_ct(hu, props)
    a = ct_adapter({"0": props})
    a.set_pretraining("meddinov3_ct")  # what the trainers do when MedDINOv3's CT checkpoint is loaded
    expected = (np.clip(np.clip(hu.astype(np.float64), -1024, 1800), *MEDDINO_CLIP) - MEDDINO_MEAN) / MEDDINO_STD
    out = a(x)
    assert out.shape == (1, 3, *HW)
    for c in range(3):  # repeated to 3 channels
        torch.testing.assert_close(out[0, c].double(), torch.from_numpy(expected), atol=2e-6, rtol=0)
    assert out.min().item() == pytest.approx((-1000 - MEDDINO_MEAN) / MEDDINO_STD, abs=1e-5)
    assert out.max().item() == pytest.approx((1000 - MEDDINO_MEAN) / MEDDINO_STD, abs=1e-5)


@pytest.mark.parametrize("pretraining", ["lvd1689m", "lvd142m", "sat493m"])
def test_natural_image_weights_get_the_datasets_foreground_window_then_their_stats(ct, pretraining):
    props = ct["props"]
    low, high = props["percentile_00_5"], props["percentile_99_5"]
    a = ct_adapter({"0": props})
    a.set_pretraining(pretraining)
    unit = (np.clip(ct["hu"].astype(np.float64), low, high) - low) / (high - low)
    mean, std = rgb_stats(pretraining)
    expected = (torch.from_numpy(unit)[None, None] - mean.double()) / std.double()
    out = a(ct["x"]).double()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    # the window spans the whole [0, 1] the weights saw
    torch.testing.assert_close(out.amin(dim=(2, 3)).flatten(), (-mean / std).double().flatten(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.amax(dim=(2, 3)).flatten(), ((1 - mean) / std).double().flatten(), atol=1e-5,
                               rtol=0)


def test_a_fixed_hu_window_can_be_chosen_for_natural_image_weights():
    props = {"mean": 0.0, "std": 400.0, "percentile_00_5": -900.0, "percentile_99_5": 1200.0}
    hu = np.linspace(-900, 1200, HW[0] * HW[1], dtype=np.float32).reshape(HW)
    a = ct_adapter({"0": props}, ct_intensity=CTIntensity(window=(-160.0, 240.0)))  # W400/L40 soft tissue
    unit = (np.clip(hu.astype(np.float64), -160, 240) + 160) / 400
    mean, std = rgb_stats("lvd1689m")
    torch.testing.assert_close(a(nnunet_ct(hu, props)).double(),
                               (torch.from_numpy(unit)[None, None] - mean.double()) / std.double(), atol=1e-5, rtol=0)
    a.set_pretraining("meddinov3_ct")  # MedDINOv3 keeps its own convention whatever the window
    torch.testing.assert_close(a(nnunet_ct(hu, props))[0, 0].double(),
                               torch.from_numpy((np.clip(hu.astype(np.float64), -1000, 1000) - 65.11) / 178.02),
                               atol=2e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- other channels
def test_non_ct_channels_are_bit_identical_to_before():
    x = torch.rand(2, 3, *HW)
    z = DinoInputAdapter(3, 16, HW, 2, ["ZScoreNormalization"] * 3)
    assert z.ct_map is None and set(z.state_dict()) == {"vit_scale", "vit_shift"}  # old checkpoints still load
    assert torch.equal(z(x), x)
    for pretraining in ("lvd1689m", "sat493m"):
        rgb = DinoInputAdapter(3, 16, HW, 2, ["RGBTo0_1Normalization"] * 3, pretraining)
        mean, std = (torch.tensor(s) for s in PIXEL_STATS[pretraining])
        scale, shift = (1.0 / std).view(1, 3, 1, 1), (-mean / std).view(1, 3, 1, 1)
        assert torch.equal(rgb(x), x * scale + shift)  # the former affine, bit for bit
    one = DinoInputAdapter(1, 16, HW, 2, ["ZScoreNormalization"])
    assert torch.equal(one(x[:, :1]), x[:, :1].expand(-1, 3, -1, -1))


def test_mixed_ct_and_mr_channels_are_mapped_per_channel_before_the_projection(ct):
    mr = torch.randn(1, 1, *HW)
    props = {"0": ct["props"], "1": {"mean": 300.0, "std": 80.0, "percentile_00_5": 10.0, "percentile_99_5": 900.0}}
    a = ct_adapter(props, channels=2, schemes=("CTNormalization", "ZScoreNormalization"))
    assert a.channel_projection is not None
    low, high = ct["props"]["percentile_00_5"], ct["props"]["percentile_99_5"]
    unit = torch.from_numpy((np.clip(ct["hu"].astype(np.float64), low, high) - low) / (high - low))[None, None]
    grey_mean, grey_std = (sum(s) / 3 for s in PIXEL_STATS["lvd1689m"])
    ct_vit = (unit - grey_mean) / grey_std  # ViT space of a grey image: the projection mixes it with z-scored MR
    out = a(torch.cat([ct["x"], mr], dim=1)).double()
    expected = ((ct_vit + mr.double()) / 2).expand(-1, 3, -1, -1)  # the projection starts at the channel mean
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    a.set_pretraining("meddinov3_ct")
    ct_med = (torch.from_numpy(ct["hu"].astype(np.float64)).clamp(low, high) - MEDDINO_MEAN) / MEDDINO_STD
    torch.testing.assert_close(a(torch.cat([ct["x"], mr], dim=1)).double(),
                               ((ct_med[None, None] + mr.double()) / 2).expand(-1, 3, -1, -1), atol=1e-5, rtol=0)


def test_three_channels_ct_mr_and_a_second_ct_each_use_their_own_properties(ct):
    hu2 = ct["hu"] * 0.5 + 100
    props2 = fingerprint(hu2, np.ones(HW, bool))
    mr = torch.randn(1, 1, *HW)
    a = ct_adapter({"0": ct["props"], "2": props2}, channels=3,
                   schemes=("CTNormalization", "ZScoreNormalization", "CTNormalization"))
    assert a.ct_map.ct_channels == (0, 2)
    assert a.ct_map.hu_shift.flatten().tolist() == pytest.approx([ct["props"]["mean"], 0.0, props2["mean"]])
    out = a(torch.cat([ct["x"], mr, nnunet_ct(hu2, props2)], dim=1)).double()
    mean, std = rgb_stats("lvd1689m")
    for c, (hu, props) in {0: (ct["hu"], ct["props"]), 2: (hu2, props2)}.items():
        low, high = props["percentile_00_5"], props["percentile_99_5"]
        unit = (np.clip(hu.astype(np.float64), low, high) - low) / (high - low)
        torch.testing.assert_close(out[0, c], (torch.from_numpy(unit) - mean[0, c].item()) / std[0, c].item(),
                                   atol=1e-5, rtol=0)
    assert torch.equal(out[0, 1].float(), mr[0, 0])  # the MR channel passes unchanged


# ---------------------------------------------------------------------------------------------- errors, override
@pytest.mark.parametrize("props, message", [
    (None, "no foreground intensity properties"),
    ({"1": {"mean": 0.0, "std": 1.0, "percentile_00_5": -1.0, "percentile_99_5": 1.0}}, r"lack \[.*'mean'"),
    ({"0": {"mean": 0.0, "std": 1.0}}, r"lack \['percentile_00_5', 'percentile_99_5'\]"),
])
def test_a_ct_channel_without_intensity_properties_is_refused_with_what_to_do(props, message):
    with pytest.raises(ValueError, match=message) as err:
        DinoInputAdapter(1, 16, HW, 2, ["CTNormalization"], intensity_properties=props)
    assert "CTIntensity(mode='nnunet')" in str(err.value)


def test_bad_ct_settings_fail_at_once():
    with pytest.raises(ValueError, match="mode must be one of"):
        CTIntensity(mode="window")
    with pytest.raises(ValueError, match="low < high"):
        CTIntensity(window=(240.0, -160.0))
    with pytest.raises(ValueError, match="only applies with mode 'hu'"):
        CTIntensity(mode="nnunet", window=(-160.0, 240.0))
    empty = {"mean": 40.0, "std": 0.0, "percentile_00_5": 40.0, "percentile_99_5": 40.0}
    with pytest.raises(ValueError, match="is empty"):
        ct_adapter({"0": empty})
    ct_adapter({"0": empty}, ct_intensity=CTIntensity(window=(-160.0, 240.0)))  # the suggested remedy works


def test_the_nnunet_override_feeds_nnunets_z_score_unchanged(ct):
    for props in (None, {"0": ct["props"]}):
        a = DinoInputAdapter(1, 16, HW, 2, ["CTNormalization"], intensity_properties=props,
                             ct_intensity=CTIntensity(mode="nnunet"))
        assert a.ct_map is None and set(a.state_dict()) == {"vit_scale", "vit_shift"}
        for pretraining in ("lvd1689m", "meddinov3_ct"):
            a.set_pretraining(pretraining)
            assert torch.equal(a(ct["x"]), ct["x"].expand(-1, 3, -1, -1))


# ---------------------------------------------------------------------------------------------- checkpoints
def test_a_rebuilt_adapter_reproduces_the_trained_one_from_its_state_dict(ct):
    props = {"0": ct["props"]}
    schemes = ("CTNormalization", "ZScoreNormalization")
    x = torch.cat([ct["x"], torch.randn(1, 1, *HW)], dim=1)
    trained = ct_adapter(props, channels=2, schemes=schemes)
    trained.set_pretraining("meddinov3_ct")  # at training start, after loading the CT checkpoint
    with torch.no_grad():
        trained.channel_projection.weight.add_(0.1 * torch.randn(3, 2, 1, 1))
    rebuilt = ct_adapter(props, channels=2, schemes=schemes)  # what nnUNetv2_predict builds: default pretraining
    assert not torch.allclose(rebuilt(x), trained(x), atol=1e-2)
    rebuilt.load_state_dict(trained.state_dict())  # strict
    assert torch.equal(rebuilt(x), trained(x))


def test_a_checkpoint_from_before_the_hu_mapping_is_refused_with_what_to_do(ct):
    old = DinoInputAdapter(1, 16, HW, 2, ["CTNormalization"], ct_intensity=CTIntensity(mode="nnunet"))
    new = ct_adapter({"0": ct["props"]})
    for strict in (True, False):  # not even non-strictly: the ViT would silently get other inputs than in training
        with pytest.raises(RuntimeError, match="trained before CT channels were mapped through Hounsfield units"):
            new.load_state_dict(old.state_dict(), strict=strict)


# ---------------------------------------------------------------------------------------------- trainers
def ct_plans(props: dict | None, patch=(64, 64)) -> PlansManager:
    """A minimal 2d plans with one CT and one MR channel and a small PlainConvUNet."""
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 3, "features_per_stage": [8, 16, 32], "conv_op": "torch.nn.modules.conv.Conv2d",
                            "kernel_sizes": [[3, 3]] * 3, "strides": [[1, 1], [2, 2], [2, 2]],
                            "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    plans = {"dataset_name": "Dataset998_SyntheticCT", "plans_name": "nnUNetPlans",
             "configurations": {"2d": {"patch_size": list(patch), "batch_dice": True, "architecture": arch,
                                       "normalization_schemes": ["CTNormalization", "ZScoreNormalization"],
                                       "use_mask_for_norm": [False, False]}}}
    if props is not None:
        plans["foreground_intensity_properties_per_channel"] = copy.deepcopy(props)
    return PlansManager(plans)


class FewTokensGuiDINO(GuiDINOTrainer):
    guidino = replace(GuiDINOTrainer.guidino, min_short_side_tokens=4)


class FewTokensSegDINO(SegDINOTrainer):
    segdino = replace(SegDINOTrainer.segdino, min_short_side_tokens=4)


class FewTokensSegDINOv2(SegDINOv2Trainer):
    segdino_v2 = replace(SegDINOv2Trainer.segdino_v2, min_short_side_tokens=4)


class SmallMedDINOv3(MedDINOv3Trainer):
    meddinov3 = replace(MedDINOv3Trainer.meddinov3, dino_arch="dinov3_vits16", min_short_side_tokens=1)


ADAPTER_OF = {FewTokensGuiDINO: lambda n: n.guidance.adapter, FewTokensSegDINO: lambda n: n.encoder.adapter,
              FewTokensSegDINOv2: lambda n: n.encoder.adapter, SmallMedDINOv3: lambda n: n.adapter}


@pytest.mark.parametrize("trainer", list(ADAPTER_OF), ids=lambda t: t.__name__)
def test_every_trainer_hands_the_plans_intensity_properties_to_its_adapter(ct, trainer):
    props = {"0": ct["props"], "1": {"mean": 300.0, "std": 80.0, "percentile_00_5": 10.0, "percentile_99_5": 900.0}}
    pm = ct_plans(props)
    torch.manual_seed(0)
    net = trainer.build_network_architecture(pm, pm.get_configuration("2d"), 2, 3, False)
    adapter = ADAPTER_OF[trainer](net)
    assert adapter.ct_map.ct_channels == (0,)
    assert adapter.ct_map.hu_shift.flatten().tolist() == pytest.approx([ct["props"]["mean"], 0.0])
    assert adapter.ct_map.hu_scale.flatten().tolist() == pytest.approx([ct["props"]["std"], 1.0])
    adapter.set_pretraining("meddinov3_ct")  # what on_backbone_loaded does for MedDINOv3's CT weights
    torch.manual_seed(1)
    rebuilt = trainer.build_network_architecture(pm, pm.get_configuration("2d"), 2, 3, False)  # nnUNetv2_predict
    rebuilt.load_state_dict(net.state_dict())  # strict
    x = torch.randn(1, 2, 64, 64)
    assert torch.equal(ADAPTER_OF[trainer](rebuilt)(x), adapter(x))
    without = ct_plans(None)  # plans without foreground_intensity_properties_per_channel
    with pytest.raises(ValueError, match="no foreground intensity properties"):
        trainer.build_network_architecture(without, without.get_configuration("2d"), 2, 3, False)
