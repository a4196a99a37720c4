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
    mixed   only voxels whose cell is MIXED. A class can win inside a cell only if its largest corner
            probability reaches a lower bound of the winner's (`winner_floor`: every interpolated probability,
            and every mean of two, lies between its corners' extremes); in most mixed cells two classes remain,
            and the sign of their difference, interpolated from 8 numbers, decides. Cells with three or more
            candidates: all 14 probabilities, argmax. Corner values are gathered once per mixed cell.
The resampled grid outside the body's box is background with certainty (probability 1 for class 0): the labels
are padded by one voxel of background around the box, the probabilities are not copied.
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
_CELL_CHUNK = 1 << 14  # mixed cells per block of `mixed_cells`: (16384, 8, 14) float32 corners, 7 MB
_SLAB = 4  # input slices per block: a 512 x 512 slab of cell labels is 1 MB, cache-sized
_CORNERS = [(dz, dy, dx) for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]  # the order of (2, 2, 2) tables


@dataclass(frozen=True)
class CellAxis:
    """Per input voxel along one input axis: its cell on the padded box's axis (-1: background), upper weight."""

    cell: np.ndarray  # int64: index of the cell (its lower corner) along the padded box's axis, or -1
    weight: np.ndarray  # float32: weight of the upper corner (0 at the grid's edge, where both are one voxel)


@dataclass(frozen=True)
class MixedCells:
    """The cells whose corners disagree: their candidate classes and corner values, one row per cell."""

    ids: np.ndarray  # int32 on the cell array: the cell's row in the tables below; -1 where it is not mixed
    pair: np.ndarray  # uint8 (M, 2): the two classes that can win in the cell (lower first), if only two can
    diff: np.ndarray  # float32 (M, 2, 2, 2): p[pair 0] - p[pair 1] at the corners (numpy z, y, x offsets)
    general: np.ndarray  # bool (M,): three or more classes can win: interpolate all of them


def check_method(method: str) -> None:
    if method not in RESTORE_CHOICES:
        raise ValueError(f"restore must be one of {RESTORE_CHOICES}, found {method!r}")


def padded_box(box_zyx: tuple[slice, ...], shape_zyx: tuple[int, ...]) -> tuple[slice, ...]:
    """The box grown by one voxel on each side (inside the grid): every cell touching the box lies in it."""
    return tuple(slice(max(0, s.start - 1), min(n, s.stop + 1)) for s, n in zip(box_zyx, shape_zyx, strict=True))


def cell_labels(labels_zyx: np.ndarray) -> np.ndarray:
    """uint8 per cell (corner voxel c and c + 1 on each axis, the last repeated): the common label, or MIXED."""
    z, y, x = labels_zyx.shape
    edge = np.pad(labels_zyx, [(0, 1)] * 3, mode="edge")  # (Z + 1, Y + 1, X + 1)
    same = np.ones(labels_zyx.shape, bool)
    for dz, dy, dx in _CORNERS[1:]:
        same &= edge[dz : dz + z, dy : dy + y, dx : dx + x] == labels_zyx
    return np.where(same, labels_zyx, np.uint8(MIXED))


def cell_axis(vmap: VoxelMap, a: int, region: slice) -> CellAxis:
    """Cells and weights along input axis a; `region` is the padded box on grid axis vmap.axes[a]."""
    n = vmap.grid_size[a]
    cont = vmap.cont(a)
    inside = (cont >= -0.5) & (cont <= n - 0.5)  # ITK's buffer, as the image path: half a voxel around the centres
    clamped = np.clip(cont, 0, n - 1)  # the image path clamps at the edge: the edge voxel's value up to the border
    lo = np.minimum(np.floor(clamped), max(n - 2, 0)).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    in_region = inside & (lo >= region.start) & (hi < region.stop)  # elsewhere all 8 corners are background
    return CellAxis(cell=np.where(in_region, lo - region.start, -1), weight=(clamped - lo).astype(np.float32))


