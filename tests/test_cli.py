"""The CLI and predict.sh on folders: bad cases named and skipped, good ones written on their grids, exit codes,
no torch anywhere on the way.

    pytest tests/test_cli.py -x -q
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
from onnx_standin import make_standin_model
from test_io import write_bad_inputs, write_good_inputs

from flare_infer import io
from flare_infer.geometry import Grid

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "flare_infer", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_standin_model(tmp_path_factory.mktemp("model"), input_channels=3)


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, model):
    """One CLI run over a folder of good and bad cases, shared by the tests that inspect it."""
    inputs, outputs = tmp_path_factory.mktemp("in"), tmp_path_factory.mktemp("root") / "out"
    bad = write_bad_inputs(inputs)
    good = write_good_inputs(inputs)
    args = ["--model", str(model), "--device", "cpu", "--batch-size", "4", "--postprocess", "lcc"]
    result = run_cli("predict", str(inputs), str(outputs), *args)
    return inputs, outputs, bad, good, result


def test_mixed_folder_exits_1_and_names_every_bad_file(mixed_run):
    _, _, bad, _, result = mixed_run
    assert result.returncode == 1, result.stderr
    for name, word in bad.items():
        lines = [ln for ln in result.stderr.splitlines() if ln.startswith(f"ERROR {name}: ")]
        assert len(lines) == 1 and word in lines[0], (name, lines, result.stderr[-3000:])


def test_mixed_folder_writes_good_cases_on_their_grids_and_nothing_else(mixed_run):
    inputs, outputs, _, good, result = mixed_run
    expected = sorted(io.output_name(name) for name in good)
    assert sorted(p.name for p in outputs.iterdir()) == expected, result.stderr  # no bad output, no temp file
    for name in good:
        image, mask = sitk.ReadImage(str(inputs / name)), sitk.ReadImage(str(outputs / io.output_name(name)))
        assert Grid.of(mask).differences(Grid.of(image), atol=1e-5) == [], name
        assert mask.GetPixelID() == sitk.sitkUInt8
        assert sitk.GetArrayViewFromImage(mask).max() > 0, f"{name}: the stand-in labels the body, found nothing"


def test_log_has_stage_times_and_the_provider(mixed_run):
    result = mixed_run[-1]
    assert "on CPUExecutionProvider" in result.stderr
    line = next(ln for ln in result.stderr.splitlines() if ln.startswith("thick10mm.nii.gz -> thick10mm.nii.gz"))
    assert all(stage in line for stage in ("read", "preprocess", "infer", "restore", "write"))


@pytest.mark.parametrize("problem", ["missing_input", "empty_input", "unwritable_output", "model_without_sidecar"])
def test_usage_errors_exit_2_before_any_work(problem, tmp_path, model):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    write_good_inputs(inputs) if problem != "empty_input" else None
    if problem == "missing_input":
        inputs = tmp_path / "nowhere"
    if problem == "unwritable_output":
        (tmp_path / "a_file").write_text("")
        outputs = tmp_path / "a_file" / "out"  # below a regular file: cannot be created, even as root
    if problem == "model_without_sidecar":
        lone = tmp_path / "lone.onnx"
        lone.write_bytes(model.read_bytes())
        model = lone
    result = run_cli("predict", str(inputs), str(outputs), "--model", str(model))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert not outputs.exists() or not any(outputs.iterdir())


def test_shard_takes_every_nth_case(tmp_path, model):
    inputs = tmp_path / "in"
    names = sorted(write_good_inputs(inputs))[:4]
    for extra in sorted(write_good_inputs(inputs))[4:]:
        (inputs / extra).unlink()
    result = run_cli("predict", str(inputs), str(tmp_path / "out"), "--model", str(model), "--shard", "1/2")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(io.output_name(n) for n in names[1::2])


def test_predict_never_imports_torch(tmp_path, model):
    inputs = tmp_path / "in"
    write_good_inputs(inputs)
    code = (
        "import sys, flare_infer\n"
        "from flare_infer.__main__ import app\n"
        f"try: app(['predict', {str(inputs)!r}, {str(tmp_path / 'out')!r}, '--model', {str(model)!r}])\n"
        "except SystemExit as e: print('exit', e.code)\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.stdout.split() == ["exit", "0", "False"], result.stderr[-2000:]


PAGE_FAULTS_OF_REPEATED_TEMPORARIES = """
import resource, sys
import numpy as np
from flare_infer.__main__ import keep_freed_memory

