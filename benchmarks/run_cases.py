"""The organisers' efficiency harness: one run of the predictor per case, profiled, then a table.

    python benchmarks/run_cases.py CASES_DIR --out RESULTS_DIR [--command TEMPLATE] [--interval 0.1]
                                   [--timeout 3600] [--plots]

For every `*.nii.gz` in CASES_DIR, as FLARE22's resource_eval.py + Efficiency.py + load_json.py did:
a fresh, empty input folder gets that single case; the command runs once under
`flare_infer.profile` (GPU memory, CPU, RAM sampled every 0.1 s); its JSON goes to
RESULTS_DIR/profiles/NAME.json. Predictions accumulate in RESULTS_DIR/outputs.
TEMPLATE is formatted with {input} and {output} (absolute folders) and {name} (the case file):
- local:     "sh predict.sh {input} {output}"   (default)
- container: "docker run --rm --gpus all -v {input}:/workspace/inputs -v {output}:/workspace/outputs
              flare-ts:latest /bin/sh -c 'sh predict.sh'"   (podman: the same with podman)
It is split like a shell line (shlex) and run without a shell.
Writes RESULTS_DIR/efficiency.csv with the organisers' columns (Name, Time, GPU_Mem, AUC_GPU_Time,
CPU_Utilization, AUC_CPU_Time, RAM, AUC_RAM_Time) plus ExitCode and Output (1 when the expected
mask was written), a last row "mean", and prints the means. A case past --timeout is killed and
scored 3600 s, as the organisers scored a hung case.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np

from flare_infer.io import list_cases, output_name
from flare_infer.profile import ProfileResult, plot, profile_command

DEFAULT_COMMAND = "sh predict.sh {input} {output}"
HUNG_CASE_TIME_S = 3600.0  # organisers' score for a case that does not finish
COLUMNS = (
    "Name", "Time", "GPU_Mem", "AUC_GPU_Time", "CPU_Utilization", "AUC_CPU_Time", "RAM", "AUC_RAM_Time",
    "ExitCode", "Output",
)  # fmt: skip


def fresh_input(input_dir: Path, case: Path) -> None:
    """An input folder holding exactly this case (the organisers refused to run with a leftover)."""
    if input_dir.exists():
        shutil.rmtree(input_dir)
    input_dir.mkdir(parents=True)
    shutil.copy2(case, input_dir / case.name)


def case_row(name: str, result: ProfileResult, output_written: bool) -> dict[str, object]:
    """One CSV row, rounded as load_json.py rounded; GPU columns empty without a GPU."""
    interval = result.interval_s
    gpu = result.samples_gpu_mb
    time_s = HUNG_CASE_TIME_S if result.timed_out else result.wall_time_s
    return {
        "Name": name,
        "Time": round(time_s, 2),
        "GPU_Mem": "" if gpu is None else round(result.gpu_memory_mb),
        "AUC_GPU_Time": "" if gpu is None else round(sum(gpu) * interval),
        "CPU_Utilization": round(result.max_cpu_percent or 0.0, 2),
        "AUC_CPU_Time": round(result.auc_cpu_percent_s or 0.0, 2),
        "RAM": round(result.max_ram_mb or 0.0, 2),
        "AUC_RAM_Time": round(sum(result.samples_ram_mb) * interval),
        "ExitCode": result.exit_code,
        "Output": int(output_written),
    }


def mean_row(rows: list[dict[str, object]]) -> dict[str, object]:
    means: dict[str, object] = {"Name": "mean"}
    for column in COLUMNS[1:]:
        values = [row[column] for row in rows if row[column] != ""]
        means[column] = round(float(np.mean(values)), 2) if values else ""
    return means


def run_cases(cases_dir: Path, out_dir: Path, template: str, *, interval: float, timeout_s: float, plots: bool):
    cases = list_cases(cases_dir)
    if not cases:
        raise SystemExit(f"no cases (*.nii.gz) in {cases_dir}: expected one CT per file")
    input_dir, output_dir, profile_dir = out_dir / "inputs", out_dir / "outputs", out_dir / "profiles"
    output_dir.mkdir(parents=True, exist_ok=True)
    profile_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in cases:
        fresh_input(input_dir, case)
        command = shlex.split(template.format(input=input_dir.resolve(), output=output_dir.resolve(), name=case.name))
        print(f"{case.name}: {shlex.join(command)}", flush=True)
        result = profile_command(command, interval, timeout_s=timeout_s)
        stem = output_name(case).removesuffix(".nii.gz").removesuffix(".nii")
        result.to_json(profile_dir / f"{stem}.json")
        if plots:
            plot(result, profile_dir / f"{stem}.png")
        rows.append(case_row(case.name, result, (output_dir / output_name(case)).exists()))
        print(f"  {rows[-1]}", flush=True)
    shutil.rmtree(input_dir, ignore_errors=True)
    return rows


def write_table(rows: list[dict[str, object]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows([*rows, mean_row(rows)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="results folder")
    parser.add_argument("--command", default=DEFAULT_COMMAND, help="template with {input}, {output}, {name}")
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--timeout", type=float, default=HUNG_CASE_TIME_S, help="seconds before a case is killed")
    parser.add_argument("--plots", action="store_true", help="a PNG of memory and CPU over time per case")
    args = parser.parse_args()
    rows = run_cases(
        args.cases_dir, args.out, args.command, interval=args.interval, timeout_s=args.timeout, plots=args.plots
    )
    write_table(rows, args.out / "efficiency.csv")
    means = mean_row(rows)
    print("means: " + ", ".join(f"{k} {v}" for k, v in means.items() if k != "Name"))
    print(f"table: {args.out / 'efficiency.csv'}")
    failed = [row["Name"] for row in rows if row["ExitCode"] != 0 or not row["Output"]]
    if failed:
        print(f"failed or no output: {', '.join(map(str, failed))}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
