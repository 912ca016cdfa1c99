"""The DINO backbone layer: registry of architectures, offline weight loading, input adapter and LoRA.

    from nnunet_dino.backbone import load_backbone
    bb = load_backbone(weights="/path/to/file_or_dir")
    maps = bb.patch_features(x, layers=[2, 5, 8, 11])
"""
from .ct_intensity import CT_INTENSITY_MODES, CTIntensity, plans_intensity_properties
from .formats import CanonicalWeights, to_canonical
from .input_adapter import DinoInputAdapter
from .loading import (RANDOM_INIT_VALUE, WEIGHTS_ENV_VAR, load_backbone, load_weights_into, resolve_weights_setting,
                      warn_random_init)
from .lora import LoraSettings, apply_lora, lora_parameters, merge_lora
from .model import DinoBackbone, LoadReport
from .random_init import init_random_dino_weights_
from .registry import (ARCHITECTURES, HU_PRETRAINING, PIXEL_STATS, DinoArchitecture, get_architecture,
                       match_architecture)
from .weight_files import HOW_TO_GET_WEIGHTS, WeightFileError, read_weights, verify_meta_hash

__all__ = [
    "ARCHITECTURES", "CT_INTENSITY_MODES", "HU_PRETRAINING", "PIXEL_STATS", "CTIntensity", "CanonicalWeights",
    "DinoArchitecture", "DinoBackbone", "DinoInputAdapter", "HOW_TO_GET_WEIGHTS", "LoadReport", "LoraSettings",
    "RANDOM_INIT_VALUE", "WEIGHTS_ENV_VAR", "WeightFileError", "apply_lora", "get_architecture",
    "init_random_dino_weights_", "load_backbone", "load_weights_into", "lora_parameters", "match_architecture",
    "merge_lora", "plans_intensity_properties", "read_weights", "resolve_weights_setting", "to_canonical",
    "verify_meta_hash", "warn_random_init",
]
