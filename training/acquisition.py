"""Acquisition: how a scanner sees the synthetic patient of `training.phantoms`.

    python -m training.phantoms data/phantoms --acquisition default    # variation on (the default)
    python -m training.phantoms data/phantoms --acquisition none       # clean scans, as before issue 14

Anatomy (the patient) lives in `training/phantoms.py`; this module holds everything the scanner
and its operator choose: the voxel grid (size, spacing, direction, field of view and its centring,
z-coverage), the reconstruction (partial-volume blur, kernel sharpness, the circle outside the
reconstructed field of view and its padding value) and the patient table. Real FLARE22 scans vary
in all of these; `AcquisitionConfig` says how often (rates per split, docs/PHANTOMS.md).

Acquisition draws come from their own random stream (`acquisition_rng(seed)`), so switching the
variation on or off never changes the patient: the anatomy, contrast and noise draws stay those of
the clean case.

Single perturbations of an existing image and its label, in physical space, for benchmarks that
perturb the bundled examples: `crop_fov_to_body`, `widen_fov`, `pad_outside_circle`, `add_table`.
Each keeps image and label on one identical grid, works with any direction matrix ("in-plane" =
the two index axes whose directions are closest to physical x and y) and keeps the pixel type.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import SimpleITK as sitk
from scipy import ndimage


# ----------------------------------------------------------------------------------------------
# The voxel grid
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """A voxel grid: index (i, j, k) -> physical origin + direction @ (spacing * index)."""

    size_xyz: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major, columns are the index axes' directions

    @property
    def matrix(self) -> np.ndarray:  # (3, 3): physical offset per unit index step
        return np.array(self.direction).reshape(3, 3) @ np.diag(self.spacing_xyz)

    @classmethod
    def of(cls, image: sitk.Image) -> Grid:
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))


@dataclass(frozen=True)
class SizeConfig:
    """Voxel grid ranges. `full` is the FLARE22 acquisition range; `small` is for tests and quick runs."""

    inplane_px: tuple[int, ...]  # in-plane size choices (square)
    inplane_spacing_mm: tuple[float, float]  # clip range for FOV / size
    slice_spacing_mm: tuple[float, ...]  # slice spacing choices


SIZES = {
    "full": SizeConfig(inplane_px=(512, 512, 512, 448, 384), inplane_spacing_mm=(0.6, 1.0),
                       slice_spacing_mm=(1.5, 2.0, 2.5, 2.5, 3.0, 5.0)),
    "small": SizeConfig(inplane_px=(128, 144, 160), inplane_spacing_mm=(2.2, 3.2), slice_spacing_mm=(4.0, 5.0, 6.0)),
    # The bundled examples: small files, but slices thin enough that adrenals span several of them.
    "example": SizeConfig(inplane_px=(144, 160), inplane_spacing_mm=(2.3, 2.8), slice_spacing_mm=(3.5, 4.0)),
}
GEOMETRIES = ("lps", "ras", "flip_z", "permuted", "oblique")
GEOMETRY_WEIGHTS = (0.45, 0.25, 0.1, 0.1, 0.1)
PIXEL_TYPES = ("int16", "int32", "float32")
PIXEL_TYPE_WEIGHTS = (0.8, 0.1, 0.1)


def draw_direction(rng: np.random.Generator, geometry: str) -> np.ndarray:
    """Columns = physical directions of the index axes i, j, k."""
    if geometry == "lps":
        return np.eye(3)
    if geometry == "ras":
        return np.diag([-1.0, -1.0, 1.0])
    if geometry == "flip_z":
        return np.diag([1.0, 1.0, -1.0])
    if geometry == "permuted":  # e.g. a volume stored with slices along another index axis
        perm = rng.permutation(3)
        while (perm == np.arange(3)).all():
            perm = rng.permutation(3)
        return np.eye(3)[:, perm] * rng.choice([-1.0, 1.0], 3)
    if geometry == "oblique":  # a slight gantry tilt or rotated reconstruction
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        angle = math.radians(rng.uniform(3, 12))
        kx = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        rot = np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx
        return rot @ (np.eye(3) if rng.random() < 0.5 else np.diag([-1.0, -1.0, 1.0]))
    raise ValueError(f"geometry must be one of {GEOMETRIES}, found {geometry!r}")


@dataclass(frozen=True)
class ScanPlan:
    """The operator's choices for one scan, before they become a `Grid`."""

    fov_margin: float  # in-plane field of view / body width (< 1 cuts the body's sides)
    inplane_px: int
    slice_mm: float
    top_mm: float  # scan range above the anatomical origin (physical mm, patient scale applied)
    bottom_mm: float  # scan range below it (negative)
    offset_mm: tuple[float, float]  # field-of-view centre minus body centre, physical x and y


