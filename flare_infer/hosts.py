"""What the host lets this process use: the CPUs' worth of time (affinity and cgroup CPU quota).

    python -c "from flare_infer.hosts import available_cpus; print(available_cpus())"

`available_cpus()` is the one CPU count of the package: onnxruntime's threads (`session.default_threads`),
evaluate's worker processes (`evaluate.default_workers`) and ITK's threads (`python -m flare_infer predict`).
`os.sched_getaffinity` gives the cores the process may run on but ignores a CPU quota: under
`docker run --cpus 2` on a 32-core host it says 32, and 32 threads then share 2 CPUs' worth of time (each
waits for the others at every parallel step). The quota is read from the cgroup files:

- cgroup v2: `cpu.max` ("QUOTA PERIOD", or "max PERIOD" for none) of the process's cgroup and its ancestors
  (a limit set higher up applies too); the process's cgroup is the `0::PATH` line of /proc/self/cgroup.
- cgroup v1: `cpu.cfs_quota_us` (-1 for none) and `cpu.cfs_period_us` of the `cpu` controller's hierarchy
  (the line naming `cpu` in /proc/self/cgroup) and its ancestors.

In a container the cgroup namespace usually makes the process's path "/", the mount's root; where it does not
(older Docker shows the host's path), the mount's root is read as well. The count is ceil(quota / period)
(1.5 CPUs: 2 threads), at least 1, and never more than the affinity's cores. Hosts without /proc (macOS,
Windows) get `os.cpu_count()`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def affinity_cpus() -> int:
    """The cores this process may run on (Linux affinity; elsewhere the machine's count), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def available_cpus(cgroup_root: Path | None = None, proc_self_cgroup: Path | None = None) -> int:
    """min(affinity cores, the cgroup CPU quota rounded up), at least 1 (see the module docstring); the cgroup
    files default to this process's (`CGROUP_ROOT`, `PROC_SELF_CGROUP`)."""
    cores = affinity_cpus()
    quota = cgroup_cpu_quota(cgroup_root, proc_self_cgroup)
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def cgroup_cpu_quota(cgroup_root: Path | None = None, proc_self_cgroup: Path | None = None) -> float | None:
    """The smallest CPU quota (in CPUs, e.g. 1.5) on this process's cgroup path, v2 or v1; None for no quota or
    no cgroup files (not Linux, or unreadable)."""
    cgroup_root, proc_self_cgroup = cgroup_root or CGROUP_ROOT, proc_self_cgroup or PROC_SELF_CGROUP
    try:
        lines = proc_self_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2: "0::/PATH"
            quotas += [_v2_quota(d) for d in _candidates(cgroup_root, path)]
        elif "cpu" in controllers.split(","):  # v1: "N:cpu,cpuacct:/PATH"
            mount = next((m for m in (cgroup_root / controllers, cgroup_root / "cpu") if m.is_dir()), None)
            if mount is not None:
                quotas += [_v1_quota(d) for d in _candidates(mount, path)]
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def _candidates(mount: Path, path: str) -> list[Path]:
    """The cgroup's folder under `mount` and its ancestors up to the mount's root (which is always read)."""
    parts = [p for p in path.strip().split("/") if p and p != ".."]
    folders = [mount.joinpath(*parts[:i]) for i in range(len(parts), 0, -1)]
    return [f for f in folders if f.is_dir()] + [mount]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _v2_quota(folder: Path) -> float | None:
    text = _read(folder / "cpu.max")
    if not text:
        return None
    quota, _, period = text.partition(" ")
    if quota == "max":
        return None
    try:
        return int(quota) / int(period or 100000)
    except (ValueError, ZeroDivisionError):
        return None


def _v1_quota(folder: Path) -> float | None:
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    try:
        q, p = int(quota), int(period)
    except (TypeError, ValueError):
        return None
    return q / p if q > 0 and p > 0 else None
