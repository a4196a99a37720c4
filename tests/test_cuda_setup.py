"""flare_infer.cuda_setup: CUDA libraries are preloaded only for a CUDA onnxruntime with a visible driver.

    python -m pytest tests/test_cuda_setup.py -q

A fake `onnxruntime` module stands in for onnxruntime-gpu (this machine has the CPU build and no GPU);
the image's own check is in tests/test_container.py.
"""

from __future__ import annotations

import sys
import types

import pytest

from flare_infer import cuda_setup

GPU_PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def fake_onnxruntime(providers: list[str], calls: list[dict]) -> types.ModuleType:
    module = types.ModuleType("onnxruntime")
    module.get_available_providers = lambda: providers
    module.preload_dlls = lambda **kwargs: calls.append(kwargs)
    return module


@pytest.fixture
def driver(monkeypatch, tmp_path):
    """Pretend an NVIDIA driver is visible (a marker file that exists)."""
    marker = tmp_path / "version"
    marker.write_text("NVRM version: fake\n")
    monkeypatch.setattr(cuda_setup, "DRIVER_MARKERS", (marker,))


def test_preload_cuda_loads_the_pip_libraries_when_onnxruntime_has_cuda_and_a_driver_is_visible(monkeypatch, driver):
    calls: list[dict] = []
    monkeypatch.setitem(sys.modules, "onnxruntime", fake_onnxruntime(GPU_PROVIDERS, calls))
    assert cuda_setup.preload_cuda() is True
    assert calls == [{"cuda": True, "cudnn": True, "msvc": False}]


def test_preload_cuda_loads_nothing_without_a_visible_driver(monkeypatch, tmp_path):
    calls: list[dict] = []
    monkeypatch.setitem(sys.modules, "onnxruntime", fake_onnxruntime(GPU_PROVIDERS, calls))
    monkeypatch.setattr(cuda_setup, "DRIVER_MARKERS", (tmp_path / "absent",))
    assert cuda_setup.nvidia_driver_visible() is False
    assert cuda_setup.preload_cuda() is False
    assert calls == []


def test_preload_cuda_loads_nothing_for_a_cpu_only_onnxruntime(monkeypatch, driver):
    calls: list[dict] = []
    monkeypatch.setitem(sys.modules, "onnxruntime", fake_onnxruntime(["CPUExecutionProvider"], calls))
    assert cuda_setup.preload_cuda() is False
    assert calls == []
