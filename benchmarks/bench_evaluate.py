"""Evaluation speed: our cropped FLARE22 DSC/NSD against the organisers' straightforward code path.

    python benchmarks/bench_evaluate.py [--shape 512 512 300] [--workers 2] [--repeats 1]

One synthetic case at FLARE size with all 13 organs (ellipsoids of organ-like size in mm), and a
prediction that differs the way network output does: shifted by a voxel or two, ragged boundary
voxels, a few stray blobs far from the organ. Scored twice:
- baseline: the organisers' FLARE22_DSC_NSD_Eval.py logic on whole volumes (`gt == i` per organ,
  DeepMind's compute_surface_distances with its union-box crop and Python sort), one process;
- ours: `flare_infer.evaluate.evaluate_arrays` with `--workers` processes over organs.
Prints both wall and CPU times (CPU seconds are robust to other load on a shared machine), the
ratios, and checks that the 26 rounded numbers are identical (exit 1 if not).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
from scipy import ndimage

from flare_infer.evaluate import evaluate_arrays
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300), help="x y z voxels")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of ours (best is reported)")
    args = parser.parse_args()
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
        if theirs[o.short] != (ours.dsc[o.short], ours.nsd[o.short])
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
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
