"""Domain-adaptive DINO pretraining on a user's own (unlabelled) nnU-Net data: ``nnUNetv2_dino_pretrain``.

config (stage settings) -> data (preprocessed slices) -> crops -> network (ViT + lightly heads) -> losses (lightly
DINO/iBOT/KoLeo on Sinkhorn-Knopp targets, Gram anchoring) -> loop (student/EMA teacher, resumable) -> export (Meta
layout, sha256 name, provenance). Imports the backbone layer only.
"""
from .config import STAGE_NAMES, PretrainSettings, StageSettings, default_stage
from .data import PretrainDataError, SliceSource
from .run_folder import RunFolderError

__all__ = ["STAGE_NAMES", "PretrainDataError", "PretrainSettings", "RunFolderError", "SliceSource", "StageSettings",
           "default_stage"]
