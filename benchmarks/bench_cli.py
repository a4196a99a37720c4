"""The whole `python -m flare_infer predict` command against the floor: a SimpleITK read + uint8 write.

    python benchmarks/bench_cli.py [--slices 200] [--repeats 5] [--cases 3] [--out docs/results/bench_cli.json]

Input: the generated int16 CT of benchmarks/bench_pipeline.py (512 x 512 x SLICES, 0.8 x 0.8 x 2.5 mm,
RAS header) in a folder; the model: the near-free threshold stand-in ONNX (tests/onnx_standin.py), so
what is timed is everything but a real network: interpreter start, imports, session creation, read,
preprocess, the stand-in's inference, restore, write. Each repeat runs, in turn, in fresh processes
of this process tree:
- `floor`: `python -c` that imports SimpleITK, reads the CT and writes our mask (from a warm-up run,
  loaded from RAM) compressed as uint8 on the same grid; its process wall time, and inside it the
  read + write time alone (`floor_io`, the issue's 0.5 s figure);
- `ours`: `python -m flare_infer predict IN OUT --model standin.onnx --device cpu`, wall time, with
  the stage seconds it logs.
Ratios per repeat (ours / floor process, ours / floor read + write of the same repeat) and their
medians. Then, with `--cases N > 1`, a folder of N copies of the CT: `--read-ahead` against
`--no-read-ahead`, alternating (the next case is read while the current one runs). CPU seconds of
each child (user + system) are recorded too: on a shared machine they move less than wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(Path(__file__).resolve().parent)]
from bench_pipeline import generate_ct  # noqa: E402
from machine import machine_record  # noqa: E402
from onnx_standin import make_standin_model  # noqa: E402

FLOOR = """
import sys, time
t0 = time.perf_counter()
import SimpleITK as sitk
ct, mask_nii, out = sys.argv[1:4]
t1 = time.perf_counter()
image = sitk.ReadImage(ct)
t2 = time.perf_counter()
mask = sitk.ReadImage(mask_nii)  # our mask, uncompressed in RAM: not timed as floor I/O
mask.CopyInformation(image)
t3 = time.perf_counter()
sitk.WriteImage(mask, out, useCompression=True)
t4 = time.perf_counter()
print(f"floor_io {t2 - t1 + t4 - t3:.4f} read {t2 - t1:.4f} write {t4 - t3:.4f} import {t1 - t0:.4f}")
"""
STAGE_LINE = re.compile(r"-> \S+: (read [\d.]+s .*?) \[")


def run_child(cmd: list[str]) -> dict:
    """Wall and CPU seconds of one child process, its stdout and stderr; raises if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} exited {proc.returncode}: {proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 4), "cpu_s": round(cpu, 4), "stdout": proc.stdout, "stderr": proc.stderr}


def ours_cmd(inputs: Path, outputs: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flare_infer", "predict", str(inputs), str(outputs), "--model", str(model),
            "--device", "cpu", *extra]  # fmt: skip


def stages(stderr: str) -> list[dict]:
    return [
        {k: float(v.rstrip("s")) for k, v in zip(m.split()[::2], m.split()[1::2], strict=True)}
        for m in STAGE_LINE.findall(stderr)
    ]


