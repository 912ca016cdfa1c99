"""nnUNetv2_dino_pretrain's mechanism: losses, EMA teacher, Gram anchoring, Sinkhorn-Knopp, export and resume.

A ViT-S on tiny crops (2x2 global, 1x1 local tokens) over synthetic z-scored slices (SyntheticSlices): seconds per
run on one CPU thread. The command line and the errors on real nnU-Net folders: test_pretraining_cli.py.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from nnunet_dino.backbone import load_backbone
from nnunet_dino.backbone.meta_export import canonical_to_meta, save_meta_named
from nnunet_dino.backbone.registry import get_architecture
from nnunet_dino.pretraining import PretrainDataError, PretrainSettings, RunFolderError, default_stage
from nnunet_dino.pretraining.data import DatasetInput, SliceRef
from nnunet_dino.pretraining.gram import gram_anchoring_loss
from nnunet_dino.pretraining.loop import Pretrainer
from nnunet_dino.pretraining.run import pretrain
from nnunet_dino.pretraining.sinkhorn import sinkhorn_knopp_log

ARCH = "dinov3_vits16"
CPU = torch.device("cpu")


class SyntheticSlices:
    """Duck-typed SliceSource: ``n`` smooth random z-scored 1-channel slices of 40x36 (patch 32x32)."""

    def __init__(self, n=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(n, 1, 10, 9, generator=g)
        self.images = torch.nn.functional.interpolate(base, size=(40, 36), mode="bilinear", align_corners=False)
        self.images = (self.images - self.images.mean()) / self.images.std()
        self.datasets = [DatasetInput("Dataset999_Synthetic", Path("/nonexistent"), (32, 32),
                                      ["ZScoreNormalization"], None, 1)]
        self.refs = [SliceRef(0, f"case_{i:03d}", 0, "preprocessed") for i in range(n)]
        self.excluded = []

    def __len__(self):
        return len(self.refs)

    @property
    def num_cases(self):
        return len(self.refs)

    def load(self, ref):
        return self.images[int(ref.case[-3:])]

    def describe(self):
        return [{"name": "Dataset999_Synthetic", "configuration": "2d", "cases": len(self), "slices": len(self)}]


def tiny_settings(stages=(("dino", 8),), **kw) -> PretrainSettings:
    st = []
    for name, steps in stages:
        s = default_stage(name, steps)
        st.append(replace(s, global_tokens=2, local_tokens=1, n_local_crops=2, lr=1e-3, warmup_steps=1,
                          teacher_temp=(0.06, 0.06), crop_extent=1.0))
    base = dict(arch=ARCH, stages=tuple(st), batch_size=4, dino_prototypes=64, ibot_prototypes=64,
                head_hidden_dim=64, head_bottleneck_dim=32, drop_path_rate=0.0, save_every=1000)
    base.update(kw)
    return PretrainSettings(**base)


@pytest.fixture(scope="module")
def random_vit():
    torch.manual_seed(0)
    return load_backbone(ARCH, random_init=True)


def make_trainer(settings, backbone, out):
    return Pretrainer(settings, SyntheticSlices(), backbone, out, CPU)


def test_losses_finite_and_total_lower_after_training(random_vit, tmp_path):
    tr = make_trainer(tiny_settings(stages=(("dino", 8),)), random_vit, tmp_path)
    before = tr.losses_on_batch(0)
    tr.run(progress=False)
    after = tr.losses_on_batch(0)
    assert all(torch.isfinite(torch.tensor(v)) for v in list(before.values()) + list(after.values()))
    assert after["total"] < before["total"] - 0.05, (before, after)
    rows = (tmp_path / "pretrain_log.csv").read_text().splitlines()
    assert len(rows) == 9 and (tmp_path / "pretrain_losses.png").stat().st_size > 1000


def test_teacher_is_the_ema_of_the_student(random_vit, tmp_path):
    tr = make_trainer(tiny_settings(), random_vit, tmp_path)
    tr.train_step()  # move the student away from the teacher first
    teacher_before = {k: v.clone() for k, v in tr.teacher.state_dict().items()}
    values = tr.train_step()
    m = values["momentum"]
    assert 0.9 < m < 1.0
    student = tr.student.state_dict()
    checked = 0
    for name, p in tr.teacher.named_parameters():
        expected = m * teacher_before[name] + (1 - m) * student[name]
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-6)
        checked += int(not torch.equal(teacher_before[name], student[name]))
    assert checked > 100  # the formula was checked on tensors where student and teacher differ


def test_gram_loss_zero_for_equal_and_positive_for_different_features(random_vit):
    g = torch.Generator().manual_seed(1)
    p = torch.randn(3, 20, 384, generator=g)
    assert float(gram_anchoring_loss(p, p.clone())) == 0.0
    assert float(gram_anchoring_loss(p, 2.5 * p)) < 1e-10  # structure, not scale
    other = p + 0.5 * torch.randn(3, 20, 384, generator=g)
    assert float(gram_anchoring_loss(p, other)) > 1e-3
    # Inside a run: the Gram teacher is the teacher at the start of the stage; the loss grows as the student moves.
    tr = Pretrainer(tiny_settings(stages=(("gram", 4),)), SyntheticSlices(), random_vit, Path("/nonexistent"), CPU)
    tr.student.load_state_dict(tr.teacher.state_dict())
    tr.gram_teacher = tr._frozen_copy(tr.teacher)
    assert tr.losses_on_batch(0)["gram"] < 1e-10
    first = tr.train_step()
    for _ in range(2):
        last = tr.train_step()
    assert last["gram"] > 1e-4 and last["gram"] > first["gram"]


def test_sinkhorn_targets_are_balanced_distributions():
    # Prototype usage skewed towards the last prototypes, as a plain softmax would assign it.
    logits = torch.randn(64, 16, generator=torch.Generator().manual_seed(2)) * 0.5 + torch.linspace(0, 1, 16)
    softmax_usage = torch.softmax(logits / 0.1, 1).mean(0)
    assert float(softmax_usage.max()) > 0.15 and float(softmax_usage.min()) < 0.001
    for iterations, tolerance in ((3, 0.04), (20, 0.002)):
        q = sinkhorn_knopp_log(logits, 0.1, iterations=iterations).exp()
        torch.testing.assert_close(q.sum(1), torch.ones(64), rtol=0, atol=1e-5)  # each sample: a distribution
        assert float((q.mean(0) - 1 / 16).abs().max()) < tolerance, iterations  # prototypes used equally


RUN_SETTINGS = dict(stages=(("dino", 3), ("gram", 2)), save_every=2)


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """One uninterrupted 5-step run (dino 3, gram 2), exported: what the export, resume and refusal tests share."""
    out = tmp_path_factory.mktemp("pretrain") / "a"
    path = pretrain(tiny_settings(**RUN_SETTINGS), ["999"], out, "random", "synthetic", CPU, progress=False,
                    source=SyntheticSlices())
    return out, path


def test_export_loads_strictly_with_hash_check_and_features_changed(random_vit, whole_run, tmp_path):
    out, path = whole_run
    assert path.name.startswith("dinov3_vits16_pretrain_synthetic-") and path.suffix == ".pth"
    # Strict load + sha256 check; a single flipped byte must fail the check.
    loaded = load_backbone(ARCH, weights=path).eval()
    x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        new, old = loaded.patch_features(x)[0], random_vit.eval().patch_features(x)[0]
    rel = float((new - old).norm() / old.norm())
    assert rel > 0.02, rel
    record = json.loads((out / "pretrain_provenance.json").read_text())
    assert record["initial_weights"]["random"] and record["steps"] == 5
    assert record["weights_file"] == path.name and set(record["final_losses_mean_last_20_steps"]) >= {"dino", "ibot"}
    damaged = tmp_path / path.name
    data = path.read_bytes()
    damaged.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(Exception, match="sha256"):
        load_backbone(ARCH, weights=damaged)


@pytest.mark.parametrize("arch", ["dinov3_vits16plus", "dinov2_vits14", "dinov2_vits14_reg"])
def test_meta_layout_writer_round_trips_other_architectures(arch, tmp_path):
    from nnunet_dino.backbone import DinoBackbone, init_random_dino_weights_
    torch.manual_seed(4)
    bb = init_random_dino_weights_(DinoBackbone(get_architecture(arch))).eval()
    path = save_meta_named(canonical_to_meta(bb.arch, bb.vit.state_dict()), tmp_path, f"{arch}_pretrain_test")
    loaded = load_backbone(arch, weights=path).eval()
    p = bb.patch_size
    x = torch.randn(1, 3, 2 * p, 3 * p, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(loaded.patch_features(x)[0], bb.patch_features(x)[0], rtol=1e-5, atol=1e-5)


def test_resume_is_bit_identical_to_an_uninterrupted_run(whole_run, tmp_path):
    out, whole = whole_run
    settings = tiny_settings(**RUN_SETTINGS)
    assert pretrain(settings, ["999"], tmp_path / "b", "random", "synthetic", CPU, progress=False,
                    source=SyntheticSlices(), stop_after=3) is None  # state saved at step 2 and at the stage end
    resumed = pretrain(settings, ["999"], tmp_path / "b", "random", "synthetic", CPU, progress=False,
                       source=SyntheticSlices(), resume=True)
    assert resumed.name == whole.name  # same sha256: bit-identical weights
    def losses(folder):  # every column but the step's duration
        return [line.rsplit(",", 1)[0] for line in (folder / "pretrain_log.csv").read_text().splitlines()]
    assert losses(out) == losses(tmp_path / "b") and len(losses(out)) == 6


def test_output_folder_of_another_run_and_too_few_slices_are_refused(whole_run, tmp_path):
    out, _ = whole_run
    settings = tiny_settings(**RUN_SETTINGS)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    changed = replace(settings, stages=(replace(settings.stages[0], lr=2e-3), settings.stages[1]))
    with pytest.raises(RunFolderError, match="different pretraining run.*lr"):
        pretrain(changed, ["999"], out, "random", "synthetic", CPU, progress=False, source=SyntheticSlices(),
                 resume=True)
    with pytest.raises(RunFolderError, match="already holds this pretraining run.*--c"):
        pretrain(settings, ["999"], out, "random", "synthetic", CPU, progress=False, source=SyntheticSlices())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="not empty"):
        pretrain(settings, ["999"], tmp_path / "other", "random", "synthetic", CPU, progress=False,
                 source=SyntheticSlices())
    assert before == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(PretrainDataError, match="12 slice.*--batch_size"):
        pretrain(replace(settings, batch_size=16), ["999"], tmp_path / "few", "random", "synthetic", CPU,
                 progress=False, source=SyntheticSlices())
    assert not (tmp_path / "few").exists()


DDP_SCRIPT = r'''
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from test_pretraining import SyntheticSlices, tiny_settings, ARCH
from nnunet_dino.backbone import load_backbone
from nnunet_dino.pretraining.loop import Pretrainer
from nnunet_dino.pretraining.run import distributed_from_env
torch.set_num_threads(1)
info, device = distributed_from_env()
torch.manual_seed(0)
tr = Pretrainer(tiny_settings(stages=(("gram", 2),)), SyntheticSlices(), load_backbone(ARCH, random_init=True),
                sys.argv[2], device, info)
values = [tr.train_step() for _ in range(2)]
flat = torch.cat([p.detach().flatten() for p in tr.teacher.parameters()])
student = torch.cat([p.detach().flatten() for p in tr.student.parameters()])
sums = [torch.zeros(2) for _ in range(2)]
dist.all_gather(sums, torch.stack([flat.double().sum(), student.double().sum()]).float())
batch = tr.make_batch(5, 0, tr.settings.stages[0])[0]
firsts = [torch.zeros(1) for _ in range(2)]
dist.all_gather(firsts, batch.flatten()[:1].contiguous())
if info.is_main:
    json.dump({"sums": [s.tolist() for s in sums], "firsts": [f.item() for f in firsts],
               "losses": values[-1]["total"]}, open(sys.argv[3], "w"))
dist.destroy_process_group()
'''


def test_two_process_ddp_keeps_students_and_teachers_identical(tmp_path):
    import subprocess
    import sys
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    result = tmp_path / "result.json"
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                    str(script), str(Path(__file__).parent), str(tmp_path / "out"), str(result)],
                   check=True, env=env, timeout=120)
    r = json.loads(result.read_text())
    assert r["sums"][0] == r["sums"][1]  # DDP averaged the gradients: same student and teacher on both ranks
    assert r["firsts"][0] != r["firsts"][1]  # but each rank drew its own crops
    assert torch.isfinite(torch.tensor(r["losses"]))
