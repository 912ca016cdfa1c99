"""GuiDINO on 3D configurations: slice-wise guidance of nnU-Net's 3D networks (docs/guidino.md#3d).

Networks are built from the real plans of the bundled HippoTiny (3d_fullres: PlainConvUNet; ResEnc-M plans:
ResidualEncoderUNet), with a randomly initialised ViT-S at few tokens per plane: the structure is under test.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_dino.cli.stock_pipeline import command, run
from nnunet_dino.guidance import SliceWiseGuidance, SlicingMismatchError, boundary_band, boundary_hinge_loss
from nnunet_dino.guidance.losses import dense_targets
from nnunet_dino.guidance.slicing import (SLICE_AXIS_ENV_VAR, SLICE_STRIDE_ENV_VAR, coarsest_spacing_axis,
                                          interpolate_planes, interpolation_plan, resolve_slice_axis,
                                          resolve_slice_stride, sampled_planes)
from nnunet_dino.networks import GuiDINOConfig
from nnunet_dino.training import GuiDINOTrainer, SegDINOTrainer
from nnunet_dino.training.guidino_loss import GuiDINOLoss


class Small3D(GuiDINOTrainer):
    """2 tokens on a plane's short side, every 3rd plane: fast on a CPU."""
    guidino = replace(GuiDINOTrainer.guidino, min_short_side_tokens=2, slice_stride=3)


@pytest.fixture(scope="module")
def plans(hippo_workspace) -> dict:
    pre = hippo_workspace["preprocessed"]
    if not (pre / "nnUNetResEncUNetMPlans.json").exists():
        run([command("nnUNetv2_plan_experiment"), "-d", "990", "-pl", "nnUNetPlannerResEncM"], hippo_workspace["env"])
    return {"default": load_json(pre / "nnUNetPlans.json"), "resenc": load_json(pre / "nnUNetResEncUNetMPlans.json"),
            "dataset_json": load_json(pre / "dataset.json")}


def build(plans: dict, configuration: str = "3d_fullres", trainer=Small3D, outputs: int = 3, patch=None,
          spacing=None, channels: int | None = None, deep_supervision: bool = True):
    plans = copy.deepcopy(plans)
    cfg = plans["configurations"][configuration]
    if patch is not None:
        cfg["patch_size"] = list(patch)
    if spacing is not None:
        cfg["spacing"] = list(spacing)
    pm = PlansManager(plans)
    torch.manual_seed(0)
    return trainer.build_network_architecture(pm, pm.get_configuration(configuration), channels or 1, outputs,
                                              deep_supervision)


def without_gates(net):
    unguided = copy.deepcopy(net.unet)
    for module in unguided.modules():
        module._forward_hooks.clear()
    return unguided


# ---------------------------------------------------------------------------------------------- slicing
def test_the_coarsest_spacing_axis_is_sliced_and_ties_go_to_the_lowest_axis():
    assert coarsest_spacing_axis([3.0, 0.8, 0.8]) == 0  # nnU-Net's transposed anisotropic CT: axial planes
    assert coarsest_spacing_axis([0.8, 0.8, 3.0]) == 2
    assert coarsest_spacing_axis([1.0, 1.0, 1.0]) == 0  # isotropic: axis 0
    assert coarsest_spacing_axis([1.0, 2.0, 2.0]) == 1  # two equally coarse axes: the lower
    assert coarsest_spacing_axis([1.0, 2.0, 2.0005]) == 1  # within 0.1%: equal


