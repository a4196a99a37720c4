"""Small shared helpers for training: seeding, RNG states, git commit, device choice, the distributed runtime,
atomic writes, helper processes that die with the trainer.

    python -c "from training.utils import setup_runtime; print(setup_runtime('auto'))"

`setup_runtime(device)` reads torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK): with
WORLD_SIZE > 1 it initialises the process group (NCCL on CUDA, gloo on CPU) and pins each rank
to its GPU; otherwise it is a plain single-process runtime. Only `Runtime.is_main` (rank 0) writes.

Kill safety (a SIGKILL at any moment leaves nothing behind; see docs/TRAINING.md "Kills and resume"):
- `write_atomic(path, write)`: `write(tmp)` then `os.replace`; the temporary file is named
  `.NAME.PID@HOST.tmp.EXT`, so `remove_stale_tmp(folder)` can tell a dead writer's leftovers (removed)
  from a live one's (kept: another torchrun rank, another job on the same cache).
- `exit_with(pid)`: a helper process (DataLoader worker, cache-building worker) exits as soon as the
  trainer `pid` dies. Needed because those helpers are children of the multiprocessing forkserver,
  whose own liveness check waits for them: without it a kill leaves the forkserver, the workers and
  the resource tracker running for good.
- Fault injection for tests, one environment switch, FLARE_TRAINING_FAULT (`injected_fault`); the tests that
  kill training need it in a child process, which monkeypatching cannot reach (forkserver workers included).
  `setup_runtime` warns loudly on stderr when it is set, and refuses a value it does not know:
    `stop-after-epoch:N`   training.loop exits (os._exit(137), no clean-up) right after epoch N's checkpoints;
    `pause:PATTERN[@N]`    the N-th (default first) `pause_point` whose name matches the fnmatch PATTERN
                           prints `FLARE_TRAINING_FAULT pause <point> pid <PID>` to stderr and sleeps, so a test
                           can SIGKILL the process at that moment. Points: `write:<file name>` between a
                           temporary file's write and its rename (e.g. `write:best.pt`, `write:*.pseudo.npy`).
  Unset, each check costs one dict lookup. (Before 2026-12-07 these were two switches, TRAINING_STOP_AFTER_EPOCH
  and FLARE_TEST_PAUSE_AT, silent: a stale one in a user's shell made training exit 137 or sleep for good;
  both names now do nothing.)
"""

from __future__ import annotations

import fnmatch
import os
import random
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def choose_device(device: str, local_rank: int = 0) -> torch.device:
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"--device must be auto, cuda or cpu; found {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no CUDA GPU; use --device cpu or auto")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def setup_runtime(device: str = "auto") -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = choose_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    warn_test_fault()
    return Runtime(dev, rank, world, local_rank)


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def teardown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def git_commit() -> str:
    """`git rev-parse HEAD` of the source tree, or "unknown" (no git, no commit yet)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def cpu_has_bf16() -> bool:
    """oneDNN runs bf16 natively here (AVX512-BF16 or AMX): autocast then about halves a CPU step."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_dtype(rt: Runtime, amp: bool) -> torch.dtype | None:
    """The autocast dtype, None (float32 throughout) with amp off.

    GPU: bf16 where supported, fp16 (with grad scaling) otherwise. CPU: bf16 where the CPU has native
    bf16 (measured on a 2-core AMX Xeon, width-16 U-Net, batch 16 x 128^2: 0.42 s per training step
    against 0.76 s in float32, channels-last both), else None: emulated bf16 is slower than float32.
    """
    if not amp:
        return None
    if not rt.is_cuda:
        return torch.bfloat16 if cpu_has_bf16() else None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ----------------------------------------------------------------------------- RNG states
