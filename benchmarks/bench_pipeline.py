"""Pipeline stages against the floor users pay today (plain SimpleITK read + write), and peak memory.

    python benchmarks/bench_pipeline.py                       # 512 x 512 x 200 timing, 512 x 512 x 600 peak RSS
    python benchmarks/bench_pipeline.py --slices 200 --rss-slices 0 --repeats 3

Timing: a generated int16 CT (body, organs, bone, noise; 0.8 x 0.8 x 2.5 mm) is read and a mask
(the pipeline's own, from a warm-up run) written with plain SimpleITK (the floor), then run through
`flare_infer.pipeline.predict_file`, alternating, `--repeats` times; medians are reported. The network
is a numpy threshold stand-in, timed as `infer` and excluded:
the ratio is (read + preprocess + restore + write) / (read + write), both of medians and per repeat
(each repeat's own side-by-side pair; the median of those is the number to quote on a loaded machine).
Peak RSS: a fresh subprocess runs the same file-to-file prediction through onnxruntime with the
threshold stand-in ONNX (tests/onnx_standin.py), and reports `ru_maxrss`.
"""

from __future__ import annotations

import argparse
import datetime
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
sys.path.insert(0, str(REPO / "tests"))

from flare_infer.pipeline import predict_file  # noqa: E402
from flare_infer.spec import ModelSpec  # noqa: E402

SPACING_XYZ = (0.8, 0.8, 2.5)
NON_NETWORK = ("read", "preprocess", "restore", "write")


