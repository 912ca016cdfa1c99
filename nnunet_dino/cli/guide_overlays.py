"""nnUNetv2_dino_guide_overlays: see what DINO contributed.

For every case of an input folder (nnU-Net raw naming, as for nnUNetv2_predict) this writes a PNG with the image,
each guide mask and the predicted segmentation, on the slice with the most predicted foreground. With --nifti the
guide maps are also written as float NIfTI in the input image's geometry (NIfTI inputs).

Everything goes through nnU-Net's own predictor: its preprocessing, sliding window and Gaussian weighting; the guide
maps are stitched by the same sliding window as the logits.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn


class GuideMapNetwork(nn.Module):
    """Wraps a trained GuidedUNet so the sliding window stitches its guide masks (one map per output channel)
    instead of its logits."""

    def __init__(self, guided: nn.Module, num_outputs: int):
        super().__init__()
        self.guided = guided
        self.num_outputs = num_outputs

    def forward(self, x):
        self.guided(x)
        _, masks = self.guided.last_guide
        maps = self.guided.guidance.adapter.token_map_to(masks, x.shape[-2:])
        return maps.expand(-1, self.num_outputs, -1, -1) if maps.shape[1] == 1 else maps


def _render_png(image: np.ndarray, guides: np.ndarray, seg: np.ndarray, labels: list[str], title: str,
                path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 2 + guides.shape[0]
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.6))
    rgb = image.transpose(1, 2, 0) if image.shape[0] == 3 else image[0]
    lo, hi = np.percentile(rgb, (1, 99))
    shown = np.clip((rgb - lo) / max(hi - lo, 1e-6), 0, 1)
    cmap = None if shown.ndim == 3 else "gray"
    axes[0].imshow(shown, cmap=cmap)
    axes[0].set_title("image")
    for k in range(guides.shape[0]):
        axes[1 + k].imshow(shown, cmap=cmap)
        axes[1 + k].imshow(guides[k], cmap="magma", alpha=0.6, vmin=0, vmax=1)
        axes[1 + k].set_title(f"guide: {labels[k]}")
    axes[-1].imshow(shown, cmap=cmap)
    axes[-1].imshow(np.ma.masked_equal(seg, 0), cmap="tab10", alpha=0.5, vmin=0, vmax=9, interpolation="nearest")
    axes[-1].set_title("prediction")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _to_original_geometry(maps: np.ndarray, props: dict, plans_manager, configuration_manager) -> np.ndarray:
    """Preprocessed-space float maps (K, *shape) -> original image geometry, by nnU-Net's own resampling, the
    inverse of its cropping and of its axis transposition."""
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


def write_guide_overlays(model_folder: str, input_folder: str, output_folder: str, fold: int | str = 0,
                         checkpoint: str = "checkpoint_final.pth", nifti: bool = False,
                         device: torch.device = torch.device("cpu")) -> list[Path]:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, use_folds=(fold,), checkpoint_name=checkpoint)
    network = predictor.network
    if not hasattr(network, "guidance"):
        raise SystemExit(f"The model in {model_folder} was not trained with a GuiDINO trainer: it has no guide masks.")
    dataset_json, plans_manager, cm = predictor.dataset_json, predictor.plans_manager, predictor.configuration_manager
    ending = dataset_json["file_ending"]
    cases = create_lists_from_splitted_dataset_folder(input_folder, ending)
    if not cases:
        raise SystemExit(f"No images ending in {ending} found in {input_folder} (nnU-Net naming CASE_0000{ending}).")
    labels = predictor.label_manager.foreground_regions if predictor.label_manager.has_regions else \
        list(dataset_json["labels"].keys())
    preprocessor = cm.preprocessor_class(verbose=False)
    out_dir = Path(output_folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for files in cases:
        case = os.path.basename(files[0])[: -(len(ending) + 5)]
        data, _, props = preprocessor.run_case(files, None, plans_manager, cm, dataset_json)
        data_t = torch.from_numpy(data).float()
        predictor.network = network
        logits = predictor.predict_sliding_window_return_logits(data_t).float()
        seg = predictor.label_manager.convert_logits_to_segmentation(logits).numpy()
        predictor.network = GuideMapNetwork(network, logits.shape[0])
        guides = predictor.predict_sliding_window_return_logits(data_t).float().numpy()
        predictor.network = network
        if seg.ndim == 3:  # (Z, Y, X) volume trained slice-wise: show the slice with most foreground
            z = int(np.argmax((seg > 0).reshape(seg.shape[0], -1).sum(1)))
        else:
            z = None
        pick = (lambda a: a[:, z]) if z is not None else (lambda a: a)
        png = out_dir / f"{case}_guides.png"
        _render_png(pick(data), pick(guides), seg[z] if z is not None else seg, [str(x) for x in labels],
                    f"{case}" + (f" slice {z}" if z is not None else ""), png)
        written.append(png)
        if nifti:
            import SimpleITK as sitk

            if "sitk_stuff" not in props:
                raise SystemExit("--nifti needs NIfTI (SimpleITK-readable) inputs.")
            full = _to_original_geometry(guides, props, plans_manager, cm)
            for k, name in enumerate(labels):
                img = sitk.GetImageFromArray(full[k].astype(np.float32))
                img.SetSpacing(props["sitk_stuff"]["spacing"])
                img.SetOrigin(props["sitk_stuff"]["origin"])
                img.SetDirection(props["sitk_stuff"]["direction"])
                path = out_dir / f"{case}_guide_{k}.nii.gz"
                sitk.WriteImage(img, str(path))
                written.append(path)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write PNG overlays (and optionally NIfTI maps) of GuiDINO guide "
                                                 "masks for a folder of cases.")
    parser.add_argument("-i", required=True, help="input folder (nnU-Net naming, like nnUNetv2_predict -i)")
    parser.add_argument("-o", required=True, help="output folder")
    parser.add_argument("-d", required=True, help="dataset name or id")
    parser.add_argument("-c", default="2d", help="configuration (default 2d)")
    parser.add_argument("-tr", default="nnUNetTrainerGuiDINO", help="trainer class name")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("-f", default="0", help="fold (default 0)")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name")
    parser.add_argument("--nifti", action="store_true", help="also write guide maps as NIfTI in image geometry")
    parser.add_argument("-device", default="cpu", choices=["cpu", "cuda"], help="device (default cpu)")
    args = parser.parse_args(argv)
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    model_folder = get_output_folder(maybe_convert_to_dataset_name(args.d), args.tr, args.p, args.c)
    fold = int(args.f) if args.f != "all" else "all"
    written = write_guide_overlays(model_folder, args.i, args.o, fold, args.chk, args.nifti, torch.device(args.device))
    print(f"wrote {len(written)} files to {args.o}")


if __name__ == "__main__":
    main()
