"""Adding a high-resolution 2D configuration (e.g. ``2d_896``) to an existing nnU-Net plans file.

MedDINOv3 trains on the same field of view resampled to a larger patch (896x896 = 56x56 ViT tokens instead of
512x512 = 32x32): more tokens per structure. The new configuration ``inherits_from`` the source ("2d") and overrides:

- ``patch_size``: the target. One size N keeps the source patch's aspect ratio (the long side becomes N, the short
  side is scaled by the same factor and rounded to a multiple of the ViT patch); two sizes H W are taken as given.
- ``spacing``: source spacing * source patch / new patch, per axis, so the patch covers the same field of view.
- ``median_image_size_in_voxels``: the same images at the new spacing (source median * new patch / source patch).
- ``batch_size``: floor(source batch * source patch area / new patch area), at least 2, at most the source's. The
  source batch was sized by nnU-Net's planner for a fixed memory budget and activation memory grows with the number
  of pixels (ViT tokens and decoder maps alike), so this keeps pixels per batch, and memory, about constant.
- ``data_identifier``: ``<plans name>_<configuration name>``, so the stock preprocessor writes a new folder.
- ``nnunet_dino_highres``: a record of how the configuration was derived (ignored by nnU-Net).

The new patch may give the ViT at most the DINO trainers' token cap (4096 tokens by default,
``$nnUNet_dino_max_tokens``; see nnunet_dino.backbone.token_budget): a larger one would be refused by every DINO
trainer when it builds its network, so it is refused here, before preprocessing writes data at that size.

Everything is validated before anything is written; the file is replaced atomically (temporary file in the same
folder + os.replace) after the result has been read back and resolved by nnU-Net's own PlansManager, and the previous
file is kept as a timestamped backup. A refusal (HighResPlansError) leaves the file byte-for-byte unchanged, and so
does a failed write (a read-only folder, a full disk): it is reported as a HighResPlansError naming the file and the
reason, with no backup or temporary file left behind.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

RECORD_KEY = "nnunet_dino_highres"
MIN_BATCH_SIZE = 2  # nnU-Net's planner never goes below 2 either
MAX_STRETCH = 1.25  # explicit H W may change the pixel aspect ratio by at most this factor
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class HighResPlansError(ValueError):
    """The request was refused; nothing was written."""


@dataclass(frozen=True)
class HighResRequest:
    sizes: tuple[int, ...]  # (N,): long side N, aspect kept; (H, W): exactly this patch
    source: str = "2d"
    name: str | None = None  # default: "<source>_<N>" (N: the long side)
    patch_multiple: int = 16  # the ViT patch: 16 for DINOv3, 14 for DINOv2
    batch_size: int | None = None  # None: the rule in the module doc
    overwrite: bool = False


@dataclass
class HighResResult:
    plans_file: Path
    name: str
    configuration: dict
    backup: Path | None = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- locating the file
def find_plans_file(dataset: str, plans_identifier: str = "nnUNetPlans", preprocessed: str | None = None) -> Path:
    """``$nnUNet_preprocessed/<DatasetXXX_Name>/<plans_identifier>.json`` for a dataset id or name."""
    root = preprocessed if preprocessed is not None else os.environ.get("nnUNet_preprocessed")
    if not root:
        raise HighResPlansError("nnUNet_preprocessed is not set: nnU-Net's plans files live there. Set it as for "
                                "nnUNetv2_plan_and_preprocess, or pass --plans-file.")
    root = Path(root)
    if not root.is_dir():
        raise HighResPlansError(f"nnUNet_preprocessed={root} is not a folder.")
    dataset = str(dataset).strip()
    if dataset.startswith("Dataset"):
        folder = root / dataset
        if not folder.is_dir():
            raise HighResPlansError(f"Unknown dataset {dataset!r}: {folder} does not exist. Known: "
                                    f"{_known_datasets(root)}. Plan it first: nnUNetv2_plan_and_preprocess -d ID -c 2d")
    else:
        try:
            dataset_id = int(dataset)
        except ValueError:
            raise HighResPlansError(f"-d takes a dataset id (e.g. 990) or name (e.g. Dataset990_HippoTiny), got "
                                    f"{dataset!r}.") from None
        matches = sorted(p for p in root.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir())
        if not matches:
            raise HighResPlansError(f"Unknown dataset {dataset_id}: no Dataset{dataset_id:03d}_* folder in "
                                    f"nnUNet_preprocessed={root} (known: {_known_datasets(root)}). Plan it first: "
                                    f"nnUNetv2_plan_and_preprocess -d {dataset_id} -c 2d")
        if len(matches) > 1:
            raise HighResPlansError(f"Dataset id {dataset_id} is ambiguous in {root}: {[m.name for m in matches]}. "
                                    f"Pass the full name with -d.")
        folder = matches[0]
    plans_file = folder / f"{plans_identifier}.json"
    if not plans_file.is_file():
        others = sorted(p.stem for p in folder.glob("*.json") if p.stem not in ("dataset", "dataset_fingerprint"))
        raise HighResPlansError(f"No plans file {plans_file} (plans in that folder: {others or 'none'}). Run "
                                f"nnUNetv2_plan_and_preprocess -d {folder.name} -c 2d first, or choose -p.")
    return plans_file


def _known_datasets(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("Dataset*") if p.is_dir()) or ["none"]


# ---------------------------------------------------------------------------------------------- deriving
def _resolved(plans: dict, name: str) -> dict:
    """The configuration with nnU-Net's own inheritance resolution (PlansManager)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    return PlansManager(copy.deepcopy(plans)).get_configuration(name).configuration


