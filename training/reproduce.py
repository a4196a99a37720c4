"""The paper's Table 4 on generated data: single U-Net vs three-network teacher vs student, with ablations.

    python -m training.reproduce --out runs/reproduce                      # full, seeds 0,1,2: about 3 h on 2 CPU cores
                                                                           # (the report: runs/reproduce/RESULTS.md)
    python -m training.reproduce --out runs/quick --quick                  # CI: <= 5 min, numbers not meaningful
    python -m training.reproduce --out runs/reproduce --results docs/RESULTS.md
    python -m training.reproduce --out runs/quick2 --sizes quick --seeds 0,1 --data DIR   # DIR: FLARE22 layout
    python -m training.reproduce --out runs/paper --sizes paper --data FLARE22 --device cuda   # the paper's sizes

Steps (each skipped when a previous run of the same RUN_DIR finished it; RUN_DIR/steps.json keeps
the command lines and durations, RUN_DIR/logs/ their output):
  1. `python -m training.phantoms`: few labelled cases from the narrow domain, many unlabelled and the
     validation set from the wide one (FLARE22's structure), fixed seed;
  2. `python -m training.teacher`: five folds, the best three are the teacher (b);
  3. the single U-Net (a): one network on *all* labelled cases. The teacher CLI always holds a fold
     out, so this step calls its library (`training.teacher.train_fold` with every case in "train")
     in-process, with the teacher's exact configuration;
  4. `python -m training.student` in the paper's setting (c) and one run per training ablation
     (all unlabelled cases, confidence filtering, 3-slice input);
  5. `python -m training.export` of (c), `python -m flare_infer predict` with it (with and without
     `--postprocess lcc`); (a), (b) and the ablation students predict in-process through
     `flare_infer.pipeline.predict_case`; every model is also timed per case that way;
  6. `python -m flare_infer.evaluate` of every prediction folder;
  7. the claim across seeds (--seeds): (a), (c), our recipe's student and (a') a single U-Net with as many
     optimizer steps as our student (its teacher member's included) again at every other seed, into
     RUN_DIR/seed_K/ (seed 0 is RUN_DIR itself), with the one seed-0 teacher; then the Markdown report,
     table4.json and table4_seeds.png (training/seeds_report.py).

With --data DIR the phantoms step is skipped (DIR/labelled, DIR/unlabelled, DIR/validation in the FLARE22
layout, validation labels included) and so is the pseudo-label quality (it needs the generator's truth).

No model ever sees the validation set before its final evaluation: folds are chosen on labelled
cross-validation, the students validate (once, at their last epoch) on the labelled set.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from enum import Enum
from pathlib import Path

import numpy as np
import typer

from flare_infer import io
from flare_infer.evaluate import mean_std
from flare_infer.labels import ORGANS
from flare_infer.pipeline import predict_case
from training import seeds_report
from training.cli import require_train_extra, typer_app
from training.seeds_report import MODELS, ModelScores

SEED = 0
PAPER_FRACTION = 0.375  # 750 of FLARE22's 2000 unlabelled cases
PAPER_TABLE4 = {"single": 0.4815, "teacher": 0.4973, "student": 0.5272}  # mean DSC, FLARE22 validation


@dataclass(frozen=True)
class Sizes:
    """Dataset and training sizes of one configuration (see docs/REPRODUCE.md for how they were chosen)."""

    name: str
    labelled: int
    unlabelled: int
    validation: int
    spacing: str  # x,y,z mm of the networks' grid
    patch: int
    width: int
    depth: int
    batch: int
    lr: float  # Adam, both phases: the paper's 2e-4 / 1e-5 are for 3000 / 200 epochs, not a few
    teacher_epochs: int  # also the single U-Net's
    student_epochs: int  # an epoch is one pass over the pseudo-labelled slices (plus as many labelled ones)
    workers: int
    confidence: float  # threshold of the confidence-filtering ablation
    bootstrap: int  # resamples for the 95% intervals
    # Augmentation, all models alike. The paper's (flips 0.5, rotations 0.5 up to 90 deg, distortions 0.2) is
    # for 3000 epochs; in tens of epochs it keeps a U-Net at half the DSC (measured: docs/REPRODUCE.md).
    p_flip: float = 0.0
    p_rotate: float = 0.0
    p_distort: float = 0.1
    oversample: float = 0.5  # --oversample of the organ-balanced sampling ablation and of "ours"
    student_batch: int | None = None  # phase two's batch and lr; None: phase one's
    student_lr: float | None = None
    amp: bool = False  # CPU runs stay in float32 (docs/TRAINING.md: bf16's effect on scores not A/B-tested)
    phantom_size: str = "small"  # python -m training.phantoms --size
    seeds: tuple[int, ...] = (SEED,)  # default --seeds: the claim's training seeds


QUICK = Sizes("quick", labelled=5, unlabelled=4, validation=3, spacing="6,6,8", patch=64, width=8, depth=4, batch=16,
              lr=1e-3, teacher_epochs=3, student_epochs=2, workers=0, confidence=0.9, bootstrap=2000)  # fmt: skip
FULL = Sizes("full", labelled=10, unlabelled=24, validation=20, spacing="5,5,6", patch=80, width=16, depth=5, batch=8,
             lr=1e-3, teacher_epochs=20, student_epochs=7, workers=0, confidence=0.9, bootstrap=10000,
             seeds=(0, 1, 2))  # fmt: skip
# The paper's recipe (README "Training", the training CLIs' defaults): meant for a GPU and FLARE22 (--data);
# the counts are FLARE22's (50 labelled, 2000 unlabelled, 50 validation) and are replaced by --data's.
PAPER = Sizes("paper", labelled=50, unlabelled=2000, validation=50, spacing="1.5,1.5,2.5", patch=256, width=32,
              depth=5, batch=40, lr=2e-4, teacher_epochs=3000, student_epochs=200, workers=4, confidence=0.9,
              bootstrap=10000, p_flip=0.5, p_rotate=0.5, p_distort=0.2, student_batch=20, student_lr=1e-5, amp=True,
              phantom_size="full", seeds=(0, 1, 2))  # fmt: skip
SIZES = {s.name: s for s in (QUICK, FULL, PAPER)}

# Students: the paper's setting first, then one change each, then every change that helps at once.
STUDENTS = {
    "paper": [],
    "all_unlabelled": ["--unlabelled-fraction", "1.0"],
    "confidence": ["--confidence-threshold", "{confidence}"],
    "in3": ["--in-channels", "3"],
    "oversample": ["--oversample", "{oversample}"],
    "ours": [
        "--unlabelled-fraction",
        "1.0",
        "--confidence-threshold",
        "{confidence}",
        "--oversample",
        "{oversample}",
        "--init-from-teacher",
    ],
}


# ----------------------------------------------------------------------------- steps, resumable
# Run by `dies_with_this_process`'s wrapper: a fresh interpreter (no threads yet, so nothing can be locked at
# fork) asks the kernel for SIGTERM when its parent dies (Linux prctl PR_SET_PDEATHSIG, which survives exec),
# checks that the parent did not die before that, then becomes the real command.
_DIE_WITH_PARENT = """
import ctypes, os, signal, sys
parent = int(sys.argv[1])
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass  # not Linux: the command runs without the death signal
if os.getppid() != parent:
    sys.exit(1)  # the parent is already gone