def test_slicing_overrides_and_bad_values(monkeypatch):
    monkeypatch.delenv(SLICE_AXIS_ENV_VAR, raising=False)
    monkeypatch.delenv(SLICE_STRIDE_ENV_VAR, raising=False)
    assert resolve_slice_axis(None, [0.8, 0.8, 3.0]) == 2
    assert resolve_slice_stride(None) == 2
    monkeypatch.setenv(SLICE_AXIS_ENV_VAR, "1")
    monkeypatch.setenv(SLICE_STRIDE_ENV_VAR, "5")
    assert resolve_slice_axis(None, [0.8, 0.8, 3.0]) == 1 and resolve_slice_stride(None) == 5
    assert resolve_slice_axis(0, [0.8, 0.8, 3.0]) == 0 and resolve_slice_stride(1) == 1  # a variant's setting wins
    monkeypatch.setenv(SLICE_AXIS_ENV_VAR, "3")
    with pytest.raises(ValueError, match=f"{SLICE_AXIS_ENV_VAR} must be an axis of the 3D patch"):
        resolve_slice_axis(None, [1, 1, 1])
    monkeypatch.setenv(SLICE_STRIDE_ENV_VAR, "two")
    with pytest.raises(ValueError, match="not an integer"):
        resolve_slice_stride(None)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="slice_stride must be an integer >= 1"):
            GuiDINOConfig(slice_stride=bad)
    for bad in (-1, 3):
        with pytest.raises(ValueError, match="slice_axis must be an axis"):
            GuiDINOConfig(slice_axis=bad)


def test_every_kth_plane_and_the_last_are_computed():
    assert sampled_planes(40, 4) == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 39]
    assert sampled_planes(10, 3) == [0, 3, 6, 9]
    assert sampled_planes(7, 1) == list(range(7))
    assert sampled_planes(1, 4) == [0]
    assert sampled_planes(5, 10) == [0, 4]


@pytest.mark.parametrize("n,stride", [(40, 4), (11, 3), (9, 2), (6, 1), (5, 7)])
def test_interpolation_is_exact_at_computed_planes_and_linear_between(n, stride):
    sampled = sampled_planes(n, stride)
    lower, upper, weight = interpolation_plan(n, stride)
    maps = torch.randn(2, len(sampled), 3, 4)
    full = interpolate_planes(maps, lower, upper, weight)
    assert full.shape == (2, n, 3, 4)
    for j, plane in enumerate(sampled):
        assert torch.equal(full[:, plane], maps[:, j])  # bit-equal: the ViT's own output
    # Maps that are linear in the plane index are reproduced at every plane from the computed ones alone.
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    linear = torch.stack([a + b * i for i in range(n)])[None]
    torch.testing.assert_close(interpolate_planes(linear[:, sampled], lower, upper, weight), linear)
    for i in range(n):  # and each plane between two computed ones is their distance-weighted mix
        j = max(p for p, s in enumerate(sampled) if s <= i)
        if sampled[j] != i:
            t = (i - sampled[j]) / (sampled[j + 1] - sampled[j])
            torch.testing.assert_close(full[:, i], (1 - t) * maps[:, j] + t * maps[:, j + 1])


def test_the_vit_runs_on_the_sampled_planes_in_one_call(plans):
    net = build(plans["default"]).eval()
    guidance = net.guidance
    assert isinstance(guidance, SliceWiseGuidance) and guidance.slice_axis == 0
    assert guidance.planes_seen == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39]
    calls = []
    guidance.adapter.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape))
    x = torch.randn(2, 1, 40, 56, 40)
    with torch.no_grad():
        tokens = guidance.plane_tokens(x)
        assert len(calls) == 1 and calls[0][0] == 2 * 14  # every sampled plane of both patches, one batch
        for b in (0, 1):
            for plane in (0, 21, 39):  # a sampled plane's tokens are the ViT's tokens of that plane alone
                alone = guidance.backbone.patch_features(guidance.adapter(x[b:b + 1, :, plane]), [guidance.layer])[0]
                torch.testing.assert_close(tokens[b:b + 1, plane], alone, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tokens[:, 1], (2 * tokens[:, 0] + tokens[:, 3]) / 3)
        scores, masks = guidance(x)
    assert masks.shape == (2, 3, 40, *guidance.adapter.token_hw)


