"""Mixed-precision choice for the plugin's trainers: nnU-Net's fp16 autocast + GradScaler (the default), or bf16.

nnU-Net 2.8 trains on CUDA under ``torch.autocast('cuda', enabled=True)``, i.e. in the autocast dtype of the
current thread (fp16 unless changed), with a ``GradScaler``; on CPU it does not autocast at all. ``BF16Mixin`` keeps
nnU-Net's own ``train_step`` and ``validation_step`` untouched and only changes two things around them:

- the thread's autocast dtype for the trainer's device is bfloat16 while they run (restored afterwards), so
  nnU-Net's ``autocast(self.device.type, enabled=True)`` (and GuiDINO's guide-reliance forward, which autocasts the
  same way) computes in bf16;
- no ``GradScaler`` (``self.grad_scaler = None``): bf16 has fp32's exponent range, gradients neither underflow nor
  overflow where fp32's would not, and nnU-Net's train_step then takes its plain ``backward`` / clip / ``step`` path.
  Checkpoints store ``grad_scaler_state: None``, as nnU-Net does on CPU; a bf16 run resumes from an fp16 run's
  checkpoint and vice versa (the scaler state is simply not used / starts fresh).

Not changed: nnU-Net's final validation (``perform_actual_validation``) and ``nnUNetv2_predict`` keep nnU-Net's
fp16 inference autocast, so a bf16-trained model is validated exactly as it will be predicted. Use the ``_bf16``
variants (``nnUNetTrainerGuiDINO_bf16``, ...) on GPUs with native bf16 (compute capability >= 8.0: A100, H100, L4,
RTX 30xx/40xx); older GPUs emulate it slowly, and the trainer says so at the start. docs/gpu.md has the details.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


def get_autocast_dtype(device_type: str) -> torch.dtype:
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


def set_autocast_dtype(device_type: str, dtype: torch.dtype) -> None:
    if hasattr(torch, "set_autocast_dtype"):  # torch >= 2.4
        torch.set_autocast_dtype(device_type, dtype)
    elif device_type == "cuda":
        torch.set_autocast_gpu_dtype(dtype)
    else:
        torch.set_autocast_cpu_dtype(dtype)


@contextmanager
def autocast_dtype(device_type: str, dtype: torch.dtype | None) -> Iterator[None]:
    """Within the block, ``torch.autocast(device_type)`` without an explicit dtype uses ``dtype`` (None: unchanged).
    The setting is per thread, as autocast itself."""
    if dtype is None:
        yield
        return
    previous = get_autocast_dtype(device_type)
    set_autocast_dtype(device_type, dtype)
    try:
        yield
    finally:
        set_autocast_dtype(device_type, previous)


class AutocastPrecisionMixin:
    """Put first in a trainer's bases: ``class X_bf16(BF16Mixin, X)``. ``autocast_dtype`` None keeps nnU-Net's
    dtype; ``use_grad_scaler`` False drops nnU-Net's GradScaler."""
    autocast_dtype: torch.dtype | None = None
    use_grad_scaler: bool = True

    # nnU-Net's exact signature: its __init__ records the arguments by name (checkpoint 'init_args').
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if not self.use_grad_scaler:
            self.grad_scaler = None

    def precision_scope(self):
        """The autocast dtype of this trainer's device while nnU-Net's training and online-validation steps run."""
        return autocast_dtype(self.device.type, self.autocast_dtype)

    def describe_precision(self) -> str:
        if self.device.type != "cuda":
            return (f"{self.device.type}: no autocast (nnU-Net autocasts on CUDA only), fp32; "
                    f"GradScaler {'on' if self.grad_scaler is not None else 'off'}")
        dtype = self.autocast_dtype or get_autocast_dtype("cuda")
        return (f"autocast {str(dtype).replace('torch.', '')} in training steps, "
                f"GradScaler {'on' if self.grad_scaler is not None else 'off'}; final validation and "
                f"nnUNetv2_predict: nnU-Net's fp16 autocast")

    def on_train_start(self):
        super().on_train_start()
        self.print_to_log_file(f"Mixed precision: {self.describe_precision()}.")
        if self.autocast_dtype is torch.bfloat16 and self.device.type == "cuda" and not _native_bf16():
            self.print_to_log_file(
                "WARNING: this GPU has no native bfloat16 (compute capability < 8.0): bf16 is emulated and slow. "
                "Use the trainer without _bf16 (fp16 autocast + GradScaler) on this GPU.")

    def train_step(self, batch: dict) -> dict:
        with self.precision_scope():
            return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        with self.precision_scope():
            return super().validation_step(batch)


class BF16Mixin(AutocastPrecisionMixin):
    """bfloat16 autocast, no GradScaler (module doc)."""
    autocast_dtype = torch.bfloat16
    use_grad_scaler = False


def _native_bf16() -> bool:
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no including_emulation: ask for compute capability >= 8.0
        return torch.cuda.get_device_capability()[0] >= 8