os.execv(sys.argv[2], sys.argv[2:])
"""


def dies_with_this_process(cmd: list[str]) -> list[str]:
    """`cmd` (a program and its arguments) wrapped so that the kernel sends it SIGTERM when this process dies, by
    SIGKILL too: a run's steps never outlive the run (Linux; elsewhere `cmd` runs without the signal).

    Seen before this (2026-12-01): a SIGTERM to `training.reproduce` left its teacher step training on, orphaned.
    """
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]


class Steps:
    """Runs and records each step once: RUN_DIR/steps.json holds command, seconds, and whether it finished."""

    def __init__(self, out: Path) -> None:
        self.out, self.path = out, out / "steps.json"
        self.done: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def finished(self, name: str, output: Path) -> bool:
        return name in self.done and output.exists()

    def record(self, name: str, command: str, seconds: float) -> None:
        self.done[name] = {"command": command, "seconds": round(seconds, 1)}
        self.path.write_text(json.dumps(self.done, indent=1) + "\n")

    def module(self, name: str, argv: list[str], output: Path) -> None:
        """`python -m ARGV...` as a user types it; output is what exists once it has finished."""
        command = shlex.join(["python", "-m", *argv])
        if self.finished(name, output):
            print(f"[reproduce] {name}: done before ({output}), skipped")
            return
        print(f"[reproduce] {name}: {command}", flush=True)
        log = self.out / "logs" / f"{name}.log"
        t0 = time.perf_counter()
        with log.open("w") as f:
            # the step dies with this run, also when the run is killed (no orphaned training left behind)
            proc = subprocess.run(dies_with_this_process([sys.executable, "-m", *argv]), stdout=f,
                                  stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        if proc.returncode != 0:
            tail = "\n".join(log.read_text().splitlines()[-25:])
            raise RuntimeError(f"step {name} failed (exit {proc.returncode}): {command}\n--- {log} (tail) ---\n{tail}")
        self.record(name, command, time.perf_counter() - t0)

    def call(self, name: str, description: str, fn, output: Path) -> None:
        """An in-process step (no CLI exists for it); description says what was called."""
        if self.finished(name, output):
            print(f"[reproduce] {name}: done before ({output}), skipped")
            return
        print(f"[reproduce] {name}: {description}", flush=True)
        t0 = time.perf_counter()
        fn()
        self.record(name, description, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- training
def common_args(s: Sizes, device: str, seed: int = SEED, student: bool = False) -> list[str]:
    batch = (s.student_batch or s.batch) if student else s.batch
    lr = (s.student_lr or s.lr) if student else s.lr
    return ["--batch-size", str(batch), "--lr", str(lr), "--width", str(s.width), "--depth", str(s.depth),
            "--patch-size", str(s.patch), "--workers", str(s.workers), "--seed", str(seed), "--device", device,
            "--p-flip", str(s.p_flip), "--p-rotate", str(s.p_rotate), "--p-distort", str(s.p_distort),
            "--amp" if s.amp else "--no-amp"]  # fmt: skip


def teacher_argv(data: Path, out: Path, s: Sizes, device: str) -> list[str]:
    """The one teacher, seed 0 whatever --seeds says: every seed's students learn from it."""
    return ["training.teacher", "--data", str(data / "labelled"), "--out", str(out),
            "--epochs", str(s.teacher_epochs), "--spacing", s.spacing,
            "--val-every", str(max(1, s.teacher_epochs // 3)), *common_args(s, device)]  # fmt: skip


def student_extra(name: str, s: Sizes) -> list[str]:
    """STUDENTS[name] with the sizes' confidence threshold and oversampling filled in."""
    return [a.format(confidence=s.confidence, oversample=s.oversample) for a in STUDENTS[name]]


def student_argv(data: Path, teacher_json: Path, out: Path, extra: list[str], s: Sizes, device: str,
                 seed: int = SEED) -> list[str]:  # fmt: skip
    # --validation is the labelled set and validated only at the last epoch: best.pt is the last epoch and the
    # generated validation set stays unseen until the evaluation.
    if "--unlabelled-fraction" not in extra:
        extra = ["--unlabelled-fraction", str(PAPER_FRACTION), *extra]
    return ["training.student", "--data", str(data / "labelled"), "--unlabelled", str(data / "unlabelled"),
            "--teacher", str(teacher_json), "--out", str(out), "--validation", str(data / "labelled"),
            "--epochs", str(s.student_epochs), "--val-every", str(s.student_epochs),
            *common_args(s, device, seed, student=True), *extra]  # fmt: skip


def train_single_unet(data: Path, out: Path, teacher_dir: Path, s: Sizes, device: str, seed: int = SEED,
                      epochs: int | None = None) -> Path:  # fmt: skip
    """(a): one U-Net on every labelled case, phase one's configuration; returns its last.pt.

    `python -m training.teacher` always holds a fold out, so this uses its library: `train_fold` with
    every case in "train". It validates on the same (training) cases once, at the last epoch, so the
    generated validation set stays unseen; the result is last.pt. `epochs` (default the teacher's) is
    set for (a'), the single U-Net with our recipe's step count. The teacher's intensity window and
    cache are reused: the preprocessing is the same at every seed.
    """
    from training.augment import AugmentConfig
    from training.data import build_cache, discover_labelled
    from training.loop import LoopConfig
    from training.model import UNetConfig
    from training.teacher import TeacherConfig, resolve_window, train_fold
    from training.utils import setup_runtime, teardown

    epochs = epochs or s.teacher_epochs
    cfg = TeacherConfig(
        loop=LoopConfig(epochs=epochs, lr=s.lr, amp=s.amp, val_every=epochs, seed=seed),
        model=UNetConfig(in_channels=1, width=s.width, depth=s.depth, deep_supervision=True),
        augment=AugmentConfig.from_cli(s.p_flip, s.p_rotate, s.p_distort),
        batch_size=s.batch, patch_size=s.patch,
        spacing_xyz_mm=tuple(float(v) for v in s.spacing.split(",")), workers=s.workers,
    )  # fmt: skip
    rt = setup_runtime(device)
    try:
        labelled = discover_labelled(data / "labelled")
        out.mkdir(parents=True, exist_ok=True)
        window = teacher_dir / "normalization.json"
        if window.is_file() and not (out / "normalization.json").is_file():  # the teacher's window, any seed
            shutil.copyfile(window, out / "normalization.json")
        cfg = resolve_window(cfg, labelled, out, rt)
        cached = {c.name: c for c in build_cache(labelled, cfg.spec(), teacher_dir / "cache", s.workers)}
        names = sorted(cached)
        train_fold(0, {"train": names, "val": names}, cached, cfg, out, rt, resume=False)
    finally:
        teardown(rt)
    return out / "fold_0" / "last.pt"


# ----------------------------------------------------------------------------- inference, timed
@dataclass(frozen=True)
class Model:
    """A model as predict_case runs it: loaded lazily so only one is in memory at a time."""

    name: str
    kind: str  # "torch" (checkpoint), "teacher" (teacher.json), "onnx"
    path: Path


def load_for_inference(model: Model, device: str):
    """(predict_batch, spec) of a checkpoint, a teacher.json or an ONNX file."""
    import torch

    from training.teacher import load_teacher

    if model.kind == "onnx":
        from flare_infer.session import load_model as load_onnx

        m = load_onnx(model.path, device="cpu", threads=torch.get_num_threads())
        return m.predict, m.spec
    torch_device = "cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    teacher = load_teacher(model.path, torch_device)  # a teacher.json, or a checkpoint as a one-member teacher
    return teacher.predict_batch(torch_device), teacher.spec


def predict_folder(model: Model, images: list[Path], out_dir: Path, device: str, batch_size: int = 16) -> list[float]:
    """Masks of every image into out_dir; returns the seconds of predict_case per case (no reading/writing)."""
    predict_batch, spec = load_for_inference(model, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds = []
    for path in images:
        image = io.read_ct(path)
        t0 = time.perf_counter()
        mask = predict_case(image, predict_batch, spec, batch_size=batch_size)
        seconds.append(time.perf_counter() - t0)
        io.write_mask(mask, out_dir / io.output_name(path))
    return seconds


# ----------------------------------------------------------------------------- scores and statistics
def read_scores(csv_path: Path) -> dict[str, dict[str, np.ndarray]]:
    """{"dsc": {organ short: (cases,)}, "nsd": ...} from `python -m flare_infer.evaluate --csv`."""
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{csv_path}: no cases scored; expected one row per validation case")
    out = {}
    for metric, suffix in (("dsc", "_DSC"), ("nsd", "_NSD")):
        out[metric] = {o.short: np.array([float(r[o.short + suffix] or "nan") for r in rows]) for o in ORGANS}
    out["names"] = [r["Name"] for r in rows]
    return out


def case_means(scores: dict, metric: str) -> np.ndarray:
    """Per case: the mean over the 13 organs (FLARE22's summary), shape (cases,)."""
    return np.nanmean(np.stack([scores[metric][o.short] for o in ORGANS]), axis=0)


def bootstrap_ci(values: np.ndarray, n: int, seed: int = SEED) -> tuple[float, float]:
    """95% percentile interval of the mean, resampling cases."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: np.ndarray, n_boot: int) -> Summary:
        lo, hi = bootstrap_ci(values, n_boot)
        return cls(float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0, lo, hi, len(values))

    def cell(self) -> str:
        return f"{self.mean:.4f} ± {self.std:.4f} [{self.lo:.4f}, {self.hi:.4f}]"


def difference(a: np.ndarray, b: np.ndarray, n_boot: int) -> tuple[float, float, float, bool]:
    """b - a per case: mean, paired 95% bootstrap interval, and whether that interval excludes 0."""
    diff = b - a
    lo, hi = bootstrap_ci(diff, n_boot)
    return float(diff.mean()), lo, hi, bool(lo > 0 or hi < 0)


def compare(subject: str, reference: str, a: np.ndarray, b: np.ndarray, metric: str, n_boot: int) -> str:
    """A sentence from the numbers: `subject` (b) against `reference` (a), paired over cases."""
    mean, lo, hi, resolved = difference(a, b, n_boot)
    direction = "higher" if mean > 0 else "lower" if mean < 0 else "no different"
    verdict = ("excludes 0: a difference this sample resolves" if resolved
               else "includes 0: not distinguishable from case-to-case variation on this sample")  # fmt: skip
    few = f" With only {len(a)} cases the interval itself is rough." if len(a) < 10 else ""
    return (
        f"{subject} is {abs(mean):.4f} {direction} in mean {metric} than {reference} "
        f"(paired 95% bootstrap interval of the difference [{lo:+.4f}, {hi:+.4f}], which {verdict}).{few}"
    )


# ----------------------------------------------------------------------------- the report
def machine() -> dict:
    import torch

    model = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": model, "cores": cores, "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__,
            "os": platform.platform(), "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}  # fmt: skip


def table4(results: dict, n_boot: int) -> list[str]:
    lines = ["| model | mean DSC ± std [95% CI] | mean NSD ± std [95% CI] | cases | paper (FLARE22 val., DSC) |",
             "|---|---|---|---|---|"]  # fmt: skip
    labels = {"single": "(a) single U-Net, all labelled", "teacher": "(b) teacher: 3-network ensemble",
              "student": "(c) student (paper's setting)"}  # fmt: skip
    for key, label in labels.items():
        d, n = Summary.of(case_means(results[key], "dsc"), n_boot), Summary.of(case_means(results[key], "nsd"), n_boot)
        lines.append(f"| {label} | {d.cell()} | {n.cell()} | {d.n} | {PAPER_TABLE4[key]:.4f} |")
    return lines


def paper_claim(d: dict[str, np.ndarray]) -> str:
    """The paper's ordering (a) < (b) < (c) in mean DSC: does this run show it?"""
    order = sorted(d, key=lambda k: d[k].mean())
    shown = order == ["single", "teacher", "student"]
    names = {"single": "(a)", "teacher": "(b)", "student": "(c)"}
    ranking = " < ".join(names[k] for k in order)
    verdict = ("reproduces in the means (the intervals above say whether the gaps are resolved)" if shown
               else "does not reproduce")  # fmt: skip
    return f"Ordering of the means here: {ranking}; the paper's is (a) < (b) < (c), which this run {verdict}."


def table5(scores: dict) -> list[str]:
    lines = ["| organ | DSC mean +/- std | NSD mean +/- std |", "|---|---|---|"]  # flare_infer.evaluate's cells
    for o in ORGANS:
        d, n = scores["dsc"][o.short], scores["nsd"][o.short]
        lines.append(f"| {o.name} | {mean_std(d)} | {mean_std(n)} |")
    return lines


ABLATIONS = (  # (what, paper's setting, its result key, ours, its result key)
    ("unlabelled cases used", f"fraction {PAPER_FRACTION}", "student", "all (1.0)", "all_unlabelled"),
    ("pseudo-label confidence filtering", "off", "student", "threshold {confidence}", "confidence"),
    ("input slices", "1 (2D)", "student", "3 adjacent (2.5D)", "in3"),
    ("largest-component clean-up", "off", "student", "on (--postprocess lcc)", "student_lcc"),
    ("slice sampling", "uniform", "student", "organ-balanced (--oversample {oversample})", "oversample"),
)


def ablation_table(results: dict, s: Sizes) -> tuple[list[str], list[str]]:
    lines = ["| change | paper's setting: DSC | ours: DSC | difference [paired 95% CI] | paper's: NSD | ours: NSD |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    sentences = []
    for what, paper, key_p, ours, key_o in ABLATIONS:
        ours = ours.format(confidence=s.confidence, oversample=s.oversample)
        a, b = case_means(results[key_p], "dsc"), case_means(results[key_o], "dsc")
        mean, lo, hi, _ = difference(a, b, s.bootstrap)
        na, nb = case_means(results[key_p], "nsd"), case_means(results[key_o], "nsd")
        lines.append(f"| {what}: {paper} -> {ours} | {a.mean():.4f} | {b.mean():.4f} | {mean:+.4f} "
                     f"[{lo:+.4f}, {hi:+.4f}] | {na.mean():.4f} | {nb.mean():.4f} |")  # fmt: skip
        sentences.append(
            "- " + compare(f"With {what} {ours}, the student", "in the paper's setting", a, b, "DSC", s.bootstrap)
        )
    return lines, sentences


def ours_section(results: dict, s: Sizes) -> list[str]:
    """Every addition at once ("ours") against the paper's student (c) and the single U-Net (a)."""
    ours = "all unlabelled cases, confidence threshold {c}, --oversample {o}, started from the best teacher member"
    ours = ours.format(c=s.confidence, o=s.oversample)
    a, c, o = (case_means(results[k], "dsc") for k in ("single", "student", "ours"))
    return [
        "## Our recipe: every addition at once",
        "",
        f"The student trained with {ours} (`{shlex.join(student_extra('ours', s))}`), otherwise as (c).",
        "",
        "| model | mean DSC ± std [95% CI] | mean NSD ± std [95% CI] |",
        "|---|---|---|",
        *[f"| {label} | {Summary.of(case_means(results[k], 'dsc'), s.bootstrap).cell()} | "
          f"{Summary.of(case_means(results[k], 'nsd'), s.bootstrap).cell()} |"
          for k, label in (("single", "(a) single U-Net"), ("student", "(c) student, paper's setting"),
                           ("ours", "student, our recipe"))],
        "",
        "- " + compare("Our recipe's student", "the paper's student (c)", c, o, "DSC", s.bootstrap),
        "- " + compare("Our recipe's student", "the single U-Net (a)", a, o, "DSC", s.bootstrap),
        "",
        "Per organ DSC, our recipe's student: "
        + ", ".join(f"{org.short} {np.nanmean(results['ours']['dsc'][org.short]):.2f}" for org in ORGANS) + ".",
        "",
    ]  # fmt: skip


def investigation(results: dict, quality: dict | None, out: Path, s: Sizes) -> list[str]:
    """Measurements behind "why does the student not beat (a)": the members one by one, the pseudo-labels."""
    teacher = json.loads((out / "teacher" / "teacher.json").read_text())
    splits = json.loads((out / "teacher" / "splits.json").read_text())["folds"]
    single = case_means(results["single"], "dsc")
    lines = [
        "## Where the student's labels come from: the teacher's members and its pseudo-labels",
        "",
        "Each member is one fold U-Net, trained on 4/5 of the labelled cases for the same epochs as (a) "
        "(so 4/5 of (a)'s optimizer steps); the student learns from the ensemble's pseudo-labels.",
        "",
        "| model | labelled cases seen | fold score (labelled CV) | validation mean DSC ± std [95% CI] |",
        "|---|---|---|---|",
        f"| (a) single U-Net | {s.labelled} | - | {Summary.of(single, s.bootstrap).cell()} |",
    ]
    for m in teacher["members"]:
        d = case_means(results[f"member_{m['fold']}"], "dsc")
        lines.append(f"| teacher member, fold {m['fold']} | {len(splits[m['fold']]['train'])} | {m['score']:.4f} | "
                     f"{Summary.of(d, s.bootstrap).cell()} |")  # fmt: skip
    ensemble = Summary.of(case_means(results["teacher"], "dsc"), s.bootstrap)
    lines.append(f"| (b) teacher ensemble | - | - | {ensemble.cell()} |")
    best = max(teacher["members"], key=lambda m: case_means(results[f"member_{m['fold']}"], "dsc").mean())
    best_d = case_means(results[f"member_{best['fold']}"], "dsc")
    lines += [
        "",
        "- " + compare(f"The best member on validation (fold {best['fold']})", "the single U-Net (a)", single, best_d,
                       "DSC", s.bootstrap),
        "",
    ]  # fmt: skip
    return lines + quality_lines(quality, s)


def quality_lines(quality: dict | None, s: Sizes) -> list[str]:
    """The pseudo-labels against the generator's hidden truth; None (--data): why it was not measured."""
    if quality is None:
        return ["Pseudo-label quality: not measured. It needs the hidden truth of the unlabelled cases, which only "
                "the generator has; --data gave a dataset whose unlabelled cases have no labels.", ""]  # fmt: skip
    rows = quality["cases"]
    mean_dsc = np.array([r["mean_dsc"] for r in rows])
    organ = {o.short: np.mean([r["dsc"][o.short] for r in rows]) for o in ORGANS}
    return [
        f"Pseudo-labels against the generator's hidden truth on the {len(rows)} unlabelled cases (the phantoms know "
        "every label; each case regenerated from its seed and checked against the file): mean organ DSC "
        f"{mean_dsc.mean():.4f} ± {mean_dsc.std(ddof=1) if len(rows) > 1 else 0.0:.4f}. Per organ: "
        + ", ".join(f"{k} {v:.2f}" for k, v in organ.items()) + ".",
        "",
        f"Confidence >= {s.confidence} keeps {np.mean([r['kept_region'] for r in rows]):.1%} of the voxels where an "
        f"organ is or is said to be; there the pseudo-label is wrong for {_rate(rows, 'error_confident')} of the "
        f"kept voxels and {_rate(rows, 'error_unconfident')} of the dropped ones (means over the cases that have any).",
        "",
    ]  # fmt: skip


def _rate(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if r[key] is not None]
    return f"{np.mean(values):.1%}" if values else "none (no such voxel)"


def timing_table(timings: dict[str, list[float]]) -> list[str]:
    lines = ["| model | seconds per case (mean ± std) | cases |", "|---|---|---|"]
    for name, secs in timings.items():
        lines.append(f"| {name} | {np.mean(secs):.2f} ± {np.std(secs):.2f} | {len(secs)} |")
    return lines


def data_line(plan: Plan) -> str:
    s = plan.sizes
    if plan.generated:
        return (f"Data: `python -m training.phantoms`, seed {SEED}: {s.labelled} labelled cases from the narrow "
                f"(labelled) domain, {s.unlabelled} unlabelled and {s.validation} validation cases from the wide "
                "domain.")  # fmt: skip
    return (f"Data: `--data {plan.data}`: {s.labelled} labelled, {s.unlabelled} unlabelled and {s.validation} "
            "validation cases (FLARE22 layout).")  # fmt: skip


def write_report(path: Path, plan: Plan, results: dict, timings: dict, steps: Steps, argv: list[str],
                 quality: dict | None, claim: list[str]) -> None:  # fmt: skip
    """The Markdown report; `claim` is the across-seeds section (training.seeds_report.section)."""
    out, s = plan.out, plan.sizes
    d = {k: case_means(results[k], "dsc") for k in ("single", "teacher", "student")}
    ab_lines, ab_sentences = ablation_table(results, s)
    m = machine()
    total = sum(v["seconds"] for v in steps.done.values())
    text = [
        "# Table 4 on generated data: single U-Net vs teacher ensemble vs student",
        "",
        f"Produced by `{shlex.join(['python', '-m', 'training.reproduce', *argv])}` "
        f"({s.name} configuration); do not edit by hand. How to run it and how the sizes were chosen: "
        "docs/REPRODUCE.md.",
        "",
        data_line(plan) + " Scores: `python -m flare_infer.evaluate` (FLARE22 DSC and NSD) on the validation set, "
        "which no model saw before; per case the mean over the 13 organs, then mean ± std over cases and a 95% "
        f"bootstrap interval of the mean ({s.bootstrap} resamples of the cases, seed {SEED}). The paper's column is "
        "its Table 4 on the real FLARE22 validation set, for orientation only: different data, different sizes.",
        "",
        *(
            [
                "**Quick (CI) configuration: a smoke test of the pipeline; the networks are barely trained and these "
                "numbers say nothing about the methods.**",
                "",
            ]
            if s.name == "quick"
            else []
        ),
        "## Table 4 analogue",
        "",
        *table4(results, s.bootstrap),
        "",
        "- " + compare("The student (c)", "the single U-Net (a)", d["single"], d["student"], "DSC", s.bootstrap),
        "- " + compare("The student (c)", "the teacher ensemble (b)", d["teacher"], d["student"], "DSC", s.bootstrap),
        "- "
        + compare("The teacher ensemble (b)", "the single U-Net (a)", d["single"], d["teacher"], "DSC", s.bootstrap),
        "- " + paper_claim(d),
        "",
        *claim,
        "## Table 5 analogue: the student (c) per organ",
        "",
        *table5(results["student"]),
        "",
        "## Ablations, each against the paper's setting (student (c))",
        "",
        *ab_lines,
        "",
        *ab_sentences,
        "",
        "### Inference time per case",
        "",
        "`flare_infer.pipeline.predict_case` (preprocess, slices through the network, restore; not reading or "
        f"writing), one process, {m['cores']} cores, batch 16, each model the same way. student_onnx is (c) as "
        "the container runs it (ONNX Runtime); the other rows run in torch; teacher is three networks per slice.",
        "",
        *timing_table(timings),
        "",
        *ours_section(results, s),
        *investigation(results, quality, out, s),
        "## Commands, seeds, durations",
        "",
        f"Seed {SEED} everywhere in the sections other than the seeds' (data, folds, teacher, training, bootstrap). "
        f"Run folder `{out}`; logs in `{out}/logs/`. The other seeds' steps: `{out}/seed_K/steps.json` "
        "(their seconds are in the seeds' table below).",
        "",
        "| step | command | seconds |",
        "|---|---|---|",
        *[f"| {k} | `{v['command']}` | {v['seconds']:.0f} |" for k, v in steps.done.items()],
        f"| total | | {total:.0f} |",
        "",
        *seed_durations(plan),
        f"Sizes: `{json.dumps(asdict(s))}`",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in m.items()],
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_dir_as_placeholder("\n".join(text), out))


def run_dir_as_placeholder(text: str, out: Path) -> str:
    """The run folder written as RUN_DIR (the --out given), so the report names no path of the machine it ran on."""
    for form in sorted({str(out), str(out.resolve())}, key=len, reverse=True):  # the longer first: no half match
        text = text.replace(form, "RUN_DIR")
    return text


# ----------------------------------------------------------------------------- orchestration
@dataclass(frozen=True)
class Plan:
    """One run: its folder, its data, its sizes, the device, and the training seeds of the claim."""

    out: Path
    data: Path  # labelled/, unlabelled/, validation/ in the FLARE22 layout
    sizes: Sizes
    device: str
    seeds: tuple[int, ...]
    generated: bool  # data is RUN/data from training.phantoms (the hidden truth exists), else --data

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"seeds must be distinct non-negative integers, e.g. 0,1,2; found {self.seeds}")


def check_data(data: Path) -> dict[str, int]:
    """Case counts of a --data folder; raises unless it has the FLARE22 layout the phantoms are written in."""
    from training.data import discover_labelled, discover_unlabelled

    for sub in ("labelled/images", "labelled/labels", "unlabelled", "validation/images", "validation/labels"):
        if not (data / sub).is_dir():
            raise ValueError(
                f"--data {data}: no {sub}/; expected labelled/{{images,labels}}, unlabelled/ and "
                "validation/{images,labels}, the layout `python -m training.phantoms DIR` writes"
            )
    counts = {"labelled": len(discover_labelled(data / "labelled")),
              "unlabelled": len(discover_unlabelled(data / "unlabelled")),
              "validation": len(discover_labelled(data / "validation"))}  # fmt: skip
    if counts["labelled"] < 5:  # the teacher's five folds need a validation case each
        raise ValueError(f"--data {data}: {counts['labelled']} labelled cases; the teacher's 5 folds need at least 5")
    return counts


def train_all(steps: Steps, plan: Plan) -> None:
    """Data, the teacher (b), the single U-Net (a), the students (c and ablations), the ONNX export of (c)."""
    s, out, data, device = plan.sizes, plan.out, plan.data, plan.device
    teacher_dir = out / "teacher"
    if plan.generated:
        steps.module("data", ["training.phantoms", str(data), "--labelled", str(s.labelled), "--unlabelled",
                              str(s.unlabelled), "--validation", str(s.validation), "--seed", str(SEED), "--size",
                              s.phantom_size], data / "dataset.json")  # fmt: skip
    steps.module("teacher", teacher_argv(data, teacher_dir, s, device), teacher_dir / "teacher.json")
    train_single_step(steps, plan, SEED)
    for name in STUDENTS:
        extra = student_extra(name, s)
        run_dir = out / "students" / name
        steps.module(
            f"student_{name}",
            student_argv(data, teacher_dir / "teacher.json", run_dir, extra, s, device),
            run_dir / "best.pt",
        )
    onnx = out / "models" / "student.onnx"
    steps.module("export", ["training.export", str(out / "students" / "paper" / "best.pt"), str(onnx)], onnx)


def train_single_step(steps: Steps, plan: Plan, seed: int) -> None:
    out = seed_dir(plan.out, seed) / "single"
    steps.call("single", f"in-process: training.reproduce.train_single_unet(data={plan.data}, out={out}, "
               f"sizes={plan.sizes.name}{'' if seed == SEED else f', seed={seed}'}) -> training.teacher.train_fold "
               "with every labelled case in 'train'",
               lambda: train_single_unet(plan.data, out, plan.out / "teacher", plan.sizes, plan.device, seed),
               out / "fold_0" / "last.pt")  # fmt: skip


def predict_all(steps: Steps, plan: Plan) -> dict[str, list[float]]:
    """(c) through the CLI (with and without clean-up); every model in-process, timed. Returns the timings."""
    out, device = plan.out, plan.device
    images_dir, pred = plan.data / "validation" / "images", out / "predictions"
    onnx = out / "models" / "student.onnx"
    images = io.list_cases(images_dir)
    for key, post in (("student", "none"), ("student_lcc", "lcc")):
        argv = ["flare_infer", "predict", str(images_dir), str(pred / key), "--model", str(onnx),
                "--postprocess", post, "--device", "cpu"]  # fmt: skip
        steps.module(f"predict_{key}", argv, pred / key / io.output_name(images[-1]))
    models = [Model("single", "torch", out / "single" / "fold_0" / "last.pt"),
              Model("teacher", "teacher", out / "teacher" / "teacher.json"), Model("student_onnx", "onnx", onnx),
              Model("student_torch", "torch", out / "students" / "paper" / "best.pt"),
              *[Model(n, "torch", out / "students" / n / "best.pt") for n in STUDENTS if n != "paper"],
              *[Model(f"member_{f}", "torch", out / "teacher" / f"fold_{f}" / "best.pt")
                for f in member_folds(out)]]  # fmt: skip
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    for model in models:
        if model.name in timings and (pred / model.name).is_dir():
            continue
        t0 = time.perf_counter()
        timings[model.name] = predict_folder(model, images, pred / model.name, device)
        steps.record(
            f"predict_{model.name}",
            f"in-process: flare_infer.pipeline.predict_case with {model.path}",
            time.perf_counter() - t0,
        )
        steps.done.pop(f"evaluate_{model.name}", None)  # new masks: score them again
        timings_path.write_text(json.dumps(timings, indent=1) + "\n")
    return {m.name: timings[m.name] for m in models}


def member_folds(out: Path) -> list[int]:
    """The folds of the teacher's three members, best first (teacher.json's order)."""
    return [m["fold"] for m in json.loads((out / "teacher" / "teacher.json").read_text())["members"]]


def pseudo_label_quality(out: Path, s: Sizes) -> dict:
    """The teacher's pseudo-labels against the generator's hidden truth, on every unlabelled case.

    The phantoms know the labels of their "unlabelled" cases: each is regenerated from its seed in
    dataset.json (checked voxel for voxel against the file on disk), its label brought onto the
    training grid exactly as the labelled cases' are (`label_on_prepared`), and compared with the
    stored pseudo-label and confidence of the all_unlabelled student's store (every case, same teacher).
    """
    import SimpleITK as sitk

    from flare_infer.pipeline import label_on_prepared, prepare
    from flare_infer.spec import ModelSpec
    from training.phantoms import case_from_record
    from training.teacher import organ_dscs

    store = Path(json.loads((out / "students" / "all_unlabelled" / "pseudo.json").read_text())[0]["store"])
    spec = ModelSpec.from_dict(json.loads((out / "teacher" / "teacher.json").read_text())["spec"])
    cases = json.loads((out / "data" / "dataset.json").read_text())["cases"]
    rows = []
    for file, case in sorted(cases.items()):
        if case["split"] != "unlabelled":
            continue
        name = file.removesuffix(".nii.gz").removesuffix("_0000")
        image, label = case_from_record(case)  # the same patient and acquisition as the file
        on_disk = io.read_ct(out / "data" / "unlabelled" / file)
        if not np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(on_disk)):
            raise RuntimeError(f"{file}: regenerating seed {case['seed']} does not give the file on disk")
        truth = label_on_prepared(label, prepare(on_disk, spec))
        pseudo = np.load(store / f"{name}.pseudo.npy")
        confident = np.load(store / f"{name}.confidence.npy") >= round(255 * s.confidence)
        organ_dsc = {o.short: float(d) for o, d in zip(ORGANS, organ_dscs(pseudo, truth), strict=True)}
        region = (truth > 0) | (pseudo > 0)  # where an organ is or is said to be: background would swamp the rates
        wrong = pseudo != truth
        rows.append({
            "name": name, "dsc": organ_dsc, "mean_dsc": float(np.mean(list(organ_dsc.values()))),
            "kept_region": float(confident[region].mean()),
            # None: no voxel on that side of the threshold (a rate of nothing)
            "error_confident": float(wrong[region & confident].mean()) if (region & confident).any() else None,
            "error_unconfident": float(wrong[region & ~confident].mean()) if (region & ~confident).any() else None,
        })  # fmt: skip
    return {"store": str(store), "threshold": s.confidence, "cases": rows}


def evaluate_all(steps: Steps, plan: Plan) -> dict[str, dict]:
    """`python -m flare_infer.evaluate` of every prediction folder; {result key: read_scores(...)}."""
    out, gt = plan.out, plan.data / "validation" / "labels"
    (out / "eval").mkdir(exist_ok=True)
    results = {}
    members = [f"member_{f}" for f in member_folds(out)]
    for key in ("single", "teacher", "student", "student_lcc", *[n for n in STUDENTS if n != "paper"], *members):
        csv_path = out / "eval" / f"{key}.csv"
        steps.module(f"evaluate_{key}", ["flare_infer.evaluate", str(out / "predictions" / key), str(gt),
                                         "--csv", str(csv_path), "--workers", "2"], csv_path)  # fmt: skip
        results[key] = read_scores(csv_path)
    return results


# ----------------------------------------------------------------------------- the claim across seeds
CLAIM_STUDENTS = ("paper", "ours")
# table4.json's key -> (prediction and eval key, checkpoint), both under the seed's folder. The keys are the
# single-seed run's, so seed 0 reuses its predictions; (c) is scored in torch (student_torch) at every seed.
CLAIM_MODELS = {
    "single": ("single", "single/fold_0/last.pt"),
    "single_equal_steps": ("single_equal_steps", "single_equal_steps/fold_0/last.pt"),
    "student_paper": ("student_torch", "students/paper/best.pt"),
    "student_ours": ("ours", "students/ours/best.pt"),
}
CLAIM_TRAINING = ("single", *[f"student_{n}" for n in CLAIM_STUDENTS], "single_equal_steps")  # step names


def seed_dir(out: Path, seed: int) -> Path:
    """Seed 0's models are the single-seed run's own (RUN_DIR); seed K's are in RUN_DIR/seed_K, same layout."""
    return out if seed == SEED else out / f"seed_{seed}"


def optimizer_steps(checkpoint: Path) -> tuple[int, int]:
    """(optimizer steps, epochs) behind a training checkpoint's weights; training.loop steps the LR scheduler
    once per optimizer step, so its count is the optimizer's."""
    import torch

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return int(ckpt["scheduler"]["last_epoch"]), int(ckpt["epoch"]) + 1


def ours_total_steps(teacher_json: Path, ours: Path) -> int:
    """Our recipe's student's optimizer steps with its starting point's: the best member (teacher.json's first,
    the one --init-from-teacher loads) + the student's own."""
    member = teacher_json.parent / json.loads(teacher_json.read_text())["members"][0]["checkpoint"]
    return optimizer_steps(member)[0] + optimizer_steps(ours)[0]


def epochs_for_steps(target: int, single_last: Path) -> int:
    """Whole epochs of the single U-Net that reach `target` optimizer steps (rounded up), from (a)'s last.pt."""
    steps, epochs = optimizer_steps(single_last)
    return max(1, -(-target * epochs // steps))  # ceil(target / (steps / epochs))


def train_seed(steps: Steps, plan: Plan, seed: int) -> None:
    """(a), (c), our recipe's student and (a') at one seed, into seed_dir(seed); the teacher is seed 0's."""
    s, data, device = plan.sizes, plan.data, plan.device
    base, teacher_json = seed_dir(plan.out, seed), plan.out / "teacher" / "teacher.json"
    train_single_step(steps, plan, seed)
    for name in CLAIM_STUDENTS:
        run_dir = base / "students" / name
        steps.module(f"student_{name}", student_argv(data, teacher_json, run_dir, student_extra(name, s), s, device,
                                                     seed), run_dir / "best.pt")  # fmt: skip
    target = ours_total_steps(teacher_json, base / "students" / "ours" / "best.pt")
    epochs = epochs_for_steps(target, base / "single" / "fold_0" / "last.pt")
    out = base / "single_equal_steps"
    steps.call("single_equal_steps", f"in-process: training.reproduce.train_single_unet(data={data}, out={out}, "
               f"sizes={s.name}, seed={seed}, epochs={epochs}): {epochs} epochs to reach {target} optimizer steps "
               "(the best teacher member's + our recipe's student's)",
               lambda: train_single_unet(data, out, plan.out / "teacher", s, device, seed, epochs),
               out / "fold_0" / "last.pt")  # fmt: skip


def score_seed(steps: Steps, plan: Plan, seed: int) -> dict[str, dict]:
    """The claim's models of one seed on the validation set (in-process prediction, then the evaluate CLI)."""
    base, gt = seed_dir(plan.out, seed), plan.data / "validation" / "labels"
    images = io.list_cases(plan.data / "validation" / "images")
    (base / "eval").mkdir(parents=True, exist_ok=True)
    scores = {}
    for key, (pred, ckpt) in CLAIM_MODELS.items():
        folder, csv_path = base / "predictions" / pred, base / "eval" / f"{pred}.csv"
        last = folder / io.output_name(images[-1])
        if not steps.finished(f"predict_{pred}", last):
            steps.done.pop(f"evaluate_{pred}", None)  # new masks: score them again
        model = Model(pred, "torch", base / ckpt)
        steps.call(
            f"predict_{pred}",
            f"in-process: flare_infer.pipeline.predict_case with {model.path}",
            lambda m=model, f=folder: predict_folder(m, images, f, plan.device),
            last,
        )
        steps.module(f"evaluate_{pred}", ["flare_infer.evaluate", str(folder), str(gt), "--csv", str(csv_path),
                                          "--workers", "2"], csv_path)  # fmt: skip
        scores[key] = read_scores(csv_path)
    return scores


def model_steps(plan: Plan, seed: int) -> dict[str, int]:
    """Optimizer steps of each claim model at one seed, read from the checkpoints; the teacher: its 3 members'."""
    base, teacher = seed_dir(plan.out, seed), plan.out / "teacher"
    members = [teacher / m["checkpoint"] for m in json.loads((teacher / "teacher.json").read_text())["members"]]
    own = {key: optimizer_steps(base / ckpt)[0] for key, (_, ckpt) in CLAIM_MODELS.items() if key != "student_ours"}
    own["student_ours"] = ours_total_steps(teacher / "teacher.json", base / CLAIM_MODELS["student_ours"][1])
    return {**own, "teacher": sum(optimizer_steps(p)[0] for p in members)}


def claim_scores(steps: Steps, plan: Plan, results: dict) -> dict[str, ModelScores]:
    """Train and score every seed's claim models (each seed resumable); (seeds, cases) arrays per model."""
    per_seed, counts = [], []
    for seed in plan.seeds:
        seed_steps = steps if seed == SEED else Steps(seed_dir(plan.out, seed))
        print(f"[reproduce] seed {seed}: {seed_dir(plan.out, seed)}", flush=True)
        train_seed(seed_steps, plan, seed)
        per_seed.append({**score_seed(seed_steps, plan, seed), "teacher": results["teacher"]})  # one teacher
        counts.append(model_steps(plan, seed))
    names = per_seed[0]["single"]["names"]
    for seed, scores in zip(plan.seeds, per_seed, strict=True):
        for key, sc in scores.items():
            if sc["names"] != names:
                raise RuntimeError(f"seed {seed}, {key}: scored cases {sc['names']} differ from {names}; every "
                                   "model of every seed must be scored on the same validation cases")  # fmt: skip
    return {key: ModelScores(dsc=np.stack([case_means(sc[key], "dsc") for sc in per_seed]),
                             nsd=np.stack([case_means(sc[key], "nsd") for sc in per_seed]),
                             steps=[c[key] for c in counts]) for key in MODELS}  # fmt: skip


def run_seconds(plan: Plan) -> dict:
    """table4.json's record of the time spent: every step's seconds of RUN_DIR/steps.json (seed 0 and the shared
    steps) and each other seed's claim steps, the sizes and the machine."""
    seconds = {}
    for seed in (SEED, *[k for k in plan.seeds if k != SEED]):
        path = seed_dir(plan.out, seed) / "steps.json"
        done = json.loads(path.read_text()) if path.is_file() else {}
        seconds[str(seed)] = {k: v["seconds"] for k, v in done.items()}
    return {"sizes": asdict(plan.sizes), "step_seconds": seconds, "machine": machine()}


def seed_durations(plan: Plan) -> list[str]:
    """Seconds of each seed's claim training steps (from its steps.json)."""
    lines = ["| seed | steps file | training seconds (" + ", ".join(CLAIM_TRAINING) + ") |", "|---|---|---|"]
    for seed in plan.seeds:
        path = seed_dir(plan.out, seed) / "steps.json"
        done = json.loads(path.read_text()) if path.is_file() else {}
        secs = [done[k]["seconds"] for k in CLAIM_TRAINING if k in done]
        lines.append(f"| {seed} | `{path}` | {sum(secs):.0f} ({', '.join(f'{v:.0f}' for v in secs)}) |")
    return [*lines, ""]


def run(plan: Plan, results_md: Path, argv: list[str]) -> dict:
    """Every step, then the report, table4.json and its figure beside it; returns {result key: scores}."""
    out, s = plan.out, plan.sizes
    out.mkdir(parents=True, exist_ok=True)
    steps = Steps(out)
    train_all(steps, plan)
    timings = predict_all(steps, plan)
    results = evaluate_all(steps, plan)
    quality = None
    if plan.generated:
        quality_path = out / "pseudo_quality.json"
        steps.call("pseudo_quality", "in-process: training.reproduce.pseudo_label_quality (hidden truth of the "
                   "unlabelled phantoms)", lambda: quality_path.write_text(json.dumps(pseudo_label_quality(out, s),
                   indent=1) + "\n"), quality_path)  # fmt: skip
        quality = json.loads(quality_path.read_text())
    scores = claim_scores(steps, plan, results)
    results_dir = results_md.parent / "results"  # docs/results/ beside docs/RESULTS.md
    command = {"command": shlex.join(["python", "-m", "training.reproduce", *argv])}
    seeds_report.write_outputs(results_dir, list(plan.seeds), scores, s.bootstrap, {**command, **run_seconds(plan)})
    claim = seeds_report.section(list(plan.seeds), scores, s.bootstrap, "results/table4_seeds.png",
                                 "results/table4.json")  # fmt: skip
    write_report(results_md, plan, results, timings, steps, argv, quality, claim)
    print(f"[reproduce] wrote {results_md} and {results_dir / 'table4.json'}")
    return results


class SizesChoice(str, Enum):  # --sizes: listed in --help, checked by click
    quick = "quick"
    full = "full"
    paper = "paper"


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"--seeds: expected comma-separated integers such as 0,1,2; found {text!r}") from None


app = typer_app()


@app.command()
def main(
    out: Path = typer.Option(
        ...,
        help="run folder: data/, teacher/, single/, students/, predictions/, eval/, logs/, seed_K/ (the other seeds)",
    ),
    sizes: SizesChoice = typer.Option(
        None,
        help="quick: CI, minutes, numbers not meaningful; full: the CPU "
        "configuration (default); paper: the paper's sizes, for a GPU",
    ),
    quick: bool = typer.Option(False, help="alias of --sizes quick"),
    seeds: str = typer.Option(
        None,
        help="training seeds of the claim, e.g. 0,1,2 (default: quick 0; full and paper "
        "0,1,2); one teacher, seed 0's, for all",
    ),
    data: Path = typer.Option(
        None,
        help="DIR with labelled/{images,labels}, unlabelled/, validation/{images,labels} "
        "(FLARE22 layout) instead of generated phantoms",
    ),
    results: Path = typer.Option(
        None,
        help="the Markdown report (default: RUN_DIR/RESULTS.md; docs/RESULTS.md to update the repository's); "
        "table4.json and the figure go to results/ beside it",
    ),
    device: str = typer.Option("cpu", help="cpu|cuda|auto, for training and in-process inference"),
) -> None:
    require_train_extra()  # every step trains or runs torch: without it, one line now, not a traceback later
    if quick and sizes not in (None, SizesChoice.quick):
        raise typer.BadParameter(f"--quick is --sizes quick; found --sizes {sizes.value} too: give one")
    s = SIZES["quick" if quick else (sizes or SizesChoice.full).value]
    if data is not None:
        try:
            s = replace(s, **check_data(data))
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    plan = Plan(out=out, data=data or out / "data", sizes=s, device=device,
                seeds=parse_seeds(seeds) if seeds else s.seeds, generated=data is None)  # fmt: skip
    results_md = results or out / "RESULTS.md"  # the repository's docs/RESULTS.md only when asked (--results)
    argv = ["--out", str(out), "--sizes", s.name, *(["--seeds", seeds] if seeds else []),
            *(["--data", str(data)] if data else []), *(["--results", str(results)] if results else [])]  # fmt: skip
    run(plan, results_md, argv)


if __name__ == "__main__":
    app()
