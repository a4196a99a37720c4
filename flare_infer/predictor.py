"""Slice-batched prediction through any callable `batch -> scores`.

`predict_slices` streams batches of axial slices (2.5D: `input_channels` adjacent slices with edge
replication) through `predict_batch` and keeps per slice only what the caller asks for (`OUTPUTS`):
the argmax label (always), the confidence (max class probability: training's pseudo-labels), the
class probabilities (the `linear` restore, flare_infer.restore). Scores are reduced per batch,
so a float32 14-class score volume is never held in memory. The same code serves the ONNX Runtime session
(`flare_infer.session`), a torch teacher ensemble (training) and threshold stand-ins (tests).

The probabilities are stored only at boundary voxels (`StoredProbabilities`, float32): those with a neighbour,
among the 26 around them, of another label. These are the corners of every cell the linear restore interpolates
in (a cell whose 8 corners disagree); inside an organ or the background the label alone is the answer. On a
near-free model the softmax and float16 rounding of every voxel had been most of `infer` (docs/PERFORMANCE.md).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from flare_infer.labels import NUM_CLASSES
from flare_infer.preprocess import pad_slices

PredictBatch = Callable[[np.ndarray], np.ndarray]  # (N, C_in, H, W) float32 -> (N, 14, H, W) float32 scores
OUTPUTS = ("labels", "confidence", "probabilities")


@dataclass(frozen=True)
class SliceConfig:
    input_channels: int = 1  # odd: the predicted slice and (C - 1) / 2 neighbours on each side
    batch_size: int = 16
    output: str = "logits"  # or "probabilities": how to turn scores into a confidence
    fixed_batch: bool = False  # pad the last batch to batch_size (fixed shapes: no CUDA re-tuning)
    # what predict_slices returns, in this order: "labels" uint8 (Z, Y, X), "confidence" float16 (Z, Y, X),
    # "probabilities" StoredProbabilities (float32 at boundary voxels); only these are computed
    outputs: tuple[str, ...] = ("labels", "confidence")

    def __post_init__(self) -> None:
        if not self.outputs or len(set(self.outputs)) != len(self.outputs) or not set(self.outputs) <= set(OUTPUTS):
            raise ValueError(f"outputs must be distinct names from {OUTPUTS}, found {self.outputs}")
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
    labels = argmax_planes(scores_nkhw)
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


def probabilities(scores_nkhw: np.ndarray, output: str) -> np.ndarray:
    """float32 class probabilities (N, 14, H, W): softmax of logits, or the scores as they are."""
    if output != "logits":
        return np.clip(scores_nkhw, 0.0, 1.0, dtype=np.float32)  # a copy (the caller changes it), in [0, 1]
    e = np.subtract(scores_nkhw, scores_nkhw.max(axis=1, keepdims=True), dtype=np.float32)
    np.exp(e, out=e)
    e *= 1.0 / e.sum(axis=1, keepdims=True)
    return e


_ARGMAX_SLICES = 2  # slices per argmax block (argmax_planes)


def argmax_planes(scores_nkhw: np.ndarray) -> np.ndarray:
    """uint8 argmax over axis 1 (first on ties, as numpy's), plane by plane: 10x faster than argmax(axis=1).

    Two slices at a time, so that the running maximum stays in cache across the 14 planes (25 % faster than the
    whole batch at once on 16 slices of 179 x 247, measured by hand).
    """
    labels = np.empty((scores_nkhw.shape[0], *scores_nkhw.shape[2:]), np.uint8)
    for i in range(0, len(scores_nkhw), _ARGMAX_SLICES):
        labels[i : i + _ARGMAX_SLICES] = _first_max(scores_nkhw[i : i + _ARGMAX_SLICES])
    return labels


def _first_max(scores_nk: np.ndarray) -> np.ndarray:
    """uint8 argmax over axis 1 of (N, K, ...) scores, first on ties: K passes of elementwise comparisons."""
    best = scores_nk[:, 0].copy()
    labels = np.zeros(best.shape, np.uint8)
    for k in range(1, scores_nk.shape[1]):
        higher = scores_nk[:, k] > best
        labels[higher] = k
        np.maximum(best, scores_nk[:, k], out=best)
    return labels


def top_two(values_km: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of class-major values (14, M): the argmax (uint8, first on ties) and the second largest value (the
    largest of the other classes; equal to the largest on a tie), in 14 passes over contiguous rows."""
    best = values_km[0].copy()
    second = np.full(best.shape, -np.inf, values_km.dtype)
    labels = np.zeros(best.shape, np.uint8)
    for k in range(1, len(values_km)):
        higher = values_km[k] > best
        np.maximum(second, np.where(higher, best, values_km[k]), out=second)
        labels[higher] = k
        np.maximum(best, values_km[k], out=best)
    return labels, second


@dataclass(frozen=True)
class StoredProbabilities:
    """Class probabilities of some voxels of a (Z, Y, X) volume.

    `row[z, y, x]` is the voxel's row in `values`, -1 where nothing is stored; a voxel without a row is taken as
    certain of its label (`table_rows`). `predict_slices` stores the voxels with a 26-neighbour of another label
    (label 0 outside the volume): every corner of a cell whose corners disagree, so the linear restore's result is
    the one of the full probabilities. Post-processing that removes a component makes its voxels certain background
    (`flare_infer.restore.drop_removed`): every corner of a mixed cell is then stored or removed (components are
    26-connected, so a removed voxel's same-label neighbours are removed too).
    """

    row: np.ndarray  # int32 (Z, Y, X)
    values: np.ndarray  # float32 (M, 14)
    # per row, where the builder computed them with the values: its label (argmax, first on ties) and second largest
    # value, (uint8 (M,), float32 (M,)); kept true by whoever changes `values` (`flare_infer.restore.drop_removed`)
    top_two: tuple[np.ndarray, np.ndarray] | None = None
    # (M + 14, 14), where the builder made it: `values` is its first M rows (a view), so `table()` copies nothing
    whole_table: np.ndarray | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.row.shape

    @classmethod
    def dense(cls, probabilities_zyxc: np.ndarray) -> StoredProbabilities:
        """Every voxel stored: (Z, Y, X, 14) probabilities (tests, benchmarks)."""
        shape = probabilities_zyxc.shape[:3]
        row = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
        return cls(row, np.asarray(probabilities_zyxc, np.float32).reshape(-1, NUM_CLASSES))

    def table(self) -> np.ndarray:
        """float32 (M + 14, 14): the stored values, then one certain row per class (`table_rows`)."""
        if self.whole_table is not None:
            return self.whole_table
        return np.concatenate([self.values, np.eye(NUM_CLASSES, dtype=np.float32)])

    def table_rows(self, labels_zyx: np.ndarray) -> np.ndarray:
        """int32 (Z, Y, X): each voxel's row of `table()`: its stored row, or M + its label."""
        return np.where(self.row >= 0, self.row, len(self.values) + labels_zyx.astype(np.int32))

    def to_dense(self, labels_zyx: np.ndarray) -> np.ndarray:
        """float32 (Z, Y, X, 14): the probabilities the restore uses at every voxel."""
        return self.table()[self.table_rows(labels_zyx)]


def boundary(labels_nhw: np.ndarray, before_hw: np.ndarray, after_hw: np.ndarray) -> np.ndarray:
    """bool (N, H, W): voxels with a 26-neighbour of another label; `before_hw`, `after_hw`: the slices around the
    stack (zeros at the volume's ends); outside the slices in-plane counts as label 0.

    A voxel's 3 x 3 x 3 neighbourhood holds one label exactly when its maximum equals its minimum: both are separable
    (three passes of two comparisons each), against 26 comparisons per voxel.
    """
    stack = np.pad(np.concatenate([before_hw[None], labels_nhw, after_hw[None]]), ((0, 0), (1, 1), (1, 1)))

    def extreme(op) -> np.ndarray:
        e = op(op(stack[:-2], stack[1:-1]), stack[2:])  # (N, H + 2, W + 2): over z
        e = op(op(e[:, :-2], e[:, 1:-1]), e[:, 2:])  # (N, H, W + 2): over y
        return op(op(e[:, :, :-2], e[:, :, 1:-1]), e[:, :, 2:])  # (N, H, W): over x

    return extreme(np.maximum) != extreme(np.minimum)


def stored_rows(scores_nkhw: np.ndarray, flat: np.ndarray, shape_hw: tuple[int, int], output: str) -> np.ndarray:
    """float32 (14, M) class probabilities, class-major, of the voxels `flat` (flat indices on (N, H, W) = `shape_hw`).

    `scores_nkhw` is the network's C-contiguous output, (N, 14, H', W') with H' >= H, W' >= W (slices padded at the
    far end): each class is one `np.take` from it, and the softmax runs over 14 rows of M as the dense
    `probabilities` runs over 14 planes (the same operations, in the same order: the same float32 values).
    """
    h, w = shape_hw
    _, k, hp, wp = scores_nkhw.shape
    i, rest = np.divmod(flat, h * w)
    y, x = np.divmod(rest, w)
    first = (i * (k * hp) + y) * wp + x  # class 0's score of each voxel
    picked = np.take(np.ascontiguousarray(scores_nkhw).reshape(-1), first + (np.arange(k) * (hp * wp))[:, None])
    return probabilities(picked[None, :, :, None], output)[0, :, :, 0]  # (14, M)


class _BoundaryStore:
    """Builds `StoredProbabilities` batch by batch: a slice's boundary needs the next slice's labels, so the last
    slice of each batch waits (its scores copied: one slice) until the next batch, or the end, gives them.

    Stored voxels are relabelled with the argmax of their stored values (they differ from the scores' argmax only
    where rounding in the softmax ties two classes): the restore's cell shortcut and its interpolation then agree.
    """

    def __init__(self, labels_zyx: np.ndarray, output: str) -> None:
        self.labels, self.output = labels_zyx, output
        self.row = np.full(labels_zyx.shape, -1, np.int32)
        self.values: list[np.ndarray] = []
        self.labels_seconds: list[tuple[np.ndarray, np.ndarray]] = []
        self.count = 0
        self.pending: tuple[int, np.ndarray] | None = None  # (z, scores (1, 14, H, W)) of a slice waiting

    def add(self, z0: int, scores_nkhw: np.ndarray) -> None:
        """Scores (C-contiguous, H and W padded or not) of slices z0, z0 + 1, ... whose labels are in `labels`."""
        if self.pending is not None:
            self._store(*self.pending)
        self._store(z0, scores_nkhw[:-1])
        self.pending = (z0 + len(scores_nkhw) - 1, scores_nkhw[-1:].copy())

    def finish(self) -> StoredProbabilities:
        if self.pending is not None:
            self._store(*self.pending)
        if not self.values:
            return StoredProbabilities(self.row, np.zeros((0, NUM_CLASSES), np.float32))
        top = tuple(np.concatenate(parts) for parts in zip(*self.labels_seconds, strict=True))
        table = np.concatenate([*self.values, np.eye(NUM_CLASSES, dtype=np.float32)])
        return StoredProbabilities(self.row, table[:-NUM_CLASSES], top, table)

    def _store(self, z0: int, scores_nkhw: np.ndarray) -> None:
        n = len(scores_nkhw)
        if n == 0:
            return
        depth, h, w = self.labels.shape
        none = np.zeros((h, w), np.uint8)  # label 0 beyond the volume's ends
        before = self.labels[z0 - 1] if z0 > 0 else none
        after = self.labels[z0 + n] if z0 + n < depth else none
        flat = np.flatnonzero(boundary(self.labels[z0 : z0 + n], before, after))  # on (n, H, W): 10x np.nonzero
        by_class = stored_rows(scores_nkhw, flat, (h, w), self.output)  # (14, M) float32
        label, second = top_two(by_class)  # here, class-major, 2x cheaper than from the (M, 14) rows in the restore
        self.labels[z0 : z0 + n].reshape(-1)[flat] = label
        self.labels_seconds.append((label, second))
        self.row[z0 : z0 + n].reshape(-1)[flat] = np.arange(self.count, self.count + len(flat), dtype=np.int32)
        self.values.append(by_class.T)
        self.count += len(flat)


def predict_slices(predict_batch: PredictBatch, vol_zyx: np.ndarray, config: SliceConfig) -> tuple:
    """`config.outputs` for a normalised volume, in that order: "labels" uint8 (Z, Y, X), "confidence" float16
    (Z, Y, X), "probabilities" a `StoredProbabilities` (the boundary voxels' values).

    A batch's scores are reduced (argmax, confidence, stored probabilities) in a worker thread while the next batch
    is gathered and predicted: numpy and ONNX Runtime release the GIL, and on a GPU the reduction then hides behind
    the network. At most two batches of scores are held at once; batches are reduced in order.

    Design (the threads' invariants; tests/test_predictor_threads.py injects delays at every hand-over):
    - Ownership: `labels`, `confidence` and the boundary store are written by the worker thread alone (`reduce`,
      then `store.finish`), one batch after another in submission order. The calling thread only reads the volume
      and calls the network, and reads the outputs once the worker is done.
    - Hand-over by value: where the calling thread takes a share of the argmax (below), it computes it into an
      array of its own and passes it to `reduce` as an argument; the worker writes it into `labels` before it
      computes the rest and before `store.add` reads those labels (a stored slice's boundary needs the labels of
      its neighbours, including the next batch's first slice). An argument cannot arrive after the call that
      takes it, so the order no longer depends on timing. (Before 2026-12-07 the calling thread wrote its half
      into `labels` itself, right only because it did so before `submit`: moved after it, every test passed, and
      with a 50 ms delay the restore read a zero slice.)
    - The share: only while the worker still reduces the previous batch (the reduction, not the network, is the
      bottleneck: a near-free model on a CPU) does the calling thread take the argmax of a batch's first half; with
      a slower network it goes straight on. Gain with the split, measured by hand (commit 33578db): predict_volume
      on the bench CT with the near-free stand-in 0.32-0.40 s against 0.39-0.46 s. The hand-over by value costs
      what the old in-place write did (argmax_planes returns a new array either way; one copy into `labels`):
      median ratio 1.00 against the old code, 9 alternating pairs on the bench CT's box, identical outputs
      (benchmarks/bench_predict_slices.py, docs/results/predict_slices_handover.json; a shared 2-core machine).
    """
    depth, h, w = vol_zyx.shape
    labels = np.zeros((depth, h, w), np.uint8)
    confidence = np.zeros((depth, h, w), np.float16) if "confidence" in config.outputs else None
    store = _BoundaryStore(labels, config.output) if "probabilities" in config.outputs else None

    def reduce(start: int, z: np.ndarray, padded: np.ndarray, head: np.ndarray | None) -> None:
        """The worker's whole write to the outputs for one batch; `head`: the calling thread's argmax of its first
        slices (or None), (len(head), H, W) uint8."""
        scores = padded[:, :, :h, :w]  # (n, 14, H, W) of (n, 14, H16, W16)
        if confidence is not None:
            labels[z], confidence[z] = labels_and_confidence(scores, config.output)
        else:
            done = 0 if head is None else len(head)
            if done:
                labels[z[:done]] = head
            labels[z[done:]] = argmax_planes(scores[done:])
        if store is not None:
            store.add(start, padded)

    with ThreadPoolExecutor(1) as worker:
        reducing = None  # the previous batch's reduction
        for start in range(0, depth, config.batch_size):
            z = np.arange(start, min(start + config.batch_size, depth))
            batch = gather_batch(vol_zyx, z, config.input_channels)  # (n, C, H, W)
            if config.fixed_batch and len(z) < config.batch_size:
                batch = np.concatenate([batch, np.zeros((config.batch_size - len(z), *batch.shape[1:]), batch.dtype)])
            batch = np.ascontiguousarray(pad_slices(batch), dtype=np.float32)  # (n', C, H16, W16)
            scores = predict_batch(batch)  # (n', 14, H16, W16)
            _check_scores(scores, len(z), h, w)
            # The share (see the docstring): the first half's argmax here while the worker is still busy. Labels only:
            # the pseudo-labels' confidence needs the worker's whole pass.
            busy = reducing is not None and not reducing.done()
            head = argmax_planes(scores[: len(z) // 2, :, :h, :w]) if busy and confidence is None else None
            if reducing is not None:
                reducing.result()  # re-raises its exception here
            reducing = worker.submit(reduce, start, z, scores[: len(z)], head)
        if reducing is not None:
            reducing.result()
        stored = worker.submit(store.finish).result() if store else None  # its last slice: a write, the worker's
    results = {"labels": labels, "confidence": confidence, "probabilities": stored}
    return tuple(results[name] for name in config.outputs)