def draw_scan_plan(rng: np.random.Generator, size: SizeConfig, *, fov_margin: tuple[float, float],
                   scan_top_mm: tuple[float, float], scan_bottom_mm: tuple[float, float],
                   scale_z: float) -> ScanPlan:
    """The clean scan: drawn from the case's main stream, in the order the generator always used."""
    margin = float(rng.uniform(*fov_margin))
    n_inplane = int(rng.choice(size.inplane_px))
    s_slice = float(rng.choice(size.slice_spacing_mm))
    top, bottom = rng.uniform(*scan_top_mm) * scale_z, rng.uniform(*scan_bottom_mm) * scale_z
    # The patient lies low in the field of view (on the table), slightly off-centre.
    offset = (float(rng.uniform(-15, 15)), float(rng.uniform(-5, 25)))
    return ScanPlan(margin, n_inplane, s_slice, float(top), float(bottom), offset)


def grid_for(plan: ScanPlan, size: SizeConfig, *, body_width_mm: float, centre: np.ndarray,
             direction: np.ndarray) -> Grid:
    """The voxel grid of `plan` for a body `body_width_mm` wide whose anatomical origin is at `centre`."""
    fov = body_width_mm * plan.fov_margin
    s_inplane = float(np.clip(fov / plan.inplane_px, *size.inplane_spacing_mm))
    n_slices = int(math.ceil((plan.top_mm - plan.bottom_mm) / plan.slice_mm)) + 1
    n_phys = np.array([plan.inplane_px, plan.inplane_px, n_slices])
    s_phys = np.array([s_inplane, s_inplane, plan.slice_mm])
    axis_of = np.abs(direction).argmax(0)  # physical axis each index axis mostly runs along
    size_xyz = n_phys[axis_of]
    spacing_xyz = s_phys[axis_of]
    fov_centre = centre + np.array([plan.offset_mm[0], plan.offset_mm[1], (plan.top_mm + plan.bottom_mm) / 2])
    origin = fov_centre - direction @ np.diag(spacing_xyz) @ ((size_xyz - 1) / 2)
    return Grid(tuple(int(n) for n in size_xyz), tuple(float(s) for s in spacing_xyz),
                tuple(float(o) for o in origin), tuple(float(d) for d in direction.ravel()))


# ----------------------------------------------------------------------------------------------
# Acquisition variation: configuration and draws
# ----------------------------------------------------------------------------------------------
PADDING_VALUES = (None, -1024.0, -2048.0, -3024.0, 0.0)  # None: the whole square is reconstructed


@dataclass(frozen=True)
class TableSpec:
    """A patient table: a curved plate under (posterior to) the body on a foam mattress.

    Shape relative to the body; `add_table` and the generator place it under the body's back.
    """

    foam_mm: float = 20.0  # mattress between the body's back and the plate
    thickness_mm: float = 12.0  # plate thickness
    rise_mm: float = 25.0  # the plate curves up (anteriorly) by this much at its edges
    width_factor: float = 1.3  # plate half-width / body half-width (> 1: wider than the body)
    plate_hu: float = 50.0  # carbon-fibre plate
    foam_hu: float = -900.0  # mattress foam


@dataclass(frozen=True)
class AcquisitionConfig:
    """How often and how much acquisition varies in one split (rates: docs/PHANTOMS.md)."""

    name: str
    fov_margin: tuple[float, float]  # in-plane field of view / body width (< 1 cuts the body's sides)
    fov_offset: float  # field-of-view centre off the body centre, up to this fraction of the FOV per axis
    padding_weights: tuple[float, ...]  # probabilities of PADDING_VALUES outside the field-of-view circle
    table_rate: float  # fraction of scans with a patient table
    table_foam_mm: tuple[float, float]
    table_thickness_mm: tuple[float, float]
    table_plate_hu: tuple[float, float]
    blur_scale: tuple[float, float]  # in-plane partial-volume blur x this (> 1: soft kernel)
    sharp_rate: float  # fraction reconstructed with a sharp kernel (unsharp mask on top of the blur)
    sharp_gain: tuple[float, float]  # its gain
    z_cut_rate: float  # fraction whose scan starts or ends mid-organ (half at the top, half at the bottom)
    z_cut_top_mm: tuple[float, float]  # top of such a scan (anatomical mm; liver dome ~ +145)
    z_cut_bottom_mm: tuple[float, float]  # bottom of such a scan (lowest kidney pole ~ -80)

    def __post_init__(self) -> None:
        if len(self.padding_weights) != len(PADDING_VALUES) or abs(sum(self.padding_weights) - 1) > 1e-6:
            raise ValueError(f"padding_weights must be {len(PADDING_VALUES)} probabilities (for {PADDING_VALUES}) "
                             f"summing to 1; found {self.padding_weights}")
        for rate in (self.table_rate, self.sharp_rate, self.z_cut_rate):
            if not 0 <= rate <= 1:
                raise ValueError(f"rates must lie in [0, 1]; found {rate} in {self.name}")
        if self.fov_margin[0] < 0.8 or not 0 <= self.fov_offset <= 0.3:
            raise ValueError("fov_margin >= 0.8 and fov_offset in [0, 0.3] keep most of the abdomen in the grid; "
                             f"found {self.fov_margin}, {self.fov_offset}")


