"""A user's first week (issue 28): subcommands and honest --help, one-line errors, no writes into tracked files,
upper-case extensions, the smoke recipe's chain, the CPU torch advice.

    pytest tests/test_first_week.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from onnx_standin import make_standin_model

from flare_infer import io

REPO = Path(__file__).resolve().parents[1]
CT = REPO / "examples" / "inputs" / "FLARE22_Ex_0001_0000.nii.gz"
LABEL = REPO / "examples" / "labels" / "FLARE22_Ex_0001.nii.gz"
OTHER_LABEL = REPO / "examples" / "labels" / "FLARE22_Ex_0002.nii.gz"  # another grid than CT's


def run(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def one_error_line(proc: subprocess.CompletedProcess, code: int) -> str:
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ")
    return line


# ------------------------------------------------------------------------------ subcommands and --help
@pytest.mark.parametrize("tool", ["evaluate", "preview", "profile"])
def test_each_tool_is_a_subcommand_and_keeps_its_module_form(tool):
    sub, module = run("-m", "flare_infer", tool, "--help"), run("-m", f"flare_infer.{tool}", "--help")
    assert sub.returncode == module.returncode == 0, sub.stderr + module.stderr
    assert sub.stdout.startswith(f"usage: python -m flare_infer {tool} ")
    assert module.stdout.startswith(f"usage: python -m flare_infer.{tool} ")
    assert sub.stdout.split("\n", 1)[1].replace(" ", "") == module.stdout.split("\n", 1)[1].replace(" ", "")
    assert tool in run("-m", "flare_infer", "--help").stdout


@pytest.mark.parametrize("command", ["predict", "evaluate", "preview", "profile"])
def test_every_help_shows_defaults_and_choices_without_python_tuples(command):
    import argparse
    import importlib

    from flare_infer.__main__ import build_parser

    proc = run("-m", "flare_infer", command, "--help", env={"COLUMNS": "250"})
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "('" not in text and "{" not in text, text
    if command == "predict":
        parser = build_parser()._subparsers._group_actions[0].choices["predict"]
    else:
        parser = argparse.ArgumentParser()
        importlib.import_module(f"flare_infer.{command}").add_arguments(parser)
    valued = [a for a in parser._actions if a.option_strings and a.default is not None and a.default is not False
              and a.default is not argparse.SUPPRESS]  # fmt: skip
    assert valued or command in ("preview", "evaluate")  # their options default to "not given"
    for action in valued:  # each option with a value by default says it on its help line
        lines = [*text.splitlines(), ""]
        first = action.option_strings[0]
        at = next(i for i, ln in enumerate(lines) if ln.split() and ln.split()[0].rstrip(",") == first)
        block = lines[at] + ("" if lines[at + 1].lstrip().startswith("-") else lines[at + 1])  # help on the next line
        assert "(default: " in block, f"{command}: {block}"
    if command == "predict":
        assert "--device auto|cuda|cpu" in text and "--postprocess none|lcc" in text and "(default: 16)" in text


TRAINING_CLIS = ["phantoms", "fingerprint", "teacher", "pseudo", "student", "export", "reproduce"]


@pytest.mark.parametrize("name", TRAINING_CLIS)
def test_every_training_option_is_described_with_its_default_in_one_plain_style(name):
    import importlib

    import typer

    module = importlib.import_module(f"training.{name}")
    app = getattr(module, "app", None)
    if app is None:  # a plain function that the module's __main__ wraps in training.cli.typer_app()
        app = typer.Typer()
        app.command()(module.main)
    params = typer.main.get_command(app).params
    assert [p.name for p in params if not (getattr(p, "help", None) or "").strip()] == [], name
    proc = run("-m", f"training.{name}", "--help", env={"COLUMNS": "250"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Usage: python -m training.{name} ")  # click's plain help, not rich's boxes
    assert not set("╭│╰") & set(proc.stdout)
    for p in params:
        if p.param_type_name == "option" and p.default is not None and not p.required:
            at = proc.stdout.rindex(f"\n  {p.opts[0]} ")  # its own line, after any mention in the description
            block = " ".join(proc.stdout[at : proc.stdout.find("\n  -", at + 1)].split())  # click wraps at 80
            assert "[default: " in block, (name, p.opts[0], block)


def test_phantoms_without_size_write_the_small_cases_the_docs_recommend(tmp_path):
    proc = run("-m", "training.phantoms", str(tmp_path / "data"), "--labelled", "1", "--unlabelled", "0",
               "--validation", "0")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (image,) = (tmp_path / "data" / "labelled" / "images").iterdir()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(image))
    reader.ReadImageInformation()
    assert max(reader.GetSize()[:2]) <= 160 and min(reader.GetSpacing()[:2]) >= 2.2  # small, not full's 512 x 0.8 mm


# ------------------------------------------------------------------------------ one-line errors
def test_preview_of_an_unreadable_file_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file")
    line = one_error_line(run("-m", "flare_infer", "preview", str(bad), cwd=tmp_path), 2)
    assert str(bad) in line
    assert not (tmp_path / "outputs").exists()


def test_preview_of_a_mask_on_another_grid_is_one_line_naming_the_mask(tmp_path):
    line = one_error_line(run("-m", "flare_infer.preview", str(CT), str(OTHER_LABEL), cwd=tmp_path), 2)
    assert str(OTHER_LABEL) in line and "differs from the image" in line
    debug = run("-m", "flare_infer.preview", str(CT), str(OTHER_LABEL), "--debug", cwd=tmp_path)
    assert debug.returncode == 1 and "Traceback" in debug.stderr  # the traceback on request


def test_profile_without_psutil_is_one_line_saying_what_to_install(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "class _No:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'psutil':\n"
        "            raise ModuleNotFoundError(\"No module named 'psutil'\", name=name)\n"
        "sys.meta_path.insert(0, _No())\n"
    )
    env = {"PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    proc = run("-m", "flare_infer", "profile", "--out", str(tmp_path / "r.json"), "--", "true", env=env)
    line = one_error_line(proc, 2)
    assert "psutil" in line and 'pip install -e ".[profile]"' in line
    assert not (tmp_path / "r.json").exists()


# ------------------------------------------------------------------------------ nothing written into tracked files
def test_preview_without_out_writes_under_outputs_not_beside_its_inputs(tmp_path):
    proc = run("-m", "flare_infer", "preview", str(CT), str(LABEL), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*.png")] == [Path("outputs/previews/FLARE22_Ex_0001.png")]
    assert "outputs/previews/FLARE22_Ex_0001.png" in proc.stdout


def test_the_students_closing_hint_exports_into_its_run_folder_not_onto_the_shipped_weights(tmp_path):
    from training.student import closing_hint

    best = tmp_path / "runs" / "student" / "best.pt"
    hint = closing_hint(best)
    assert "weights/" not in hint.replace(str(tmp_path), "")
    assert f"python -m training.export {best} {best.parent / 'student.onnx'}" in hint


@pytest.mark.parametrize("sizes", ["full", "quick"])
def test_reproduce_writes_its_report_into_the_run_folder_unless_results_is_given(tmp_path, monkeypatch, sizes):
    from typer.testing import CliRunner

    import training.reproduce as reproduce

    seen = []
    monkeypatch.setattr(reproduce, "run", lambda plan, results_md, argv: seen.append(results_md))
    out = tmp_path / "run"
    assert CliRunner().invoke(reproduce.app, ["--out", str(out), "--sizes", sizes]).exit_code == 0
    asked = tmp_path / "docs" / "RESULTS.md"
    assert CliRunner().invoke(reproduce.app, ["--out", str(out), "--results", str(asked)]).exit_code == 0
    assert seen == [out / "RESULTS.md", asked]


def _train_sh(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """weights/train.sh with every `python` a stub that logs its arguments (and the stdin heredoc swallowed)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$@" >> {log}\ncat > /dev/null\n')
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["sh", str(REPO / "weights" / "train.sh"), *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
    return proc, log.read_text().splitlines()


def test_train_sh_without_a_weights_folder_exports_into_its_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    proc, calls = _train_sh(tmp_path, str(run_dir))
    assert proc.returncode == 0, proc.stderr
    export = next(c for c in calls if c.startswith("-m training.export"))
    assert export.split()[2:4] == [f"{run_dir}/student/best.pt", f"{run_dir}/weights/student.onnx"]
    assert not any(re.search(r"(^| )weights/student", c) for c in calls)


def test_the_smoke_recipe_runs_the_whole_chain_at_toy_sizes_under_its_run_folder(tmp_path):
    run_dir = tmp_path / "smoke"
    proc, calls = _train_sh(tmp_path, "--smoke", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    steps = [" ".join(c.split()[:3]) if c.startswith("-m flare_infer ") else " ".join(c.split()[:2]) for c in calls]
    assert steps == ["-m training.phantoms", "-m training.teacher", "-m training.student", "-m training.export",
                     "-m flare_infer predict", "-m flare_infer evaluate"]  # fmt: skip
    teacher, student = calls[1].split(), calls[2].split()
    for argv in (teacher, student):  # the sizes that make it minutes, not the 20 of the paper's defaults
        assert argv[argv.index("--epochs") + 1] == "1" and argv[argv.index("--width") + 1] == "8"
        assert argv[argv.index("--patch-size") + 1] == "64"
    assert teacher[teacher.index("--n-folds") + 1] == "2" and teacher[teacher.index("--spacing") + 1] == "4,4,6"
    # every output under the run folder; inputs only from the repository's examples
    written = [a for c in calls for a in c.split() if "/" in a and not a.startswith(("examples/", str(run_dir)))]
    assert written == [], written
    said = [line for line in proc.stdout.splitlines() if line.startswith("smoke [")]
    for step in ("phantoms", "teacher", "student", "export", "predict", "evaluate"):
        assert any(f"{step} -> {run_dir}" in line for line in said), (step, said)


def test_no_document_names_a_path_of_the_machine_it_was_written_on():
    docs = [REPO / "README.md", *sorted(REPO.glob("docs/*.md")), *sorted(REPO.glob("*/README.md"))]
    found = {str(doc.relative_to(REPO)): re.findall(r"(?<![\w.])/(?:work|home|root|Users)/[\w./-]*", doc.read_text())
             for doc in docs}  # fmt: skip
    assert {name: paths for name, paths in found.items() if paths} == {}


def test_the_reproduction_report_names_its_run_folder_run_dir():
    from training.reproduce import run_dir_as_placeholder

    out = Path("runs") / "reproduce"  # as given on the command line; the report may hold its absolute form too
    text = f"`python -m training.teacher --data {out}/data --out {out}/teacher` and {out.resolve()}/logs"
    expected = "`python -m training.teacher --data RUN_DIR/data --out RUN_DIR/teacher` and RUN_DIR/logs"
    assert run_dir_as_placeholder(text, out) == expected


# ------------------------------------------------------------------------------ upper-case extensions
def test_upper_case_extensions_are_cases_and_their_masks_get_lower_case_names(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    image = sitk.GetImageFromArray(np.full((8, 32, 32), -100, np.int16))
    image.SetSpacing((2.0, 2.0, 3.0))
    sitk.WriteImage(image, str(inputs / "case_0000.nii.gz"))
    (inputs / "case_0000.nii.gz").rename(inputs / "CASE_0000.NII.GZ")
    assert io.list_cases(inputs) == [inputs / "CASE_0000.NII.GZ"]
    assert io.output_name("CASE_0000.NII.GZ") == "CASE.nii.gz" and io.output_name("a.Nii") == "a.nii"
    model = make_standin_model(tmp_path / "model", input_channels=3)
    proc = run("-m", "flare_infer", "predict", str(inputs), str(tmp_path / "out"), "--model", str(model),
               "--device", "cpu")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["CASE.nii.gz"]


# ------------------------------------------------------------------------------ CPU torch
def test_requirements_name_the_cpu_wheel_index_without_making_pip_contact_it():
    lines = (REPO / "requirements-ci.txt").read_text().splitlines()
    assert any("https://download.pytorch.org/whl/cpu" in ln for ln in lines if ln.startswith("#"))
    assert not any(ln.strip().startswith(("--index-url", "--extra-index-url", "-i ")) for ln in lines)


def test_the_missing_torch_message_gives_the_readmes_install_command(monkeypatch):
    import training.cli
    from training.cli import INSTALL_TRAIN, missing_extra_message

    monkeypatch.setattr(training.cli, "_installed", lambda module: False)  # as on a machine without torch

    readme = (REPO / "README.md").read_text()
    assert INSTALL_TRAIN in readme
    assert "requirements-ci.txt" in INSTALL_TRAIN  # the CPU build, as the README advises
    message = missing_extra_message(ModuleNotFoundError("No module named 'torch'", name="torch"))
    assert message is not None and INSTALL_TRAIN in message
