"""Wall time of the smoke recipe, `sh weights/train.sh --smoke RUN_DIR`, in a fresh run folder.

    nice -n 5 python benchmarks/smoke.py [--out docs/results/smoke.json] [--run-dir DIR] [--note TEXT]

Runs the recipe once from the repository's root (phantoms -> teacher -> student -> export -> predict ->
evaluate), and writes: the whole wall time; the seconds at which each step ended, from the recipe's own
`smoke [N s] STEP -> WHERE` lines; the machine's cores and 1-minute load average before and after (another
process busy on the machine shows there); the tracked files under weights/, examples/ and docs/images/ that
changed while it ran (expected: none); the git commit and the command. Exits with the recipe's status.
The goal (issue 28): under 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "smoke.json", help="result JSON")
    parser.add_argument("--run-dir", type=Path, help="the recipe's RUN_DIR (default: a fresh temporary folder)")
    parser.add_argument("--note", default="", help="recorded as is (what else ran on the machine)")
    args = parser.parse_args()
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="smoke-")) / "run"
    if run_dir.exists():
        parser.error(f"--run-dir {run_dir} exists: the measurement needs a fresh folder")
    command = ["sh", "weights/train.sh", "--smoke", str(run_dir)]
    before, load_before = _tracked_mtimes(), os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    changed = sorted(name for name, mtime in _tracked_mtimes().items() if before.get(name) != mtime)
    steps = {m.group(2): int(m.group(1)) for m in re.finditer(r"^smoke \[(\d+) s\] (\w+) -> ", proc.stdout, re.M)}
    result = {
        "what": "sh weights/train.sh --smoke RUN_DIR: phantoms -> teacher -> student -> export -> predict -> evaluate",
        "command": " ".join(["python", "benchmarks/smoke.py", *sys.argv[1:]]),
        "recipe": " ".join(command[:3] + ["RUN_DIR"]),
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "exit_code": proc.returncode,
        "wall_s": round(wall, 1),
        "goal_s": GOAL_S,
        "under_goal": proc.returncode == 0 and wall < GOAL_S,
        "step_end_s": steps,
        "cpu_cores": os.cpu_count(),
        "load_1min_before": round(load_before, 2),
        "load_1min_after": round(os.getloadavg()[0], 2),
        "niceness": os.nice(0),
        "tracked_files_changed": changed,
        "note": args.note,
        "outputs": [line for line in proc.stdout.splitlines() if line.startswith("smoke [")],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("exit_code", "wall_s", "step_end_s", "tracked_files_changed")}))
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
