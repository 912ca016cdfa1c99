"""What the plugin adds to nnU-Net's checkpoints: provenance, optional slim storage of frozen DINO weights, and
atomic writes with a free-space check.

nnU-Net's ``save_checkpoint`` builds the checkpoint dict itself and ``torch.save``s it in place; its predictor
rebuilds the network from the trainer class and calls ``network.load_state_dict(checkpoint['network_weights'])``.
The only part of a checkpoint that reaches the network at prediction is therefore ``network_weights``, so that is
where the plugin's record goes, under ``PROVENANCE_KEY``:

- **Provenance**: which DINO weights the model was trained from (or that they were random). It survives
  ``nnUNetv2_export_model_to_zip`` (which ships ``checkpoint_final.pth`` but not ``dino_weights.json``) and is
  printed once per process when a model is loaded for prediction.
- **Slim checkpoints** (``nnUNet_dino_slim_checkpoints=1``): frozen DINO parameters never change during training,
  yet nnU-Net would store them in every checkpoint (ViT-S 88 MB, ViT-L 1.2 GB, each of latest/best/final of every
  fold). In slim mode they are stored once per model folder as ``dino_frozen-<sha16>.safetensors`` and the
  checkpoint records their keys and sha256. Loading finds them there (``$nnUNet_results/<dataset>/<model folder>``)
  or re-reads them from the DINO weight file the model was trained with / ``nnUNet_dino_weights``, verified by the
  sha256 of the tensors; anything else is an error that says what to set.

The network side is a ``load_state_dict`` pre-hook installed by ``install_checkpoint_hooks`` (the trainers'
``build_network_architecture`` does it, so nnU-Net's predictor gets it too). The trainer side is
``checkpoint_view`` (a scoped ``state_dict`` post-hook around nnU-Net's own ``save_checkpoint``) and
``write_checkpoint_atomically`` (``atomic_files``: never a truncated checkpoint, a clear error on a full disk).
"""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

from ..atomic_files import write_atomically
from ..backbone import WEIGHTS_ENV_VAR, DinoBackbone, WeightFileError, load_weights_into, resolve_weights_setting

PROVENANCE_KEY = "_nnunet_dino"
SLIM_ENV_VAR = "nnUNet_dino_slim_checkpoints"
RECORD_FORMAT = 1
CHECKPOINT_SPACE_ADVICE = (f"Free some space or point nnUNet_results elsewhere, then continue with --c. Checkpoints "
                           f"of frozen DINO weights shrink with {SLIM_ENV_VAR}=1 (docs/guidino.md#checkpoints).")

_frozen_cache: dict[str, dict[str, torch.Tensor]] = {}  # sha256 -> tensors: nnU-Net reloads every fold per case
_announced: set[str] = set()


class CheckpointWriteError(OSError):
    """A checkpoint's file could not be written as asked (a full disk raises atomic_files.NoSpaceLeftError)."""


def slim_checkpoints_requested() -> bool:
    return os.environ.get(SLIM_ENV_VAR, "").strip().lower() in ("1", "true", "t", "yes")


# ---------------------------------------------------------------------------------------------- frozen tensors
def dino_backbones(network: torch.nn.Module) -> dict[str, DinoBackbone]:
    """Every DINO backbone inside ``network``, by its module path."""
    return {name: m for name, m in network.named_modules() if isinstance(m, DinoBackbone)}


def frozen_dino_keys(network: torch.nn.Module) -> list[str]:
    """State-dict keys of the DINO parameters that training does not change (frozen base weights; with LoRA the
    wrapped layers' base weights)."""
    keys = []
    for path, backbone in dino_backbones(network).items():
        keys += [f"{path}.{name}" for name, p in backbone.named_parameters() if not p.requires_grad]
    return sorted(keys)


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in key order: equal iff the tensors are bit-equal."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def frozen_file_name(sha256: str) -> str:
    return f"dino_frozen-{sha256[:16]}.safetensors"


def store_frozen_tensors(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], sha256: str) -> Path:
    """Write the frozen tensors once per model folder (all folds share them); an existing file is verified."""
    path = Path(folder) / frozen_file_name(sha256)
    if path.is_file():
        if tensors_sha256(load_file(str(path))) != sha256:
            raise CheckpointWriteError(
                f"{path} exists but does not hold the frozen DINO weights of this run (sha256 differs): another run "
                f"with other DINO weights wrote it. Train into another model folder or remove the file.")
        return path
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_checkpoint_atomically(path, lambda tmp: save_file(data, tmp),
                                sum(t.numel() * t.element_size() for t in data.values()))
    return path


# ---------------------------------------------------------------------------------------------- writing
def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a nested dict/list (what torch.save will write, roughly)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def write_checkpoint_atomically(path: str | os.PathLike, write: Callable[[str], None], expected_bytes: int) -> None:
    """``atomic_files.write_atomically`` with what a training run should do when the disk is full."""
    write_atomically(path, write, expected_bytes, advice=CHECKPOINT_SPACE_ADVICE)


@contextmanager
def checkpoint_view(network: torch.nn.Module, record: dict, strip: list[str]) -> Iterator[None]:
    """Within the block, ``network.state_dict()`` carries ``record`` under PROVENANCE_KEY and omits ``strip``
    (slim mode). Scoped so that every other state_dict() call (nnU-Net's resume, EMA, user code) is unchanged."""
    def post_hook(module, state_dict, prefix, local_metadata):
        for key in strip:
            del state_dict[prefix + key]
        state_dict[prefix + PROVENANCE_KEY] = record

    handle = network.register_state_dict_post_hook(post_hook)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------- reading
