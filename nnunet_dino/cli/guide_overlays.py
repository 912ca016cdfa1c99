"""nnUNetv2_dino_guide_overlays: see what DINO contributed.

For every case of an input folder (nnU-Net raw naming, as for nnUNetv2_predict) this writes a PNG with the image,
each guide mask (with a colour bar), the predicted segmentation and, where labels exist, the ground truth; by default
on the slice with the most predicted foreground, or on the slices chosen with --slices. With several folds the
logits and the guide maps are averaged over the folds, as nnU-Net ensembles folds. With --nifti the guide maps are
also written as float NIfTI in the input image's geometry (NIfTI inputs).

3D models (3d_fullres, 3d_lowres, 3d_cascade_fullres): the guide volume is stitched by the same sliding window,
mapped back to the input image's geometry (as nnU-Net maps its prediction back), and the PNGs show planes
perpendicular to the model's slicing axis (the planes its ViT saw), numbered as in the input image.

Everything goes through nnU-Net's own predictor: its preprocessing, sliding window and Gaussian weighting; the guide
maps are stitched by the same sliding window as the logits. Checkpoints are read with torch.load(weights_only=True)
(safe_checkpoint.py), never by the predictor's own full-pickle load, so a crafted checkpoint cannot run code here.

Arguments are parsed before torch or nnU-Net are imported, so ``-h`` and argument errors return at once.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEFAULT_TRAINER = "nnUNetTrainerGuiDINO"
DEVICES = ("cpu", "cuda", "mps")  # as nnUNetv2_predict -device
SLICE_MODES = ("max", "all")


# ---------------------------------------------------------------------------------------------- command line
class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for required arguments and flags (their 'None'/'False' says nothing)."""

    def _get_help_string(self, action):
        if action.required or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_dino_guide_overlays", formatter_class=_DefaultsFormatter,
        description="Write PNG overlays (and optionally NIfTI maps) of GuiDINO guide masks for a folder of cases: "
                    "image, one panel per guide with a colour bar, prediction and, when labels are found, the ground "
                    "truth. With several folds (-f 0 1 ...) logits and guides are averaged over the folds, like an "
                    "nnU-Net ensemble. Checkpoints are loaded with torch.load(weights_only=True): one that would need "
                    "to run code is refused.")
    p.add_argument("-i", required=True, help="input folder (nnU-Net naming, like nnUNetv2_predict -i)")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-c", default="2d", help="configuration")
    p.add_argument("-tr", default=DEFAULT_TRAINER, help="trainer class name")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    p.add_argument("-f", nargs="+", default="0", metavar="FOLD",
                   help="fold(s), e.g. -f 0 1 2 3 4 or -f all; several folds are averaged (ensemble)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name")
    p.add_argument("--labels", metavar="FOLDER", default=None,
                   help="ground-truth folder (CASE.nii.gz ...) for a ground-truth panel; default: the labelsTs/"
                        "labelsTr folder next to -i, else $nnUNet_raw/DATASET/labelsTs or labelsTr, if it has every "
                        "case")
    p.add_argument("--slices", nargs="+", default="max", metavar="S",
                   help="3D volumes: 'max' (the slice with most predicted foreground), 'all', or slice indices along "
                        "the slicing axis (2d models: nnU-Net's first axis; 3D models: the axis whose planes the ViT "
                        "saw), numbered as in the input image (e.g. --slices 10 20)")
    p.add_argument("--nifti", action="store_true", help="also write guide maps as NIfTI in image geometry")
    p.add_argument("-device", default="cpu", choices=DEVICES, help="device, as for nnUNetv2_predict")
    p.add_argument("-nt", "--threads", type=int, default=1,
                   help="torch CPU threads; 1 was ~10x faster than 2 on a busy 2-core machine")
    return p


def parse_folds(values: str | list[str]) -> list[int | str]:
    """``-f`` values: non-negative integers or 'all', each at most once."""
    values = [values] if isinstance(values, str) else values  # the default is one string
    folds: list[int | str] = []
    for v in values:
        if v == "all":
            fold: int | str = "all"
        elif v.isdigit():
            fold = int(v)
        else:
            raise ValueError(f"-f takes fold numbers (0, 1, ...) or 'all', got {v!r}.")
        if fold in folds:
            raise ValueError(f"Fold {v} is given twice in -f.")
        folds.append(fold)
    return folds


