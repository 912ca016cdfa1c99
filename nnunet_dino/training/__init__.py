"""Trainer logic. The classes nnU-Net finds by name live in the repository's trainers/ folder and are thin."""
from .dino_trainer_base import DinoTrainerBase, unwrap
from .guidino_trainer import GuiDINOTrainer
from .meddinov3_trainer import MedDINOv3Trainer
from .segdino_trainer import SegDINOTrainer, SegDINOv2Trainer

__all__ = ["DinoTrainerBase", "GuiDINOTrainer", "MedDINOv3Trainer", "SegDINOTrainer",
           "SegDINOv2Trainer", "unwrap"]
