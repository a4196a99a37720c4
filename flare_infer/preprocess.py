"""Intensity normalisation and padding of slices to a multiple of 16.

Normalisation as the paper: mean and standard deviation over all voxels of the resampled volume,
clip to mean +/- n_std * std, rescale that range to [0, 1]. Training and inference both reach it
through `flare_infer.pipeline.prepare`, so the two can never differ.
"""

from __future__ import annotations

import numpy as np

from flare_infer.spec import Normalization

PAD_MULTIPLE = 16  # four 2x poolings in the U-Net: H and W must divide by 2^4


def normalise(vol_zyx: np.ndarray, norm: Normalization) -> np.ndarray:
    """float32 copy of `vol_zyx` mapped from [mean - n*std, mean + n*std] to [0, 1] (clipped)."""
    mean = float(vol_zyx.mean(dtype=np.float64))
    std = float(vol_zyx.std(dtype=np.float64))
    lo, hi = mean - norm.n_std * std, mean + norm.n_std * std
    if not hi > lo:  # a constant volume: nothing to scale, every voxel is the same
        return np.zeros(vol_zyx.shape, np.float32)
    out = np.subtract(vol_zyx, lo, dtype=np.float32)  # in place from here on: one float32 volume in memory
    out *= np.float32(1.0 / (hi - lo))
    np.clip(out, 0.0, 1.0, out=out)
    return out


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
