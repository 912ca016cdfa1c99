"""The result of a run: the EMA teacher's ViT as a Meta-layout, sha256-named weight file every trainer loads
(``nnUNet_dino_weights=<file>``), checked by loading it back, and a JSON provenance record next to it.

The teacher is exported, as Meta's and MedDINOv3's releases are: the EMA average is the better feature extractor.
"""
from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

import torch

from ..backbone import load_backbone
from ..atomic_files import write_atomically
from ..backbone.meta_export import canonical_to_meta, meta_file_prefix, save_meta_named
from ..backbone.weight_files import sha256_of

PROVENANCE_NAME = "pretrain_provenance.json"


def export_teacher(trainer, tag: str) -> Path:
    """Write the teacher ViT (Meta layout, ``<arch>_pretrain_<tag>-<sha8>.pth``) into the output folder, load it
    back strictly through ``load_backbone`` (hash check included) and compare its features with the teacher's;
    returns the path. Earlier exports of this run (other hashes) are replaced."""
    arch = trainer.arch
    teacher = trainer.teacher
    state = canonical_to_meta(arch, teacher.backbone.vit.state_dict(), teacher.mask_token)
    prefix = meta_file_prefix(arch, tag)
    for old in trainer.out.glob(f"{prefix}-*.pth"):
        old.unlink()
    path = save_meta_named(state, trainer.out, prefix)
    loaded = load_backbone(arch.name, weights=path)
    if loaded.load_report.pretraining != trainer.pretraining:
        raise RuntimeError(f"{path.name} loads with the {loaded.load_report.pretraining} intensity convention but "
                           f"was pretrained with {trainer.pretraining}: choose a --tag without a Meta data name.")
    probe = torch.randn(2, 3, 2 * arch.patch_size, 3 * arch.patch_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = teacher.backbone.cpu().patch_features(probe)
        teacher.backbone.to(trainer.device)
        theirs = loaded.eval().patch_features(probe)
    worst = max(float((a - b).abs().max()) for a, b in zip(ours, theirs))
    if worst > 1e-4:
        raise RuntimeError(f"The exported {path.name} gives features {worst:.3g} away from the teacher's: the Meta "
                           f"layout writer is wrong for {arch.name}. The file was left for inspection.")
    return path


def write_provenance(trainer, weights_file: Path, initial: dict, tag: str, wall_seconds: float) -> Path:
    s = trainer.settings
    record = {
        "what": "DINO self-supervised pretraining on nnU-Net preprocessed images (labels never read)",
        "weights_file": weights_file.name,
        "weights_sha256": sha256_of(weights_file),
        "architecture": s.arch,
        "tag": tag,
        "intensity_convention": trainer.pretraining,
        "initial_weights": initial,
        "datasets": trainer.source.describe(),
        "number_of_cases": trainer.source.num_cases,
        "number_of_slices": len(trainer.source),
        "excluded_cases": sorted(trainer.source.excluded),
        "steps": trainer.step,
        "stages": [dict(st.__dict__) for st in s.stages],
        "settings": s.to_dict(),
        "final_losses_mean_last_20_steps": trainer.log.final_losses() if trainer.log else {},
        "world_size": trainer.dist.world_size,
        "device": str(trainer.device),
        "wall_seconds_this_process": round(wall_seconds, 1),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__},
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "lightly_version": _version("lightly"),
    }
    text = json.dumps(record, indent=2, default=str)
    path = trainer.out / PROVENANCE_NAME
    write_atomically(path, lambda p: Path(p).write_text(text), len(text))
    return path


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return None
