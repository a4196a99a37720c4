"""Kill safety (issue 18): a SIGKILLed training run leaves no process and no temporary file behind, keeps best.pt
in step with last.pt, and its resumed run ends with the weights of an uninterrupted one, bit for bit on the CPU.

    pytest tests/test_killsafe.py -x

The end-to-end test runs `python -m training.student` (pseudo-labelling, then training: the phase with the
most helper processes) on tiny cases (width 4, 32 x 32 patches, `--workers 1`: each of its two loaders has a
real worker, so a forkserver and a resource tracker exist too) and SIGKILLs it three times: while a
pseudo-label is being written, while best.pt is being written, and at a random moment. The first two use the
FLARE_TRAINING_FAULT=pause:... switch (training.utils.pause_point), which stops the process between a
temporary file's write and its rename. Every process the run started carries a tag in its environment, so
survivors are found in /proc even after they have been re-parented.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from flare_infer.spec import ModelSpec
from training import utils
from training.augment import AugmentConfig, Augmenter
from training.data import CachedCase, EpochSampler, SliceConfig, SliceDataset, set_loader_epoch
from training.loop import LoopConfig, best_epoch, fit, make_optimizer, make_scheduler, save_checkpoint
from training.model import UNet, UNetConfig
from training.utils import Runtime, remove_stale_tmp
from training.utils import tmp_path as temporary_path

sys.path.insert(0, str(Path(__file__).parent))
from test_data import tiny_case, write_tiny_dataset  # noqa: E402

TAG_ENV = "FLARE_KILLSAFE_TAG"  # read by nothing but this test: marks every process a run starts
GRACE_S = 5.0  # "no process of the run survives the kill by more than a few seconds"
STUDENT = ["--epochs", "4", "--val-every", "2", "--lr", "1e-3", "--width", "4", "--batch-size", "8", "--patch-size",
           "32", "--workers", "1", "--device", "cpu", "--pseudo-batch-size", "8"]  # fmt: skip
TMP_NAME = re.compile(r"^\..+\.(\d+)(@[^/]+)?\.tmp(\.\w+)?$")


# ----------------------------------------------------------------------------- a run under observation
class Run:
    """One `python -m training.student` process (stdout and stderr to a log), tagged for /proc."""

    def __init__(self, args: list[str], log: Path, **env: str) -> None:
        self.tag, self.log = uuid.uuid4().hex, log
        env = {**os.environ, TAG_ENV: self.tag, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
        with open(log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "training.student", *args], stdout=f,
                                         stderr=subprocess.STDOUT, env=env)  # fmt: skip

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout_s: float = 300) -> None:
        t0 = time.monotonic()
        while needle not in self.text():
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {needle!r}:\n{self.text()[-3000:]}"
            assert time.monotonic() - t0 < timeout_s, f"no {needle!r} after {timeout_s} s:\n{self.text()[-3000:]}"
            time.sleep(0.1)

    def processes(self) -> list[str]:
        """Live (not zombie) processes carrying this run's tag: 'PID STATE COMMAND'."""
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if f"{TAG_ENV}={self.tag}".encode() not in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    continue
                stat = Path(f"/proc/{pid}/stat").read_text()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:100]
            except OSError:  # exited meanwhile, or not ours to read
                continue
            if stat[stat.rindex(")") + 2] not in "ZX":
                found.append(f"{pid} {stat[stat.rindex(')') + 2]} {cmd}")
        return found

    def kill(self) -> tuple[list[str], float]:
        """SIGKILL the trainer; (its processes just before, seconds until the last of them was gone)."""
        before = self.processes()
        self.proc.kill()
        self.proc.wait()
        return before, self.wait_helpers_gone()

    def wait_helpers_gone(self) -> float:
        t0 = time.monotonic()
        while (left := self.processes()) and time.monotonic() - t0 < GRACE_S:
            time.sleep(0.1)
        for line in left:  # a failing test must not leave them running for good either
            os.kill(int(line.split()[0]), signal.SIGKILL)
        assert not left, f"{len(left)} processes of the run outlived the trainer by {GRACE_S} s: {left}"
        return time.monotonic() - t0

    def finish(self, timeout_s: float = 300) -> None:
        assert self.proc.wait(timeout_s) == 0, self.text()[-3000:]
        self.wait_helpers_gone()  # the forkserver and the resource tracker exit just after the trainer


