"""The body, intensity normalisation, and padding of slices to a multiple of 16.

`find_body` locates the patient in the resampled HU volume: padding outside the scanner's field-of-view
circle is recognised and made air, then the largest connected component above -500 HU, holes filled
slice by slice, is the body; its bounding box plus a margin is what the network sees (`Body.box_zyx`).
Table, arms beside the trunk, other objects and the padding are outside it.

`normalise` maps HU to the network's [0, 1] by the sidecar's `normalization.kind` (flare_infer.spec):
    ct_window           clip to a fixed HU window found on the training set's foreground, outside the body air
    body_mean_std_clip  the paper's mean +/- n_std * std, over the body's voxels
    mean_std_clip       the paper's rule read literally: over every voxel of the resampled volume
Only the last depends on the field of view, the padding value and the table (docs/INFERENCE.md has the
numbers). Training and inference both reach all this through `flare_infer.pipeline.prepare`, so the two can
never differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flare_infer.geometry import array_view, in_threads
from flare_infer.spec import Normalization

PAD_MULTIPLE = 16  # four 2x poolings in the U-Net: H and W must divide by 2^4
AIR_HU = -1024.0
# Between air/lung (< -700) and fat (about -100): the body's outline. A mattress (foam, about -900) stays out,
# so a table under it is a separate component.
BODY_THRESHOLD_HU = -500.0
BODY_MARGIN_MM = (15.0, 15.0, 0.0)  # x, y, z: air around the body in-plane, as the network saw in training
PADDING_TOLERANCE_HU = 0.5  # linear interpolation of a constant region gives the constant to float round-off
PADDING_RIM_MM = 3.0  # the interpolated seam between padding and the scan, made air with the padding


@dataclass(frozen=True)
class Body:
    """Where the patient is in a resampled volume (all on its (Z, Y, X) grid)."""

    mask_zyx: np.ndarray  # bool: the body, holes filled
    box_zyx: tuple[slice, slice, slice]  # its bounding box plus BODY_MARGIN_MM, clipped to the volume; may be empty
    padding_hu: float | None  # the value found outside the field-of-view circle, if any
    notes: tuple[str, ...] = ()  # what a user should hear about (no body found, not HU, ...): one log line each


def find_body(vol_hu_zyx: np.ndarray, spacing_xyz: tuple[float, float, float]) -> Body:
    """The body in a resampled HU volume; `vol_hu_zyx` is not modified (`normalise` makes outside it air)."""
    notes = list(_hu_notes(vol_hu_zyx))
    padding_hu, padding = _fov_padding(vol_hu_zyx, spacing_xyz)
    dense = vol_hu_zyx > BODY_THRESHOLD_HU
    if padding is not None:
        dense &= ~padding
    region = _bounding_box(dense)  # connected components only exist inside it: label there (the air is most)
    if region is None:
        notes.append("no body found (no voxel above -500 HU inside the field of view): the mask is all background")
        return Body(np.zeros(vol_hu_zyx.shape, bool), (slice(0, 0),) * 3, padding_hu, tuple(notes))
    components, n = label_components(dense[region])
    mask = np.zeros(vol_hu_zyx.shape, bool)
    mask[region] = components == _largest(components, n)
    mask |= _holes_in_plane(mask)  # lungs and bowel gas
    return Body(mask, _box(mask, spacing_xyz), padding_hu, tuple(notes))


def label_components(mask_zyx: np.ndarray) -> tuple[np.ndarray, int]:
    """Face-connected components of a bool array (2D or 3D): labels 1..n, 0 outside, and n. The components of
    `scipy.ndimage.label` with its default structure, numbered otherwise; by SimpleITK's ConnectedComponent, in
    threads, so that predicting never imports scipy (0.5 s of CPU per process, docs/PERFORMANCE.md). The labels are
    a read-only view of ITK's result (`array_view`: 26-46 ms of copies per case on the bench CT saved, by hand).
    """
    import SimpleITK as sitk

    vol = np.ascontiguousarray(mask_zyx, dtype=np.uint8)
    labels = array_view(sitk.ConnectedComponent(sitk.GetImageFromArray(vol), False))
    return labels, int(labels.max(initial=0))


def _largest(components_zyx: np.ndarray, n: int) -> int:
    """The label of the largest of components 1..n; on a tie, the one met first in C order (scipy's numbering's pick).

    Counted a slab at a time: bincount casts its input to int64, and a whole-volume cast is 8 bytes per voxel of
    memory touched for the first time (page faults cost 4-9 us each on the development VM, docs/PERFORMANCE.md).
    """
    flat = components_zyx.reshape(-1)
    sizes = np.zeros(n + 1, np.int64)
    step = 1 << 20
    for start in range(0, flat.size, step):
        sizes += np.bincount(flat[start : start + step], minlength=n + 1)
    sizes[0] = 0
    tied = np.flatnonzero(sizes == sizes.max())
    if len(tied) == 1:
        return int(tied[0])
    return int(min(tied, key=lambda c: int(np.argmax(flat == c))))


def _bounding_box(mask_zyx: np.ndarray, grow_zyx: tuple[int, int, int] = (0, 0, 0)) -> tuple[slice, ...] | None:
    """The smallest box holding every True voxel, grown by `grow_zyx` voxels on each side (inside the volume);
    None if there is none."""
    box = []
    for axis in range(3):  # numpy axis 0, 1, 2 = z, y, x
        along = np.flatnonzero(mask_zyx.any(axis=tuple(a for a in range(3) if a != axis)))
        if len(along) == 0:
            return None
        grow = grow_zyx[axis]
        box.append(slice(max(0, int(along[0]) - grow), min(mask_zyx.shape[axis], int(along[-1]) + 1 + grow)))
    return tuple(box)


def _holes_in_plane(mask_zyx: np.ndarray) -> np.ndarray:
    """Background enclosed by `mask_zyx` within its axial slice (what binary_fill_holes adds slice by slice).

    One 2D labelling of the background, the slices stacked as one tall image (Z * Y, X), instead of a fill per slice:
    a component that crosses from one slice's last row into the next one's first row touches both slices' edges,
    so it is outside in both, and a hole, which touches no edge, crosses nothing. A component reaching a slice's
    edge is outside. (Against labelling the slices apart in 3D with an empty slice between each two: 1.5x faster
    on 200 slices of 159 x 227, 2 cores, by hand; against a fill per slice, about 6x.)
    """
    holes = np.zeros(mask_zyx.shape, bool)
    # Holes lie inside the mask's box, labelled there only. Outside the box a slice is background that reaches its
    # edge, so background touching the box's in-plane border continues out to the edge: not a hole.
    region = _bounding_box(mask_zyx)
    if region is None:
        return holes
    background = ~mask_zyx[region]
    z, y, x = background.shape
    stacked, n = label_components(background.reshape(z * y, x))
    components = stacked.reshape(z, y, x)
    is_hole = ~_reaches_the_edge(components, n)
    is_hole[0] = False
    holes[region] = is_hole[components]
    return holes


def _reaches_the_edge(components_zyx: np.ndarray, n: int) -> np.ndarray:
    """bool per component label 0..n: True where the component has a voxel on a slice's in-plane edge."""
    edge = np.zeros(n + 1, bool)
    edge[components_zyx[:, [0, -1], :].ravel()] = True
    edge[components_zyx[:, :, [0, -1]].ravel()] = True
    return edge