def generate_ct(slices: int, size: int = 512, seed: int = 0) -> sitk.Image:
    """An abdomen-like int16 CT built slice by slice (memory: one slice of float64 at a time)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) * SPACING_XYZ[0]
    cx, cy = size * SPACING_XYZ[0] / 2, size * SPACING_XYZ[1] / 2
    vol = np.empty((slices, size, size), np.int16)
    for z in range(slices):
        t = z / max(1, slices - 1)  # 0 inferior .. 1 superior
        slab = np.full((size, size), -1000.0, np.float32)
        body = ((x - cx) / 170) ** 2 + ((y - cy) / 120) ** 2 <= 1
        slab[body] = -90.0  # fat
        slab[((x - cx) / 150) ** 2 + ((y - cy) / 100) ** 2 <= 1] = 40.0  # soft tissue
        slab[((x - cx + 60) / (70 * (0.5 + t))) ** 2 + ((y - cy + 10) / 60) ** 2 <= 1] = 60.0  # liver, patient right
        slab[((x - cx - 80) / 30) ** 2 + ((y - cy - 20) / 40) ** 2 <= 1] = 110.0  # spleen
        slab[((x - cx) / 18) ** 2 + ((y - cy - 70) / 18) ** 2 <= 1] = 700.0  # vertebra
        # scanner noise: about 15 HU in the body, 8 HU in the air around it (what makes real CTs compress poorly)
        slab += rng.normal(0.0, 1.0, slab.shape).astype(np.float32) * np.where(body, 15.0, 8.0).astype(np.float32)
        vol[z] = slab
    image = sitk.GetImageFromArray(vol)
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin((-204.4, -190.0, -600.0))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))  # RAS on disk, as many NIfTI files
    return image


def threshold_batch(batch: np.ndarray) -> np.ndarray:
    """A numpy stand-in network: class 1 in a mid-intensity band, class 3 above it (cheap, and excluded)."""
    centre = batch[:, batch.shape[1] // 2]  # (N, H, W)
    scores = np.zeros((batch.shape[0], 14, *batch.shape[2:]), np.float32)
    scores[:, 1] = (centre > 0.62) * 2.0
    scores[:, 3] = (centre > 0.75) * 4.0
    return scores


def time_floor(ct_path: Path, mask: sitk.Image, out_path: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    sitk.ReadImage(str(ct_path))
    t1 = time.perf_counter()
    sitk.WriteImage(mask, str(out_path), useCompression=True)
    t2 = time.perf_counter()
    return {"read": t1 - t0, "write": t2 - t1}


def timing(slices: int, repeats: int, workdir: Path) -> None:
    ct_path = workdir / f"ct_{slices}.nii.gz"
    image = generate_ct(slices)
    sitk.WriteImage(image, str(ct_path), useCompression=True)
    del image
    # warm-up run; its mask is the one the floor writes, so both write the same realistic labels
    predict_file(ct_path, workdir / "our_mask.nii.gz", threshold_batch, ModelSpec(), batch_size=16)
    mask = sitk.ReadImage(str(workdir / "our_mask.nii.gz"))
    floors, ours = [], []
    for _ in range(repeats):
        floors.append(time_floor(ct_path, mask, workdir / "floor_mask.nii.gz"))
        result = predict_file(ct_path, workdir / "our_mask.nii.gz", threshold_batch, ModelSpec(), batch_size=16)
        ours.append(result.seconds)
    med = {k: statistics.median(f[k] for f in floors) for k in ("read", "write")}
    stages = {k: statistics.median(o[k] for o in ours) for k in ours[0]}
    floor_total = med["read"] + med["write"]
    ours_total = sum(stages[k] for k in NON_NETWORK)
    # each repeat's ratio from its own side-by-side pair: on a shared machine, load moves both together
    pairs = zip(floors, ours, strict=True)
    ratios = sorted(sum(o[k] for k in NON_NETWORK) / (f["read"] + f["write"]) for f, o in pairs)
    print(f"\n512 x 512 x {slices} int16 CT ({ct_path.stat().st_size / 1e6:.0f} MB gz), median of {repeats} runs")
    print(f"floor  (SimpleITK read + write): {floor_total:.2f} s  (read {med['read']:.2f}, write {med['write']:.2f})")
    print(f"ours   (without the network):    {ours_total:.2f} s  ratio {ours_total / floor_total:.2f}")
    print(f"ratio per repeat: median {statistics.median(ratios):.2f}, all {[round(r, 2) for r in ratios]}")
    print("stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()) + "  (infer: numpy stand-in, excluded)")


RSS_CHILD = """
import resource, sys
from pathlib import Path
sys.path[:0] = [{repo!r}, {tests!r}]
from onnx_standin import make_standin_model
from flare_infer.session import load_model
from flare_infer.pipeline import predict_file
model = load_model(make_standin_model(Path({work!r})), device="cpu")
r = predict_file(Path({ct!r}), Path({work!r}) / "rss_mask.nii.gz", model.predict, model.spec, batch_size=16)
print("stages", " ".join(f"{{k}} {{v:.2f}}" for k, v in r.seconds.items()))
print("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak_rss(slices: int, workdir: Path) -> None:
    ct_path = workdir / f"ct_{slices}.nii.gz"
    sitk.WriteImage(generate_ct(slices, seed=1), str(ct_path), useCompression=True)
    code = RSS_CHILD.format(repo=str(REPO), tests=str(REPO / "tests"), work=str(workdir), ct=str(ct_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    floor_code = (
        f"import resource, SimpleITK as sitk; im = sitk.ReadImage({str(ct_path)!r}); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    floor = subprocess.run([sys.executable, "-c", floor_code], capture_output=True, text=True, check=True).stdout
    print(f"\n512 x 512 x {slices} int16 CT, onnxruntime CPU with the threshold stand-in ONNX, batch 16:")
    print(out.strip())
    print(f"peak_rss_mb of a plain SimpleITK read of the same file: {float(floor):.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-slices", type=int, default=600, help="0 skips the peak RSS run")
    args = parser.parse_args()
    now = datetime.datetime.now(datetime.timezone.utc)
    print(
        f"{now:%Y-%m-%d %H:%M} UTC, {platform.machine()}, {len(os.sched_getaffinity(0))} cores allowed, "
        f"SimpleITK {sitk.Version.VersionString()}, ITK threads {sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()}"
    )
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        if args.slices:
            timing(args.slices, args.repeats, Path(tmp))
        if args.rss_slices:
            peak_rss(args.rss_slices, Path(tmp))


if __name__ == "__main__":
    main()
