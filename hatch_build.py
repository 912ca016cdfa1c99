"""Hatchling build hook: ship the nnU-Net trainer folder and the start-up hook with every wheel.

nnU-Net finds external trainers only through the folders listed in ``nnUNet_extTrainer``. The one-line
``nnunet_dino_ext_trainer.pth`` makes the interpreter run ``nnunet_dino._ext_trainer_env`` at start-up,
which appends our trainer folder to that variable. Both files are listed in the wheel's RECORD, so
``pip uninstall`` removes them. ``nnunet_dino.trainers`` (the variants' stable import path, for users' subclasses)
locates the folder through ``_ext_trainer_env.trainer_folder()`` too: a new target below must be added there.
"""
from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PTH_FILE = "nnunet_dino_ext_trainer.pth"


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version, build_data):
        if version == "editable":
            # The editable wheel already puts the repository on sys.path; the hook finds ./trainers there.
            build_data["force_include_editable"][PTH_FILE] = PTH_FILE
        else:
            build_data["force_include"][PTH_FILE] = PTH_FILE
            build_data["force_include"]["trainers"] = "nnunet_dino/_trainers"
