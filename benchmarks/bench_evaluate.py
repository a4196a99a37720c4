"""Evaluation speed: our FLARE22 DSC/NSD against the organisers' straightforward code path, and the CLI.

    python benchmarks/bench_evaluate.py [--shape 512 512 300] [--workers 2] [--repeats 1] [--cli-repeats 3]
        [--out docs/results/bench_evaluate.json]

One synthetic case at FLARE size with all 13 organs (ellipsoids of organ-like size in mm), and a
prediction that differs the way network output does: shifted by a voxel or two, ragged boundary
voxels, a few stray blobs far from the organ. Scored twice:
- baseline: the organisers' FLARE22_DSC_NSD_Eval.py logic on whole volumes (`gt == i` per organ,
  DeepMind's compute_surface_distances with its union-box crop and Python sort), one process;
- ours: `flare_infer.evaluate.evaluate_arrays` with `--workers` processes over organs.
Prints both wall and CPU times (CPU seconds are robust to other load on a shared machine), the
ratios, and checks that the 26 rounded numbers are identical (exit 1 if not).
Then the whole command as a user runs it, process start included: the pair written as `.nii.gz`
(uint8, spacing in the header), `python -m flare_infer.evaluate PRED_DIR GT_DIR --csv ...` run
`--cli-repeats` times in fresh processes (wall and CPU of the child), its CSV checked against the
in-process numbers; goal: 2 s wall. Raw results: `--out` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from flare_infer.evaluate import evaluate_arrays, write_csv
from flare_infer.labels import AXIAL_RANGE_CUT_VALUES, ORGANS
from flare_infer.metrics import dice, organiser_spacing, reference_surface_distances, surface_dice_at_tolerance

SPACING_XYZ = (0.78125, 0.78125, 1.5)
# (centre as a fraction of the volume (x, y, z), radii in mm (x, y, z)): rough abdominal layout.
ORGAN_SHAPES = {
    1: ((0.35, 0.45, 0.55), (80, 70, 75)),  # liver
    2: ((0.35, 0.62, 0.45), (28, 30, 50)),  # right kidney
    3: ((0.70, 0.60, 0.58), (40, 35, 50)),  # spleen
    4: ((0.55, 0.50, 0.48), (60, 15, 18)),  # pancreas
    5: ((0.52, 0.58, 0.50), (11, 11, 160)),  # aorta
    6: ((0.45, 0.57, 0.50), (12, 10, 140)),  # IVC
    7: ((0.42, 0.62, 0.60), (8, 6, 18)),  # right adrenal
    8: ((0.60, 0.62, 0.60), (8, 6, 18)),  # left adrenal
    9: ((0.38, 0.38, 0.45), (15, 15, 30)),  # gallbladder
    10: ((0.52, 0.55, 0.80), (8, 8, 60)),  # esophagus
    11: ((0.62, 0.42, 0.60), (50, 40, 55)),  # stomach
    12: ((0.48, 0.45, 0.42), (45, 12, 25)),  # duodenum
    13: ((0.68, 0.64, 0.45), (28, 30, 50)),  # left kidney
}



sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_record  # noqa: E402


def phantom_labels(shape_xyz: tuple[int, int, int], spacing_xyz=SPACING_XYZ) -> np.ndarray:
    """uint8 (x, y, z) labels: one ellipsoid per organ, later organs drawn over earlier ones."""
    labels = np.zeros(shape_xyz, np.uint8)
    for value, (centre, radii_mm) in ORGAN_SHAPES.items():
        centre_vox = [c * n for c, n in zip(centre, shape_xyz, strict=True)]
        box = tuple(
            slice(max(0, int(c - r / s) - 1), min(n, int(c + r / s) + 2))
            for c, r, s, n in zip(centre_vox, radii_mm, spacing_xyz, shape_xyz, strict=True)
        )
        grid = np.ogrid[box]  # only the ellipsoid's bounding box: seconds faster at 512 x 512 x 300
        inside = sum(((grid[a] - centre_vox[a]) * spacing_xyz[a] / radii_mm[a]) ** 2 for a in range(3)) <= 1
        labels[box][inside] = value
    return labels


def network_like(gt_xyz: np.ndarray, seed: int = 0) -> np.ndarray:
    """A prediction with the usual errors: a shift, ragged boundaries, stray blobs."""
    rng = np.random.default_rng(seed)
    pred = np.roll(gt_xyz, (1, -1, 2), axis=(0, 1, 2))
    boundary = ndimage.morphological_gradient(pred, size=3) > 0
    flip = boundary & (rng.random(pred.shape) < 0.3)
    pred[flip] = 0
    for value in (1, 3, 11, 13):  # stray false-positive blobs far from the organ
        centre = rng.integers(20, np.array(pred.shape) - 20)
        pred[tuple(slice(c - 3, c + 3) for c in centre)] = value
    return pred


def organisers_scores(pred_xyz, gt_xyz, spacing_xyz) -> dict[str, tuple[float, float]]:
    """FLARE22_DSC_NSD_Eval.py's loop, on whole volumes, with the reference surface distances."""
    spacing = organiser_spacing(spacing_xyz)
    scores = {}
    for organ in ORGANS:
        i = organ.value
        if np.sum(gt_xyz == i) == 0 and np.sum(pred_xyz == i) == 0:
            dsc, nsd = 1, 1
        elif np.sum(gt_xyz == i) == 0 and np.sum(pred_xyz == i) > 0:
            dsc, nsd = 0, 0
        else:
            if i in AXIAL_RANGE_CUT_VALUES:
                z = np.where(gt_xyz == i)[2]
                gt_i, pred_i = gt_xyz[:, :, z.min() : z.max()] == i, pred_xyz[:, :, z.min() : z.max()] == i
            else:
                gt_i, pred_i = gt_xyz == i, pred_xyz == i
            distances = reference_surface_distances(gt_i, pred_i, spacing)
            dsc = dice(gt_i, pred_i)
            nsd = surface_dice_at_tolerance(distances, organ.nsd_tolerance_mm)
        scores[organ.short] = (float(np.round(np.float64(dsc), 4)), float(np.round(np.float64(nsd), 4)))
    return scores