def rng_state(rt: Runtime) -> dict:
    """Python, numpy and torch (and this rank's CUDA) global RNG states, for a checkpoint."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if rt.is_cuda:
        state["cuda"] = torch.cuda.get_rng_state(rt.device)
    return state


def set_rng_state(state: dict, rt: Runtime) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if rt.is_cuda and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), rt.device)


# ----------------------------------------------------------------------------- kill safety
FAULT_ENV = "FLARE_TRAINING_FAULT"
KILLED_EXIT = 137  # what a SIGKILL's exit status reads as
_FAULT_KINDS = ("stop-after-epoch", "pause")
_pause_hits = 0


def injected_fault() -> tuple[str, str] | None:
    """(kind, argument) of FLARE_TRAINING_FAULT (see the module docstring), None when unset or empty."""
    value = os.environ.get(FAULT_ENV)
    if not value:
        return None
    kind, sep, arg = value.partition(":")
    if kind not in _FAULT_KINDS or not sep or not arg:
        raise ValueError(
            f"{FAULT_ENV}={value!r}: expected stop-after-epoch:N or pause:PATTERN[@N] (a test-only fault "
            f"injection); unset it (`unset {FAULT_ENV}`) to train normally"
        )
    return kind, arg


def warn_test_fault() -> None:
    """Say on stderr, loudly, that this run will stop or hang on purpose (FLARE_TRAINING_FAULT is set)."""
    fault = injected_fault()
    if fault is not None:
        bar = "!" * 100
        what = "exit (137) after that epoch" if fault[0] == "stop-after-epoch" else "hang for good at that point"
        print(f"{bar}\nWARNING: {FAULT_ENV}={os.environ[FAULT_ENV]} is set: a TEST fault injection. This run will "
              f"{what}.\nUnset it (`unset {FAULT_ENV}`) unless a test set it.\n{bar}", file=sys.stderr, flush=True)


def stop_point(epoch: int) -> None:
    """Fault injection (module docstring): exit like a kill if FLARE_TRAINING_FAULT is stop-after-epoch:`epoch`."""
    if injected_fault() == ("stop-after-epoch", str(epoch)):
        os._exit(KILLED_EXIT)


def pause_point(name: str) -> None:
    """Fault injection (module docstring): sleep here for good if FLARE_TRAINING_FAULT is pause:PATTERN selecting
    `name`."""
    global _pause_hits
    fault = injected_fault()
    if fault is None or fault[0] != "pause":
        return
    pattern, _, nth = fault[1].partition("@")
    if not fnmatch.fnmatchcase(name, pattern):
        return
    _pause_hits += 1
    if _pause_hits == int(nth or 1):
        print(f"{FAULT_ENV} pause {name} pid {os.getpid()}", file=sys.stderr, flush=True)
        while True:
            time.sleep(60)


def tmp_path(path: Path) -> Path:
    """Where `path` is written before its rename: `.NAME.PID@HOST.tmp.EXT` beside it (EXT kept for np.save, savefig)."""
    return path.with_name(f".{path.name}.{os.getpid()}@{socket.gethostname()}.tmp{path.suffix}")


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then rename onto `path`: readers (and a resumed run) see the old file or the new, never a part."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        write(tmp)
        pause_point(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# `.NAME.PID@HOST.tmp[.EXT]`, and the older `.NAME.PID.tmp.npy` (host-less: read as this host's)
_TMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)(?:@(?P<host>[^/@]+?))?\.tmp(?:\.[A-Za-z0-9]+)?$")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (a zombie, killed but not yet reaped, counts as dead)."""
    if sys.platform == "win32":  # os.kill(pid, 0) there sends CTRL_C_EVENT (signal 0) instead of probing
        import psutil  # the train extra

        return psutil.pid_exists(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (not Linux): trust kill(0)
    return stat[stat.rindex(")") + 2] not in "ZX"


def remove_stale_tmp(folder: Path) -> list[Path]:
    """Delete the temporary files in `folder` whose writer is dead: written on this host by a PID that no longer
    runs. Others' are kept (a live rank or job may be about to rename them; another host's PIDs mean nothing
    here). A PID reused by an unrelated process only delays the removal to a later start. Returns the removed."""
    folder, host, removed = Path(folder), socket.gethostname(), []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        m = _TMP_NAME.match(path.name)
        if m and (m["host"] or host) == host and not pid_alive(int(m["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def exit_with(pid: int, poll_s: float = 1.0) -> None:
    """Make this process exit (os._exit) as soon as process `pid` (the trainer) dies: a daemon thread waits on a
    pidfd (Linux >= 5.3: woken by the exit itself, no polling), else polls every `poll_s` seconds.

    For helpers that are not the trainer's children and so cannot use prctl(PR_SET_PDEATHSIG): DataLoader and
    cache workers are forked by the multiprocessing forkserver, which in turn exits only once every client
    (the trainer and those workers) has closed its "alive" pipe. Measured before this (teacher, 2 workers):
    after a SIGKILL the forkserver, both workers (~480 MB each) and the resource tracker ran on for good.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)  # the trainer is already gone
    except (AttributeError, OSError):
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])  # readable once `pid` has exited
        else:
            while pid_alive(pid):
                time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name=f"exit-with-{pid}", daemon=True).start()
