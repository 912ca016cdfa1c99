"""Reading DINO weight files safely: which file, is it intact, and its raw tensors.

Only tensors are ever deserialised: ``torch.load(weights_only=True)`` or safetensors. Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
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


class WeightFileError(ValueError):
    """A weight file that is missing, damaged, unsafe or not DINO weights. The message says what to do."""


def sha256_of(path: Path, chunk_size: int = 1 << 24) -> str:
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
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise WeightFileError(f"{path} is not a readable safetensors file ({e}).") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # noqa: BLE001
        raise WeightFileError(
            f"Could not read {path} as plain tensors with torch.load(weights_only=True): {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}. nnunet-dino never unpickles code from weight files; "
            f"save a plain state dict (or safetensors) instead."
        ) from e


def _read_hf_folder(folder: Path) -> tuple[dict, dict]:
    config = json.loads((folder / "config.json").read_text())
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    legacy = folder / "pytorch_model.bin"
    if single.is_file():
        state = _load_tensor_file(single)
    elif index.is_file():
        state = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(_load_tensor_file(folder / shard))
    elif legacy.is_file():
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
        if (path / "config.json").is_file():
            state, config = _read_hf_folder(path)
            return state, config, path
        raise WeightFileError(
            f"{path} is a folder without a Hugging Face config.json. Found: "
            f"{sorted(p.name for p in path.iterdir())[:20]}. Point at the weight file itself, or at a folder of "
            f"Meta-named files together with an architecture name. {HOW_TO_GET_WEIGHTS}"
        )
    if path.suffix not in TENSOR_FILE_SUFFIXES:
        raise WeightFileError(
            f"{path} has suffix {path.suffix!r}; DINO weights come as {', '.join(TENSOR_FILE_SUFFIXES)} files or "
            f"Hugging Face folders. {HOW_TO_GET_WEIGHTS}"
        )
    verify_meta_hash(path)
    state = _load_tensor_file(path)
    if not isinstance(state, dict):
        raise WeightFileError(f"{path} holds a {type(state).__name__}, not a dict of tensors. {HOW_TO_GET_WEIGHTS}")
    return state, None, path


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