# ---------------------------------------------------------------------------------------------- networks
@pytest.mark.parametrize("kind,unet_type,patch", [("default", PlainConvUNet, None),
                                                  ("default", PlainConvUNet, (32, 48, 24)),
                                                  ("resenc", ResidualEncoderUNet, None)])
def test_3d_gates_start_as_identity_bit_equal(plans, kind, unet_type, patch):
    net = build(plans[kind], patch=patch).eval()
    assert type(net.unet) is unet_type
    n_stages = plans[kind]["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["n_stages"]
    assert sorted(net.gates) == sorted(f"encoder_{i}" for i in range(n_stages))
    assert all(isinstance(g.mix, torch.nn.Conv3d) for g in net.gates.values())
    shape = tuple(patch or plans[kind]["configurations"]["3d_fullres"]["patch_size"])
    x = torch.randn(1, 1, *shape)
    unguided = without_gates(net)
    with torch.no_grad():
        guided, plain = net(x), unguided(x)
    assert guided[0].shape == (1, 3, *shape)
    for g, p in zip(guided, plain):
        assert torch.equal(g, p)
    with torch.no_grad():  # a trained gate acts
        net.gates["encoder_1"].mix.weight.normal_()
        assert not torch.equal(net(x)[0], plain[0])


def test_3d_gates_everywhere_start_as_identity_and_the_paper_form_runs(plans):
    everywhere = type("Everywhere", (Small3D,), {"guidino": replace(Small3D.guidino, gate_places=(
        "input", "encoder", "bottleneck", "decoder"))})
    net = build(plans["default"], trainer=everywhere).eval()
    assert "input" in net.gates and any(k.startswith("decoder_") for k in net.gates)
    x = torch.randn(1, 1, 40, 56, 40)
    with torch.no_grad():
        assert all(torch.equal(g, p) for g, p in zip(net(x), without_gates(net)(x)))
    from nnunet_dino.guidance import TokenBookConfig

    paper = type("Paper3D", (Small3D,), {"guidino": replace(Small3D.guidino, tokenbook=TokenBookConfig(mode="paper"),
                                                             gate_places=("bottleneck",), gate_mode="multiplicative")})
    net = build(plans["default"], trainer=paper).eval()
    with torch.no_grad():
        out = net(x)
    assert out[0].shape == (1, 3, 40, 56, 40) and net.last_guide[1].shape[1] == 1


def test_an_anisotropic_plan_is_sliced_axially_and_every_stage_gets_its_3d_guide(plans):
    # Axis 2 coarse (3 mm): the planes are the 40x48 in-plane images; stage grids halve along every axis.
    net = build(plans["default"], patch=(40, 48, 16), spacing=(0.8, 0.8, 3.0)).eval()
    guidance = net.guidance
    assert guidance.slice_axis == 2 and guidance.adapter.image_hw == (40, 48) and guidance.num_planes == 16
    seen = {}
    for name, stage in zip(sorted(net.gates), net.unet.encoder.stages):
        stage.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, tuple(o.shape[2:])))
    with torch.no_grad():
        net(torch.randn(1, 1, 40, 48, 16))
        masks = net.last_guide[1]
        assert masks.shape[2] == 16  # one guide map per plane along axis 2
        for shape in seen.values():
            guide = guidance.guide_to(masks, shape)
            assert guide.shape == (1, 3, *shape) and guide.min() >= 0 and guide.max() <= 1
    # In-plane at full resolution the plane guide is the 2D adapter's map of that plane (axis 2 -> last dim).
    full = guidance.guide_to(masks, (40, 48, 16))
    torch.testing.assert_close(full[..., 5], guidance.adapter.token_map_to(masks[:, :, 5], (40, 48)))


