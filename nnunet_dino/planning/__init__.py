"""Plans tools: extra nnU-Net configurations for the DINO trainers (e.g. MedDINOv3's high-resolution 2d_896).

Only nnU-Net's plans JSON is touched; the stock nnUNetv2_preprocess / nnUNetv2_train / nnUNetv2_predict then use the
new configuration through nnU-Net's own ``inherits_from`` mechanism."""
from .highres import (HighResPlansError, HighResRequest, HighResResult, add_highres_configuration,
                      derive_highres_configuration, find_plans_file)

__all__ = ["HighResPlansError", "HighResRequest", "HighResResult", "add_highres_configuration",
           "derive_highres_configuration", "find_plans_file"]