def _box(mask_zyx: np.ndarray, spacing_xyz) -> tuple[slice, slice, slice]:
    """The body's bounding box plus BODY_MARGIN_MM (`mask_zyx` holds at least one voxel)."""
    margins = tuple(int(np.ceil(BODY_MARGIN_MM[2 - axis] / spacing_xyz[2 - axis])) for axis in range(3))
    return _bounding_box(mask_zyx, margins)


def _fov_padding(vol_hu_zyx: np.ndarray, spacing_xyz) -> tuple[float | None, np.ndarray | None]:
    """The constant outside the scanner's field-of-view circle, and where it is (with its interpolated rim).

    Padding is a region of one exact value reaching the in-plane border: the corners of most slices hold it.
    Below the body threshold it needs no handling (it is air to `find_body`), so only a value >= -500 HU (0 is
    common) is looked for; noisy tissue or air is never one constant over a connected region.
    """
    corners = vol_hu_zyx[:, [0, 0, -1, -1], [0, -1, 0, -1]]  # (Z, 4)
    value = float(np.median(corners))
    agree = np.abs(corners - value) < PADDING_TOLERANCE_HU
    if value <= BODY_THRESHOLD_HU or agree.mean() < 0.5:
        return (value if agree.mean() >= 0.5 else None), None
    from scipy import ndimage  # only for padding at or above -500 HU (0 is common): the dilation below

    const = np.abs(vol_hu_zyx - np.float32(value)) < PADDING_TOLERANCE_HU
    components, n = label_components(const)
    is_padding = _reaches_the_edge(components, n)
    is_padding[0] = False
    padding = is_padding[components]
    rim = max(1, int(round(PADDING_RIM_MM / min(spacing_xyz[:2]))))
    padding = ndimage.binary_dilation(padding, structure=np.ones((1, 3, 3), bool), iterations=rim)
    return value, padding


def _hu_notes(vol_hu_zyx: np.ndarray) -> list[str]:
    """A CT whose values are plainly not Hounsfield units (no air, or a range no scanner writes)."""
    lo, hi = float(vol_hu_zyx.min()), float(vol_hu_zyx.max())
    if lo > -500 or hi > 10000:
        return [
            f"intensities {lo:.0f}..{hi:.0f} do not look like Hounsfield units (air is about -1000 HU): "
            "if this is stored without its rescale slope/intercept, convert it to HU first"
        ]
    return []


