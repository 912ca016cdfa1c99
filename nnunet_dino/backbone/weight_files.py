"""Reading DINO weight files safely: which file, is it intact, and its raw tensors.

Only tensors are ever deserialised: ``torch.load(weights_only=True)`` or safetensors. Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import stat
from pathlib import Path

import torch

HOW_TO_GET_WEIGHTS = (
    "Download Meta's official weights (e.g. dinov3_vits16_pretrain_lvd1689m-08c60483.pth) after accepting the "
    "licence at https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/ (DINOv2: "
    "https://github.com/facebookresearch/dinov2), or use a Hugging Face model folder (config.json + "
    "model.safetensors), a timm .safetensors file or the MedDINOv3 CT checkpoint, then point nnunet-dino at it "
    "with `export nnUNet_dino_weights=/path/to/file_or_folder`."
)
META_HASH_PATTERN = re.compile(r"-([0-9a-f]{8})\.pth$")
TENSOR_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
# Sanity bound on one weight file: twice the largest DINO ViT (7B parameters, ~27 GiB in fp32). Anything bigger
# is not DINO weights, and hashing or loading it would only exhaust time and memory before failing.
MAX_WEIGHT_FILE_BYTES = 64 << 30
# Keys under which training frameworks nest a state dict (Lightning, timm/DeiT training scripts, ...).
WRAPPER_KEYS = ("state_dict", "model")

log = logging.getLogger("nnunet_dino")


class WeightFileError(ValueError):
    """A weight file that is missing, damaged, unsafe or not DINO weights. The message says what to do."""


def _kind_of(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def check_regular_file(path: Path, what: str = "weight file") -> int:
    """Raise unless ``path`` is, after resolving symlinks, a non-empty regular file of sane size; returns its size.

    Called before every read of a weight or config file: a device such as /dev/zero or a FIFO would make hashing
    or loading run (or block) forever, and an empty file would only give a cryptic unpickling error."""
    path = Path(path)
    try:
        info = os.stat(path)  # follows symlinks: what matters is what is actually read
    except FileNotFoundError:
        raise WeightFileError(f"The {what} {path} does not exist (or is a broken link). {HOW_TO_GET_WEIGHTS}") from None
    target = os.path.realpath(path)
    shown = f"{path} (a link to {target})" if target != os.path.abspath(path) else str(path)
    if not stat.S_ISREG(info.st_mode):
        raise WeightFileError(
            f"The {what} {shown} is {_kind_of(info.st_mode)}, not a regular file. nnunet-dino reads weights only "
            f"from regular files (reading a device or pipe may never end). Point at the downloaded file itself."
        )
    if info.st_size == 0:
        raise WeightFileError(
            f"The {what} {shown} is empty (0 bytes): the download or copy did not complete. Download it again. "
            f"{HOW_TO_GET_WEIGHTS}"
        )
    if info.st_size > MAX_WEIGHT_FILE_BYTES:
        raise WeightFileError(
            f"The {what} {shown} is {info.st_size / 2**30:.1f} GiB, more than any DINO ViT (limit "
            f"{MAX_WEIGHT_FILE_BYTES >> 30} GiB; the 7B model is ~27 GiB): it is not a DINO weight file."
        )
    return info.st_size


def sha256_of(path: Path, chunk_size: int = 1 << 24) -> str:
    check_regular_file(path)  # a regular file ends: hashing terminates
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def verify_meta_hash(path: Path) -> bool:
    """Meta's file names end in the first 8 hex digits of the file's sha256. Returns whether the name carried one;
    raises if it did not match (a truncated download, a corrupted copy or a renamed file)."""
    m = META_HASH_PATTERN.search(path.name)
    if m is None:
        return False
    actual = sha256_of(path)
    if not actual.startswith(m.group(1)):
        raise WeightFileError(
            f"{path} is named with sha256 prefix {m.group(1)} but its sha256 is {actual[:8]}...: the file is "
            f"damaged, truncated or renamed. Download it again. {HOW_TO_GET_WEIGHTS}"
        )
    return True


def _load_tensor_file(path: Path) -> dict:
    check_regular_file(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise WeightFileError(f"{path} is not a readable safetensors file ({e}).") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:  # torch's weights_only unpickler refused an object: code or custom class
        raise WeightFileError(
            f"Could not read {path} as plain tensors with torch.load(weights_only=True): {type(e).__name__}: "
            f"{_first_line(e)}. nnunet-dino never unpickles code from weight files; save a plain state dict (or "
            f"safetensors) instead."
        ) from e
    except Exception as e:  # noqa: BLE001 - anything else: the bytes are not a (complete) torch.save file
        raise WeightFileError(
            f"Could not read {path} with torch.load(weights_only=True): {type(e).__name__}: {_first_line(e)}. "
            f"The file is damaged (e.g. a truncated download) or not a PyTorch weight file; download it again. "
            f"{HOW_TO_GET_WEIGHTS}"
        ) from e


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0].rstrip(".") if str(e) else ""


def _read_json(path: Path, folder: Path) -> dict:
    """A JSON object from a Hugging Face folder, with an error naming the file for anything else."""
    check_regular_file(path, "Hugging Face file")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise WeightFileError(
            f"{path} is not valid JSON ({e}): the Hugging Face folder {folder} is damaged or was edited by hand. "
            f"Download the folder again (config.json together with its model.safetensors). {HOW_TO_GET_WEIGHTS}"
        ) from e
    if not isinstance(value, dict):
        raise WeightFileError(f"{path} holds a JSON {type(value).__name__}, not an object: it is not a Hugging Face "
                              f"config or index file. Download the folder again. {HOW_TO_GET_WEIGHTS}")
    return value


def _shard_names(index_path: Path, folder: Path) -> list[str]:
    weight_map = _read_json(index_path, folder).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightFileError(f"{index_path} has no 'weight_map' naming the model's shard files: the index is "
                              f"damaged. Download the folder again. {HOW_TO_GET_WEIGHTS}")
    names = sorted({str(v) for v in weight_map.values()})
    # Hugging Face shards always sit next to their index; a path elsewhere is a damaged or crafted index.
    bad = [n for n in names if Path(n).name != n]
    if bad:
        raise WeightFileError(f"{index_path} names shard files outside {folder}: {bad[:5]}. Hugging Face shards "
                              f"are plain file names in the model folder; download the folder again.")
    return names


def is_hf_folder(path: Path) -> bool:
    """A folder with a config.json (of whatever kind: ``_read_json`` refuses links to devices and the like)."""
    config = Path(path) / "config.json"
    return Path(path).is_dir() and (config.exists() or config.is_symlink())


def _read_hf_folder(folder: Path) -> tuple[dict, dict]:
    config = _read_json(folder / "config.json", folder)
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    legacy = folder / "pytorch_model.bin"
    # exists(), not is_file(): a weight file that is a link to a device must be refused, not overlooked.
    if single.exists():
        state = _load_tensor_file(single)
    elif index.exists():
        state = {}
        for shard in _shard_names(index, folder):
            state.update(_load_tensor_file(folder / shard))
    elif legacy.exists():
        state = _load_tensor_file(legacy)
    else:
        raise WeightFileError(
            f"{folder} has a config.json but no model.safetensors, model.safetensors.index.json or "
            f"pytorch_model.bin. Found: {sorted(p.name for p in folder.iterdir())}. {HOW_TO_GET_WEIGHTS}"
        )
    return state, config


def read_weights(path: str | os.PathLike) -> tuple[dict, dict | None, Path]:
    """Raw tensors of a weight file or Hugging Face folder: (state_dict, hf_config or None, resolved file)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightFileError(f"DINO weights not found: {path} does not exist. {HOW_TO_GET_WEIGHTS}")
    if path.is_dir():
        if is_hf_folder(path):
            state, config = _read_hf_folder(path)
            return state, config, path
        raise WeightFileError(
            f"{path} is a folder without a Hugging Face config.json. Found: "
            f"{sorted(p.name for p in path.iterdir())[:20]}. Point at the weight file itself, or at a folder of "
            f"Meta-named files together with an architecture name. {HOW_TO_GET_WEIGHTS}"
        )
    check_regular_file(path)
    if path.suffix not in TENSOR_FILE_SUFFIXES:
        raise WeightFileError(
            f"{path} has suffix {path.suffix!r}; DINO weights come as {', '.join(TENSOR_FILE_SUFFIXES)} files or "
            f"Hugging Face folders. {HOW_TO_GET_WEIGHTS}"
        )
    verify_meta_hash(path)
    state = _load_tensor_file(path)
    if not isinstance(state, dict):
        raise WeightFileError(f"{path} holds a {type(state).__name__}, not a dict of tensors. {HOW_TO_GET_WEIGHTS}")
    return _unwrap_state_dict(state, path), None, path