def parse_slices(values: str | list[str]) -> str | list[int]:
    """``--slices`` values: 'max', 'all', or non-negative slice indices (each once)."""
    values = [values] if isinstance(values, str) else values  # the default is one string
    if len(values) == 1 and values[0] in SLICE_MODES:
        return values[0]
    if any(v in SLICE_MODES for v in values):
        raise ValueError(f"--slices takes 'max', 'all' or slice indices, not a mix: {' '.join(values)}.")
    if not all(v.isdigit() for v in values):
        raise ValueError(f"--slices takes 'max', 'all' or non-negative slice indices, got {' '.join(values)}.")
    indices = [int(v) for v in values]
    if len(set(indices)) != len(indices):
        raise ValueError(f"--slices lists a slice twice: {' '.join(values)}.")
    return indices


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        folds, slices = parse_folds(args.f), parse_slices(args.slices)
    except ValueError as e:
        parser.error(str(e))
    if args.threads < 1:
        parser.error(f"-nt/--threads must be >= 1, got {args.threads}.")
    if not Path(args.i).is_dir():
        parser.error(f"-i {args.i} is not a folder.")
    if args.labels is not None and not Path(args.labels).is_dir():
        parser.error(f"--labels {args.labels} is not a folder.")

    import torch  # only now: importing torch and nnU-Net takes many seconds

    torch.set_num_threads(args.threads)  # before any heavy work (nnU-Net's CPU default is every core)
    device = _device(args.device)
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    dataset = maybe_convert_to_dataset_name(args.d)
    model_folder = get_output_folder(dataset, args.tr, args.p, args.c)
    labels = Path(args.labels) if args.labels is not None else None
    from ..training.safe_checkpoint import UnsafeCheckpointError

    try:
        written = write_guide_overlays(model_folder, args.i, args.o, folds, args.chk, args.nifti, device,
                                       labels_folder=labels, slices=slices, dataset_name=dataset)
    except UnsafeCheckpointError as e:  # a refusal, not a crash: the message says it all
        raise SystemExit(f"nnUNetv2_dino_guide_overlays: {e}") from None
    print(f"wrote {len(written)} files to {args.o}")
    return 0


def _say(message: str) -> None:
    print(message, flush=True)  # progress lines appear as they happen, also when piped to a log


