"""What does nnUNetv2_dino_pretrain change? Pretrain on a dataset's unlabelled training slices, then compare the
frozen patch features of the starting weights and the pretrained weights with a linear probe on held-out cases.

    python benchmarks/bench_pretraining.py -d 4 --weights random --out /tmp/bench_pt \
        --pretrain_args "--stages dino highres --steps 170 30 --batch_size 8 --global_tokens 10 --highres_tokens 16 \
                         --highres_extent 1" --json benchmarks/results/pretraining_hippocampus_cpu.json

Split: the preprocessed cases sorted by name; every 5th (index % 5 == 0) is held out. Pretraining never reads the
held-out cases (--exclude_cases); the probe is fitted on tokens of the other cases and scored on the held-out ones.

Probe (CPU-sized by default: 20 fitting cases and 26 held-out cases, every 8th slice; see the options): each slice
is zero-padded/centre-cropped to the plans' patch size (what the trainers feed), mapped through the
trainers' input adapter (16 tokens on the short side), and its frozen patch features (final block, and the 4
default taps concatenated) are taken from ``DinoBackbone.patch_features``. Token labels: the area average of the
one-hot label map over each token (``DinoInputAdapter.dense_to_tokens``); a token's class is its majority class,
tokens covering < 50 % real image are dropped. Logistic regression (standardised features, balanced class weights)
on up to --probe_tokens training tokens; reported: token accuracy, per-class token Dice and their foreground mean.

Needs nnU-Net's environment (nnUNet_preprocessed, nnUNet_raw) with the dataset planned and preprocessed for -c 2d.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-c", default="2d")
    p.add_argument("--arch", default="dinov3_vits16")
    p.add_argument("--weights", default="random", help="starting weights (file or 'random')")
    p.add_argument("--seed", type=int, default=0, help="seed of the random starting weights")
    p.add_argument("--out", required=True, help="work folder (pretraining output goes to OUT/pretrain)")
    p.add_argument("--pretrain_args", default="", help="extra arguments for nnUNetv2_dino_pretrain")
    p.add_argument("--pretrained", default=None, help="skip pretraining: an existing pretrained weight file")
    p.add_argument("--probe_tokens", type=int, default=20000, help="training tokens the probe fits on")
    p.add_argument("--holdout_every", type=int, default=5)
    p.add_argument("--probe_train_cases", type=int, default=20, help="cases (of the non-held-out) the probe fits on")
    p.add_argument("--probe_test_cases", type=int, default=26, help="held-out cases the probe is scored on (evenly "
                   "spaced; CPU time)")
    p.add_argument("--slice_stride", type=int, default=8, help="probe every n-th slice of a case (CPU time)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("-device", default="cpu")
    return p.parse_args()


def split_cases(dataset: str, configuration: str, every: int) -> tuple[list[str], list[str], object]:
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    name = maybe_convert_to_dataset_name(dataset)
    folder = Path(os.environ["nnUNet_preprocessed"]) / name
    pm = PlansManager(str(folder / "nnUNetPlans.json"))
    cm = pm.get_configuration(configuration)
    ds = infer_dataset_class(str(folder / cm.data_identifier))(str(folder / cm.data_identifier))
    cases = sorted(ds.identifiers)
    held_out = [c for i, c in enumerate(cases) if i % every == 0]
    train = [c for c in cases if c not in held_out]
    return train, held_out, (ds, pm, cm, name, folder)


def run_pretraining(a, held_out: list[str]) -> tuple[Path, float]:
    out = Path(a.out) / "pretrain"
    exclude_file = Path(a.out) / "held_out_cases.txt"
    exclude_file.parent.mkdir(parents=True, exist_ok=True)
    exclude_file.write_text("\n".join(held_out) + "\n")
    resume = ["--c"] if (out / "pretrain_run.json").is_file() else []
    cmd = [sys.executable, "-m", "nnunet_dino.cli.pretrain", "-d", a.d, "-c", a.c, "-o", str(out), "--arch", a.arch,
           "--weights", a.weights, "--seed", str(a.seed), "-device", a.device, "-nt", "1",
           "--exclude_cases", f"@{exclude_file}", *shlex.split(a.pretrain_args), *resume]
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    files = sorted(out.glob("*_pretrain_*-*.pth"))
    if len(files) != 1:
        raise RuntimeError(f"expected one exported weight file in {out}, found {files}")
    return files[0], time.time() - t0


def token_data(backbone, cases, ds, pm, cm, layers_sets, slice_stride=1):
    """Per-token features (one array per layer set) and majority labels of every slice of ``cases``."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from nnunet_dino.backbone import DinoInputAdapter, plans_intensity_properties

    patch = tuple(cm.patch_size)
    dataset_json = json.loads((Path(ds.source_folder).parent / "dataset.json").read_text())
    n_classes = int(max(pm.get_label_manager(dataset_json).all_labels)) + 1
    feats = {k: [] for k in layers_sets}
    labels = []
    adapter = None
    for case in cases:
        data, seg, _, _ = ds.load_case(case)
        data = np.asarray(data[:], dtype=np.float32)[:, ::slice_stride]
        seg = np.asarray(seg[:])[:, ::slice_stride]
        if adapter is None:
            n_channels = data.shape[0]
            adapter = DinoInputAdapter(n_channels, backbone.patch_size, patch, 16, cm.normalization_schemes,
                                       backbone.load_report.pretraining, plans_intensity_properties(pm)).eval()
        x = torch.from_numpy(data).permute(1, 0, 2, 3)  # slices as a batch (Z, C, H, W)
        y = torch.from_numpy(seg[0].astype(np.int64))  # (Z, H, W), -1 where nnU-Net marked outside
        x, y = _fit(x, patch, 0.0), _fit(y.unsqueeze(1).float(), patch, -1.0)[:, 0].long()
        valid_px = (y >= 0).float().unsqueeze(1)
        onehot = F.one_hot(y.clamp_min(0), n_classes).permute(0, 3, 1, 2).float() * valid_px
        with torch.no_grad():
            vit_in = adapter(x)
            per_layer = {k: backbone.patch_features(vit_in, layers=list(v)) for k, v in layers_sets.items()}
            soft, valid = adapter.dense_to_tokens(torch.cat([onehot, valid_px], 1))
        real = (soft[:, -1] * valid[:, 0]) > 0.5  # tokens mostly on real (unpadded) image
        lab = soft[:, :-1].argmax(1)
        labels.append(lab[real].numpy())
        for k, maps in per_layer.items():
            f = torch.cat(maps, 1).permute(0, 2, 3, 1)[real]
            feats[k].append(f.numpy().astype(np.float32))
    return {k: np.concatenate(v) for k, v in feats.items()}, np.concatenate(labels)