def cli_runs(pred_xyz, gt_xyz, repeats: int) -> list[dict]:
    """Wall and CPU seconds of `python -m flare_infer.evaluate` on the pair written as files, and its CSV row."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_evaluate_") as tmp:
        folders = {name: Path(tmp) / name for name in ("pred", "gt")}
        for name, labels in (("pred", pred_xyz), ("gt", gt_xyz)):
            folders[name].mkdir()
            image = sitk.GetImageFromArray(np.ascontiguousarray(labels.transpose(2, 1, 0)))
            image.SetSpacing(SPACING_XYZ)
            sitk.WriteImage(image, str(folders[name] / "case_0001.nii.gz"), useCompression=True)
        csv = Path(tmp) / "scores.csv"
        cmd = [
            sys.executable,
            "-m",
            "flare_infer.evaluate",
            str(folders["pred"]),
            str(folders["gt"]),
            "--csv",
            str(csv),
        ]
        repo = str(Path(__file__).resolve().parents[1])
        for _ in range(repeats):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": repo})
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
            runs.append({"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "csv_row": csv.read_text().splitlines()[1]})
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300), help="x y z voxels")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of ours (best is reported)")
    parser.add_argument("--cli-repeats", type=int, default=3, help="runs of the whole command (0: skip)")
    parser.add_argument("--out", type=Path, default=None, help="raw results as JSON (docs/results/bench_evaluate.json)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    shape = tuple(args.shape)
    gt = phantom_labels(shape)
    pred = network_like(gt)
    present = sorted(set(np.unique(gt)) - {0})
    print(f"case {shape} (x, y, z), spacing {SPACING_XYZ} mm, organs present: {len(present)} of 13")

    times, cpu_times = [], []
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        ours = evaluate_arrays(pred, gt, SPACING_XYZ, workers=args.workers)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    start, cpu_start = time.perf_counter(), time.process_time()
    theirs = organisers_scores(pred, gt, SPACING_XYZ)
    t_theirs, cpu_theirs = time.perf_counter() - start, time.process_time() - cpu_start
    t_ours, cpu_ours = min(times), min(cpu_times)

    mismatches = [
        (o.short, theirs[o.short], (ours.dsc[o.short], ours.nsd[o.short]))
        for o in ORGANS
        if not np.array_equal(theirs[o.short], (ours.dsc[o.short], ours.nsd[o.short]), equal_nan=True)
    ]
    print(f"{'organ':<12} {'DSC':>7} {'NSD':>7}")
    for organ in ORGANS:
        print(f"{organ.short:<12} {ours.dsc[organ.short]:>7.4f} {ours.nsd[organ.short]:>7.4f}")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"load average {os.getloadavg()[0]:.2f} at the end"
    )
    # CPU seconds (all threads of this process) are the contention-robust figure on a shared machine.
    print(f"organisers' code path (1 process): wall {t_theirs:.2f} s, CPU {cpu_theirs:.2f} s")
    runs = ", ".join(f"{t:.2f}" for t in times)
    print(f"ours ({args.workers} workers): wall {t_ours:.2f} s (runs: {runs}), CPU {cpu_ours:.2f} s")
    print(
        f"speed-up: wall {t_theirs / t_ours:.1f}x, CPU {cpu_theirs / cpu_ours:.1f}x; "
        f"rounded numbers identical: {not mismatches}"
    )
    for mismatch in mismatches:
        print("MISMATCH", mismatch)
    cli = cli_runs(pred, gt, args.cli_repeats) if args.cli_repeats else []
    with tempfile.TemporaryDirectory() as tmp:
        write_csv([replace(ours, name="case_0001.nii.gz")], Path(tmp) / "in_process.csv")
        expected_row = (Path(tmp) / "in_process.csv").read_text().splitlines()[1]
    cli_same = all(run["csv_row"] == expected_row for run in cli)
    if cli:
        walls = sorted(run["wall_s"] for run in cli)
        print(f"python -m flare_infer.evaluate (fresh process): wall {walls} s, median {walls[len(walls) // 2]:.2f} s "
              f"(goal 2 s); CPU {[run['cpu_s'] for run in cli]} s; CSV = in-process numbers: {cli_same}")  # fmt: skip
    if args.out is not None:
        result = {
            "case": {"shape_xyz": list(shape), "spacing_xyz": list(SPACING_XYZ), "organs_present": len(present)},
            "organisers_in_process": {"wall_s": round(t_theirs, 3), "cpu_s": round(cpu_theirs, 3)},
            "ours_in_process": {
                "workers": args.workers,
                "wall_s": [round(t, 3) for t in times],
                "cpu_s": [round(t, 3) for t in cpu_times],
            },  # fmt: skip
            "rounded_numbers_identical": not mismatches,
            "scores": {o.short: [ours.dsc[o.short], ours.nsd[o.short]] for o in ORGANS},
            "cli": {"runs": cli, "csv_equals_in_process": cli_same, "goal_wall_s": 2.0},
            "machine": machine_record(load_before),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 1 if mismatches or not cli_same else 0


if __name__ == "__main__":
    sys.exit(main())
