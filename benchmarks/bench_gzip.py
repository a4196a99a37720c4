"""Does a faster gzip library pay for reading the CT and writing the mask? Measured side by side.

    python benchmarks/bench_gzip.py [--slices 200] [--repeats 5] [--out docs/results/bench_gzip.json]

Input: the generated int16 CT of benchmarks/bench_pipeline.py (512 x 512 x SLICES, scanner noise, about
what a real CT compresses to) and a uint8 organ mask of the same grid (thresholds of that CT). Each
repeat runs every variant once, in turn (so the machine's load hits all alike); medians and each
variant's time per repeat are written as JSON.

Reading (the result must be the same image: voxels, spacing, origin, direction):
- `sitk`: `SimpleITK.ReadImage(NAME.nii.gz)`, ITK's own zlib (what `io.read_ct` did until 2026-12-02, and does
  where isal is missing);
- `isal-into-image`: `flare_infer.io.read_gzip_voxels`, what `io.read_ct` does now: ITK reads the header, isal
  inflates the voxels straight into the image's buffer (no uncompressed file, no second buffer);
- `python-zlib`, `isal`, `zlib-ng`: the gzip stream decompressed in Python by the stdlib's `gzip`,
  `isal.igzip` or `zlib_ng.gzip_ng`, written to an uncompressed `.nii` in /dev/shm (RAM), read by ITK;
- `zlib-ng-threaded`: as `zlib-ng`, decompressing in a second thread (`gzip_ng_threaded`).
Writing the mask (the result must decompress to the same bytes as ITK's uncompressed `.nii`):
- `sitk`: `SimpleITK.WriteImage(..., useCompression=True)` (what `io.write_mask` did until 2026-12-02, and does
  where isal is missing);
- `isal-direct-L1`: `flare_infer.io.write_gzip_nifti`, what `io.write_mask` does now for a uint8 mask: ITK's header
  (of a one-voxel image of the same geometry, its size patched) and the image's own buffer, compressed by isal;
- `python-zlib-L1`, `isal-L1`, `zlib-ng-L1`, `zlib-ng-threaded-L1`: ITK writes an uncompressed `.nii` to /dev/shm, the
  library compresses it at level 1 into the final `.nii.gz` (2 threads for the threaded one).
Needs isal (a project dependency) and `pip install zlib-ng`; a variant whose library is missing is skipped.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from bench_pipeline import generate_ct  # noqa: E402
from machine import machine_record  # noqa: E402

from flare_infer import io  # noqa: E402

RAM = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def _decompressors() -> dict:
    found = {"python-zlib": lambda f: gzip.open(f, "rb")}
    try:
        from isal import igzip

        found["isal"] = lambda f: igzip.open(f, "rb")
    except ImportError:
        pass
    try:
        from zlib_ng import gzip_ng, gzip_ng_threaded

        found["zlib-ng"] = lambda f: gzip_ng.open(f, "rb")
        found["zlib-ng-threaded"] = lambda f: gzip_ng_threaded.open(f, "rb", threads=1)  # reads in a 2nd thread
    except ImportError:
        pass
    return found


def _compressors() -> dict:
    found = {"python-zlib-L1": lambda f: gzip.open(f, "wb", compresslevel=1)}
    try:
        from isal import igzip

        found["isal-L1"] = lambda f: igzip.open(f, "wb", compresslevel=1)
    except ImportError:
        pass
    try:
        from zlib_ng import gzip_ng, gzip_ng_threaded

        found["zlib-ng-L1"] = lambda f: gzip_ng.open(f, "wb", compresslevel=1)
        found["zlib-ng-threaded-L1"] = lambda f: gzip_ng_threaded.open(f, "wb", compresslevel=1, threads=2)
    except ImportError:
        pass
    return found


def read_via_ram(path: Path, opener) -> sitk.Image:
    tmp = RAM / f"bench_gzip_{os.getpid()}.nii"
    try:
        with opener(path) as src, tmp.open("wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        return sitk.ReadImage(str(tmp))
    finally:
        tmp.unlink(missing_ok=True)


def write_via_ram(mask: sitk.Image, path: Path, opener) -> None:
    tmp = RAM / f"bench_gzip_{os.getpid()}_w.nii"
    try:
        sitk.WriteImage(mask, str(tmp), useCompression=False)
        with tmp.open("rb") as src, opener(path) as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
    finally:
        tmp.unlink(missing_ok=True)


def read_into_image(path: Path) -> sitk.Image:
    image = io.read_gzip_voxels(path, io._header(path))
    if image is None:
        raise RuntimeError(f"{path}: io.read_gzip_voxels did not take it (is isal installed?)")
    return image


def write_direct(mask: sitk.Image, path: Path) -> None:
    if not io.write_gzip_nifti(mask, path):
        raise RuntimeError(f"{path}: io.write_gzip_nifti did not take it (is isal installed?)")


def same_image(a: sitk.Image, b: sitk.Image) -> bool:
    header = all(
        np.allclose(getattr(a, g)(), getattr(b, g)(), atol=1e-9) for g in ("GetSpacing", "GetOrigin", "GetDirection")
    )
    return header and np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(slices: int, repeats: int, work: Path) -> dict:
    ct_path = work / "ct.nii.gz"
    ct = generate_ct(slices)
    sitk.WriteImage(ct, str(ct_path), useCompression=True)
    vol = sitk.GetArrayViewFromImage(ct)
    labels = np.digitize(vol, [0, 80, 300]).astype(np.uint8)  # air/fat, soft tissue, organs, bone
    mask = sitk.GetImageFromArray(labels)
    mask.CopyInformation(ct)
    reference_nii = work / "mask.nii"
    sitk.WriteImage(mask, str(reference_nii), useCompression=False)
    reference_bytes = reference_nii.read_bytes()

    readers = {"sitk": lambda: sitk.ReadImage(str(ct_path)), "isal-into-image": lambda: read_into_image(ct_path)}
    readers |= {name: (lambda o=o: read_via_ram(ct_path, o)) for name, o in _decompressors().items()}
    writers = {"sitk": lambda p: sitk.WriteImage(mask, str(p), useCompression=True),
               "isal-direct-L1": lambda p: write_direct(mask, p)}
    writers |= {name: (lambda p, o=o: write_via_ram(mask, p, o)) for name, o in _compressors().items()}

    checks = {f"read {n}": same_image(fn(), ct) for n, fn in readers.items()}
    sizes = {}
    for name, fn in writers.items():
        out = work / f"mask_{name}.nii.gz"
        fn(out)
        sizes[name] = out.stat().st_size
        checks[f"write {name}"] = gzip.decompress(out.read_bytes()) == reference_bytes and same_image(
            sitk.ReadImage(str(out)), mask
        )
    read_s = {n: [] for n in readers}
    write_s = {n: [] for n in writers}
    for _ in range(repeats):
        for name, fn in readers.items():
            read_s[name].append(timed(fn))
        for name, fn in writers.items():
            write_s[name].append(timed(lambda fn=fn, name=name: fn(work / f"mask_{name}.nii.gz")))
    return {
        "ct_bytes_gz": ct_path.stat().st_size,
        "mask_bytes_gz": sizes,
        "checks_identical": checks,
        "read_s": read_s,
        "write_s": write_s,
        "read_median_s": {n: statistics.median(v) for n, v in read_s.items()},
        "write_median_s": {n: statistics.median(v) for n, v in write_s.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("docs/results/bench_gzip.json"))
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_gzip_") as tmp:
        result = run(args.slices, args.repeats, Path(tmp))
    result["settings"] = {"slices": args.slices, "repeats": args.repeats, "ram_dir": str(RAM)}
    result["machine"] = machine_record(load_before, simpleitk=sitk.Version.VersionString())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for kind in ("read", "write"):
        base = result[f"{kind}_median_s"]["sitk"]
        for name, t in result[f"{kind}_median_s"].items():
            same = result["checks_identical"][f"{kind} {name}"]
            print(f"{kind:5} {name:22} {t:6.3f} s  x{t / base:4.2f} of sitk  identical: {same}")
    print(f"wrote {args.out}")
    return 0 if all(result["checks_identical"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
