"""Does the slice loader keep up with training? Loader alone vs one training step, slices per second.

    python benchmarks/bench_loader.py                          # the paper's settings: width 32, batch 40, 256 x 256
    python benchmarks/bench_loader.py --steps 2 --batches 10   # quicker

Both rates are measured in the same run on the same machine: the DataLoader (worker processes,
memory-mapped cache, random 256 x 256 patches, the paper's augmentations at their default
probabilities) iterated on its own, and the teacher's training step (forward, Eq. 1 with deep
supervision, backward, Adam) on random batches of the same shape. The loader keeps up when its
rate is above the step's; the ratio is printed. The cache is synthetic (random CT-sized volumes
written as the cache stores them), since loading cost does not depend on content.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import typer

from training.augment import AugmentConfig, Augmenter
from training.data import CachedCase, SliceConfig, SliceDataset, worker_init
from training.loop import LoopConfig, make_optimizer
from training.losses import deep_supervision_loss, eq1_loss
from training.model import UNet, UNetConfig


def _synthetic_cache(root: Path, n_cases: int, shape_zyx: tuple[int, int, int]) -> list[CachedCase]:
    rng = np.random.default_rng(0)
    cases = []
    for i in range(n_cases):
        image, label = root / f"c{i}.npy", root / f"c{i}.label.npy"
        np.save(image, rng.random(shape_zyx, dtype=np.float32).astype(np.float16))
        np.save(label, rng.integers(0, 14, shape_zyx, dtype=np.uint8))
        cases.append(CachedCase(f"c{i}", image, label))
    return cases


def loader_rate(cases: list[CachedCase], batch_size: int, patch: int, workers: int, batches: int) -> float:
    ds = SliceDataset(cases, SliceConfig(1, patch), Augmenter(AugmentConfig()))
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, num_workers=workers,
        sampler=torch.utils.data.RandomSampler(ds, replacement=True, num_samples=(batches + 1) * batch_size),
        worker_init_fn=worker_init,
        persistent_workers=workers > 0, multiprocessing_context="forkserver" if workers > 0 else None,
    )  # fmt: skip
    it = iter(loader)
    next(it)  # worker start-up is paid once per run, not per epoch (persistent workers)
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += next(it)["image"].shape[0]
    return n / (time.perf_counter() - t0)


def step_rate(width: int, batch_size: int, patch: int, steps: int) -> float:
    model = UNet(UNetConfig(width=width)).train()
    opt = make_optimizer(model, LoopConfig())
    x = torch.rand(batch_size, 1, patch, patch)
    y = torch.randint(0, 14, (batch_size, patch, patch))

    def one_step() -> None:
        opt.zero_grad(set_to_none=True)
        main, aux = model(x)
        deep_supervision_loss(eq1_loss, main, aux, y).backward()
        opt.step()

    one_step()  # warm-up: allocator, first-call overheads
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    return steps * batch_size / (time.perf_counter() - t0)


def main(
    width: int = 32,
    batch_size: int = 40,
    patch: int = 256,
    steps: int = 3,
    batches: int = 20,
    workers: int = 2,
    cases: int = 4,
) -> None:
    print(f"torch threads {torch.get_num_threads()}, loader workers {workers}, batch {batch_size}, patch {patch}")
    with tempfile.TemporaryDirectory() as tmp:
        cached = _synthetic_cache(Path(tmp), cases, (40, 320, 320))  # (Z, Y, X): a 1.5 mm abdomen is ~300 px
        load = loader_rate(cached, batch_size, patch, workers, batches)
    print(f"loader alone:  {load:8.1f} slices/s")
    step = step_rate(width, batch_size, patch, steps)
    n_params = UNet(UNetConfig(width=width)).num_parameters()
    print(f"training step: {step:8.1f} slices/s  (width {width}, {n_params:,} params)")
    print(f"loader / step: {load / step:8.1f}x  ({'keeps up' if load > step else 'DOES NOT keep up'})")


if __name__ == "__main__":
    typer.run(main)
