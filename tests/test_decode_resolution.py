"""SegDINOv2 and MedDINOv3 decode at most at the nnU-Net patch's own resolution (``max_decode_resolution="patch"``,
the default), not at that of the upsampled ViT input ("vit_input", the former behaviour): output exactly the patch,
no decoded map finer than the patch grid, pixel centres aligned with nnU-Net's, the same modules and state dict in
both settings, and bit-identical outputs wherever the adapter does not enlarge the patch.

Cheap geometry: ViT-S, 4 tokens on the short side. A 20x12 patch is then enlarged 5.33x for the ViT (107x64,
padded 112x64, 7x4 tokens), as Hippocampus' 56x40 is 6.4x with the default 16 tokens.
"""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from nnunet_dino.networks.meddinov3 import MedDINOv3Config, build_meddinov3, resample_to_pitch
from nnunet_dino.networks.segdino_v2 import SegDINOv2Config, build_segdino_v2, level_size

SMALL = (20, 12)  # enlarged 5.33x for the ViT
LARGE = (64, 96)  # with 4 tokens on the short side: not enlarged (64 = 4 x 16)
TOKENS = 4
STRIDES = [[1, 1], [2, 2], [2, 2]]


def segdino_v2(patch, mode, deep_supervision=False, seed=0):
    torch.manual_seed(seed)
    config = SegDINOv2Config(min_short_side_tokens=TOKENS, deep_supervision=deep_supervision,
                             max_decode_resolution=mode)
    return build_segdino_v2(config, 1, 3, patch, None, STRIDES, deep_supervision).eval()


def meddinov3(patch, mode, seed=0, **kwargs):
    torch.manual_seed(seed)
    config = MedDINOv3Config(dino_arch="dinov3_vits16", min_short_side_tokens=TOKENS, max_decode_resolution=mode,
                             **kwargs)
    return build_meddinov3(config, 1, 3, patch, None).eval()