def _two_d_names(plans: dict) -> list[str]:
    out = []
    for name in plans["configurations"]:
        try:
            if len(_resolved(plans, name).get("patch_size", ())) == 2:
                out.append(name)
        except (KeyError, TypeError, ValueError, RuntimeError):  # a broken sibling configuration is not ours to judge
            continue
    return out


def _target_patch(source_patch: list[int], request: HighResRequest) -> list[int]:
    m = request.patch_multiple
    sizes = list(request.sizes)
    if len(sizes) not in (1, 2):
        raise HighResPlansError(f"Give one size N (long side, aspect kept) or two sizes H W, got {sizes}.")
    bad = [s for s in sizes if s < m or s % m]
    if bad:
        rounded = [max(m, round(s / m) * m) for s in sizes]
        if len(rounded) == 2 or rounded[0] > max(source_patch):  # an absurd size: say that, not "use 1600000"
            _check_tokens(rounded if len(rounded) == 2 else _long_side_patch(source_patch, rounded[0], m),
                          source_patch, request)
        raise HighResPlansError(
            f"Size(s) {bad} are not positive multiples of the ViT patch {m}: the ViT sees whole {m}x{m} patches and "
            f"the DINO trainers would otherwise pad. Use e.g. {max(m, round(bad[0] / m) * m)} "
            f"(multiples of 16 for DINOv3, 14 for DINOv2; see --patch-multiple / --arch).")
    if len(sizes) == 2:
        new = sizes
        scale = [n / o for n, o in zip(new, source_patch)]
        stretch = max(scale) / min(scale)
        if stretch > MAX_STRETCH:
            raise HighResPlansError(
                f"Patch {new[0]}x{new[1]} from the source patch {source_patch[0]}x{source_patch[1]} would stretch "
                f"pixels by {stretch:.2f} between the axes (limit {MAX_STRETCH}). Give one size N instead: the long "
                f"side becomes N and the aspect ratio is kept.")
    else:
        if sizes[0] <= max(source_patch):
            raise HighResPlansError(
                f"Size {sizes[0]} is not larger than the long side of the source patch "
                f"{'x'.join(map(str, source_patch))}: this command adds higher-resolution configurations.")
        new = _long_side_patch(source_patch, sizes[0], m)
    if any(n < s for n, s in zip(new, source_patch)) or list(new) == list(source_patch):
        raise HighResPlansError(
            f"Patch {'x'.join(map(str, new))} is not larger than the source patch "
            f"{'x'.join(map(str, source_patch))}: this command adds higher-resolution configurations.")
    _check_tokens(new, source_patch, request)
    return [int(n) for n in new]


def _long_side_patch(source_patch: list[int], size: int, m: int) -> list[int]:
    """The patch for one size N: the long side becomes N, the other axis is scaled alike (multiple of ``m``,
    never below the source)."""
    factor = size / max(source_patch)
    new = []
    for s in source_patch:
        n = max(m, int(round(s * factor / m)) * m)
        new.append(n + m if n < s else n)  # rounding must not shrink an axis below the source
    return new