@pytest.fixture
def start():
    """start(args, log, **env) -> a Run; any still running at the end of the test is killed."""
    runs: list[Run] = []

    def start_run(args: list[str], log: Path, **env: str) -> Run:
        runs.append(Run(args, log, **env))
        return runs[-1]

    yield start_run
    for run in runs:  # a failed test: SIGKILL what is left, helpers included (they may be what failed)
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
            time.sleep(0.5)
            for line in run.processes():
                os.kill(int(line.split()[0]), signal.SIGKILL)


def _tmp_files(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob(".*") if TMP_NAME.match(p.name))


def _dead_writers_files(*roots: Path) -> list[Path]:
    return [p for p in _tmp_files(*roots) if not Path(f"/proc/{TMP_NAME.match(p.name)[1]}").exists()]


# ----------------------------------------------------------------------------- tiny data, a one-member teacher
def _write_data(root: Path) -> tuple[Path, Path]:
    data = write_tiny_dataset(root / "data", 3)
    write_tiny_dataset(data / "validation", 1)
    (root / "unlabelled").mkdir()
    for i in range(2):
        sitk.WriteImage(tiny_case(10 + i)[0], str(root / "unlabelled" / f"Case_{i + 1:05d}_0000.nii.gz"))
    return data, root / "unlabelled"


def _write_teacher(root: Path) -> Path:
    """teacher.json in training.teacher's format: one seeded U-Net on the tiny cases' own spacing."""
    spec = ModelSpec(input_channels=1, spacing_xyz_mm=(3.0, 3.0, 5.0))
    torch.manual_seed(7)
    model = UNet(UNetConfig(width=4)).eval()
    (root / "fold_0").mkdir(parents=True)
    save_checkpoint(root / "fold_0" / "best.pt", {"model": model.state_dict(), "model_config": model.cfg.to_dict(),
                                                  "spec": spec.to_dict(), "epoch": 0})  # fmt: skip
    member = {"fold": 0, "checkpoint": "fold_0/best.pt", "score": 0.5}
    (root / "teacher.json").write_text(json.dumps({"members": [member], "spec": spec.to_dict()}))
    return root / "teacher.json"


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _csv_scores(run_dir: Path) -> list[tuple[str, str, str]]:
    """(epoch, train_loss, val_dsc) of metrics.csv: what must match an uninterrupted run (not slices/s)."""
    import csv

    with open(run_dir / "metrics.csv") as f:
        return [(r["epoch"], r["train_loss"], r.get("val_dsc", "")) for r in csv.DictReader(f)]


def _assert_in_step(out: Path, monitor: str = "val_dsc") -> None:
    """last.pt, best.pt and metrics.csv tell the same story."""
    last, best = _ckpt(out / "last.pt"), _ckpt(out / "best.pt")
    history = last["metrics"]
    scores = [r[monitor] for r in history if monitor in r]
    assert last["best_score"] == max(scores)
    assert best["epoch"] == best_epoch(history, monitor) and best["metrics"][-1][monitor] == max(scores)
    assert best["best_score"] == last["best_score"]
    assert [int(e) for e, _, _ in _csv_scores(out)] == [r["epoch"] for r in history]


