"""What the `python -m training.*` CLIs share: their typer app, and one line instead of a traceback
when the `train` extra (torch, onnx, albumentations, ...) is not installed.

    python -m training.teacher --help      # without torch: error: ... pip install -r requirements-ci.txt ...

`install_missing_extra_hook` runs when the `training` package is imported (training/__init__.py), so
before any CLI module's own `import torch`: `python -m` imports the package first.
"""

from __future__ import annotations

import importlib.util
import sys

# The README's command (Quick start 2 and "Installing"): torch's CPU build from requirements-ci.txt, not the
# multi-GB CUDA build plain `pip install -e ".[train]"` fetches on a machine without a GPU.
INSTALL_TRAIN = 'pip install -r requirements-ci.txt -e ".[cpu,train]"'
# Import names of pyproject's `train` extra (cv2 comes with albumentations, pynvml with nvidia-ml-py).
TRAIN_MODULES = frozenset({"torch", "onnx", "onnxscript", "onnxconverter_common", "albumentations", "cv2", "rich",
                           "matplotlib", "psutil", "pynvml"})  # fmt: skip


def missing_extra_message(exc: BaseException) -> str | None:
    """The one-line error for a ModuleNotFoundError of a `train` package that is absent; None for anything else.

    A package that is installed but fails inside (a missing submodule, a broken build) keeps its traceback.
    """
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    top = exc.name.split(".")[0]
    if top not in TRAIN_MODULES or _installed(top):
        return None
    return (f"error: the training CLIs need the `train` extra; {top!r} is not installed here. "
            f"Install it with: {INSTALL_TRAIN}")  # fmt: skip


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a finder that refuses it (as the tests' blocker does): not importable
        return False


def install_missing_extra_hook() -> None:
    """sys.excepthook: an uncaught missing-`train`-package error prints `missing_extra_message` and exits 1."""
    previous = sys.excepthook

    def hook(exc_type, exc, tb) -> None:
        message = missing_extra_message(exc)
        if message is None:
            previous(exc_type, exc, tb)
        else:
            print(message, file=sys.stderr)

    sys.excepthook = hook


def require_train_extra() -> None:
    """Import torch now, for a CLI that imports it only deep inside (training.reproduce): without the extra,
    the hook's one line comes before any work is done."""
    importlib.import_module("torch")


def typer_app():
    """A training CLI's typer app: click's plain help, whose option names are never cut (rich's table cut
    `--confidence-threshold` to `--confidence-thre…` at 80 columns), and plain tracebacks."""
    import typer

    return typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