def describe_provenance(record: dict) -> str:
    parts = []
    for b in record.get("dino_weights", []):
        if b.get("random_init"):
            parts.append(f"{b['arch']}: RANDOMLY INITIALISED DINO weights (not pretrained)")
        else:
            parts.append(f"{b['arch']}: weights from {b['source']} [{b['layout']} layout; input convention "
                         f"{b['pretraining']}]")
    if record.get("unet_init"):
        parts.append(f"U-Net started from the stock model {record['unet_init']['checkpoint']}")
    slim = " (slim checkpoint: frozen DINO weights stored outside it)" if record.get("slim") else ""
    return "; ".join(parts) + slim if parts else "DINO weights not recorded" + slim


DECODE_KEY = "decode_at_patch_resolution"  # SegDINOv2 / MedDINOv3 buffer: True = max_decode_resolution 'patch'


def check_decode_resolution(network: torch.nn.Module, state_dict: dict, prefix: str) -> None:
    """The decoding resolution changes outputs but no weight, so strict loading alone would let weights trained one
    way predict the other way. Checkpoints record it (DECODE_KEY); those without it were written before 2026-12-01
    and decoded at the ViT input's resolution."""
    if DECODE_KEY not in network._buffers:
        return
    stored = state_dict.get(prefix + DECODE_KEY)
    trained = "vit_input" if stored is None or not bool(stored) else "patch"
    if trained != network.max_decode_resolution:
        raise ValueError(
            f"This checkpoint was trained with max_decode_resolution={trained!r}, but {type(network).__name__} is "
            f"built with max_decode_resolution={network.max_decode_resolution!r}: the weights would load, yet "
            f"predictions would differ from the trained model's. Checkpoints written before 2026-12-01 decode at "
            f"the ViT input's resolution; retrain with this version (cheaper: decoding at the patch's resolution), "
            f"or use a trainer variant with max_decode_resolution='vit_input'.")
    if stored is None:  # an older checkpoint into a network built to decode as it was trained: complete the keys
        state_dict[prefix + DECODE_KEY] = torch.tensor(0, dtype=torch.uint8)


def install_checkpoint_hooks(network: torch.nn.Module) -> torch.nn.Module:
    """Let ``network.load_state_dict`` take the plugin's checkpoints: pop the record, announce the DINO weights
    once per process, and put slim checkpoints' frozen DINO tensors back before strict loading checks the keys."""
    def pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        record = state_dict.pop(prefix + PROVENANCE_KEY, None)
        module.loaded_provenance = record  # the trainer logs it on resume
        check_decode_resolution(module, state_dict, prefix)
        if record is None:  # a checkpoint written before records existed: complete, nothing to do
            return
        text = describe_provenance(record)
        if text not in _announced:
            _announced.add(text)
            print(f"nnunet-dino: this model was trained with {text}", flush=True)
        slim = record.get("slim")
        if slim:
            tensors = _frozen_tensors(module, slim, record)
            state_dict.update({prefix + k: v for k, v in tensors.items()})

    network.register_load_state_dict_pre_hook(pre_hook)
    return network


def _frozen_tensors(network: torch.nn.Module, slim: dict, record: dict) -> dict[str, torch.Tensor]:
    sha = slim["sha256"]
    if sha in _frozen_cache:
        return _frozen_cache[sha]
    tried = []
    for folder in _model_folders(slim):
        path = folder / slim["file"]
        tried.append(str(path))
        if path.is_file():
            tensors = load_file(str(path))
            if tensors_sha256(tensors) == sha and sorted(tensors) == sorted(slim["keys"]):
                _frozen_cache[sha] = tensors
                return tensors
            tried[-1] += " (present but its tensors differ)"
    for weights in _weight_settings(record):
        tensors = _frozen_from_weight_file(network, slim["keys"], weights, tried)
        if tensors is not None and tensors_sha256(tensors) == sha:
            _frozen_cache[sha] = tensors
            return tensors
        if tensors is not None:
            tried[-1] += " (loads, but its tensors are not the ones this model was trained with)"
    raise WeightFileError(
        f"This is a slim nnunet-dino checkpoint: its frozen DINO weights (sha256 {sha[:16]}...) are stored outside "
        f"it, and none of the places tried holds them: {tried}. Put {slim['file']} back into the model folder, or "
        f"set {WEIGHTS_ENV_VAR} to the DINO weight file the model was trained with.")


def _model_folders(slim: dict) -> list[Path]:
    results = os.environ.get("nnUNet_results")
    if not results or not slim.get("dataset") or not slim.get("model_folder"):
        return []
    return [Path(results) / slim["dataset"] / slim["model_folder"]]


def _weight_settings(record: dict) -> list[str]:
    """The DINO file recorded at training (if it is still there), then the current setting."""
    settings = [b["source"] for b in record.get("dino_weights", []) if not b.get("random_init")]
    if os.environ.get(WEIGHTS_ENV_VAR):
        settings.append(os.environ[WEIGHTS_ENV_VAR])
    return list(dict.fromkeys(settings))


def _frozen_from_weight_file(network: torch.nn.Module, keys: list[str], weights: str,
                             tried: list[str]) -> dict[str, torch.Tensor] | None:
    """Load ``weights`` into the network's own backbones (the full state dict overwrites them right after) and read
    the frozen tensors back in the network's key names (LoRA-wrapped names included)."""
    tried.append(weights)
    try:
        for backbone in dino_backbones(network).values():
            path = resolve_weights_setting(weights, backbone.arch.name)
            if path is None:
                return None
            load_weights_into(backbone, path)
    except (WeightFileError, OSError) as e:
        tried[-1] += f" ({e})"
        return None
    state = network.state_dict()
    return {k: state[k].detach().clone() for k in keys}
