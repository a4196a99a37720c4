"""The real-CT check: a model's FLARE22 DSC and NSD on the one real CT beside the project (issue 26).

    python benchmarks/real_ct.py                                   # weights/student.onnx -> docs/results/real_ct.json
    python benchmarks/real_ct.py --model RUN/weights/student.onnx --out docs/results/real_ct_RUN.json

`../shared/data/real-ct/` holds a real contrast-enhanced abdominal CT (3 mm, TotalSegmentator's test case) and
a label map made by a model (TotalSegmentator --fast): a *silver* standard, so a DSC against it is an estimate.
Its README gives the mapping of TotalSegmentator's label values to FLARE22's (`TOTALSEG_TO_FLARE` below).

**Validation only.** Nothing in training/ reads this CT, its labels or anything derived from them; the
choices of a recipe may be checked against this score, never fitted to it (docs/PHANTOMS.md, "The real CT").

The case is segmented as README command 1 does it (`flare_infer.pipeline.predict_file`, CPU, batch 16, the default
restore, no post-processing unless `--postprocess lcc`) and scored by `flare_infer.evaluate.evaluate_case`. The
JSON holds every organ's DSC and NSD, the mean over liver, spleen and both kidneys (`mean_dsc_big4`, the issue's
0.75 goal), the mean over the organs present in the label map (`mean_dsc_present`, goal 0.50), the model's sha256
and sidecar facts, the commit, date and command. A preview PNG (`--preview`, default beside the JSON) shows the
prediction (top row) over the CT, and the silver labels (bottom row). """

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flare_infer.evaluate import evaluate_case  # noqa: E402
from flare_infer.labels import ORGANS  # noqa: E402
from flare_infer.pipeline import predict_file  # noqa: E402
from flare_infer.postprocess import POSTPROCESS_CHOICES  # noqa: E402
from flare_infer.session import load_model  # noqa: E402

DEFAULT_REAL_DIR = REPO.parent / "shared" / "data" / "real-ct"
CT_NAME, LABEL_NAME = "example_ct.nii.gz", "example_seg_fast_force_split.nii.gz"
# ../shared/data/real-ct/README.md: TotalSegmentator value -> FLARE22 value; every other value -> 0.
TOTALSEG_TO_FLARE = {5: 1, 2: 2, 1: 3, 7: 4, 52: 5, 63: 6, 8: 7, 9: 8, 4: 9, 15: 10, 6: 11, 19: 12, 3: 13}
BIG4 = ("liver", "spleen", "right kidney", "left kidney")
BATCH_SIZE = 16  # the CLI's default


def to_flare_labels(totalseg_zyx: np.ndarray) -> np.ndarray:
    """TotalSegmentator label values -> FLARE22's (uint8); unmapped values -> 0."""
    lut = np.zeros(max(256, int(totalseg_zyx.max()) + 1), np.uint8)
    for source, target in TOTALSEG_TO_FLARE.items():
        lut[source] = target
    return lut[totalseg_zyx]


def flare_label_image(label_path: Path) -> sitk.Image:
    totalseg = sitk.ReadImage(str(label_path))
    out = sitk.GetImageFromArray(to_flare_labels(sitk.GetArrayViewFromImage(totalseg)))
    out.CopyInformation(totalseg)
    return out


def summarise(scores, label_zyx: np.ndarray) -> dict:
    """Per-organ DSC/NSD by name; the big-4 mean; the mean over organs present in the label map."""
    present = {o.name for o in ORGANS if np.any(label_zyx == o.value)}
    dsc = {o.name: scores.dsc[o.short] for o in ORGANS}
    nsd = {o.name: scores.nsd[o.short] for o in ORGANS}
    return {
        "mean_dsc_big4": round(float(np.mean([dsc[n] for n in BIG4])), 4),
        "mean_dsc_present": round(float(np.mean([dsc[n] for n in sorted(present)])), 4),
        "mean_nsd_present": round(float(np.mean([nsd[n] for n in sorted(present)])), 4),
        "organs_present": sorted(present, key=[o.name for o in ORGANS].index),
        "dsc": dsc,
        "nsd": nsd,
        "voxels_label": {o.name: int(np.count_nonzero(label_zyx == o.value)) for o in ORGANS},
    }


