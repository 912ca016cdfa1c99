"""patch_features geometry and determinism, and the DinoInputAdapter (channels, intensities, resampling, padding)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import input_image
from nnunet_dino.backbone import PIXEL_STATS, DinoInputAdapter, load_backbone


@pytest.fixture(scope="module")
def bb_v3(dinov3_s):
    return load_backbone(weights=dinov3_s.files["hf"])


@pytest.fixture(scope="module")
def bb_v2reg(dinov2_s_reg):
    return load_backbone(weights=dinov2_s_reg.files["meta"])


# ---------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("which,cell", [("bb_v3", (1, 2)), ("bb_v3", (2, 0)), ("bb_v2reg", (0, 3)),
                                        ("bb_v2reg", (2, 1))])
def test_changing_one_patch_changes_that_token_most(which, cell, request):
    """CLS/register tokens are removed and the map is laid out row-major: changing the pixels of one patch cell
    moves the feature at that cell's position most (at block 0, before attention has mixed much)."""
    bb = request.getfixturevalue(which)
    p = bb.patch_size
    x = input_image((3 * p, 4 * p), seed=5, batch=1)
    x2 = x.clone()
    r, c = cell
    x2[..., r * p:(r + 1) * p, c * p:(c + 1) * p] += 2.0 * torch.randn(3, p, p, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        (f1,), (f2,) = bb.patch_features(x, layers=[0]), bb.patch_features(x2, layers=[0])
    assert f1.shape == (1, bb.embed_dim, 3, 4)
    change = (f2 - f1).norm(dim=1)[0]  # (3, 4)
    assert divmod(change.argmax().item(), 4) == cell, change
    others = change.flatten()[torch.arange(12) != r * 4 + c]
    assert change[r, c] > 1.5 * others.max(), change


def test_frozen_backbone_is_deterministic_in_train_mode(dinov3_s):
    bb = load_backbone(weights=dinov3_s.files["meta"], drop_path_rate=0.5)
    x = input_image(dinov3_s.input_hw, seed=7)
    bb.train()
    with torch.no_grad():
        a, b = bb.patch_features(x, [11])[0], bb.patch_features(x, [11])[0]
    assert not torch.equal(a, b), "drop-path should make an unfrozen backbone stochastic in train mode"
    bb.freeze()
    parent = nn.ModuleDict({"backbone": bb, "head": nn.Linear(2, 2)})
    parent.train()  # what nnU-Net does to the whole network every epoch
    assert parent.training and parent["head"].training and not bb.vit.training
    assert not any(p.requires_grad for p in bb.parameters())
    with torch.no_grad():
        a, b = bb.patch_features(x, [11])[0], bb.patch_features(x, [11])[0]
        bb.eval()
        c = bb.patch_features(x, [11])[0]
    assert torch.equal(a, b) and torch.equal(a, c)


def test_input_validation(bb_v3):
    with pytest.raises(ValueError, match="DinoInputAdapter"):
        bb_v3.patch_features(torch.zeros(1, 3, 30, 48))
    with pytest.raises(ValueError, match="DinoInputAdapter"):
        bb_v3.patch_features(torch.zeros(1, 3, 32, 50))
    with pytest.raises(ValueError, match="DinoInputAdapter"):
        bb_v3.patch_features(torch.zeros(1, 1, 32, 48))
    with pytest.raises(ValueError, match="out of range"):
        bb_v3.patch_features(torch.zeros(1, 3, 32, 48), layers=[12])


def test_adapter_output_feeds_backbone(bb_v3):
    adapter = DinoInputAdapter(1, 16, (40, 56), min_short_side_tokens=2)
    assert adapter.token_hw == (3, 4)
    with torch.no_grad():
        (f,) = bb_v3.patch_features(adapter(torch.randn(2, 1, 40, 56)), layers=[11])
    assert f.shape == (2, 384, 3, 4)


# ---------------------------------------------------------------------------------------------- channels
def test_one_channel_is_repeated():
    a = DinoInputAdapter(1, 16, (32, 48), min_short_side_tokens=2)
    x = torch.randn(2, 1, 32, 48)
    out = a(x)
    assert a.channel_projection is None
    assert torch.equal(out, x.expand(-1, 3, -1, -1))


def test_three_channels_are_kept():
    a = DinoInputAdapter(3, 16, (32, 48), min_short_side_tokens=2)
    x = torch.randn(2, 3, 32, 48)
    assert a.channel_projection is None
    assert torch.equal(a(x), x)


@pytest.mark.parametrize("channels", [2, 4])
def test_other_channel_counts_are_projected_learnably(channels):
    a = DinoInputAdapter(channels, 16, (32, 48), min_short_side_tokens=2)
    x = torch.randn(2, channels, 32, 48)
    out = a(x)
    assert out.shape == (2, 3, 32, 48)
    mean = x.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    torch.testing.assert_close(out, mean, atol=1e-6, rtol=0)  # starts at the grey-level view
    proj = a.channel_projection.weight
    assert proj.requires_grad and any(p is proj for p in a.parameters())
    assert "channel_projection.weight" in a.state_dict()
    out.pow(2).sum().backward()
    assert proj.grad is not None and proj.grad.abs().sum() > 0
    with torch.no_grad():
        torch.optim.SGD(a.parameters(), lr=0.1).step()
    assert not torch.allclose(a(x), mean)


# ---------------------------------------------------------------------------------------------- intensities
def test_unit_range_channels_get_pretraining_stats_zscored_pass():
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in PIXEL_STATS["lvd1689m"])
    x = torch.rand(2, 3, 32, 48)
    rgb = DinoInputAdapter(3, 16, (32, 48), min_short_side_tokens=2,
                           normalization_schemes=["RGBTo0_1Normalization"] * 3)
    rgb.set_pretraining("lvd1689m")
    torch.testing.assert_close(rgb(x), (x - mean) / std)
    z = DinoInputAdapter(3, 16, (32, 48), min_short_side_tokens=2, normalization_schemes=["ZScoreNormalization"] * 3)
    z.set_pretraining("lvd1689m")
    assert torch.equal(z(x), x)
    mixed = DinoInputAdapter(3, 16, (32, 48), min_short_side_tokens=2, normalization_schemes=[
        "RGBTo0_1Normalization", "ZScoreNormalization", "RescaleTo01Normalization"])
    out = mixed(x)  # default pretraining lvd1689m
    torch.testing.assert_close(out[:, 0::2], ((x - mean) / std)[:, 0::2])
    assert torch.equal(out[:, 1], x[:, 1])


