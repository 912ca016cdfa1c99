"""Helpers for tests/test_compile_precision_ddp.py: tiny trainers of every family, synthetic batches, and the
2-process DDP worker (spawned, so it lives in an importable module rather than in the test file).

The worker replicates what ``nnUNetv2_train ... -num_gpus 2`` does on each rank, on CPU: the process group (gloo
instead of nccl), nnU-Net's own ``initialize`` (build, ``torch.compile`` when ``_do_i_compile``, optimizer,
SyncBatchNorm conversion, ``DDP(network, device_ids=[rank])`` without ``find_unused_parameters``, loss with
``ddp=True``), then ``load_dino_weights`` (after the DDP wrap, as ``on_train_start`` does) and nnU-Net's own
``train_step``. Two things differ, both forced by the CPU: nnU-Net's DDP ``__init__`` path sets the device to
``cuda:<rank>`` (reset to CPU, without a GradScaler, as nnU-Net runs on CPU), and ``device_ids`` must be None for a
CPU module (``DDP(..., device_ids=[rank])`` is refused for CPU parameters), so nnU-Net's ``DDP`` name is replaced by
one that passes None and otherwise exactly nnU-Net's arguments (and records them). ``torch.compile`` gets the
``aot_eager`` backend (nnU-Net's call otherwise unchanged: default ``dynamic``, ``fullgraph=False``): the same
Dynamo graph capture and AOTAutograd forward/backward split as inductor, without code generation.
"""
from __future__ import annotations

import functools
import gc
import hashlib
import json
import os
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from nnunet_dino.training import GuiDINOTrainer, MedDINOv3Trainer, SegDINOTrainer, SegDINOv2Trainer, unwrap


# ---------------------------------------------------------------------------------------------- tiny trainers
class TinyGuiDINO(GuiDINOTrainer):
    """ViT-S/16 + LoRA, short side 4 tokens (56x40 -> 6x4 tokens)."""
    guidino = replace(GuiDINOTrainer.guidino, min_short_side_tokens=4)
    batch_size = 4


class TinyGuiDINOFrozen(GuiDINOTrainer):
    guidino = replace(GuiDINOTrainer.guidino, min_short_side_tokens=4, lora=None)
    batch_size = 4


class TinySegDINO(SegDINOTrainer):
    segdino = replace(SegDINOTrainer.segdino, min_short_side_tokens=2)
    batch_size = 4


class TinySegDINOv2DS(SegDINOv2Trainer):
    segdino_v2 = replace(SegDINOv2Trainer.segdino_v2, min_short_side_tokens=2, deep_supervision=True)
    batch_size = 4


class TinyMedDINOv3(MedDINOv3Trainer):
    """The MedDINOv3 network (full fine-tuning, drop path 0.2, transposed-conv decoder) on ViT-S/16 instead of ViT-B:
    the same code path at a quarter of the memory (two trainers per rank in the DDP test)."""
    meddinov3 = replace(MedDINOv3Trainer.meddinov3, min_short_side_tokens=1, dino_arch="dinov3_vits16")
    batch_size = 4


FAMILIES = {"guidino_lora": TinyGuiDINO, "guidino_frozen": TinyGuiDINOFrozen, "segdino": TinySegDINO,
            "segdino_v2_ds": TinySegDINOv2DS, "meddinov3": TinyMedDINOv3}

# ---- the same with the ViT cut to its first 4 blocks (the DDP + compile runs)
# Tracing dominates the cost of torch.compile on a CPU (Dynamo and AOTAutograd walk every op), and the ViT's 12
# identical blocks are most of each graph: 4 blocks cut the compile time of the DDP test by about half without
# leaving any kind of module out. The blocks used (last block for GuiDINO, taps for SegDINO / MedDINOv3) are
# renumbered into those 4. benchmarks/bench_gpu.py --compile-check compiles the full-depth networks.
SHALLOW_BLOCKS = 4


class _ShallowViT:
    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        from nnunet_dino.backbone import DinoBackbone

        network = super().build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                     num_output_channels, enable_deep_supervision)
        for module in network.modules():
            if isinstance(module, DinoBackbone):
                module.vit.blocks = module.vit.blocks[:SHALLOW_BLOCKS]
        return network


_SHALLOW_LAYERS = tuple(range(SHALLOW_BLOCKS))


class ShallowGuiDINO(_ShallowViT, TinyGuiDINO):
    guidino = replace(TinyGuiDINO.guidino, dino_layer=SHALLOW_BLOCKS - 1)


class ShallowGuiDINOFrozen(_ShallowViT, TinyGuiDINOFrozen):
    guidino = replace(TinyGuiDINOFrozen.guidino, dino_layer=SHALLOW_BLOCKS - 1)


class ShallowSegDINO(_ShallowViT, TinySegDINO):
    segdino = replace(TinySegDINO.segdino, tap_layers=_SHALLOW_LAYERS)