def _unwrap_state_dict(state: dict, path: Path) -> dict:
    """Training scripts save ``{'state_dict': sd}`` or ``{'model': sd}``. When that one entry is all the file holds,
    nothing else could be the intended weights, so the nested dict is used (logged; its keys are then checked as
    strictly as any file's). Next to other entries (optimizer, EMA copy, epoch, ...) the choice is ambiguous (an
    EMA or teacher copy may be what the user wants), so the file is refused with the command that extracts it."""
    nested = [k for k in WRAPPER_KEYS if isinstance(state.get(k), dict)]
    if not nested or "teacher" in state:  # MedDINOv3's {'teacher': ...} is a layout of its own (formats.py)
        return state
    key = nested[0]
    if len(state) == 1:
        log.info("nnunet-dino: %s holds its tensors nested under %r; loading them from there.", path, key)
        return state[key]
    others = sorted(str(k) for k in state if k != key)
    raise WeightFileError(
        f"{path} is a training checkpoint: its tensors are nested under {key!r}, next to {others[:10]}. nnunet-dino "
        f"does not guess which entry holds the weights to use; save that one as a plain state dict, e.g. "
        f"python -c \"import torch; torch.save(torch.load('{path}', weights_only=True)[{key!r}], 'dino_weights.pth')\""
        f", and point nnUNet_dino_weights at dino_weights.pth."
    )


