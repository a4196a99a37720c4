"""Shared test set-up: the repository root on sys.path, so `from tests.onnx_standin import make_standin_model`
works under plain `pytest` as under `python -m pytest` (helpers in tests/ are imported by other suites).

    pytest tests/ -x -q
"""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
