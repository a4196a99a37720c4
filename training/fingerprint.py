"""The training set's intensity fingerprint: the fixed HU window of `normalization.kind = "ct_window"`.

As nnU-Net does for CT: sample the foreground (labelled organ) voxels of every labelled case, take their
0.5th and 99.5th percentiles as the window, and record their mean and std beside it. The window depends on
the anatomy the labels cover, never on the field of view, the padding or the table, so the network's input
does not either (docs/INFERENCE.md, "Normalisation"). The teacher computes it once per run
(RUN/normalization.json) and every model after it inherits it through the sidecar.

    python -m training.fingerprint --data DATA_DIR            # prints the normalization object
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import typer

from flare_infer import io
from flare_infer.spec import Normalization
from training.cli import typer_app
from training.data import CaseFiles, DatasetError, discover_labelled
from training.utils import write_atomic

PERCENTILES = (0.5, 99.5)
VOXELS_PER_CASE = 10_000  # nnU-Net's number: every case weighs the same whatever its size


def foreground_window(
    cases: list[CaseFiles], *, seed: int = 0, voxels_per_case: int = VOXELS_PER_CASE
) -> Normalization:
    """`ct_window` normalisation from the organ voxels of labelled `cases` (a seeded sample of each)."""
    rng = np.random.default_rng(seed)
    samples = []
    for case in cases:
        if case.label is None:
            raise DatasetError(f"{case.image}: the intensity window needs labelled cases; this one has no label")
        # copies, not views: a view of a temporary image reads freed memory once the image is collected
        hu = sitk.GetArrayFromImage(io.read_ct(case.image))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
        if label.shape != hu.shape:
            raise DatasetError(f"{case.label}: label shape {label.shape} differs from its image's {hu.shape}")
        organ = hu[label > 0]
        if organ.size:
            samples.append(rng.choice(organ, size=min(voxels_per_case, organ.size), replace=False).astype(np.float64))
    if not samples:
        raise DatasetError("no labelled organ voxel in any case: cannot derive the intensity window")
    values = np.concatenate(samples)
    lo, hi = (float(v) for v in np.percentile(values, PERCENTILES))
    clipped = np.clip(values, lo, hi)
    stats = {
        "percentiles": list(PERCENTILES),
        "foreground_mean_hu": round(float(clipped.mean()), 3),
        "foreground_std_hu": round(float(clipped.std()), 3),
        "cases": len(cases),
        "voxels": int(values.size),
        "how": "training.fingerprint.foreground_window: organ voxels of the labelled cases, "
        f"{voxels_per_case} per case, seed {seed}",
    }
    return Normalization(kind="ct_window", window_hu=(round(lo, 3), round(hi, 3)), stats=stats)


def load_or_compute_window(path: Path, cases: list[CaseFiles], *, seed: int = 0) -> Normalization:
    """The window stored at `path` (a run's normalization.json), computed and written first if absent.

    Stored once per run, so a resumed run and every rank of a distributed one use the same numbers.
    """
    if path.is_file():
        return Normalization(**json.loads(path.read_text()))
    norm = foreground_window(cases, seed=seed)
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(norm.to_dict(), indent=2) + "\n"))
    return norm


app = typer_app()


@app.command()
def main(
    data: Path = typer.Option(..., help="labelled dataset folder (FLARE22 images/ + labels/, or nnU-Net layout)"),
    seed: int = typer.Option(0, help="seed of the voxel sample"),
) -> None:
    """Print the ct_window normalisation a teacher run on DATA would use."""
    print(json.dumps(foreground_window(discover_labelled(data), seed=seed).to_dict(), indent=2))


if __name__ == "__main__":
    app()