# ----------------------------------------------------------------------------- the end-to-end test
@pytest.mark.slow
def test_three_sigkills_leave_nothing_behind_and_resume_to_the_uninterrupted_weights(tmp_path, start):
    data, unlabelled = _write_data(tmp_path)
    teacher = _write_teacher(tmp_path / "teacher")

    def args(name: str) -> list[str]:
        return ["--data", str(data), "--unlabelled", str(unlabelled), "--teacher", str(teacher),
                "--out", str(tmp_path / name), "--cache", str(tmp_path / f"cache_{name}"), *STUDENT]  # fmt: skip

    reference = start(args("reference"), tmp_path / "reference.log")  # alongside: it shares nothing with the others

    out, cache = tmp_path / "killed", tmp_path / "cache_killed"
    # 1. during pseudo-labelling: a label's temporary file written, not yet renamed
    run = start(args("killed"), tmp_path / "kill1.log", FLARE_TRAINING_FAULT="pause:write:*.pseudo.npy")
    run.wait_for("FLARE_TRAINING_FAULT pause write:")
    stray = _tmp_files(cache)
    assert any(".pseudo.npy." in p.name for p in stray), stray
    run.kill()

    # 2. during best.pt's write at epoch 2 (its first validation: always an improvement), after last.pt's
    run = start([*args("killed"), "--resume"], tmp_path / "kill2.log", FLARE_TRAINING_FAULT="pause:write:best.pt@2")
    run.wait_for("FLARE_TRAINING_FAULT pause write:best.pt")
    assert not any(p.exists() for p in stray), "the first kill's temporary files outlived the next start"
    assert not _dead_writers_files(out, cache)
    before, _ = run.kill()
    assert len(before) >= 4, before  # trainer, forkserver, a worker per loader (and the resource tracker)
    assert _ckpt(out / "last.pt")["epoch"] == 1 and _ckpt(out / "best.pt")["epoch"] == 0  # out of step now

    # 3. at a random moment of the resumed run (seeded from the clock; the delay is in the failure message)
    delay = random.Random().uniform(0.0, 2.0)
    run = start([*args("killed"), "--resume"], tmp_path / "kill3.log")
    run.wait_for("resuming")
    time.sleep(delay)
    assert run.proc.poll() is None, f"finished within {delay:.2f} s of resuming: lengthen the run"
    assert not _dead_writers_files(out, cache), f"kill after {delay:.2f} s"
    run.kill()
    repaired = run.text()

    run = start([*args("killed"), "--resume"], tmp_path / "final.log")
    run.finish()
    # best.pt repaired by the start after the second kill (or, killed before it got there, by this one)
    assert "rewritten from last.pt" in repaired + run.text()
    reference.finish()
    assert not _tmp_files(out, cache)
    _assert_in_step(out)
    _assert_in_step(tmp_path / "reference")
    assert _csv_scores(out) == _csv_scores(tmp_path / "reference"), f"random kill after {delay:.2f} s"
    for name in ("last.pt", "best.pt"):
        ours, ref = _ckpt(out / name)["model"], _ckpt(tmp_path / "reference" / name)["model"]
        differ = [k for k in ref if not torch.equal(ours[k], ref[k])]
        assert not differ, f"{name}: {len(differ)} tensors differ from the uninterrupted run ({differ[:3]})"


@pytest.mark.slow
def test_the_early_stop_hook_leaves_no_helper_process(tmp_path, start):
    data, unlabelled = _write_data(tmp_path)
    teacher = _write_teacher(tmp_path / "teacher")
    run = start(["--data", str(data), "--unlabelled", str(unlabelled), "--teacher", str(teacher),
               "--out", str(tmp_path / "out"), *STUDENT], tmp_path / "log",
              FLARE_TRAINING_FAULT="stop-after-epoch:1")  # fmt: skip
    assert run.proc.wait(300) == 137, run.text()[-3000:]
    run.wait_helpers_gone()


