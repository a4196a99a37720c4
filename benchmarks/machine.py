"""The machine record every benchmark's JSON carries: when, on what, and how loaded (wall times depend on it)."""

from __future__ import annotations

import datetime
import os
import platform


def machine_record(load_before: float, **extra) -> dict:
    """Date (UTC), CPU, cores allowed, 1-minute load average before the run and now, Python, plus `extra`."""
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu": platform.processor() or platform.machine(),
        "cores_allowed": len(os.sched_getaffinity(0)),
        "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "python": platform.python_version(),
        **extra,
    }