def corner_values(probs_zyxc: np.ndarray, offset_zyx, cells_shape, where: np.ndarray) -> np.ndarray:
    """float32 (M, 8, 14): the probabilities at the 8 corners of the cells `where` (flat indices on the padded box).

    `offset_zyx`: the box's start on the padded box; corners outside the box are background with certainty.
    """
    z, y, x = np.unravel_index(where, cells_shape)
    box_shape = probs_zyxc.shape[:3]
    flat = probs_zyxc.reshape(-1, NUM_CLASSES)
    out = np.empty((len(where), len(_CORNERS), NUM_CLASSES), np.float32)
    for i, step in enumerate(_CORNERS):
        at = [np.minimum(c + d, n - 1) - o for c, d, n, o in zip((z, y, x), step, cells_shape, offset_zyx, strict=True)]
        inside = np.ones(len(where), bool)
        for c, n in zip(at, box_shape, strict=True):
            inside &= (c >= 0) & (c < n)
        index = np.ravel_multi_index([np.clip(c, 0, n - 1) for c, n in zip(at, box_shape, strict=True)], box_shape)
        out[:, i] = flat.take(index, axis=0)
        out[~inside, i] = 0
        out[~inside, i, 0] = 1
    return out


def winner_floor(corners: np.ndarray) -> np.ndarray:
    """(M,) a lower bound of the largest interpolated probability anywhere in each cell; corners (M, 8, 14).

    Anywhere in a cell, max_k p_k >= p_j and >= (p_a + p_b) / 2 for any classes j, a, b; each is a convex combination
    of its corner values, hence at least their minimum. With a, b the two classes of most mass in the cell the second
    bound is tight where two classes meet (one near 1 where the other is near 0). A class whose largest corner
    probability is below the bound cannot win anywhere in the cell.
    """
    low, total = corners[:, 0].copy(), corners[:, 0].copy()  # (M, 14); loops over 8 corners beat axis=1 reductions
    for i in range(1, corners.shape[1]):
        np.minimum(low, corners[:, i], out=low)
        total += corners[:, i]
    rows = np.arange(len(corners))
    a = total.argmax(axis=1)
    total[rows, a] = -1
    b = total.argmax(axis=1)
    pair_mean = (corners[rows, :, a] + corners[rows, :, b]) / 2  # (M, 8)
    return np.maximum(low.max(axis=1), pair_mean.min(axis=1))


def mixed_cells(cells: np.ndarray, probs_zyxc: np.ndarray, offset_zyx) -> MixedCells:
    """Candidates and corner values of every MIXED cell of `cells` (the padded box; the box at `offset_zyx`)."""
    where = np.flatnonzero(cells == MIXED)
    pair = np.zeros((len(where), 2), np.uint8)
    diff = np.zeros((len(where), 8), np.float32)
    general = np.zeros(len(where), bool)
    for start in range(0, len(where), _CELL_CHUNK):  # (chunk, 8, 14) float32 corners: a few MB at a time
        rows = slice(start, start + _CELL_CHUNK)
        corners = corner_values(probs_zyxc, offset_zyx, cells.shape, where[rows])
        high = corners[:, 0].copy()
        for i in range(1, corners.shape[1]):
            np.maximum(high, corners[:, i], out=high)
        candidate = high >= winner_floor(corners)[:, None]  # (chunk, 14); below the floor everywhere: cannot win
        first = candidate.argmax(axis=1)
        last = NUM_CLASSES - 1 - candidate[:, ::-1].argmax(axis=1)
        n = np.arange(len(first))
        pair[rows] = np.stack([first, last], axis=1)
        diff[rows] = corners[n, :, first] - corners[n, :, last]
        general[rows] = candidate.sum(axis=1) > 2
    ids = np.full(cells.shape, -1, np.int32)
    ids.flat[where] = np.arange(len(where), dtype=np.int32)
    return MixedCells(ids, pair, diff.reshape(-1, 2, 2, 2), general)


def interpolate_all(probs_zyxc, offset_zyx, cells_shape, cell_zyx, weight_zyx) -> np.ndarray:
    """Argmax (uint8) of all 14 probabilities interpolated at voxels given by cell and weights (padded box axes)."""
    box_shape = probs_zyxc.shape[:3]
    flat = probs_zyxc.reshape(-1, NUM_CLASSES)
    parts = []  # per axis: (box index of the lower corner, its weight), (... of the upper corner)
    for c, w, n, o in zip(cell_zyx, weight_zyx, cells_shape, offset_zyx, strict=True):
        parts.append(((c - o, 1.0 - w), (np.minimum(c + 1, n - 1) - o, w)))
    acc = np.zeros((len(cell_zyx[0]), NUM_CLASSES), np.float32)  # (M, 14)
    for z, w_z in parts[0]:
        for y, w_y in parts[1]:
            for x, w_x in parts[2]:
                at = (z, y, x)
                inside = np.ones(len(z), bool)
                for c, n in zip(at, box_shape, strict=True):
                    inside &= (c >= 0) & (c < n)
                values = np.zeros((len(z), NUM_CLASSES), np.float32)
                values[:, 0] = 1  # outside the box: background with certainty
                if inside.any():
                    index = np.ravel_multi_index([c[inside] for c in at], box_shape)
                    values[inside] = flat.take(index, axis=0)
                acc += (w_z * w_y * w_x)[:, None] * values
    return acc.argmax(axis=1).astype(np.uint8)


