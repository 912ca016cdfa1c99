"""The start-up hook that makes nnU-Net find our trainers (nnUNet_extTrainer), and that it stays cheap; the stable
import path of the trainer variants (nnunet_dino.trainers), for subclassing them in a user's own trainer folder."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_dino import _ext_trainer_env

REPO = Path(__file__).resolve().parents[1]
TRAINERS = REPO / "trainers"
VAR = _ext_trainer_env.ENV_VAR


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != VAR}
    env.update(extra)
    return env


def test_trainer_folder_is_the_repository_trainers_folder():
    assert VAR == "nnUNet_extTrainer"
    assert Path(_ext_trainer_env.trainer_folder()) == TRAINERS
    assert (TRAINERS / "NNUNET_DINO_TRAINERS").is_file()


def test_register_appends_when_unset():
    env = {}
    assert _ext_trainer_env.register(env) == str(TRAINERS)
    assert env == {VAR: str(TRAINERS)}


def test_register_keeps_the_users_folders_first_and_does_not_duplicate(tmp_path):
    user = os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")])
    env = {VAR: user}
    _ext_trainer_env.register(env)
    assert env[VAR].split(os.pathsep) == [str(tmp_path / "a"), str(tmp_path / "b"), str(TRAINERS)]
    _ext_trainer_env.register(env)
    _ext_trainer_env.register(env)
    assert env[VAR].split(os.pathsep).count(str(TRAINERS)) == 1
    # Already listed by the user (even in a non-normalised spelling): left exactly as the user wrote it.
    spelled = os.pathsep.join([str(TRAINERS / ".." / "trainers"), str(tmp_path / "a")])
    env = {VAR: spelled}
    _ext_trainer_env.register(env)
    assert env[VAR] == spelled


def test_register_ignores_empty_entries(tmp_path):
    env = {VAR: os.pathsep + str(tmp_path) + os.pathsep}
    _ext_trainer_env.register(env)
    assert env[VAR].split(os.pathsep) == [str(tmp_path), str(TRAINERS)]


def test_hook_registers_at_interpreter_start_without_torch():
    code = "import os, sys; print(os.environ['nnUNet_extTrainer']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(), cwd="/", capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[0] == str(TRAINERS) and out[1] == "False"


def test_hook_appends_to_the_users_value_at_start(tmp_path):
    code = "import os; print(os.environ['nnUNet_extTrainer'])"
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(**{VAR: str(tmp_path)}), cwd="/",
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out.split(os.pathsep) == [str(tmp_path), str(TRAINERS)]


def test_hook_import_is_cheap():
    """`python -X importtime -c pass`: the hook imports nothing heavy (no torch/numpy/nnU-Net/timm), and its
    cumulative import time (including the package __init__, imported nested inside it) stays far below one heavy
    import. Measured ~5 ms idle; the bound is loose because this CI machine's load varies 10x, and a heavy import
    (torch: seconds) would exceed it anyway."""
    res = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], env=_clean_env(), cwd="/",
                         capture_output=True, text=True, check=True)
    rows = {}
    for line in res.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|\s*(\S+)", line)
        if m:
            rows[m.group(3)] = int(m.group(2))
    assert "nnunet_dino._ext_trainer_env" in rows, res.stderr[-2000:]
    assert rows["nnunet_dino._ext_trainer_env"] >= rows.get("nnunet_dino", 0)  # cumulative includes the package
    assert rows["nnunet_dino._ext_trainer_env"] < 500_000, rows
    assert not any(name.split(".")[0] in ("torch", "numpy", "nnunetv2", "timm") for name in rows)


# ---------------------------------------------------------------------------------------------- nnunet_dino.trainers
def _classes_defined_in(folder: Path) -> set:
    """Every nnUNetTrainer* class statement in the trainer folder's files (read with ast, independently of the module
    under test)."""
    import ast

    names = set()
    for file in folder.glob("*.py"):
        names |= {node.name for node in ast.parse(file.read_text()).body
                  if isinstance(node, ast.ClassDef) and node.name.startswith("nnUNetTrainer")}
    return names


def test_trainers_module_exports_every_variant_as_the_class_nnunet_finds():
    import nnunet_dino.trainers as trainers
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    defined = _classes_defined_in(TRAINERS)
    assert len(defined) > 40 and set(trainers.__all__) == defined  # a variant added in trainers/ is exported too
    assert Path(trainers.FOLDER) == TRAINERS
    for name in ("nnUNetTrainerGuiDINO_CPUSmoke", "nnUNetTrainerSegDINOv2_CPUSmoke", "nnUNetTrainerMedDINOv3_CPUSmoke"):
        cls = getattr(trainers, name)
        # The same object, not a second copy of the file: nnU-Net imports the folder's files as top-level modules.
        assert recursive_find_trainer_class_by_name(name) is cls
        assert sys.modules[cls.__module__] is trainers.MODULES[cls.__module__]
        assert Path(sys.modules[cls.__module__].__file__).parent == TRAINERS
    assert str(TRAINERS) not in sys.path  # the folder is put on sys.path only while importing


def test_trainers_module_refuses_a_user_module_shadowing_a_plugin_trainer_file(tmp_path, monkeypatch):
    """A user's trainer file named like one of ours (nnU-Net imports both as the top-level module of that name) is
    refused with a message saying what to rename, instead of an obscure 'cannot import name'."""
    import importlib
    import types

    impostor = types.ModuleType("nnUNetTrainerGuiDINO")
    impostor.__file__ = str(tmp_path / "nnUNetTrainerGuiDINO.py")
    monkeypatch.setitem(sys.modules, "nnUNetTrainerGuiDINO", impostor)
    monkeypatch.delitem(sys.modules, "nnunet_dino.trainers", raising=False)
    try:
        with pytest.raises(ImportError, match=r"already imported from .*shadows the plugin's trainer module.*Rename"):
            importlib.import_module("nnunet_dino.trainers")
    finally:
        sys.modules.pop("nnunet_dino.trainers", None)  # a later import starts clean


USER_TRAINER = '''
from nnunet_dino.trainers import nnUNetTrainerGuiDINO_CPUSmoke


class nnUNetTrainerGuiDINO_CPUSmoke1epoch(nnUNetTrainerGuiDINO_CPUSmoke):
    epochs = 1
'''

LOOKUP = r'''
import json, os, sys
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find
user = find("nnUNetTrainerGuiDINO_CPUSmoke1epoch")
import nnunet_dino.trainers as trainers
plugin = find("nnUNetTrainerGuiDINO_CPUSmoke")
print("RESULT " + json.dumps({
    "ext": os.environ["nnUNet_extTrainer"], "epochs": [user.epochs, plugin.epochs],
    "iterations": [user.iterations_per_epoch, plugin.iterations_per_epoch],
    "parent_is_plugin_class": user.__bases__ == (trainers.nnUNetTrainerGuiDINO_CPUSmoke,),
    "plugin_is_export": plugin is trainers.nnUNetTrainerGuiDINO_CPUSmoke,
    "plugin_file": sys.modules[plugin.__module__].__file__}))
'''


def _result(stdout: str) -> dict:
    import json

    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, stdout[-3000:]
    return json.loads(lines[0][len("RESULT "):])


def test_user_variant_in_own_ext_folder_is_found_by_nnunet(tmp_path):
    """The documented recipe (docs/custom_trainers.md): subclass a plugin variant in your own nnUNet_extTrainer folder.
    In a fresh interpreter the .pth hook appends the plugin's folder after the user's, nnU-Net's lookup finds the
    subclass in the user's folder and the plugin's variant in the plugin's, and the subclass's parent is that very
    class."""
    user = tmp_path / "my_trainers"
    user.mkdir()
    (user / "my_variants.py").write_text(USER_TRAINER)
    res = subprocess.run([sys.executable, "-c", LOOKUP], env=_clean_env(**{VAR: str(user)}), cwd="/",
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"Using trainer 'nnUNetTrainerGuiDINO_CPUSmoke1epoch' from: {user}" in res.stdout
    # nnU-Net finds the plugin's name already in the user's folder (my_variants.py imported it): it must be the very
    # class of the plugin's folder, not a second copy of its file.
    assert f"Using trainer 'nnUNetTrainerGuiDINO_CPUSmoke' from: {user}" in res.stdout
    out = _result(res.stdout)
    assert out["ext"].split(os.pathsep) == [str(user), str(TRAINERS)]
    assert out["epochs"] == [1, 3] and out["iterations"] == [12, 12]  # one attribute changed, the rest inherited
    assert out["parent_is_plugin_class"] and out["plugin_is_export"]
    assert Path(out["plugin_file"]).parent == TRAINERS


def _wheel_layout(site: Path) -> Path:
    """Lay out the files as hatch_build.py maps them into a regular (non-editable) wheel: the nnunet_dino package,
    plus its force_include entries (the trainer folder as nnunet_dino/_trainers, the .pth at the top). The hook's
    own mapping is used (hatchling itself is not needed, nor installed here)."""
    import importlib.util
    import shutil
    import types

    fake = {name: types.ModuleType(name) for name in
            ("hatchling", "hatchling.builders", "hatchling.builders.hooks", "hatchling.builders.hooks.plugin",
             "hatchling.builders.hooks.plugin.interface")}
    fake["hatchling.builders.hooks.plugin.interface"].BuildHookInterface = object
    saved = {name: sys.modules.get(name) for name in fake}
    sys.modules.update(fake)
    try:
        spec = importlib.util.spec_from_file_location("_nnunet_dino_hatch_build", REPO / "hatch_build.py")
        hook = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(hook)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    build_data = {"force_include": {}, "force_include_editable": {}}
    hook.CustomBuildHook().initialize("standard", build_data)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "nnunet_dino", site / "nnunet_dino", ignore=ignore)
    for source, target in build_data["force_include"].items():
        if (REPO / source).is_dir():
            shutil.copytree(REPO / source, site / target, ignore=ignore)
        else:
            shutil.copy(REPO / source, site / target)
    return site / "nnunet_dino" / "_trainers"


def test_trainers_import_path_works_in_a_wheel_layout(tmp_path):
    """After a regular install the trainer folder is nnunet_dino/_trainers and no ./trainers exists: the same import
    path and lookup work, from the package's copy."""
    site = tmp_path / "site-packages"
    folder = _wheel_layout(site)
    assert (folder / "NNUNET_DINO_TRAINERS").is_file() and (site / "nnunet_dino_ext_trainer.pth").is_file()
    user = tmp_path / "my_trainers"
    user.mkdir()
    (user / "my_variants.py").write_text(USER_TRAINER)
    # PYTHONPATH precedes site-packages, so the venv's .pth hook (run at start-up) imports the copy's nnunet_dino.
    code = "import nnunet_dino; print('PACKAGE', nnunet_dino.__file__)\n" + LOOKUP
    res = subprocess.run([sys.executable, "-c", code], env=_clean_env(**{VAR: str(user), "PYTHONPATH": str(site)}),
                         cwd="/", capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"PACKAGE {site / 'nnunet_dino' / '__init__.py'}" in res.stdout
    out = _result(res.stdout)
    assert out["ext"].split(os.pathsep) == [str(user), str(folder)]
    assert out["epochs"] == [1, 3] and out["parent_is_plugin_class"] and out["plugin_is_export"]
    assert Path(out["plugin_file"]).parent == folder
