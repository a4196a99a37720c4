"""Slice-batched prediction through any callable `batch -> scores`.

`predict_slices` streams batches of axial slices (2.5D: `input_channels` adjacent slices with edge
replication) through `predict_batch` and keeps per slice only the argmax label and its confidence,
so a 14-class score volume is never held in memory. The same code serves the ONNX Runtime session
(`flare_infer.session`), a torch teacher ensemble (training) and threshold stand-ins (tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from flare_infer.labels import NUM_CLASSES
from flare_infer.preprocess import pad_slices

PredictBatch = Callable[[np.ndarray], np.ndarray]  # (N, C_in, H, W) float32 -> (N, 14, H, W) float32 scores


@dataclass(frozen=True)
class SliceConfig:
    input_channels: int = 1  # odd: the predicted slice and (C - 1) / 2 neighbours on each side
    batch_size: int = 16
    output: str = "logits"  # or "probabilities": how to turn scores into a confidence
    fixed_batch: bool = False  # pad the last batch to batch_size (fixed shapes: no CUDA re-tuning)

    def __post_init__(self) -> None:
        if self.input_channels < 1 or self.input_channels % 2 == 0:
            raise ValueError(f"input_channels must be odd and >= 1, found {self.input_channels}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, found {self.batch_size}")


def gather_batch(vol_zyx: np.ndarray, z_indices: np.ndarray, input_channels: int) -> np.ndarray:
    """(N, C, H, W) stack of the slices around each of `z_indices`, repeating the edge slices."""
    k = input_channels // 2
    idx = np.clip(z_indices[:, None] + np.arange(-k, k + 1)[None, :], 0, vol_zyx.shape[0] - 1)  # (N, C)
    return vol_zyx[idx]  # (N, C, H, W)


def labels_and_confidence(scores_nkhw: np.ndarray, output: str) -> tuple[np.ndarray, np.ndarray]:
    """Argmax label (uint8) and max class probability (float16), softmax applied to logits."""
    labels = scores_nkhw.argmax(axis=1).astype(np.uint8)
    top = scores_nkhw.max(axis=1)
    if output == "logits":
        # max softmax probability = 1 / sum_k exp(s_k - s_max)
        confidence = 1.0 / np.exp(scores_nkhw - top[:, None]).sum(axis=1)
    else:
        confidence = top
    return labels, confidence.astype(np.float16)


def _check_scores(scores: np.ndarray, n: int, h: int, w: int) -> None:
    if not isinstance(scores, np.ndarray) or scores.ndim != 4 or scores.shape[0] < n or scores.shape[1] != NUM_CLASSES:
        found = getattr(scores, "shape", type(scores).__name__)
        raise ValueError(f"predict_batch must return (N={n}, {NUM_CLASSES}, H, W) scores, found {found}")
    if scores.shape[2] < h or scores.shape[3] < w:
        raise ValueError(f"predict_batch returned H, W = {scores.shape[2:]}, smaller than the input's {(h, w)}")


def predict_slices(
    predict_batch: PredictBatch, vol_zyx: np.ndarray, config: SliceConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Labels (uint8) and confidence (float16), both (Z, Y, X), for a normalised float32 volume."""
    depth, h, w = vol_zyx.shape
    labels_zyx = np.zeros((depth, h, w), np.uint8)
    confidence_zyx = np.zeros((depth, h, w), np.float16)
    for start in range(0, depth, config.batch_size):
        z = np.arange(start, min(start + config.batch_size, depth))
        batch = gather_batch(vol_zyx, z, config.input_channels)  # (n, C, H, W)
        if config.fixed_batch and len(z) < config.batch_size:
            batch = np.concatenate([batch, np.zeros((config.batch_size - len(z), *batch.shape[1:]), batch.dtype)])
        batch = np.ascontiguousarray(pad_slices(batch), dtype=np.float32)  # (n', C, H16, W16)
        scores = predict_batch(batch)  # (n', 14, H16, W16)
        _check_scores(scores, len(z), h, w)
        lab, conf = labels_and_confidence(scores[: len(z), :, :h, :w], config.output)
        labels_zyx[z] = lab
        confidence_zyx[z] = conf
    return labels_zyx, confidence_zyx
