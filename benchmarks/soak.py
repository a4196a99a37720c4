"""Soak: `python -m flare_infer predict` on many cases of mixed sizes in ONE process; its memory after every case.

    nice -n 10 python benchmarks/soak.py --cases 200 --out docs/results/soak.json
    python benchmarks/soak.py --cases 12 --sizes 128x20,192x40 --out /tmp/soak_small.json   # a quick try
    nice -n 10 python benchmarks/soak.py --cases 6 --sizes 512x400 --repeats 1 --extra=--no-read-ahead \
        --out docs/results/soak_largest_no_read_ahead.json    # what the read-ahead adds to the peak

Inputs: a handful of distinct CTs from bench_pipeline's generator (body, organs, bone, scanner noise; int16,
0.8 x 0.8 x 2.5 mm, RAS header), one per size of `--sizes` (IN-PLANE x SLICES, up to 512 x 512 x 400), each with
its own seed; the `--cases` names (case_NNN_0000.nii.gz) are symlinks to them, in a seeded shuffled order so that
small and large cases alternate. The model: the near-free threshold stand-in ONNX (tests/onnx_standin.py), as in
bench_cli.py, so what runs is everything but a real network.

Measured, all from outside the process (it is not changed for this):
- the soak: one `predict` over all names (default read-ahead on). A thread reads its log as it comes; at each
  case's line (`NAME -> OUT: read ..s preprocess ..s ... [provider]`) the process's VmRSS is read from
  /proc/PID/status: the RSS after every case. Another thread samples VmRSS and VmHWM every 0.05 s (the curve;
  the run's peak is the largest VmHWM, see run_watched).
- single runs: each distinct CT alone in a fresh `predict` process (`--repeats` times, alternating with the
  others, after one uncounted warm-up run): its peak RSS (VmHWM, as above) and its per-case seconds (the sum of
  the logged stages).
- per case: the soak's stage sum against the median single-run stage sum of the same CT (ratio, over 1.2 flagged);
  every soak mask against the single run's mask of its CT (file bytes, else voxels).
Goals (issue 29): soak peak RSS <= 1.2 x the largest single case's peak; no case more than 20 % slower than its
single run; every mask identical. Written to `--out` with the machine's record; the verdict printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(Path(__file__).resolve().parent)]
from bench_pipeline import generate_ct  # noqa: E402
from machine import machine_record  # noqa: E402
from onnx_standin import make_standin_model  # noqa: E402

CASE_LINE = re.compile(r"^(?P<name>\S+) -> (?P<out>\S+): (?P<stages>read [\d.]+s .*?) \[")
STAGE = re.compile(r"(\w+) ([\d.]+)s")
DEFAULT_SIZES = "128x40,256x60,256x150,384x100,384x250,512x80,512x200,512x400"


def vm_kib(pid: int, field: str = "VmRSS") -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def write_inputs(sizes: list[tuple[int, int]], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (size, slices) in enumerate(sizes):
        path = folder / f"ct_{size}x{size}x{slices}.nii.gz"
        if not path.is_file():
            sitk.WriteImage(generate_ct(slices, size=size, seed=100 + i), str(path), useCompression=True)
        paths.append(path)
    return paths


EXTRA: list[str] = []  # --extra: more predict options, for the soak and the single runs alike


def predict_cmd(inputs: Path, outputs: Path, model: Path) -> list[str]:
    return [sys.executable, "-m", "flare_infer", "predict", str(inputs), str(outputs), "--model", str(model),
            "--device", "cpu", *EXTRA]  # fmt: skip


def run_watched(cmd: list[str], sample_s: float = 0.05) -> dict:
    """Run `cmd`; per case line: name, stage seconds, VmRSS (KiB) then; the RSS curve; the peak; the exit code.

    The peak is the process's VmHWM (/proc/PID/status: its high-water RSS since its exec), read every `sample_s`
    and once more when its log closes; monotonic, so only a rise in its last moments could be missed. Not the
    kernel's ru_maxrss from wait4: that one also counts the RSS of the process that started it (fork and exec
    carry the parent's high-water mark over), here this script's hundreds of MB after writing the CTs."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    cases, curve, log, t0, done = [], [], [], time.perf_counter(), threading.Event()

    hwm = [0]

    def sample() -> None:
        while not done.is_set():
            rss, peak = vm_kib(proc.pid), vm_kib(proc.pid, "VmHWM")
            if rss is not None:
                curve.append((round(time.perf_counter() - t0, 2), rss))
                hwm[0] = max(hwm[0], peak or 0)
            done.wait(sample_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in proc.stderr:
        log.append(line)
        m = CASE_LINE.match(line)
        if m:
            stages = {k: float(v) for k, v in STAGE.findall(m["stages"])}
            cases.append({"name": m["name"], "out": m["out"], "t_s": round(time.perf_counter() - t0, 3),
                          "stages_s": stages, "case_s": round(sum(stages.values()), 4),
                          "rss_after_kib": vm_kib(proc.pid)})  # fmt: skip
    hwm[0] = max(hwm[0], vm_kib(proc.pid, "VmHWM") or 0)  # its stderr is closed: it is exiting
    proc.wait()
    done.set()
    sampler.join()
    return {"cases": cases, "curve": curve, "maxrss_kib": hwm[0], "returncode": proc.returncode,
            "wall_s": round(time.perf_counter() - t0, 2), "log_tail": "".join(log[-20:])}  # fmt: skip


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same_voxels(a: Path, b: Path) -> bool:
    x, y = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
    return x.GetSize() == y.GetSize() and bool((sitk.GetArrayViewFromImage(x) == sitk.GetArrayViewFromImage(y)).all())


def single_runs(distinct: list[Path], model: Path, work: Path, repeats: int) -> dict[str, dict]:
    """Each CT alone in a fresh process, `repeats` rounds over all of them (alternating): peaks, seconds, mask."""
    out: dict[str, dict] = {p.name: {"peak_kib": [], "case_s": []} for p in distinct}
    warm = work / "warm_up_in"  # the first process after writing pays cold imports and page cache: not counted
    warm.mkdir(exist_ok=True)
    if not (warm / "case_0000.nii.gz").exists():
        (warm / "case_0000.nii.gz").symlink_to(distinct[0])
    run_watched(predict_cmd(warm, work / "warm_up_out", model))
    for r in range(repeats):
        for p in distinct:
            inputs, outputs = work / f"single_in_{p.stem}", work / f"single_out_{p.stem}_{r}"
            inputs.mkdir(exist_ok=True)
            link = inputs / "case_0000.nii.gz"
            if not link.exists():
                link.symlink_to(p)
            run = run_watched(predict_cmd(inputs, outputs, model))
            if run["returncode"] != 0 or len(run["cases"]) != 1:
                raise RuntimeError(f"single run of {p.name} failed: {run['log_tail']}")
            out[p.name]["peak_kib"].append(run["maxrss_kib"])
            out[p.name]["case_s"].append(run["cases"][0]["case_s"])
            out[p.name]["mask"] = outputs / "case.nii.gz"
            print(f"single {p.name} #{r}: {run['cases'][0]['case_s']:.2f} s, peak {run['maxrss_kib'] >> 10} MB",
                  flush=True)  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help="IN-PLANExSLICES,... one distinct CT each")
    ap.add_argument("--repeats", type=int, default=2, help="single runs of each distinct CT")
    ap.add_argument("--work", type=Path, help="work folder (default: a temporary one; the CTs are kept there)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--extra", default="", help="more predict options, e.g. --extra=--no-read-ahead")
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile (recorded with the load)")
    args = ap.parse_args()
    EXTRA[:] = args.extra.split()
    load_before = os.getloadavg()[0]
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="soak_"))
    distinct = write_inputs(sizes, work / "distinct")
    model = make_standin_model(work / "model")
    order = [distinct[i % len(distinct)] for i in range(args.cases)]
    random.Random(0).shuffle(order)
    soak_in = work / "soak_in"
    soak_in.mkdir(exist_ok=True)
    for i, p in enumerate(order):
        link = soak_in / f"case_{i:03d}_0000.nii.gz"
        if not link.exists():
            link.symlink_to(p)

    singles = single_runs(distinct, model, work, args.repeats)
    print(f"soak: {args.cases} cases in one process ...", flush=True)
    soak = run_watched(predict_cmd(soak_in, work / "soak_out", model))
    if soak["returncode"] != 0 or len(soak["cases"]) != args.cases:
        raise RuntimeError(f"soak exited {soak['returncode']} with {len(soak['cases'])} cases: {soak['log_tail']}")

    by_name = {f"case_{i:03d}_0000.nii.gz": p.name for i, p in enumerate(order)}
    single_s = {k: statistics.median(v["case_s"]) for k, v in singles.items()}
    ref_sha = {k: file_sha(v["mask"]) for k, v in singles.items()}
    for c in soak["cases"]:
        ct = by_name[c["name"]]
        c["ct"], c["ratio_to_single"] = ct, round(c["case_s"] / single_s[ct], 3)
        out = work / "soak_out" / c["out"]
        c["mask_identical"] = file_sha(out) == ref_sha[ct] or same_voxels(out, singles[ct]["mask"])
    largest = max(max(v["peak_kib"]) for v in singles.values())
    ratios = [c["ratio_to_single"] for c in soak["cases"]]
    result = {
        "what": "python -m flare_infer predict over all cases in one process (predict_options), near-free stand-in "
                "ONNX, --device cpu; single runs: each distinct CT alone in a fresh process",
        "cases": args.cases, "predict_options": ["--device", "cpu", *EXTRA],
        "distinct_cts": {p.name: list(s) for p, s in zip(distinct, sizes, strict=True)},
        "inputs": "symlinks to the distinct CTs (bench_pipeline.generate_ct, int16, 0.8 x 0.8 x 2.5 mm), shuffled "
                  "with seed 0",
        "soak": {"wall_s": soak["wall_s"], "peak_rss_mb": round(soak["maxrss_kib"] / 1024, 1),
                 "rss_after_each_case_mb": [round(c["rss_after_kib"] / 1024, 1) for c in soak["cases"]],
                 "cases": soak["cases"], "rss_curve_s_kib": soak["curve"][::5]},
        "single": {k: {"peak_rss_mb": [round(x / 1024, 1) for x in v["peak_kib"]], "case_s": v["case_s"]}
                   for k, v in singles.items()},
        "per_ct_median_ratio": {k: round(statistics.median(c["ratio_to_single"] for c in soak["cases"]
                                                           if c["ct"] == k), 3) for k in singles},
        "goals": {
            "peak_ratio": round(soak["maxrss_kib"] / largest, 3),
            "peak_within_1.2x_largest_single": soak["maxrss_kib"] <= 1.2 * largest,
            "cases_over_1.2x_single_time": sum(r > 1.2 for r in ratios),
            "max_time_ratio": max(ratios), "median_time_ratio": statistics.median(ratios),
            "no_case_over_1.2x_single_time": all(r <= 1.2 for r in ratios),
            "masks_identical": all(c["mask_identical"] for c in soak["cases"]),
        },
        "machine": machine_record(load_before, note=args.note),
    }  # fmt: skip
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["goals"], indent=1))
    print(f"peak {result['soak']['peak_rss_mb']} MB; largest single {largest / 1024:.1f} MB; written {args.out}")


if __name__ == "__main__":
    main()
