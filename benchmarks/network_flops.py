"""FLOPs of a trainer's network, counted on the meta device (shapes only: no weights, no time, the same figure on
every machine). Shared by the cost benchmarks.

The network is built exactly as nnU-Net builds it (the trainer's ``build_network_architecture`` with the plans,
deep supervision as the trainer trains). A training step = forward in train mode + backward of a loss over every
output; an inference tile = eval forward, no autograd, batch 1. ``FlopCounterMode`` counts matrix multiplications
and convolutions (and their backward); per-element work (norms, activations, resampling) is not counted. The DINO
share is that of the DinoBackbone's ViT submodules.
"""
from __future__ import annotations

from pathlib import Path


def trains_with_deep_supervision(cls) -> bool:
    """What the trainer's __init__ decides (nnU-Net's default is on; SegDINO and MedDINOv3 say otherwise)."""
    from nnunet_dino.training import MedDINOv3Trainer

    if hasattr(cls, "network_has_deep_supervision"):
        return bool(cls.network_has_deep_supervision())
    return not issubclass(cls, MedDINOv3Trainer)


def build(cls, plans_dir: Path, configuration: str, device: str | None = None, plans_name: str = "nnUNetPlans"):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    import torch

    pm = PlansManager(load_json(str(Path(plans_dir) / f"{plans_name}.json")))
    cm = pm.get_configuration(configuration)
    dataset_json = load_json(str(Path(plans_dir) / "dataset.json"))
    channels = determine_num_input_channels(pm, cm, dataset_json)
    outputs = pm.get_label_manager(dataset_json).num_segmentation_heads
    ds = trains_with_deep_supervision(cls)
    if device == "meta":
        with torch.device("meta"):
            net = cls.build_network_architecture(pm, cm, channels, outputs, ds)
        net = net.to("meta")  # buffers computed explicitly on the CPU (DINOv3's RoPE periods) too
    else:
        net = cls.build_network_architecture(pm, cm, channels, outputs, ds)
    return net, channels, tuple(cm.patch_size), ds


def loss_of(out):
    outputs = out if isinstance(out, (list, tuple)) else [out]
    return sum(o.float().square().mean() for o in outputs)


def count_flops(cls, plans_dir, configuration, batch, plans_name: str = "nnUNetPlans") -> dict:
    """GFLOP of one training step at ``batch`` and of one inference tile, with the DINO backbone's share of each."""
    net, channels, patch, _ = build(cls, plans_dir, configuration, device="meta", plans_name=plans_name)
    return network_flops(net, channels, patch, batch)


def network_flops(net, channels: int, patch, batch: int) -> dict:
    """The same figures for a network already built on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    root = type(net).__name__
    # DinoBackbone.patch_features calls vit.forward_intermediates, not a module's forward: the counter sees the
    # ViT's submodules (patch embedding, blocks, norm), whose outermost calls are summed.
    vits = [f"{root}.{n}.vit." for n, m in net.named_modules() if type(m).__name__ == "DinoBackbone"]

    def counted(run):
        with FlopCounterMode(display=False) as counter:
            run()
        per_module = counter.get_flop_counts()
        called = [k for k in per_module if any(k.startswith(v) for v in vits)]
        outer = [k for k in called if not any(k.startswith(o + ".") for o in called)]
        return counter.get_total_flops(), sum(sum(per_module[k].values()) for k in outer)

    x = torch.randn(batch, channels, *patch, device="meta")
    net.train()
    train, train_dino = counted(lambda: loss_of(net(x)).backward())
    net.eval()
    tile = torch.randn(1, channels, *patch, device="meta")
    with torch.no_grad():
        infer, infer_dino = counted(lambda: net(tile))
    return {"patch_size": list(patch), "batch_size": batch,
            "train_step_gflop": train / 1e9, "train_dino_gflop": train_dino / 1e9,
            "train_dino_share": train_dino / train,
            "infer_tile_gflop": infer / 1e9, "infer_dino_gflop": infer_dino / 1e9,
            "infer_dino_share": infer_dino / infer}
