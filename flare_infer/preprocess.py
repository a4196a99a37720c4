"""Intensity normalisation and padding of slices to a multiple of 16.

Normalisation as the paper: mean and standard deviation over all voxels of the resampled volume,
clip to mean +/- n_std * std, rescale that range to [0, 1]. Training and inference both reach it
through `flare_infer.pipeline.prepare`, so the two can never differ.
"""

from __future__ import annotations

import numpy as np

from flare_infer.geometry import in_threads
from flare_infer.spec import Normalization

PAD_MULTIPLE = 16  # four 2x poolings in the U-Net: H and W must divide by 2^4


def normalise(vol_zyx: np.ndarray, norm: Normalization) -> np.ndarray:
    """float32 copy of `vol_zyx` mapped from [mean - n*std, mean + n*std] to [0, 1] (clipped)."""
    mean, std = mean_std(vol_zyx)
    lo, hi = mean - norm.n_std * std, mean + norm.n_std * std
    if not hi > lo:  # a constant volume: nothing to scale, every voxel is the same
        return np.zeros(vol_zyx.shape, np.float32)
    out = np.empty(vol_zyx.shape, np.float32)
    scale = np.float32(1.0 / (hi - lo))

    def slab(sl: slice) -> None:  # in place, slab by slab: each slab is read once and its result stays in cache
        np.subtract(vol_zyx[sl], lo, out=out[sl], dtype=np.float32)
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
