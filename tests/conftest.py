"""Shared test set-up: the repository root on sys.path, so `from tests.onnx_standin import make_standin_model`
works under plain `pytest` as under `python -m pytest` (helpers in tests/ are imported by other suites).

    pytest tests/ -x -q
"""

import sys
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): on a shared
    2-core machine, 2 spinning OpenMP threads make tiny nets ~5x slower. torch is imported here, not at the top,
    so suites without torch never load it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
