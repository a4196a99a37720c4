"""DICOM round trip with the shipped weights: each CT written as a DICOM series (uncompressed and JPEG 2000), then
segmented from the series and from the NIfTI file; the masks compared, the SEG and RTSTRUCT written from the
series' mask read back and compared with it, and the stages timed.

    python benchmarks/dicom_roundtrip.py                      # -> docs/results/dicom_roundtrip.json
    python benchmarks/dicom_roundtrip.py --ct A.nii.gz --ct B.nii.gz --out R.json
    python benchmarks/dicom_roundtrip.py --bench-slices 200 --out docs/results/dicom_roundtrip_512.json

Default CTs: the bundled phantom `examples/inputs/FLARE22_Ex_0001_0000.nii.gz` and, where `../shared` is beside
the clone, the real CT `../shared/data/real-ct/example_ct.nii.gz` (int32, RAS); with `--bench-slices N` instead,
the generated 512 x 512 x N CT of benchmarks/bench_pipeline.py (a clinical size, for the times). The series are
written by the tests' writer (`tests/dicom_series.py`: pydicom, stored = HU + 2048 as uint16, intercept -2048), read
back by the tests' readers (`tests/test_dicom_output.py`: highdicom for SEG, an even-odd centre-in-polygon fill
for RTSTRUCT). Needs the `dicom` and `dev` extras. Times are one run each on this machine (CPU), not a benchmark
of record.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from dicom_series import SeriesSpec, write_series  # noqa: E402
from test_dicom_output import rtstruct_labels, seg_labels  # noqa: E402

from flare_infer import dicom, dicom_out, io  # noqa: E402
from flare_infer.labels import ORGANS  # noqa: E402
from flare_infer.pipeline import predict_file  # noqa: E402
from flare_infer.session import load_model  # noqa: E402

DEFAULT_CTS = [
    ROOT / "examples/inputs/FLARE22_Ex_0001_0000.nii.gz",
    ROOT.parent / "shared/data/real-ct/example_ct.nii.gz",
]


def spec_of(image: sitk.Image, syntax: str) -> SeriesSpec:
    hu = sitk.GetArrayFromImage(image).astype(np.float64)
    return SeriesSpec(
        hu_zyx=hu, spacing_xyz=image.GetSpacing(), origin=image.GetOrigin(),
        axes=np.asarray(image.GetDirection()).reshape(3, 3), intercept=-2048.0, syntax=syntax,
    )  # fmt: skip


def dsc(a: np.ndarray, b: np.ndarray) -> dict[str, float | None]:
    out = {}
    for organ in ORGANS:
        x, y = a == organ.value, b == organ.value
        total = int(x.sum() + y.sum())
        out[organ.name] = None if total == 0 else 2.0 * int((x & y).sum()) / total
    return out


def dciodvfy_errors(path: Path) -> int | None:
    if shutil.which("dciodvfy") is None:
        return None
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=300)
    return sum(ln.startswith("Error") for ln in (result.stdout + result.stderr).splitlines())


def one_case(ct: Path, syntax: str, model, work: Path) -> dict:
    image = io.read_ct(ct)
    folder = work / f"{ct.name.split('.')[0]}_{syntax}"
    t = time.perf_counter()
    write_series(folder / "in", spec_of(image, syntax))
    written_s = time.perf_counter() - t
    t = time.perf_counter()
    found = dicom.scan(folder / "in")
    scan_s = time.perf_counter() - t
    series = found.series[0]
    reader = dicom.SeriesReader(found.series, keep_headers=True)
    run = dict(predict_batch=model.predict, spec=model.spec, batch_size=16, fixed_batch=model.fixed_batch)
    from_dicom = predict_file(folder / series.name, folder / "dicom.nii.gz", read=reader, **run)
    from_nifti = predict_file(ct, folder / "nifti.nii.gz", **run)
    headers = reader.headers(series.name)
    mask = from_dicom.mask
    labels = sitk.GetArrayFromImage(mask)
    t = time.perf_counter()
    dicom_out.write_seg(mask, headers, folder / "out.seg.dcm")
    seg_s = time.perf_counter() - t
    t = time.perf_counter()
    dicom_out.write_rtstruct(mask, headers, folder / "out.rtstruct.dcm")
    rt_s = time.perf_counter() - t
    seg_back = seg_labels(folder / "out.seg.dcm", headers)
    rt_back = rtstruct_labels(folder / "out.rtstruct.dcm", mask, headers)
    return {
        "ct": ct.name if ct.name.startswith("generated_") else os.path.relpath(ct, ROOT),
        "syntax": syntax,
        "size_xyz": list(image.GetSize()),
        "organs_present": sorted(int(v) for v in np.unique(labels) if v),
        "voxels_differing_dicom_vs_nifti_input": int((labels != sitk.GetArrayFromImage(from_nifti.mask)).sum()),
        "seg_voxels_differing": int((seg_back != labels).sum()),
        "rtstruct_voxels_differing": int((rt_back != labels).sum()),
        "rtstruct_dsc_min": min(v for v in dsc(rt_back, labels).values() if v is not None),
        "dciodvfy_error_lines": {"seg": dciodvfy_errors(folder / "out.seg.dcm"),
                                 "rtstruct": dciodvfy_errors(folder / "out.rtstruct.dcm")},  # fmt: skip
        "bytes": {kind: (folder / f"out.{kind}.dcm").stat().st_size for kind in ("seg", "rtstruct")},
        "seconds": {
            "series_written_by_the_test_writer": written_s, "scan": scan_s,
            "read_dicom": from_dicom.seconds["read"], "read_nifti": from_nifti.seconds["read"],
            "write_seg": seg_s, "write_rtstruct": rt_s,
        },  # fmt: skip
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=Path, action="append", help="a NIfTI CT (repeatable; default: see above)")
    parser.add_argument("--bench-slices", type=int, help="instead: the generated 512 x 512 x N CT of bench_pipeline")
    parser.add_argument("--model", type=Path, default=ROOT / "weights/student.onnx")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/dicom_roundtrip.json")
    args = parser.parse_args(argv)
    cts = args.ct or [p for p in DEFAULT_CTS if p.is_file()]
    model = load_model(args.model, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        if args.bench_slices:
            from bench_pipeline import generate_ct

            cts = [Path(tmp) / f"generated_512x512x{args.bench_slices}.nii.gz"]
            sitk.WriteImage(generate_ct(args.bench_slices), str(cts[0]))
        cases = [one_case(ct, syntax, model, Path(tmp)) for ct in cts for syntax in ("explicit", "jpeg2000")]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {
        "command": "python " + shlex.join(["benchmarks/dicom_roundtrip.py", *(argv or sys.argv[1:])]),
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model),
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for case in cases:
        keys = ("voxels_differing_dicom_vs_nifti_input", "seg_voxels_differing", "rtstruct_voxels_differing")
        print(case["ct"], case["syntax"], {k: case[k] for k in keys}, case["dciodvfy_error_lines"], case["seconds"])


if __name__ == "__main__":
    main()
