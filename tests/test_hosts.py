"""Hosts other than the development machine (issue 29, item 4): the allocator and huge-page settings apply only
where they exist, the CPU count honours cgroup v1 and v2 quotas, an unexpected error fails one case only.

    pytest tests/test_hosts.py

Windows, macOS and a glibc that refuses a setting are simulated (ctypes.CDLL and numpy's switch replaced);
the cgroup files are fake folders in tmp_path.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

import flare_infer.__main__ as cli
from flare_infer import evaluate, hosts, session

# ----------------------------------------------------------------------------- the allocator, huge pages


class _Refusing:
    """A C library whose mallopt refuses one parameter (returns 0, as glibc does for a value out of range)."""

    def __init__(self, refuse: int) -> None:
        self.refuse, self.calls = refuse, []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(param)
        return 0 if param == self.refuse else 1


def _windows_cdll(name):
    raise TypeError("LoadLibrary() argument 1 must be str, not None")  # what ctypes says on Windows


@pytest.mark.parametrize(
    "host, cdll",
    [("windows", _windows_cdll), ("macos", lambda name: object())],  # macOS' libc: no mallopt
)
def test_keep_freed_memory_does_nothing_where_there_is_no_mallopt_and_says_so_once(monkeypatch, caplog, host, cdll):
    """Mutation caught: TypeError not caught (Windows crashed at start, issue 29); the debug line removed."""
    monkeypatch.setattr(cli.ctypes, "CDLL", cdll)
    with caplog.at_level(logging.DEBUG, logger="flare_infer"):
        assert cli.keep_freed_memory() is False
    lines = [r for r in caplog.records if "allocator left as it is" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.DEBUG


def test_a_refused_mallopt_setting_is_reported_and_the_others_still_applied(monkeypatch, caplog):
    """Mutation caught: the return values ignored (True where a setting was refused); the debug line removed;
    stopping at the first refusal (all() over a generator)."""
    libc = _Refusing(cli.M_MMAP_THRESHOLD)
    monkeypatch.setattr(cli.ctypes, "CDLL", lambda name: libc)
    with caplog.at_level(logging.DEBUG, logger="flare_infer"):
        assert cli.keep_freed_memory() is False
    assert sorted(libc.calls) == sorted([cli.M_ARENA_MAX, cli.M_MMAP_THRESHOLD, cli.M_TRIM_THRESHOLD])
    refused = [r for r in caplog.records if "mallopt refused" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.DEBUG
    assert f"M_MMAP_THRESHOLD={cli.KEEP_BYTES}" in refused[0].getMessage()
    assert "M_ARENA_MAX" not in refused[0].getMessage()


def test_no_huge_page_switch_in_this_numpy_is_said_at_debug_level(monkeypatch, caplog):
    """A numpy without `_set_madvise_hugepage` (both import paths fail). Mutation caught: the debug line removed."""
    monkeypatch.setitem(sys.modules, "numpy._core.multiarray", None)  # `from ... import` then raises ImportError
    monkeypatch.setitem(sys.modules, "numpy.core.multiarray", None)
    with caplog.at_level(logging.DEBUG, logger="flare_infer"):
        assert cli.no_huge_pages_for_numpy() is False
    assert [r.levelno for r in caplog.records if "no huge-page switch" in r.getMessage()] == [logging.DEBUG]


# ----------------------------------------------------------------------------- CPU quotas


def _cgroup(tmp_path: Path, proc_lines: list[str], files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "sys_fs_cgroup"
    root.mkdir()
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("\n".join(proc_lines) + "\n")
    return root, proc


V2_DOCKER = (["0::/"], {"cpu.max": "200000 100000"})  # docker run --cpus 2, cgroup namespace
V2 = [
    (V2_DOCKER, 2.0),
    ((["0::/"], {"cpu.max": "max 100000"}), None),
    ((["0::/"], {"cpu.max": "150000 100000"}), 1.5),  # 1.5 CPUs: 2 threads
    # a limit on an ancestor applies to the child (systemd slice with CPUQuota=, a job scheduler)
    ((["0::/job.slice/step"], {"cpu.max": "max 100000", "job.slice/cpu.max": "300000 100000",
                               "job.slice/step/cpu.max": "max 100000"}), 3.0),  # fmt: skip
]
V1 = [
    ((["4:memory:/", "3:cpu,cpuacct:/"], {"cpu,cpuacct/cpu.cfs_quota_us": "100000",
                                          "cpu,cpuacct/cpu.cfs_period_us": "100000"}), 1.0),  # fmt: skip
    ((["3:cpu,cpuacct:/"], {"cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"}), None),
    # older Docker without a cgroup namespace: the host's path, absent inside; the mount's root holds the quota
    ((["2:cpu:/docker/0123abcd"], {"cpu/cpu.cfs_quota_us": "50000", "cpu/cpu.cfs_period_us": "100000"}), 0.5),
]


@pytest.mark.parametrize("layout, quota", V2 + V1, ids=[f"v2-{i}" for i in range(len(V2))] +
                         [f"v1-{i}" for i in range(len(V1))])  # fmt: skip
def test_the_cgroup_cpu_quota_is_read_from_v1_and_v2_files(tmp_path, layout, quota):
    """Mutations caught: `max` taken as a number (ValueError) or ignored the ancestors (v2-3 gives None); the
    mount's root not read (v1-2 gives None); quota and period swapped."""
    root, proc = _cgroup(tmp_path, *layout)
    assert hosts.cgroup_cpu_quota(root, proc) == quota