class ShallowSegDINOv2DS(_ShallowViT, TinySegDINOv2DS):
    segdino_v2 = replace(TinySegDINOv2DS.segdino_v2, tap_layers=_SHALLOW_LAYERS)


class ShallowMedDINOv3(_ShallowViT, TinyMedDINOv3):
    meddinov3 = replace(TinyMedDINOv3.meddinov3, layers=_SHALLOW_LAYERS)


SHALLOW_FAMILIES = {"guidino_lora": ShallowGuiDINO, "guidino_frozen": ShallowGuiDINOFrozen,
                    "segdino": ShallowSegDINO, "segdino_v2_ds": ShallowSegDINOv2DS, "meddinov3": ShallowMedDINOv3}


def load_plans(preprocessed: Path) -> tuple[dict, dict]:
    from batchgenerators.utilities.file_and_folder_operations import load_json

    plans = dict(load_json(Path(preprocessed) / "nnUNetPlans.json"), continue_training=False)
    return plans, load_json(Path(preprocessed) / "dataset.json")


def make_trainer(cls, preprocessed: Path, device=torch.device("cpu")):
    """Construct and initialise ``cls`` on the HippoTiny plans as nnUNetv2_train would (no data loaders)."""
    plans, dataset_json = load_plans(preprocessed)
    return cls(plans, "2d", 0, dataset_json, device)


def start_training(trainer) -> None:
    """The part of ``on_train_start`` that shapes the network: initialize (build, compile, DDP), the DINO weights
    after the wrap, deep supervision on, train mode."""
    torch.manual_seed(0)  # every fresh process starts from torch's fixed default seed; so do both runs here
    trainer.initialize()
    trainer.load_dino_weights()
    trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
    trainer.network.train()


def make_batch(trainer, seed: int, batch_size: int | None = None) -> dict:
    """Random z-scored images and label maps with nnU-Net's batch layout (deep-supervision targets as a list)."""
    g = torch.Generator().manual_seed(seed)
    b = batch_size or trainer.batch_size
    patch = tuple(trainer.configuration_manager.patch_size)
    data = torch.randn(b, 1, *patch, generator=g)
    # blobs rather than per-pixel noise: every class present, with boundaries (GuiDINO's hinge term)
    coarse = torch.randint(0, trainer.label_manager.num_segmentation_heads, (b, 1, patch[0] // 8, patch[1] // 8),
                           generator=g).float()
    target = F.interpolate(coarse, size=patch, mode="nearest")
    if trainer.enable_deep_supervision:
        scales = trainer._get_deep_supervision_scales()
        target = [F.interpolate(target, size=[round(p * s) for p, s in zip(patch, scale)], mode="nearest")
                  for scale in scales]
    return {"data": data, "target": target}


def trainable(net: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in net.named_parameters() if p.requires_grad}


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def rel_diff(a: torch.Tensor, b: torch.Tensor, scale: float | None = None) -> float:
    """max |a - b| relative to ``scale`` (default max |a|)."""
    scale = float(a.abs().max()) if scale is None else scale
    return float((a.double() - b.double()).abs().max()) / max(scale, 1e-30)


# ---------------------------------------------------------------------------------------------- the DDP worker
def ddp_worker(rank: int, world: int, port: int, preprocessed: str, results: str, out_dir: str,
               families: list[str], steps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), nnUNet_results=results,
                      nnUNet_preprocessed=str(Path(preprocessed).parent), nnUNet_dino_weights="random")
    torch.set_num_threads(1)
    import torch.distributed as dist
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
    from torch.nn.parallel import DistributedDataParallel

    report = {"rank": rank, "families": {}}
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ddp_calls = []

    def ddp_as_nnunet_on_cpu(module, **kwargs):
        ddp_calls.append(sorted(kwargs))
        assert set(kwargs) == {"device_ids"}, kwargs  # nnU-Net 2.8: DDP(network, device_ids=[rank]), nothing else
        return DistributedDataParallel(module, device_ids=None)

    nnunet_trainer_module.DDP = ddp_as_nnunet_on_cpu
    real_compile = torch.compile
    torch.compile = functools.partial(real_compile, backend="aot_eager")  # nnU-Net's torch.compile(network)
    try:
        for family in families:
            report["families"][family] = _run_family(family, rank, world, preprocessed, Path(out_dir), steps, dist)
    except Exception:
        report["error"] = traceback.format_exc()
    finally:
        torch.compile = real_compile
        report["ddp_calls"] = ddp_calls
        with open(Path(out_dir) / f"rank{rank}.json", "w") as f:
            json.dump(report, f, indent=1)
        dist.destroy_process_group()


