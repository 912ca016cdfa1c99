"""Networks: nnU-Net's segmentation networks guided by DINO (GuiDINO), and the DINO-based segmenters (SegDINO v1/v2,
MedDINOv3). Each ``build_*`` function builds the whole structure deterministically, as nnU-Net's predictor needs."""
from .dino_taps import DinoEncoderConfig, DinoTapEncoder, paper_tap_layers
from .guided_unet import GATE_PLACES, GuidedUNet, GuiDINOConfig, build_guidance, build_guided_unet
from .meddinov3 import MedDINOv3Config, MedDINOv3Network, build_meddinov3
from .segdino import SegDINO, SegDINOConfig, build_segdino
from .segdino_v2 import SegDINOv2, SegDINOv2Config, build_segdino_v2

__all__ = ["GATE_PLACES", "DinoEncoderConfig", "DinoTapEncoder", "GuidedUNet", "GuiDINOConfig", "MedDINOv3Config",
           "MedDINOv3Network", "SegDINO", "SegDINOConfig", "SegDINOv2", "SegDINOv2Config", "build_guidance",
           "build_guided_unet", "build_meddinov3", "build_segdino", "build_segdino_v2", "paper_tap_layers"]