def single_case(work: Path, model: Path, repeats: int) -> dict:
    inputs, outputs = work / "in", work / "out"
    ct = inputs / "ct_0000.nii.gz"
    run_child(ours_cmd(inputs, outputs, model))  # warm-up (file cache), and the mask the floor writes
    mask_nii = (
        Path(tempfile.gettempdir() if not Path("/dev/shm").is_dir() else "/dev/shm") / f"bench_cli_{os.getpid()}.nii"
    )
    sitk.WriteImage(sitk.ReadImage(str(outputs / "ct.nii.gz")), str(mask_nii), useCompression=False)
    rows = []
    try:
        for _ in range(repeats):
            floor = run_child([sys.executable, "-c", FLOOR, str(ct), str(mask_nii), str(work / "floor.nii.gz")])
            ours = run_child(ours_cmd(inputs, outputs, model))
            io_times = dict(zip(floor["stdout"].split()[::2], map(float, floor["stdout"].split()[1::2]), strict=True))
            rows.append({
                "floor_process_wall_s": floor["wall_s"], "floor_process_cpu_s": floor["cpu_s"], "floor": io_times,
                "ours_wall_s": ours["wall_s"], "ours_cpu_s": ours["cpu_s"], "ours_stages_s": stages(ours["stderr"])[0],
                "ratio_vs_floor_process": round(ours["wall_s"] / floor["wall_s"], 3),
                "ratio_vs_floor_read_write": round(ours["wall_s"] / io_times["floor_io"], 3),
            })  # fmt: skip
    finally:
        mask_nii.unlink(missing_ok=True)
    med = statistics.median
    return {
        "repeats": rows,
        "median": {
            "floor_process_wall_s": med(r["floor_process_wall_s"] for r in rows),
            "floor_read_write_s": med(r["floor"]["floor_io"] for r in rows),
            "ours_wall_s": med(r["ours_wall_s"] for r in rows),
            "ratio_vs_floor_process": med(r["ratio_vs_floor_process"] for r in rows),
            "ratio_vs_floor_read_write": med(r["ratio_vs_floor_read_write"] for r in rows),
        },
    }


def many_cases(work: Path, model: Path, cases: int, repeats: int) -> dict:
    inputs = work / "many"
    inputs.mkdir()
    for i in range(cases):
        shutil.copy(work / "in" / "ct_0000.nii.gz", inputs / f"case{i}_0000.nii.gz")
    runs = {"read_ahead": [], "no_read_ahead": []}
    for _ in range(repeats):
        for name, flag in (("read_ahead", "--read-ahead"), ("no_read_ahead", "--no-read-ahead")):
            child = run_child(ours_cmd(inputs, work / f"out_{name}", model, flag))
            runs[name].append({"wall_s": child["wall_s"], "cpu_s": child["cpu_s"], "stages_s": stages(child["stderr"])})
    med = {name: statistics.median(r["wall_s"] for r in rows) for name, rows in runs.items()}
    return {
        "cases": cases,
        "runs": runs,
        "median_wall_s": med,
        "ratio": round(med["read_ahead"] / med["no_read_ahead"], 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", type=int, default=3, help="folder size for the read-ahead comparison (1: skip)")
    parser.add_argument("--out", type=Path, default=REPO / "docs/results/bench_cli.json")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_cli_") as tmp:
        work = Path(tmp)
        (work / "in").mkdir()
        sitk.WriteImage(generate_ct(args.slices), str(work / "in" / "ct_0000.nii.gz"), useCompression=True)
        model = make_standin_model(work / "model")
        result = {"single_case": single_case(work, model, args.repeats)}
        if args.cases > 1:
            result["read_ahead"] = many_cases(work, model, args.cases, max(1, args.repeats // 2))
    result["settings"] = {"slices": args.slices, "repeats": args.repeats, "model": "tests/onnx_standin.py stand-in"}
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    result["machine"] = machine_record(
        load_before, simpleitk=sitk.Version.VersionString(), commit=commit.stdout.strip()
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    m = result["single_case"]["median"]
    print(f"floor process {m['floor_process_wall_s']:.2f} s (read + write {m['floor_read_write_s']:.2f} s), "
          f"ours {m['ours_wall_s']:.2f} s; median ratio {m['ratio_vs_floor_process']:.2f} vs the floor process, "
          f"{m['ratio_vs_floor_read_write']:.2f} vs its read + write")  # fmt: skip
    if "read_ahead" in result:
        r = result["read_ahead"]
        print(f"{r['cases']} cases: read-ahead {r['median_wall_s']['read_ahead']:.2f} s, "
              f"without {r['median_wall_s']['no_read_ahead']:.2f} s (ratio {r['ratio']:.2f})")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
