"""Restore the network's output onto the input's exact grid: class probabilities (linear) or labels (nearest).

`linear` (the default, as nnU-Net): the class probabilities of the resampled grid are interpolated trilinearly
in physical space at every input voxel centre (the image path's mapping: input index -> physical -> resampled
continuous index; clamped inside the grid's edge, background outside it), then the argmax is taken there.
`nearest`: each input voxel takes the label of the nearest resampled voxel (`geometry.labels_to_image_grid`).
At 3 x 3 x 4 mm on a 0.8 mm CT nearest makes every label a block of about 4 x 4 pixels; measured on full-size
phantoms with the shipped weights, linear gains mean DSC and NSD (docs/INFERENCE.md, "Restore").

Linear never holds a 14-class volume at the input's resolution, and interpolates only where it can matter:
    cells   every cell of 8 neighbouring resampled voxels gets their common argmax, or MIXED if they differ;
            where all 8 share one argmax, every convex combination of their probabilities keeps it, so
            the cell's label is the exact answer for every input voxel inside it, without arithmetic
    lookup  per input voxel, the cell below its continuous index (floor, per axis): three 1D lookups in
            slabs of input slices (`geometry.lookup_block`), in threads
    mixed   only voxels whose cell is MIXED: the 8 corner probability vectors, weighted, summed, argmax
The resampled grid outside the body's box is background with certainty (probability 1 for class 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from flare_infer.geometry import (
    Grid,
    GridMismatchError,
    VoxelMap,
    check_implied_grid,
    in_threads,
    lookup_block,
    voxel_map,
)
from flare_infer.labels import NUM_CLASSES

RESTORE_CHOICES = ("linear", "nearest")
MIXED = 255  # a cell whose 8 corners disagree (labels are 0..13)
_SLAB = 4  # input slices per block: a 512 x 512 slab of cell labels is 1 MB, cache-sized


@dataclass(frozen=True)
class CellAxis:
    """Per input voxel along one input axis: its cell (-1: background for sure) and the corner offsets, weight."""

    cell: np.ndarray  # int64: index of the cell along the padded region's axis, or -1
    lo: np.ndarray  # int64: offset (in probability vectors) of the lower corner in the padded array
    hi: np.ndarray  # int64: ... of the upper corner (== lo at the grid's edge)
    weight: np.ndarray  # float32: weight of the upper corner


def check_method(method: str) -> None:
    if method not in RESTORE_CHOICES:
        raise ValueError(f"restore must be one of {RESTORE_CHOICES}, found {method!r}")


def padded_box(box_zyx: tuple[slice, ...], shape_zyx: tuple[int, ...]) -> tuple[slice, ...]:
    """The box grown by one voxel on each side (inside the grid): every cell touching the box lies in it."""
    return tuple(slice(max(0, s.start - 1), min(n, s.stop + 1)) for s, n in zip(box_zyx, shape_zyx, strict=True))


def pad_outputs(labels_zyx, probabilities_zyxc, box_zyx, shape_zyx):
    """Labels and probabilities on the padded box: the box's own, background with certainty around it."""
    region = padded_box(box_zyx, shape_zyx)
    inner = tuple(slice(b.start - r.start, b.stop - r.start) for b, r in zip(box_zyx, region, strict=True))
    size = tuple(r.stop - r.start for r in region)
    labels = np.zeros(size, np.uint8)
    labels[inner] = labels_zyx
    probs = np.zeros((*size, NUM_CLASSES), np.float16)
    probs[..., 0] = 1
    probs[inner] = probabilities_zyxc
    return labels, probs, region


def cell_labels(labels_zyx: np.ndarray) -> np.ndarray:
    """uint8 per cell (corner voxel c and c + 1 on each axis, the last repeated): the common label, or MIXED."""
    z, y, x = labels_zyx.shape
    edge = np.pad(labels_zyx, [(0, 1)] * 3, mode="edge")  # (Z + 1, Y + 1, X + 1)
    same = np.ones(labels_zyx.shape, bool)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                if dz or dy or dx:
                    same &= edge[dz : dz + z, dy : dy + y, dx : dx + x] == labels_zyx
    return np.where(same, labels_zyx, np.uint8(MIXED))


def cell_axis(vmap: VoxelMap, a: int, region: slice, stride: int) -> CellAxis:
    """Cells and corners along input axis a; `region` is the padded box on grid axis vmap.axes[a]."""
    n = vmap.grid_size[a]
    cont = vmap.cont(a)
    inside = (cont >= -0.5) & (cont <= n - 0.5)  # ITK's buffer, as the image path: half a voxel around the centres
    clamped = np.clip(cont, 0, n - 1)  # the image path clamps at the edge: the edge voxel's value up to the border
    lo = np.minimum(np.floor(clamped), max(n - 2, 0)).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    weight = (clamped - lo).astype(np.float32)
    in_region = inside & (lo >= region.start) & (hi < region.stop)  # elsewhere all 8 corners are background
    cell = np.where(in_region, lo - region.start, -1)
    lo_off = np.clip(lo - region.start, 0, None) * stride
    hi_off = np.clip(hi - region.start, 0, None) * stride
    return CellAxis(cell=cell, lo=lo_off, hi=hi_off, weight=weight)