def normalise(vol_hu_zyx: np.ndarray, norm: Normalization, body: Body | None = None) -> np.ndarray:
    """float32 volume on [0, 1] of the body's box (the whole volume for mean_std_clip's statistics).

    Args:
        vol_hu_zyx: resampled HU (Z, Y, X); not modified.
        norm: the sidecar's normalisation.
        body: `find_body(vol_hu_zyx, ...)`; required by ct_window and body_mean_std_clip. The result covers
            `body.box_zyx` when given, the whole volume otherwise.
    """
    box = body.box_zyx if body is not None else (slice(None),) * 3
    if norm.kind == "mean_std_clip":  # statistics of the whole volume, as sidecars of this kind always had
        mean, std = mean_std(vol_hu_zyx)
        return _window(vol_hu_zyx[box], mean - norm.n_std * std, mean + norm.n_std * std)
    if body is None:
        raise ValueError(f"normalization {norm.kind!r} needs the body: pass body=find_body(...)")
    if norm.kind == "ct_window":
        return _window(vol_hu_zyx[box], *norm.window_hu, body=body.mask_zyx[box])
    inside = vol_hu_zyx[body.mask_zyx]
    mean, std = (float(inside.mean(dtype=np.float64)), float(inside.std(dtype=np.float64))) if inside.size else (0, 0)
    return _window(vol_hu_zyx[box], mean - norm.n_std * std, mean + norm.n_std * std, body=body.mask_zyx[box])


def _window(vol_zyx: np.ndarray, lo: float, hi: float, body: np.ndarray | None = None) -> np.ndarray:
    """float32 copy of `vol_zyx` mapped from [lo, hi] to [0, 1] (clipped); zeros if the range is empty. With `body`
    (bool, the same shape), voxels outside it are taken as air (AIR_HU) first."""
    if not hi > lo:  # a constant volume: nothing to scale, every voxel is the same
        return np.zeros(vol_zyx.shape, np.float32)
    out = np.empty(vol_zyx.shape, np.float32)
    scale = np.float32(1.0 / (hi - lo))

    def slab(sl: slice) -> None:  # in place, slab by slab: each slab is read once and its result stays in cache
        hu = vol_zyx[sl] if body is None else np.where(body[sl], vol_zyx[sl], np.float32(AIR_HU))
        np.subtract(hu, lo, out=out[sl], dtype=np.float32)
        out[sl] *= scale
        np.clip(out[sl], 0.0, 1.0, out=out[sl])

    in_threads(slab, _slabs(vol_zyx))
    return out


def mean_std(vol: np.ndarray) -> tuple[float, float]:
    """Mean and (population) standard deviation of all voxels, accumulated in float64.

    Two passes over cache-sized slabs (the deviations from the mean in float32, their squares summed in
    float64), so no volume-sized float64 temporary; the same numbers as `vol.mean()`, `vol.std()` in float64
    to about 1e-6 relative.
    """
    n, slabs = vol.size, _slabs(vol)
    sums = np.zeros(len(slabs))

    def slab_sum(i: int) -> None:
        sums[i] = np.add.reduce(vol[slabs[i]], axis=None, dtype=np.float64)

    in_threads(slab_sum, range(len(slabs)))
    mean = float(sums.sum()) / n

    def slab_sq(i: int) -> None:
        dev = np.subtract(vol[slabs[i]], mean, dtype=np.float32)
        sums[i] = np.add.reduce(np.square(dev, out=dev), axis=None, dtype=np.float64)

    in_threads(slab_sq, range(len(slabs)))
    return mean, (float(sums.sum()) / n) ** 0.5


def _slabs(vol: np.ndarray, slab_bytes: int = 1 << 21):
    """Slices along axis 0 of about `slab_bytes` of float32 each (at least one index per slab)."""
    per_index = max(1, vol[:1].size * 4)
    step = max(1, slab_bytes // per_index)
    return [slice(i, i + step) for i in range(0, max(1, vol.shape[0]), step)]


def padded_size(n: int, multiple: int = PAD_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def pad_slices(batch_nchw: np.ndarray, multiple: int = PAD_MULTIPLE) -> np.ndarray:
    """Zero-pad H and W at the far end to multiples of `multiple` (0 is the darkest normalised value)."""
    n, c, h, w = batch_nchw.shape
    hp, wp = padded_size(h, multiple), padded_size(w, multiple)
    if (hp, wp) == (h, w):
        return batch_nchw
    out = np.zeros((n, c, hp, wp), batch_nchw.dtype)
    out[:, :, :h, :w] = batch_nchw
    return out