def interpolate_mixed(mixed: MixedCells, probs_zyxc, offset_zyx, cell_zyx, weight_zyx) -> np.ndarray:
    """Labels (uint8) of voxels in MIXED cells, given their cells and upper-corner weights per padded-box axis."""
    row = mixed.ids[cell_zyx[0], cell_zyx[1], cell_zyx[2]]
    general = mixed.general[row]
    out = np.empty(len(row), np.uint8)
    two = ~general
    d = mixed.diff[row[two]]  # (M2, 2, 2, 2)
    for k in (2, 1, 0):  # lerp along x, then y, then z
        w = weight_zyx[k][two].reshape((-1,) + (1,) * k)
        d = d[..., 0] + w * (d[..., 1] - d[..., 0])
    pair = mixed.pair[row[two]]
    out[two] = np.where(d >= 0, pair[:, 0], pair[:, 1])  # on a tie the lower class, as argmax
    if general.any():
        out[general] = interpolate_all(
            probs_zyxc, offset_zyx, mixed.ids.shape, [c[general] for c in cell_zyx], [w[general] for w in weight_zyx]
        )
    return out


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
        probabilities_zyxc: float16 (Z', Y', X', 14) class probabilities on the box (a shift common to all classes,
            as predictor.PROBABILITY_FLOOR, changes nothing).
        box_zyx: the box on `grid`'s (Z, Y, X) array; outside it the grid is background with certainty.
        grid: the resampled grid (canonical orientation, the model's spacing).
        image: the input; the output has its size, spacing, origin and direction, checked against the grid the
            voxel map implies (`geometry.check_implied_grid`).
    """
    if labels_zyx.shape != probabilities_zyxc.shape[:3] or probabilities_zyxc.shape[3:] != (NUM_CLASSES,):
        raise GridMismatchError(
            f"labels {labels_zyx.shape} and probabilities {probabilities_zyxc.shape} must be (Z, Y, X) and "
            f"(Z, Y, X, {NUM_CLASSES}) on the same box"
        )
    vmap = voxel_map(image, grid)
    if vmap is None:  # resampling keeps the canonical direction, a signed permutation of the input's axes
        raise GridMismatchError("the resampled grid's axes are not parallel to the input's: cannot restore")
    region = padded_box(box_zyx, tuple(grid.size_xyz[::-1]))
    offset = tuple(b.start - r.start for b, r in zip(box_zyx, region, strict=True))
    labels = np.zeros([r.stop - r.start for r in region], np.uint8)  # an empty box pads to background voxels
    labels[tuple(slice(o, o + n) for o, n in zip(offset, labels_zyx.shape, strict=True))] = labels_zyx
    cells = cell_labels(labels)
    mixed = mixed_cells(cells, probabilities_zyxc, offset)
    axes_xyz = [cell_axis(vmap, a, region[2 - vmap.axes[a]]) for a in range(3)]
    idx_xyz = [ax.cell for ax in axes_xyz]
    out_zyx = np.empty([vmap.image_size_xyz[a] for a in (2, 1, 0)], np.uint8)

    def block(z0: int) -> None:
        z1 = min(z0 + _SLAB, out_zyx.shape[0])
        slab = lookup_block(cells, vmap, idx_xyz, z0, z1)
        flat = np.flatnonzero(slab == MIXED)
        if len(flat):
            coords_xyz = np.unravel_index(flat, slab.shape)[::-1]  # output (x, y, z) = input axes 0, 1, 2
            coords_xyz = (coords_xyz[0], coords_xyz[1], coords_xyz[2] + z0)
            cell, weight = [None] * 3, [None] * 3  # on the padded box's numpy axes (z, y, x)
            for a, ax in enumerate(axes_xyz):
                k = 2 - vmap.axes[a]
                cell[k], weight[k] = ax.cell[coords_xyz[a]], ax.weight[coords_xyz[a]]
            slab.flat[flat] = interpolate_mixed(mixed, probabilities_zyxc, offset, cell, weight)
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
