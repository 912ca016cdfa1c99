"""The start-up hook that makes nnU-Net find our trainers (nnUNet_extTrainer), and that it stays cheap."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

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
    """`python -X importtime -c pass`: the hook's cumulative import time (it includes the package __init__, which
    is imported nested inside it) < 50 ms."""
    res = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], env=_clean_env(), cwd="/",
                         capture_output=True, text=True, check=True)
    rows = {}
    for line in res.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|\s*(\S+)", line)
        if m:
            rows[m.group(3)] = int(m.group(2))
    assert "nnunet_dino._ext_trainer_env" in rows, res.stderr[-2000:]
    assert rows["nnunet_dino._ext_trainer_env"] >= rows.get("nnunet_dino", 0)  # cumulative includes the package
    assert rows["nnunet_dino._ext_trainer_env"] < 50_000, rows
    assert not any(name.split(".")[0] in ("torch", "numpy", "nnunetv2", "timm") for name in rows)
