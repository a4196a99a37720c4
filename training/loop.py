"""One training loop for both phases: epochs, poly LR, AMP, DDP, checkpoints, resume, metrics, curves.

    (used by python -m training.teacher and python -m training.student)

Interface (stable; the student builds on it):

    LoopConfig(epochs, lr=2e-4, adam_betas=(0.5, 0.999), poly_power=0.9, amp=True, val_every=1,
               monitor="val_dsc", seed=0)                                   # frozen
    make_optimizer(model, cfg) -> Adam;  make_scheduler(optimizer, total_steps, power) -> LambdaLR (per step)
    prepare_model(model, rt) -> model on device (channels-last, DDP-wrapped when distributed)
    fit(model, optimizer, scheduler, step_fn, batches, cfg, run_dir, rt, *,
        validate_fn=None, meta=None, resume=False) -> history (list of per-epoch dicts)
    load_checkpoint_model / load_model(checkpoint_path, device) -> (model in eval mode, UNetConfig, ModelSpec)

    step_fn(model, item, ctx: StepContext) -> (loss tensor, slices in this step)
        `item` is whatever `batches(epoch)` yields (the teacher: one labelled batch; the student: a
        (labelled, pseudo-labelled) pair). Called inside autocast; moves tensors with ctx.to_device.
    batches(epoch) -> iterable of items for one epoch (sets its DistributedSampler's epoch); its
        len() (if any) sizes the progress bar.
    validate_fn(model, epoch) -> {"val_dsc": ...}: runs on rank 0 only, on the unwrapped model in
        eval mode, every cfg.val_every epochs and at the last epoch.

Checkpoints (RUN_DIR/last.pt every epoch, then RUN_DIR/best.pt when cfg.monitor improves; both written
atomically by rank 0): model state, meta (the caller's "model_config", "spec", "train_config"),
metrics history, epoch, optimizer, scheduler and grad-scaler state, the global RNG states, git commit.
`resume=True` restarts after the last completed epoch of last.pt, so a kill loses at most one epoch, and
the resumed run computes what the uninterrupted one would have (bit for bit on the CPU): RNG states are
restored and the loaders' randomness is a function of (seed, epoch) (training.data.EpochSampler).
On resume best.pt is reconciled with last.pt (`reconcile_best`), and a dead writer's temporary files in
RUN_DIR are removed at every start. Per-epoch metrics go to RUN_DIR/metrics.csv and RUN_DIR/curves.png
(rewritten from the history, also on resume).
"""

from __future__ import annotations

import contextlib
import csv
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from flare_infer.spec import ModelSpec
from training.model import UNet, UNetConfig
from training.utils import (
    Runtime,
    amp_dtype,
    barrier,
    git_commit,
    remove_stale_tmp,
    rng_state,
    set_rng_state,
    stop_point,
    write_atomic,
)


@dataclass(frozen=True)
class LoopConfig:
    epochs: int = 3000
    lr: float = 2e-4
    adam_betas: tuple[float, float] = (0.5, 0.999)
    poly_power: float = 0.9  # lr = lr0 * (1 - step / total) ** power, per optimizer step
    amp: bool = True  # autocast bf16 (GPU: fp16 + grad scaling where bf16 is missing; CPU: only with native bf16)
    val_every: int = 1  # epochs between validations (always at the last epoch)
    monitor: str = "val_dsc"  # validation metric maximised for best.pt
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.lr <= 0 or self.val_every < 1:
            raise ValueError(f"LoopConfig needs epochs >= 1, lr > 0, val_every >= 1; found {self}")


@dataclass
class StepContext:
    rt: Runtime
    epoch: int
    step: int

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.rt.device, non_blocking=True)
        if t.ndim == 4 and t.is_floating_point():  # channels-last: faster convolutions on GPU and CPU alike
            t = t.contiguous(memory_format=torch.channels_last)
        return t


StepFn = Callable[[nn.Module, Any, StepContext], tuple[torch.Tensor, int]]


def make_optimizer(model: nn.Module, cfg: LoopConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, power: float = 0.9):
    total = max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - min(s, total) / total) ** power)


def prepare_model(model: nn.Module, rt: Runtime) -> nn.Module:
    model = model.to(rt.device).to(memory_format=torch.channels_last)
    if rt.distributed:
        ids = [rt.device.index] if rt.is_cuda else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, state: dict) -> None:
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def _state(model, optimizer, scheduler, scaler, epoch, history, best, meta, rt) -> dict:
    return {
        "model": unwrap(model).state_dict(),
        **meta,
        "metrics": history,
        "epoch": epoch,  # last completed epoch (0-based)
        "best_score": best,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(rt),  # rank 0's; the loaders' randomness is (seed, epoch) and needs no state
        "git_commit": git_commit(),
    }