def test_pretraining_stats_follow_the_weights():
    x = torch.rand(1, 3, 32, 48)
    a = DinoInputAdapter(3, 16, (32, 48), min_short_side_tokens=2, normalization_schemes=["RGBTo0_1Normalization"] * 3)
    a.set_pretraining("sat493m")
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in PIXEL_STATS["sat493m"])
    torch.testing.assert_close(a(x), (x - mean) / std)
    a.set_pretraining("meddinov3_ct")  # MedDINOv3 was pretrained on HU CT, never on [0, 1] images: no mapping
    assert torch.equal(a(x), x)
    with pytest.raises(ValueError, match="Unknown pretraining"):
        a.set_pretraining("imagenet21k")
    assert {"vit_scale", "vit_shift"} <= set(a.state_dict())  # checkpoints carry the affine


def test_one_rgb_channel_is_normalised_per_channel():
    a = DinoInputAdapter(1, 16, (32, 48), min_short_side_tokens=2, normalization_schemes=["RGBTo0_1Normalization"])
    x = torch.rand(1, 1, 32, 48)
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in PIXEL_STATS["lvd1689m"])
    torch.testing.assert_close(a(x), (x - mean) / std)


# ---------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("patch", [16, 14])
def test_small_patches_are_resampled_to_enough_tokens(patch):
    a = DinoInputAdapter(1, patch, (56, 40))  # min_short_side_tokens=16 by default
    assert min(a.token_hw) >= 16
    assert all(p % patch == 0 and 0 <= p - r < patch for p, r in zip(a.padded_hw, a.resized_hw))
    assert a.resized_hw[1] == 16 * patch  # the short side spans exactly 16 tokens
    assert abs(a.resized_hw[0] / a.resized_hw[1] - 56 / 40) < 0.01  # aspect ratio kept
    x = torch.randn(2, 1, 56, 40)
    out = a(x)
    assert out.shape == (2, 3, *a.padded_hw)
    rh, rw = a.resized_hw
    expected = F.interpolate(x.expand(-1, 3, -1, -1), size=a.resized_hw, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[..., :rh, :rw], expected)  # all of the patch is there, nothing cropped
    assert torch.all(out[..., rh:, :] == 0) and torch.all(out[..., :, rw:] == 0)


