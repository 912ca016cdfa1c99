"""The pretraining loop: student, EMA teacher, Gram teacher, one optimisation step at a time, stage by stage.

Reproducibility: every random draw of step s (slices, crops, augmentations, iBOT masks via lightly's use of
``random``, drop path) is seeded from (seed, s, rank) at the start of the step, so a run resumed from the state
saved after step s takes exactly the steps an uninterrupted run takes (bit-identical on the same machine).

DDP (torchrun): the student is wrapped in DistributedDataParallel; each process draws its own batch (the seed
includes the rank), the teacher and Gram teacher are updated identically everywhere (EMA of identical students),
Sinkhorn-Knopp reduces its sums over processes, and only rank 0 writes files.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from lightly.models.utils import random_block_mask, update_momentum

from ..backbone import CTIntensity, DinoBackbone, DinoInputAdapter, get_architecture
from .config import PretrainSettings, StageSettings
from .crops import MultiCropGeometry, multi_crop
from .data import PretrainDataError, SliceSource
from .losses import LOSS_NAMES, PretrainObjective
from .network import PretrainNetwork
from .run_log import RunLog
from .run_folder import load_state, save_state
from .schedules import learning_rate, teacher_momentum, teacher_temperature

log = logging.getLogger("nnunet_dino")


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def crop_geometry(stage: StageSettings, patch_size: tuple[int, int]) -> MultiCropGeometry:
    """Global crops: the trainers' patch (times the stage's crop extent); local crops: the same shape scaled by
    local_tokens / global_tokens, so a local crop is a small view at a similar voxel-per-token density."""
    global_hw = tuple(max(1, round(s * stage.crop_extent)) for s in patch_size)
    local_hw = tuple(max(1, round(s * stage.local_tokens / stage.global_tokens)) for s in global_hw)
    return MultiCropGeometry(global_hw, local_hw, stage.global_crop_scale, stage.local_crop_scale,
                             stage.n_local_crops)


def build_adapters(stage: StageSettings, source: SliceSource, arch, pretraining: str, ct_mode: str
                   ) -> tuple[DinoInputAdapter, DinoInputAdapter, MultiCropGeometry]:
    """The trainers' input adapter (same channels, intensity mapping and upsampling rule) for the global and local
    crop sizes of ``stage``."""
    d = source.datasets[0]
    geo = crop_geometry(stage, d.patch_size)

    def adapter(hw, tokens):
        return DinoInputAdapter(d.num_channels, arch.patch_size, hw, tokens, d.normalization_schemes, pretraining,
                                d.intensity_properties, CTIntensity(mode=ct_mode)).eval()

    return adapter(geo.global_hw, stage.global_tokens), adapter(geo.local_hw, stage.local_tokens), geo


def _step_seed(seed: int, step: int, rank: int) -> int:
    return ((seed * 1_000_003 + step) * 1024 + rank) % (2 ** 63 - 1)


def _seed_everything(s: int) -> torch.Generator:
    torch.manual_seed(s)
    random.seed(s)  # lightly's random_block_mask draws from Python's random
    np.random.seed(s % (2 ** 32))
    return torch.Generator().manual_seed(s)


def _param_groups(model: nn.Module) -> tuple[list, list]:
    """Weights of linear/conv layers decay; biases, norms, LayerScale gammas and tokens do not (DINOv2)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("token", "gamma_1", "gamma_2", "pos_embed")) else decay).append(p)
    return decay, no_decay


