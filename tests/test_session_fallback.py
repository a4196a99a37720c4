"""The GPU path without a GPU: CUDA out of memory never fails a case, the checked fp16 model is chosen on
CUDA only, and the CLI's read-ahead reports a bad file for that file.

    pytest tests/test_session_fallback.py -x -q

Fake sessions raise onnxruntime's out-of-memory texts (this machine has the CPU onnxruntime and no GPU);
the CPU fallback opens the real stand-in ONNX model (tests/onnx_standin.py).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from onnx_standin import make_standin_model

from flare_infer import io, session
from flare_infer.labels import NUM_CLASSES
from flare_infer.pipeline import predict_file
from flare_infer.session import CUDA, OnnxModel, fp16_sibling, load_model
from flare_infer.spec import load_spec

ARENA_OOM = (
    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running Conv node. "
    "Status Message: bfc_arena.cc:376 void* onnxruntime::BFCArena::AllocateRawInternal(size_t, bool) "
    "Failed to allocate memory for requested buffer of size 1073741824"
)
CUDA_OOM = "[ONNXRuntimeError] : 1 : FAIL : CUDA failure 2: out of memory ; GPU=0 ; expr=cudaMalloc(&p, size);"


def scores(batch: np.ndarray) -> np.ndarray:
    """Deterministic (N, 14, H, W) scores of a batch, slice by slice (what a network returns)."""
    return batch[:, :1] * np.arange(NUM_CLASSES, dtype=np.float32).reshape(1, -1, 1, 1)


class FakeCudaSession:
    """Runs batches of at most `fits` slices; larger ones raise `error` (None: every batch raises it)."""

    def __init__(self, fits: int | None, error: str = ARENA_OOM):
        self.fits, self.error, self.sizes = fits, error, []

    def run(self, outputs, feeds):
        (batch,) = feeds.values()
        self.sizes.append(len(batch))
        if self.fits is None or len(batch) > self.fits:
            raise RuntimeError(self.error)
        return [scores(batch)]


def cuda_model(fake, spec, cpu_model_path=None) -> OnnxModel:
    return OnnxModel(fake, spec, CUDA, "input", "output", cpu_model_path=cpu_model_path)


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    return make_standin_model(tmp_path_factory.mktemp("model"))


def test_cuda_out_of_memory_halves_the_batch_and_remembers_what_fits(standin, caplog):
    fake = FakeCudaSession(fits=2)
    model = cuda_model(fake, load_spec(standin))
    batch = np.random.default_rng(0).random((8, 1, 16, 16), dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="flare_infer"):
        out = model.predict(batch)
    np.testing.assert_array_equal(out, scores(batch))
    assert model.max_batch == 2 and model.provider == CUDA
    assert fake.sizes == [8, 4, 2, 2, 2, 2] and "CUDA out of memory at batch 8" in caplog.text
    fake.sizes.clear()
    model.predict(batch)  # the next batch goes straight to the size that fits
    assert fake.sizes == [2, 2, 2, 2]


def test_cuda_out_of_memory_at_one_slice_continues_on_a_cpu_session(standin, caplog):
    model = cuda_model(FakeCudaSession(fits=None, error=CUDA_OOM), load_spec(standin), cpu_model_path=standin)
    batch = np.random.default_rng(1).random((4, 1, 16, 16), dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="flare_infer"):
        out = model.predict(batch)
    expected = load_model(standin, device="cpu").predict(batch)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert model.provider == "CPUExecutionProvider" and not model.fixed_batch
    assert "continuing on the CPU" in caplog.text


def test_errors_other_than_out_of_memory_are_not_retried(standin):
    fake = FakeCudaSession(fits=None, error="[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Invalid rank for input")
    model = cuda_model(fake, load_spec(standin), cpu_model_path=standin)
    with pytest.raises(RuntimeError, match="Invalid rank"):
        model.predict(np.zeros((4, 1, 16, 16), np.float32))
    assert fake.sizes == [4] and model.provider == CUDA


def test_a_case_is_written_when_cuda_runs_out_of_memory_at_every_batch(standin, tmp_path):
    vol = np.full((6, 40, 40), -1000, np.int16)
    vol[:, 10:30, 10:30] = 60  # a soft-tissue block in air
    image = sitk.GetImageFromArray(vol)
    image.SetSpacing((1.5, 1.5, 3.0))
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    model = cuda_model(FakeCudaSession(fits=None), load_spec(standin), cpu_model_path=standin)
    predict_file(tmp_path / "ct.nii.gz", tmp_path / "gpu.nii.gz", model.predict, model.spec, batch_size=4)
    cpu = load_model(standin, device="cpu")
    predict_file(tmp_path / "ct.nii.gz", tmp_path / "cpu.nii.gz", cpu.predict, cpu.spec, batch_size=4)
    written = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{n}.nii.gz"))) for n in ("gpu", "cpu")]
    np.testing.assert_array_equal(*written)
    assert written[0].max() > 0


# ------------------------------------------------------------------------------------ fp16 choice
def _fp16_beside(model: Path, **fp16_info) -> Path:
    half = model.with_name(f"{model.stem}.fp16.onnx")
    half.write_bytes(model.read_bytes())
    sidecar = json.loads(model.with_suffix(".json").read_text())
    sidecar["fp16"] = {"io": "float32", "of": model.name, **fp16_info}
    half.with_suffix(".json").write_text(json.dumps(sidecar))
    return half


@pytest.mark.parametrize(
    ("info", "chosen"),
    [
        ({"argmax_agreement": 0.99998, "check_cts": 2}, True),
        ({}, False),  # converted without the agreement check
        ({"argmax_agreement": 0.998, "check_cts": 2}, False),  # below the export's 99.9 %
        ({"argmax_agreement": 0.99998, "check_cts": 2, "of": "other.onnx"}, False),
    ],
)
def test_fp16_sibling_only_with_a_passed_agreement_check_for_this_model(tmp_path, info, chosen):
    model = make_standin_model(tmp_path)
    half = _fp16_beside(model, **info)
    assert fp16_sibling(model, load_spec(model)) == (half if chosen else None)


def test_fp16_model_runs_on_cuda_and_the_fp32_model_on_the_cpu(tmp_path, monkeypatch):
    model = make_standin_model(tmp_path)
    half = _fp16_beside(model, argmax_agreement=0.99998, check_cts=2)
    real_open = session._open_session
    opened = []

    def fake_open(path, providers, threads):  # a CUDA session that is really the CPU one, reporting CUDA
        opened.append(Path(path))
        real = real_open(path, ["CPUExecutionProvider"], threads)
        real.get_providers = lambda: [CUDA, "CPUExecutionProvider"]
        return real

    monkeypatch.setattr(session, "_open_session", fake_open)
    monkeypatch.setattr(session, "_providers", lambda device, available, arena: [(CUDA, {}), "CPUExecutionProvider"])
    on_cuda = load_model(model, device="auto")
    assert opened == [half] and on_cuda.model_path == half and on_cuda.cpu_model_path == model
    assert load_model(model, device="auto", precision="fp32").model_path == model
    opened.clear()
    recording_open = lambda path, *args: opened.append(Path(path)) or real_open(path, *args)  # noqa: E731
    monkeypatch.setattr(session, "_open_session", recording_open)
    monkeypatch.setattr(session, "_providers", lambda device, available, arena: ["CPUExecutionProvider"])
    assert load_model(model, device="auto").model_path == model  # no CUDA: fp32, whatever is beside it
    assert opened == [model]


# ------------------------------------------------------------------------------------ read-ahead
def test_read_ahead_reads_in_the_background_and_raises_a_bad_file_for_that_file(tmp_path, monkeypatch):
    good, bad = tmp_path / "good.nii.gz", tmp_path / "bad.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 8, 8), np.int16)), str(good))
    bad.write_bytes(b"")
    threads = {}
    real_read = io.read_ct

    def recording_read(path):
        threads[Path(path).name] = threading.current_thread().name
        return real_read(path)

    monkeypatch.setattr(io, "read_ct", recording_read)
    with io.ReadAhead() as ahead:
        ahead.schedule(bad)
        ahead.schedule(good)
        with pytest.raises(io.InputError, match="empty file"):
            ahead.read(bad)
        assert ahead.read(good).GetSize() == (8, 8, 4)
    assert set(threads.values()) == {threads["good.nii.gz"]} and threads["good.nii.gz"].startswith("read-ahead")
    ahead.read(good)  # nothing scheduled any more: read here
    assert threads["good.nii.gz"] == threading.current_thread().name


def test_onnx_runtime_threads_do_not_spin_between_batches(standin):
    # Between runs the scores of the last batch are reduced on the same cores (predictor.predict_slices).
    opened = session._open_session(standin, ["CPUExecutionProvider"], 2)
    assert opened.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
