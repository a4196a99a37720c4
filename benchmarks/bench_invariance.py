"""Same body, same masks: segmentation and normalisation under acquisition changes (issue 14).

    python benchmarks/bench_invariance.py --out docs/results/invariance.json          # shipped weights
    python benchmarks/bench_invariance.py --model M.onnx --full-cases 3 --out R.json
    python benchmarks/bench_invariance.py --summarise R1.json R2.json      # the docs' table

Each case is changed in one acquisition property at a time, and in two at once (widened + padded),
with `training.acquisition`'s perturbations, which keep every existing voxel where it was in space:

    fov_body_box     field of view cut to the body's bounding box
    fov_wide_air     field of view widened with air, 60 voxels each side
    pad_-3024 ...    outside the centred field-of-view circle set to -3024, -2048, -1024 or 0
    table            a patient table under the body's back
    wide_pad_-3024   widened with air, then outside the (now larger) circle set to -3024
    wide_pad_0       the same with 0

Two measurements, written to one JSON file:
1. `segmentation`: mean organ DSC (13 organs, FLARE22's rule: an organ absent from both scores 1) of the
   model's masks against the equally changed reference labels, for the bundled examples and for
   full-size generated cases (`training.phantoms.generate_case(..., "full")`, clean acquisition, seeds that no
   training run of the project uses). Goal: no change lowers the mean by more than 0.01 (examples) or 0.02
   (full-size).
2. `normalisation` (model-free): for each normalisation kind, the largest and mean absolute difference of the
   network's input inside the body between the changed and the unchanged case, after mapping the changed
   input back onto the unchanged one's voxels (linear; exact where the grids align). Cases: the examples and,
   where `../shared/data/real-ct/` exists, the real CT.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flare_infer.labels import ORGANS  # noqa: E402
from flare_infer.pipeline import predict_case, prepare  # noqa: E402
from flare_infer.preprocess import find_body  # noqa: E402
from flare_infer.spec import ModelSpec, Normalization  # noqa: E402
from training import acquisition as acq  # noqa: E402
from training.phantoms import LABELLED_DOMAIN, generate_case  # noqa: E402

REAL_CT = REPO.parent / "shared" / "data" / "real-ct"
REAL_TO_FLARE = {5: 1, 2: 2, 1: 3, 7: 4, 52: 5, 63: 6, 8: 7, 9: 8, 4: 9, 15: 10, 6: 11, 19: 12, 3: 13}
FULL_SEED0 = 9_000_000  # far from every dataset seed the project's runs draw (training.phantoms.case_seed)


def perturbations(image: sitk.Image, label: sitk.Image) -> dict[str, tuple[sitk.Image, sitk.Image]]:
    """name -> (image, label), each a changed copy of the case; "none" is the case itself."""
    wide = acq.widen_fov(image, label, 60)
    out = {"none": (image, label), "fov_body_box": acq.crop_fov_to_body(image, label), "fov_wide_air": wide}
    for value in (-3024, -2048, -1024, 0):
        out[f"pad_{value}"] = acq.pad_outside_circle(image, label, value)
    out["table"] = acq.add_table(image, label)
    for value in (-3024, 0):
        out[f"wide_pad_{value}"] = acq.pad_outside_circle(*wide, value)
    return out


def mean_organ_dsc(pred: sitk.Image, truth: sitk.Image) -> tuple[float, dict[str, float]]:
    """Mean and per-organ DSC, FLARE22's empty rule (the training code's one Dice, `training.teacher.organ_dscs`)."""
    from training.teacher import organ_dscs

    dscs = organ_dscs(sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(truth))
    return float(dscs.mean()), {organ.short: float(d) for organ, d in zip(ORGANS, dscs, strict=True)}


def cases(args) -> dict[str, list[tuple[str, sitk.Image, sitk.Image]]]:
    examples = sorted((REPO / "examples" / "inputs").glob("*.nii.gz"))
    out = {"examples": [], "full": []}
    for path in examples:
        name = path.name.removesuffix("_0000.nii.gz")
        label = sitk.ReadImage(str(REPO / "examples" / "labels" / f"{name}.nii.gz"))
        out["examples"].append((name, sitk.ReadImage(str(path)), label))
    for i in range(args.full_cases):
        image, label = generate_case(FULL_SEED0 + i, LABELLED_DOMAIN, "full", geometry="lps")
        out["full"].append((f"full_{FULL_SEED0 + i}", image, label))
    return out


def segmentation(args, sets) -> dict:
    from flare_infer.session import load_model

    model = load_model(args.model, device="cpu")
    result = {}
    for set_name, items in sets.items():
        rows = {}
        for name, image, label in items:
            for kind, (img, lab) in perturbations(image, label).items():
                t = time.perf_counter()
                mask = predict_case(img, model.predict, model.spec, batch_size=16)
                mean, organs = mean_organ_dsc(mask, lab)
                rows.setdefault(kind, []).append({"case": name, "mean_dsc": round(mean, 4), "seconds":
                                                  round(time.perf_counter() - t, 2),
                                                  "organs": {k: round(v, 4) for k, v in organs.items()}})
                print(f"{set_name} {name} {kind}: {mean:.4f}", flush=True)
        base = np.mean([r["mean_dsc"] for r in rows["none"]])
        result[set_name] = {kind: {"mean_dsc": round(float(np.mean([r["mean_dsc"] for r in v])), 4),
                                   "change": round(float(np.mean([r["mean_dsc"] for r in v]) - base), 4), "cases": v}
                            for kind, v in rows.items()}
    return result


def normalisation_kinds(window_hu: tuple[float, float]) -> dict[str, Normalization]:
    return {"mean_std_clip": Normalization("mean_std_clip", 3.0),
            "body_mean_std_clip": Normalization("body_mean_std_clip", 3.0),
            "ct_window": Normalization("ct_window", window_hu=window_hu)}


def input_difference(changed: sitk.Image, reference: sitk.Image, spec: ModelSpec) -> tuple[float, float]:
    """Max and mean |network input| difference inside the reference's (eroded) body, on its voxels."""
    ref, new = prepare(reference, spec), prepare(changed, spec)
    ref_img, new_img = _box_image(ref), _box_image(new)
    mapped = sitk.GetArrayFromImage(sitk.Resample(new_img, ref_img, sitk.Transform(), sitk.sitkLinear, -1.0))
    body = find_body(sitk.GetArrayViewFromImage(ref.resampled), spec.spacing_xyz_mm).mask_zyx[ref.box_zyx]
    from scipy import ndimage

    inside = ndimage.binary_erosion(body, iterations=1) & (mapped >= 0)  # -1: outside the changed box
    diff = np.abs(mapped[inside] - ref.vol_zyx[inside])
    return (float(diff.max()), float(diff.mean())) if diff.size else (float("nan"), float("nan"))


