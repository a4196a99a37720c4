"""CPU time per case of two sets of weights side by side, on a 512 x 512 x N CT (issue 26: the new weights stay fast).

    python benchmarks/bench_weights_cpu.py --old OLD.onnx --new weights/student.onnx \
        --out docs/results/weights_cpu_time.json [--slices 200] [--repeats 3] [--threads 2]

Both models segment the same int16 CT (`bench_pipeline.generate_ct`: 512 x 512 x `--slices`, 0.8 mm in-plane,
air around the body) through `flare_infer.pipeline.predict_file` (the CLI's path: read, body crop, resample,
network, restore, write), alternating old and new, `--repeats` times each, in this one process. CPU time is the
process's user + system time over the call (all threads), wall time beside it. Goal (issue 26): new <= 5 s of
CPU per case on 2 cores; the ratio new / old says what the retraining cost.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from bench_pipeline import generate_ct  # noqa: E402

from flare_infer.pipeline import predict_file  # noqa: E402
from flare_infer.session import load_model  # noqa: E402

BATCH_SIZE = 16  # the CLI's default


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def one_case(model, ct: Path, out: Path) -> dict:
    wall, cpu = time.perf_counter(), cpu_seconds()
    predict_file(ct, out, model.predict, model.spec, batch_size=BATCH_SIZE, fixed_batch=model.fixed_batch)
    return {"cpu_s": round(cpu_seconds() - cpu, 3), "wall_s": round(time.perf_counter() - wall, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True, help="the previous weights (NAME.onnx + NAME.json)")
    parser.add_argument("--new", type=Path, default=REPO / "weights" / "student.onnx", help="default: %(default)s")
    parser.add_argument("--slices", type=int, default=200, help="axial slices of the 512 x 512 CT (default 200)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each model, alternating (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime and ITK threads (default 2)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "weights_cpu_time.json")
    args = parser.parse_args()
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    models = {name: load_model(path, device="cpu", threads=args.threads)
              for name, path in (("old", args.old), ("new", args.new))}  # fmt: skip
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="weights-cpu-") as tmp:
        ct = Path(tmp) / "ct_0000.nii.gz"
        sitk.WriteImage(generate_ct(args.slices), str(ct), True)
        one_case(models["new"], ct, Path(tmp) / "warm.nii.gz")  # first call: onnxruntime's allocations
        for _ in range(args.repeats):
            for name, model in models.items():
                runs[name].append(one_case(model, ct, Path(tmp) / f"{name}.nii.gz"))
    median = {name: statistics.median(r["cpu_s"] for r in rs) for name, rs in runs.items()}
    record = {
        "what": "CPU seconds (user + system, all threads) per case of predict_file, old and new weights alternating",
        "command": " ".join(["python", "benchmarks/bench_weights_cpu.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ct": {"size_xyz": [512, 512, args.slices], "source": "bench_pipeline.generate_ct"},
        "threads": args.threads,
        "models": {name: str(path) for name, path in (("old", args.old), ("new", args.new))},
        "runs": runs,
        "median_cpu_s": median,
        "median_wall_s": {name: statistics.median(r["wall_s"] for r in rs) for name, rs in runs.items()},
        "ratio_new_over_old": round(median["new"] / median["old"], 3),
        "goal": "new <= 5 s of CPU per case",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "loadavg": os.getloadavg()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"median CPU s: old {median['old']:.2f}, new {median['new']:.2f} (x{record['ratio_new_over_old']}); "
          f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