def load_model(checkpoint_path: str | Path, device: str | torch.device = "cpu") -> tuple[UNet, UNetConfig, ModelSpec]:
    """The U-Net of a checkpoint in eval mode on `device`, with its config and ModelSpec."""
    ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    for key in ("model", "model_config", "spec"):
        if key not in ckpt:
            raise KeyError(f"{checkpoint_path}: not a training checkpoint (no {key!r}); expected last.pt/best.pt")
    cfg = UNetConfig(**ckpt["model_config"])
    model = UNet(cfg)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg, ModelSpec.from_dict(ckpt["spec"], source=str(checkpoint_path))


# ----------------------------------------------------------------------------- metrics
def write_metrics(run_dir: Path, history: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(history)

    write_atomic(run_dir / "metrics.csv", write)
    _plot(run_dir / "curves.png", history)


def _plot(path: Path, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ep = [r["epoch"] for r in history]
    ax[0].plot(ep, [r["train_loss"] for r in history], label="train loss")
    ax[0].set_xlabel("epoch")
    ax[0].set_yscale("log")
    ax[0].legend()
    val_keys = sorted({k for r in history for k in r if k.startswith("val_")})
    for k in val_keys:
        pts = [(r["epoch"], r[k]) for r in history if r.get(k) not in (None, "")]
        ax[1].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=k)
    ax[1].set_xlabel("epoch")
    if val_keys:  # no validation yet: an empty legend would only warn
        ax[1].legend()
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=80))
    plt.close(fig)


def _mean_over_ranks(value: float, rt: Runtime) -> float:
    if not rt.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return t.item() / rt.world_size


# ----------------------------------------------------------------------------- the loop
def _progress(rt: Runtime) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), disable=not rt.is_main,
    )  # fmt: skip


# Off a terminal (a log file, a pipe) rich draws no bar: a plain line every `_log_every(steps)` steps instead.
LOG_LINES_PER_EPOCH, LOG_EVERY_UNSIZED = 10, 50


def _log_every(total: int | None) -> int:
    """Steps between progress lines off a terminal: about LOG_LINES_PER_EPOCH per epoch."""
    return LOG_EVERY_UNSIZED if not total else max(1, math.ceil(total / LOG_LINES_PER_EPOCH))


def _train_epoch(model, optimizer, scheduler, scaler, step_fn, items, ctx, progress, task, dtype):
    """One epoch; returns (mean loss, slices per second, the learning rate of its last step)."""
    model.train()
    entry = next(t for t in progress.tasks if t.id == task)
    lines = not progress.disable and not progress.console.is_terminal
    lr = optimizer.param_groups[0]["lr"]
    total_loss, n_steps, n_slices, t0 = 0.0, 0, 0, time.perf_counter()
    autocast = torch.autocast(ctx.rt.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    for item in items:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss, slices = step_fn(model, item, ctx)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"epoch {ctx.epoch} step {ctx.step}: loss is {loss.item()}; lower --lr or try --no-amp"
            )
        scaler.scale(loss).backward()
        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses; scheduler.step() sets the next one's
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        ctx.step += 1
        n_steps, n_slices, total_loss = n_steps + 1, n_slices + slices, total_loss + loss.item()
        rate = n_slices * ctx.rt.world_size / (time.perf_counter() - t0)
        info = f"loss {total_loss / n_steps:.4f}  lr {lr:.2e}  {rate:.1f} slices/s"
        progress.update(task, advance=1, info=info)
        if lines and (n_steps % _log_every(entry.total) == 0 or n_steps == entry.total):
            of = f"/{entry.total:.0f}" if entry.total else ""
            line = f"{entry.description} step {n_steps}{of}: {info.replace('  ', ', ')}"
            progress.console.print(line, soft_wrap=True)
    return total_loss / max(n_steps, 1), n_slices * ctx.rt.world_size / (time.perf_counter() - t0), lr


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    step_fn: StepFn,
    batches: Callable[[int], Iterable],
    cfg: LoopConfig,
    run_dir: str | Path,
    rt: Runtime,
    *,
    validate_fn: Callable[[nn.Module, int], dict[str, float]] | None = None,
    meta: dict | None = None,
    resume: bool = False,
) -> list[dict]:
    """Train `model` (already through `prepare_model`) for cfg.epochs; see the module docstring."""
    run_dir = Path(run_dir)
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(run_dir)  # a killed write's leftovers (only rank 0 writes here)
    meta = {"loop_config": asdict(cfg), **(meta or {})}
    dtype = amp_dtype(rt, cfg.amp)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=dtype == torch.float16)
    history, best, start, step = [], None, 0, 0
    if resume:
        history, best, start, step = _resume(run_dir, model, optimizer, scheduler, scaler, cfg, rt)
    with _progress(rt) as progress:
        for epoch in range(start, cfg.epochs):
            items = batches(epoch)
            total = len(items) if hasattr(items, "__len__") else None
            task = progress.add_task(f"{run_dir.name} epoch {epoch + 1}/{cfg.epochs}", total=total, info="")
            ctx = StepContext(rt, epoch, step)
            loss, rate, lr = _train_epoch(model, optimizer, scheduler, scaler, step_fn, items, ctx, progress, task,
                                          dtype)  # fmt: skip
            step = ctx.step
            progress.remove_task(task)
            row = {"epoch": epoch + 1, "train_loss": _mean_over_ranks(loss, rt), "lr": lr,  # as its last step used it
                   "slices_per_s": rate}  # fmt: skip
            if validate_fn is not None and rt.is_main and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
                net = unwrap(model).eval()
                with torch.no_grad():
                    row.update(validate_fn(net, epoch))
            history.append(row)
            best = _end_epoch(run_dir, model, optimizer, scheduler, scaler, epoch, history, best, meta, cfg, rt)
            if rt.is_main:
                # the run folder names the fold (fold_K) or the student round: every epoch line says which
                progress.console.print(f"{run_dir.name}: " + ", ".join(_fmt(k, v) for k, v in row.items()))
            barrier(rt)
            stop_point(epoch + 1)  # fault injection for tests (FLARE_TRAINING_FAULT): die like a kill here
    return history