def _device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("-device cuda: PyTorch sees no CUDA GPU (torch.cuda.is_available() is False). Use -device "
                         "cpu.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("-device mps: PyTorch has no MPS backend here (Apple silicon only). Use -device cpu.")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------- the model
def guide_map_network(guided, num_outputs: int):
    """Wraps a trained GuidedUNet so the sliding window stitches its guide masks (one map per output channel)
    instead of its logits. (A factory, so this module imports without torch.)"""
    import torch.nn as nn

    class GuideMapNetwork(nn.Module):
        def __init__(self):
            super().__init__()
            self.guided = guided
            self.num_outputs = num_outputs

        def forward(self, x):
            self.guided(x)
            _, masks = self.guided.last_guide
            maps = self.guided.guidance.guide_to(masks, x.shape[2:])  # 2D maps or, for 3D models, the guide volume
            return maps.expand(-1, self.num_outputs, *maps.shape[2:]) if maps.shape[1] == 1 else maps

    return GuideMapNetwork()


def _checkpoint_files(model_folder: Path, folds: list, checkpoint: str) -> list[Path]:
    if not model_folder.is_dir():
        raise SystemExit(f"No trained model folder {model_folder}. Check -d, -tr, -p and -c (and $nnUNet_results).")
    files = [model_folder / f"fold_{f}" / checkpoint for f in folds]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        available = sorted(p.parent.name for p in model_folder.glob(f"fold_*/{checkpoint}"))
        raise SystemExit(f"No checkpoint {', '.join(missing)}. Folds with {checkpoint}: {available or 'none'} "
                         f"(choose them with -f, or another checkpoint with -chk).")
    return files


def load_model(model_folder: str | os.PathLike, folds: list, checkpoint: str, log=None) -> dict:
    """What nnUNetPredictor.initialize_from_trained_model_folder sets up, with the checkpoints read by
    load_checkpoint_safely instead of its torch.load(weights_only=False). The network is rebuilt by the trainer
    class named in the checkpoint, found among the installed trainers exactly as nnU-Net does."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from ..training.safe_checkpoint import load_checkpoint_safely

    log = log or _say
    model_folder = Path(model_folder)
    files = _checkpoint_files(model_folder, folds, checkpoint)
    checkpoints = []
    for f in files:
        log(f"Loading {f} (torch.load weights_only=True)")
        checkpoints.append(load_checkpoint_safely(f))
    first = checkpoints[0]
    trainer_name, configuration = first["trainer_name"], first["init_args"].get("configuration")
    for f, c in zip(files[1:], checkpoints[1:]):
        if (c["trainer_name"], c["init_args"].get("configuration")) != (trainer_name, configuration):
            raise SystemExit(f"{f} was trained by {c['trainer_name']} ({c['init_args'].get('configuration')}), "
                             f"{files[0]} by {trainer_name} ({configuration}): folds of one model only.")
    dataset_json = load_json(str(model_folder / "dataset.json"))
    plans_manager = PlansManager(load_json(str(model_folder / "plans.json")))
    cm = plans_manager.get_configuration(configuration)
    trainer_class = recursive_find_trainer_class_by_name(trainer_name)
    network = trainer_class.build_network_architecture(
        plans_manager, cm, determine_num_input_channels(plans_manager, cm, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    if not hasattr(network, "guidance"):
        raise SystemExit(f"The model in {model_folder} was not trained with a GuiDINO trainer ({trainer_name}): it "
                         f"has no guide masks.")
    parameters = [c["network_weights"] for c in checkpoints]
    network.load_state_dict(parameters[0])
    return {"network": network, "parameters": parameters, "plans_manager": plans_manager,
            "configuration_manager": cm, "dataset_json": dataset_json, "trainer_name": trainer_name,
            "mirroring_axes": first.get("inference_allowed_mirroring_axes")}


def _predict(predictor, model: dict, data, num_outputs: int):
    """(logits, guide maps), each averaged over the folds' parameters (nnU-Net's ensembling of folds)."""
    network, parameters = model["network"], model["parameters"]
    guide_net = guide_map_network(network, num_outputs)
    logits = guides = None
    for params in parameters:
        network.load_state_dict(params)
        predictor.network = network
        lg = predictor.predict_sliding_window_return_logits(data).float().cpu()
        predictor.network = guide_net
        gd = predictor.predict_sliding_window_return_logits(data).float().cpu()
        logits, guides = (lg, gd) if logits is None else (logits + lg, guides + gd)
    predictor.network = network
    return logits / len(parameters), guides / len(parameters)


# ---------------------------------------------------------------------------------------------- labels, slices
def find_labels_folder(input_folder: Path, cases: list[str], ending: str, dataset_name: str | None
                       ) -> tuple[Path | None, list[Path]]:
    """The first candidate folder with a label file for every case, and the candidates looked at: the labels
    folder next to the input (imagesTs -> labelsTs, imagesTr -> labelsTr), then $nnUNet_raw/DATASET/labelsTs,
    labelsTr."""
    candidates = []
    name = input_folder.resolve().name
    if name.startswith("images"):
        candidates.append(input_folder.resolve().parent / ("labels" + name[len("images"):]))
    raw = os.environ.get("nnUNet_raw")
    if raw and dataset_name:
        candidates += [Path(raw) / dataset_name / "labelsTs", Path(raw) / dataset_name / "labelsTr"]
    seen = []
    for c in candidates:
        if c in seen:
            continue
        seen.append(c)
        if c.is_dir() and all((c / f"{case}{ending}").is_file() for case in cases):
            return c, seen
    return None, seen


def _slice_plan(slices, pred, gt, props, plans_manager, case: str) -> list[tuple[int, int, str]]:
    """[(index in the preprocessed volume, index in the input image, note)] for the slices to draw. The 2D
    configurations keep the slicing axis unresampled, so only nnU-Net's crop to the non-zero region shifts it."""
    n_pre = pred.shape[0]
    offset = int(props["bbox_used_for_cropping"][0][0])
    n_input = int(props["shape_before_cropping"][0])
    axis = plans_manager.transpose_forward[0]
    if slices == "all":
        return [(z, z + offset, "") for z in range(n_pre)]
    if slices == "max":
        return [_max_slice(pred, gt, offset)]
    plan = []
    for s in slices:
        if not 0 <= s < n_input:
            raise SystemExit(f"--slices {s}: {case} has slices 0..{n_input - 1} (axis {axis} of the image array).")
        if not 0 <= s - offset < n_pre:
            raise SystemExit(f"--slices {s}: slice {s} of {case} is outside the region nnU-Net keeps after cropping "
                             f"to the non-zero image (slices {offset}..{offset + n_pre - 1}): it is all zero there.")
        plan.append((s - offset, s, ""))
    return plan


