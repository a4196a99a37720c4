"""Wall time of the smoke recipe, `sh weights/train.sh --smoke RUN_DIR`, in a fresh run folder.

    nice -n 5 python benchmarks/smoke.py [--out docs/results/smoke.json] [--repeats N] [--note TEXT]

Runs the recipe N times (default 1), one after another, each in a fresh run folder, from the repository's
root (phantoms -> teacher -> student -> export -> predict -> evaluate), and writes per run: the whole wall
time; the seconds at which each step ended, from the recipe's own `smoke [N s] STEP -> WHERE` lines; the
1-minute load average before and after and the processes busy before it (other work on the machine); the
tracked files under weights/, examples/ and docs/images/ that changed while it ran (expected: none). Then the
slowest run against the goal (issue 28: under 3 minutes on 2 cores), the cores, the git commit and the
command. Exits with the first failing run's status.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL_S = 180.0
WATCHED = ("weights", "examples", "docs/images")  # tracked files a careless default would overwrite


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def _tracked_mtimes() -> dict[str, float]:
    return {name: (REPO / name).stat().st_mtime for name in _git("ls-files", *WATCHED).splitlines()
            if (REPO / name).exists()}  # fmt: skip


def busy_processes(min_cpu: float = 10.0) -> list[str]:
    """Other work on the machine just before a run: `CPU% program` of each process above min_cpu % (ps's
    lifetime average), the command cut to its first three words (no paths)."""
    try:
        rows = subprocess.run(["ps", "-eo", "pcpu=,args=", "--sort=-pcpu"], capture_output=True, text=True).stdout
    except OSError:
        return []
    busy = []
    for row in rows.splitlines():
        cpu, _, args = row.strip().partition(" ")
        if float(cpu) >= min_cpu and "benchmarks/smoke.py" not in args:
            busy.append(f"{cpu} % {' '.join(args.split()[:3])}")
    return busy


def run_once(run_dir: Path) -> tuple[dict, subprocess.CompletedProcess]:
    """One run of the recipe in `run_dir` (which must not exist): its record and the process."""
    command = ["sh", "weights/train.sh", "--smoke", str(run_dir)]
    before, load_before, busy = _tracked_mtimes(), os.getloadavg()[0], busy_processes()
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    changed = sorted(name for name, mtime in _tracked_mtimes().items() if before.get(name) != mtime)
    steps = {m.group(2): int(m.group(1)) for m in re.finditer(r"^smoke \[(\d+) s\] (\w+) -> ", proc.stdout, re.M)}
    record = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "exit_code": proc.returncode,
        "wall_s": round(wall, 1),
        "step_end_s": steps,
        "load_1min_before": round(load_before, 2),
        "busy_before": busy,
        "load_1min_after": round(os.getloadavg()[0], 2),
        "tracked_files_changed": changed,
        "outputs": [line.replace(str(run_dir), "RUN_DIR") for line in proc.stdout.splitlines()
                    if line.startswith("smoke [")],
    }  # fmt: skip
    return record, proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "smoke.json", help="result JSON")
    parser.add_argument("--repeats", type=int, default=1, help="runs, one after another, each in a fresh folder")
    parser.add_argument("--note", default="", help="recorded as is (what else ran on the machine)")
    args = parser.parse_args()
    runs = []
    for _ in range(max(1, args.repeats)):
        folder = Path(tempfile.mkdtemp(prefix="smoke-"))
        record, proc = run_once(folder / "run")
        shutil.rmtree(folder, ignore_errors=True)  # ours: a fresh folder per run, nothing kept
        runs.append(record)
        print(json.dumps({k: record[k] for k in ("exit_code", "wall_s", "step_end_s", "load_1min_before")}))
        if proc.returncode:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
            break
    slowest = max(r["wall_s"] for r in runs)
    failed = next((r["exit_code"] for r in runs if r["exit_code"]), 0)
    result = {
        "what": "sh weights/train.sh --smoke RUN_DIR: phantoms -> teacher -> student -> export -> predict -> evaluate",
        "command": shlex.join(["python", "benchmarks/smoke.py", *sys.argv[1:]]),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "cpu_cores": os.cpu_count(),
        "niceness": os.nice(0),
        "goal_s": GOAL_S,
        "slowest_wall_s": slowest,
        "under_goal": failed == 0 and slowest < GOAL_S,
        "note": args.note,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return failed


if __name__ == "__main__":
    sys.exit(main())
