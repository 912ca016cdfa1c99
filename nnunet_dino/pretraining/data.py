"""The unlabelled 2D slices of one or more nnU-Net datasets, as nnU-Net preprocessed them.

Only images are read (never ``*_seg``): nnU-Net's preprocessed training cases of the chosen configuration and,
optionally, the dataset's ``imagesTs`` run through nnU-Net's own preprocessor (cached as .npy in the output folder).
So the intensities are exactly those the trainers' input adapter receives, and its channel/intensity mapping (built
from the same plans, ``DinoInputAdapter``) is the one the pretrained ViT learns to read.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("nnunet_dino")


class PretrainDataError(ValueError):
    """Missing or unusable data; the message says what to run."""


@dataclass
class DatasetInput:
    """What the input adapter needs to know about a dataset (read from its plans)."""
    name: str
    preprocessed_folder: Path
    patch_size: tuple[int, int]
    normalization_schemes: list[str]
    intensity_properties: dict | None
    num_channels: int


@dataclass(frozen=True)
class SliceRef:
    dataset: int  # index into SliceSource.datasets
    case: str
    z: int
    source: str  # "preprocessed" or "imagesTs"


def _dataset_name(dataset: str) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        return maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:
        raise PretrainDataError(
            f"Dataset {dataset} was not found in nnUNet_preprocessed ({os.environ.get('nnUNet_preprocessed')}) or "
            f"nnUNet_raw ({os.environ.get('nnUNet_raw')}): {e}. Run nnUNetv2_plan_and_preprocess -d {dataset} -c 2d "
            f"first and check that nnUNet_preprocessed is set.") from None


class SliceSource:
    """Every slice (z index of a case) of the given datasets; ``load(ref)`` returns it as a (C, H, W) float tensor."""

    def __init__(self, datasets: list[str], configuration: str = "2d", plans: str = "nnUNetPlans",
                 include_images_ts: bool = False, exclude_cases: set[str] | frozenset = frozenset(),
                 cache_folder: Path | None = None):
        pre_root = os.environ.get("nnUNet_preprocessed")
        if not pre_root:
            raise PretrainDataError("nnUNet_preprocessed is not set. Export it (the folder nnUNetv2_plan_and_preprocess"
                                    " wrote to) and run again.")
        self.configuration = configuration
        self.datasets: list[DatasetInput] = []
        self.refs: list[SliceRef] = []
        self._arrays: dict[tuple[int, str, str], object] = {}
        self._folders: dict[int, Path] = {}
        self.cases: dict[str, int] = {}
        self.excluded: list[str] = []
        for i, d in enumerate(datasets):
            name = _dataset_name(str(d))
            folder = Path(pre_root) / name
            plans_file = folder / f"{plans}.json"
            if not plans_file.is_file():
                raise PretrainDataError(f"No preprocessed data for {name}: {plans_file} does not exist. Run "
                                        f"nnUNetv2_plan_and_preprocess -d {d} -c {configuration} first.")
            self.datasets.append(self._read_plans(name, folder, plans_file, configuration, d))
            data_folder = folder / self._data_identifier
            n_before = len(self.refs)
            self._index_preprocessed(i, data_folder, exclude_cases, d)
            if include_images_ts:
                self._index_images_ts(i, name, plans_file, configuration, exclude_cases, cache_folder)
            self.cases[name] = len({r.case for r in self.refs[n_before:]})
        first = self.datasets[0]
        for other in self.datasets[1:]:
            if other.num_channels != first.num_channels or other.normalization_schemes != first.normalization_schemes:
                raise PretrainDataError(
                    f"{other.name} has {other.num_channels} channel(s) {other.normalization_schemes} but "
                    f"{first.name} has {first.num_channels} {first.normalization_schemes}: one ViT input mapping "
                    f"cannot serve both. Pretrain on datasets with the same channels and normalisation.")

    # ------------------------------------------------------------------------------------------ indexing
    def _read_plans(self, name, folder, plans_file, configuration, d) -> DatasetInput:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        pm = PlansManager(str(plans_file))
        if configuration not in pm.available_configurations:
            raise PretrainDataError(f"{plans_file} has no configuration {configuration!r} (it has "
                                    f"{pm.available_configurations}).")
        cm = pm.get_configuration(configuration)
        if len(cm.patch_size) != 2:
            raise PretrainDataError(f"Configuration {configuration!r} of {name} is {len(cm.patch_size)}D; DINO "
                                    f"pretraining works on 2D slices: use -c 2d (or a 2d-derived configuration).")
        self._data_identifier = cm.data_identifier
        plans = pm.plans
        props = plans.get("foreground_intensity_properties_per_channel",
                          plans.get("foreground_intensity_properties_by_modality"))
        dataset_json = json.loads((folder / "dataset.json").read_text())
        channels = dataset_json.get("channel_names", dataset_json.get("modality", {}))
        return DatasetInput(name, folder, tuple(int(s) for s in cm.patch_size), list(cm.normalization_schemes),
                            props, len(channels))

    def _index_preprocessed(self, i: int, data_folder: Path, exclude: set, d) -> None:
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        if not data_folder.is_dir() or not any(data_folder.iterdir()):
            raise PretrainDataError(f"No preprocessed data in {data_folder}. Run nnUNetv2_preprocess -d {d} -c "
                                    f"{self.configuration} (or nnUNetv2_plan_and_preprocess) first.")
        try:
            cls = infer_dataset_class(str(data_folder))
        except Exception as e:  # noqa: BLE001 - nnU-Net raises a bare RuntimeError/AssertionError
            raise PretrainDataError(f"{data_folder} holds no nnU-Net preprocessed cases ({e}). Run nnUNetv2_preprocess "
                                    f"-d {d} -c {self.configuration}.") from None
        ds = cls(str(data_folder))
        self._folders[i] = data_folder
        self._dataset_objects = getattr(self, "_dataset_objects", {})
        self._dataset_objects[i] = ds
        for case in sorted(ds.identifiers):
            if case in exclude:
                self.excluded.append(case)
                continue
            data = ds.load_case(case)[0]  # the image only; its segmentation is never read
            self._arrays[(i, case, "preprocessed")] = data
            for z in range(int(data.shape[1])):
                self.refs.append(SliceRef(i, case, z, "preprocessed"))

    def _index_images_ts(self, i, name, plans_file, configuration, exclude, cache_folder) -> None:
        raw = os.environ.get("nnUNet_raw")
        folder = Path(raw or "") / name / "imagesTs"
        if not raw or not folder.is_dir():
            raise PretrainDataError(f"--include_imagesTs: {folder} does not exist (nnUNet_raw={raw}).")
        if cache_folder is None:
            raise PretrainDataError("--include_imagesTs needs a cache folder (the output folder).")
        from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

        dataset_json = json.loads((Path(raw) / name / "dataset.json").read_text())
        pm = PlansManager(str(plans_file))
        cm = pm.get_configuration(configuration)
        groups = create_lists_from_splitted_dataset_folder(str(folder), dataset_json["file_ending"])
        cache = Path(cache_folder) / "imagesTs_preprocessed" / name
        cache.mkdir(parents=True, exist_ok=True)
        preprocessor = DefaultPreprocessor(verbose=False)
        for files in groups:
            case = Path(files[0]).name[: -len(dataset_json["file_ending"]) - 5]  # strip _0000<ending>
            if case in exclude:
                self.excluded.append(case)
                continue
            npy = cache / f"{case}.npy"
            if not npy.is_file():
                data, _, _ = preprocessor.run_case(files, None, pm, cm, dataset_json)
                tmp = cache / f".{case}.partial-{os.getpid()}.npy"
                np.save(tmp, data.astype(np.float32))
                os.replace(tmp, npy)
            arr = np.load(npy, mmap_mode="r")
            self._arrays[(i, case, "imagesTs")] = arr
            for z in range(int(arr.shape[1])):
                self.refs.append(SliceRef(i, case, z, "imagesTs"))

    # ------------------------------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.refs)

    @property
    def num_cases(self) -> int:
        return sum(self.cases.values())

    def load(self, ref: SliceRef) -> torch.Tensor:
        arr = self._arrays[(ref.dataset, ref.case, ref.source)]
        # a copy: the cached imagesTs arrays are read-only memory maps, and torch must own what it may write to
        return torch.from_numpy(np.array(arr[:, ref.z], dtype=np.float32))

    def describe(self) -> list[dict]:
        return [{"name": d.name, "preprocessed_folder": str(d.preprocessed_folder), "configuration": self.configuration,
                 "patch_size": list(d.patch_size), "normalization_schemes": d.normalization_schemes,
                 "cases": self.cases[d.name],
                 "slices": sum(1 for r in self.refs if r.dataset == i)}
                for i, d in enumerate(self.datasets)]
