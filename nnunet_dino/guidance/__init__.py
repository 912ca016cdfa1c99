"""Guidance layer: TokenBook guide masks from DINO tokens, gates, and GuiDINO's auxiliary losses."""
from .branch import DinoGuidance
from .gates import GATE_MODES, GuideGate
from .losses import boundary_band, boundary_hinge_loss, dense_targets, guide_loss
from .slicewise import SliceWiseGuidance, SlicingMismatchError
from .slicing import DEFAULT_SLICE_STRIDE, SLICE_AXIS_ENV_VAR, SLICE_STRIDE_ENV_VAR
from .tokenbook import TokenBook, TokenBookConfig

__all__ = ["DEFAULT_SLICE_STRIDE", "DinoGuidance", "GATE_MODES", "GuideGate", "SLICE_AXIS_ENV_VAR",
           "SLICE_STRIDE_ENV_VAR", "SliceWiseGuidance", "SlicingMismatchError", "TokenBook", "TokenBookConfig",
           "boundary_band", "boundary_hinge_loss", "dense_targets", "guide_loss"]
