"""What a fresh `python -m flare_infer ...` pays before any voxel: imports, CLI parsing, session creation.

    python benchmarks/bench_startup.py [--repeats 7] [--out docs/results/bench_startup.json]

Each snippet runs in a fresh interpreter (`python -c`), `--repeats` times, the snippets in turn; the
child's CPU seconds (user + system, from `RUSAGE_CHILDREN`) and wall seconds are recorded, medians
reported, and each snippet's cost is its median minus the `numpy + SimpleITK` one (what every
variant needs). The session snippet imports onnxruntime and opens the shipped model on the CPU
(`flare_infer.session.load_model`). CPU seconds are the figure to read on a shared machine: wall time
there also counts the time other processes held the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_record  # noqa: E402

TYPER_PARSE = """
import typer
app = typer.Typer()
@app.command()
def predict(a: str, b: int = typer.Option(1), c: str = typer.Option("x"), d: bool = typer.Option(False)):
    pass
app(["x"], standalone_mode=False)
"""
ARGPARSE_PARSE = """
import argparse
p = argparse.ArgumentParser()
p.add_argument("a"); p.add_argument("--b", type=int, default=1); p.add_argument("--c", default="x")
p.add_argument("--d", action=argparse.BooleanOptionalAction, default=False)
p.parse_args(["x"])
"""
SNIPPETS = {
    "python alone": "pass",
    "numpy + SimpleITK": "import numpy, SimpleITK",
    "+ typer app, 4 options parsed": "import numpy, SimpleITK\n" + TYPER_PARSE,
    "+ argparse, 4 options parsed": "import numpy, SimpleITK\n" + ARGPARSE_PARSE,
    "+ onnxruntime": "import numpy, SimpleITK, onnxruntime",
    "+ scipy.ndimage": "import numpy, SimpleITK, scipy.ndimage",
    "+ scipy.spatial": "import numpy, SimpleITK, scipy.spatial",
    "+ flare_infer.pipeline": "import numpy, SimpleITK, flare_infer.pipeline",
    "+ onnxruntime session of weights/student.onnx": (
        "import numpy, SimpleITK\nfrom flare_infer.session import load_model\n"
        f"load_model({str(REPO / 'weights/student.onnx')!r}, device='cpu')"
    ),
    "flare_infer.__main__ (the CLI module)": "import flare_infer.__main__",
    "flare_infer.evaluate": "import flare_infer.evaluate",
}


def child(code: str) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=REPO / "docs/results/bench_startup.json")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    raw = {name: {"cpu_s": [], "wall_s": []} for name in SNIPPETS}
    for _ in range(args.repeats):
        for name, code in SNIPPETS.items():
            cpu, wall = child(code)
            raw[name]["cpu_s"].append(round(cpu, 4))
            raw[name]["wall_s"].append(round(wall, 4))
    median = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in raw.items()}
    base = median["numpy + SimpleITK"]["cpu_s"]
    extra = {name: round(m["cpu_s"] - base, 3) for name, m in median.items() if name.startswith("+")}
    result = {
        "snippets": SNIPPETS,
        "raw": raw,
        "median": median,
        "cpu_s_over_numpy_simpleitk": extra,
        "machine": machine_record(load_before),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, m in median.items():
        more = f"(+{extra[name]:.3f})" if name in extra else ""
        print(f"{name:40} CPU {m['cpu_s']:.3f} s  wall {m['wall_s']:.3f} s  {more}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
