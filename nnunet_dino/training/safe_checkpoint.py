"""Loading an nnU-Net checkpoint (``checkpoint_final.pth`` ...) without running code from it.

Stock nnU-Net loads checkpoints with ``torch.load(weights_only=False)``, i.e. full pickle: a crafted file whose
objects define ``__reduce__`` runs any command while it is read (audit C6/C7: a ``touch`` ran, and prediction then
finished normally). For stock nnU-Net a model folder from someone else is therefore code, not data.

The plugin's own tools read checkpoints with ``torch.load(weights_only=True)``: PyTorch's restricted unpickler,
which builds only tensors, containers, numbers, strings and explicitly allowed types. What a real nnU-Net or plugin
checkpoint needs beyond PyTorch's defaults (found by ``torch.serialization.get_unsafe_globals_in_checkpoint`` on
GuiDINO/MedDINOv3 checkpoints written by nnU-Net's ``save_checkpoint``): numpy scalars in the training log
(``np.float32`` Dice values, ``_best_ema``) and their numeric dtypes. Everything else (``torch.device`` in
``init_args``, tuples, ``None``, plain dicts) is allowed by PyTorch already. A file that needs anything more is refused
before any of it is built, naming what it asked for.
"""
from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path

# Keys nnU-Net's save_checkpoint writes that prediction reads.
REQUIRED_KEYS = ("network_weights", "trainer_name", "init_args")


class UnsafeCheckpointError(RuntimeError):
    """The checkpoint needs more than tensors, containers, numbers, strings and numpy scalars to load; ``needs``
    names what it asked for."""

    def __init__(self, message: str, needs: str = ""):
        super().__init__(message)
        self.needs = needs


def _numpy_scalar_globals() -> list:
    """numpy's scalar constructor and numeric dtype classes, under numpy 2's and numpy 1's module names (a checkpoint
    written under numpy 1 names ``numpy.core.multiarray.scalar``).

    ``scalar(dtype, bytes)`` only reinterprets raw bytes as a number of that dtype. Object dtypes are not allowed
    (their class is not listed), so a numpy scalar cannot smuggle an arbitrary Python object in."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    numeric = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
               np.float16, np.float32, np.float64, np.longdouble, np.complex64, np.complex128]
    dtype_classes = sorted({type(np.dtype(t)) for t in numeric}, key=lambda c: c.__name__)
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
            np.dtype, *dtype_classes]


def _unknown_globals(source, error: Exception) -> list[str]:
    """What the pickle names beyond the allowed types: the globals it references (scanned from its opcodes, so
    nothing is built) and the classes the unpickler refused (named in its error)."""
    import torch

    allowed = {"numpy.dtype", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"}
    allowed |= {f"{c.__module__}.{c.__name__}" for c in _numpy_scalar_globals() if isinstance(c, type)}
    try:
        scanned = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(source) if n not in allowed]
    except Exception:  # noqa: BLE001 - only used to make the message more precise (e.g. not a zip checkpoint)
        scanned = []
    text = str(error)
    refused = re.findall(r"GLOBAL (\S+) was not an allowed global", text) + re.findall(r"but got <class '([^']+)'>",
                                                                                      text)
    return list(dict.fromkeys(scanned + refused))


def load_checkpoint_safely(path: str | os.PathLike, map_location="cpu", data: bytes | None = None,
                           required_keys: tuple[str, ...] = REQUIRED_KEYS) -> dict:
    """The checkpoint at ``path`` as a dict, loaded with ``weights_only=True`` (see the module doc); from ``data``
    (the file's bytes, e.g. those just hashed) when given. Raises FileNotFoundError if it is missing and
    UnsafeCheckpointError if it needs any other type or lacks ``required_keys``; no code from the file runs."""
    import torch

    path = Path(path)
    if data is None and not path.is_file():
        raise FileNotFoundError(f"No checkpoint {path}.")
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            checkpoint = torch.load(io.BytesIO(data) if data is not None else path, map_location=map_location,
                                    weights_only=True)
    except pickle.UnpicklingError as e:
        unknown = _unknown_globals(io.BytesIO(data) if data is not None else path, e)
        needs = ", ".join(unknown) if unknown else f"what PyTorch refuses: {str(e).splitlines()[-1][:300]}"
        raise UnsafeCheckpointError(
            f"Refusing to load {path}: it needs more than tensors, numbers, strings, containers and numpy scalars "
            f"(it names {needs}). An nnU-Net checkpoint never needs that; a file that does may run code when loaded "
            f"with full pickle, as stock nnU-Net does (nnUNetv2_predict: torch.load(weights_only=False)). Nothing "
            f"from it was run. Treat model folders from others as code: use only checkpoints from a source you "
            f"trust, and do not pass this one to stock nnU-Net either.", needs) from None
    missing = [k for k in required_keys if k not in checkpoint] if isinstance(checkpoint, dict) else required_keys
    if missing:
        found = sorted(map(str, checkpoint))[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise UnsafeCheckpointError(f"{path} is not an nnU-Net checkpoint: it lacks {list(missing)} (found: {found}).")
    return checkpoint
