"""Trainer logic. The classes nnU-Net finds by name live in the repository's trainers/ folder and are thin."""
from .dino_trainer_base import DinoTrainerBase, unwrap
from .guidino_trainer import GuiDINOTrainer

__all__ = ["DinoTrainerBase", "GuiDINOTrainer", "unwrap"]