def test_2d_networks_are_unchanged(plans):
    pm = PlansManager(copy.deepcopy(plans["default"]))
    torch.manual_seed(0)
    net = GuiDINOTrainer.build_network_architecture(pm, pm.get_configuration("2d"), 1, 3, True)
    assert type(net.guidance) is not SliceWiseGuidance and net.guidance.spatial_dims == 2
    keys = net.state_dict().keys()
    assert not any("slicing" in k for k in keys)
    assert all(net.state_dict()[f"gates.{g}.mix.weight"].ndim == 4 for g in net.gates)


def test_wrong_3d_input_gives_a_clear_error(plans):
    net = build(plans["default"], deep_supervision=False)
    with pytest.raises(ValueError, match=r"Expected a \(B, 1, 40, 56, 40\) patch, got \(1, 2, 40, 56, 40\)"):
        net(torch.randn(1, 2, 40, 56, 40))
    with pytest.raises(ValueError, match=r"got \(1, 1, 40, 56\)"):
        net.guidance(torch.randn(1, 1, 40, 56))


def test_a_checkpoint_with_other_slicing_is_refused_with_what_to_set(plans):
    trained = build(plans["default"]).state_dict()
    other = build(plans["default"], trainer=type("Stride2", (GuiDINOTrainer,), {
        "guidino": replace(GuiDINOTrainer.guidino, min_short_side_tokens=2, slice_stride=2)}))
    with pytest.raises(SlicingMismatchError, match=f"slice stride 3.*{SLICE_STRIDE_ENV_VAR}=3"):
        other.load_state_dict(trained)
    build(plans["default"]).load_state_dict(trained)  # the same slicing loads


