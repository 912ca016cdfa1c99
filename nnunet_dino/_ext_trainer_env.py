"""Runs at interpreter start-up (via nnunet_dino_ext_trainer.pth) and makes nnU-Net see our trainers.

nnU-Net v2.8 looks for trainer classes it does not ship in the folders listed in ``nnUNet_extTrainer``
(``os.pathsep``-separated). We append our folder, keeping whatever the user already set first, and do
nothing else: no torch import, no file I/O beyond two ``isfile`` calls.
"""
import os

ENV_VAR = "nnUNet_extTrainer"
_MARKER = "NNUNET_DINO_TRAINERS"  # present in our trainer folder, so we never register someone else's


def trainer_folder():
    """The folder holding nnunet-dino's trainer modules: inside the installed package for a regular
    install, ./trainers in the repository for an editable install or a source checkout. ``nnunet_dino.trainers``
    imports the variants from here (for subclassing in a user's own trainer folder)."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(package_dir, "_trainers"), os.path.join(os.path.dirname(package_dir), "trainers")):
        if os.path.isfile(os.path.join(candidate, _MARKER)):
            return candidate
    return None


def register(environ=os.environ):
    folder = trainer_folder()
    if folder is None:
        return None
    current = [p for p in environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]
    if not any(os.path.abspath(p) == folder for p in current):
        environ[ENV_VAR] = os.pathsep.join(current + [folder])
    return folder


try:
    register()
except Exception:  # noqa: BLE001 - a start-up hook must never stop the interpreter
    pass