# ----------------------------------------------------------------------------- the parts, fast
class _Noisy(nn.Module):
    """A step that draws from the global torch RNG (as dropout would): resumes only match if it is restored."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x + torch.randn_like(x))


def _fit_noisy(run_dir: Path, epochs: int, resume: bool) -> dict:
    torch.manual_seed(0)
    model = _Noisy()
    cfg = LoopConfig(epochs=epochs, lr=1e-2, amp=False)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, 3 * 4)  # the same schedule however the run is cut
    data = torch.arange(16.0).reshape(4, 4)

    def step(model, x, ctx):
        return model(x).square().mean(), 1

    fit(model, optimizer, scheduler, step, lambda epoch: list(data), cfg, run_dir, Runtime(torch.device("cpu")),
        resume=resume)  # fmt: skip
    return model.state_dict()


def test_resume_restores_the_rng_state(tmp_path, one_torch_thread):
    whole = _fit_noisy(tmp_path / "whole", 3, resume=False)
    _fit_noisy(tmp_path / "cut", 2, resume=False)
    torch.manual_seed(123)  # whatever the process did in between
    resumed = _fit_noisy(tmp_path / "cut", 3, resume=True)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def _cases(tmp_path: Path) -> list[CachedCase]:
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.random((6, 40, 44)).astype(np.float16))
    np.save(tmp_path / "a.label.npy", rng.integers(0, 3, (6, 40, 44)).astype(np.uint8))
    return [CachedCase("a", tmp_path / "a.npy", tmp_path / "a.label.npy")]


def test_an_epochs_items_depend_on_seed_and_epoch_only_not_on_what_came_before(tmp_path):
    """Crops and augmentations ride with the sampler's per-item seeds, so a loader that already served epochs
    0 and 1 (its RNGs moved on) and a fresh one (a resumed run) serve epoch 2 identically."""
    aug = Augmenter(AugmentConfig(p_elastic=0.5, p_grid=0.5, p_optical=0.5), seed=0)
    ds = SliceDataset(_cases(tmp_path), SliceConfig(patch_size=32), aug)

    def loader():
        return torch.utils.data.DataLoader(ds, batch_size=4, sampler=EpochSampler(None, len(ds), seed=3))

    def epoch(dl, e):
        set_loader_epoch(dl, e)
        return [b["image"] for b in dl] + [b["label"] for b in dl]

    used = loader()
    e0, _, e2 = (epoch(used, e) for e in range(3))
    fresh = epoch(loader(), 2)
    assert all(torch.equal(a, b) for a, b in zip(e2, fresh, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(e0, e2, strict=True))


def test_only_dead_writers_temporary_files_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "Case_00001.pseudo.npy"
    mine = temporary_path(target)
    theirs = tmp_path / mine.name.replace(f".{os.getpid()}@", f".{dead.pid}@")
    legacy = tmp_path / f".{target.name}.{dead.pid}.tmp.npy"  # the older, host-less name
    other_host = tmp_path / f".{target.name}.{dead.pid}@elsewhere.example.tmp.npy"
    kept_file = tmp_path / "Case_00001.npy"
    for p in (mine, theirs, legacy, other_host, kept_file):
        p.write_bytes(b"x")
    assert sorted(remove_stale_tmp(tmp_path)) == sorted([theirs, legacy])
    assert mine.exists() and other_host.exists() and kept_file.exists()


# ----------------------------------------------------------------------------- the one fault switch
def test_the_retired_hook_names_do_nothing_and_the_one_switch_warns_loudly(monkeypatch, capsys):
    """A stale TRAINING_STOP_AFTER_EPOCH or FLARE_TEST_PAUSE_AT in a user's shell no longer stops or hangs
    training (they made it os._exit(137) or sleep for good); FLARE_TRAINING_FAULT, the one switch left, is
    announced on stderr at every start (setup_runtime) and refused when malformed. Mutations caught: the
    warning call removed from setup_runtime; the old STOP_ENV check put back in stop_point; an unknown kind
    accepted (returned as is)."""
    monkeypatch.delenv(utils.FAULT_ENV, raising=False)
    monkeypatch.setenv("TRAINING_STOP_AFTER_EPOCH", "1")
    monkeypatch.setenv("FLARE_TEST_PAUSE_AT", "write:*")
    monkeypatch.setattr(utils.os, "_exit", lambda code: pytest.fail(f"os._exit({code}) called"))
    utils.stop_point(1)
    utils.pause_point("write:best.pt")  # would sleep for good if the old name still acted
    utils.setup_runtime("cpu")
    assert capsys.readouterr().err == ""

    monkeypatch.setenv(utils.FAULT_ENV, "stop-after-epoch:2")
    utils.setup_runtime("cpu")
    err = capsys.readouterr().err
    assert "WARNING: FLARE_TRAINING_FAULT=stop-after-epoch:2 is set" in err and "exit (137)" in err
    utils.stop_point(1)  # another epoch: goes on
    monkeypatch.setattr(utils.os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    with pytest.raises(SystemExit) as stopped:
        utils.stop_point(2)
    assert stopped.value.code == utils.KILLED_EXIT

    for bad in ("stop_after_epoch:2", "pause", "pause:", "2"):
        monkeypatch.setenv(utils.FAULT_ENV, bad)
        with pytest.raises(ValueError, match="expected stop-after-epoch:N or pause:PATTERN"):
            utils.setup_runtime("cpu")


def test_the_pause_switch_stops_at_the_nth_matching_point(monkeypatch, capsys):
    """pause:PATTERN@N sleeps at the N-th matching point only (the sleep replaced by an exception here)."""
    monkeypatch.setenv(utils.FAULT_ENV, "pause:write:best.pt@2")
    monkeypatch.setattr(utils, "_pause_hits", 0)
    monkeypatch.setattr(utils.time, "sleep", lambda s: (_ for _ in ()).throw(TimeoutError("paused")))
    utils.pause_point("write:last.pt")
    utils.pause_point("write:best.pt")
    with pytest.raises(TimeoutError):
        utils.pause_point("write:best.pt")
    assert f"FLARE_TRAINING_FAULT pause write:best.pt pid {os.getpid()}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- hosts other than Linux
def test_helper_processes_are_spawned_where_there_is_no_forkserver(tmp_path, monkeypatch):
    """Windows has no forkserver: the loader (and the cache pool) then spawn their workers instead of failing with
    ValueError at the first fold. Mutation caught: "forkserver" unconditionally."""
    from training import data

    ds = SliceDataset(_cases(tmp_path), SliceConfig(patch_size=32))
    rt = Runtime(torch.device("cpu"))
    loader = data.make_loader(ds, batch_size=2, workers=1, oversample=0.0, seed=0, rt=rt)
    assert loader.multiprocessing_context.get_start_method() == "forkserver"  # Linux, as tested everywhere else
    monkeypatch.setattr(data, "get_all_start_methods", lambda: ["spawn"])  # what Windows offers
    loader = data.make_loader(ds, batch_size=2, workers=1, oversample=0.0, seed=0, rt=rt)
    assert loader.multiprocessing_context.get_start_method() == "spawn"


def test_pid_alive_on_windows_asks_psutil_and_never_os_kill(monkeypatch):
    """On Windows os.kill(pid, 0) would send CTRL_C_EVENT to the process group instead of probing (remove_stale_tmp
    runs it at every start). Mutation caught: the win32 branch removed (os.kill called)."""
    psutil = pytest.importorskip("psutil", reason="psutil (the train extra) answers on Windows")
    monkeypatch.setattr(psutil, "pid_exists", lambda pid: pid == 4242)  # Windows' answer (Linux's psutil uses kill)
    monkeypatch.setattr(utils.sys, "platform", "win32")
    monkeypatch.setattr(utils.os, "kill", lambda *a: pytest.fail(f"os.kill{a} on Windows"))
    assert utils.pid_alive(4242) and not utils.pid_alive(4243)
