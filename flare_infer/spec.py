"""The model sidecar: what a model needs from the pipeline, saved beside `NAME.onnx` as `NAME.json`.

A model is `NAME.onnx` plus `NAME.json` in the `flare-onnx/1` format:

    {"format": "flare-onnx/1",
     "input_channels": 1,
     "spacing_xyz_mm": [1.5, 1.5, 2.5],
     "normalization": {"kind": "ct_window", "window_hu": [-160.0, 240.0], "stats": {...}},
     "output": "logits",
     "labels": {"0": "background", "1": "liver", ..., "13": "left kidney"}}

Extra keys (provenance, metrics, fp16) are kept in `ModelSpec.extra` and written back unchanged.
Training writes this file through `ModelSpec.save`; inference reads it through `load_spec`, so
both sides apply exactly the same preprocessing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flare_infer.labels import LABEL_NAMES

FORMAT = "flare-onnx/1"
OUTPUT_KINDS = ("logits", "probabilities")
# ct_window: a fixed HU window from the training set's foreground (nnU-Net's CT rule), applied inside the body.
# body_mean_std_clip: the paper's mean +/- n_std * std, over the body instead of the whole volume.
# mean_std_clip: the paper's rule read literally, over every voxel of the resampled volume (air, padding and
# table included); kept so that old sidecars behave exactly as they did, and as an option (docs/INFERENCE.md).
NORMALIZATION_KINDS = ("ct_window", "body_mean_std_clip", "mean_std_clip")
_KNOWN_KEYS = {"format", "input_channels", "spacing_xyz_mm", "normalization", "output", "labels"}


class SpecError(ValueError):
    """A sidecar that cannot be used: says which file, what was expected and what was found."""


@dataclass(frozen=True)
class Normalization:
    """How resampled HU become the network's [0, 1] input (flare_infer.preprocess.normalise).

    ct_window: clip to `window_hu` = (lo, hi) and rescale to [0, 1], outside the body set to air first. The
        window is the 0.5th and 99.5th percentile of the training set's foreground (labelled organ) voxels;
        `stats` records how it was found (percentiles, foreground mean and std, cases, voxels).
    body_mean_std_clip: mean and std over the body's voxels, clip to mean +/- n_std * std, rescale to [0, 1].
    mean_std_clip: mean and std over every voxel of the resampled volume (the paper read literally).
    """

    kind: str = "mean_std_clip"
    n_std: float | None = 3.0  # the two mean_std kinds only
    window_hu: tuple[float, float] | None = None  # ct_window only
    # ct_window: how the window was found; provenance only, so not part of equality or hashing
    stats: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.kind not in NORMALIZATION_KINDS:
            raise SpecError(f"normalization.kind must be one of {NORMALIZATION_KINDS}, found {self.kind!r}")
        if self.kind == "ct_window":
            lo_hi = tuple(float(v) for v in (self.window_hu or ()))
            if len(lo_hi) != 2 or not all(math.isfinite(v) for v in lo_hi) or not lo_hi[1] > lo_hi[0]:
                raise SpecError(
                    f"normalization.window_hu must be [lo, hi] HU with lo < hi for kind 'ct_window', "
                    f"found {self.window_hu!r}"
                )
            object.__setattr__(self, "window_hu", lo_hi)
            object.__setattr__(self, "n_std", None)
        elif not (isinstance(self.n_std, (int, float)) and math.isfinite(self.n_std) and self.n_std > 0):
            raise SpecError(f"normalization.n_std must be a positive number, found {self.n_std!r}")
        elif self.window_hu is not None:
            raise SpecError(f"normalization.window_hu belongs to kind 'ct_window', not {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        """The sidecar's `normalization` object: only the keys of this kind (old sidecars' shape unchanged)."""
        if self.kind == "ct_window":
            return {"kind": self.kind, "window_hu": list(self.window_hu), "stats": dict(self.stats)}
        return {"kind": self.kind, "n_std": self.n_std}


@dataclass(frozen=True)
class ModelSpec:
    """Preprocessing and output contract of one model (the sidecar's content)."""

    input_channels: int = 1  # adjacent axial slices stacked as channels, centred on the predicted slice
    spacing_xyz_mm: tuple[float, float, float] = (1.5, 1.5, 2.5)
    normalization: Normalization = field(default_factory=Normalization)
    output: str = "logits"  # or "probabilities"
    labels: dict[str, str] = field(default_factory=lambda: dict(LABEL_NAMES))
    extra: dict[str, Any] = field(default_factory=dict)  # provenance, metrics, fp16 ...: kept as written

    def __post_init__(self) -> None:
        if not (isinstance(self.input_channels, int) and self.input_channels >= 1 and self.input_channels % 2 == 1):
            raise SpecError(
                f"input_channels must be an odd integer >= 1 (centred on the slice), found {self.input_channels!r}"
            )
        spacing = tuple(float(s) for s in self.spacing_xyz_mm)
        if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise SpecError(f"spacing_xyz_mm must be three positive numbers, found {self.spacing_xyz_mm!r}")
        object.__setattr__(self, "spacing_xyz_mm", spacing)
        if self.output not in OUTPUT_KINDS:
            raise SpecError(f"output must be one of {OUTPUT_KINDS}, found {self.output!r}")
        if self.labels != LABEL_NAMES:
            raise SpecError(
                "labels must be the 14 FLARE22 classes {'0': 'background', '1': 'liver', ...}; "
                f"found {self.labels!r}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "format": FORMAT,
            "input_channels": self.input_channels,
            "spacing_xyz_mm": list(self.spacing_xyz_mm),
            "normalization": self.normalization.to_dict(),
            "output": self.output,
            "labels": dict(self.labels),
        }
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "sidecar") -> ModelSpec:
        if not isinstance(d, dict):
            raise SpecError(f"{source}: expected a JSON object, found {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise SpecError(f"{source}: unknown format {d.get('format')!r}; this version reads {FORMAT!r}")
        try:
            norm = d.get("normalization", {})
            return cls(
                input_channels=d["input_channels"],
                spacing_xyz_mm=tuple(d["spacing_xyz_mm"]),
                normalization=Normalization(**norm),
                output=d.get("output", "logits"),
                labels={str(k): v for k, v in d["labels"].items()},
                extra={k: v for k, v in d.items() if k not in _KNOWN_KEYS},
            )
        except KeyError as e:
            raise SpecError(f"{source}: missing required key {e.args[0]!r}") from None
        except (TypeError, SpecError) as e:
            raise SpecError(f"{source}: {e}") from None

    def save(self, path: str | Path) -> None:
        """Write the sidecar atomically (temporary file, then rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)


def sidecar_path(model_path: str | Path) -> Path:
    """`weights/student.onnx` -> `weights/student.json`."""
    return Path(model_path).with_suffix(".json")


def load_spec(model_path: str | Path) -> ModelSpec:
    """Read and validate the sidecar of `model_path` (an `.onnx` file or the `.json` itself)."""
    path = Path(model_path)
    path = path if path.suffix == ".json" else sidecar_path(path)
    if not path.is_file():
        raise SpecError(
            f"{path}: model sidecar not found; every NAME.onnx needs NAME.json beside it "
            "(written by `python -m training.export`)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SpecError(f"{path}: not valid JSON ({e})") from None
    return ModelSpec.from_dict(data, source=str(path))