def _slice_plan_3d(slices, pred, gt, case: str, axis: int) -> list[tuple[int, int, str]]:
    """3D models: [(index, index, note)] of planes along ``axis`` of the input image array, where ``pred`` and
    ``gt`` are already in the input geometry with that axis first."""
    n = pred.shape[0]
    if slices == "all":
        return [(z, z, "") for z in range(n)]
    if slices == "max":
        return [_max_slice(pred, gt, 0)]
    for s in slices:
        if not 0 <= s < n:
            raise SystemExit(f"--slices {s}: {case} has slices 0..{n - 1} along axis {axis} of the image array (the "
                             f"model's slicing axis).")
    return [(s, s, "") for s in slices]


def _max_slice(pred, gt, offset: int) -> tuple[int, int, str]:
    import numpy as np

    def counts(a):
        return (a > 0).reshape(a.shape[0], -1).sum(1)

    if counts(pred).any():
        z, note = int(np.argmax(counts(pred))), ""
    elif gt is not None and counts(gt).any():
        z, note = int(np.argmax(counts(gt))), " (nothing predicted; most ground truth)"
    else:
        z, note = pred.shape[0] // 2, " (nothing predicted; middle slice)"
    return z, z + offset, note


# ---------------------------------------------------------------------------------------------- drawing
def _render_png(image, guides, seg, gt, labels: list[str], title: str, path: Path) -> None:
    """image (C, H, W), guides (K, H, W) in [0, 1], seg and gt (H, W) label maps (gt may be None)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = 2 + guides.shape[0] + (gt is not None)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 0.8, 3.8), layout="constrained")
    rgb = image.transpose(1, 2, 0) if image.shape[0] == 3 else image[0]
    lo, hi = np.percentile(rgb, (1, 99))
    shown = np.clip((rgb - lo) / max(hi - lo, 1e-6), 0, 1)
    cmap = None if shown.ndim == 3 else "gray"
    axes[0].imshow(shown, cmap=cmap)
    axes[0].set_title("image")
    guide_im = None
    for k in range(guides.shape[0]):
        axes[1 + k].imshow(shown, cmap=cmap)
        guide_im = axes[1 + k].imshow(guides[k], cmap="magma", alpha=0.6, vmin=0, vmax=1)
        axes[1 + k].set_title(f"guide: {labels[k]}")
    for ax, label_map, name in [(axes[1 + guides.shape[0]], seg, "prediction"), (axes[-1], gt, "ground truth")]:
        if label_map is None:
            continue
        ax.imshow(shown, cmap=cmap)  # -1 (outside nnU-Net's crop) and 0 (background) are left transparent
        ax.imshow(np.ma.masked_less_equal(label_map, 0), cmap="tab10", alpha=0.5, vmin=0, vmax=9,
                  interpolation="nearest")
        ax.set_title(name)
    for ax in axes:
        ax.axis("off")
    if guide_im is not None:
        # One bar for every guide panel: they share vmin 0 / vmax 1. (Drawn opaque: the panels blend it at 0.6.)
        bar = fig.colorbar(guide_im, ax=list(axes[1:1 + guides.shape[0]]), shrink=0.8, label="guide value")
        bar.solids.set_alpha(1)
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _to_original_geometry(maps, props: dict, plans_manager, configuration_manager):
    """Preprocessed-space float maps (K, *shape) -> original image geometry, by nnU-Net's own resampling, the
    inverse of its cropping and of its axis transposition."""
    import numpy as np

    spacing_transposed = [props["spacing"][i] for i in plans_manager.transpose_forward]
    current_spacing = (configuration_manager.spacing if len(configuration_manager.spacing) == len(maps.shape[1:])
                       else [spacing_transposed[0], *configuration_manager.spacing])
    resampled = configuration_manager.resampling_fn_probabilities(
        maps, props["shape_after_cropping_and_before_resampling"], current_spacing,
        [props["spacing"][i] for i in plans_manager.transpose_forward])
    full = np.zeros((maps.shape[0], *props["shape_before_cropping"]), dtype=np.float32)
    bbox = props["bbox_used_for_cropping"]
    slicer = tuple([slice(None)] + [slice(b[0], b[1]) for b in bbox])
    full[slicer] = resampled
    return full.transpose([0] + [i + 1 for i in plans_manager.transpose_backward])


def _write_nifti(guides, props, plans_manager, cm, labels, out_dir: Path, case: str) -> list[Path]:
    if "sitk_stuff" not in props:
        raise SystemExit("--nifti needs NIfTI (SimpleITK-readable) inputs.")
    return _write_nifti_volumes(_to_original_geometry(guides, props, plans_manager, cm), props, labels, out_dir, case)


def _case_3d(model: dict, predictor, files, gt_file, logits, guides, props, labels, slices, nifti: bool,
             out_dir: Path, case: str, fold_note: str) -> list[Path]:
    """A 3D model's case: image, guides, prediction and ground truth in the input image's geometry, drawn on planes
    perpendicular to the slicing axis (the axis of the input array that nnU-Net's transpose maps onto it)."""
    import numpy as np
    import torch
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    plans_manager, cm = model["plans_manager"], model["configuration_manager"]
    seg = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, plans_manager, cm, predictor.label_manager, props, num_threads_torch=torch.get_num_threads())
    full_guides = _to_original_geometry(guides, props, plans_manager, cm)
    reader = plans_manager.image_reader_writer_class()
    image, _ = reader.read_images(files)
    gt = reader.read_seg(gt_file)[0][0] if gt_file is not None else None
    axis = plans_manager.transpose_forward[model["network"].guidance.slice_axis]

    def planes_first(a, lead: int):  # (lead dims..., *spatial) with the slicing axis right after the lead dims
        return None if a is None else np.moveaxis(a, lead + axis, lead)

    image, full_k, seg_z, gt_z = (planes_first(image, 1), planes_first(full_guides, 1), planes_first(seg, 0),
                                  planes_first(gt, 0))
    written = []
    for z, _, note in _slice_plan_3d(slices, seg_z, gt_z, case, axis):
        png = out_dir / (f"{case}_guides.png" if slices == "max" else f"{case}_slice{z:03d}_guides.png")
        _render_png(image[:, z], np.clip(full_k[:, z], 0, 1), seg_z[z], gt_z[z] if gt_z is not None else None,
                    labels, f"{case} slice {z} of axis {axis}{note}{fold_note}", png)
        written.append(png)
    if nifti:
        written += _write_nifti_volumes(full_guides, props, labels, out_dir, case)
    return written


