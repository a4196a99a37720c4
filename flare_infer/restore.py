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
            slabs of input slices (`geometry.lookup_block`), in threads; mixed cells' voxels are marked
    mixed   only voxels whose cell is MIXED. A class can win inside a cell only if its largest corner
            probability reaches a lower bound of the winner's (`winner_floor`: every interpolated probability,
            and every mean of two, lies between its corners' extremes); in most mixed cells two classes remain,
            and the sign of their difference, interpolated from 8 numbers, decides. Most cells are settled from
            their corners' two labels alone (`two_label_cells`), the rest from all 14 probabilities of their
            corners (`candidates`). Cells with three or more candidates: all 14 probabilities, argmax.
            Mixed cells are processed in chunks, each cell with the
            block of input voxels inside it (per axis the voxels whose floor is the cell: a Cartesian product),
            so the interpolation is a few array operations per chunk, and the labels are written by index.
            Blocks are as wide as all but the two widest cells per axis need (`narrowed`): the clamped cells at
            the grid's ends, which would otherwise double a block's size, are a chunk of their own.
The resampled grid outside the body's box is background with certainty (probability 1 for class 0): the labels
are padded by one voxel of background around the box; the probabilities are not: the corners of mixed cells get
a row of one table (`CornerRows`), the stored values or a certain row per class, computed chunk by chunk.
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
    voxels_to_fill,
)
from flare_infer.labels import NUM_CLASSES
from flare_infer.predictor import StoredProbabilities

RESTORE_CHOICES = ("linear", "nearest")
MIXED = 255  # a cell whose 8 corners disagree (labels are 0..13)
_CHUNK_VOXELS = 1 << 18  # input voxels (of mixed cells) per chunk: 1 MB float32 per array, 14 MB for all classes
_SLAB = 4  # input slices per block: a 512 x 512 slab of cell labels is 1 MB, cache-sized
_CORNERS = [(dz, dy, dx) for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]  # the order of (2, 2, 2) tables


@dataclass(frozen=True)
class CellAxis:
    """Per input voxel along one input axis: its cell on the padded box's axis (-1: background), upper weight."""

    cell: np.ndarray  # int64: index of the cell (its lower corner) along the padded box's axis, or -1
    weight: np.ndarray  # float32: weight of the upper corner (0 at the grid's edge, where both are one voxel)


@dataclass(frozen=True)
class CellVoxels:
    """Along one axis of the padded box: for each cell, the input voxels inside it (at most `k`, padded)."""

    offset: np.ndarray  # int64 (cells, k): the voxel's index times its output stride (0 where not valid)
    weight: np.ndarray  # float32 (cells, k): its upper-corner weight
    valid: np.ndarray  # bool (cells, k)


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


def cell_voxels(ax: CellAxis, n_cells: int, out_stride: int) -> CellVoxels:
    """The input voxels of each of `n_cells` cells along one axis (`ax.cell` is monotonic: they are contiguous)."""
    index = np.flatnonzero(ax.cell >= 0)
    cell = ax.cell[index]
    counts = np.bincount(cell, minlength=n_cells)
    k = max(1, int(counts.max(initial=0)))
    order = np.argsort(cell, kind="stable")
    index, cell = index[order], cell[order]
    rank = np.arange(len(cell)) - (np.cumsum(counts) - counts)[cell]
    offset, weight, valid = (
        np.zeros((n_cells, k), np.int64),
        np.zeros((n_cells, k), np.float32),
        np.zeros((n_cells, k), bool),
    )
    offset[cell, rank], weight[cell, rank], valid[cell, rank] = index * out_stride, ax.weight[index], True
    return CellVoxels(offset, weight, valid)


