"""``nnUNetv2_dino_add_highres_plans``: add a high-resolution 2D configuration to an existing plans file.

    nnUNetv2_dino_add_highres_plans -d 990 --size 896              # -> configuration 2d_896
    nnUNetv2_preprocess -d 990 -c 2d_896
    nnUNetv2_train 990 2d_896 0 -tr nnUNetTrainerMedDINOv3
    nnUNetv2_predict -i IN -o OUT -d 990 -c 2d_896 -tr nnUNetTrainerMedDINOv3 -f 0
"""
from __future__ import annotations

import argparse
import json
import sys

from .highres import HighResPlansError, HighResRequest, add_highres_configuration, find_plans_file


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_dino_add_highres_plans",
        description="Add a configuration that inherits from a 2D configuration and resamples the same field of view to "
                    "a larger patch (MedDINOv3's high-resolution training). The spacing is scaled by source patch / "
                    "new patch per axis; the batch size by source area / new area (at least 2). The plans file is "
                    "validated first, written atomically, and backed up.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("-d", dest="dataset", help="dataset id or name (plans in $nnUNet_preprocessed)")
    where.add_argument("--plans-file", help="path of a plans JSON file instead of -d/-p")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    p.add_argument("--size", type=int, nargs="+", required=True, metavar="N",
                   help="N: the long side becomes N, the aspect ratio is kept; H W: exactly this patch")
    p.add_argument("--source", default="2d", help="2D configuration to inherit from (default: 2d)")
    p.add_argument("--name", help="new configuration name (default: <source>_<long side>, e.g. 2d_896)")
    mult = p.add_mutually_exclusive_group()
    mult.add_argument("--patch-multiple", type=int, help="sizes must be multiples of this ViT patch (default 16)")
    mult.add_argument("--arch", help="take the ViT patch from this DINO architecture, e.g. dinov2_vitb14 (14)")
    p.add_argument("--batch-size", type=int, help="batch size instead of the area rule")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a configuration of that name previously added by this command")
    return p


def _patch_multiple(args) -> int:
    if args.arch is not None:
        from ..backbone.registry import get_architecture

        try:
            return get_architecture(args.arch).patch_size
        except ValueError as e:
            raise HighResPlansError(str(e)) from None
    return 16 if args.patch_multiple is None else args.patch_multiple


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        plans_file = args.plans_file or find_plans_file(args.dataset, args.plans)
        request = HighResRequest(tuple(args.size), args.source, args.name, _patch_multiple(args), args.batch_size,
                                 args.overwrite)
        result = add_highres_configuration(plans_file, request)
    except HighResPlansError as e:
        print(f"nnUNetv2_dino_add_highres_plans: refused, nothing written: {e}", file=sys.stderr)
        return 2
    shown = {k: v for k, v in result.configuration.items() if k != "nnunet_dino_highres"}
    print(f"Added configuration {result.name!r} to {result.plans_file} (backup: {result.backup.name}):")
    print(json.dumps(shown, indent=2))
    for note in result.notes:
        print(f"Note: {note}")
    dataset = args.dataset or result.plans_file.parent.name
    plans = result.plans_file.stem
    pre_opt, train_opt = ("", "") if plans == "nnUNetPlans" else (f" -plans_name {plans}", f" -p {plans}")
    print(f"Next: nnUNetv2_preprocess -d {dataset} -c {result.name}{pre_opt}\n"
          f"      nnUNetv2_train {dataset} {result.name} FOLD -tr nnUNetTrainerMedDINOv3{train_opt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