def _write_nifti_volumes(full, props, labels, out_dir: Path, case: str) -> list[Path]:
    """Guide maps already in the input geometry (K, *image array shape) as float NIfTI files."""
    import numpy as np
    import SimpleITK as sitk

    if "sitk_stuff" not in props:
        raise SystemExit("--nifti needs NIfTI (SimpleITK-readable) inputs.")
    written = []
    for k, _ in enumerate(labels):
        img = sitk.GetImageFromArray(full[k].astype(np.float32))
        img.SetSpacing(props["sitk_stuff"]["spacing"])
        img.SetOrigin(props["sitk_stuff"]["origin"])
        img.SetDirection(props["sitk_stuff"]["direction"])
        path = out_dir / f"{case}_guide_{k}.nii.gz"
        sitk.WriteImage(img, str(path))
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------- the whole run
def _as_fold_list(fold) -> list:
    if isinstance(fold, (list, tuple)):
        return [f if f == "all" else int(f) for f in fold]
    return [fold if fold == "all" else int(fold)]


def _case_labels(labels_folder: Path | None, input_folder: Path, cases: list[str], ending: str,
                 dataset_name: str | None, log) -> dict[str, str] | None:
    """{case: label file} for the ground-truth panel, or None. An explicit folder must have every case."""
    if labels_folder is not None:
        missing = [c for c in cases if not (labels_folder / f"{c}{ending}").is_file()]
        if missing:
            raise SystemExit(f"--labels {labels_folder} has no {missing[0]}{ending}"
                             f"{f' (and {len(missing) - 1} more cases)' if len(missing) > 1 else ''}: it must have "
                             f"the label of every input case, named like nnU-Net's labelsTr (CASE{ending}).")
        found = labels_folder
    else:
        found, looked = find_labels_folder(input_folder, cases, ending, dataset_name)
        if found is None:
            log(f"Ground truth: none (no folder with a label for every case among "
                f"{[str(p) for p in looked] or 'no candidates'}); pass --labels FOLDER to add it.")
            return None
    log(f"Ground truth: {found}")
    return {c: str(found / f"{c}{ending}") for c in cases}


