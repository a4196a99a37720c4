"""Geometry: reorient to the canonical orientation, resample to a spacing, restore onto the original grid.

Canonical orientation (docs/ARCHITECTURE.md): `SimpleITK.DICOMOrient(image, "LPS")`, so the numpy
view `vol_zyx` has axis 0 inferior->superior, axis 1 anterior->posterior, axis 2 patient right->left.
Resampling works in physical space and keeps the canonical direction (identity up to a small oblique
rotation), so the resampled grid covers exactly the input's field of view and restoring is exact up
to interpolation. Used by `flare_infer.pipeline`.
"""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

CANONICAL = "LPS"
_SLAB = 4  # input slices per block of the in-plane interpolation: a few MB, cache-sized


class GridMismatchError(RuntimeError):
    """An output that does not lie on the grid it must lie on: a bug, never written."""


@dataclass(frozen=True)
class Grid:
    """Size, spacing, origin and direction of an image: everything that places its voxels in space."""

    size_xyz: tuple[int, ...]
    spacing_xyz: tuple[float, ...]
    origin_xyz: tuple[float, ...]
    direction: tuple[float, ...]  # row-major 3x3, columns are the axes' directions

    @classmethod
    def of(cls, image: sitk.Image | sitk.ImageFileReader) -> Grid:
        return cls(
            tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection())
        )

    def differences(self, other: Grid, *, atol: float = 0.0) -> list[str]:
        """Names and values of the fields that differ by more than `atol` (0: exactly equal)."""
        diffs = []
        for name in ("size_xyz", "spacing_xyz", "origin_xyz", "direction"):
            a, b = np.asarray(getattr(self, name), float), np.asarray(getattr(other, name), float)
            if a.shape != b.shape or not np.allclose(a, b, rtol=0.0, atol=atol):
                diffs.append(f"{name}: expected {getattr(self, name)}, found {getattr(other, name)}")
        return diffs


def check_same_grid(expected: sitk.Image, found: sitk.Image, *, what: str, atol: float = 0.0) -> None:
    """Raise `GridMismatchError` naming every field of `found`'s grid that differs from `expected`'s."""
    diffs = Grid.of(expected).differences(Grid.of(found), atol=atol)
    if diffs:
        raise GridMismatchError(f"{what} does not lie on the expected grid: " + "; ".join(diffs))


def to_canonical(image: sitk.Image) -> sitk.Image:
    """Permute and flip axes (no interpolation) so that the direction is as close to identity as possible."""
    return sitk.DICOMOrient(image, CANONICAL)


def spacing_grid(image: sitk.Image | Grid, spacing_xyz: tuple[float, float, float]) -> Grid:
    """The grid with `spacing_xyz` over `image`'s field of view: same direction, outer voxel edges aligned.

    Each axis keeps its physical extent `size * spacing` rounded to whole new voxels (at least one),
    and the first voxel's outer edge stays where the input's first voxel's edge is.
    """
    grid = image if isinstance(image, Grid) else Grid.of(image)
    size_in = np.asarray(grid.size_xyz, float)
    spacing_in = np.asarray(grid.spacing_xyz, float)
    spacing_out = np.asarray(spacing_xyz, float)
    size_out = np.maximum(1, np.round(size_in * spacing_in / spacing_out)).astype(int)
    direction = np.asarray(grid.direction, float).reshape(3, 3)
    origin_out = np.asarray(grid.origin_xyz, float) + direction @ ((spacing_out - spacing_in) / 2)
    size_out_xyz = tuple(int(s) for s in size_out)
    return Grid(size_out_xyz, tuple(spacing_out.tolist()), tuple(origin_out.tolist()), grid.direction)


def canonical_grid(image: sitk.Image) -> Grid:
    """The grid `to_canonical(image)` has, without copying voxels.

    DICOMOrient on a 2 x 2 x 2 stand-in with the same direction gives the canonical direction (which does not
    depend on size); from it follow the permutation and flips, hence spacing, size and origin.
    """
    probe = sitk.Image([2, 2, 2], sitk.sitkUInt8)
    probe.SetDirection(image.GetDirection())
    direction = to_canonical(probe).GetDirection()
    axes, signs = _signed_permutation(image.GetDirection(), direction)
    size, spacing = np.asarray(image.GetSize()), np.asarray(image.GetSpacing())
    d_in = np.asarray(image.GetDirection(), float).reshape(3, 3)
    origin = np.asarray(image.GetOrigin(), float)
    for a in range(3):
        if signs[a] < 0:  # a flipped axis starts at the input's last voxel on that axis
            origin = origin + d_in[:, a] * spacing[a] * (size[a] - 1)
    inverse = [axes.index(b) for b in range(3)]
    size_xyz, spacing_xyz = tuple(int(size[a]) for a in inverse), tuple(float(spacing[a]) for a in inverse)
    return Grid(size_xyz, spacing_xyz, tuple(origin.tolist()), direction)


