"""No organ lost to the body crop: the same model with and without the crop, side by side (issue 16).

    python benchmarks/bench_crop_accuracy.py --out docs/results/crop_accuracy.json [--full-cases 3]

"Without the crop" is the pipeline with `find_body` replaced by a box over the whole volume (the network
then sees every voxel, as before the crop existed); everything else is the same code, model and restore.
Cases: the bundled examples and `--full-cases` full-size generated cases (held-out seeds, acquisition
variation on: tables, padding, tight and wide fields of view). Per case, the FLARE22 mean organ DSC
(13 organs; an organ absent from both scores 1) with and without the crop. Goal: the examples' mean
unchanged within 0.002.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from bench_invariance import mean_organ_dsc  # noqa: E402

from flare_infer import pipeline, preprocess  # noqa: E402
from flare_infer.session import load_model  # noqa: E402
from training.acquisition import LABELLED_ACQUISITION  # noqa: E402
from training.phantoms import LABELLED_DOMAIN, generate_case  # noqa: E402

FULL_SEED0 = 9_100_000  # far from every dataset seed the project's runs draw


def whole_volume_body(vol_hu_zyx: np.ndarray, spacing_xyz) -> preprocess.Body:
    """A 'body' that is the whole volume: the pipeline without the crop."""
    full = np.ones(vol_hu_zyx.shape, bool)
    return preprocess.Body(full, tuple(slice(0, n) for n in vol_hu_zyx.shape), None)


def cases(n_full: int):
    for path in sorted((REPO / "examples" / "inputs").glob("*.nii.gz")):
        name = path.name.removesuffix("_0000.nii.gz")
        label = sitk.ReadImage(str(REPO / "examples" / "labels" / f"{name}.nii.gz"))
        yield "examples", name, sitk.ReadImage(str(path)), label
    for i in range(n_full):
        image, label = generate_case(FULL_SEED0 + i, LABELLED_DOMAIN, "full", acquisition=LABELLED_ACQUISITION)
        yield "full", f"full_{FULL_SEED0 + i}", image, label


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "weights" / "student.onnx"))
    ap.add_argument("--full-cases", type=int, default=3)
    ap.add_argument("--restore", default="linear", choices=["linear", "nearest"])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    model = load_model(args.model, device="cpu")
    rows = []
    for group, name, image, label in cases(args.full_cases):
        scores = {}
        for mode in ("crop", "no_crop"):
            patch = mock.patch.object(pipeline, "find_body", whole_volume_body) if mode == "no_crop" else nullcontext()
            with patch:
                mask = pipeline.predict_case(image, model.predict, model.spec, batch_size=16,
                                             restore_method=args.restore)  # fmt: skip
            scores[mode] = mean_organ_dsc(mask, label)
        rows.append({"set": group, "case": name, **{m: round(s[0], 4) for m, s in scores.items()},
                     "organs_crop": {k: round(v, 4) for k, v in scores["crop"][1].items()},
                     "organs_no_crop": {k: round(v, 4) for k, v in scores["no_crop"][1].items()}})
        print(f"{group} {name}: crop {scores['crop'][0]:.4f} no crop {scores['no_crop'][0]:.4f}", flush=True)
    summary = {}
    for group in ("examples", "full"):
        sel = [r for r in rows if r["set"] == group]
        if sel:
            crop, no = np.mean([r["crop"] for r in sel]), np.mean([r["no_crop"] for r in sel])
            summary[group] = {"crop": round(float(crop), 4), "no_crop": round(float(no), 4),
                              "change": round(float(crop - no), 4), "cases": len(sel)}
    record = {"command": " ".join(["python", *sys.argv]), "date": datetime.date.today().isoformat(),
              "model": Path(args.model).name, "model_normalization": model.spec.normalization.to_dict(),
              "restore": args.restore, "summary": summary, "cases": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
