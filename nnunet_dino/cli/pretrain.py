"""nnUNetv2_dino_pretrain: continue training a DINOv3/DINOv2 ViT on the images of your own nnU-Net datasets.

    nnUNetv2_dino_pretrain -d 4 -c 2d -o /data/dino_hippo --weights random --tag hippo
    nnUNetv2_dino_pretrain -d 4 -o /data/dino_hippo --weights random --tag hippo --c      # continue
    torchrun --nproc_per_node 4 -m nnunet_dino.cli.pretrain -d 4 -o ... -device cuda      # several GPUs

Writes <arch>_pretrain_<tag>-<sha8>.pth (Meta layout) into -o; use it with nnUNet_dino_weights=<that file>.
Arguments are parsed before torch or nnU-Net are imported, so -h returns at once. Details: docs/pretraining.md.
"""
from __future__ import annotations

import argparse
import sys

STAGES = ("dino", "gram", "highres")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnUNetv2_dino_pretrain", fromfile_prefix_chars="@",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("-d", nargs="+", required=True, metavar="DATASET", help="dataset names or ids (preprocessed)")
    p.add_argument("-c", dest="configuration", default="2d", help="nnU-Net configuration whose preprocessed data is read (2D)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    p.add_argument("-o", required=True, help="output folder (new or empty; with --c: the run to continue)")
    p.add_argument("--arch", default="dinov3_vits16", help="DINO architecture (nnunet_dino.backbone.registry)")
    p.add_argument("--weights", default=None,
                   help="starting weights: a file/folder load_backbone reads, or 'random' (default: "
                        "$nnUNet_dino_weights)")
    p.add_argument("--tag", default=None, help="name of the data in the output file name (default: from -d)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages, in order")
    p.add_argument("--steps", nargs="+", type=int, default=None,
                   help="steps per stage (one value per stage; default: 1000 300 200)")
    p.add_argument("--lr", nargs="+", type=float, default=None, help="peak lr per stage (default 5e-4 2.5e-4 1e-4)")
    p.add_argument("--batch_size", type=int, default=16, help="slices per step and process")
    p.add_argument("--global_tokens", type=int, default=None,
                   help="short side of global crops in tokens for the dino/gram stages (trainers: 16; highres x2)")
    p.add_argument("--highres_tokens", type=int, default=None,
                   help="short side of global crops in the highres stage (default: 2 x the dino stage's, i.e. 32)")
    p.add_argument("--highres_extent", type=float, default=None,
                   help="highres global crops cover this many times the plans' patch size (2.0)")
    p.add_argument("--local_tokens", type=int, default=None, help="short side of local crops in tokens (6)")
    p.add_argument("--n_local_crops", type=int, default=None, help="local crops per slice (4)")
    p.add_argument("--prototypes", type=int, default=4096, help="prototypes of the DINO and iBOT heads")
    p.add_argument("--gram_weight", type=float, default=None, help="Gram anchoring weight in gram/highres (1.0)")
    p.add_argument("--drop_path", type=float, default=0.1, help="student drop-path rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--include_imagesTs", action="store_true",
                   help="also use $nnUNet_raw/<dataset>/imagesTs (preprocessed with the plans, cached in -o)")
    p.add_argument("--exclude_cases", nargs="+", default=[], metavar="CASE",
                   help="case identifiers never to read (e.g. held-out test cases); @file reads them from a file")
    p.add_argument("--ct_intensity", choices=("hu", "nnunet"), default="hu",
                   help="CT channel mapping of the trainers' input adapter")
    p.add_argument("--save_every", type=int, default=50, help="steps between resumable checkpoints")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    p.add_argument("--c", dest="continue_run", action="store_true", help="continue the run in -o from its last checkpoint")
    p.add_argument("-device", default="cuda", choices=("cpu", "cuda", "mps"), help="device (torchrun: cuda)")
    p.add_argument("-nt", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p


def settings_from_args(a):
    from nnunet_dino.pretraining.config import PretrainSettings, default_stage

    if a.steps is not None and len(a.steps) != len(a.stages):
        raise SystemExit(f"--steps: {len(a.steps)} value(s) for {len(a.stages)} stage(s) {a.stages}.")
    if a.lr is not None and len(a.lr) != len(a.stages):
        raise SystemExit(f"--lr: {len(a.lr)} value(s) for {len(a.stages)} stage(s) {a.stages}.")
    stages = []
    for i, name in enumerate(a.stages):
        st = default_stage(name, a.steps[i] if a.steps else None)
        changes = {}
        if a.lr:
            changes["lr"] = a.lr[i]
        if a.global_tokens:
            changes["global_tokens"] = a.global_tokens * (2 if name == "highres" else 1)
        if name == "highres" and a.highres_tokens:
            changes["global_tokens"] = a.highres_tokens
        if name == "highres" and a.highres_extent:
            changes["crop_extent"] = a.highres_extent
        if a.local_tokens:
            changes["local_tokens"] = a.local_tokens
        if a.n_local_crops is not None:
            changes["n_local_crops"] = a.n_local_crops
        if a.gram_weight is not None and name != "dino":
            changes["gram_weight"] = a.gram_weight
        stages.append(st.__class__(**{**st.__dict__, **changes}))
    return PretrainSettings(arch=a.arch, stages=tuple(stages), batch_size=a.batch_size, dino_prototypes=a.prototypes,
                            ibot_prototypes=a.prototypes, drop_path_rate=a.drop_path, seed=a.seed, bf16=a.bf16,
                            ct_intensity=a.ct_intensity, save_every=a.save_every,
                            extra={"configuration": a.configuration, "plans": a.p, "include_imagesTs": a.include_imagesTs})


def default_tag(datasets) -> str:
    import re
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    names = []
    for d in datasets:
        try:
            names.append(maybe_convert_to_dataset_name(d).split("_", 1)[-1])
        except RuntimeError:
            names.append(str(d))
    return re.sub(r"[^a-z0-9]", "", "".join(names).lower())[:32] or "data"


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    import torch

    from nnunet_dino.backbone import WeightFileError
    from nnunet_dino.pretraining import PretrainDataError, RunFolderError
    from nnunet_dino.pretraining.run import distributed_from_env, pretrain

    if a.nt:
        torch.set_num_threads(a.nt)
    dist_info, device = distributed_from_env()
    if device is None:
        if a.device == "cuda" and not torch.cuda.is_available():
            print("nnUNetv2_dino_pretrain: -device cuda but no CUDA device is available; use -device cpu.",
                  file=sys.stderr)
            return 2
        device = torch.device(a.device)
    settings = settings_from_args(a)
    tag = a.tag or default_tag(a.d)
    try:
        path = pretrain(settings, a.d, a.o, a.weights, tag, device, a.configuration, a.p, a.include_imagesTs,
                        a.exclude_cases, resume=a.continue_run, dist_info=dist_info)
    except (PretrainDataError, RunFolderError, WeightFileError, ValueError) as e:
        print(f"nnUNetv2_dino_pretrain: {e}", file=sys.stderr)
        return 2
    if path is not None and dist_info.is_main:
        print(f"nnUNetv2_dino_pretrain: wrote {path}\n  use it with: export nnUNet_dino_weights={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
