"""The training CLIs as a user meets them: one line without the `train` extra, full option names in --help.

    pytest tests/test_cli_training.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A sitecustomize that makes torch unimportable, as in an environment installed without the `train` extra.
NO_TORCH = """
import sys

class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoTorch())
"""


def _run_without_torch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(NO_TORCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "training.teacher", "--help"],
        ["-m", "training.student", "--help"],
        ["-m", "training.pseudo", "--help"],
        ["-m", "training.export", "--help"],
        ["-m", "training.reproduce", "--out", "run", "--quick"],  # its --help needs no torch; its work does
    ],
    ids=lambda argv: argv[1],
)
def test_training_clis_without_torch_say_in_one_line_which_extra_to_install(tmp_path, argv):
    proc = _run_without_torch(tmp_path, *argv)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "'torch' is not installed" in line and 'pip install -r requirements-ci.txt -e ".[cpu,train]"' in line
    assert not (tmp_path / "run").exists()  # reproduce: refused before any work


def test_the_phantom_generator_needs_no_torch(tmp_path):
    proc = _run_without_torch(tmp_path, "-m", "training.phantoms", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--labelled" in proc.stdout


def test_a_missing_torch_submodule_of_an_installed_torch_keeps_its_traceback():
    from training.cli import missing_extra_message

    assert missing_extra_message(ModuleNotFoundError("No module named 'torch._nope'", name="torch._nope")) is None
    assert missing_extra_message(ModuleNotFoundError("No module named 'yaml'", name="yaml")) is None


def _cli_apps():
    import training.export
    import training.reproduce
    import training.student
    import training.teacher

    return {"teacher": training.teacher.app, "student": training.student.app, "export": training.export.app,
            "reproduce": training.reproduce.app}  # fmt: skip


@pytest.mark.parametrize("name", ["teacher", "student", "export", "reproduce"])
def test_help_at_80_columns_shows_every_option_name_in_full(name):
    import typer
    from typer.testing import CliRunner

    app = _cli_apps()[name]
    names = [o for p in typer.main.get_command(app).params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")]
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    assert len(names) > 3
    for option in names:
        assert option in result.output.split(), f"{option} not shown whole in {name} --help:\n{result.output}"
    assert max(len(line) for line in result.output.splitlines()) <= 80


def test_train_sh_writes_the_exported_weights_where_its_second_argument_says(tmp_path):
    """weights/train.sh with every `python` replaced by a stub that logs its arguments: nothing goes to weights/."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$@" >> {log}\ncat > /dev/null\n')  # stdin: the heredoc
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    run_dir, weights = tmp_path / "run", tmp_path / "w"
    proc = subprocess.run(["sh", str(ROOT / "weights" / "train.sh"), str(run_dir), str(weights)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert [c.split()[1] for c in calls[:7]] == ["training.phantoms"] * 3 + [
        "training.teacher", "training.student", "training.export", "flare_infer"]  # fmt: skip
    assert calls[5].split()[2:4] == [f"{run_dir}/student/best.pt", f"{weights}/student.onnx"]
    assert f"--model {weights}/student.onnx" in calls[6]
    sidecars = [f"{weights}/student.json", f"{weights}/student.fp16.json"]
    assert calls[-1].split()[1:] == [f"{run_dir}/examples.csv", *sidecars]  # the examples/ scores go into both
    assert "weights/student" not in log.read_text()


def test_phantoms_help_lists_the_size_and_layout_choices_and_refuses_others(tmp_path):
    import typer
    from typer.testing import CliRunner

    from training.phantoms import main

    app = typer.Typer()
    app.command()(main)
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    assert "small|full" in result.output and "flare22|examples" in result.output
    refused = CliRunner().invoke(app, [str(tmp_path / "out"), "--size", "medium"])
    assert refused.exit_code == 2 and "medium" in refused.output
    assert not (tmp_path / "out").exists()