def resample_to_grid(
    image: sitk.Image, grid: Grid, *, interpolator: int, default_value: float, pixel_id: int
) -> sitk.Image:
    """Sample `image` at the voxel centres of `grid` (identity transform: physical space to physical space)."""
    return sitk.Resample(
        image,
        [int(s) for s in grid.size_xyz],
        sitk.Transform(),
        interpolator,
        grid.origin_xyz,
        grid.spacing_xyz,
        grid.direction,
        float(default_value),
        pixel_id,
    )


def resample_ct(canonical: sitk.Image, spacing_xyz: tuple[float, float, float]) -> sitk.Image:
    """Linear resampling of a canonical CT to `spacing_xyz` as float32; outside the volume = its minimum."""
    vol = sitk.GetArrayViewFromImage(canonical)
    outside = float(vol.min())
    return resample_to_grid(
        canonical,
        spacing_grid(canonical, spacing_xyz),
        interpolator=sitk.sitkLinear,
        default_value=outside,
        pixel_id=sitk.sitkFloat32,
    )


def canonical_resample_ct(image: sitk.Image, spacing_xyz: tuple[float, float, float]) -> sitk.Image:
    """`resample_ct(to_canonical(image), spacing_xyz)`, computed without the reoriented copy and 2-3x faster.

    The target grid's axes are the input's axes permuted and flipped, so trilinear interpolation separates
    into three 1D interpolations, one per input axis (numpy), followed by a transpose of the small result.
    Same values as ITK's linear interpolator (edge voxels clamped inside the field of view; outside = minimum).
    """
    grid = spacing_grid(canonical_grid(image), spacing_xyz)
    alignment = axis_alignment(image, grid)
    assert alignment is not None, "a canonical grid is always a signed permutation of the input's axes"
    axes, signs = alignment
    vol = sitk.GetArrayViewFromImage(image)  # (Z, Y, X) of the input
    outside = float(vol.min())
    d_in = np.asarray(image.GetDirection(), float).reshape(3, 3)
    start = d_in.T @ (np.asarray(grid.origin_xyz) - np.asarray(image.GetOrigin()))  # grid's first voxel, input frame
    ratios = [grid.size_xyz[axes[a]] / image.GetSize()[a] for a in range(3)]
    cont = [
        (start[a] + signs[a] * grid.spacing_xyz[axes[a]] * np.arange(grid.size_xyz[axes[a]])) / image.GetSpacing()[a]
        for a in range(3)
    ]
    # The in-plane axes (input axes x, y = numpy axes 2, 1) slab by slab: the temporaries of a slab stay in cache
    # instead of being fresh, page-faulted arrays of the whole volume, and numpy releases the GIL, so slabs run in
    # ITK's number of threads (`--threads`). Shrinking axis first (less work afterwards); on ties the gather along
    # x first, on the narrower int16 data. Both measured: docs/PERFORMANCE.md, "Pipeline stages". Input z last.
    in_plane = sorted((0, 1), key=lambda a: (ratios[a], a))
    resampled = sitk.Image([int(n) for n in grid.size_xyz], sitk.sitkFloat32)
    voxels = voxels_to_fill(resampled)
    # numpy axis 2 - a now runs along grid axis axes[a]; grid numpy axis j is grid axis 2 - j
    order = [2 - axes.index(2 - j) for j in range(3)]
    # An axial input (flips are in `cont`): the last interpolation writes the image's own voxels, instead of a
    # volume that GetImageFromArray then copies (on the bench CT 15k page faults and a copy of 60 MB less)
    direct = order == [0, 1, 2]
    z_kept = _same_positions(cont[2], vol.shape[0])
    planes = voxels if direct and z_kept else np.empty((vol.shape[0], len(cont[1]), len(cont[0])), np.float32)

    def in_plane_slab(z0: int) -> None:
        slab = vol[z0 : z0 + _SLAB]
        for a in in_plane:
            slab = _interp_axis(slab, 2 - a, cont[a], outside)
        planes[z0 : z0 + _SLAB] = slab

    in_threads(in_plane_slab, range(0, vol.shape[0], _SLAB))
    vol = planes if z_kept else _interp_z(planes, cont[2], outside, into=voxels if direct else None)
    if not direct:
        voxels[...] = vol.transpose(order)
    resampled.SetOrigin(grid.origin_xyz)
    resampled.SetSpacing(grid.spacing_xyz)
    resampled.SetDirection(grid.direction)
    return resampled