def _run_family(family: str, rank: int, world: int, preprocessed: str, out_dir: Path, steps: int, dist) -> dict:
    from torch._dynamo.utils import counters

    cls = SHALLOW_FAMILIES[family]
    result = {}
    eager = None
    for mode in ("eager", "compiled"):
        t0 = time.time()
        torch._dynamo.reset()
        counters.clear()
        trainer = make_trainer(cls, Path(preprocessed))
        trainer.device = torch.device("cpu")  # nnU-Net's DDP path set cuda:<rank>
        trainer.grad_scaler = None  # as nnU-Net on CPU
        if mode == "compiled":
            trainer._do_i_compile = lambda: True
        start_training(trainer)
        net = unwrap(trainer.network)
        params = trainable(net)
        outputs = []
        hook = trainer.network.register_forward_hook(lambda m, i, o: outputs.append(
            [t.detach().clone() for t in (o if isinstance(o, (list, tuple)) else [o])]))
        r = {"losses": [], "rank_mismatch": [], "step_s": [], "wrapped": type(trainer.network).__name__,
             "inner": type(trainer.network.module).__name__}
        grads1 = None
        trained = set()  # parameters that received a non-zero gradient at some step
        for step in range(steps):
            batch = make_batch(trainer, seed=1000 * rank + step)
            torch.manual_seed(10 * rank + step)  # dropout / drop path: the same in both runs of this rank
            if mode == "compiled" and step == 1:
                torch._dynamo.config.error_on_recompile = True  # steps 2+ at the same shapes must reuse step 1's
                r["graphs_after_step_1"] = int(counters["stats"]["unique_graphs"])
            ts = time.time()
            try:
                loss = trainer.train_step(batch)["loss"]
            finally:
                torch._dynamo.config.error_on_recompile = False
            r["step_s"].append(round(time.time() - ts, 3))
            r["losses"].append(float(loss))
            trained |= {n for n, p in params.items() if p.grad is not None and bool(p.grad.any())}
            if step == 0:
                grads1 = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
                r["finite"] = all(bool(torch.isfinite(g).all()) for g in grads1.values())
            digests = {n: tensor_digest(p) for n, p in params.items()}
            gathered = [None] * world
            dist.all_gather_object(gathered, digests)
            r["rank_mismatch"].append(sorted(n for n in digests if any(g[n] != digests[n] for g in gathered)))
        hook.remove()
        # everything, frozen DINO weights and buffers included, at the end
        state = {k: tensor_digest(v) for k, v in net.state_dict().items()}
        gathered = [None] * world
        dist.all_gather_object(gathered, state)
        r["state_mismatch_end"] = sorted(k for k in state if any(g[k] != state[k] for g in gathered))
        r["n_trainable"] = len(params)
        r["never_trained"] = sorted(set(params) - trained)
        if mode == "compiled":
            r["graphs_end"] = int(counters["stats"]["unique_graphs"])
            r["graph_breaks"] = {k: int(v) for k, v in counters["graph_break"].items()}
        if rank == 0:  # what nnUNetv2_predict will be compared against, and the checkpoint itself
            trainer.save_checkpoint(str(out_dir / f"{family}_{mode}.pth"))
            trainer.set_deep_supervision_enabled(False)
            net.eval()
            x = torch.randn(2, 1, *trainer.configuration_manager.patch_size, generator=torch.Generator().manual_seed(7))
            with torch.no_grad():
                torch.save({"x": x, "y": net(x)}, out_dir / f"{family}_{mode}_prediction.pt")
        if mode == "eager":
            eager = {"outputs": outputs[0], "grads": grads1, "losses": r["losses"]}
        else:
            grad_scale = max(float(g.abs().max()) for g in eager["grads"].values())
            r["vs_eager"] = {
                "output_rel": max(rel_diff(a, b) for a, b in zip(eager["outputs"], outputs[0])),
                "grad_rel_to_max": max(rel_diff(eager["grads"][n], grads1[n], grad_scale) for n in eager["grads"]),
                "grad_rel_worst_tensor": _worst_tensor(eager["grads"], grads1),
                "loss_rel": max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(eager["losses"], r["losses"])),
            }
        r["seconds"] = round(time.time() - t0, 1)
        result[mode] = r
        del trainer, net, params, hook
        gc.collect()
    return result


def _worst_tensor(reference: dict, other: dict) -> list:
    """The tensor whose gradient differs most relative to its own size, ignoring tensors whose gradient is
    rounding noise (below 1e-4 of the largest: e.g. conv biases right before an InstanceNorm, exactly 0 in theory)."""
    scale = max(float(g.abs().max()) for g in reference.values())
    worst = ("", 0.0)
    for name, ref in reference.items():
        size = float(ref.abs().max())
        if size < 1e-4 * scale:
            continue
        d = rel_diff(ref, other[name], size)
        if d > worst[1]:
            worst = (name, d)
    return list(worst)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(preprocessed: Path, results: Path, out_dir: Path, families: list[str], steps: int = 3,
            world: int = 2) -> list[dict]:
    """Spawn ``world`` gloo ranks running ``ddp_worker``; their reports, by rank."""
    import torch.multiprocessing as mp

    out_dir.mkdir(parents=True, exist_ok=True)
    mp.spawn(ddp_worker, args=(world, free_port(), str(preprocessed), str(results), str(out_dir), families, steps),
             nprocs=world, join=True)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]

