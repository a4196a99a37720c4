"""Overlay preview of a CT and an organ mask: axial, coronal and sagittal slices in one PNG.

    python -m flare_infer preview examples/inputs/FLARE22_Ex_0001_0000.nii.gz \
        examples/labels/FLARE22_Ex_0001.nii.gz [--out PREVIEW.png] [--debug]   (or python -m flare_infer.preview)

Without --out the picture goes to outputs/previews/NAME.png (NAME: the mask's case name, else the CT's),
never beside the inputs. A file that cannot be read, or a mask on another grid than the CT, is one line
(`error: <file>: <reason>`), exit 2.

Each view shows the slice with the most organs in the mask (the volume's centre without one), after
reorienting both images to LPS, so the picture reads the radiological way whatever the file's
direction matrix: patient right on the image's left in axial and coronal views, anterior at the
top of the axial view, head at the top of coronal and sagittal ones. Pixels are drawn with their
physical aspect ratio. matplotlib is imported only here (the inference container may lack it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from flare_infer.labels import ORGANS

# One fixed colour per organ value 1..13 (distinct on a grey CT), the same in every preview.
ORGAN_COLOURS: dict[int, str] = {
    1: "#d62728", 2: "#1f77b4", 3: "#2ca02c", 4: "#ff7f0e", 5: "#e377c2", 6: "#17becf", 7: "#bcbd22",
    8: "#9467bd", 9: "#8c564b", 10: "#7f7f7f", 11: "#ffdd57", 12: "#00ff7f", 13: "#00008b",
}
WINDOW_HU = (-160.0, 240.0)  # abdominal soft-tissue window (level 40, width 400)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError(
            "the preview needs matplotlib, which is not installed here; "
            "install it (pip install matplotlib) or run without --preview"
        ) from e
    return plt


def _slices_zyx(shape_zyx: tuple[int, ...], lab_zyx: np.ndarray | None) -> tuple[int, int, int]:
    """Per axis, the slice showing the most organs (ties: the one nearest the mask's centre).

    Without a mask (or an empty one), the volume's centre.
    """
    if lab_zyx is None or not lab_zyx.any():
        return tuple(s // 2 for s in shape_zyx)
    centre = np.argwhere(lab_zyx > 0).mean(0)
    out = []
    for axis in range(3):
        moved = np.moveaxis(lab_zyx, axis, 0).reshape(shape_zyx[axis], -1)
        counts = np.array([len(np.unique(row[row > 0])) for row in moved])
        best = np.flatnonzero(counts == counts.max())
        out.append(int(best[np.argmin(np.abs(best - centre[axis]))]))
    return tuple(out)


def _views(vol_zyx: np.ndarray, centre_zyx: tuple[int, int, int], spacing_xyz) -> list[tuple[str, np.ndarray, float]]:
    """(title, 2D array with rows top-to-bottom, pixel aspect height/width) for the three planes (LPS volume)."""
    z, y, x = centre_zyx
    sx, sy, sz = spacing_xyz
    # LPS numpy view: axis 0 inferior->superior, axis 1 anterior->posterior, axis 2 right->left.
    return [
        ("axial", vol_zyx[z], sy / sx),  # rows anterior->posterior, columns patient right->left
        ("coronal", vol_zyx[::-1, y, :], sz / sx),  # rows superior->inferior
        ("sagittal", vol_zyx[::-1, :, x], sz / sy),  # rows superior->inferior, columns anterior->posterior
    ]


def save_preview(image: sitk.Image, mask: sitk.Image | None, out_png: str | Path, *, title: str = "",
                 slices_from: sitk.Image | None = None) -> Path:
    """Draw axial, coronal and sagittal slices of `image` with `mask` (labels 1..13) overlaid; write a PNG.

    Args:
        image: the CT (any direction matrix; displayed in LPS).
        mask: uint8 labels on the image's grid, or None for the CT alone.
        out_png: where to write the picture (parent folders are created).
        title: shown above the panels (e.g. the case name).
        slices_from: another mask on the same grid whose organs choose the slices shown (default: `mask`), so
            two previews of one CT (a prediction, its reference) show the same planes.
    """
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    if mask is not None and (mask.GetSize() != image.GetSize()
                             or not np.allclose(mask.GetOrigin(), image.GetOrigin(), atol=1e-3)
                             or not np.allclose(mask.GetDirection(), image.GetDirection(), atol=1e-5)):
        raise ValueError(
            f"mask grid (size {mask.GetSize()}, origin {mask.GetOrigin()}) differs from the image's "
            f"(size {image.GetSize()}, origin {image.GetOrigin()}); pass the mask written for this image"
        )
    img = sitk.DICOMOrient(image, "LPS")
    vol = sitk.GetArrayFromImage(img).astype(np.float32)
    lab = sitk.GetArrayFromImage(sitk.DICOMOrient(mask, "LPS")) if mask is not None else None
    chooser = lab if slices_from is None else sitk.GetArrayFromImage(sitk.DICOMOrient(slices_from, "LPS"))
    centre = _slices_zyx(vol.shape, chooser)
    spacing = img.GetSpacing()
    colours = ["#000000"] + [ORGAN_COLOURS[o.value] for o in ORGANS]
    cmap = ListedColormap(colours)

    fig, axes = plt.subplots(1, 3, figsize=(13, 5.2), dpi=90)
    ct_views = _views(vol, centre, spacing)
    lab_views = _views(lab, centre, spacing) if lab is not None else [None] * 3
    for ax, (name, ct, aspect), lv in zip(axes, ct_views, lab_views, strict=True):
        ax.imshow(ct, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], aspect=aspect, interpolation="nearest")
        if lv is not None:
            ax.imshow(np.ma.masked_equal(lv[1], 0), cmap=cmap, vmin=0, vmax=len(colours) - 1, alpha=0.45,
                      aspect=aspect, interpolation="nearest")
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_xlabel("R  <-  ->  L")
    axes[1].set_xlabel("R  <-  ->  L")
    axes[2].set_xlabel("A  <-  ->  P")
    if lab is not None:
        present = set(np.unique(lab).tolist())
        handles = [Patch(color=ORGAN_COLOURS[o.value],
                         label=f"{o.value} {o.name}" + ("" if o.value in present else " (absent)")) for o in ORGANS]
        fig.legend(handles=handles, loc="lower center", ncol=7, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1 if lab is not None else 0, 1, 0.94 if title else 1))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


DEFAULT_FOLDER = Path("outputs/previews")
DESCRIPTION = """Write an overlay preview PNG of IMAGE (and MASK, if given): axial, coronal and sagittal slices,
read the radiological way (patient right on the image's left)."""


def default_out(image: Path, mask: Path | None) -> Path:
    """outputs/previews/NAME.png: NAME the mask's case name (else the CT's, without its _0000 channel suffix)."""
    name = (mask or image).name
    stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem
    return DEFAULT_FOLDER / f"{stem.removesuffix('_0000')}.png"


def add_arguments(parser) -> None:
    """The options of `python -m flare_infer preview` and `python -m flare_infer.preview`."""
    from flare_infer.cli import add_debug

    parser.add_argument("image", type=Path, metavar="IMAGE", help="the CT (NIfTI, any direction matrix)")
    parser.add_argument("mask", type=Path, nargs="?", metavar="MASK",
                        help="labels 0..13 on the CT's grid (a predict output, a ground truth); omit for the CT alone")
    parser.add_argument("--out", type=Path, metavar="PREVIEW.png",
                        help=f"the PNG to write (default: {DEFAULT_FOLDER}/NAME.png)")
    add_debug(parser)  # fmt: skip


def _read(path: Path) -> sitk.Image:
    from flare_infer.cli import UsageError
    from flare_infer.io import InputError, read_ct

    try:
        return read_ct(path)
    except InputError as e:
        raise UsageError(f"{path}: {e}; give a 3D NIfTI file (.nii.gz or .nii)") from None


def run(args) -> int:
    from flare_infer.cli import UsageError

    image = _read(args.image)
    mask = _read(args.mask) if args.mask is not None else None
    out = args.out or default_out(args.image, args.mask)
    try:
        written = save_preview(image, mask, out, title=args.image.name)
    except ValueError as e:
        raise UsageError(f"{args.mask}: {e}") from None
    print(f"wrote {written}")
    return 0


def _cli(argv: list[str] | None = None, prog: str = "python -m flare_infer.preview") -> None:
    import argparse
    import sys

    from flare_infer.cli import HelpFormatter, one_line_errors

    parser = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter,
                                     description=DESCRIPTION)  # fmt: skip
    add_arguments(parser)
    args = parser.parse_args(argv)
    sys.exit(one_line_errors(lambda: run(args), debug=args.debug))


if __name__ == "__main__":
    _cli()