def test_cascade_segmentation_channels_never_reach_the_vit(plans):
    plans_c = copy.deepcopy(plans["default"])
    plans_c["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    pm = PlansManager(plans_c)
    cm = pm.get_configuration("3d_cascade_fullres")
    channels = determine_num_input_channels(pm, cm, plans["dataset_json"])
    assert channels == 3  # the image + one-hot of the 2 foreground labels, as nnU-Net feeds a cascade
    torch.manual_seed(0)
    net = Small3D.build_network_architecture(pm, cm, channels, 3, False).eval()
    assert net.guidance.vit_channels == (0,) and net.guidance.adapter.in_channels == 1
    assert "ViT input channels [0] of 3 (2 more: the cascade's low-resolution segmentation" in net.guidance.describe()
    seen = []
    net.guidance.adapter.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    x = torch.randn(2, 3, 40, 56, 40)
    y = x.clone()
    y[:, 1:] = torch.randint(0, 2, y[:, 1:].shape).float()  # other low-res segmentations
    with torch.no_grad():
        out_x, guide_x = net(x), net.last_guide[1]
        out_y, guide_y = net(y), net.last_guide[1]
    assert torch.equal(seen[0], seen[1]) and seen[0].shape[1] == 1  # the ViT input is unchanged, image only
    assert torch.equal(guide_x, guide_y)
    assert not torch.equal(out_x, out_y)  # while the U-Net does see the segmentation channels


def test_segdino_still_refuses_3d_before_any_folder_is_made(plans, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    with pytest.raises(ValueError, match="SegDINOTrainer works on 2D patches.*nnUNetv2_train DATASET 2d FOLD"):
        SegDINOTrainer(dict(copy.deepcopy(plans["default"]), continue_training=False), "3d_fullres", 0,
                       plans["dataset_json"], torch.device("cpu"))
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- losses
def test_3d_boundary_band_is_the_3x3x3_morphological_gradient():
    mask = torch.zeros(1, 1, 10, 10, 10)
    mask[..., 3:7, 3:7, 3:7] = 1  # a 4^3 cube: dilated 6^3, eroded 2^3
    band = boundary_band(mask)
    assert band.sum() == 6 ** 3 - 2 ** 3
    assert band[0, 0, 2, 2, 2] == 1 and band[0, 0, 5, 5, 5] == 0 and band[0, 0, 3, 3, 3] == 1
    with pytest.raises(ValueError, match="boundary_band takes"):
        boundary_band(torch.zeros(1, 10, 10))


@pytest.mark.parametrize("regions", [False, True])
def test_3d_hinge_equals_2d_on_a_one_plane_volume_and_ignores_ignored_voxels(regions):
    torch.manual_seed(0)
    k = 3
    logits = torch.randn(2, k, 12, 9)
    if regions:
        targets = (torch.rand(2, k, 12, 9) > 0.5).float()
    else:
        targets = dense_targets(torch.randint(0, k, (2, 1, 12, 9)), k, False, None)[0]
    valid = (torch.rand(2, 1, 12, 9) > 0.2).float()
    flat = boundary_hinge_loss(logits, targets, valid, regions)
    logits_3d = logits[:, :, None].clone().requires_grad_()
    volume = boundary_hinge_loss(logits_3d, targets[:, :, None], valid[:, :, None], regions)
    torch.testing.assert_close(volume, flat)  # one plane: the 3x3x3 band is the 3x3 one
    volume.backward()
    assert not logits_3d.grad[:, :, 0].permute(1, 0, 2, 3)[:, valid[:, 0] == 0].any()


def test_3d_hinge_on_a_volume_against_a_brute_force_margin():
    torch.manual_seed(1)
    k = 4
    labels = torch.randint(0, k, (1, 1, 6, 7, 5))
    onehot, valid = dense_targets(labels, k, False, ignore_label=None)
    assert onehot.shape == (1, k, 6, 7, 5) and valid.shape == (1, 1, 6, 7, 5)
    logits = torch.randn(1, k, 6, 7, 5)
    loss = boundary_hinge_loss(logits, onehot, valid, False)
    # brute force over every voxel and class (the definition in boundary_hinge_loss's docstring)
    band = boundary_band(onehot[:, 1:])
    total, count = 0.0, 0.0
    for idx in torch.nonzero(band):
        _, c, z, y, x = idx.tolist()
        c += 1
        z_v = logits[0, :, z, y, x]
        true = int(labels[0, 0, z, y, x])
        margin = (z_v[c] - torch.cat([z_v[:c], z_v[c + 1:]]).max()) if true == c else z_v[true] - z_v[c]
        total += float(torch.relu(1 - margin))
        count += 1
    assert count > 0
    torch.testing.assert_close(loss, torch.tensor(total / count))


def test_3d_guide_loss_is_supervised_per_token_and_plane_and_trains_the_tokenbook(plans):
    net = build(plans["default"])
    lm_ignore = 3  # an ignore label: the voxels labelled 3 supervise nothing
    loss = GuiDINOLoss(lambda out, tgt: out[0].float().mean() * 0, lambda: net, 3, False, lm_ignore, 0.1, 0.05, 1.0)
    target = torch.randint(0, 3, (2, 1, 40, 56, 40))
    target[:, :, :, :10] = lm_ignore
    out = net(torch.randn(2, 1, 40, 56, 40))
    total = loss(out, [target])
    terms = loss.last_terms
    assert torch.isfinite(total) and terms["guide_loss"] > 0 and terms["hinge_loss"] > 0
    onehot, valid = dense_targets(target, 3, False, lm_ignore)
    fractions, covered = net.guidance.dense_to_tokens(onehot * valid)
    scores = net.last_guide[0]
    assert fractions.shape == scores.shape == (2, 3, 40, *net.guidance.adapter.token_hw)
    plane = 17  # per plane, the targets are the 2D adapter's area averages of that plane
    per_plane, _ = net.guidance.adapter.dense_to_tokens((onehot * valid)[:, :, plane])
    torch.testing.assert_close(fractions[:, :, plane], per_plane)
    total.backward()
    assert net.guidance.tokenbook.prototypes.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in net.guidance.backbone.named_parameters()
               if "lora_" in n)