# FLARE22's 50 labelled cases come from fewer centres than the rest: somewhat narrower acquisition.
LABELLED_ACQUISITION = AcquisitionConfig(
    name="labelled", fov_margin=(0.95, 1.45), fov_offset=0.08, padding_weights=(0.35, 0.2, 0.15, 0.2, 0.1),
    table_rate=0.6, table_foam_mm=(0.0, 40.0), table_thickness_mm=(10.0, 15.0), table_plate_hu=(-100.0, 200.0),
    blur_scale=(0.8, 1.3), sharp_rate=0.2, sharp_gain=(0.3, 0.8), z_cut_rate=0.1,
    z_cut_top_mm=(60.0, 140.0), z_cut_bottom_mm=(-90.0, -10.0),
)
WIDE_ACQUISITION = AcquisitionConfig(
    name="wide", fov_margin=(0.9, 1.6), fov_offset=0.15, padding_weights=(0.35, 0.2, 0.15, 0.2, 0.1),
    table_rate=0.6, table_foam_mm=(0.0, 40.0), table_thickness_mm=(10.0, 15.0), table_plate_hu=(-100.0, 200.0),
    blur_scale=(0.7, 1.6), sharp_rate=0.3, sharp_gain=(0.3, 1.2), z_cut_rate=0.2,
    z_cut_top_mm=(60.0, 140.0), z_cut_bottom_mm=(-90.0, -10.0),
)
ACQUISITIONS = {c.name: c for c in (LABELLED_ACQUISITION, WIDE_ACQUISITION)}  # by name, as dataset.json records it
ACQUISITION_BY_SPLIT = {"labelled": LABELLED_ACQUISITION, "unlabelled": WIDE_ACQUISITION,
                        "validation": WIDE_ACQUISITION}
ACQUISITION_STREAM = 0xAC9  # the acquisition stream's key beside the case seed


@dataclass(frozen=True)
class AcquisitionParams:
    """What was drawn for one case: recorded in dataset.json."""

    config: str
    fov_margin: float
    fov_offset: tuple[float, float]  # fraction of the field of view, x and y
    z_cut: str  # "none", "top" or "bottom"
    z_cut_mm: float  # the cut scan's top or bottom (anatomical mm), unused when z_cut is "none"
    padding: float | None  # value outside the field-of-view circle; None: no circle
    table: TableSpec | None
    blur_scale: float
    sharp_gain: float  # 0: standard or soft kernel


def acquisition_rng(seed: int) -> np.random.Generator:
    """The case's acquisition stream: independent of its anatomy stream `default_rng(seed)`."""
    return np.random.default_rng(np.random.SeedSequence([seed, ACQUISITION_STREAM]))


