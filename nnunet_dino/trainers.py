"""The plugin's nnU-Net trainer variants under one stable import path, to subclass in your own trainer folder::

    from nnunet_dino.trainers import nnUNetTrainerGuiDINO_CPUSmoke

    class nnUNetTrainerGuiDINO_CPUSmoke1epoch(nnUNetTrainerGuiDINO_CPUSmoke):
        epochs = 1

The variants are defined in the plugin's trainer folder (``./trainers`` in a checkout or an editable install,
``nnunet_dino/_trainers`` in a wheel: ``nnunet_dino._ext_trainer_env.trainer_folder()``). nnU-Net imports that
folder's files as *top-level* modules (``nnUNetTrainerGuiDINO``, ...) when it looks a trainer up through
``nnUNet_extTrainer``. This module imports them under exactly those names, so the classes here are the very objects
that nnU-Net's lookup returns in the same process (it reuses modules already in ``sys.modules``), not copies.

One caveat on identity: nnU-Net 2.8 drops the modules a lookup imported from ``sys.modules`` when the lookup ends.
If a plugin trainer was looked up by name *before* this module was first imported in a process, the class found then
and the one here are two objects (same file, same name). nnU-Net itself only goes by the name (checkpoints record
``trainer_name``), so this can only matter to your own ``is``/``issubclass`` checks: import this module first.

Importing this module imports torch and nnU-Net (the trainers need them); ``import nnunet_dino`` stays cheap.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import sys

from nnunet_dino._ext_trainer_env import trainer_folder as _trainer_folder


def _originates_from(module, folder: str) -> bool:
    file = getattr(module, "__file__", None)
    return file is not None and os.path.dirname(os.path.abspath(file)) == folder


def _load_trainer_modules(folder: str) -> dict:
    """Import every module of the trainer folder under its top-level name (reusing one already imported from there)."""
    names = [name for _, name, is_pkg in pkgutil.iter_modules([folder]) if not is_pkg]
    for name in names:
        loaded = sys.modules.get(name)
        if loaded is not None and not _originates_from(loaded, folder):
            raise ImportError(
                f"nnunet_dino.trainers: a module named {name!r} is already imported from "
                f"{getattr(loaded, '__file__', None) or loaded!r}, and it shadows the plugin's trainer module "
                f"{os.path.join(folder, name + '.py')}. Rename your file (e.g. in your nnUNet_extTrainer folder): "
                f"nnU-Net imports trainer files as top-level modules, so their names must not collide.")
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        return {name: importlib.import_module(name) for name in names}
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def _trainer_classes(modules: dict) -> dict:
    """Every public ``nnUNetTrainer*`` class defined in those modules, by name (names must be unique)."""
    found = {}
    for module in modules.values():
        for name, obj in vars(module).items():
            if isinstance(obj, type) and name.startswith("nnUNetTrainer") and obj.__module__ == module.__name__:
                if name in found and found[name] is not obj:
                    raise ImportError(f"nnunet_dino.trainers: trainer {name!r} is defined in both "
                                      f"{found[name].__module__} and {module.__name__}")
                found[name] = obj
    return found


FOLDER = _trainer_folder()
if FOLDER is None:
    raise ImportError("nnunet_dino.trainers: the plugin's trainer folder (nnunet_dino/_trainers in a wheel, ./trainers "
                      "in a checkout, marked by NNUNET_DINO_TRAINERS) is missing: reinstall nnunet-dino")
#: The trainer folder's modules, by their top-level module name (the same objects as ``sys.modules[name]``).
MODULES = _load_trainer_modules(FOLDER)
_CLASSES = _trainer_classes(MODULES)
globals().update(_CLASSES)
__all__ = sorted(_CLASSES)
