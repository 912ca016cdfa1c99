"""Inference with LoRA merged (EvalMergedLoraLinear's cached W + s B A) against peft's unmerged forward, and against
the same network without LoRA: CPU time per inference tile, equality of the outputs and bit-stability of the state
dict, at a dataset's own plans.

    python benchmarks/bench_lora_inference.py -d 4                   # GuiDINO (ViT-S/16 + LoRA) vs GuiDINO_frozen
    python benchmarks/bench_lora_inference.py -d 4 --trainer nnUNetTrainerSegDINOv2_lora --frozen nnUNetTrainerSegDINOv2

Plans and dataset.json from ``$nnUNet_preprocessed/<dataset>/`` (planning only). Networks are built with the
trainers' ``build_network_architecture`` (as nnUNetv2_predict builds them), every DinoBackbone given realistic-scale
random weights (``init_random_dino_weights_``) and every lora_B N(0, 0.02) (peft starts it at 0, where both paths
are trivially equal). In eval mode without autograd, as nnU-Net predicts, each timed round runs one tile (batch
``--batch-size``, default 1 as nnU-Net's 2D sliding window) through: the LoRA network merged (the default), the same
network with the merged path switched off (peft's forward), and the network without LoRA (same base weights);
rounds alternate the three, each first in turn, so that load drifts hit all alike. Reported: median CPU time
(``time.process_time``, ``--threads``) of the whole network and of its backbone call(s)
(``DinoBackbone.patch_features``), the largest difference merged vs unmerged (of the DINO features and of the
logits), and whether every state-dict tensor is bit-identical (and its version counter unchanged) after all runs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode_cost import build, plans_folder  # noqa: E402  (same plans handling)


def prepared(name: str, plans_dir: Path, configuration: str, seed: int):
    import torch
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_dino.backbone import DinoBackbone, init_random_dino_weights_

    cls = recursive_find_trainer_class_by_name(name)
    if cls is None:
        raise SystemExit(f"No trainer named {name}.")
    torch.manual_seed(seed)
    net, channels, patch, _ = build(cls, plans_dir, configuration)
    backbones = [m for m in net.modules() if isinstance(m, DinoBackbone)]
    if not backbones:
        raise SystemExit(f"{name}'s network has no DINO backbone.")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for bb in backbones:
            init_random_dino_weights_(bb, generator=g)
            for n, p in bb.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return net.eval(), backbones, channels, patch


class BackboneClock:
    """CPU seconds spent in the backbones' patch_features (the one entry point every plugin network uses), and the
    features of the last call."""

    def __init__(self, backbones):
        self.seconds = 0.0
        self.last = None
        for bb in backbones:
            original = bb.patch_features

            def timed(x, layers=None, _original=original):
                c0 = time.process_time()
                out = _original(x, layers)
                self.seconds += time.process_time() - c0
                self.last = [t.clone() for t in out]
                return out

            bb.patch_features = timed


def unmerged_forward():
    """A context in which every EvalMergedLoraLinear runs peft's own forward."""
    from contextlib import contextmanager

    from nnunet_dino.backbone.lora import EvalMergedLoraLinear

    @contextmanager
    def ctx():
        original = EvalMergedLoraLinear._merged_inference_applies
        EvalMergedLoraLinear._merged_inference_applies = lambda self, args, kwargs: False
        try:
            yield
        finally:
            EvalMergedLoraLinear._merged_inference_applies = original

    return ctx()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-c", "--configuration", default="2d")
    p.add_argument("--trainer", default="nnUNetTrainerGuiDINO")
    p.add_argument("--frozen", default="nnUNetTrainerGuiDINO_frozen", help="the same network without LoRA")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out")
    args = p.parse_args(argv)

    import contextlib

    import torch

    torch.set_num_threads(args.threads)
    plans_dir = plans_folder(args.dataset)
    lora, lora_backbones, channels, patch = prepared(args.trainer, plans_dir, args.configuration, 0)
    frozen, frozen_backbones, _, _ = prepared(args.frozen, plans_dir, args.configuration, 0)
    before = {k: (v.clone(), v._version) for k, v in lora.state_dict().items()}
    x = torch.randn(args.batch_size, channels, *patch, generator=torch.Generator().manual_seed(2))
    arms = {"lora_merged": (lora, lora_backbones, contextlib.nullcontext),
            "lora_unmerged": (lora, lora_backbones, unmerged_forward),
            "no_lora": (frozen, frozen_backbones, contextlib.nullcontext)}
    clocks = {name: BackboneClock(bbs) for name, (_, bbs, _) in arms.items() if name != "lora_unmerged"}
    clocks["lora_unmerged"] = clocks["lora_merged"]  # same backbones: read the difference per round
    times = {name: {"network": [], "backbone": []} for name in arms}
    with torch.no_grad():
        outputs, features = {}, {}
        for name, (net, _, context) in arms.items():  # warm-up, and the outputs compared below
            with context():
                outputs[name] = net(x)
            features[name] = clocks[name].last
        names = list(arms)
        for r in range(args.rounds):
            for name in names[r % 3:] + names[: r % 3]:  # each arm first in a third of the rounds
                net, _, context = arms[name]
                clock = clocks[name]
                start_backbone = clock.seconds
                with context():
                    c0 = time.process_time()
                    net(x)
                    times[name]["network"].append(time.process_time() - c0)
                times[name]["backbone"].append(clock.seconds - start_backbone)
    # The DINO features, not only the logits: a guidance branch that starts with no effect (GuiDINO's gates) would
    # make equal logits prove nothing.
    diff = max(float((a - b).abs().max()) for a, b in zip(features["lora_merged"], features["lora_unmerged"]))
    scale = max(float(b.abs().max()) for b in features["lora_unmerged"])
    logits = lambda o: o[0] if isinstance(o, (list, tuple)) else o  # noqa: E731
    logit_diff = float((logits(outputs["lora_merged"]) - logits(outputs["lora_unmerged"])).abs().max())
    after = lora.state_dict()
    stable = list(after) == list(before) and all(
        torch.equal(after[k], v) and after[k]._version == version for k, (v, version) in before.items())
    med = {name: {part: statistics.median(values) for part, values in t.items()} for name, t in times.items()}
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
              "load_average": os.getloadavg(), "plans": str(plans_dir), "configuration": args.configuration,
              "trainer": args.trainer, "frozen": args.frozen, "batch_size": args.batch_size, "patch": list(patch),
              "rounds": args.rounds, "cpu_s": times, "cpu_s_median": med, "max_abs_feature_diff": diff,
              "max_abs_feature": scale, "max_abs_logit_diff": logit_diff, "state_dict_bit_stable": stable}
    print(f"{args.trainer}, tile {args.batch_size} x {list(patch)}, {args.rounds} rounds, median CPU s:")
    for name in arms:
        print(f"  {name:14s} network {med[name]['network']:.4f}  backbone {med[name]['backbone']:.4f}")
    print(f"  merged vs unmerged: network {med['lora_merged']['network'] / med['lora_unmerged']['network']:.3f}x, "
          f"backbone {med['lora_merged']['backbone'] / med['lora_unmerged']['backbone']:.3f}x; max |DINO feature "
          f"diff| {diff:.2e} (features up to {scale:.2f}), max |logit diff| {logit_diff:.2e}; state dict "
          f"bit-stable: {stable}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    if not stable:
        raise SystemExit("The state dict changed during inference.")


if __name__ == "__main__":
    main()
