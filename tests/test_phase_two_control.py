"""benchmarks/phase_two_control.sh (issue 26, item 4): its two arms must be weights/train.sh's phase two with and
without --without-pseudo-labels and nothing else changed, or student - control measures something else."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _calls(script: str, tmp_path: Path, *args: str) -> list[list[str]]:
    """The script run with every `python` a stub that logs its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / f"{Path(script).stem}.log"
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$@" >> {log}\ncat > /dev/null\n')
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["sh", str(REPO / script), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [line.split() for line in log.read_text().splitlines()]


def _options(argv: list[str]) -> dict[str, str | None]:
    out, key = {}, None
    for arg in argv[2:]:
        if arg.startswith("--"):
            key = arg
            out[key] = None
        elif key is not None:
            out[key] = arg
    return out


def test_the_arms_are_train_sh_phase_two_with_and_without_pseudo_labels(tmp_path):
    """The control arm is train.sh's phase two exactly (same folder, so a finished run is reused); the method's arm
    differs from it only by using the pseudo-labels, and has a folder of its own."""
    run = tmp_path / "run"
    shipped = next(c for c in _calls("weights/train.sh", tmp_path, str(run)) if c[1] == "training.student")
    calls = _calls("benchmarks/phase_two_control.sh", tmp_path, str(run), str(tmp_path / "results"))
    control, student = (_options(c) for c in calls if c[1] == "training.student")
    assert control == _options(shipped) and "--without-pseudo-labels" in control
    assert student.pop("--out") == f"{run}/pseudo_student" and control.pop("--out") == f"{run}/student"
    control.pop("--without-pseudo-labels")
    assert student == control
    scored = [c[c.index("--model") + 1] for c in calls if "benchmarks/real_ct.py" in c]
    assert scored == [f"{run}/teacher/fold_0/teacher.onnx", f"{run}/pseudo_student/student.onnx",
                      f"{run}/student/control.onnx"]  # fmt: skip
