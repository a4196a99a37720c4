"""Progress inside an epoch: a line every few steps off a terminal, the learning rate as the optimiser used it.

    pytest tests/test_loop_progress.py
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from training.loop import LoopConfig, fit, make_optimizer, make_scheduler, total_steps
from training.utils import Runtime

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fit(tmp_path, epochs: int, steps: int, lr: float = 1e-2):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    cfg = LoopConfig(epochs=epochs, lr=lr, amp=False)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, total_steps(epochs, steps), cfg.poly_power)
    used: list[float] = []

    def step_fn(net, item, ctx):
        used.append(optimizer.param_groups[0]["lr"])  # what optimizer.step() will apply for this item
        x = ctx.to_device(item)
        return (net(x) ** 2).mean(), x.shape[0]

    def batches(epoch):
        return [torch.randn(2, 4) for _ in range(steps)]

    history = fit(model, optimizer, scheduler, step_fn, batches, cfg, tmp_path / "fold_0", Runtime(torch.device("cpu")))
    return history, used


def test_off_a_terminal_each_epoch_prints_about_ten_step_lines_with_the_rate_in_use(tmp_path, capsys):
    history, used = _fit(tmp_path, epochs=2, steps=20)
    out = capsys.readouterr().out
    lines = re.findall(r"^fold_0 epoch (\d)/2 step (\d+)/20: loss [\d.]+, lr ([\d.e+-]+), [\d.]+ slices/s$", out, re.M)
    assert [(int(e), int(s)) for e, s, _ in lines] == [(e, s) for e in (1, 2) for s in range(2, 21, 2)]
    # each line's lr is the one its step used (the poly schedule's value before that step's decay)
    assert [float(lr) for *_, lr in lines] == pytest.approx([used[k] for k in range(1, 40, 2)], rel=5e-3)


def test_the_epoch_row_records_the_rate_of_its_last_step_not_the_next_one(tmp_path, capsys):
    """One epoch: poly decay reaches 0 after the last step; the rate logged is the last step's, not that 0."""
    history, used = _fit(tmp_path, epochs=1, steps=5)
    assert history[0]["lr"] == used[-1] > 0
    assert f"lr {used[-1]:.4g}" in capsys.readouterr().out