def voxels_to_fill(image: sitk.Image) -> np.ndarray:
    """A writable (Z, Y, X) numpy view of a new image's voxels, to fill it in place; valid while the caller holds
    `image`. SimpleITK offers read-only views only, and GetImageFromArray copies."""
    view = sitk.GetArrayViewFromImage(image)  # MakeUnique first: the voxels are this image's alone
    memory = (ctypes.c_byte * view.nbytes).from_address(view.ctypes.data)
    return np.frombuffer(memory, view.dtype).reshape(view.shape)


def _same_positions(cont: np.ndarray, n: int) -> bool:
    """Whether continuous indices `cont` are exactly the voxels 0..n-1 of an axis of n (> 1): nothing to interpolate."""
    return n > 1 and len(cont) == n and np.array_equal(cont, np.arange(n))


class _ImageVoxels:
    """What numpy views (`__array_interface__`) when it wraps an image's voxels: holding the image keeps them alive."""

    def __init__(self, image: sitk.Image) -> None:
        self.image = image
        self.__array_interface__ = sitk.GetArrayViewFromImage(image).__array_interface__


def array_view(image: sitk.Image) -> np.ndarray:
    """A read-only (Z, Y, X) numpy view of `image`'s voxels that keeps the image alive: no copy, unlike
    `sitk.GetArrayFromImage`, and valid after the image's last other reference is gone, unlike
    `sitk.GetArrayViewFromImage` (the view's base holds the image)."""
    return np.asarray(_ImageVoxels(image))


def in_threads(fn, items) -> None:
    """`fn(item)` for every item, in ITK's number of threads (`--threads`; numpy releases the GIL while it works)."""
    items = list(items)
    n_threads = max(1, min(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(), len(items)))
    if n_threads == 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(n_threads) as pool:
        list(pool.map(fn, items))  # list(): re-raises an item's exception here


