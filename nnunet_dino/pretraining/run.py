"""One pretraining run from start (or ``--c``) to the exported weight file: the order of checks, writes and steps.

Everything that can be wrong with the input (no preprocessed data, weights of another architecture, an output folder
holding another run, too few slices for the batch) is checked before anything is written.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..backbone import WeightFileError, load_backbone, resolve_weights_setting
from ..backbone.weight_files import sha256_of
from .config import PretrainSettings
from .data import SliceSource
from .export import export_teacher, write_provenance
from .loop import Distributed, Pretrainer
from .run_folder import check_output_folder, remove_stale_partials, run_identity, write_run_record

log = logging.getLogger("nnunet_dino")

_META_DATA_NAMES = ("lvd1689m", "sat493m", "lvd142m")


def check_tag(tag: str) -> str:
    if not re.fullmatch(r"[a-z0-9]+", tag):
        raise ValueError(f"--tag {tag!r}: use lower-case letters and digits only (it becomes part of the file name "
                         f"<arch>_pretrain_<tag>-<sha8>.pth).")
    if any(n in tag for n in _META_DATA_NAMES):
        raise ValueError(f"--tag {tag!r} contains the name of Meta's pretraining data ({', '.join(_META_DATA_NAMES)});"
                         f" loaders read the intensity convention off that name. Choose another tag.")
    return tag


def _weights_sha256(path: Path) -> str:
    if path.is_file():
        return sha256_of(path)
    digest = hashlib.sha256()  # a Hugging Face folder: the hash of its files' hashes, in name order
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(f"{f.name}:{sha256_of(f)}".encode())
    return digest.hexdigest()


def initial_backbone(arch: str, weights: str | None, seed: int):
    """(backbone, record) of the starting weights: a file any format ``load_backbone`` reads, or random
    (``weights='random'``, the project's realistic-scale init, drawn after ``torch.manual_seed(seed)``)."""
    path = resolve_weights_setting(weights, arch)
    if path is None:
        torch.manual_seed(seed)
        backbone = load_backbone(arch, random_init=True)
        return backbone, {"source": "random", "sha256": None, "random": True, "seed": seed,
                          "initialisation": "nnunet_dino.backbone.init_random_dino_weights_ (realistic scale)"}
    try:
        backbone = load_backbone(arch, weights=path)
    except WeightFileError as e:
        found = re.search(r"holds (\S+) weights", str(e))
        if found:
            raise WeightFileError(f"{e} Pretraining was asked for --arch {arch}: pass --arch {found.group(1)} to "
                                  f"continue training these weights, or give weights of {arch}.") from e
        raise
    return backbone, {"source": str(path), "sha256": _weights_sha256(Path(path)), "random": False,
                      "layout": backbone.load_report.layout, "pretraining": backbone.load_report.pretraining}


def distributed_from_env() -> tuple[Distributed, torch.device | None]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join the process group (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(), None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return Distributed(rank, world), torch.device("cuda", local)
    dist.init_process_group("gloo")
    return Distributed(rank, world), torch.device("cpu")


def pretrain(settings: PretrainSettings, datasets: list[str], out_folder: Path, weights: str | None, tag: str,
             device: torch.device, configuration: str = "2d", plans: str = "nnUNetPlans",
             include_images_ts: bool = False, exclude_cases=(), resume: bool = False,
             dist_info: Distributed = Distributed(), progress: bool = True, stop_after: int | None = None,
             source: SliceSource | None = None) -> Path | None:
    """Run (or continue) a pretraining and return the exported weight file (None when ``stop_after`` ended the
    run before its last step). ``source``: slices to use instead of reading ``datasets`` (tests)."""
    started = time.perf_counter()
    out = Path(out_folder).expanduser().resolve()
    check_tag(tag)
    backbone, initial = initial_backbone(settings.arch, weights, settings.seed)
    if source is None:
        source = SliceSource(datasets, configuration, plans, include_images_ts, set(exclude_cases),
                             cache_folder=out if include_images_ts else None)
    identity = run_identity(settings.to_dict(), settings.fingerprint(), source.describe(), initial)
    has_state = check_output_folder(out, identity, resume)
    trainer = Pretrainer(settings, source, backbone, out, device, dist_info)  # checks slices against the batch
    del backbone
    if dist_info.world_size > 1:
        dist.barrier()  # every process passed the checks before rank 0 writes
    if dist_info.is_main:
        write_run_record(out, identity)
        remove_stale_partials(out)
    if dist_info.world_size > 1:
        dist.barrier()
    if has_state:
        trainer.resume()
        log.info("nnunet-dino: continuing the pretraining in %s from step %d of %d.", out, trainer.step,
                 settings.total_steps)
    trainer.run(progress=progress, stop_after=stop_after)
    if trainer.step < settings.total_steps:
        return None
    path = None
    if dist_info.is_main:
        path = export_teacher(trainer, tag)
        write_provenance(trainer, path, initial, tag, time.perf_counter() - started)
        trainer.log.plot()
    if dist_info.world_size > 1:
        dist.barrier()
    return path