def _fmt(key: str, value) -> str:
    return f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"


def _improves(score, best) -> bool:
    return score is not None and (best is None or score > best)


def best_epoch(history: list[dict], monitor: str) -> int | None:
    """The 0-based epoch best.pt holds after `history` (_end_epoch's rule replayed): the first epoch with the
    highest monitored score, or the latest epoch while none has been validated; None for no history."""
    best, at = None, None
    for row in history:
        score = row.get(monitor)
        if _improves(score, best):
            best, at = score, int(row["epoch"]) - 1
        elif best is None:
            at = int(row["epoch"]) - 1
    return at


def _end_epoch(run_dir, model, optimizer, scheduler, scaler, epoch, history, best, meta, cfg, rt):
    """Write checkpoints and metrics (rank 0); return the best monitored score so far.

    last.pt before best.pt: a kill between the two leaves last.pt naming itself the best epoch while best.pt
    holds the previous one, which `reconcile_best` repairs by copying last.pt. The other order would leave
    best.pt holding an epoch that the resumed run redoes, the previous best's weights already gone."""
    if not rt.is_main:
        return best
    improved = _improves(history[-1].get(cfg.monitor), best)
    best = history[-1][cfg.monitor] if improved else best
    state = _state(model, optimizer, scheduler, scaler, epoch, history, best, meta, rt)
    save_checkpoint(run_dir / "last.pt", state)
    if improved or best is None:  # no validation yet: best.pt is the latest
        save_checkpoint(run_dir / "best.pt", state)
    write_metrics(run_dir, history)
    return best


def reconcile_best(run_dir: Path, last: dict, monitor: str) -> bool:
    """Make RUN_DIR/best.pt hold the epoch last.pt's history names best; True if it had to be rewritten.

    Only a kill between last.pt's rename and best.pt's leaves them apart, and then the best epoch is
    last.pt's own, so last.pt is copied. Any other disagreement (best.pt deleted or replaced by hand) has
    lost the best weights: raised, since teacher.json and export would pick a wrong checkpoint."""
    path = run_dir / "best.pt"
    want = best_epoch(last["metrics"], monitor)
    held = torch.load(path, map_location="cpu", weights_only=False)["epoch"] if path.is_file() else None
    if held == want:
        return False
    if want != last["epoch"]:
        raise RuntimeError(
            f"{path} holds epoch {None if held is None else held + 1}, but last.pt's history makes epoch {want + 1} "
            f"the best ({monitor}), and only last.pt (epoch {last['epoch'] + 1}) is left to copy: restore that "
            f"best.pt, or train again without --resume"
        )
    save_checkpoint(path, last)
    return True


def _resume(run_dir: Path, model, optimizer, scheduler, scaler, cfg: LoopConfig, rt: Runtime):
    path = run_dir / "last.pt"
    if not path.is_file():
        return [], None, 0, 0
    ckpt = torch.load(path, map_location=rt.device, weights_only=False)
    unwrap(model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    if "rng" in ckpt:  # absent from checkpoints written before the RNG states were saved
        set_rng_state(ckpt["rng"], rt)
    epoch, history = int(ckpt["epoch"]), list(ckpt["metrics"])
    if rt.is_main:
        print(f"resuming {run_dir} after epoch {epoch + 1}")
        if reconcile_best(run_dir, ckpt, cfg.monitor):
            print(f"{run_dir / 'best.pt'}: a kill had left it behind last.pt's best epoch; rewritten from last.pt")
        write_metrics(run_dir, history)  # a kill after the checkpoints but before metrics.csv
    barrier(rt)
    return history, ckpt.get("best_score"), epoch + 1, int(scheduler.last_epoch)


def total_steps(epochs: int, steps_per_epoch: int) -> int:
    return epochs * max(1, math.ceil(steps_per_epoch))