def narrowed(voxels: CellVoxels, widest: int = 2) -> tuple[CellVoxels, np.ndarray]:
    """The same cells with room for as many voxels as all but the `widest` cells hold, and which cells fit in it.

    At the grid's first and last voxel the restore clamps, so the cells there hold the input voxels out to the
    border too: on a CT whose slice spacing equals the model's, the one last cell along z holds 2 slices and every
    other cell 1, and without this split every mixed cell would be computed as 2 slices thick (half of it padding).
    """
    counts = voxels.valid.sum(axis=1)
    k = int(np.sort(counts)[-widest - 1]) if len(counts) > widest else voxels.valid.shape[1]
    k = max(1, k)
    trimmed = CellVoxels(voxels.offset[:, :k], voxels.weight[:, :k], voxels.valid[:, :k])
    return trimmed, counts <= k


@dataclass(frozen=True)
class CornerRows:
    """Rows of `probs.table()` at the 8 corners of given cells of the padded box, computed for those cells only.

    A corner inside the body's box takes its stored row, or the certain row of its label (`table_rows`); outside
    the box, background with certainty (row M). On each axis a cell at the padded box's last voxel has both corners
    on it, as in `cell_labels`.
    """

    row: np.ndarray  # int32 (Z', Y', X'): `StoredProbabilities.row` on the box
    labels: np.ndarray  # uint8 (Z', Y', X'): the labels on the box
    offset: tuple[int, int, int]  # the box's first voxel on the padded box
    cells_shape: tuple[int, int, int]  # the padded box
    certain: int  # M: the table's row of class 0 with certainty

    @classmethod
    def of(cls, probs: StoredProbabilities, labels_zyx: np.ndarray, box_in_region, region_shape) -> CornerRows:
        offset = tuple(b.start or 0 for b in box_in_region)
        return cls(probs.row, labels_zyx, offset, tuple(region_shape), len(probs.values))

    def __call__(self, where: np.ndarray) -> np.ndarray:
        """int32 (8, M): the table rows of the corners of the cells `where` (flat indices on the padded box)."""
        inside, index = [], []
        for c, n, o, size in zip(np.unravel_index(where, self.cells_shape), self.cells_shape, self.offset,
                                 self.labels.shape, strict=True):
            pair = [np.minimum(c + d, n - 1) - o for d in (0, 1)]  # each corner's index on the box
            inside.append([(p >= 0) & (p < size) for p in pair])
            index.append([np.clip(p, 0, size - 1) for p in pair])
        _, ny, nx = self.labels.shape
        row, labels = self.row.reshape(-1), self.labels.reshape(-1)
        rows = np.empty((len(_CORNERS), len(where)), np.int32)
        for k, (dz, dy, dx) in enumerate(_CORNERS):
            flat = (index[0][dz] * ny + index[1][dy]) * nx + index[2][dx]
            stored = row[flat]
            rows[k] = np.where(stored >= 0, stored, np.int32(self.certain) + labels[flat])
            rows[k][~(inside[0][dz] & inside[1][dy] & inside[2][dx])] = self.certain
        return rows


