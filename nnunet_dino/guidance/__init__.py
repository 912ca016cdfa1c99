"""Guidance layer: TokenBook guide masks from DINO tokens, gates, and GuiDINO's auxiliary losses."""
from .branch import DinoGuidance
from .gates import GATE_MODES, GuideGate
from .losses import boundary_band, boundary_hinge_loss, dense_targets, guide_loss
from .tokenbook import TokenBook, TokenBookConfig

__all__ = ["DinoGuidance", "GATE_MODES", "GuideGate", "TokenBook", "TokenBookConfig", "boundary_band",
           "boundary_hinge_loss", "dense_targets", "guide_loss"]
