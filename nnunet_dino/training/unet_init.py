"""Start GuiDINO's U-Net from the user's own trained (stock) nnU-Net model of the same plans.

GuiDINO's gates start as the identity, so a GuiDINO network whose ``GuidedUNet.unet`` holds the stock model's
weights predicts exactly what the stock model predicts; training can then only add what the guide brings. nnU-Net's
``-pretrained_weights`` cannot do this: it asserts that every key of the network is in the checkpoint, and no GuiDINO
key is in a stock one.

The setting (``GuiDINOTrainer.init_unet``, None: ``$nnUNet_dino_init_unet``), in nnU-Net's style of environment
settings, so that the stock ``nnUNetv2_train`` needs no new flag, while a trainer variant can hard-wire a model:

- a stock **model folder** (``.../DatasetXXX/nnUNetTrainer__nnUNetPlans__2d``): fold-aware, the
  ``fold_<fold>/checkpoint_final.pth`` of the fold being trained (missing: an error listing the folds present).
  Preferred: each fold then starts from the model that never saw its validation cases;
- a single **checkpoint file**: used for whatever fold is trained (the log says so, and warns when the checkpoint
  was trained on another fold, whose training cases include this fold's validation cases).

Applied at training start of a fresh run only: a resumed run (``--c``) restores the whole network from its own
checkpoint and ``--val`` never starts training. Everything is checked before any training step, strictly:

- the file is read with ``torch.load(weights_only=True)``; beyond tensors and plain containers only numpy float
  scalars and their dtypes are allowed (nnU-Net's logging stores them); a file that needs anything else, e.g.
  code, is refused without unpickling it;
- the checkpoint's plans must describe the same network and inputs as this training's plans and configuration
  (architecture class and kwargs, patch size, input channels, outputs and their labels/regions, normalisation,
  spacing, axis order);
- every tensor of the U-Net must be in the checkpoint with the same shape, and nothing else (nnU-Net's
  ``module.`` / ``_orig_mod.`` prefixes stripped as its own loading does);
- a GuiDINO checkpoint is refused: loading only its U-Net would silently drop its learned gates and TokenBook (the
  network would not predict what that checkpoint predicts). Resume it with ``--c``.

What was used is written to ``unet_init.json`` in the fold folder (path, sha256, folds, epochs, trainer) and to the
training log.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from .dino_trainer_base import unwrap
from .safe_checkpoint import UnsafeCheckpointError, load_checkpoint_safely

INIT_UNET_ENV_VAR = "nnUNet_dino_init_unet"
RECORD_NAME = "unet_init.json"
STOCK_CHECKPOINT = "checkpoint_final.pth"  # what nnUNetv2_predict uses by default
_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
_GUIDINO_PREFIXES = ("unet.", "gates.", "guidance.")  # GuidedUNet's own submodules
_LISTED = 8  # keys named per kind of mismatch; the counts are always complete


class StockModelError(ValueError):
    """The stock nnU-Net model named by the setting cannot start this GuiDINO training; the message says why."""


# ---------------------------------------------------------------------------------------------- the setting
@dataclass(frozen=True)
class StockSource:
    checkpoint: Path
    setting: str
    set_by: str  # "init_unet attribute" or the environment variable
    per_fold: bool  # a model folder (fold-aware) rather than one file for every fold


def resolve_setting(explicit: str | os.PathLike | None, fold) -> StockSource | None:
    """The stock checkpoint for ``fold``, or None when nothing is configured."""
    value = explicit if explicit is not None else os.environ.get(INIT_UNET_ENV_VAR)
    if value is None or str(value).strip() == "":
        return None
    set_by = "init_unet attribute" if explicit is not None else f"${INIT_UNET_ENV_VAR}"
    path = Path(value).expanduser()
    if path.is_file():
        return StockSource(path.resolve(), str(value), set_by, per_fold=False)
    if not path.is_dir():
        raise StockModelError(f"{set_by} = {value}: no such file or folder. Give a stock nnU-Net model folder "
                              f"(.../DatasetXXX/nnUNetTrainer__nnUNetPlans__2d) or one checkpoint file.")
    if (path / STOCK_CHECKPOINT).is_file() or path.name.startswith("fold_"):
        # A fold folder would give every fold the same start; the model folder above it gives each fold its own.
        raise StockModelError(
            f"{set_by} = {value} is a fold folder. Give the model folder above it ({path.parent}) to start each "
            f"fold from its own stock fold, or the checkpoint file itself to use that one file for every fold.")
    checkpoint = path / f"fold_{fold}" / STOCK_CHECKPOINT
    if not checkpoint.is_file():
        raise StockModelError(
            f"{set_by} = {value} has no {checkpoint.relative_to(path)} for fold {fold}, the fold being trained. "
            f"{_folds_present(path)} Train that fold of the stock model first (nnUNetv2_train DATASET CONFIGURATION "
            f"{fold}), or give one checkpoint file to use it for every fold.")
    return StockSource(checkpoint.resolve(), str(value), set_by, per_fold=True)


def _folds_present(model_folder: Path) -> str:
    finished, unfinished = [], []
    for fold_dir in sorted(p for p in model_folder.glob("fold_*") if p.is_dir()):
        if (fold_dir / STOCK_CHECKPOINT).is_file():
            finished.append(fold_dir.name)
        elif any(fold_dir.glob("checkpoint_*.pth")):
            unfinished.append(f"{fold_dir.name} (unfinished: no {STOCK_CHECKPOINT})")
    if not finished and not unfinished:
        return "It holds no fold_* folders: is it an nnU-Net model folder?"
    return f"Folds present: {', '.join(finished + unfinished)}."


# ---------------------------------------------------------------------------------------------- reading safely
def read_stock_checkpoint(path: Path) -> tuple[dict, str]:
    """The checkpoint dict (read with weights_only=True: safe_checkpoint.py) and the sha256 of the very bytes it was
    read from."""
    if not hasattr(torch.serialization, "safe_globals"):
        raise StockModelError(f"Reading nnU-Net checkpoints safely needs torch >= 2.5 (this is {torch.__version__}).")
    data = path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        checkpoint = load_checkpoint_safely(path, data=data, required_keys=())
    except UnsafeCheckpointError as e:
        raise StockModelError(
            f"Refused to read {path}: unpickling it needs {e.needs}. A pickle can run arbitrary code, so "
            f"nnunet-dino reads stock checkpoints with torch.load(weights_only=True) and allows only tensors, plain "
            f"containers and numpy scalars: all that nnU-Net's own checkpoints contain. If you trust the file, "
            f"re-save its 'network_weights' (tensors), 'init_args', 'trainer_name' and 'current_epoch' as plain data "
            f"and point {INIT_UNET_ENV_VAR} at that.") from None
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise StockModelError(f"Could not read {path} as a PyTorch checkpoint: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return checkpoint, sha256


# ---------------------------------------------------------------------------------------------- same network
def network_description(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                        dataset_json: dict) -> dict:
    """What fixes the U-Net's tensors and what its inputs and outputs mean. Two plans with the same description
    build the same network, feed it the same data and read its outputs the same way; names (dataset, plans,
    configuration, channels, labels), batch size, the ignore label and anything else that changes none of these are
    not part of it."""
    lm = plans_manager.get_label_manager(dataset_json)
    schemes = list(configuration_manager.normalization_schemes)
    # CT normalisation uses the plans' foreground statistics: they are part of what a CT channel's input means.
    ct_properties = {str(c): plans_manager.foreground_intensity_properties_per_channel.get(str(c))
                     for c, s in enumerate(schemes) if s == "CTNormalization"}
    description = {
        "network class": configuration_manager.network_arch_class_name,
        "arch_kwargs": configuration_manager.network_arch_init_kwargs,
        "arch_kwargs requiring import": list(configuration_manager.network_arch_init_kwargs_req_import),
        "patch size": configuration_manager.patch_size,
        "input channels": determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        "output channels": lm.num_segmentation_heads,
        "regions": lm.has_regions,
        "labels or regions": lm.foreground_regions if lm.has_regions else lm.foreground_labels,  # output order
        "normalization schemes": schemes,
        "use_mask_for_norm": configuration_manager.use_mask_for_norm,
        "CT intensity properties": ct_properties or None,
        "spacing": configuration_manager.spacing,
        "transpose_forward": plans_manager.transpose_forward,
    }
    # As plain JSON values: tuples compare equal to lists, numpy ints (nnU-Net's labels) to ints, as in the plans.
    return json.loads(json.dumps(description, default=_plain))


def _plain(value):
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} in a network description")


def checkpoint_description(checkpoint: dict, path: Path) -> dict:
    init_args = checkpoint.get("init_args")
    if not isinstance(init_args, dict) or not all(k in init_args for k in ("plans", "configuration", "dataset_json")):
        raise StockModelError(f"{path} is not an nnU-Net training checkpoint: it has no init_args with plans, "
                              f"configuration and dataset_json (nnU-Net's save_checkpoint writes them).")
    pm = PlansManager(init_args["plans"])
    try:
        cm = pm.get_configuration(init_args["configuration"])
        return network_description(pm, cm, init_args["dataset_json"])
    except Exception as e:  # noqa: BLE001 - plans nnU-Net itself could not use
        raise StockModelError(f"The plans stored in {path} cannot be read by this nnU-Net: {type(e).__name__}: {e}"
                              ) from e


def description_differences(stock: dict, ours: dict) -> list[str]:
    diffs = []
    for key in ours:
        a, b = stock.get(key), ours[key]
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):  # arch_kwargs: name the kwargs that differ
            diffs += [f"{key}.{k}: stock model {a.get(k)!r}, this training {b.get(k)!r}"
                      for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            diffs.append(f"{key}: stock model {a!r}, this training {b!r}")
    return diffs


def check_same_network(checkpoint: dict, path: Path, ours: dict) -> None:
    diffs = description_differences(checkpoint_description(checkpoint, path), ours)
    if diffs:
        init_args = checkpoint["init_args"]
        raise StockModelError(
            f"The stock model {path} (plans {init_args['plans'].get('plans_name')!r}, configuration "
            f"{init_args['configuration']!r}) does not describe the network this training builds:\n  - "
            + "\n  - ".join(diffs) + "\nGuiDINO's U-Net can only start from a model trained with the same plans and "
            "configuration. Point the setting at such a model, or train one first (nnUNetv2_train DATASET "
            "CONFIGURATION FOLD -p PLANS).")


# ---------------------------------------------------------------------------------------------- same tensors
def _strip_prefixes(key: str) -> str:
    while key.startswith(_PREFIXES):
        key = key[len(next(p for p in _PREFIXES if key.startswith(p))):]
    return key


def stock_unet_state(checkpoint: dict, path: Path) -> dict[str, torch.Tensor]:
    """The U-Net's tensors from a stock checkpoint, under the U-Net's own key names."""
    weights = checkpoint.get("network_weights")
    if not isinstance(weights, dict) or not weights:
        raise StockModelError(f"{path} has no 'network_weights' (the state dict nnU-Net's save_checkpoint writes).")
    state = {}
    for key, value in weights.items():
        name = _strip_prefixes(key)
        if name in state:
            raise StockModelError(f"{path}: keys {key!r} and another one both name {name!r} once nnU-Net's "
                                  f"module./_orig_mod. prefixes are removed.")
        state[name] = value
    trainer = checkpoint.get("trainer_name")
    if any(k.startswith(_GUIDINO_PREFIXES) for k in state):
        raise StockModelError(
            f"{path} is a GuiDINO checkpoint (trainer {trainer}), not a stock nnU-Net one. Taking only its U-Net "
            f"would drop the gates and TokenBook it learned, so the network would not predict what that checkpoint "
            f"predicts. Continue that training with --c, or give the stock nnU-Net model it started from.")
    other = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if other:
        raise StockModelError(
            f"{path} (trainer {trainer}) holds non-tensor network entries {other[:_LISTED]}: not a stock nnU-Net "
            f"checkpoint (nnunet-dino's own checkpoints carry such a record). Give a model trained with nnU-Net's "
            f"nnUNetTrainer (or a variant that keeps its network).")
    return state


def check_same_tensors(unet: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, trainer: str) -> None:
    expected = unet.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: stock {tuple(state[k].shape)}, this U-Net {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(state)) if state[k].shape != expected[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the U-Net's {len(expected)} tensors missing: {missing[:_LISTED]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {unexpected[:_LISTED]}")
    if shapes:
        parts.append(f"{len(shapes)} with another shape: {shapes[:_LISTED]}")
    if parts:
        raise StockModelError(
            f"The tensors of {path} (trainer {trainer}) are not those of the U-Net the plans build: "
            + "; ".join(parts) + ". Its plans matched, so its trainer built another network: give a model trained "
            "with nnU-Net's nnUNetTrainer (or a variant that keeps its network).")


# ---------------------------------------------------------------------------------------------- the whole step
def init_unet_from_stock(trainer) -> dict | None:
    """Load the configured stock model into ``trainer``'s GuidedUNet.unet (a GuiDINOTrainer, initialised) and
    record it. Returns the record, or None when no stock model is configured."""
    record_path = Path(trainer.output_folder) / RECORD_NAME
    source = resolve_setting(trainer.init_unet, trainer.fold)
    if source is None:
        if trainer.require_init_unet:
            raise StockModelError(
                f"{type(trainer).__name__} fine-tunes a stock nnU-Net model (lower U-Net rate, shorter schedule) "
                f"and would otherwise train a U-Net from scratch on that schedule. Set {INIT_UNET_ENV_VAR} to the "
                f"stock model folder (.../DatasetXXX/nnUNetTrainer__nnUNetPlans__2d) or to one checkpoint file.")
        if record_path.is_file() and trainer.local_rank == 0:  # left by an earlier run in this fold folder
            record_path.unlink()
            trainer.print_to_log_file(f"Removed {RECORD_NAME} of an earlier run: this run's U-Net starts from "
                                      f"nnU-Net's random initialisation.")
        return None
    checkpoint, sha256 = read_stock_checkpoint(source.checkpoint)
    ours = network_description(trainer.plans_manager, trainer.configuration_manager, trainer.dataset_json)
    check_same_network(checkpoint, source.checkpoint, ours)
    state = stock_unet_state(checkpoint, source.checkpoint)
    unet = unwrap(trainer.network).unet
    check_same_tensors(unet, state, source.checkpoint, checkpoint.get("trainer_name"))
    unet.load_state_dict(state, strict=True)  # copies into the optimizer's own parameters, on the trainer's device
    record = _record(trainer, source, checkpoint, sha256, len(state))
    if trainer.local_rank == 0:
        record_path.write_text(json.dumps(record, indent=2))
    _log(trainer, record)
    return record


def _record(trainer, source: StockSource, checkpoint: dict, sha256: str, n_tensors: int) -> dict:
    init_args = checkpoint["init_args"]
    return {
        "checkpoint": str(source.checkpoint), "sha256": sha256, "setting": source.setting, "set_by": source.set_by,
        "per_fold": source.per_fold, "fold": trainer.fold, "checkpoint_fold": init_args.get("fold"),
        "checkpoint_epochs": checkpoint.get("current_epoch"),  # nnU-Net stores the number of finished epochs
        "checkpoint_trainer": checkpoint.get("trainer_name"),
        "checkpoint_dataset": init_args["plans"].get("dataset_name"),
        "checkpoint_plans": init_args["plans"].get("plans_name"),
        "checkpoint_configuration": init_args["configuration"], "tensors": n_tensors,
        "trainer": type(trainer).__name__,
    }


def _log(trainer, r: dict) -> None:
    trainer.print_to_log_file(
        f"U-Net initialised from the stock nnU-Net model {r['checkpoint']} (sha256 {r['sha256'][:16]}..., trainer "
        f"{r['checkpoint_trainer']}, {r['checkpoint_dataset']} {r['checkpoint_plans']} "
        f"{r['checkpoint_configuration']}, fold {r['checkpoint_fold']}, {r['checkpoint_epochs']} epochs; set by "
        f"{r['set_by']}): all {r['tensors']} tensors loaded strictly. The gates start as the identity, so the network "
        f"predicts exactly what that model predicts until training changes it. Recorded in {RECORD_NAME}.")
    if not r["per_fold"]:
        trainer.print_to_log_file(f"The setting names one checkpoint file: it is used for every fold (this is fold "
                                  f"{r['fold']}). A model folder would give each fold its own stock fold.")
    if str(r["checkpoint_fold"]) != str(r["fold"]):
        trainer.print_to_log_file(
            "#" * 80 + f"\nWARNING: the stock model was trained as fold {r['checkpoint_fold']}, this is fold "
            f"{r['fold']}: its training cases may include this fold's validation cases, so this run's validation "
            f"Dice can be optimistic. Point {INIT_UNET_ENV_VAR} at the model folder to use each fold's own model.\n"
            + "#" * 80)