def test_no_cgroup_files_is_no_quota(tmp_path):
    assert hosts.cgroup_cpu_quota(tmp_path / "none", tmp_path / "no_proc_file") is None


@pytest.mark.parametrize("quota_line, expected", [("200000 100000", 2), ("150000 100000", 2), ("10000 100000", 1),
                                                  ("max 100000", 32), ("6400000 100000", 32)])  # fmt: skip
def test_available_cpus_is_the_quota_rounded_up_never_above_the_cores(tmp_path, monkeypatch, quota_line, expected):
    root, proc = _cgroup(tmp_path, ["0::/"], {"cpu.max": quota_line})
    monkeypatch.setattr(hosts, "affinity_cpus", lambda: 32)  # a 32-core host
    assert hosts.available_cpus(root, proc) == expected


def test_onnxruntime_evaluate_and_itk_thread_counts_follow_the_quota(tmp_path, monkeypatch):
    """`docker run --cpus 2` on a 32-core host: onnxruntime's threads, evaluate's workers and ITK's threads in
    predict are 2, not 32. Mutations caught: session.default_threads / evaluate.default_workers back on
    sched_getaffinity; predict setting ITK's threads only with --threads."""
    root, proc = _cgroup(tmp_path, *V2_DOCKER)
    monkeypatch.setattr(hosts, "CGROUP_ROOT", root)
    monkeypatch.setattr(hosts, "PROC_SELF_CGROUP", proc)
    monkeypatch.setattr(hosts, "affinity_cpus", lambda: 32)
    monkeypatch.setattr(hosts.os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert session.default_threads() == 2
    assert evaluate.default_workers() == 2

    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(32)  # ITK's own default on that host
        (tmp_path / "in").mkdir()
        with pytest.raises(SystemExit):  # no case and no model: stops after the thread settings
            cli.app(["predict", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tmp_path / "x.onnx")])
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 2
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


# ----------------------------------------------------------------------------- declared dependencies
REPO = Path(__file__).resolve().parents[1]


def test_every_third_party_module_the_predict_cli_imports_is_a_core_dependency():
    """`python -m flare_infer predict` imports (at the top or inside a function: rich for the progress bar on a
    terminal) only the standard library, flare_infer, and distributions named in [project] dependencies. onnxruntime
    is the one exception: its flavour is the user's choice (extras cpu, gpu) and flare_infer.session imports it.
    Mutation caught: rich taken out of the core dependencies (as before issue 29: installed only through typer)."""
    import ast
    import importlib.metadata
    import re

    tomllib = pytest.importorskip("tomllib", reason="tomllib: Python 3.11+")
    declared = {re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower().replace("_", "-")
                for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}  # fmt: skip
    tree = ast.parse((REPO / "flare_infer" / "__main__.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module and not n.level}  # fmt: skip
    third_party = sorted(names - set(sys.stdlib_module_names) - {"flare_infer", "__future__"})
    assert "rich" in third_party  # the check below sees the function-level import
    dists = importlib.metadata.packages_distributions()
    undeclared = {m: dists.get(m, [m]) for m in third_party
                  if not {d.lower().replace("_", "-") for d in dists.get(m, [m])} & declared}  # fmt: skip
    assert not undeclared, f"imported by flare_infer/__main__.py but not in [project] dependencies: {undeclared}"
