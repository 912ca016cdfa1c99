"""The ViT token budget: the input adapter refuses, at construction, a patch whose token grid exceeds the cap
(default 4096 tokens), saying the patch, the grid, the cap and what to do; patches within the cap are unaffected.

Mostly the plain adapter (no ViT); one check goes through a trainer's build_network_architecture, which nnU-Net's
``initialize`` (and the predictor) call before anything else.
"""
from __future__ import annotations

import math

import pytest

from nnunet_dino.backbone.input_adapter import (DEFAULT_MAX_TOKENS, MAX_TOKENS_ENV_VAR, DinoInputAdapter,
                                                TokenBudgetError, max_tokens_setting)


@pytest.fixture(autouse=True)
def no_cap_in_environment(monkeypatch):
    monkeypatch.delenv(MAX_TOKENS_ENV_VAR, raising=False)


def tokens(adapter: DinoInputAdapter) -> int:
    return math.prod(adapter.token_hw)


def test_the_default_cap_is_4096():
    assert DEFAULT_MAX_TOKENS == 4096 and max_tokens_setting() == 4096


def test_the_elongated_patch_of_the_audit_is_refused_with_what_to_do():
    """Dataset988_Elongated: a 16x768 patch upsampled to 256x12288 = 12,288 tokens with the default 16 tokens."""
    with pytest.raises(TokenBudgetError) as err:
        DinoInputAdapter(1, 16, (16, 768))  # min_short_side_tokens=16 by default
    msg = str(err.value)
    for part in ("2D patch 16x768", "16x768 token grid", "12,288 tokens", "upsampled to 256x12288",
                 "min_short_side_tokens=16", "cap of 4,096 tokens", "9.0x the attention work",
                 "min_short_side_tokens <= 9", f"{MAX_TOKENS_ENV_VAR}=12288", "nnUNetv2_predict"):
        assert part in msg, (part, msg)


def test_the_suggested_min_short_side_tokens_is_the_largest_that_fits():
    assert tokens(DinoInputAdapter(1, 16, (16, 768), min_short_side_tokens=9)) == 9 * 432 <= 4096
    with pytest.raises(TokenBudgetError):
        DinoInputAdapter(1, 16, (16, 768), min_short_side_tokens=10)  # 10 x 480 tokens


@pytest.mark.parametrize("image_hw,patch,min_tokens,expected", [
    ((1024, 1024), 16, 16, (64, 64)),  # exactly the cap, no upsampling
    ((64, 64), 16, 64, (64, 64)),  # exactly the cap after upsampling
    ((896, 896), 16, 16, (56, 56)),  # MedDINOv3's 2d_896
    ((56, 40), 16, 16, (23, 16)),  # Hippocampus, the default upsampling
    ((896, 896), 14, 16, (64, 64)),  # DINOv2's patch 14: 4096 tokens
])
def test_patches_within_the_cap_are_built_unchanged(image_hw, patch, min_tokens, expected):
    a = DinoInputAdapter(1, patch, image_hw, min_short_side_tokens=min_tokens)
    assert a.token_hw == expected and tokens(a) <= DEFAULT_MAX_TOKENS


@pytest.mark.parametrize("image_hw,patch,min_tokens,grid", [
    ((1040, 1024), 16, 16, "65x64"),  # one token row over, no upsampling
    ((64, 66), 16, 64, "64x66"),  # over after upsampling
    ((910, 896), 14, 16, "65x64"),
])
def test_one_step_over_the_cap_is_refused(image_hw, patch, min_tokens, grid):
    with pytest.raises(TokenBudgetError, match=f"{grid} token grid"):
        DinoInputAdapter(1, patch, image_hw, min_short_side_tokens=min_tokens)


def test_a_patch_too_large_without_upsampling_does_not_suggest_fewer_tokens():
    with pytest.raises(TokenBudgetError) as err:
        DinoInputAdapter(1, 16, (1040, 1280))
    msg = str(err.value)
    assert "at its own size" in msg and "min_short_side_tokens <=" not in msg and "smaller or less elongated" in msg


def test_the_cap_can_be_raised_explicitly_or_through_the_environment(monkeypatch):
    assert tokens(DinoInputAdapter(1, 16, (16, 768), max_tokens=12288)) == 12288
    with pytest.raises(TokenBudgetError, match="cap of 12,287 tokens"):
        DinoInputAdapter(1, 16, (16, 768), max_tokens=12287)
    monkeypatch.setenv(MAX_TOKENS_ENV_VAR, "12288")
    assert tokens(DinoInputAdapter(1, 16, (16, 768))) == 12288
    monkeypatch.setenv(MAX_TOKENS_ENV_VAR, "300")  # lowering works too: Hippocampus has 368
    with pytest.raises(TokenBudgetError, match="cap of 300 tokens"):
        DinoInputAdapter(1, 16, (56, 40))


@pytest.mark.parametrize("value", ["many", "0", "-5", "4096.5"])
def test_an_invalid_cap_in_the_environment_is_an_error(monkeypatch, value):
    monkeypatch.setenv(MAX_TOKENS_ENV_VAR, value)
    with pytest.raises(ValueError, match=MAX_TOKENS_ENV_VAR):
        DinoInputAdapter(1, 16, (56, 40))


@pytest.mark.parametrize("value", [0, -1, True, 4096.0])
def test_an_invalid_explicit_cap_is_an_error(value):
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        DinoInputAdapter(1, 16, (56, 40), max_tokens=value)


def test_the_trainer_refuses_at_network_construction():
    """What nnU-Net's initialize (and the predictor) call: build_network_architecture, before any training."""
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_dino.training import GuiDINOTrainer

    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 3, "features_per_stage": [8, 16, 32], "conv_op": "torch.nn.modules.conv.Conv2d",
                            "kernel_sizes": [[3, 3]] * 3, "strides": [[1, 1], [2, 2], [2, 2]],
                            "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    pm = PlansManager({"dataset_name": "Dataset988_Elongated", "plans_name": "nnUNetPlans",
                       "configurations": {"2d": {"patch_size": [16, 768], "batch_dice": True, "architecture": arch,
                                                 "normalization_schemes": ["ZScoreNormalization"],
                                                 "use_mask_for_norm": [False]}}})
    torch.manual_seed(0)
    with pytest.raises(TokenBudgetError, match=r"2D patch 16x768 .*\(12,288 tokens"):
        GuiDINOTrainer.build_network_architecture(pm, pm.get_configuration("2d"), 1, 2, False)
