"""Small shared helpers for training: seeding, git commit, device choice, the distributed runtime.

    python -c "from training.utils import setup_runtime; print(setup_runtime('auto'))"

`setup_runtime(device)` reads torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK): with
WORLD_SIZE > 1 it initialises the process group (NCCL on CUDA, gloo on CPU) and pins each rank
to its GPU; otherwise it is a plain single-process runtime. Only `Runtime.is_main` (rank 0) writes.
"""

from __future__ import annotations

import os
import random
import subprocess
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
