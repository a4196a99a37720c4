"""predict_slices of this tree against the same function at another commit, in one process, alternating.

    python benchmarks/bench_predict_slices.py --ref 88308ad --out docs/results/predict_slices_handover.json

Both run the predict path's outputs ("labels", "probabilities": the boundary store) with the numpy threshold
stand-in network of bench_pipeline (near-free: the reduction, not the network, is the bottleneck, which is where
the calling thread takes shares of the argmax) on the bench CT's preprocessed box size. `--repeats` alternating
pairs; the medians and each pair's ratio (ours / ref) are reported, and the outputs of both are checked equal.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_pipeline import threshold_batch  # noqa: E402

from flare_infer import predictor  # noqa: E402


def load_ref(ref: str):
    """flare_infer/predictor.py at commit `ref`, imported as a module of its own."""
    source = subprocess.run(["git", "show", f"{ref}:flare_infer/predictor.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "predictor_ref.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("predictor_ref", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["predictor_ref"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def volume(shape: tuple[int, int, int]) -> np.ndarray:
    """A normalised box with smooth blobs (organs' worth of boundaries) and a little noise."""
    rng = np.random.default_rng(0)
    z, y, x = (np.linspace(0, 1, n, dtype=np.float32) for n in shape)
    vol = 0.5 + 0.3 * np.sin(7 * z)[:, None, None] * np.cos(5 * y)[None, :, None] * np.sin(4 * x)[None, None, :]
    return (vol + 0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", required=True, help="commit whose predict_slices is the baseline")
    ap.add_argument("--shape", default="200,181,249", help="Z,Y,X of the box (default: the bench CT's)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    vol, ref = volume(shape), load_ref(args.ref)
    runs = {"ours": predictor, "ref": ref}
    outs = {}
    times = {name: [] for name in runs}
    for i in range(args.repeats + 1):  # the first pair warms up and is not counted
        for name, module in (runs.items() if i % 2 else reversed(runs.items())):
            cfg = module.SliceConfig(batch_size=16, outputs=("labels", "probabilities"))
            t0 = time.perf_counter()
            outs[name] = module.predict_slices(threshold_batch, vol, cfg)
            if i:
                times[name].append(time.perf_counter() - t0)
    (la, pa), (lb, pb) = outs["ours"], outs["ref"]
    same = bool(np.array_equal(la, lb) and np.array_equal(pa.row, pb.row) and np.array_equal(pa.values, pb.values))
    ratios = [a / b for a, b in zip(times["ours"], times["ref"], strict=True)]
    result = {
        "what": "predict_slices (labels + boundary store), threshold stand-in network, in one process, alternating",
        "ref": args.ref, "shape_zyx": shape, "repeats": args.repeats, "seconds": times,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "pair_ratios_ours_over_ref": ratios, "median_pair_ratio": statistics.median(ratios),
        "outputs_identical": same, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
    }  # fmt: skip
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("median_s", "median_pair_ratio", "outputs_identical")}))


if __name__ == "__main__":
    main()