def write_guide_overlays(model_folder: str, input_folder: str, output_folder: str, fold=0,
                         checkpoint: str = "checkpoint_final.pth", nifti: bool = False, device=None,
                         labels_folder: str | os.PathLike | None = None, slices: str | list[int] = "max",
                         dataset_name: str | None = None, log=None) -> list[Path]:
    """The overlays for every case of ``input_folder`` (see the module doc). ``fold``: one fold or a list
    (averaged); ``slices``: 'max', 'all' or input-image slice indices; ``labels_folder``: None looks for the
    dataset's labels (find_labels_folder)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    device = torch.device("cpu") if device is None else device
    log = log or _say
    folds = _as_fold_list(fold)
    model = load_model(model_folder, folds, checkpoint, log)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                allow_tqdm=False)
    predictor.manual_initialization(model["network"], model["plans_manager"], model["configuration_manager"],
                                    model["parameters"], model["dataset_json"], model["trainer_name"],
                                    model["mirroring_axes"])
    dataset_json, plans_manager, cm = model["dataset_json"], model["plans_manager"], model["configuration_manager"]
    ending = dataset_json["file_ending"]
    cases = create_lists_from_splitted_dataset_folder(input_folder, ending)
    if not cases:
        raise SystemExit(f"No images ending in {ending} found in {input_folder} (nnU-Net naming CASE_0000{ending}).")
    names = [os.path.basename(files[0])[: -(len(ending) + 5)] for files in cases]
    gt_files = _case_labels(Path(labels_folder) if labels_folder is not None else None, Path(input_folder), names,
                            ending, dataset_name, log)
    lm = predictor.label_manager
    labels = [str(x) for x in (lm.foreground_regions if lm.has_regions else list(dataset_json["labels"].keys()))]
    fold_note = f" - mean of folds {', '.join(map(str, folds))}" if len(folds) > 1 else ""
    preprocessor = cm.preprocessor_class(verbose=False)
    out_dir = Path(output_folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (files, case) in enumerate(zip(cases, names), 1):
        start = time.perf_counter()
        log(f"[{i}/{len(cases)}] {case}: preprocessing, predicting"
            f"{f' ({len(folds)} folds)' if len(folds) > 1 else ''}...")
        data, gt, props = preprocessor.run_case(files, gt_files[case] if gt_files else None, plans_manager, cm,
                                                dataset_json)
        logits, guides_t = _predict(predictor, model, torch.from_numpy(data).float(), lm.num_segmentation_heads)
        seg = lm.convert_logits_to_segmentation(logits).numpy()
        guides = guides_t.numpy()
        gt = gt[0] if gt is not None else None  # (1, Z, Y, X) -> (Z, Y, X)
        if len(cm.patch_size) == 3:
            case_files = _case_3d(model, predictor, files, gt_files[case] if gt_files else None, logits, guides,
                                  props, labels, slices, nifti, out_dir, case, fold_note)
            written += case_files
            log(f"[{i}/{len(cases)}] {case}: wrote {len(case_files)} file(s) in {time.perf_counter() - start:.1f} s")
            continue
        case_files = []
        volume = int(props["shape_before_cropping"][0]) > 1  # 2D images are read as one-slice volumes
        for z, z_input, note in _slice_plan(slices, seg, gt, props, plans_manager, case):
            png = out_dir / (f"{case}_guides.png" if slices == "max" else f"{case}_slice{z_input:03d}_guides.png")
            where = f" slice {z_input}{note}" if volume else ""
            _render_png(data[:, z], guides[:, z], seg[z], gt[z] if gt is not None else None, labels,
                        f"{case}{where}{fold_note}", png)
            case_files.append(png)
        if nifti:
            case_files += _write_nifti(guides, props, plans_manager, cm, labels, out_dir, case)
        written += case_files
        log(f"[{i}/{len(cases)}] {case}: wrote {len(case_files)} file(s) in {time.perf_counter() - start:.1f} s")
    return written


if __name__ == "__main__":
    sys.exit(main())