def save_preview(image: sitk.Image, pred: sitk.Image, label: sitk.Image, out_png: Path, title: str) -> None:
    """Two rows of the project's preview: the prediction, then the silver labels, on the slices the labels choose."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flare_infer.preview import save_preview as one_row

    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name, mask in (("prediction", pred), ("silver labels", label)):
            png = Path(tmp) / f"{name}.png"
            one_row(image, mask, png, title=f"{title}: {name}", slices_from=label)
            rows.append(plt.imread(png))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=1.0) for r in rows]
    out_png.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(out_png, np.concatenate(rows, axis=0))


def real_files(real_dir: Path) -> tuple[Path, Path]:
    """The real CT and its label map in `real_dir`; a clear exit when either is missing."""
    ct_path, label_path = real_dir / CT_NAME, real_dir / LABEL_NAME
    for path in (ct_path, label_path):
        if not path.is_file():
            raise SystemExit(f"error: {path} not found: the real CT lives in ../shared/data/real-ct beside the "
                             "checkout (not shipped with the project); pass --real-dir")
    return ct_path, label_path


def run(model_path: Path, real_dir: Path, threads: int | None, preview: Path | None, postprocess: str = "none") -> dict:
    ct_path, label_path = real_files(real_dir)
    model = load_model(model_path, device="cpu", threads=threads)
    label = flare_label_image(label_path)
    with tempfile.TemporaryDirectory(prefix="real-ct-") as tmp:
        pred_path = Path(tmp) / "real_ct.nii.gz"
        start = time.perf_counter()
        result = predict_file(ct_path, pred_path, model.predict, model.spec, batch_size=BATCH_SIZE,
                              fixed_batch=model.fixed_batch, postprocess=postprocess)  # fmt: skip
        seconds = time.perf_counter() - start
        pred = sitk.ReadImage(str(pred_path))
    scores = evaluate_case(pred, label, name=CT_NAME)
    if preview is not None:
        save_preview(result.image, pred, label, preview, f"{model_path.name} on the real CT")
    provenance = model.spec.extra.get("provenance", {})
    return {
        **summarise(scores, sitk.GetArrayViewFromImage(label)),
        "voxels_pred": {o.name: int(np.count_nonzero(sitk.GetArrayViewFromImage(pred) == o.value)) for o in ORGANS},
        "predict_seconds": round(seconds, 2),
        "postprocess": postprocess,
        "model": {
            "path": str(model_path.relative_to(REPO) if model_path.is_relative_to(REPO) else model_path.name),
            "sha256": _sha256(model_path),
            "normalization": model.spec.normalization.to_dict(),
            "spacing_xyz_mm": list(model.spec.spacing_xyz_mm),
            "trained_on": model.spec.extra.get("trained_on"),
            "trained_at": provenance.get("trained_at"),
        },
    }


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "weights" / "student.onnx",
                        help="NAME.onnx with NAME.json beside it (default: %(default)s)")
    parser.add_argument("--real-dir", type=Path, default=DEFAULT_REAL_DIR,
                        help="folder with example_ct.nii.gz and its label map (default: ../shared/data/real-ct)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "real_ct.json",
                        help="the JSON to write (default: docs/results/real_ct.json)")
    parser.add_argument("--preview", type=Path, default=None,
                        help="preview PNG (default: the JSON's path with .png; 'none' for no picture)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime CPU threads (default: all allowed)")
    parser.add_argument("--postprocess", default="none", choices=POSTPROCESS_CHOICES,
                        help="predict's --postprocess: none (default, README command 1's) or lcc (largest connected "
                        "component per organ)")
    args = parser.parse_args(argv)
    preview = None if str(args.preview) == "none" else (args.preview or args.out.with_suffix(".png"))
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    from benchmarks.shipped_scores import git_commit

    record = {
        "what": "FLARE22 DSC and NSD (flare_infer.evaluate) of a model on ../shared/data/real-ct (silver labels, "
        "validation only: never trained on)",
        "command": shlex.join(["python", "benchmarks/real_ct.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        **run(args.model, args.real_dir, args.threads, preview, args.postprocess),
        "preview": str(preview.relative_to(REPO)) if preview and preview.is_relative_to(REPO) else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    dsc = "  ".join(f"{n} {record['dsc'][n]:.3f}" for n in record["organs_present"])
    print(f"real CT: big-4 mean DSC {record['mean_dsc_big4']:.4f}, present-organ mean {record['mean_dsc_present']:.4f}"
          f"\n  {dsc}\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