def _interp_z(vol: np.ndarray, cont: np.ndarray, outside: float, into: np.ndarray | None = None) -> np.ndarray:
    """`_interp_axis(vol, 0, cont, outside)` in blocks of rows (numpy axis 1), in threads; into `into` if given."""
    out = np.empty((len(cont), *vol.shape[1:]), np.float32) if into is None else into
    rows = max(1, (1 << 21) // max(1, vol.shape[0] * vol.shape[2] * 4))  # about 2 MB of input per block

    def block(y0: int) -> None:
        out[:, y0 : y0 + rows] = _interp_axis(vol[:, y0 : y0 + rows], 0, cont, outside)

    in_threads(block, range(0, vol.shape[1], rows))
    return out


def _interp_axis(vol: np.ndarray, np_axis: int, cont: np.ndarray, outside: float) -> np.ndarray:
    """Linear interpolation of `vol` along one axis at continuous indices `cont` (float32 result)."""
    n = vol.shape[np_axis]
    lo = np.floor(cont).astype(np.int64)
    weight = (cont - lo).astype(np.float32)
    shape = [1, 1, 1]
    shape[np_axis] = len(cont)
    if n > 1 and np.array_equal(lo, np.arange(len(cont))) and not weight.any():
        out = vol.astype(np.float32, copy=False)  # the same voxel positions: nothing to interpolate
    else:
        v0 = vol.take(np.clip(lo, 0, n - 1), axis=np_axis)
        v1 = vol.take(np.clip(lo + 1, 0, n - 1), axis=np_axis)
        out = np.subtract(v1, v0, dtype=np.float32)
        out *= weight.reshape(shape)
        out += v0
    inside = (cont >= -0.5) & (cont <= n - 0.5)  # ITK's buffer includes half a voxel around the centres
    if not inside.all():
        out = np.where(inside.reshape(shape), out, np.float32(outside))
    return out


def labels_to_grid(labels: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Nearest-neighbour resampling of a label image onto `reference`'s grid, uint8, background outside."""
    out = resample_to_grid(
        labels, Grid.of(reference), interpolator=sitk.sitkNearestNeighbor, default_value=0, pixel_id=sitk.sitkUInt8
    )
    check_same_grid(reference, out, what="resampled labels")
    return out


def _signed_permutation(direction_a, direction_b) -> tuple[tuple[int, ...], np.ndarray] | None:
    """axes[a] = the axis b of direction_b parallel to axis a of direction_a, signs[a] = their cosine (+-1)."""
    cosines = np.asarray(direction_b, float).reshape(3, 3).T @ np.asarray(direction_a, float).reshape(3, 3)
    axes = tuple(int(b) for b in np.abs(cosines).argmax(axis=0))
    signs = cosines[list(axes), [0, 1, 2]]
    if sorted(axes) != [0, 1, 2] or not np.allclose(np.abs(signs), 1.0, atol=1e-6):
        return None
    return axes, np.sign(signs)


def axis_alignment(image: sitk.Image, grid: Grid) -> tuple[tuple[int, ...], np.ndarray] | None:
    """For each axis a of `image`, the axis b of `grid` along the same line and the cosine (+1 or -1) between them.

    None unless the direction matrices differ only by a signed permutation of columns, as the resampled grid
    and the input always do (DICOMOrient permutes and flips axes, resampling keeps the direction).
    """
    return _signed_permutation(image.GetDirection(), grid.direction)


@dataclass(frozen=True)
class VoxelMap:
    """Where the voxel centres of an image fall on an axis-parallel grid (the resampled one), axis by axis.

    Image axis a runs along grid axis `axes[a]`; its voxel i sits at `(start_mm[a] + step_mm[a] * i) / spacing_mm[a]`
    in continuous grid index (0 = the grid's first voxel centre). Restoring needs nothing else, and the image
    grid it implies (`implied_grid`) is derived from these numbers alone, so a wrong map cannot go unnoticed.
    """

    axes: tuple[int, int, int]  # image axis a -> grid axis axes[a]
    start_mm: tuple[float, float, float]  # image voxel 0 along grid axis axes[a], from the grid's first centre (mm)
    step_mm: tuple[float, float, float]  # signed mm along grid axis axes[a] per image voxel on axis a
    spacing_mm: tuple[float, float, float]  # the grid's spacing along axes[a]
    grid_size: tuple[int, int, int]  # the grid's size along axes[a]
    image_size_xyz: tuple[int, int, int]

    def cont(self, a: int) -> np.ndarray:
        """Continuous grid index (along axes[a]) of every image voxel along image axis a."""
        return (self.start_mm[a] + self.step_mm[a] * np.arange(self.image_size_xyz[a])) / self.spacing_mm[a]

    def nearest(self, a: int) -> np.ndarray:
        """Nearest grid index along axes[a] for every image voxel along axis a; -1 outside the grid's voxels."""
        cont = self.cont(a)
        idx = np.floor(cont + 0.5).astype(np.int64)  # ITK rounds half up too
        inside = (cont >= -0.5) & (cont < self.grid_size[a] - 0.5)
        return np.where(inside, idx, -1)

    def implied_grid(self, grid: Grid, size_xyz: tuple[int, ...]) -> Grid:
        """The image grid this map places on `grid`: spacing, direction and origin from the map, size as given."""
        d_grid = np.asarray(grid.direction, float).reshape(3, 3)
        start_in_grid = np.zeros(3)
        direction = np.zeros((3, 3))
        for a, b in enumerate(self.axes):
            start_in_grid[b] = self.start_mm[a]
            direction[:, a] = np.sign(self.step_mm[a]) * d_grid[:, b]
        origin = np.asarray(grid.origin_xyz, float) + d_grid @ start_in_grid
        spacing = tuple(abs(float(s)) for s in self.step_mm)
        return Grid(tuple(int(s) for s in size_xyz), spacing, tuple(origin.tolist()), tuple(direction.ravel().tolist()))


def voxel_map(image: sitk.Image | Grid, grid: Grid) -> VoxelMap | None:
    """`image`'s voxel centres on `grid`, axis by axis; None unless the two grids' axes are parallel."""
    image_grid = image if isinstance(image, Grid) else Grid.of(image)
    alignment = _signed_permutation(image_grid.direction, grid.direction)
    if alignment is None:
        return None
    axes, signs = alignment
    d_grid = np.asarray(grid.direction, float).reshape(3, 3)
    start = d_grid.T @ (np.asarray(image_grid.origin_xyz) - np.asarray(grid.origin_xyz))  # grid frame (mm)
    return VoxelMap(
        axes=tuple(axes),
        start_mm=tuple(float(start[b]) for b in axes),
        step_mm=tuple(float(signs[a] * image_grid.spacing_xyz[a]) for a in range(3)),
        spacing_mm=tuple(float(grid.spacing_xyz[b]) for b in axes),
        grid_size=tuple(int(grid.size_xyz[b]) for b in axes),
        image_size_xyz=tuple(int(s) for s in image_grid.size_xyz),
    )


def check_implied_grid(vmap: VoxelMap, grid: Grid, vol_zyx: np.ndarray, image: sitk.Image, *, what: str) -> None:
    """Raise `GridMismatchError` unless `vol_zyx` laid out by `vmap` on `grid` is exactly `image`'s grid.

    Size from the array, spacing, direction and origin from the map: derived independently of the image's header,
    to 1e-4 (mm, or direction cosine). The round trip through the map costs about 1e-12 on an orthonormal
    direction, but NIfTI stores the direction in float32, and an oblique one read back is orthonormal only to
    about 1e-7: seen as 1.7e-6 mm on a generated oblique case. A wrong map is off by a voxel fraction (>= 0.1 mm).
    """
    diffs = Grid.of(image).differences(vmap.implied_grid(grid, vol_zyx.shape[::-1]), atol=1e-4)
    if diffs:
        raise GridMismatchError(f"{what} does not lie on the input's grid: " + "; ".join(diffs))


def lookup_block(vol_zyx: np.ndarray, vmap: VoxelMap, idx_xyz: list[np.ndarray], z0: int, z1: int) -> np.ndarray:
    """Output slices z0:z1 of `vol_zyx[idx]` (grid-indexed) on the image's (Z, Y, X) axes; index -1 gives 0.

    Each output axis draws from one grid axis (the grids are axis-parallel), so three 1D lookups (`np.take`)
    replace a 3D resampling: the slices, then the last numpy axis while still narrow (a gather along it is the
    slowest), then whole rows; an axis whose lookup is the identity is not copied at all.
    """
    # numpy axis of vol_zyx holding grid axis b is 2 - b; output numpy axes are image axes (z, y, x) = (2, 1, 0)
    block = vol_zyx.transpose([2 - vmap.axes[a] for a in (2, 1, 0)])
    for np_axis in (0, 2, 1):
        idx = idx_xyz[2 - np_axis][z0:z1] if np_axis == 0 else idx_xyz[2 - np_axis]
        if np_axis and len(idx) == block.shape[np_axis] and np.array_equal(idx, np.arange(len(idx))):
            continue
        block = block.take(np.clip(idx, 0, None), axis=np_axis)
        if (idx < 0).any():  # voxel centres outside the grid's field of view are background
            block[(slice(None),) * np_axis + (idx < 0,)] = 0
    return np.ascontiguousarray(block)


def labels_to_image_grid(labels_zyx: np.ndarray, labels_grid: Grid, image: sitk.Image) -> sitk.Image:
    """Nearest-neighbour labels on `image`'s grid, uint8, as `labels_to_grid` but by index lookup per axis.

    Exact when the two grids' axes are parallel (always, between the resampled grid and the input): each output
    axis then draws from one input axis, and three 1D lookups replace a 3D resampling (5-6x faster for a
    512 x 512 x 200 CT on 2 cores). Falls back to `labels_to_grid` otherwise. The output's grid is checked
    against the one the lookup implies (`check_implied_grid`) before it gets the image's header.
    """
    vmap = voxel_map(image, labels_grid)
    if vmap is None:
        labels = sitk.GetImageFromArray(labels_zyx)
        labels.SetOrigin(labels_grid.origin_xyz)
        labels.SetSpacing(labels_grid.spacing_xyz)
        labels.SetDirection(labels_grid.direction)
        return labels_to_grid(labels, image)
    idx_xyz = [vmap.nearest(a) for a in range(3)]
    labels_zyx = np.asarray(labels_zyx, np.uint8)
    out_zyx = np.empty([len(idx_xyz[a]) for a in (2, 1, 0)], np.uint8)

    def block(z0: int) -> None:  # a few output slices at a time (cache-sized), in threads
        out_zyx[z0 : z0 + _SLAB] = lookup_block(labels_zyx, vmap, idx_xyz, z0, z0 + _SLAB)

    in_threads(block, range(0, out_zyx.shape[0], _SLAB))
    check_implied_grid(vmap, labels_grid, out_zyx, image, what="restored labels")
    out = sitk.GetImageFromArray(out_zyx)
    out.CopyInformation(image)
    return out


def image_from_zyx(vol_zyx: np.ndarray, grid_image: sitk.Image) -> sitk.Image:
    """Wrap a (Z, Y, X) array as an image on `grid_image`'s grid (shapes must match)."""
    expected_zyx = tuple(reversed(grid_image.GetSize()))
    if vol_zyx.shape != expected_zyx:
        raise GridMismatchError(f"array shape {vol_zyx.shape} does not match the grid's (Z, Y, X) {expected_zyx}")
    out = sitk.GetImageFromArray(vol_zyx)
    out.CopyInformation(grid_image)
    return out