def _tokens(patch: list[int], m: int) -> int:
    return math.prod(p // m for p in patch)


def _check_tokens(new: list[int], source_patch: list[int], request: HighResRequest) -> None:
    """Refuse a patch with more ViT tokens than the DINO trainers' cap: they would refuse it at network
    construction, after nnUNetv2_preprocess had written all the data at that size (E11: --size 1600000 went through
    and only failed later, at preprocessing). The cap is the trainers' own, so the two cannot disagree."""
    from ..backbone.token_budget import MAX_TOKENS_ENV_VAR, max_tokens_setting

    try:
        m, cap = request.patch_multiple, max_tokens_setting()
    except ValueError as e:  # a malformed $nnUNet_dino_max_tokens
        raise HighResPlansError(str(e)) from None
    tokens = _tokens(new, m)
    if tokens <= cap:
        return
    largest = None
    if len(request.sizes) == 1:  # the largest long side that fits, for the message
        for size in range(max(source_patch) + m - max(source_patch) % m, m * cap + 1, m):
            if _tokens(_long_side_patch(source_patch, size, m), m) > cap:
                break
            largest = size
    hint = (f"--size {largest} is the largest long side that fits" if largest is not None else
            "choose a smaller --size")
    raise HighResPlansError(
        f"Patch {'x'.join(map(str, new))} would give the ViT {new[0] // m}x{new[1] // m} = {tokens:,} tokens of "
        f"{m} px, more than the DINO trainers' cap of {cap:,} tokens ({MAX_TOKENS_ENV_VAR}; attention memory and "
        f"time grow with the square of the token count): they would refuse it when building the network, after "
        f"nnUNetv2_preprocess had written every case at {math.prod(new) / math.prod(source_patch):,.0f}x the pixels of "
        f"{request.source!r}. Was the size a typo? {hint[0].upper() + hint[1:]} (source patch "
        f"{'x'.join(map(str, source_patch))}); or raise the cap with {MAX_TOKENS_ENV_VAR} if the memory is there.")


def derive_highres_configuration(plans: dict, request: HighResRequest) -> tuple[str, dict, list[str]]:
    """Validate ``request`` against ``plans`` and compute (name, configuration, notes). Pure: ``plans`` is not
    modified. Raises HighResPlansError with what was wrong and what to do."""
    if not isinstance(plans, dict) or not isinstance(plans.get("configurations"), dict) or "plans_name" not in plans:
        raise HighResPlansError("This is not an nnU-Net v2 plans file (no 'configurations' / 'plans_name').")
    if request.patch_multiple < 1:
        raise HighResPlansError(f"--patch-multiple must be >= 1, got {request.patch_multiple}.")
    if request.batch_size is not None and request.batch_size < 1:
        raise HighResPlansError(f"--batch-size must be >= 1, got {request.batch_size}.")
    configurations = plans["configurations"]
    two_d = _two_d_names(plans)
    if request.source not in configurations:
        if not two_d:
            raise HighResPlansError(
                f"The plans have no 2D configuration (only {list(configurations)}): the DINO trainers are 2D. Plan "
                f"the 2d configuration first: nnUNetv2_plan_and_preprocess -d ID -c 2d")
        raise HighResPlansError(f"The plans have no configuration {request.source!r}; 2D ones: {two_d}.")
    source = _resolved(plans, request.source)
    source_patch = [int(s) for s in source["patch_size"]]
    if len(source_patch) != 2:
        hint = (f"2D ones: {two_d}" if two_d else
                "plan the 2d configuration first: nnUNetv2_plan_and_preprocess -d ID -c 2d")
        raise HighResPlansError(f"Configuration {request.source!r} is 3D (patch {source_patch}); high-resolution "
                                f"configurations are made from a 2D configuration ({hint}).")
    new_patch = _target_patch(source_patch, request)
    name = request.name or f"{request.source}_{max(new_patch)}"
    if not _NAME.match(name) or "__" in name:
        raise HighResPlansError(f"Configuration name {name!r}: use letters, digits, '_', '-', '.', no '__' (nnU-Net "
                                f"separates trainer__plans__configuration with it).")
    if name == request.source:
        raise HighResPlansError(f"The new configuration cannot replace its own source {name!r}.")
    if name in configurations:
        existing = configurations[name]
        if not request.overwrite:
            raise HighResPlansError(f"The plans already have a configuration {name!r}. Choose another --name, or "
                                    f"pass --overwrite to replace it.")
        if RECORD_KEY not in existing:
            raise HighResPlansError(f"Configuration {name!r} was not made by this command (no {RECORD_KEY!r} "
                                    f"record); refusing to overwrite it even with --overwrite. Choose another --name.")
        children = [c for c, cfg in configurations.items() if cfg.get("inherits_from") == name]
        if children:
            raise HighResPlansError(f"Configuration {name!r} is the parent of {children}; overwriting it would "
                                    f"change them too. Choose another --name.")

    source_spacing = [float(s) for s in source["spacing"]]
    ratio = [n / s for n, s in zip(new_patch, source_patch)]
    spacing = [sp / r for sp, r in zip(source_spacing, ratio)]
    median = [float(md) * r for md, r in zip(source["median_image_size_in_voxels"], ratio)]
    source_batch = int(source["batch_size"])
    if request.batch_size is not None:
        batch = request.batch_size
    else:
        area_ratio = math.prod(source_patch) / math.prod(new_patch)
        batch = min(source_batch, max(MIN_BATCH_SIZE, math.floor(source_batch * area_ratio)))
    configuration = {
        "inherits_from": request.source,
        "data_identifier": f"{plans['plans_name']}_{name}",
        "patch_size": new_patch,
        "spacing": spacing,
        "median_image_size_in_voxels": median,
        "batch_size": batch,
        RECORD_KEY: {
            "source": request.source, "source_patch_size": source_patch, "source_spacing": source_spacing,
            "source_batch_size": source_batch, "requested_sizes": list(request.sizes),
            "patch_multiple": request.patch_multiple,
            "batch_size_rule": "given" if request.batch_size is not None else
            "floor(source batch * source area / new area), clamped to [2, source batch]",
        },
    }
    notes = []
    strides = source.get("architecture", {}).get("arch_kwargs", {}).get("strides")
    if strides:
        total = [math.prod(s[i] for s in strides) for i in range(2)]
        if any(p % t for p, t in zip(new_patch, total)):
            notes.append(f"The inherited U-Net architecture downsamples by {total}, which does not divide "
                         f"{new_patch}: stock nnU-Net trainers cannot use {name!r}; the DINO trainers can.")
    return name, configuration, notes


# ---------------------------------------------------------------------------------------------- writing
def _read_plans(plans_file: Path) -> tuple[dict, bytes]:
    """The parsed plans and their exact bytes (to detect a concurrent change before replacing the file)."""
    if not plans_file.is_file():
        raise HighResPlansError(f"No plans file {plans_file}. Run nnUNetv2_plan_and_preprocess -d ID -c 2d first.")
    try:
        original = plans_file.read_bytes()
    except OSError as e:
        raise HighResPlansError(f"Cannot read {plans_file}: {e.strerror or e}.") from e
    try:
        return json.loads(original.decode()), original
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HighResPlansError(f"{plans_file} is not valid JSON ({e}); refusing to touch it.") from None


def _check_resolves(plans: dict, name: str, configuration: dict) -> None:
    resolved = _resolved(plans, name)
    for key in ("patch_size", "spacing", "batch_size", "data_identifier"):
        if resolved[key] != configuration[key]:
            raise RuntimeError(f"nnU-Net resolves {name}.{key} to {resolved[key]}, expected {configuration[key]}.")


def add_highres_configuration(plans_file: str | os.PathLike, request: HighResRequest) -> HighResResult:
    """Add (or, with overwrite, replace) the configuration in ``plans_file``. See the module doc."""
    plans_file = Path(plans_file)
    plans, original = _read_plans(plans_file)
    name, configuration, notes = derive_highres_configuration(plans, request)
    updated = copy.deepcopy(plans)
    updated["configurations"][name] = configuration
    _check_resolves(updated, name, configuration)
    backup = _write_atomically(plans_file, original, updated, name, configuration)
    return HighResResult(plans_file, name, configuration, backup, notes)


def _write_atomically(plans_file: Path, original: bytes, updated: dict, name: str, configuration: dict) -> Path:
    """Temporary file, read back, backup, os.replace (module doc). Any failure removes what this function created
    (the temporary file, the backup: the original is still in place, unchanged) and an OSError (read-only folder,
    full disk, permissions) becomes a HighResPlansError saying which step on which file failed and why."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    backup = plans_file.with_name(f"{plans_file.name}.{stamp}.bak")
    tmp: Path | None = None
    step = f"creating a temporary file in {plans_file.parent}"
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{plans_file.name}.", suffix=".tmp", dir=plans_file.parent)
        tmp = Path(tmp_name)
        step = f"writing the temporary file {tmp}"
        with os.fdopen(fd, "w") as f:
            json.dump(updated, f, indent=4, sort_keys=False)  # nnU-Net's own save_json format
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, plans_file.stat().st_mode & 0o7777)  # mkstemp creates 0600; keep the plans file's mode
        _check_resolves(json.loads(tmp.read_text()), name, configuration)  # what is on disk is what nnU-Net will read
        if plans_file.read_bytes() != original:
            raise HighResPlansError(f"{plans_file} changed while this command ran; nothing written. Run it again.")
        step = f"writing the backup {backup}"
        shutil.copy2(plans_file, backup)
        step = f"replacing {plans_file}"
        os.replace(tmp, plans_file)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if backup.exists() and _still(plans_file, original):  # the replace did not happen: drop our copy
            backup.unlink()
        if isinstance(e, OSError):
            raise HighResPlansError(
                f"Cannot write the plans: {step} failed: {e.strerror or e}"
                f"{f' ({e.filename})' if e.filename else ''}. The plans file {plans_file} is unchanged. Make its "
                f"folder writable (and check the disk space), or copy the plans file somewhere writable and pass "
                f"--plans-file.") from e
        raise
    return backup


def _still(plans_file: Path, original: bytes) -> bool:
    """Whether ``plans_file`` still holds ``original`` (False if it cannot be read: then keep the backup)."""
    try:
        return plans_file.read_bytes() == original
    except OSError:
        return False
