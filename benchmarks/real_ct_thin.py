"""The real-CT check on a thin-slice grid: does a fine, noisy input cost accuracy (issue 26)?

    python benchmarks/real_ct_thin.py      # weights/student.onnx -> docs/results/real_ct_thin.json

The hidden real set is 0.57-0.78 mm in-plane with 1.6 mm slices; the one real CT beside the project is 3 mm. This
resamples that CT (B-spline) to 0.75 x 0.75 x 1.6 mm, adds white noise (std 20 HU, seed 0: a thin slice is noisier
than a 3 mm one), writes it as int16, segments it as README command 1 does, brings the mask back to the 3 mm grid
(nearest neighbour) and scores it against the silver labels, beside the score on the native grid. The pipeline
resamples every input to the model's 3 x 3 x 4 mm by linear interpolation without smoothing first, so a noisy thin
input reaches the network noisier than a thick one: this measures what that costs. The thin CT is made from the
validation CT (nothing is trained on it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.real_ct import DEFAULT_REAL_DIR, flare_label_image, real_files, summarise  # noqa: E402
from flare_infer.evaluate import evaluate_case  # noqa: E402
from flare_infer.pipeline import predict_file  # noqa: E402
from flare_infer.session import load_model  # noqa: E402

THIN_SPACING = (0.75, 0.75, 1.6)
NOISE_HU = 20.0


def thin_copy(ct: sitk.Image, spacing=THIN_SPACING, noise_hu: float = NOISE_HU, seed: int = 0) -> sitk.Image:
    """`ct` on a finer grid over the same extent, with white noise, as int16."""
    size = [int(round(n * s / t)) for n, s, t in zip(ct.GetSize(), ct.GetSpacing(), spacing, strict=True)]
    fine = sitk.Resample(sitk.Cast(ct, sitk.sitkFloat32), size, sitk.Transform(), sitk.sitkBSpline, ct.GetOrigin(),
                         spacing, ct.GetDirection(), -1024.0, sitk.sitkFloat32)  # fmt: skip
    vol = sitk.GetArrayFromImage(fine)
    vol += np.random.default_rng(seed).normal(0.0, noise_hu, vol.shape).astype(np.float32)
    out = sitk.GetImageFromArray(np.clip(np.rint(vol), -32768, 32767).astype(np.int16))
    out.CopyInformation(fine)
    return out


def score(model, ct_path: Path, label: sitk.Image, tmp: Path) -> dict:
    pred_path = tmp / f"pred_{ct_path.name}"
    result = predict_file(ct_path, pred_path, model.predict, model.spec, batch_size=16, fixed_batch=model.fixed_batch)
    pred = sitk.ReadImage(str(pred_path))
    if pred.GetSize() != label.GetSize() or pred.GetSpacing() != label.GetSpacing():
        pred = sitk.Resample(pred, label, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    scores = evaluate_case(pred, label, name=ct_path.name)
    return {**summarise(scores, sitk.GetArrayViewFromImage(label)), "size_xyz": list(result.image.GetSize())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "weights" / "student.onnx")
    parser.add_argument("--real-dir", type=Path, default=DEFAULT_REAL_DIR)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "real_ct_thin.json")
    args = parser.parse_args(argv)
    ct_path, label_path = real_files(args.real_dir)
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    model = load_model(args.model, device="cpu")
    label = flare_label_image(label_path)
    with tempfile.TemporaryDirectory(prefix="real-ct-thin-") as tmp:
        thin_path = Path(tmp) / "thin_ct.nii.gz"
        sitk.WriteImage(thin_copy(sitk.ReadImage(str(ct_path))), str(thin_path))
        native, thin = score(model, ct_path, label, Path(tmp)), score(model, thin_path, label, Path(tmp))
    from benchmarks.shipped_scores import git_commit

    record = {
        "what": "the real CT's FLARE22 DSC on its own 3 mm grid and on a thin-slice copy (B-spline to "
        f"{THIN_SPACING} mm, white noise std {NOISE_HU} HU, seed 0), the mask scored on the 3 mm grid",
        "command": shlex.join(["python", "benchmarks/real_ct_thin.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "model": str(args.model.relative_to(REPO) if args.model.is_relative_to(REPO) else args.model.name),
        "native": native,
        "thin": thin,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"real CT big-4 mean DSC: native {native['mean_dsc_big4']:.4f}, thin {thin['mean_dsc_big4']:.4f}; "
          f"present: {native['mean_dsc_present']:.4f}, {thin['mean_dsc_present']:.4f}\nwrote {args.out}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
