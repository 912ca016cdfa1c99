"""The output folder of a run: its identity record, resumable state, and the checks that keep a folder from being
overwritten by a different run.

- ``pretrain_run.json``: written when a run starts; what identifies it (settings fingerprint, datasets, initial
  weights). A folder holding another run's record is refused; ``--c`` continues only the same run.
- ``pretrain_state.pth``: everything a resumed run needs (networks, optimizer, step), written atomically and read
  with ``torch.load(weights_only=True)``: tensors, numbers, strings and containers only.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..atomic_files import write_atomically

RUN_RECORD = "pretrain_run.json"
STATE_FILE = "pretrain_state.pth"
STATE_FORMAT = "nnunet_dino.pretrain_state/1"


class RunFolderError(ValueError):
    """The output folder cannot take this run; the message says why and what to do."""


def run_identity(settings_dict: dict, fingerprint: str, datasets: list[dict], initial_weights: dict) -> dict:
    return {"fingerprint": fingerprint, "settings": settings_dict,
            "datasets": [{k: d[k] for k in ("name", "configuration", "cases", "slices")} for d in datasets],
            "initial_weights": {k: initial_weights.get(k) for k in ("source", "sha256", "random")}}


def check_output_folder(folder: Path, identity: dict, resume: bool) -> bool:
    """Raise unless ``folder`` can take this run; returns whether a state to resume from exists. Writes nothing."""
    record = folder / RUN_RECORD
    if not folder.exists():
        if resume:
            raise RunFolderError(f"--c: {folder} does not exist, so there is no run to continue. Drop --c to start.")
        return False
    if not folder.is_dir():
        raise RunFolderError(f"The output path {folder} exists and is not a folder. Choose another -o.")
    if not record.is_file():
        visible = [p.name for p in folder.iterdir() if not p.name.startswith(".")]
        if visible:
            raise RunFolderError(
                f"The output folder {folder} is not empty ({sorted(visible)[:8]}) and holds no pretraining run "
                f"({RUN_RECORD} is missing). Nothing was written; choose an empty or new folder with -o.")
        if resume:
            raise RunFolderError(f"--c: {folder} holds no pretraining run to continue. Drop --c to start one.")
        return False
    previous = json.loads(record.read_text())
    differences = [k for k in ("fingerprint", "datasets", "initial_weights") if previous.get(k) != identity[k]]
    if differences:
        detail = _first_difference(previous, identity, differences)
        raise RunFolderError(
            f"The output folder {folder} holds a different pretraining run (its {', '.join(differences)} differ: "
            f"{detail}). Nothing was overwritten. Use another -o for this run, or the same settings with --c to "
            f"continue that one.")
    if not resume:
        raise RunFolderError(
            f"The output folder {folder} already holds this pretraining run. Add --c to continue it from its last "
            f"checkpoint, or choose another -o for a fresh run. Nothing was overwritten.")
    return (folder / STATE_FILE).is_file()


def _first_difference(previous: dict, identity: dict, keys: list[str]) -> str:
    key = keys[0]
    if key == "fingerprint":
        old, new = previous.get("settings", {}), identity["settings"]
        changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and k != "save_every"]
        return "settings " + ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
    return f"{key}: {previous.get(key)!r} -> {identity[key]!r}"


def write_run_record(folder: Path, identity: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(identity, indent=2)
    write_atomically(folder / RUN_RECORD, lambda p: Path(p).write_text(text), len(text))


def save_state(folder: Path, state: dict) -> None:
    state = {"format": STATE_FORMAT, **state}
    nbytes = sum(t.numel() * t.element_size() for t in _tensors(state))
    write_atomically(folder / STATE_FILE, lambda p: torch.save(state, p), nbytes,
                     advice="Free some space, then resume with the same command and --c.")


def load_state(folder: Path, fingerprint: str) -> dict:
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    if state.get("format") != STATE_FORMAT:
        raise RunFolderError(f"{folder / STATE_FILE} is not a state written by nnUNetv2_dino_pretrain "
                             f"(format {state.get('format')!r}).")
    if state.get("fingerprint") != fingerprint:
        raise RunFolderError(f"{folder / STATE_FILE} belongs to other settings than {RUN_RECORD} says; the folder was "
                             f"modified by hand. Start a fresh run in another folder.")
    return state


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def remove_stale_partials(folder: Path) -> None:
    """Temporary files of a run that was killed mid-write (never under a final name)."""
    for p in folder.glob(".*.partial-*"):
        if p.is_file():
            try:
                os.unlink(p)
            except OSError:
                pass
