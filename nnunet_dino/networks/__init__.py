"""Networks: nnU-Net's segmentation networks guided by DINO, and the DINO-based segmenters."""
from .guided_unet import GATE_PLACES, GuidedUNet, GuiDINOConfig, build_guided_unet

__all__ = ["GATE_PLACES", "GuidedUNet", "GuiDINOConfig", "build_guided_unet"]
