"""nnUNet_dino_cpu_threads: caps the torch threads of the plugin's CPU trainings (nnUNetv2_train -device cpu would
take every core). A bad value is refused with what to set instead; unset means nnU-Net's own choice."""
from __future__ import annotations

import pytest

from nnunet_dino.training.dino_trainer_base import CPU_THREADS_ENV_VAR, cpu_threads_setting


@pytest.mark.parametrize("value,expected", [("", None), ("1", 1), (" 3 ", 3)])
def test_valid_settings(monkeypatch, value, expected):
    monkeypatch.setenv(CPU_THREADS_ENV_VAR, value)
    assert cpu_threads_setting() == expected


def test_unset_leaves_nnunets_choice(monkeypatch):
    monkeypatch.delenv(CPU_THREADS_ENV_VAR, raising=False)
    assert cpu_threads_setting() is None


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_settings_are_refused_with_the_fix(monkeypatch, value):
    monkeypatch.setenv(CPU_THREADS_ENV_VAR, value)
    with pytest.raises(ValueError, match=f"{CPU_THREADS_ENV_VAR}=.*positive number of CPU threads"):
        cpu_threads_setting()
