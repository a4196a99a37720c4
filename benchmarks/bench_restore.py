"""Restore `linear` (class probabilities interpolated onto the CT, then argmax) against `nearest` (labels).

    nice -n 10 python benchmarks/bench_restore.py --cases CASES --out docs/results/restore.json
    nice -n 10 python benchmarks/bench_restore.py --parts accuracy --cases CASES      # one part only

Cases: without --cases, generated in memory: `training.phantoms.generate_case(seed, DOMAIN, "full")` (a clean
scan), seeds `case_seed(0, "validation", i)` for i = 0, 1, ..., keeping the first --n-cases whose in-plane spacing
is FLARE-like (0.7-1.0 mm; the grid is drawn without voxels to choose). --domain labelled (default: the shipped
model's training domain) or wide. With --cases CASES: a folder written by `python -m training.phantoms CASES
--labelled 0 --unlabelled 0 --validation 3 --size full` (validation/images, validation/labels).

Parts (each written into the JSON as it finishes):
    accuracy  per case: prepare, one `predict_volume` with the shipped weights computing labels and float16
              probabilities, then both restores on those same outputs; FLARE22 DSC and NSD per organ
              (flare_infer.evaluate.evaluate_case) and seconds per stage
    timing    the whole `predict_file` (read, preprocess, infer, restore, write) with `--restore nearest` and
              `linear` alternating, `--repeats` times, on a 512 x 512 x `--timing-slices` CT cut from (or
              resampled along z from) a generated case; each method computes only what it needs (nearest:
              labels; linear: labels + probabilities); ratio of totals per adjacent pair, and their median
    rss       peak RSS (ru_maxrss) of a fresh subprocess running `predict_file` on a 512 x 512 x
              `--rss-slices` CT, once per method
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flare_infer import io  # noqa: E402
from flare_infer.evaluate import evaluate_case  # noqa: E402
from flare_infer.labels import ORGANS  # noqa: E402
from flare_infer.pipeline import predict_file, predict_volume, prepare, restore  # noqa: E402

METHODS = ("nearest", "linear")
MODEL = REPO / "weights/student.onnx"


INPLANE_MM = (0.7, 1.0)  # FLARE22's usual in-plane spacing


def load_cases(cases_dir: Path | None, n: int, domain: str):
    """(name, image, label) of the cases: from the folder, or generated (see the module's docstring)."""
    if cases_dir is not None:
        for path in sorted((cases_dir / "validation/images").glob("*_0000.nii.gz"))[:n]:
            name = path.name.removesuffix("_0000.nii.gz")
            yield name, io.read_ct(path), sitk.ReadImage(str(cases_dir / f"validation/labels/{name}.nii.gz"))
        return
    from training.phantoms import DOMAINS, case_seed, generate_case, sample_case_params

    found, i = 0, 0
    while found < n:
        seed = case_seed(0, "validation", i)
        i += 1
        spacing = sample_case_params(seed, DOMAINS[domain], "full").grid.spacing_xyz
        if not INPLANE_MM[0] <= spacing[0] <= INPLANE_MM[1]:
            print(f"seed {seed} skipped: in-plane spacing {spacing[0]:.2f} mm", flush=True)
            continue
        found += 1
        image, label = generate_case(seed, DOMAINS[domain], "full")
        yield f"{domain}_{i - 1}_seed{seed}", image, label


def accuracy(model, cases) -> dict:
    rows = []
    for name, image, label in cases:
        seconds = {}
        t = time.perf_counter()
        prepared = prepare(image, model.spec)
        seconds["preprocess"] = time.perf_counter() - t
        t = time.perf_counter()
        labels_zyx, probabilities = predict_volume(
            prepared, model.predict, model.spec, batch_size=16, outputs=("labels", "probabilities")
        )
        seconds["infer_labels_and_probabilities"] = time.perf_counter() - t
        row = {"name": name, "size_xyz": image.GetSize(), "spacing_xyz": image.GetSpacing(), "box_zyx": [
            [s.start, s.stop] for s in prepared.box_zyx], "dsc": {}, "nsd": {}}  # fmt: skip
        for method in METHODS:
            t = time.perf_counter()
            mask = restore(labels_zyx, prepared, probabilities if method == "linear" else None, method=method)
            seconds[f"restore_{method}"] = time.perf_counter() - t
            t = time.perf_counter()
            scores = evaluate_case(mask, label, name=name)
            seconds[f"evaluate_{method}"] = time.perf_counter() - t
            row["dsc"][method], row["nsd"][method] = scores.dsc, scores.nsd
        row["seconds"] = seconds
        rows.append(row)
        print(name, image.GetSize(), [f"{m} DSC {np.mean(list(row['dsc'][m].values())):.4f} NSD "
              f"{np.mean(list(row['nsd'][m].values())):.4f}" for m in METHODS],
              {k: round(v, 2) for k, v in seconds.items()}, flush=True)  # fmt: skip
    return {"cases": rows, "summary": summarise(rows)}


def summarise(rows: list[dict]) -> dict:
    """Mean over cases per organ, and the mean over organs, for both methods and metrics."""
    out = {}
    for metric in ("dsc", "nsd"):
        for method in METHODS:
            per_organ = {o.short: float(np.mean([r[metric][method][o.short] for r in rows])) for o in ORGANS}
            out[f"{metric}_{method}"] = {"mean": float(np.mean(list(per_organ.values()))), "organs": per_organ}
        out[f"{metric}_gain"] = out[f"{metric}_linear"]["mean"] - out[f"{metric}_nearest"]["mean"]
    return out


def ct_with_slices(image: sitk.Image, slices: int) -> sitk.Image:
    """`slices` slices of `image`: the middle ones if it has enough, else linear resampling along z."""
    n = image.GetSize()[2]
    if n >= slices:
        start = (n - slices) // 2
        return image[:, :, start : start + slices]
    spacing = list(image.GetSpacing())
    spacing[2] = spacing[2] * n / slices
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    origin = np.asarray(image.GetOrigin()) + d[:, 2] * (spacing[2] - image.GetSpacing()[2]) / 2
    size = [*image.GetSize()[:2], slices]
    return sitk.Resample(
        image, size, sitk.Transform(), sitk.sitkLinear, origin.tolist(), spacing, image.GetDirection(), -1024.0,
        image.GetPixelID(),
    )  # fmt: skip


def source_case(cases, slices: int) -> sitk.Image:
    """The first case with a 512 x 512 in-plane grid and at least `slices` slices (else the first 512 x 512 one,
    else the first case resampled to 512 x 512)."""
    first = first_512 = None
    for _, image, _ in cases:
        if first is None:
            first = image
        if image.GetSize()[:2] == (512, 512):
            if image.GetSize()[2] >= slices:
                return image
            if first_512 is None:
                first_512 = image
    if first_512 is not None:
        return first_512
    size = [512, 512, first.GetSize()[2]]
    spacing = [first.GetSpacing()[a] * first.GetSize()[a] / 512 for a in (0, 1)] + [first.GetSpacing()[2]]
    return sitk.Resample(first, size, sitk.Transform(), sitk.sitkLinear, first.GetOrigin(), spacing,
                         first.GetDirection(), -1024.0, first.GetPixelID())  # fmt: skip


def timing(model, image: sitk.Image, slices: int, repeats: int, workdir: Path) -> dict:
    ct_path = workdir / f"ct_{slices}.nii.gz"
    sitk.WriteImage(sitk.Cast(ct_with_slices(image, slices), sitk.sitkInt16), str(ct_path), useCompression=True)
    runs = {m: [] for m in METHODS}
    for method in METHODS:  # warm-up (page cache, onnxruntime's first calls)
        predict_file(ct_path, workdir / "mask.nii.gz", model.predict, model.spec, batch_size=16, restore_method=method)
    for r in range(repeats):
        order = METHODS if r % 2 == 0 else METHODS[::-1]  # alternate which goes first
        for method in order:
            result = predict_file(
                ct_path, workdir / "mask.nii.gz", model.predict, model.spec, batch_size=16, restore_method=method
            )
            runs[method].append(result.seconds)
            print(method, {k: round(v, 2) for k, v in result.seconds.items()}, flush=True)
    totals = {m: [sum(s.values()) for s in runs[m]] for m in METHODS}
    ratios = [lin / near for lin, near in zip(totals["linear"], totals["nearest"], strict=True)]
    compute = {m: [s["preprocess"] + s["infer"] + s["restore"] for s in runs[m]] for m in METHODS}
    compute_ratios = [lin / near for lin, near in zip(compute["linear"], compute["nearest"], strict=True)]
    return {
        "ct": f"512 x 512 x {slices} int16, {image.GetSpacing()[0]:.2f} mm in-plane",
        "repeats": repeats,
        "median_seconds": {m: {k: statistics.median(s[k] for s in runs[m]) for k in runs[m][0]} for m in METHODS},
        "median_total": {m: statistics.median(totals[m]) for m in METHODS},
        "ratio_linear_over_nearest_per_pair": ratios,
        "ratio_median": statistics.median(ratios),
        "ratio_without_read_write_per_pair": compute_ratios,
        "ratio_without_read_write_median": statistics.median(compute_ratios),
        "runs": runs,
    }


RSS_CHILD = """
import resource, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from flare_infer.session import load_model
from flare_infer.pipeline import predict_file
model = load_model(Path({model!r}), device="cpu")
r = predict_file(Path({ct!r}), Path({out!r}), model.predict, model.spec, batch_size=16, restore_method={method!r})
print("stages", " ".join(f"{{k}} {{v:.2f}}" for k, v in r.seconds.items()))
print("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak_rss(image: sitk.Image, slices: int, workdir: Path) -> dict:
    ct_path = workdir / f"ct_{slices}.nii.gz"
    sitk.WriteImage(sitk.Cast(ct_with_slices(image, slices), sitk.sitkInt16), str(ct_path), useCompression=True)
    out = {"ct": f"512 x 512 x {slices}, int16"}
    for method in METHODS:
        code = RSS_CHILD.format(repo=str(REPO), model=str(MODEL), ct=str(ct_path), out=str(workdir / "m.nii.gz"),
                                method=method)  # fmt: skip
        text = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        print(method, text.strip(), flush=True)
        out[method] = {
            "peak_rss_mb": float(text.split("peak_rss_mb")[1].split()[0]),
            "stages": text.split("stages")[1].splitlines()[0].strip(),
        }
    return out


def machine(started) -> dict:
    """Where and when a part ran, with the load around it (the 2 cores are shared: say so)."""
    return {
        "started": f"{started[0]:%Y-%m-%d %H:%M} UTC",
        "platform": platform.machine(),
        "cores_allowed": len(os.sched_getaffinity(0)),
        "load_average_at_start": started[1],
        "load_average_at_end": os.getloadavg(),
        "note": "2 cores shared with a long training run and other engineers' jobs; run with nice -n 10",
        "model": str(MODEL.relative_to(REPO)),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip(),
        "command": " ".join(["python", *sys.argv]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=Path, default=None, help="a training.phantoms folder (validation/...)")
    parser.add_argument("--n-cases", type=int, default=4)
    parser.add_argument("--domain", default="labelled", choices=("labelled", "wide"))
    parser.add_argument("--out", type=Path, default=REPO / "docs/results/restore.json")
    parser.add_argument("--parts", nargs="+", default=["accuracy", "timing", "rss"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timing-slices", type=int, default=200)
    parser.add_argument("--rss-slices", type=int, default=600)
    parser.add_argument("--source", type=Path, default=None, help="cache of the timing/RSS source CT (read if present)")
    args = parser.parse_args()
    from flare_infer.session import load_model

    model = load_model(MODEL, device="cpu")
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result.pop("machine", None)  # each part records its own (parts run at different times)
    cases = lambda: load_cases(args.cases, args.n_cases, args.domain)  # noqa: E731

    def source(slices: int) -> sitk.Image:
        if args.source is not None and args.source.exists():
            return sitk.ReadImage(str(args.source))
        image = source_case(cases(), slices)
        if args.source is not None:
            sitk.WriteImage(image, str(args.source), useCompression=True)
        return image

    with tempfile.TemporaryDirectory(prefix="bench_restore_") as tmp:
        for part in args.parts:
            started = (datetime.datetime.now(datetime.timezone.utc), os.getloadavg())
            if part == "accuracy":
                result["accuracy"] = accuracy(model, cases())
            elif part == "timing":
                image = source(args.timing_slices)
                result["timing"] = timing(model, image, args.timing_slices, args.repeats, Path(tmp))
            elif part == "rss":
                result["rss"] = peak_rss(source(args.rss_slices), args.rss_slices, Path(tmp))
            else:
                raise SystemExit(f"unknown part {part!r}: accuracy, timing, rss")
            result[part]["machine"] = machine(started)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
            print(f"{part} written to {args.out}", flush=True)


if __name__ == "__main__":
    main()