def _fit(t, hw, fill):
    """Centre-pad with ``fill`` / centre-crop (Z, C, H, W) to ``hw`` (the trainers' patch)."""
    import torch.nn.functional as F
    for axis, size in ((2, hw[0]), (3, hw[1])):
        cur = t.shape[axis]
        if cur < size:
            before = (size - cur) // 2
            pad = [0, 0, 0, 0]
            pad[(3 - axis) * 2: (3 - axis) * 2 + 2] = [before, size - cur - before]
            t = F.pad(t, pad, value=fill)
        elif cur > size:
            start = (cur - size) // 2
            t = t.narrow(axis, start, size)
    return t


def probe(train, test, seed=0):
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    (xtr, ytr), (xte, yte) = train, test
    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(max_iter=500, class_weight="balanced", C=1.0, random_state=seed)
    clf.fit(scaler.transform(xtr), ytr)
    pred = clf.predict(scaler.transform(xte))
    classes = sorted(set(np.unique(yte)) | set(np.unique(ytr)))
    dice = {}
    for c in classes:
        tp = float(((pred == c) & (yte == c)).sum())
        denom = float((pred == c).sum() + (yte == c).sum())
        dice[int(c)] = 2 * tp / denom if denom else float("nan")
    fg = [v for c, v in dice.items() if c != 0]
    return {"token_accuracy": float((pred == yte).mean()), "token_dice_per_class": dice,
            "token_dice_foreground_mean": float(np.nanmean(fg)) if fg else None,
            "train_tokens": int(len(ytr)), "test_tokens": int(len(yte))}


