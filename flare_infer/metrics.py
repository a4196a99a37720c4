"""DSC and NSD exactly as the FLARE22 organisers computed them, plus a fast cropped NSD.

The organisers scored with DeepMind's surface-distance code (Nikolov et al., the `SurfaceDice.py`
beside `FLARE22_DSC_NSD_Eval.py`): surface elements ("surfels") are the corner points of the voxel
grid whose 2 x 2 x 2 neighbourhood is mixed, each weighted by the area in mm^2 of the marching-cubes
surface inside that neighbourhood (a 256-entry table of normals, scaled by the spacing); the
distance of a surfel to the other surface is the Euclidean distance transform of the other mask's
surfels with `sampling=spacing`. NSD = (GT surfel area within tol of the prediction + prediction
surfel area within tol of the GT) / (all GT + all prediction surfel area).

Two implementations of the same algorithm, with the same numbers:
- `reference_surface_distances` + `surface_dice_at_tolerance`: the organisers' code path as written
  (whole masks in, crop to the union bounding box, Python `sorted(zip(...))`).
- `fast_surface_dice`: no distance transform at all. Each mask's surfels come from its own bounding
  box; the distance of a surfel to the other surface is the distance to the nearest surfel of the
  other mask, found by trying the grid offsets within `tol`, nearest first, in a grid marking the
  other mask's surfels (a k-d tree for what is left after many tries); surfels farther away are
  misses and get inf. Distances by the distance transform's own formula. Sorting by numpy, not Python.

Arrays are in the organisers' axis order: (x, y, z) as nibabel loads a NIfTI, with the spacing
(x, y, z) from the header. Pure numpy + scipy.ndimage (imported where used: `import_scipy` runs the
import early, e.g. while the files are read; scipy.spatial only for the k-d tree's rare cases);
`python -m flare_infer.evaluate` is the command.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------------------------------------
# Surfel-normal table. Derived from `_NEIGHBOUR_CODE_TO_NORMALS` in DeepMind's surface-distance
# (surface_distance/lookup_tables.py), Copyright 2018 Google Inc., licensed under the Apache
# License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0); distributed on an "AS IS"
# BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND. Change: stored compactly. Only |component|
# matters for the area, and every component is a multiple of 1/8, so each normal is three digits
# (|component| * 8); codes 128..255 are the complements of 127..0, whose normals have the same
# magnitudes in the same order (checked against the original table for all 256 codes).
# Entries ";"-separated by code 0..127, normals " "-separated.
# ---------------------------------------------------------------------------------------------
_NORMALS_ABS_EIGHTHS = (
    "000;111;111;220 220;111;202 202;111 111;400 222 111;111;111 111;202 202;400 222 111;220 220;400 222 "
    "111;400 222 111;400 400;111;022 022;111 111;040 222 111;111 111;004 222 111;111 111 111;111 222 222 "
    "111;111 111;022 022 111;202 202 111;111 333 022 202;111 220 220;333 022 111 220;400 111 222 111;400 "
    "111 222;111;111 111;022 022;040 111 222;111 111;111 202 202;022 022 111;333 022 111 202;111 111;111 "
    "111 111;004 222 111;222 222 111 111;111 220 220;400 222 111 111;022 333 111 220;400 222 111;220 220;"
    "040 222 111;040 111 222;040 040;220 220 111;333 202 111 220;111 040 222 111;040 222 111;111 220 220;"
    "040 222 111 111;333 220 111 202;040 222 111;220 220 220 220;220 220 111;111 220 220;220 220;111;111 "
    "111;111 111;111 220 220;022 022;004 222 111;022 022 111;333 022 111 220;111 111;111 111 111;111 202 "
    "202;400 222 111 111;040 222 111;222 222 111 111;202 333 022 111;400 222 111;202 202;004 222 111;111 "
    "202 202;202 333 220 111;004 222 111;004 004;111 111 222 004;111 222 004;202 202 111;004 222 111 111;"
    "202 202 202 202;111 202 202;202 333 220 111;004 222 111;111 202 202;202 202;111 111;111 111 111;111 "
    "022 022;040 111 222 111;022 022 111;004 222 111 111;022 022 022 022;022 022 111;111 111 111;111 111 "
    "111 111;004 222 111 111;111 111 111;040 222 111 111;111 111 111;022 022 111;111 111;400 222 111;222 "
    "111 222 111;333 022 111 202;040 222 111;333 220 022 111;111 222 004;111 022 022;022 022;400 222 111 "
    "111;111 111 111;202 202 111;111 111;220 220 111;111 111;111 111;111"
)

# Weights of the 8 voxels of a 2 x 2 x 2 neighbourhood in the neighbour code (DeepMind's kernel).
ENCODE_KERNEL = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]], dtype=np.uint8)


@functools.lru_cache(maxsize=1)
def _normals_by_code() -> tuple[np.ndarray, ...]:
    """256 arrays (k, 3) of |normal| components; code c and 255 - c share one entry."""
    half = [
        np.array([[int(d) / 8.0 for d in normal] for normal in entry.split(" ")], dtype=np.float64)
        for entry in _NORMALS_ABS_EIGHTHS.split(";")
    ]
    assert len(half) == 128, len(half)
    return tuple(half + half[::-1])


@functools.lru_cache(maxsize=64)
def surfel_area_table(spacing_xyz: tuple[float, float, float]) -> np.ndarray:
    """Area in mm^2 of the surface inside each of the 256 neighbour codes, for this spacing.

    The same loop and operation order as DeepMind's `create_table_neighbour_code_to_surface_area`,
    so the areas are bit-identical to the organisers'.
    """
    s0, s1, s2 = spacing_xyz
    table = np.zeros(256)
    for code, normals in enumerate(_normals_by_code()):
        total = 0.0
        for normal in normals:
            scaled = np.array([normal[0] * s1 * s2, normal[1] * s0 * s2, normal[2] * s0 * s1])
            total += np.linalg.norm(scaled)
        table[code] = total
    table.flags.writeable = False  # cached: one array for every caller
    return table


def import_scipy() -> None:
    """Import the scipy part scoring needs (scipy.ndimage, about 0.5 s of CPU), e.g. while ITK reads the files.

    Each function imports what it uses itself, so this only moves the cost to a moment of your choice.
    scipy.spatial is left out: only `_nearest_by_tree` needs it, for predictions far from their GT.
    """
    import scipy.ndimage  # noqa: F401


def organiser_spacing(spacing_xyz) -> tuple[float, float, float]:
    """The spacing as nibabel's `header.get_zooms()` gives it: float32 values (the NIfTI pixdim type).

    SimpleITK returns doubles; rounding them to float32 reproduces the organisers' numbers exactly
    (e.g. 0.8 becomes 0.800000011920929, as it did for them).
    """
    spacing = tuple(float(np.float32(s)) for s in spacing_xyz)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_xyz must be three positive numbers (mm), found {spacing_xyz!r}")
    return spacing


def dice(mask_gt: np.ndarray, mask_pred: np.ndarray) -> float:
    """Soerensen-Dice of two bool masks; NaN when both are empty (as the organisers' code)."""
    volume_sum = int(mask_gt.sum()) + int(mask_pred.sum())
    if volume_sum == 0:
        return float("nan")
    intersection = int(np.logical_and(mask_gt, mask_pred).sum())
    return float(np.float64(2 * intersection) / np.float64(volume_sum))


# ------------------------------------------------------------------------------------- shared
def find_boxes(labels: np.ndarray, max_label: int = 0) -> list[tuple[slice, ...] | None]:
    """`ndimage.find_objects`, run in memory order on the box of the nonzero voxels only.

    The (x, y, z) arrays here are usually transposed views of SimpleITK's (z, y, x) ones (or crops of
    them): the pass runs over the transpose, which is in memory order, and the boxes are transposed
    back (5x less CPU for a 512 x 512 x 300 volume than striding through the view). find_objects costs
    a few ns per voxel; two max-reductions (a fraction of a ns per voxel) find the nonzero box first,
    and find_objects runs inside it (organs fill a fraction of a CT).
    """
    if labels.flags.f_contiguous and not labels.flags.c_contiguous:
        return [None if box is None else box[::-1] for box in _find_boxes_c_order(labels.T, max_label)]
    return _find_boxes_c_order(labels, max_label)


def _find_boxes_c_order(labels: np.ndarray, max_label: int) -> list[tuple[slice, ...] | None]:
    from scipy import ndimage

    if labels.ndim != 3 or not labels.flags.c_contiguous or labels.dtype.kind not in "biu" or labels.size == 0:
        return ndimage.find_objects(labels, max_label)
    planes = np.flatnonzero(labels.reshape(len(labels), -1).max(axis=1))  # first axis: planes holding a label
    if len(planes) == 0:
        return [None] * max_label if max_label else []
    z0, z1 = planes[0], planes[-1] + 1
    footprint = labels[z0:z1].max(axis=0)  # (Y, X): the largest label over those planes
    rows, cols = np.flatnonzero(footprint.max(axis=1)), np.flatnonzero(footprint.max(axis=0))
    start = (z0, rows[0], cols[0])
    found = ndimage.find_objects(labels[z0:z1, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], max_label)
    return [
        None if box is None else tuple(slice(b.start + o, b.stop + o) for b, o in zip(box, start, strict=True))
        for box in found
    ]


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive (min, max) voxel index per axis of a bool mask, or None when empty."""
    if mask.size == 0:  # a GT organ on one slice, cut to [z_min, z_max): nothing left
        return None
    found = find_boxes(mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8, copy=False))
    if not found or found[0] is None:
        return None
    box = found[0]
    return np.array([s.start for s in box]), np.array([s.stop - 1 for s in box])


def _neighbour_codes(mask: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Neighbour code of every grid corner of mask[lo:hi + 1], as DeepMind computes it.

    DeepMind correlates the mask with `ENCODE_KERNEL` (zero outside); here the same sum of the 8
    weighted neighbours is built from 8 shifted views of a zero-padded copy (weights are distinct
    bits, so OR is the sum): equal to `ndimage.correlate` (tests check it), 3x faster. Output index i
    is the corner between voxels lo + i - 1 and lo + i (shape n + 1; the last index per axis is
    always code 0).
    """
    n = hi - lo + 1
    padded = np.zeros(tuple(n + 2), np.uint8)
    padded[1:-1, 1:-1, 1:-1] = mask[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1]
    codes = np.zeros(tuple(n + 1), np.uint8)
    for (a, b, c), weight in np.ndenumerate(ENCODE_KERNEL):
        codes |= padded[a : a + n[0] + 1, b : b + n[1] + 1, c : c + n[2] + 1] << np.uint8(int(weight).bit_length() - 1)
    return codes


def _neighbour_codes_correlate(mask: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """DeepMind's own computation of `_neighbour_codes` (`ndimage.correlate`), kept for the tests."""
    from scipy import ndimage

    crop = np.zeros(tuple(hi - lo + 2), np.uint8)
    crop[:-1, :-1, :-1] = mask[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1]
    return ndimage.correlate(crop, ENCODE_KERNEL, mode="constant", cval=0)


def _borders(codes: np.ndarray) -> np.ndarray:
    return (codes != 0) & (codes != 255)


def _edt_or_inf(borders: np.ndarray, spacing_xyz: tuple[float, float, float]) -> np.ndarray:
    if borders.any():
        from scipy import ndimage

        return ndimage.distance_transform_edt(~borders, sampling=spacing_xyz)
    return np.full(borders.shape, np.inf)


def _check_masks(mask_gt: np.ndarray, mask_pred: np.ndarray) -> None:
    if mask_gt.shape != mask_pred.shape or mask_gt.ndim != 3:
        raise ValueError(
            f"expected two 3-D masks of one shape, found {mask_gt.shape} (GT) and {mask_pred.shape} (prediction)"
        )


# ---------------------------------------------------------------------------------- reference
@dataclass(frozen=True)
class SurfaceDistances:
    """Per-surfel distances (mm) to the other surface and areas (mm^2), sorted by (distance, area)."""

    distances_gt_to_pred: np.ndarray
    distances_pred_to_gt: np.ndarray
    surfel_areas_gt: np.ndarray
    surfel_areas_pred: np.ndarray


def _sort_python(distances: np.ndarray, areas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if distances.shape == (0,):
        return distances, areas
    pairs = np.array(sorted(zip(distances, areas, strict=True)))  # the organisers' (slow) sort
    return pairs[:, 0], pairs[:, 1]


def reference_surface_distances(
    mask_gt: np.ndarray, mask_pred: np.ndarray, spacing_xyz, *, crop_to_union: bool = True
) -> SurfaceDistances:
    """DeepMind's `compute_surface_distances` as the organisers ran it (the baseline for checks).

    crop_to_union=False runs the distance transforms on the whole volume instead of the union
    bounding box (DeepMind's own crop): the fully straightforward version, same numbers.
    """
    _check_masks(mask_gt, mask_pred)
    spacing = tuple(float(s) for s in spacing_xyz)
    mask_gt, mask_pred = mask_gt.astype(bool), mask_pred.astype(bool)
    box = _bbox(mask_gt | mask_pred)
    if box is None:
        empty = np.array([])
        return SurfaceDistances(empty, empty, empty, empty)
    lo, hi = box if crop_to_union else (np.zeros(3, int), np.array(mask_gt.shape) - 1)
    codes_gt, codes_pred = _neighbour_codes(mask_gt, lo, hi), _neighbour_codes(mask_pred, lo, hi)
    borders_gt, borders_pred = _borders(codes_gt), _borders(codes_pred)
    distmap_gt, distmap_pred = _edt_or_inf(borders_gt, spacing), _edt_or_inf(borders_pred, spacing)
    areas = surfel_area_table(spacing)
    d_gt, a_gt = _sort_python(distmap_pred[borders_gt], areas[codes_gt][borders_gt])
    d_pred, a_pred = _sort_python(distmap_gt[borders_pred], areas[codes_pred][borders_pred])
    return SurfaceDistances(d_gt, d_pred, a_gt, a_pred)


def surface_dice_at_tolerance(distances: SurfaceDistances, tolerance_mm: float) -> float:
    """DeepMind's `compute_surface_dice_at_tolerance`; NaN when both surfaces are empty."""
    overlap_gt = np.sum(distances.surfel_areas_gt[distances.distances_gt_to_pred <= tolerance_mm])
    overlap_pred = np.sum(distances.surfel_areas_pred[distances.distances_pred_to_gt <= tolerance_mm])
    total = np.sum(distances.surfel_areas_gt) + np.sum(distances.surfel_areas_pred)
    with np.errstate(invalid="ignore"):
        return float((overlap_gt + overlap_pred) / total)


# --------------------------------------------------------------------------------------- fast
def _surfels(mask: np.ndarray, lo: np.ndarray, hi: np.ndarray, areas: np.ndarray):
    """Global corner coordinates (n, 3) and areas (n,) of a mask's surfels within its box [lo, hi]."""
    codes = _neighbour_codes(mask, lo, hi)
    borders = _borders(codes)
    coords = np.stack(np.nonzero(borders), axis=1) + lo
    return coords, areas[codes[borders]]


@functools.lru_cache(maxsize=64)
def ball_offsets(spacing_xyz: tuple[float, float, float], tolerance_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Integer corner offsets (n, 3) at most `tolerance_mm` away, nearest first, and their distances (n,) in mm.

    Distances by the distance transform's own formula and operation order (offset * spacing, squared, summed over
    axes in order, square root), so a neighbour at exactly `tolerance_mm` is within it here as there.
    """
    spacing = np.asarray(spacing_xyz, np.float64)
    reach = np.floor(tolerance_mm / spacing).astype(np.int64) + 1
    axes = [np.arange(-r, r + 1) for r in reach]
    offsets = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    distances = offset_mm(offsets, spacing)
    keep = np.flatnonzero(distances <= tolerance_mm)
    order = keep[np.argsort(distances[keep], kind="stable")]
    offsets, distances = offsets[order], distances[order]
    offsets.flags.writeable = distances.flags.writeable = False  # cached: the same arrays for every caller
    return offsets, distances


def offset_mm(offsets: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Lengths in mm of voxel offsets (n, 3) by the distance transform's own formula and operation order: offset *
    spacing, squared, summed over the axes in order, square root."""
    mm = offsets * spacing
    squared = mm * mm
    return np.sqrt(squared[:, 0] + squared[:, 1] + squared[:, 2])


# Grid lookups per surfel (on average) the offset search may spend before a k-d tree answers the surfels still
# unmatched: about what a tree's query costs. Surfels of a prediction near its GT match within a few offsets; a
# prediction far from its GT, with a wide tolerance at a fine spacing (thousands of offsets), goes to the tree.
TREE_AFTER_LOOKUPS = 64


def _distances_within(
    coords_from, coords_to, spacing_xyz, tolerance_mm: float, tree_after: float = TREE_AFTER_LOOKUPS
) -> np.ndarray:
    """Distance (mm) of each `coords_from` surfel to the nearest `coords_to` surfel; inf beyond `tolerance_mm`.

    The reference's distance transform of the other mask's surfels, read at this mask's surfels, is exactly the
    distance to the nearest other surfel; only hits (<= tol) matter. The other mask's surfels are marked in a
    grid, and the offsets within tol are tried nearest first (`ball_offsets`): a surfel's first hit is its nearest
    neighbour, at that offset's distance (the transform's own formula). Most surfels of a prediction near its GT
    match within a few offsets. Past `tree_after` lookups per surfel, a k-d tree over the other surfels answers
    the surfels still unmatched (their nearest neighbour lies beyond the offsets tried; its distance recomputed by
    the same formula).
    """
    distances = np.full(len(coords_from), np.inf)
    if len(coords_from) == 0 or len(coords_to) == 0:
        return distances
    offsets, offset_mm = ball_offsets(tuple(float(v) for v in spacing_xyz), float(tolerance_mm))
    reach = np.abs(offsets).max(axis=0)
    low = np.minimum(coords_from.min(axis=0), coords_to.min(axis=0)) - reach
    shape = np.maximum(coords_from.max(axis=0), coords_to.max(axis=0)) + reach - low + 1
    strides = np.array([shape[1] * shape[2], shape[2], 1])
    marked = np.zeros(int(np.prod(shape)), bool)
    marked[(coords_to - low) @ strides] = True
    remaining = np.arange(len(coords_from))
    at = (coords_from - low) @ strides  # flat grid index of each remaining surfel
    lookups, allowed = 0, tree_after * len(coords_from)
    for step, mm in zip(offsets @ strides, offset_mm, strict=True):
        if lookups > allowed:
            distances[remaining] = _nearest_by_tree(coords_from[remaining], coords_to, spacing_xyz, tolerance_mm)
            break
        lookups += len(remaining)
        hit = marked[at + step]
        if hit.any():
            distances[remaining[hit]] = mm
            miss = ~hit
            remaining, at = remaining[miss], at[miss]
            if len(remaining) == 0:
                break
    return distances


def _nearest_by_tree(coords_from, coords_to, spacing_xyz, tolerance_mm: float) -> np.ndarray:
    """`_distances_within` by a k-d tree searched up to a hair past `tolerance_mm`; inf where nothing is that near."""
    from scipy.spatial import cKDTree  # lazy: only the search's fallback needs it

    distances = np.full(len(coords_from), np.inf)
    spacing = np.asarray(spacing_xyz, np.float64)
    tree = cKDTree(coords_to * spacing, balanced_tree=False, compact_nodes=False)  # 2x faster build, same answers
    _, nearest = tree.query(coords_from * spacing, distance_upper_bound=tolerance_mm * (1 + 1e-9) + 1e-9)
    found = nearest < len(coords_to)
    distances[found] = offset_mm(coords_to[nearest[found]] - coords_from[found], spacing)
    distances[distances > tolerance_mm] = np.inf  # the hair past it: not within, as for the offset search
    return distances


def _sorted_sums(distances: np.ndarray, areas: np.ndarray, tolerance_mm: float) -> tuple[float, float]:
    """(area within tol, total area), summed in the organisers' order (sorted by distance, then area)."""
    order = np.lexsort((areas, distances))
    distances, areas = distances[order], areas[order]
    return np.sum(areas[distances <= tolerance_mm]), np.sum(areas)


def fast_surface_dice(mask_gt: np.ndarray, mask_pred: np.ndarray, spacing_xyz, tolerance_mm: float) -> float:
    """NSD at `tolerance_mm` with the organisers' algorithm; nearest surfels by k-d tree instead of distance maps.

    Same value as `surface_dice_at_tolerance(reference_surface_distances(...))` up to the order of
    the floating-point sum of the total area (misses are summed as inf-distance surfels: about 1e-16,
    invisible after rounding to 4 decimals).
    NaN when both masks are empty, 0 when exactly one is.
    """
    _check_masks(mask_gt, mask_pred)
    spacing = tuple(float(s) for s in spacing_xyz)
    box_gt, box_pred = _bbox(mask_gt), _bbox(mask_pred)
    if box_gt is None and box_pred is None:
        return float("nan")
    if box_gt is None or box_pred is None:
        return 0.0
    areas = surfel_area_table(spacing)
    coords_gt, areas_gt = _surfels(mask_gt, *box_gt, areas)
    coords_pred, areas_pred = _surfels(mask_pred, *box_pred, areas)
    d_gt = _distances_within(coords_gt, coords_pred, spacing, tolerance_mm)
    d_pred = _distances_within(coords_pred, coords_gt, spacing, tolerance_mm)
    hit_gt, total_gt = _sorted_sums(d_gt, areas_gt, tolerance_mm)
    hit_pred, total_pred = _sorted_sums(d_pred, areas_pred, tolerance_mm)
    return float((hit_gt + hit_pred) / (total_gt + total_pred))
