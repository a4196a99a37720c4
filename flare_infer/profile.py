"""Resource profiler: time, GPU memory, CPU and RAM of one command, sampled as the FLARE22 organisers did.

    python -m flare_infer profile --out RESULT.json [--plot RESULT.png] [--interval 0.1] -- COMMAND ...
                                                                      (or python -m flare_infer.profile ...)

Runs COMMAND (for example `sh predict.sh IN OUT`, or one `docker run` for one case) and samples
every `interval` seconds until it exits:
- whole-device GPU memory used, total - free through NVML (so the CUDA context counts), in whole
  MiB as nvidia-smi reports it; null when pynvml (nvidia-ml-py) or a GPU is missing, never 0;
- machine-wide CPU utilisation, 100 - idle %, from psutil;
- machine RAM used (MiB).
Reports what the organisers reported (their load_json.py): wall time; GPU memory = the largest value
seen in more than 2% of the samples; AUC GPU = sum(memory) * interval (MiB s); max CPU
utilisation; AUC CPU = sum(100 - idle %) * interval; max RAM. The exit status is the command's; a
profiler that cannot start (no psutil, a command not found) says so in one line and exits 2.
Library: `profile_command(cmd, interval) -> ProfileResult`.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

MIB = 1024 * 1024
FREQUENT_SHARE = 0.02  # organisers: a memory value counts if seen in more than 2% of the samples
TIMEOUT_EXIT_CODE = 124  # as coreutils `timeout` reports a command it had to stop


@dataclass(frozen=True)
class ProfileResult:
    """One profiled run: the samples and the organisers' summary numbers."""

    command: list[str]
    exit_code: int
    timed_out: bool
    interval_s: float
    wall_time_s: float
    gpu_memory_mb: int | None  # largest value seen in more than 2% of samples (MiB)
    auc_gpu_mb_s: float | None  # sum(memory) * interval
    max_cpu_percent: float | None
    auc_cpu_percent_s: float | None  # sum(100 - idle %) * interval
    max_ram_mb: float | None
    samples_t_s: list[float]
    samples_gpu_mb: list[int] | None
    samples_cpu_percent: list[float]
    samples_ram_mb: list[float]

    def to_json(self, path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")


class ProfilerError(RuntimeError):
    """The profiler cannot run here (a missing dependency, a command that cannot be started): nothing was run."""


class _Gpu:
    """Whole-device memory used through NVML; `available` is False without pynvml or a GPU."""

    def __init__(self, index: int) -> None:
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
        except Exception:  # no module, no driver, no device: GPU fields are null, not 0
            self.handle = None

    @property
    def available(self) -> bool:
        return self.handle is not None

    def used_mib(self) -> int:
        info = self._nvml.nvmlDeviceGetMemoryInfo(self.handle)
        return round((info.total - info.free) / MIB)

    def close(self) -> None:
        if self.handle is not None:
            self._nvml.nvmlShutdown()


class _Sampler(threading.Thread):
    def __init__(self, interval_s: float, gpu: _Gpu) -> None:
        super().__init__(daemon=True)
        try:
            import psutil
        except ImportError:
            raise ProfilerError("the profiler needs psutil, which is not installed here: "
                                'pip install -e ".[profile]" (or pip install psutil)') from None

        self.psutil, self.interval_s, self.gpu = psutil, interval_s, gpu
        self.stop = threading.Event()
        self.t0 = time.perf_counter()
        self.t: list[float] = []
        self.gpu_mb: list[int] = []
        self.cpu: list[float] = []
        self.ram: list[float] = []
        psutil.cpu_times_percent(interval=None)  # first call sets the reference point

    def run(self) -> None:
        next_tick = time.perf_counter()
        while not self.stop.is_set():
            next_tick += self.interval_s
            self.stop.wait(max(0.0, next_tick - time.perf_counter()))
            self.sample()

    def sample(self) -> None:
        self.t.append(time.perf_counter() - self.t0)
        if self.gpu.available:
            self.gpu_mb.append(self.gpu.used_mib())
        self.cpu.append(100.0 - self.psutil.cpu_times_percent(interval=None).idle)
        self.ram.append(self.psutil.virtual_memory().used / MIB)


def frequent_max(values: Sequence[int], share: float = FREQUENT_SHARE) -> int | None:
    """Largest value that occurs in more than `share` of the samples (organisers' GPU memory)."""
    counts = Counter(values)
    frequent = [v for v, n in counts.items() if n > share * len(values)]
    return max(frequent) if frequent else None


def profile_command(
    cmd: Sequence[str], interval: float = 0.1, *, gpu_index: int = 0, timeout_s: float | None = None
) -> ProfileResult:
    """Run `cmd` (no shell) and sample GPU memory, CPU and RAM every `interval` seconds.

    A command still running after `timeout_s` is killed and reported with exit code 124 and
    timed_out=True (the organisers scored a hung case as 3600 s).
    """
    if not cmd:
        raise ValueError("no command given: pass it after `--`, e.g. `-- sh predict.sh inputs outputs`")
    gpu = _Gpu(gpu_index)
    sampler = _Sampler(interval, gpu)
    start = time.perf_counter()
    sampler.start()
    timed_out = False
    try:
        try:
            process = subprocess.Popen(list(cmd))
        except OSError as e:
            raise ProfilerError(f"{cmd[0]}: cannot be started ({e.strerror or e}); give a command and its "
                                "arguments after `--`") from None
        try:
            exit_code = process.wait(timeout=timeout_s)
            if exit_code < 0:  # killed by a signal: report it as a shell would (128 + signal)
                exit_code = 128 - exit_code
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            exit_code, timed_out = TIMEOUT_EXIT_CODE, True
    finally:
        wall = time.perf_counter() - start
        sampler.stop.set()
        sampler.join()
        gpu.close()
    return _summarise(list(cmd), exit_code, timed_out, interval, wall, sampler)


def _summarise(cmd, exit_code, timed_out, interval, wall, sampler: _Sampler) -> ProfileResult:
    gpu = sampler.gpu_mb if sampler.gpu.available and sampler.gpu_mb else None
    cpu, ram = sampler.cpu, sampler.ram
    return ProfileResult(
        command=cmd,
        exit_code=exit_code,
        timed_out=timed_out,
        interval_s=interval,
        wall_time_s=round(wall, 3),
        gpu_memory_mb=frequent_max(gpu) if gpu else None,
        auc_gpu_mb_s=round(sum(gpu) * interval, 1) if gpu else None,
        max_cpu_percent=round(max(cpu), 2) if cpu else None,
        auc_cpu_percent_s=round(sum(cpu) * interval, 2) if cpu else None,
        max_ram_mb=round(max(ram), 1) if ram else None,
        samples_t_s=[round(t, 3) for t in sampler.t],
        samples_gpu_mb=gpu,
        samples_cpu_percent=[round(c, 2) for c in cpu],
        samples_ram_mb=[round(r, 1) for r in ram],
    )


def plot(result: ProfileResult, path) -> None:
    """GPU memory, CPU utilisation and RAM over time, one panel each (matplotlib imported here only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    t = result.samples_t_s
    if result.samples_gpu_mb is not None:
        axes[0].plot(t, result.samples_gpu_mb)
        axes[0].set_title(f"GPU memory {result.gpu_memory_mb} MiB (>2% of samples)")
    else:
        axes[0].set_title("GPU memory: no GPU / NVML")
    axes[0].set_ylabel("GPU memory (MiB)")
    axes[1].plot(t, result.samples_cpu_percent)
    axes[1].set_ylabel("CPU used (%)")
    axes[1].set_ylim(0, 105)
    axes[2].plot(t, result.samples_ram_mb)
    axes[2].set_ylabel("RAM used (MiB)")
    axes[2].set_xlabel("time (s)")
    fig.suptitle(f"wall {result.wall_time_s:.1f} s, exit {result.exit_code}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _print_summary(result: ProfileResult) -> None:
    def fmt(value, unit):
        return "null (no GPU)" if value is None else f"{value} {unit}"

    print(
        f"wall time {result.wall_time_s:.2f} s, exit code {result.exit_code}"
        + (" (timed out)" if result.timed_out else "")
        + f"\nGPU memory {fmt(result.gpu_memory_mb, 'MiB')}, AUC GPU {fmt(result.auc_gpu_mb_s, 'MiB s')}"
        + f"\nmax CPU {result.max_cpu_percent} %, AUC CPU {result.auc_cpu_percent_s} % s"
        + f"\nmax RAM {result.max_ram_mb} MiB ({len(result.samples_t_s)} samples)"
    )


def add_arguments(parser) -> None:
    """The options of `python -m flare_infer profile` and `python -m flare_infer.profile`."""
    import argparse

    from flare_infer.cli import add_debug

    parser.add_argument("--out", type=Path, required=True, metavar="RESULT.json",
                        help="write the result (summary and samples) here")
    parser.add_argument("--plot", type=Path, metavar="RESULT.png", help="also a PNG of GPU memory, CPU, RAM over time")
    parser.add_argument("--interval", type=_positive_float, default=0.1, metavar="S", help="sampling period, seconds")
    parser.add_argument("--gpu-index", type=int, default=0, metavar="K", help="NVML device index to sample")
    parser.add_argument("--timeout", type=_positive_float, metavar="S",
                        help="kill the command after this many seconds (exit 124; default: no limit)")
    add_debug(parser)
    parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                        help="the command to profile")  # fmt: skip


def _positive_float(text: str) -> float:
    import argparse

    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, found {text}")
    return value


def run(args) -> int:
    from flare_infer.cli import UsageError

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    try:
        result = profile_command(cmd, args.interval, gpu_index=args.gpu_index, timeout_s=args.timeout)
    except (ProfilerError, ValueError) as e:
        raise UsageError(str(e)) from None
    result.to_json(args.out)
    if args.plot is not None:
        plot(result, args.plot)
    _print_summary(result)
    return result.exit_code


def _cli(argv: list[str] | None = None, prog: str = "python -m flare_infer.profile") -> None:
    import argparse
    import sys

    from flare_infer.cli import HelpFormatter, one_line_errors

    parser = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter,
                                     description="Run COMMAND and sample its wall time, GPU memory, CPU and RAM as "
                                     "the FLARE22 organisers did;\nthe exit status is the command's.")  # fmt: skip
    add_arguments(parser)
    args = parser.parse_args(argv)
    sys.exit(one_line_errors(lambda: run(args), debug=args.debug))


if __name__ == "__main__":
    _cli()
