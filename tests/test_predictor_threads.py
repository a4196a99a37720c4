"""predict_slices' two threads give the same outputs whatever either of them is delayed at (issue 29).

    pytest tests/test_predictor_threads.py

A delay is injected at each hand-over between the calling thread and the worker: the network call, the calling
thread's share of the argmax, right before and right after `submit`, the worker's argmax, the boundary
store's `add` (which reads the labels of a batch and of its neighbours), and inside it after the read. The
outputs (labels, stored rows and values, the stored labels and seconds) must equal one single-batch pass,
where no thread shares anything.

Each calling-thread delay is combined with each worker delay (3x longer, so the worker is behind and the
calling thread takes its shares of the argmax). Mutation caught (the reordering of issue 29, item 2): the
calling thread writing its half of the argmax into `labels` itself, after `submit` (the worker no longer
writing `head`): 4 of the 15 pairs fail (every calling-thread delay with the delay inside the store, where
the store reads a slice the calling thread has not written yet), and the ownership test fails outright.
"""

import threading
import time

import numpy as np
import pytest

from flare_infer import predictor
from flare_infer.labels import NUM_CLASSES
from flare_infer.predictor import SliceConfig, predict_slices

DELAY_S = 0.02  # on the calling thread's side; the worker's delays are 3x, so the worker is behind and shares
CALLER = ("none", "network", "caller_argmax", "before_submit", "after_submit")
WORKER = ("worker_argmax", "store_add", "store_compute")  # store_compute: inside add, after it read the labels


def _network(batch: np.ndarray) -> np.ndarray:
    """Smooth logits with many boundaries: class k peaks where the slice's value is near k / 13."""
    v = batch[:, :1]  # (N, 1, H, W)
    centres = np.linspace(0, 1, NUM_CLASSES, dtype=np.float32)[None, :, None, None]
    return np.ascontiguousarray(-40.0 * (v - centres) ** 2, dtype=np.float32)  # (N, 14, H, W)


def _volume() -> np.ndarray:
    """Regions of 4 labels (1 to 4) a few voxels thick, slanted across slices: stored voxels are their surfaces
    (about 70 % of this small volume), so a slice read as zeros (label 0) changes which voxels are stored."""
    z, y, x = np.meshgrid(np.arange(21), np.arange(18), np.arange(23), indexing="ij")
    return (1.0 + ((z + 0.5 * y + 0.25 * x) // 6) % 4).astype(np.float32) / 13.0


def _run(monkeypatch, delayed: set[str], batch_size: int):
    caller = threading.get_ident()
    argmax, add, pool = predictor.argmax_planes, predictor._BoundaryStore.add, predictor.ThreadPoolExecutor
    top_two = predictor.top_two
    calls = {"caller_argmax": 0}

    def wait(point: str) -> None:
        if point in delayed:
            time.sleep(DELAY_S * (3 if point in WORKER else 1))

    def delayed_top_two(values):
        wait("store_compute")
        return top_two(values)

    def delayed_argmax(scores):
        in_caller = threading.get_ident() == caller
        calls["caller_argmax"] += in_caller
        wait("caller_argmax" if in_caller else "worker_argmax")
        return argmax(scores)

    def delayed_add(self, *args):
        wait("store_add")
        add(self, *args)

    class DelayedPool(pool):
        def submit(self, *args, **kwargs):
            wait("before_submit")
            future = super().submit(*args, **kwargs)
            wait("after_submit")
            return future

    def network(batch):
        wait("network")
        return _network(batch)

    with monkeypatch.context() as patch:
        patch.setattr(predictor, "argmax_planes", delayed_argmax)
        patch.setattr(predictor._BoundaryStore, "add", delayed_add)
        patch.setattr(predictor, "ThreadPoolExecutor", DelayedPool)
        patch.setattr(predictor, "top_two", delayed_top_two)
        config = SliceConfig(batch_size=batch_size, outputs=("labels", "probabilities"))
        out = predict_slices(network, _volume(), config)
    return out, calls["caller_argmax"]


@pytest.mark.parametrize("worker_point", WORKER)
@pytest.mark.parametrize("caller_point", CALLER)
def test_outputs_equal_one_pass_whatever_hand_over_is_delayed(monkeypatch, caller_point, worker_point):
    (labels, probs), _ = _run(monkeypatch, set(), batch_size=64)  # one batch: nothing shared between threads
    (labels_t, probs_t), shared = _run(monkeypatch, {caller_point, worker_point}, batch_size=3)
    assert shared > 0  # the worker was behind: the calling thread took shares of the argmax
    _assert_same(labels_t, probs_t, labels, probs)


def test_outputs_equal_one_pass_with_every_delay_at_once(monkeypatch):
    (labels, probs), _ = _run(monkeypatch, set(), batch_size=64)
    (labels_t, probs_t), _ = _run(monkeypatch, {*CALLER, *WORKER}, batch_size=3)
    _assert_same(labels_t, probs_t, labels, probs)


def _assert_same(labels_t, probs_t, labels, probs) -> None:
    np.testing.assert_array_equal(labels_t, labels)
    np.testing.assert_array_equal(probs_t.row, probs.row)
    np.testing.assert_array_equal(probs_t.values, probs.values)
    for ours, one_pass in zip(probs_t.top_two, probs.top_two, strict=True):
        np.testing.assert_array_equal(ours, one_pass)


def test_the_calling_thread_never_writes_the_outputs(monkeypatch):
    """The ownership rule itself: every write into `labels` comes from the worker thread. Checked by making the
    labels array record the thread of each write (a subclass of ndarray whose __setitem__ notes it)."""
    writers: list[bool] = []
    caller, vol = threading.get_ident(), _volume()

    class Recorded(np.ndarray):
        def __setitem__(self, key, value):
            writers.append(threading.get_ident() == caller)
            super().__setitem__(key, value)

    zeros = np.zeros

    def recorded_zeros(shape, dtype=float, *args, **kwargs):
        out = zeros(shape, dtype, *args, **kwargs)
        return out.view(Recorded) if np.dtype(dtype) == np.uint8 and tuple(shape) == vol.shape else out

    def slow_add(self, *args):
        time.sleep(DELAY_S)  # the worker behind: the calling thread takes its shares
        add(self, *args)

    add = predictor._BoundaryStore.add
    monkeypatch.setattr(predictor.np, "zeros", recorded_zeros)
    monkeypatch.setattr(predictor._BoundaryStore, "add", slow_add)
    predict_slices(_network, vol, SliceConfig(batch_size=3, outputs=("labels", "probabilities")))
    assert writers and not any(writers), f"{sum(writers)} of {len(writers)} writes into labels in the calling thread"
