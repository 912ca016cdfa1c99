"""Atomic writes with a free-space check, for every file the plugin writes that a user relies on: training
checkpoints, exported DINO weight files, pretraining state and records.

``write(tmp)`` goes to a temporary file beside the target, which is then renamed over it. A failed or interrupted
write therefore never truncates an existing file (nnU-Net's in-place ``torch.save`` would) and never leaves a
partial file under the final name. Free space is checked first, and again after a failure, because torch reports a
full disk only as 'unexpected pos' / 'iostream error'. No imports from the plugin: every layer may use it.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Callable

HEADROOM_BYTES = 32 * 2 ** 20  # pickle framing, logging and the file system's own rounding


class NoSpaceLeftError(OSError):
    """The file could not be written for lack of disk space; the previous file of that name is intact."""


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _no_space_message(path: Path, needed: int, free: int, advice: str) -> str:
    return (f"No space left on device for {path}: about {needed / 2 ** 20:.0f} MB needed, "
            f"{free / 2 ** 20:.0f} MB free on the file system of {path.parent}. The previous {path.name} (if any) is "
            f"intact. {advice}").rstrip()


def write_atomically(path: str | os.PathLike, write: Callable[[str], None], expected_bytes: int,
                     advice: str = "Free some space and run again.") -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it over ``path``; ``advice`` ends the
    message of a full disk (what the user should do)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    needed = expected_bytes + HEADROOM_BYTES
    free = free_bytes(path.parent)
    if free < needed:
        raise NoSpaceLeftError(errno.ENOSPC, _no_space_message(path, needed, free, advice))
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException as e:
        free = free_bytes(path.parent)  # measured with the partial file still there
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception) and not isinstance(e, NoSpaceLeftError) and free < HEADROOM_BYTES:
            # The disk filled up during the write (torch reports it as 'unexpected pos' / 'iostream error').
            raise NoSpaceLeftError(errno.ENOSPC, _no_space_message(path, needed, free, advice)) from e
        raise