@dataclass(frozen=True)
class RowTable:
    """`StoredProbabilities.table()` with, per row, its label (argmax, first on ties) and its second largest value."""

    values: np.ndarray  # float32 (R, 14)
    label: np.ndarray  # uint8 (R,)
    second: np.ndarray  # float32 (R,)

    @classmethod
    def of(cls, values: np.ndarray) -> RowTable:
        label = values.argmax(axis=1)
        others = values.copy()
        others[np.arange(len(values)), label] = -np.inf
        return cls(values, label.astype(np.uint8), others.max(axis=1, initial=-np.inf))

    @classmethod
    def of_stored(cls, probs: StoredProbabilities) -> RowTable:
        """The table of `probs`, its labels and second largest values taken from `probs.top_two` where it has them."""
        if probs.top_two is None:
            return cls.of(probs.table())
        label, second = probs.top_two  # then the table's 14 certain rows: class k, every other class 0
        return cls(probs.table(), np.concatenate([label, np.arange(NUM_CLASSES, dtype=np.uint8)]),
                   np.concatenate([second, np.zeros(NUM_CLASSES, np.float32)]))  # fmt: skip

    def at(self, rows: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """float32 `values[rows, classes]` (broadcast), by flat index: one gather."""
        return np.take(self.values.reshape(-1), rows.astype(np.int64) * self.values.shape[1] + classes)


def two_label_cells(table: RowTable, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per cell, from the table rows of its 8 corners (8, M): its lowest and highest corner label a <= b, and whether
    they are the only classes that can win in it (then it is settled without the corners' 14 probabilities).

    They are when no corner's second largest probability reaches min over corners of (p_a + p_b) / 2, a lower bound
    of the winner's interpolated probability (`winner_floor`): a class that is not a corner's label has at most that
    second largest there, so no class but a corner label can win; and a third label c is ruled out too, since at a
    corner labelled c both p_a and p_b are at most its second largest, which then reaches the bound. 4 numbers per
    corner instead of 14: 98.5 % of the mixed cells on the bench CT (docs/PERFORMANCE.md); the rest go through
    `candidates`.
    """
    labels = table.label[rows]  # (8, M)
    a, b = labels.min(axis=0), labels.max(axis=0)
    floor = ((table.at(rows, a) + table.at(rows, b)) / 2).min(axis=0)
    return a, b, table.second[rows].max(axis=0) < floor


def winner_floor(corners: np.ndarray) -> np.ndarray:
    """(M,) a lower bound of the largest interpolated probability anywhere in each cell; corners (8, M, 14).

    Anywhere in a cell, max_k p_k >= p_j and >= (p_a + p_b) / 2 for any classes j, a, b; each is a convex combination
    of its corner values, hence at least their minimum. With a, b the two classes of most mass in the cell the second
    bound is tight where two classes meet (one near 1 where the other is near 0). A class whose largest corner
    probability is below the bound cannot win anywhere in the cell.
    """
    low, total = corners[0].copy(), corners[0].copy()  # (M, 14); loops over 8 corners beat axis=0 reductions
    for corner in corners[1:]:
        np.minimum(low, corner, out=low)
        total += corner
    rows = np.arange(corners.shape[1])
    a = total.argmax(axis=1)
    total[rows, a] = -1
    b = total.argmax(axis=1)
    pair_mean = (corners[:, rows, a] + corners[:, rows, b]) / 2  # (8, M)
    return np.maximum(low.max(axis=1), pair_mean.min(axis=0))


def candidates(corners: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per cell (corners (8, M, 14)): the lowest and highest class that can win, and whether more than two can."""
    high = corners[0].copy()
    for corner in corners[1:]:
        np.maximum(high, corner, out=high)
    can_win = high >= winner_floor(corners)[:, None]  # (M, 14); below the floor everywhere: cannot win
    first = can_win.argmax(axis=1)
    last = NUM_CLASSES - 1 - can_win[:, ::-1].argmax(axis=1)
    return first, last, can_win.sum(axis=1) > 2


def trilinear(corners: np.ndarray, w_z: np.ndarray, w_y: np.ndarray, w_x: np.ndarray) -> np.ndarray:
    """(M, kz, ky, kx, ...) values at each cell's voxels from its corners (M, 2, 2, 2, ...) (numpy z, y, x).

    w_z (M, kz), w_y (M, ky), w_x (M, kx): the voxels' upper-corner weights along each axis; along x, then y, then z.
    """
    e = (None,) * (corners.ndim - 4)  # trailing axes (the classes), broadcast
    c = corners
    c = (
        c[:, :, :, 0, None]
        + w_x[(slice(None), None, None, slice(None), *e)] * (c[:, :, :, 1] - c[:, :, :, 0])[:, :, :, None]
    )
    c = c[:, :, 0, None] + w_y[(slice(None), None, slice(None), None, *e)] * (c[:, :, 1] - c[:, :, 0])[:, :, None]
    return c[:, 0, None] + w_z[(slice(None), slice(None), None, None, *e)] * (c[:, 1] - c[:, 0])[:, None]


def label_mixed_cells(cells_zyx, where, table: RowTable, corner_rows: CornerRows, voxels_zyx: list[CellVoxels],
                      out_flat) -> None:  # fmt: skip
    """Write the labels of every input voxel inside the mixed cells `where` (flat indices on the padded box).

    Design note (the mixed-cell settling).
    Invariants: (1) the label written is the argmax of the 14 trilinearly interpolated probabilities, ties to the
    lower class, as a dense per-class interpolation would give (tests/test_restore.py compares against SimpleITK's
    per-class resampling and against `trilinear` over all 14 classes); (2) a class can win in a cell only if its
    largest corner value reaches `winner_floor`, so the classes left out never could have; (3) where two classes
    remain, the sign of their interpolated difference decides, which is the two-class argmax; (4) each voxel
    belongs to one cell and the chunks hold disjoint cells, so the threads write disjoint voxels, no lock.
    Why so: mixed cells are a thin shell around the organs' boundaries, and in 98.5 % of them (the bench CT) two
    labels are all the corners hold, so 4 numbers per corner (`two_label_cells`: label, second largest) settle
    them instead of 14; the voxels of a cell are a Cartesian block, so a chunk is a few array operations, not a
    per-voxel loop.
    Measured gains, each by hand (alternating in-process runs, noted in the commits): table rows only at mixed
    cells' corners 0.6 -> 0.41-0.50 s (de03740); blocks narrowed to all but the two widest cells 0.75 -> 0.58 s
    single-threaded (6595335); two-label settling 0.76 -> 0.55-0.58 s single-threaded (4014fef). The restore's
    cost in the whole command: docs/results/restore.json (timing: median 0.17 s of 1.79 s, bench CT, linear).

    The voxels of a cell are a (kz, ky, kx) block, the product of each axis's voxels (`cell_voxels`); padding
    voxels (`valid` False) are computed and not written.
    """
    cz, cy, cx = np.unravel_index(where, cells_zyx.shape)
    vz, vy, vx = voxels_zyx
    w_z, w_y, w_x = vz.weight[cz], vy.weight[cy], vx.weight[cx]  # (M, kz), (M, ky), (M, kx)
    flat = vz.offset[cz][:, :, None, None] + vy.offset[cy][:, None, :, None] + vx.offset[cx][:, None, None, :]
    valid = vz.valid[cz][:, :, None, None] & vy.valid[cy][:, None, :, None] & vx.valid[cx][:, None, None, :]
    rows = corner_rows(where)  # (8, M)
    first, last, settled = two_label_cells(table, rows)
    first, last = first.astype(np.int64), last.astype(np.int64)
    general = np.zeros(len(where), bool)
    if not settled.all():  # a third label, or a third class that may win: every class's corner values
        corners = table.values[rows[:, ~settled]]  # (8, U, 14)
        first[~settled], last[~settled], general[~settled] = candidates(corners)
    diff = (table.at(rows, first) - table.at(rows, last)).T.reshape(-1, 2, 2, 2)  # (M, dz, dy, dx)
    d = trilinear(diff, w_z, w_y, w_x)  # (M, kz, ky, kx)
    labels = np.where(d >= 0, first[:, None, None, None], last[:, None, None, None]).astype(np.uint8)  # ties: lower
    if general.any():  # three or more candidates: every class
        at = table.values[rows[:, general]].transpose(1, 0, 2).reshape(-1, 2, 2, 2, NUM_CLASSES)  # (G, 2, 2, 2, 14)
        c = trilinear(at, w_z[general], w_y[general], w_x[general])
        labels[general] = c.argmax(axis=-1)
    out_flat[flat[valid]] = labels[valid]


def probabilities_to_image_grid(
    labels_zyx: np.ndarray,
    probabilities: StoredProbabilities,
    box_zyx: tuple[slice, slice, slice],
    grid: Grid,
    image: sitk.Image,
) -> sitk.Image:
    """uint8 argmax of the class probabilities interpolated trilinearly onto `image`'s exact grid.

    Args:
        labels_zyx: uint8 (Z', Y', X') labels on the box: the argmax of the stored probabilities where there are
            some (the cells' shortcut relies on it), the certain label elsewhere.
        probabilities: class probabilities on the box, stored at least at every voxel with a 26-neighbour of another
            label (`predictor.StoredProbabilities`).
        box_zyx: the box on `grid`'s (Z, Y, X) array; outside it the grid is background with certainty.
        grid: the resampled grid (canonical orientation, the model's spacing).
        image: the input; the output has its size, spacing, origin and direction, checked against the grid the
            voxel map implies (`geometry.check_implied_grid`).
    """
    if labels_zyx.shape != probabilities.shape:
        raise GridMismatchError(
            f"labels {labels_zyx.shape} and probabilities {probabilities.shape} must be on the same box"
        )
    vmap = voxel_map(image, grid)
    if vmap is None:  # resampling keeps the canonical direction, a signed permutation of the input's axes
        raise GridMismatchError("the resampled grid's axes are not parallel to the input's: cannot restore")
    region = padded_box(box_zyx, tuple(grid.size_xyz[::-1]))
    offset = tuple(b.start - r.start for b, r in zip(box_zyx, region, strict=True))
    labels = np.zeros([r.stop - r.start for r in region], np.uint8)  # an empty box pads to background voxels
    box_in_region = tuple(slice(o, o + n) for o, n in zip(offset, labels_zyx.shape, strict=True))
    labels[box_in_region] = labels_zyx
    cells = cell_labels(labels)
    axes_xyz = [cell_axis(vmap, a, region[2 - vmap.axes[a]]) for a in range(3)]
    out = sitk.Image([int(n) for n in vmap.image_size_xyz], sitk.sitkUInt8)
    out_zyx = voxels_to_fill(out)  # every voxel is written below, into the mask's own buffer: no copy at the end

    def block(z0: int) -> None:  # every voxel's cell label (MIXED in mixed cells), a few slices at a time
        out_zyx[z0 : z0 + _SLAB] = lookup_block(cells, vmap, [ax.cell for ax in axes_xyz], z0, z0 + _SLAB)

    in_threads(block, range(0, out_zyx.shape[0], _SLAB))
    out_strides = (out_zyx.shape[1] * out_zyx.shape[2], out_zyx.shape[2], 1)  # numpy (z, y, x) = input axes 2, 1, 0
    voxels = [None] * 3  # on the padded box's numpy axes
    for a, ax in enumerate(axes_xyz):
        k = 2 - vmap.axes[a]
        voxels[k] = cell_voxels(ax, cells.shape[k], out_strides[2 - a])
    where = np.flatnonzero(cells == MIXED)
    table = RowTable.of_stored(probabilities)
    rows = CornerRows.of(probabilities, labels_zyx, box_in_region, labels.shape)
    out_flat = out_zyx.reshape(-1)
    chunks = []  # (cells, their voxels): the cells that fit the narrowed blocks, then the few wide ones
    narrow = [narrowed(v) for v in voxels]
    fits = np.ones(len(where), bool)
    for c, (_, fit) in zip(np.unravel_index(where, cells.shape), narrow, strict=True):
        fits &= fit[c]
    for group, group_voxels in ((where[fits], [n for n, _ in narrow]), (where[~fits], voxels)):
        step = max(16, _CHUNK_VOXELS // int(np.prod([v.weight.shape[1] for v in group_voxels])))
        chunks += [(group[i : i + step], group_voxels) for i in range(0, len(group), step)]

    def chunk(item) -> None:  # cells are disjoint: chunks write disjoint voxels, in threads
        some_cells, their_voxels = item
        label_mixed_cells(cells, some_cells, table, rows, their_voxels, out_flat)

    in_threads(chunk, chunks)
    check_implied_grid(vmap, grid, out_zyx, image, what="restored probabilities")
    out.CopyInformation(image)
    return out


def drop_removed(probabilities: StoredProbabilities, labels_zyx: np.ndarray, cleaned_zyx: np.ndarray) -> None:
    """Where post-processing turned a label into background, background with certainty (stored values, in place;
    a voxel without stored values takes its cleaned label, 0, already)."""
    rows = probabilities.row[(cleaned_zyx != labels_zyx) & (probabilities.row >= 0)]
    if len(rows):
        probabilities.values[rows] = 0
        probabilities.values[rows, 0] = 1
        if probabilities.top_two is not None:
            label, second = probabilities.top_two
            label[rows], second[rows] = 0, 0