def draw_acquisition(seed: int, config: AcquisitionConfig) -> AcquisitionParams:
    """Draw one case's acquisition; every value is drawn whatever the rates, so a rate change moves no other draw."""
    rng = acquisition_rng(seed)
    margin = float(rng.uniform(*config.fov_margin))
    offset = (float(rng.uniform(-1, 1) * config.fov_offset), float(rng.uniform(-1, 1) * config.fov_offset))
    u_cut, cut_top, cut_bottom = rng.random(), rng.uniform(*config.z_cut_top_mm), rng.uniform(*config.z_cut_bottom_mm)
    z_cut = "top" if u_cut < config.z_cut_rate / 2 else "bottom" if u_cut < config.z_cut_rate else "none"
    padding = PADDING_VALUES[int(rng.choice(len(PADDING_VALUES), p=config.padding_weights))]
    table = TableSpec(foam_mm=float(rng.uniform(*config.table_foam_mm)),
                      thickness_mm=float(rng.uniform(*config.table_thickness_mm)),
                      rise_mm=float(rng.uniform(10, 40)), width_factor=float(rng.uniform(1.15, 1.5)),
                      plate_hu=float(rng.uniform(*config.table_plate_hu)), foam_hu=float(rng.uniform(-950, -850)))
    has_table = rng.random() < config.table_rate
    blur_scale = float(rng.uniform(*config.blur_scale))
    sharp = rng.random() < config.sharp_rate
    gain = float(rng.uniform(*config.sharp_gain))
    return AcquisitionParams(
        config=config.name, fov_margin=margin, fov_offset=offset, z_cut=z_cut,
        z_cut_mm=float(cut_top if z_cut == "top" else cut_bottom if z_cut == "bottom" else 0.0),
        padding=padding, table=table if has_table else None, blur_scale=blur_scale, sharp_gain=gain if sharp else 0.0,
    )


def vary_scan_plan(plan: ScanPlan, acq: AcquisitionParams, *, body_width_mm: float, scale_z: float) -> ScanPlan:
    """The clean plan with the drawn field of view, its centring and z-coverage."""
    fov = body_width_mm * acq.fov_margin
    top = acq.z_cut_mm * scale_z if acq.z_cut == "top" else plan.top_mm
    bottom = acq.z_cut_mm * scale_z if acq.z_cut == "bottom" else plan.bottom_mm
    offset = (acq.fov_offset[0] * fov, acq.fov_offset[1] * fov)
    return replace(plan, fov_margin=acq.fov_margin, top_mm=top, bottom_mm=bottom, offset_mm=offset)


# ----------------------------------------------------------------------------------------------
# Reconstruction: blur, kernel, field-of-view circle
# ----------------------------------------------------------------------------------------------
def blur_sigma_zyx(spacing_xyz: Sequence[float], blur_scale: float = 1.0) -> list[float]:
    """Partial-volume blur (voxels): half a voxel in-plane (x blur_scale), 0.4 of a voxel along the slices."""
    sigma_zyx = [0.5 * blur_scale] * 3
    sigma_zyx[2 - int(np.argmax(spacing_xyz))] = 0.4
    return sigma_zyx


def noise_gain(sigma_zyx: list[float], truncate: float) -> float:
    """Std of white noise after `ndimage.gaussian_filter(sigma_zyx, truncate)`, per unit std before."""
    gain = 1.0
    for sigma in sigma_zyx:
        radius = int(truncate * sigma + 0.5)
        w = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        gain *= float(np.sqrt(((w / w.sum()) ** 2).sum()))
    return gain


def reconstruct(hu_zyx: np.ndarray, sigma_zyx: list[float], sharp_gain: float = 0.0) -> np.ndarray:
    """Partial-volume blur, then for a sharp kernel an in-plane unsharp mask (edges and noise up)."""
    hu_zyx = ndimage.gaussian_filter(hu_zyx, sigma_zyx, truncate=2.0)  # 3 taps at sigma 0.5: the next are < 0.001
    if sharp_gain > 0:
        slice_axis = int(np.argmin(sigma_zyx))  # the axis with 0.4 voxel
        unsharp = [0.0 if ax == slice_axis else 1.0 for ax in range(3)]
        smooth = ndimage.gaussian_filter(hu_zyx, unsharp, truncate=2.0)
        smooth -= hu_zyx  # minus the detail; in place: a full case is ~150 MB per copy
        smooth *= np.float32(sharp_gain)
        hu_zyx -= smooth
    return hu_zyx


def inplane_axes(direction: Sequence[float]) -> tuple[int, int, int]:
    """Index axes (0 = i/x ...) whose directions are closest to physical x and y, and the remaining (slice) axis."""
    d = np.abs(np.asarray(direction, float).reshape(3, 3))
    ax_x = int(np.argmax(d[0]))
    row_y = d[1].copy()
    row_y[ax_x] = -1.0
    ax_y = int(np.argmax(row_y))
    return ax_x, ax_y, 3 - ax_x - ax_y