def interpolate_at(probs_flat: np.ndarray, axes_zyx: list[CellAxis], coords_zyx: list[np.ndarray]) -> np.ndarray:
    """Argmax (uint8) of the trilinearly interpolated probabilities at the given voxels (output z, y, x indices)."""
    acc = np.zeros((len(coords_zyx[0]), probs_flat.shape[1]), np.float32)  # (M, 14)
    parts = []
    for ax, coord in zip(axes_zyx, coords_zyx, strict=True):
        w = ax.weight[coord]
        parts.append(((ax.lo[coord], 1.0 - w), (ax.hi[coord], w)))
    for off_z, w_z in parts[0]:
        for off_y, w_y in parts[1]:
            w_zy = w_z * w_y
            off_zy = off_z + off_y
            for off_x, w_x in parts[2]:
                acc += (w_zy * w_x)[:, None] * probs_flat[off_zy + off_x]
    return acc.argmax(axis=1).astype(np.uint8)


def probabilities_to_image_grid(
    labels_zyx: np.ndarray,
    probabilities_zyxc: np.ndarray,
    box_zyx: tuple[slice, slice, slice],
    grid: Grid,
    image: sitk.Image,
) -> sitk.Image:
    """uint8 argmax of the class probabilities interpolated trilinearly onto `image`'s exact grid.

    Args:
        labels_zyx: uint8 (Z', Y', X') argmax of `probabilities_zyxc` on the box (the cells' shortcut relies on it).
        probabilities_zyxc: float16 (Z', Y', X', 14) class probabilities on the box.
        box_zyx: the box on `grid`'s (Z, Y, X) array; outside it the grid is background with certainty.
        grid: the resampled grid (canonical orientation, the model's spacing).
        image: the input; the output has its size, spacing, origin and direction (checked, see below).
    """
    shape_zyx = tuple(grid.size_xyz[::-1])
    if labels_zyx.shape != probabilities_zyxc.shape[:3] or probabilities_zyxc.shape[3:] != (NUM_CLASSES,):
        raise GridMismatchError(
            f"labels {labels_zyx.shape} and probabilities {probabilities_zyxc.shape} must be (Z, Y, X) and "
            f"(Z, Y, X, {NUM_CLASSES}) on the same box"
        )
    vmap = voxel_map(image, grid)
    if vmap is None:  # resampling keeps the canonical direction, a signed permutation of the input's axes
        raise GridMismatchError("the resampled grid's axes are not parallel to the input's: cannot restore")
    labels, probs, region = pad_outputs(labels_zyx, probabilities_zyxc, box_zyx, shape_zyx)
    cells = cell_labels(labels)  # an empty box still pads to one background voxel: all background
    strides = (probs.shape[1] * probs.shape[2], probs.shape[2], 1)  # in probability vectors, numpy (z, y, x)
    axes_xyz = [cell_axis(vmap, a, region[2 - vmap.axes[a]], strides[2 - vmap.axes[a]]) for a in range(3)]
    idx_xyz = [ax.cell for ax in axes_xyz]
    probs_flat = probs.reshape(-1, NUM_CLASSES)
    out_zyx = np.empty([vmap.image_size_xyz[a] for a in (2, 1, 0)], np.uint8)

    def block(z0: int) -> None:
        z1 = min(z0 + _SLAB, out_zyx.shape[0])
        slab = lookup_block(cells, vmap, idx_xyz, z0, z1)
        zz, yy, xx = np.nonzero(slab == MIXED)
        if len(zz):
            slab[zz, yy, xx] = interpolate_at(probs_flat, axes_xyz[::-1], [zz + z0, yy, xx])
        out_zyx[z0:z1] = slab

    in_threads(block, range(0, out_zyx.shape[0], _SLAB))
    check_implied_grid(vmap, grid, out_zyx, image, what="restored probabilities")
    out = sitk.GetImageFromArray(out_zyx)
    out.CopyInformation(image)
    return out


def drop_removed(probabilities_zyxc: np.ndarray, labels_zyx: np.ndarray, cleaned_zyx: np.ndarray) -> np.ndarray:
    """Probabilities where post-processing turned a label into background made background-certain (in place)."""
    removed = cleaned_zyx != labels_zyx
    if removed.any():
        probabilities_zyxc[removed] = 0
        probabilities_zyxc[removed, 0] = 1
    return probabilities_zyxc