def main():
    a = parse()
    import numpy as np
    import torch
    torch.set_num_threads(1)
    from nnunet_dino.backbone import load_backbone, resolve_weights_setting

    train, held_out, (ds, pm, cm, name, folder) = split_cases(a.d, a.c, a.holdout_every)
    print(f"{name}: {len(train)} pretraining/probe-training cases, {len(held_out)} held-out cases", flush=True)
    pretrain_seconds = None
    weights_file = Path(a.pretrained) if a.pretrained else None
    if weights_file is None:
        weights_file, pretrain_seconds = run_pretraining(a, held_out)

    def initial():
        if resolve_weights_setting(a.weights, a.arch) is None:
            torch.manual_seed(a.seed)  # the same random weights the pretraining started from
            return load_backbone(a.arch, random_init=True)
        return load_backbone(a.arch, weights=a.weights)

    arms = {"initial": initial, "pretrained": lambda: load_backbone(a.arch, weights=weights_file)}
    layers = {"last_block": None, "taps_2_5_8_11": None}
    results = {}
    rng = np.random.default_rng(0)
    keep = None  # the probe's training tokens: drawn for the first arm, the same for the other
    for arm, make in arms.items():
        bb = make().eval()
        layer_sets = {"last_block": [bb.arch.depth - 1], "taps_2_5_8_11": list(bb.arch.default_layers)}
        layers = layer_sets
        t0 = time.time()
        probe_cases = train[:: max(1, len(train) // a.probe_train_cases)][: a.probe_train_cases]
        ftr, ytr = token_data(bb, probe_cases, ds, pm, cm, layer_sets, a.slice_stride)
        test_cases = held_out[:: max(1, len(held_out) // a.probe_test_cases)][: a.probe_test_cases]
        fte, yte = token_data(bb, test_cases, ds, pm, cm, layer_sets, a.slice_stride)
        if keep is None:
            keep = rng.permutation(len(ytr))[: a.probe_tokens]
        results[arm] = {k: probe((ftr[k][keep], ytr[keep]), (fte[k], yte)) for k in layer_sets}
        results[arm]["feature_seconds"] = round(time.time() - t0, 1)
        print(arm, json.dumps(results[arm], indent=1), flush=True)
    record = {
        "benchmark": "bench_pretraining.py: linear probe of frozen patch features, initial vs self-pretrained",
        "dataset": name, "configuration": a.c, "arch": a.arch,
        "starting_weights": a.weights if a.weights != "random" else f"random (realistic-scale init, seed {a.seed})",
        "pretrained_file": str(weights_file), "pretrain_args": a.pretrain_args,
        "pretrain_wall_seconds": None if pretrain_seconds is None else round(pretrain_seconds, 1),
        "held_out_cases": len(held_out), "pretraining_cases": len(train),
        "probe_training_cases": min(a.probe_train_cases, len(train)),
        "probe_test_cases": min(a.probe_test_cases, len(held_out)), "slice_stride": a.slice_stride,
        "layers": layers,
        "results": results,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_average_at_end": os.getloadavg()},
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    provenance = Path(weights_file).parent / "pretrain_provenance.json"
    if provenance.is_file():
        p = json.loads(provenance.read_text())
        record["pretraining"] = {k: p.get(k) for k in ("steps", "number_of_slices", "number_of_cases", "stages",
                                                          "wall_seconds_this_process", "date_utc",
                                                          "final_losses_mean_last_20_steps", "weights_sha256")}
        log_file = Path(weights_file).parent / "pretrain_log.csv"
        if log_file.is_file():
            rows = log_file.read_text().splitlines()[1:]
            record["pretraining"]["first_total_loss"] = float(rows[0].split(",")[5])
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(record, indent=2, default=str))
        print("wrote", a.json)


if __name__ == "__main__":
    main()