def outside_circle_zyx(grid: Grid) -> np.ndarray:
    """Boolean (z, y, x)-broadcastable mask: voxels outside the circle inscribed in the in-plane field of view."""
    ax_a, ax_b, _ = inplane_axes(grid.direction)
    radius = min(grid.size_xyz[ax_a] * grid.spacing_xyz[ax_a], grid.size_xyz[ax_b] * grid.spacing_xyz[ax_b]) / 2
    d2 = np.zeros((1, 1, 1))
    for ax in (ax_a, ax_b):
        n = grid.size_xyz[ax]
        c = (np.arange(n) - (n - 1) / 2) * grid.spacing_xyz[ax]
        shape = [1, 1, 1]
        shape[2 - ax] = n  # index axis ax is numpy axis 2 - ax
        d2 = d2 + (c**2).reshape(shape)
    return d2 > radius**2


def physical_xy(grid: Grid, slab: int = 32) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """(numpy axis-0 slice, physical x, physical y) per slab; x, y float32, broadcastable to the slab's shape."""
    m, origin = grid.matrix, np.asarray(grid.origin_xyz)
    nk = grid.size_xyz[2]
    idx = [np.arange(n, dtype=np.float64) for n in grid.size_xyz]
    for k0 in range(0, nk, slab):
        ks = slice(k0, min(nk, k0 + slab))
        out = []
        for ax in (0, 1):
            c = np.full((1, 1, 1), origin[ax])
            for col, values, shape in ((0, idx[0], (1, 1, -1)), (1, idx[1], (1, -1, 1)), (2, idx[2][ks], (-1, 1, 1))):
                if abs(m[ax, col]) > 1e-9:
                    c = c + (m[ax, col] * values).reshape(shape)
            out.append(c.astype(np.float32))
        yield ks, out[0], out[1]


@dataclass(frozen=True)
class BodyBox:
    """Where the body lies in-plane (physical mm): table placement."""

    centre_x: float
    half_width: float
    back_y: float  # largest (most posterior) y of the body


def table_codes(x: np.ndarray, y: np.ndarray, table: TableSpec, body: BodyBox) -> np.ndarray:
    """0 outside the table, 1 foam, 2 plate, at physical (x, y) (broadcast)."""
    half = body.half_width * table.width_factor
    u2 = ((x - np.float32(body.centre_x)) / np.float32(half)) ** 2
    plate_top = np.float32(body.back_y + table.foam_mm) - np.float32(table.rise_mm) * u2
    across = u2 < 1
    plate = across & (y >= plate_top) & (y < plate_top + np.float32(table.thickness_mm))
    foam = across & (y >= plate_top - np.float32(table.foam_mm)) & (y < plate_top)
    return plate.astype(np.uint8) * 2 + foam.astype(np.uint8)


def paint_table(arr_zyx: np.ndarray, grid: Grid, table: TableSpec, body: BodyBox, writable_zyx: np.ndarray,
                values: tuple[float, float]) -> np.ndarray:
    """arr = values (foam, plate) on the table's voxels where `writable_zyx`; returns the painted voxels' mask."""
    painted = np.zeros(arr_zyx.shape, bool)
    for ks, x, y in physical_xy(grid):
        codes = np.broadcast_to(table_codes(x, y, table, body), arr_zyx[ks].shape)
        for code, value in ((1, values[0]), (2, values[1])):
            where = (codes == code) & writable_zyx[ks]
            arr_zyx[ks][where] = value
            painted[ks] |= where
    return painted


def pad_circle_arrays(arr_zyx: np.ndarray, label_zyx: np.ndarray, grid: Grid, value: float) -> None:
    """In place: `value` outside the in-plane field-of-view circle, label 0 there."""
    outside = np.broadcast_to(outside_circle_zyx(grid), arr_zyx.shape)
    arr_zyx[outside] = value
    label_zyx[outside] = 0


# ----------------------------------------------------------------------------------------------
# Single perturbations of an existing image and its label
# ----------------------------------------------------------------------------------------------
def _check_pair(image: sitk.Image, label: sitk.Image) -> None:
    if Grid.of(image) != Grid.of(label):
        raise ValueError(f"image and label must share one grid; found {Grid.of(image)} and {Grid.of(label)}. "
                         "Resample the label onto the image first.")