def _box_image(prepared) -> sitk.Image:
    img = sitk.GetImageFromArray(prepared.vol_zyx)
    start = [s.start for s in prepared.box_zyx][::-1]  # x, y, z index of the box's first voxel
    img.SetOrigin(prepared.resampled.TransformIndexToPhysicalPoint([int(v) for v in start]))
    img.SetSpacing(prepared.resampled.GetSpacing())
    img.SetDirection(prepared.resampled.GetDirection())
    return img


def normalisation(args, sets, window_hu, spacing) -> dict:
    items = list(sets["examples"])
    if (REAL_CT / "example_ct.nii.gz").is_file():
        image = sitk.ReadImage(str(REAL_CT / "example_ct.nii.gz"))
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(REAL_CT / "example_seg_fast_force_split.nii.gz")))
        lut = np.zeros(256, np.uint8)
        for k, v in REAL_TO_FLARE.items():
            lut[k] = v
        label = sitk.GetImageFromArray(lut[seg])
        label.CopyInformation(image)
        items.append(("real_ct", image, label))
    out = {}
    for kind, norm in normalisation_kinds(window_hu).items():
        spec = ModelSpec(1, spacing, norm)
        for name, image, label in items:
            for change, (img, _) in perturbations(image, label).items():
                if change == "none":
                    continue
                mx, mean = input_difference(img, image, spec)
                record = {"max_abs": round(mx, 5), "mean_abs": round(mean, 5)}
                out.setdefault(kind, {}).setdefault(change, {})[name] = record
                print(f"normalisation {kind} {name} {change}: max {mx:.4f} mean {mean:.5f}", flush=True)
    return out


def summary_table(paths: list[Path]) -> str:
    """Markdown: mean DSC per change (and its change from 'none') per result file and set, for docs/."""
    records = [(p, json.loads(p.read_text())) for p in paths]
    columns = [(p, r, group) for p, r in records for group in r.get("segmentation", {})]
    head = "| change | " + " | ".join(f"{p.stem} {g}" for p, _, g in columns) + " |"
    lines = [head, "|---" * (len(columns) + 1) + "|"]
    for change in next(iter(columns))[1]["segmentation"][columns[0][2]]:
        cells = []
        for _, r, g in columns:
            row = r["segmentation"][g].get(change)
            cells.append("" if row is None else f"{row['mean_dsc']:.3f} ({row['change']:+.3f})")
        lines.append(f"| {change} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--summarise", nargs="+", type=Path, help="print the docs' table of these result files, then exit")
    ap.add_argument("--model", default=str(REPO / "weights" / "student.onnx"))
    ap.add_argument("--full-cases", type=int, default=3, help="full-size generated cases (0: examples only)")
    ap.add_argument("--window", default=None, help="LO,HI HU for the model-free ct_window check "
                    "(default: the model's own window if its sidecar is ct_window)")
    ap.add_argument("--skip-segmentation", action="store_true", help="only the model-free normalisation part")
    ap.add_argument("--skip-normalisation", action="store_true", help="only the model's segmentation part")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.summarise:
        print(summary_table(args.summarise))
        return
    if args.out is None:
        ap.error("--out is required")
    spec = ModelSpec.from_dict(json.loads(Path(args.model).with_suffix(".json").read_text()))
    if args.window:
        window = tuple(float(v) for v in args.window.split(","))
    elif spec.normalization.kind == "ct_window":
        window = spec.normalization.window_hu
    else:
        ap.error("the model is not ct_window: pass --window LO,HI for the model-free check")
    sets = cases(args)
    t = time.perf_counter()
    record = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
        "model": str(Path(args.model).relative_to(REPO) if Path(args.model).is_relative_to(REPO) else args.model),
        "model_normalization": spec.normalization.to_dict(),
        "restore": "linear (the default)",
    }
    if not args.skip_normalisation:
        record["window_hu_for_model_free_check"] = list(window)
        record["normalisation"] = normalisation(args, sets, window, spec.spacing_xyz_mm)
    if not args.skip_segmentation:
        record["segmentation"] = segmentation(args, sets)
    record["seconds"] = round(time.perf_counter() - t, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
