"""Settings of a pretraining run: what the method does, kept apart from the code that does it.

A run is a sequence of stages (DINOv3's recipe, as MedDINOv3 used it):

- ``dino``: DINOv2-style self-distillation: DINO CLS-token loss over global and local crops with Sinkhorn-Knopp
  centred teacher targets, iBOT masked-patch loss on block-masked global crops, KoLeo on the student's CLS tokens.
- ``gram``: the same losses plus Gram anchoring: the student's patch-similarity (Gram) matrix on the global crops is
  kept close to that of a frozen snapshot of the EMA teacher taken when the stage starts (DINOv3 section 4).
- ``highres``: high-resolution adaptation: larger global crops (more tokens), Gram anchoring kept on.

Every number below is a default the CLI can change; docs/pretraining.md lists them with the reasons. Deviations from
Meta's recipes (smaller prototype counts, shorter schedules) are sized for datasets of thousands, not millions, of
slices and for a single GPU or CPU.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

STAGE_NAMES = ("dino", "gram", "highres")


@dataclass(frozen=True)
class StageSettings:
    name: str
    steps: int
    lr: float  # peak AdamW learning rate (after warm-up), for the batch size of the run
    min_lr: float  # cosine decay ends here
    warmup_steps: int
    global_tokens: int  # short side of a global crop in ViT tokens (trainers feed 16: min_short_side_tokens)
    local_tokens: int  # short side of a local crop in tokens
    global_crop_scale: tuple[float, float]  # area fraction of the slice a global crop covers
    local_crop_scale: tuple[float, float]
    n_local_crops: int
    gram_weight: float  # 0: no Gram anchoring in this stage
    teacher_momentum: tuple[float, float]  # EMA momentum, cosine from first to second value over the stage
    teacher_temp: tuple[float, float]  # teacher temperature, linear warm-up over warmup_steps
    crop_extent: float = 1.0  # global crops in voxels: the plans' patch size times this (high-res: larger views)

    def __post_init__(self):
        if self.name not in STAGE_NAMES:
            raise ValueError(f"Unknown stage {self.name!r}; stages are {', '.join(STAGE_NAMES)}.")
        if self.steps < 1:
            raise ValueError(f"Stage {self.name}: steps must be >= 1, got {self.steps}.")
        if self.global_tokens < 2 or self.local_tokens < 1:
            raise ValueError(f"Stage {self.name}: global_tokens >= 2 and local_tokens >= 1 needed.")
        for lo, hi in (self.global_crop_scale, self.local_crop_scale):
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"Stage {self.name}: crop scales must satisfy 0 < low <= high <= 1.")


def default_stage(name: str, steps: int | None = None) -> StageSettings:
    """The documented defaults of each stage (docs/pretraining.md)."""
    common = dict(lr=5e-4, min_lr=1e-6, global_tokens=16, local_tokens=6, global_crop_scale=(0.32, 1.0),
                  local_crop_scale=(0.05, 0.32), n_local_crops=4, teacher_momentum=(0.992, 1.0),
                  teacher_temp=(0.04, 0.07))
    if name == "dino":
        return StageSettings("dino", steps or 1000, warmup_steps=max(1, (steps or 1000) // 10), gram_weight=0.0,
                             **common)
    if name == "gram":
        # DINOv3 restarts from the stage-1 teacher with a lower lr; the Gram teacher is that same teacher.
        return StageSettings("gram", steps or 300, warmup_steps=max(1, (steps or 300) // 20), gram_weight=1.0,
                             **{**common, "lr": 2.5e-4, "teacher_momentum": (0.996, 1.0),
                                "teacher_temp": (0.07, 0.07)})
    if name == "highres":
        return StageSettings("highres", steps or 200, warmup_steps=max(1, (steps or 200) // 20), gram_weight=1.0,
                             crop_extent=2.0,
                             **{**common, "lr": 1e-4, "global_tokens": 32, "local_tokens": 8,
                                "teacher_momentum": (0.996, 1.0), "teacher_temp": (0.07, 0.07)})
    raise ValueError(f"Unknown stage {name!r}; stages are {', '.join(STAGE_NAMES)}.")


@dataclass(frozen=True)
class PretrainSettings:
    arch: str
    stages: tuple[StageSettings, ...]
    batch_size: int = 16  # slices per step and process (each gives 2 global + n_local crops)
    dino_prototypes: int = 4096  # Meta: 65536 (v2) / 262144 (v3) for 142M-1.7B images; 4096 suits 1e3-1e5 slices
    ibot_prototypes: int = 4096
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    student_temp: float = 0.1
    sinkhorn_iterations: int = 3
    koleo_weight: float = 0.1
    ibot_weight: float = 1.0
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # fraction of tokens block-masked per masked global crop
    mask_probability: float = 0.5  # fraction of global crops that are masked
    weight_decay: float = 0.04
    clip_grad: float = 3.0
    drop_path_rate: float = 0.1  # student only; the teacher and the exported weights run without it
    freeze_last_layer_steps: int = 0  # steps the heads' last layers stay fixed (DINO's stabiliser; 0: never)
    seed: int = 0
    bf16: bool = False  # autocast in bfloat16 (GPUs); CPU runs stay float32
    ct_intensity: str = "hu"  # CTIntensity mode used by the trainers' input adapter
    save_every: int = 50  # steps between resumable checkpoints
    extra: dict = field(default_factory=dict)  # recorded, not interpreted (e.g. excluded cases)

    def __post_init__(self):
        if not self.stages:
            raise ValueError("At least one stage is needed.")
        if any(s.gram_weight > 0 for s in self.stages) and self.mask_probability >= 1:
            raise ValueError("Gram anchoring compares unmasked global crops: mask_probability must be < 1.")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (KoLeo and the DINO loss need at least two samples).")

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def stage_at(self, step: int) -> tuple[int, StageSettings, int]:
        """(stage index, stage, step within the stage) of global step ``step`` (0-based)."""
        start = 0
        for i, s in enumerate(self.stages):
            if step < start + s.steps:
                return i, s, step - start
            start += s.steps
        raise IndexError(f"step {step} is past the last stage ({self.total_steps} steps).")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """What identifies a run: everything but the checkpoint cadence."""
        d = self.to_dict()
        d.pop("save_every")
        return json.dumps(d, sort_keys=True)