if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for mb in (3, 8, 40):
    for _ in range(10):  # a case's temporaries: made, written, freed, again
        a = np.ones(mb << 20, np.uint8)
        b = a + 1
        del a, b
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_predict_keeps_freed_memory_so_temporaries_are_not_page_faulted_anew():
    def page_faults(mode: str) -> int:
        result = subprocess.run([sys.executable, "-c", PAGE_FAULTS_OF_REPEATED_TEMPORARIES, mode],
                                capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        return int(result.stdout)

    default = page_faults("default")  # glibc maps each afresh: about 30k faults on the development machine
    if default < 4000:
        pytest.skip(f"this machine's allocator faults the temporaries only {default} times: nothing to show")
    assert page_faults("keep") < default / 4  # about 3k there


def test_predict_sets_the_allocator_before_reading(tmp_path, model, monkeypatch):
    import flare_infer.__main__ as cli

    order = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: order.append("allocator"))
    monkeypatch.setattr(cli, "no_huge_pages_for_numpy", lambda: order.append("pages"))
    monkeypatch.setattr(io.ReadAhead, "schedule", lambda self, path: order.append("read"))
    write_good_inputs(tmp_path / "in")
    with pytest.raises(SystemExit):
        cli.app(["predict", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(model)])
    assert order[:3] == ["allocator", "pages", "read"]


HUGE_PAGES_OF_ARRAYS = """
import sys
import numpy as np
from flare_infer.__main__ import no_huge_pages_for_numpy

if sys.argv[1] == "off":
    assert no_huge_pages_for_numpy()
arrays = [np.ones(64 << 20, np.uint8) for _ in range(2)]  # 128 MB, every page touched
with open("/proc/self/smaps_rollup") as f:
    print(next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages")))
"""
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(
    not (THP_MODE.is_file() and "[madvise]" in THP_MODE.read_text()),
    reason="the kernel gives transparent huge pages on advice only in 'madvise' mode",
)
def test_predict_asks_no_huge_pages_for_its_arrays():
    def huge_page_kib(mode: str) -> int:
        env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
        result = subprocess.run([sys.executable, "-c", HUGE_PAGES_OF_ARRAYS, mode],
                                capture_output=True, text=True, cwd=REPO, env=env, timeout=120)  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        return int(result.stdout)

    advised = huge_page_kib("default")  # numpy's own advice: most of the 128 MB as 2 MB pages
    if advised == 0:
        pytest.skip("the kernel gave numpy's advised arrays no huge page here: nothing to show")
    assert huge_page_kib("off") == 0


def test_predict_sh_keeps_relative_paths_of_the_caller(tmp_path, model):
    (tmp_path / "cases").mkdir()
    write_good_inputs(tmp_path / "cases")
    for name in list((tmp_path / "cases").iterdir())[1:]:
        name.unlink()
    env = {**os.environ, "PYTHON": sys.executable, "FLARE_MODEL": str(model), "FLARE_ARGS": "--device cpu"}
    result = subprocess.run(
        ["sh", str(REPO / "predict.sh"), "cases", "results/deep"], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "results/deep").glob("*.nii*"))) == 1


def test_missing_default_weights_say_how_to_make_them(tmp_path, monkeypatch):
    from flare_infer import __main__ as cli

    monkeypatch.setattr(cli, "default_model_candidates", lambda: [tmp_path / "weights/student.onnx"])
    with pytest.raises(cli.UsageError, match="python -m training.export"):
        cli.resolve_model(None)


def test_sidecar_that_does_not_match_the_onnx_input_is_refused_at_start(tmp_path):
    from flare_infer.session import load_model
    from flare_infer.spec import ModelSpec, SpecError, load_spec

    onnx_path = make_standin_model(tmp_path, input_channels=3)
    wrong = ModelSpec(input_channels=1, extra=load_spec(onnx_path).extra)  # the graph takes 3 channels
    wrong.save(onnx_path.with_suffix(".json"))
    with pytest.raises(SpecError, match=r"input must be \(N, 1, H, W\)"):
        load_model(onnx_path, device="cpu")


def test_device_cuda_without_cuda_is_a_usage_error(tmp_path, model):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the refusal cannot be shown here")
    write_good_inputs(tmp_path / "in")
    result = run_cli("predict", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(model), "--device", "cuda")
    assert result.returncode == 2 and "CUDA" in result.stderr, result.stderr


EXIT_NOW = """
import atexit, logging, logging.handlers, sys
from flare_infer.__main__ import exit_now

held = logging.handlers.MemoryHandler(100, target=logging.StreamHandler(sys.stderr))  # emits when flushed or closed
logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[held])
atexit.register(lambda: print(" teardown ran"))
print("written", end="")  # no newline: still in the buffer of a pipe
logging.getLogger("flare_infer").info("logged")
exit_now(int(sys.argv[1]) if sys.argv[1].isdigit() else None if sys.argv[1] == "None" else sys.argv[1])
"""


@pytest.mark.parametrize(("code", "status"), [("0", 0), ("3", 3), ("None", 0), ("a reason", 1)])
def test_the_command_exits_with_its_status_and_output_and_skips_the_teardown(code, status):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered, as on a pipe
    result = subprocess.run([sys.executable, "-c", EXIT_NOW, code], capture_output=True, text=True, cwd=REPO,
                            env=env, timeout=120)  # fmt: skip
    assert result.returncode == status
    assert result.stdout == "written"  # flushed; the atexit handler (the interpreter's teardown) never ran
    assert "logged" in result.stderr
    assert ("a reason" in result.stderr) == (code == "a reason")