def test_non_multiple_sizes_are_padded_never_cropped():
    a = DinoInputAdapter(3, 16, (50, 70), min_short_side_tokens=2)
    assert a.resized_hw == (50, 70) and a.padded_hw == (64, 80) and a.token_hw == (4, 5)
    x = torch.randn(1, 3, 50, 70)
    out = a(x)
    assert torch.equal(out[..., :50, :70], x)
    assert torch.all(out[..., 50:, :] == 0) and torch.all(out[..., :, 70:] == 0)


@pytest.mark.parametrize("patch,image_hw", [(16, (56, 40)), (16, (50, 70)), (14, (56, 40))])
def test_token_map_to_returns_requested_size_aligned_to_the_patch(patch, image_hw):
    """A map holding each token's own row/column index, taken back to the patch grid, must give every pixel the
    (fractional) token position of that pixel: padding is dropped and the geometry is not stretched."""
    min_tokens = 16 if image_hw == (56, 40) else 2
    a = DinoInputAdapter(1, patch, image_hw, min_short_side_tokens=min_tokens)
    th, tw = a.token_hw
    rows = torch.arange(th, dtype=torch.float32).view(1, 1, th, 1).expand(1, 1, th, tw)
    cols = torch.arange(tw, dtype=torch.float32).view(1, 1, 1, tw).expand(1, 1, th, tw)
    fmap = torch.cat([rows, cols], dim=1)
    for out_hw, tol in [(image_hw, 0.2), (tuple(2 * s for s in image_hw), 0.05), (a.resized_hw, 1e-4)]:
        up = a.token_map_to(fmap, out_hw)
        assert up.shape == (1, 2, *out_hw)
        for axis, (n_out, n_res, n_tok) in enumerate(zip(out_hw, a.resized_hw, a.token_hw)):
            centre = (torch.arange(n_out) + 0.5) * n_res / n_out / patch - 0.5  # token coordinate of each pixel
            inside = (centre >= 0) & (centre <= n_tok - 1)  # away from the clamped outer half-tokens
            line = up[0, axis, :, 0] if axis == 0 else up[0, axis, 0, :]
            err = (line[inside] - centre[inside]).abs().max().item()
            assert err < tol, (out_hw, axis, err)


def test_dense_to_tokens_counts_valid_pixels():
    a = DinoInputAdapter(1, 16, (56, 40))  # resized to 358x256, padded to 368x256: last token row 6/16 valid
    rh, rw = a.resized_hw
    assert a.padded_hw[0] - rh == 10
    pooled, valid = a.dense_to_tokens(torch.ones(2, 1, 56, 40))
    assert pooled.shape == valid.shape[:1] + (1,) + a.token_hw and valid.shape == (2, 1) + a.token_hw
    torch.testing.assert_close(pooled, torch.ones_like(pooled))  # normalised by the valid fraction
    torch.testing.assert_close(valid[..., :-1, :], torch.ones_like(valid[..., :-1, :]))
    torch.testing.assert_close(valid[..., -1, :], torch.full_like(valid[..., -1, :], (rh % 16) / 16))
    # Padding is always less than one patch, so no token is pure padding (valid > 0 everywhere).
    assert valid.min() > 0
    # A two-class label map: the class fraction of each token is the area average over its valid pixels.
    dense = torch.zeros(1, 2, 56, 40)
    dense[:, 0, :28] = 1
    dense[:, 1, 28:] = 1
    frac, _ = a.dense_to_tokens(dense)
    torch.testing.assert_close(frac.sum(dim=1), torch.ones(1, *a.token_hw))
    assert torch.all(frac[0, 0, :5] == 1) and torch.all(frac[0, 1, -5:] == 1)
    assert math.isclose(frac[0, 0].mean().item(), 0.5, abs_tol=0.05)


def test_adapter_rejects_wrong_inputs():
    with pytest.raises(ValueError, match="2d"):
        DinoInputAdapter(1, 16, (32, 32, 32))
    a = DinoInputAdapter(2, 16, (32, 48), min_short_side_tokens=2)
    with pytest.raises(ValueError, match="Expected"):
        a(torch.zeros(1, 1, 32, 48))
    with pytest.raises(ValueError, match="Expected"):
        a(torch.zeros(1, 2, 48, 32))
    with pytest.raises(ValueError, match="schemes"):
        DinoInputAdapter(2, 16, (32, 48), normalization_schemes=["ZScoreNormalization"])