def _fit(value: float, dtype: np.dtype) -> float | int:
    """`value` clipped to what `dtype` holds (int16 holds -3024; uint8 does not)."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return int(np.clip(round(value), info.min, info.max))
    return float(value)


def _like(arr_zyx: np.ndarray, reference: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(arr_zyx)
    out.CopyInformation(reference)
    return out


def crop_fov_to_body(image: sitk.Image, label: sitk.Image, margin_mm: float = 0.0, *,
                     body_threshold_hu: float = -500.0) -> tuple[sitk.Image, sitk.Image]:
    """Crop the in-plane field of view to the body's box plus `margin_mm` (negative cuts the body's sides).

    The body is every voxel above `body_threshold_hu` or labelled; slices are kept whole. Voxels
    keep their physical positions (the origin moves along the direction).
    """
    _check_pair(image, label)
    arr, lab = sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(label)
    body = (arr > body_threshold_hu) | (lab > 0)
    if not body.any():
        raise ValueError(f"no voxel above {body_threshold_hu} HU or labelled: nothing to crop to")
    index, size = [0, 0, 0], list(image.GetSize())
    for ax in inplane_axes(image.GetDirection())[:2]:
        np_axis = 2 - ax
        hit = np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != np_axis)))
        pad = int(math.floor(margin_mm / image.GetSpacing()[ax]))
        lo = int(np.clip(hit[0] - pad, 0, size[ax] - 1))
        hi = int(np.clip(hit[-1] + pad, lo, size[ax] - 1))
        index[ax], size[ax] = lo, hi - lo + 1
    return sitk.RegionOfInterest(image, size, index), sitk.RegionOfInterest(label, size, index)


def widen_fov(image: sitk.Image, label: sitk.Image, pad_vox: int,
              fill: float = -1024.0) -> tuple[sitk.Image, sitk.Image]:
    """Add `pad_vox` voxels on each in-plane side, filled with `fill` (label 0); existing voxels keep their
    physical positions (the origin moves back along the direction)."""
    _check_pair(image, label)
    if pad_vox < 0:
        raise ValueError(f"pad_vox must be >= 0 (use crop_fov_to_body to shrink); found {pad_vox}")
    bound = [0, 0, 0]
    for ax in inplane_axes(image.GetDirection())[:2]:
        bound[ax] = int(pad_vox)
    value = _fit(fill, sitk.GetArrayViewFromImage(image).dtype)
    return sitk.ConstantPad(image, bound, bound, value), sitk.ConstantPad(label, bound, bound, 0)


def pad_outside_circle(image: sitk.Image, label: sitk.Image, value: float) -> tuple[sitk.Image, sitk.Image]:
    """Set everything outside the circle inscribed in the in-plane field of view to `value`, label 0 there:
    what a scanner writes outside its reconstruction circle."""
    _check_pair(image, label)
    arr, lab = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)
    pad_circle_arrays(arr, lab, Grid.of(image), _fit(value, arr.dtype))
    return _like(arr, image), _like(lab, label)


def body_box(grid: Grid, body_zyx: np.ndarray) -> BodyBox:
    """In-plane physical extent of the True voxels of `body_zyx` (on `grid`)."""
    x_lo, x_hi, y_hi = np.inf, -np.inf, -np.inf
    for ks, x, y in physical_xy(grid):
        mask = body_zyx[ks]
        if mask.any():
            xs, ys = np.broadcast_to(x, mask.shape)[mask], np.broadcast_to(y, mask.shape)[mask]
            x_lo, x_hi, y_hi = min(x_lo, xs.min()), max(x_hi, xs.max()), max(y_hi, ys.max())
    if not np.isfinite(y_hi):
        raise ValueError("no body voxel: cannot place a table under it")
    return BodyBox(float(x_lo + x_hi) / 2, float(x_hi - x_lo) / 2, float(y_hi))


def add_table(image: sitk.Image, label: sitk.Image, table: TableSpec = TableSpec(), *,
              body_threshold_hu: float = -500.0, noise_std_hu: float = 8.0,
              seed: int = 0) -> tuple[sitk.Image, sitk.Image]:
    """Put a patient table (foam mattress, curved plate; label 0) under the body's back.

    The body is every voxel above `body_threshold_hu` or labelled; the table is painted only on
    air (unlabelled voxels at or below the threshold), with white noise of `noise_std_hu`.
    Apply it before `pad_outside_circle`, as a scanner would.
    """
    _check_pair(image, label)
    arr, lab = sitk.GetArrayFromImage(image), sitk.GetArrayViewFromImage(label)
    grid = Grid.of(image)
    air = (arr <= body_threshold_hu) & (lab == 0)
    box = body_box(grid, ~air)
    out = arr.astype(np.float32)
    painted = paint_table(out, grid, table, box, air, (table.foam_hu, table.plate_hu))
    out[painted] += noise_std_hu * np.random.default_rng(seed).standard_normal(int(painted.sum()), dtype=np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return _like(out.astype(arr.dtype), image), sitk.Image(label)