class Pretrainer:
    def __init__(self, settings: PretrainSettings, source: SliceSource, initial_backbone: DinoBackbone,
                 out_folder: Path, device: torch.device, dist_info: Distributed = Distributed(),
                 pretraining: str | None = None):
        """``initial_backbone``: the loaded (or randomly initialised) ViT, without drop path; ``pretraining``: the
        intensity convention of the exported weights (default: the architecture's, which is what load_backbone
        reports for the exported file)."""
        self.settings = settings
        self.source = source
        self.arch = get_architecture(settings.arch)
        self.out = Path(out_folder)
        self.device = device
        self.dist = dist_info
        self.pretraining = pretraining or self.arch.default_pretraining
        per_step = settings.batch_size * dist_info.world_size
        if len(source) < per_step:
            raise PretrainDataError(
                f"{len(source)} slice(s) in {', '.join(d.name for d in source.datasets)} but a step draws "
                f"{settings.batch_size} slices per process x {dist_info.world_size} process(es) = {per_step}. Lower "
                f"--batch_size to at most {max(2, len(source) // dist_info.world_size)}, or add data.")
        torch.manual_seed(settings.seed)  # the heads' initialisation
        student_backbone = DinoBackbone(self.arch, settings.drop_path_rate)
        student_backbone.vit.load_state_dict(initial_backbone.vit.state_dict())
        self.student = PretrainNetwork(student_backbone, settings.dino_prototypes, settings.ibot_prototypes,
                                       settings.head_hidden_dim, settings.head_bottleneck_dim).to(device)
        self.teacher = self._frozen_copy(self.student)
        self.gram_teacher: PretrainNetwork | None = None
        self.objective = PretrainObjective(settings.dino_prototypes, settings.ibot_prototypes, settings.student_temp,
                                           settings.sinkhorn_iterations, settings.ibot_weight,
                                           settings.koleo_weight).to(device)
        decay, no_decay = _param_groups(self.student)
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=settings.stages[0].lr,
                                           betas=(0.9, 0.999))
        self.trained = self.student
        if dist_info.world_size > 1:
            self.trained = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[device.index] if device.type == "cuda" else None)
        self.step = 0
        self._adapters: dict[int, tuple] = {}
        self.log: RunLog | None = None

    def _frozen_copy(self, net: PretrainNetwork) -> PretrainNetwork:
        # A fresh instance (lightly's weight-normed heads cannot be deep-copied), then the student's values.
        s = self.settings
        copy = PretrainNetwork(DinoBackbone(self.arch, 0.0), s.dino_prototypes, s.ibot_prototypes,
                               s.head_hidden_dim, s.head_bottleneck_dim).to(self.device)
        copy.load_state_dict(net.state_dict())
        for p in copy.parameters():
            p.requires_grad_(False)
        return copy.eval()

    # ------------------------------------------------------------------------------------------ state
    def state(self) -> dict:
        return {"fingerprint": self.settings.fingerprint(), "step": self.step,
                "student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "gram_teacher": None if self.gram_teacher is None else self.gram_teacher.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def resume(self) -> None:
        state = load_state(self.out, self.settings.fingerprint())
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        if state["gram_teacher"] is not None:
            self.gram_teacher = self._frozen_copy(self.teacher)
            self.gram_teacher.load_state_dict(state["gram_teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])

    def save(self) -> None:
        if self.dist.is_main:
            save_state(self.out, self.state())
            if self.log is not None:
                self.log.plot()
        if self.dist.world_size > 1:
            dist.barrier()

    # ------------------------------------------------------------------------------------------ one step
    def _stage_adapters(self, index: int, stage: StageSettings):
        if index not in self._adapters:
            g, l, geo = build_adapters(stage, self.source, self.arch, self.pretraining, self.settings.ct_intensity)
            self._adapters[index] = (g.to(self.device), l.to(self.device), geo)
        return self._adapters[index]

    def _draw_slices(self, n: int, g: torch.Generator) -> list[torch.Tensor]:
        """``n`` random slices; a constant slice (empty background, padding) is redrawn: it has nothing to learn."""
        out = []
        for _ in range(n):
            for _attempt in range(20):
                x = self.source.load(self.source.refs[int(torch.randint(len(self.source), (), generator=g))])
                if float(x.std()) > 1e-6:
                    break
            out.append(x)
        return out

    def make_batch(self, step: int, stage_index: int, stage: StageSettings):
        g = _seed_everything(_step_seed(self.settings.seed, step, self.dist.rank))
        global_adapter, local_adapter, geo = self._stage_adapters(stage_index, stage)
        crops = [multi_crop(x, geo, g) for x in self._draw_slices(self.settings.batch_size, g)]
        # View-major order: all images' first global crop, then their second, then each local view.
        globals_ = torch.stack([c[0][v] for v in range(2) for c in crops]).to(self.device)
        locals_ = (torch.stack([c[1][v] for v in range(geo.n_local) for c in crops]).to(self.device)
                   if geo.n_local else None)
        with torch.no_grad():
            x_g = global_adapter(globals_)
            x_l = local_adapter(locals_) if locals_ is not None else None
        th, tw = global_adapter.token_hw
        mask = self._mask(2 * self.settings.batch_size, th, tw)
        return x_g, x_l, mask

    def _mask(self, n: int, th: int, tw: int) -> torch.Tensor:
        s = self.settings
        mask = random_block_mask((n, th, tw), batch_mask_ratio=s.mask_probability,
                                 min_image_mask_ratio=s.mask_ratio[0], max_image_mask_ratio=s.mask_ratio[1],
                                 min_num_masks_per_block=4 if int(th * tw * s.mask_ratio[0]) >= 4 else 0)
        # Blocks of >= 4 tokens (DINOv2), unless the grid is too small for them (lightly refuses those); tiny grids
        # may then get no block at all, but iBOT needs one masked token.
        if not mask.any():
            mask[0, random.randrange(th), random.randrange(tw)] = True
        return mask.to(self.device)

    def _autocast(self):
        use = self.settings.bf16 and self.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=use)

    def train_step(self) -> dict[str, float]:
        s = self.settings
        index, stage, t = s.stage_at(self.step)
        if t == 0 and stage.gram_weight > 0:
            # DINOv3: the Gram teacher is the EMA teacher as the stage begins (a snapshot, then fixed).
            self.gram_teacher = self._frozen_copy(self.teacher)
        lr, momentum, temp = learning_rate(stage, t), teacher_momentum(stage, t), teacher_temperature(stage, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x_g, x_l, mask = self.make_batch(self.step, index, stage)
        n_views = 2 + (0 if x_l is None else x_l.shape[0] // s.batch_size)
        with torch.no_grad(), self._autocast():
            teacher_out = self.teacher(x_g, None, None)
            teacher_out["ibot_logits"] = self.teacher.teacher_ibot_logits(teacher_out["patches_global"], mask)
            gram_patches = (self.gram_teacher.tokens(x_g)[1]
                            if self.gram_teacher is not None and stage.gram_weight > 0 else None)
        self.student.train()
        with self._autocast():
            student_out = self.trained(x_g, x_l, mask)
        losses = self.objective(student_out, teacher_out, mask, n_views, temp, gram_patches, stage.gram_weight)
        self.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        if s.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), s.clip_grad)
        if self.step < s.freeze_last_layer_steps:
            for head in (self.student.dino_head, self.student.ibot_head):
                for p in head.last_layer.parameters():
                    p.grad = None
        self.optimizer.step()
        with torch.no_grad():
            update_momentum(self.student, self.teacher, momentum)  # teacher = m * teacher + (1 - m) * student
        values = torch.stack([losses[k].detach().float() for k in LOSS_NAMES])
        if self.dist.world_size > 1:
            dist.all_reduce(values)
            values /= self.dist.world_size
        self.step += 1
        out = dict(zip(LOSS_NAMES, values.tolist()))
        out.update(stage=stage.name, lr=lr, momentum=momentum, teacher_temp=temp)
        return out

    @torch.no_grad()
    def losses_on_batch(self, step: int) -> dict[str, float]:
        """The losses of the current networks on the (deterministic) batch of ``step``, changing nothing: the
        student in eval mode (no drop path), no update, no EMA."""
        index, stage, t = self.settings.stage_at(step)
        x_g, x_l, mask = self.make_batch(step, index, stage)
        n_views = 2 + (0 if x_l is None else x_l.shape[0] // self.settings.batch_size)
        teacher_out = self.teacher(x_g, None, None)
        teacher_out["ibot_logits"] = self.teacher.teacher_ibot_logits(teacher_out["patches_global"], mask)
        gram = self.gram_teacher.tokens(x_g)[1] if self.gram_teacher is not None else None
        self.student.eval()
        student_out = self.student(x_g, x_l, mask)
        self.student.train()
        losses = self.objective(student_out, teacher_out, mask, n_views, teacher_temperature(stage, t), gram,
                                stage.gram_weight)
        return {k: float(v) for k, v in losses.items()}

    # ------------------------------------------------------------------------------------------ the run
    def run(self, progress: bool = True, stop_after: int | None = None) -> None:
        """Train until the last stage ends (or ``stop_after`` more steps, for tests), saving every save_every
        steps and at each stage's end."""
        s = self.settings
        if self.dist.is_main:
            self.log = RunLog(self.out, keep_steps_below=self.step)
        bar = None
        if progress and self.dist.is_main:
            from tqdm import tqdm
            bar = tqdm(total=s.total_steps, initial=self.step, desc="DINO pretraining", unit="step",
                       dynamic_ncols=True)
        end = s.total_steps if stop_after is None else min(s.total_steps, self.step + stop_after)
        while self.step < end:
            t0 = time.perf_counter()
            values = self.train_step()
            if not all(math.isfinite(values[k]) for k in LOSS_NAMES):
                self.save_failed(values)
            if self.log is not None:
                self.log.append({"step": self.step - 1, **values, "seconds": time.perf_counter() - t0})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(stage=values["stage"], total=f"{values['total']:.3f}", dino=f"{values['dino']:.3f}",
                                ibot=f"{values['ibot']:.3f}", gram=f"{values['gram']:.4f}")
            _, _, t = s.stage_at(self.step - 1)
            stage_end = t == s.stage_at(self.step - 1)[1].steps - 1
            if self.step % s.save_every == 0 or stage_end or self.step == end:
                self.save()
        if bar is not None:
            bar.close()

    def save_failed(self, values: dict) -> None:
        raise FloatingPointError(
            f"Non-finite loss at step {self.step - 1} ({values}). Nothing was saved for this step; the last "
            f"checkpoint in {self.out} is intact. Lower the learning rate (--lr) or use float32 (drop --bf16), "
            f"then continue with --c.")