def find_meta_file(folder: Path, arch_name: str) -> Path:
    """In a folder of Meta-named files, the one for ``arch_name`` (e.g. dinov3_vits16_pretrain_lvd1689m-*.pth)."""
    # DINOv3: dinov3_vits16_pretrain_lvd1689m-08c60483.pth; DINOv2: dinov2_vits14_pretrain.pth and, for
    # dinov2_vits14_reg, dinov2_vits14_reg4_pretrain.pth.
    pattern = f"{arch_name[:-4]}_reg4_pretrain*.pth" if arch_name.endswith("_reg") else f"{arch_name}_pretrain*.pth"
    candidates = sorted(folder.glob(pattern))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise WeightFileError(
            f"No file for {arch_name} in {folder} (looked for {pattern}). Found: "
            f"{sorted(p.name for p in folder.iterdir())[:20]}. {HOW_TO_GET_WEIGHTS}"
        )
    raise WeightFileError(
        f"Several files for {arch_name} in {folder}: {[c.name for c in candidates]}. Set nnUNet_dino_weights to "
        f"the one file you want."
    )


def pretraining_of(path: Path) -> str | None:
    """The pretraining data named in Meta's file names (lvd1689m, sat493m, lvd142m), else None."""
    for tag in ("lvd1689m", "sat493m", "lvd142m"):
        if tag in path.name:
            return tag
    return None
