"""Resource profiler: a command with a known duration and CPU load, the organisers' summary numbers.

pytest tests/test_profile.py -x
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from flare_infer.profile import _Gpu, frequent_max, profile_command

BUSY_ONE_SECOND = "import sys, time\nt = time.time()\nwhile time.time() - t < 1.0: pass\nsys.exit(3)"


def test_busy_command_is_timed_sampled_and_its_exit_code_kept():
    result = profile_command([sys.executable, "-c", BUSY_ONE_SECOND], interval=0.1)
    assert result.exit_code == 3
    assert 0.9 < result.wall_time_s < 20  # generous: the machine is shared
    assert len(result.samples_cpu_percent) >= 5
    assert result.max_cpu_percent > 50 / os.cpu_count()  # machine-wide: one busy core of cpu_count
    assert result.auc_cpu_percent_s == pytest.approx(sum(result.samples_cpu_percent) * 0.1, abs=0.05)
    assert result.max_ram_mb > 0
    if not _Gpu(0).available:
        assert result.gpu_memory_mb is None and result.auc_gpu_mb_s is None and result.samples_gpu_mb is None


def test_gpu_memory_is_largest_value_seen_in_more_than_2_percent_of_samples():
    samples = [1000] * 50 + [1500] * 48 + [9000] * 2  # the 9000 MiB spike is exactly 2%: ignored
    assert frequent_max(samples) == 1500
    assert frequent_max(samples + [9000]) == 9000  # now 3 of 101 samples


def test_hung_command_is_killed_at_the_timeout():
    result = profile_command([sys.executable, "-c", "import time; time.sleep(60)"], interval=0.1, timeout_s=0.5)
    assert result.timed_out and result.exit_code == 124
    assert result.wall_time_s < 30


def test_empty_command_is_rejected():
    with pytest.raises(ValueError, match="no command given"):
        profile_command([])


def test_cli_writes_json_and_plot_and_exits_with_the_command_status(tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    args = ["--out", str(out), "--plot", str(png), "--interval", "0.05", "--"]
    command = [sys.executable, "-c", "import sys, time; time.sleep(0.3); sys.exit(7)"]
    completed = subprocess.run([sys.executable, "-m", "flare_infer.profile", *args, *command], capture_output=True)
    assert completed.returncode == 7, completed.stderr.decode()
    result = json.loads(out.read_text())
    assert result["exit_code"] == 7 and result["command"] == command
    assert png.stat().st_size > 0


class _FakeNvml:
    """Stands in for pynvml: 80 GiB total, 1.5 GiB used (the CUDA context and a model)."""

    def __init__(self):
        self.calls = 0

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("gpu", index)

    def nvmlDeviceGetMemoryInfo(self, handle):
        self.calls += 1
        total = 80 * 1024**3
        return SimpleNamespace(total=total, free=total - 1536 * 1024**2 - 1000, used=0)


def test_gpu_memory_is_total_minus_free_in_whole_mib(monkeypatch):
    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    result = profile_command([sys.executable, "-c", "import time; time.sleep(0.4)"], interval=0.05)
    assert fake.calls >= 3
    assert set(result.samples_gpu_mb) == {1536}
    assert result.gpu_memory_mb == 1536
    assert result.auc_gpu_mb_s == pytest.approx(1536 * len(result.samples_gpu_mb) * 0.05, abs=0.1)


def test_harness_runs_one_case_per_fresh_input_folder_and_writes_the_table(tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    for name in ("a_0000.nii.gz", "b_0000.nii.gz"):
        (cases / name).write_bytes(b"not read by the fake predictor")
    predictor = tmp_path / "fake_predict.py"
    predictor.write_text(
        "import pathlib, shutil, sys\n"
        "inp, out = map(pathlib.Path, sys.argv[1:3])\n"
        "files = sorted(inp.iterdir())\n"
        "assert len(files) == 1, files\n"
        "shutil.copy(files[0], out / files[0].name.replace('_0000', ''))\n"
    )
    out = tmp_path / "results"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_cases.py"
    template = f"{sys.executable} {predictor} {{input}} {{output}}"
    completed = subprocess.run(
        [sys.executable, str(script), str(cases), "--out", str(out), "--command", template], capture_output=True
    )
    assert completed.returncode == 0, completed.stderr.decode()
    lines = (out / "efficiency.csv").read_text().splitlines()
    assert lines[0] == "Name,Time,GPU_Mem,AUC_GPU_Time,CPU_Utilization,AUC_CPU_Time,RAM,AUC_RAM_Time,ExitCode,Output"
    assert [line.split(",")[0] for line in lines[1:]] == ["a_0000.nii.gz", "b_0000.nii.gz", "mean"]
    assert all(line.endswith(",0,1") for line in lines[1:3])
    assert sorted(p.name for p in (out / "outputs").iterdir()) == ["a.nii.gz", "b.nii.gz"]
    assert (out / "profiles" / "a.json").exists()