def randomize_(net, seed=1):
    """Non-trivial values everywhere (SAD's gammas start at 0, i.e. every block as the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net


def recorded_sizes(modules, run) -> list[tuple[int, int]]:
    sizes = []
    handles = [m.register_forward_hook(lambda m, a, out: sizes.append(tuple(out.shape[-2:]))) for m in modules]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return sizes


# ---------------------------------------------------------------------------------------------- SegDINOv2
def test_segdino_v2_pyramid_is_capped_at_the_patch_grid():
    net = segdino_v2(SMALL, "patch")
    a = net.encoder.adapter
    assert (a.resized_hw, a.padded_hw, a.token_hw) == ((107, 64), (112, 64), (7, 4))
    assert net.level_cap == a.padded_grid(SMALL) == (21, 12)  # the padded ViT input at the patch's resolution
    taps = net.encoder(torch.randn(1, 1, *SMALL))
    levels = net.token_pyramid(taps, net.level_cap)
    assert [tuple(l.shape[-2:]) for l in levels] == [(21, 12), (21, 12), (14, 8), (7, 4)]
    old = segdino_v2(SMALL, "vit_input")
    assert old.level_cap is None
    assert [tuple(l.shape[-2:]) for l in old.token_pyramid(taps)] == [(56, 32), (28, 16), (14, 8), (7, 4)]


def test_segdino_v2_decodes_nothing_finer_than_the_patch_and_outputs_the_patch():
    net = randomize_(segdino_v2(SMALL, "patch"))
    blocks = list(net.scale_aware_decoding.intra) + list(net.scale_aware_decoding.top_down) + [net.head]
    x = torch.randn(2, 1, *SMALL)
    with torch.no_grad():
        sizes = recorded_sizes(blocks, lambda: net(x))
        out = net(x)
    assert len(sizes) == 9 and all(h <= 21 and w <= 12 for h, w in sizes), sizes
    assert out.shape == (2, 3, *SMALL) and torch.isfinite(out).all()
    old = segdino_v2(SMALL, "vit_input")
    old.load_state_dict(net.state_dict(), strict=True)  # same modules: checkpoints load in both settings
    with torch.no_grad():
        assert max(h for h, _ in recorded_sizes([old.head], lambda: old(x))) == 56  # H/2 of the ViT input


def test_segdino_v2_deep_supervision_shapes_with_the_cap_active():
    net = randomize_(segdino_v2(SMALL, "patch", deep_supervision=True))
    outputs = net(torch.randn(2, 1, *SMALL))
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 20, 12), (2, 3, 10, 6)]
    # two outputs: the coarse one is weighted 0 by nnU-Net, so it is output 0 resized (no head of its own)
    assert len(net.aux_heads) == 0
    assert torch.equal(outputs[1], F.interpolate(outputs[0], size=(10, 6), mode="bilinear", align_corners=False))


def test_segdino_v2_unchanged_where_the_patch_is_not_enlarged():
    new, old = randomize_(segdino_v2(LARGE, "patch", deep_supervision=True)), segdino_v2(LARGE, "vit_input", True)
    assert new.encoder.adapter.resized_hw == LARGE
    old.load_state_dict(new.state_dict(), strict=True)
    x = torch.randn(2, 1, *LARGE)
    with torch.no_grad():
        for a, b in zip(new(x), old(x)):
            assert torch.equal(a, b)


def test_level_size_never_shrinks_a_tap():
    assert level_size((7, 4), 8, (21, 12)) == (21, 12)
    assert level_size((7, 4), 1, (21, 12)) == (7, 4)
    assert level_size((16, 16), 2, (8, 8)) == (16, 16)  # patch smaller than the token grid: stays at the tokens
    assert level_size((7, 4), 8, None) == (56, 32)


def test_bad_setting_is_refused():
    with pytest.raises(ValueError, match="max_decode_resolution"):
        SegDINOv2Config(max_decode_resolution="vit")
    with pytest.raises(ValueError, match="max_decode_resolution"):
        MedDINOv3Config(max_decode_resolution="full")


# ---------------------------------------------------------------------------------------------- MedDINOv3
def test_meddinov3_stages_stop_at_the_patch_grid_and_output_the_patch():
    net = randomize_(meddinov3(SMALL, "patch"))
    assert net.patch_pitch == (Fraction(107, 20), Fraction(64, 12))
    norms = [stage[1] for stage in net.decoder.stages]
    x = torch.randn(2, 1, *SMALL)
    with torch.no_grad():
        sizes = recorded_sizes(norms, lambda: net(x))
        out = net(x)
    # Stage 1 at 1/8 of the ViT input (coarser than the patch); stages 2-4 on the patch grid over the padded input:
    # floor(112 * 20 / 107) = 20 rows, exactly 64 * 12 / 64 = 12 columns (an integer product: no row may be lost).
    assert sizes == [(14, 8), (20, 12), (20, 12), (20, 12)]
    assert out.shape == (2, 3, *SMALL) and torch.isfinite(out).all()
    old = meddinov3(SMALL, "vit_input")
    old.load_state_dict(net.state_dict(), strict=True)
    with torch.no_grad():
        assert recorded_sizes([s[1] for s in old.decoder.stages], lambda: old(x))[-1] == (112, 64)
    net.train()
    net(x).square().mean().backward()
    assert all(s[0].weight.grad is not None and s[0].weight.grad.abs().sum() > 0 for s in net.decoder.stages)


def test_meddinov3_unchanged_where_the_patch_is_not_enlarged():
    new, old = randomize_(meddinov3(LARGE, "patch")), meddinov3(LARGE, "vit_input")
    old.load_state_dict(new.state_dict(), strict=True)
    x = torch.randn(2, 1, *LARGE)
    with torch.no_grad():
        assert torch.equal(new(x), old(x))


def test_meddinov3_both_settings_agree_on_a_spatially_constant_decode():
    """With every transposed-conv kernel the same at its 4 positions a constant token map decodes to a constant
    map (norm, GELU and head are per pixel), whatever the resolution: both settings must then give the same logits,
    i.e. the same stages, channels and head, in the same order."""
    net = randomize_(meddinov3(SMALL, "patch"))
    with torch.no_grad():
        for stage in net.decoder.stages:
            w = stage[0].weight
            w.copy_(w[:, :, :1, :1].expand_as(w))
        tokens = torch.randn(1, net.decoder.channels[0], 1, 1).expand(1, -1, *net.adapter.token_hw).contiguous()
        new = net._decode_at_most_at_patch_resolution(tokens)
        old = net._to_patch_grid(net.decoder(tokens))
    assert new.shape == old.shape == (1, 3, *SMALL)
    assert float(new.abs().max()) > 1e-3
    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pitch, target, size", [(4, Fraction(107, 20), 28), (Fraction(8, 3), Fraction(16, 3), 40),
                                                 (8, Fraction(107, 20), 14)])
def test_resampling_keeps_pixel_centres_aligned_with_the_patch(pitch, target, size):
    """A map whose value is each pixel's centre in ViT-input coordinates, resampled onto the patch pitch, must read
    (i + 1/2) * pitch_of_the_patch at output pixel i (interior; antialiasing is exact on a linear ramp there).
    Resampling to a size instead of a scale would stretch the grid by the padding (e.g. 0.9 px at row 19)."""
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) * float(Fraction(pitch))
    x = centres.view(1, 1, size, 1).expand(1, 1, size, 3).contiguous()
    y = resample_to_pitch(x, (Fraction(pitch), Fraction(1)), (target, Fraction(1)))
    expected = (torch.arange(y.shape[-2], dtype=torch.float64) + 0.5) * float(target)
    assert y.shape[-2] == int(size * Fraction(pitch) / target)
    interior = slice(2, y.shape[-2] - 2)
    torch.testing.assert_close(y[0, 0, interior, 1], expected[interior], rtol=0, atol=0.05 * float(target))
    assert y.shape[-1] == 3  # the axis already at the target pitch is left alone


def test_meddinov3_fewer_stages_still_end_on_the_patch_grid():
    net = randomize_(meddinov3(SMALL, "patch", decoder_stages=2))  # ends at 1/4 of the ViT input: coarser
    with torch.no_grad():
        out = net(torch.randn(1, 1, *SMALL))
    assert out.shape == (1, 3, *SMALL) and torch.isfinite(out).all()


def test_scale_factor_never_loses_a_row_to_float_rounding():
    """floor(21 * float(17/7)) is 50 in double precision, one row short of 21 * 17/7 = 51."""
    from nnunet_dino.networks.meddinov3 import _exact_scale

    assert int(21 * float(Fraction(17, 7))) == 50
    factor = _exact_scale(21, Fraction(17, 7))
    assert int(21 * factor) == 51 and abs(factor - 17 / 7) < 1e-12
    y = resample_to_pitch(torch.zeros(1, 1, 21, 2), (Fraction(17), Fraction(1)), (Fraction(7), Fraction(1)))
    assert y.shape[-2:] == (51, 2)


@pytest.mark.parametrize("family", ["segdino_v2", "meddinov3"])
def test_capped_decode_traces_without_graph_breaks(family):
    """The resampling plan is worked out at construction: torch.compile (nnU-Net's default on GPU) sees constants."""
    net = segdino_v2(SMALL, "patch") if family == "segdino_v2" else meddinov3(SMALL, "patch")
    explanation = torch._dynamo.explain(net)(torch.randn(1, 1, *SMALL))
    assert explanation.graph_break_count == 0, explanation.break_reasons
