"""``load_backbone`` and the weights setting trainers read (explicit argument, else ``nnUNet_dino_weights``)."""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from .formats import CanonicalWeights, to_canonical
from .model import DinoBackbone, LoadReport
from .random_init import init_random_dino_weights_
from .registry import get_architecture
from .weight_files import (HOW_TO_GET_WEIGHTS, WeightFileError, find_meta_file, is_hf_folder, pretraining_of,
                           read_weights)

log = logging.getLogger("nnunet_dino")

WEIGHTS_ENV_VAR = "nnUNet_dino_weights"
RANDOM_INIT_VALUE = "random"  # nnUNet_dino_weights=random: explicit, loudly logged random initialisation


def resolve_weights_setting(explicit: str | os.PathLike | None, arch_name: str) -> Path | None:
    """The weight file/folder to use for ``arch_name``: the explicit value, else $nnUNet_dino_weights; a folder
    of Meta-named files resolves to the one file of this architecture. Returns None for an explicit request of
    random initialisation; raises with instructions when nothing is configured."""
    value = explicit if explicit is not None else os.environ.get(WEIGHTS_ENV_VAR)
    if value is None or str(value).strip() == "":
        raise WeightFileError(
            f"No DINO weights configured for {arch_name}. Set {WEIGHTS_ENV_VAR} to a weight file, a Hugging Face "
            f"folder or a folder of Meta-named files (random initialisation only with {WEIGHTS_ENV_VAR}="
            f"{RANDOM_INIT_VALUE}, for tests). {HOW_TO_GET_WEIGHTS}"
        )
    if str(value) == RANDOM_INIT_VALUE:
        return None
    path = Path(value).expanduser()
    if path.is_dir() and not is_hf_folder(path):
        return find_meta_file(path, arch_name)
    return path


def warn_random_init(arch_name: str) -> None:
    msg = (f"nnunet-dino: {arch_name} is RANDOMLY INITIALISED (explicitly requested; realistic-scale random weights, "
           f"LayerScale ~1). Its features are not those of a pretrained DINO model; label any result obtained this "
           f"way accordingly.")
    warnings.warn(msg, stacklevel=3)
    log.warning(msg)


def _read_canonical(path: Path) -> tuple[CanonicalWeights, Path]:
    state, hf_config, resolved = read_weights(path)
    return to_canonical(state, hf_config, source=resolved), resolved


def _report(canonical: CanonicalWeights, resolved: Path) -> LoadReport:
    pretraining = ("meddinov3_ct" if canonical.layout.startswith("MedDINOv3") else
                   pretraining_of(resolved) or canonical.arch.default_pretraining)
    return LoadReport(canonical.arch.name, canonical.layout, str(resolved), pretraining)


def load_weights_into(backbone: DinoBackbone, weights: str | os.PathLike) -> LoadReport:
    """Strictly load a weight file/folder into an already built (possibly LoRA-wrapped) backbone."""
    canonical, resolved = _read_canonical(Path(weights).expanduser())
    backbone.load_canonical(canonical)
    report = _report(canonical, resolved)
    log.info(report.describe())
    return report


def load_backbone(name: str | None = None, weights: str | os.PathLike | None = None, *, random_init: bool = False,
                  drop_path_rate: float = 0.0) -> DinoBackbone:
    """A DinoBackbone with weights.

    - ``weights``: a file or Hugging Face folder; the architecture is read off it when ``name`` is None, and must
      match ``name`` otherwise. A folder of Meta-named files needs ``name``.
    - ``random_init=True`` (with ``weights=None``): realistic-scale random weights (``init_random_dino_weights_``,
      from the global torch RNG), logged as such. Never implied."""
    if weights is None:
        if not random_init:
            raise WeightFileError(f"load_backbone needs weights= (or random_init=True for tests). {HOW_TO_GET_WEIGHTS}")
        if name is None:
            raise ValueError("random_init=True needs an architecture name, e.g. load_backbone('dinov3_vits16', ...).")
        arch = get_architecture(name)
        # Built on the CPU with timm's init first, exactly as the networks nnU-Net builds, which the trainers then
        # initialise the same way (nnUNet_dino_weights=random): a seed gives the same backbone on both paths.
        backbone = init_random_dino_weights_(DinoBackbone(arch, drop_path_rate))
        warn_random_init(name)
        backbone.load_report = LoadReport(name, "none", "none", arch.default_pretraining, random_init=True)
        return backbone
    if random_init:
        raise ValueError("Pass either weights= or random_init=True, not both.")
    path = Path(weights).expanduser()
    if path.is_dir() and not is_hf_folder(path):
        if name is None:
            raise WeightFileError(f"{path} is a folder of weight files; also name the architecture, e.g. "
                                  f"load_backbone('dinov3_vits16', weights='{path}').")
        path = find_meta_file(path, name)
    canonical, resolved = _read_canonical(path)
    if name is not None and canonical.arch.name != name:
        raise WeightFileError(f"{resolved} holds {canonical.arch.name} weights ({canonical.layout} layout), "
                              f"not {name}.")
    # On the meta device: the file's tensors become the parameters, so the ViT is never randomly initialised (nor
    # allocated a second time) only to be overwritten; load_canonical checks keys and shapes as strictly as ever.
    backbone = DinoBackbone(canonical.arch, drop_path_rate, device="meta")
    backbone.load_canonical(canonical)
    backbone.load_report = _report(canonical, resolved)
    log.info(backbone.load_report.describe())
    return backbone
