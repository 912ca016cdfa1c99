"""The DINO backbone layer: registry of architectures, offline weight loading, input adapter and LoRA.

    from nnunet_dino.backbone import load_backbone
    bb = load_backbone(weights="/path/to/file_or_dir")
    maps = bb.patch_features(x, layers=[2, 5, 8, 11])
"""
from .formats import CanonicalWeights, to_canonical
from .input_adapter import DinoInputAdapter
from .loading import (RANDOM_INIT_VALUE, WEIGHTS_ENV_VAR, load_backbone, load_weights_into, resolve_weights_setting,
                      warn_random_init)
from .lora import LoraSettings, apply_lora, lora_parameters, merge_lora
from .model import DinoBackbone, LoadReport
from .registry import ARCHITECTURES, PIXEL_STATS, DinoArchitecture, get_architecture, match_architecture
from .weight_files import HOW_TO_GET_WEIGHTS, WeightFileError, read_weights, verify_meta_hash

__all__ = [
    "ARCHITECTURES", "PIXEL_STATS", "CanonicalWeights", "DinoArchitecture", "DinoBackbone", "DinoInputAdapter",
    "HOW_TO_GET_WEIGHTS", "LoadReport", "LoraSettings", "RANDOM_INIT_VALUE", "WEIGHTS_ENV_VAR", "WeightFileError",
    "apply_lora", "get_architecture", "load_backbone", "load_weights_into", "lora_parameters", "match_architecture",
    "merge_lora", "read_weights", "resolve_weights_setting", "to_canonical", "verify_meta_hash", "warn_random_init",
]
