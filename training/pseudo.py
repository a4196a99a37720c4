"""Pseudo-labels: the teacher labels every unlabelled CT through flare_infer's own pipeline.

    python -m training.pseudo --teacher runs/teacher/teacher.json --unlabelled DATA/unlabelled
    torchrun --nproc_per_node=8 -m training.pseudo --teacher runs/teacher/teacher.json --unlabelled DATA/unlabelled

(`python -m training.student` runs the same labelling first; this CLI labels ahead of time, e.g. on
more GPUs than the student trains on.)

Per case: `flare_infer.pipeline.prepare` (the deployed reorientation, resampling, normalisation),
then `predict_volume` with the teacher as the `batch -> probabilities` callable (soft voting: the
mean of the members' softmax), so pseudo-labels come from exactly the deployed preprocessing.
Stored at the training resolution in the training cache (`training.data.cache_root(spec, cache)`):

    <root>/<NAME>.npy                           float16 image, written here if the cache lacks it
    <root>/pseudo/<TEACHER_KEY>/<NAME>.pseudo.npy       uint8 (Z, Y, X) hard label (argmax of the mean)
    <root>/pseudo/<TEACHER_KEY>/<NAME>.confidence.npy   uint8 (Z, Y, X): round(255 * max mean probability)
    <root>/pseudo/<TEACHER_KEY>/<NAME>.json             record, written last: marks the case done
    <root>/pseudo/<TEACHER_KEY>/<NAME>.weight-T.npy     uint8 0/1 mask `confidence / 255 >= T` (option)

TEACHER_KEY hashes the teacher's files (teacher.json and member checkpoints, or a student
checkpoint in later rounds), so a new teacher never reuses old labels. The record holds the mean
pairwise Dice between the members' own argmaxes (agreement; `training.teacher.confusion_dscs`, FLARE22's
empty-organ rule), computed while labelling at no extra cost, so `--drop-disagreeing` can be changed
without relabelling.

Resumable: a case whose record exists is skipped; every file is written atomically, and the temporary
files of a killed writer (`.NAME.PID@HOST.tmp.npy`) are removed at the next start by one process per
host, only those whose PID is dead on that host (other ranks and jobs may be writing). Sharded:
under torchrun rank r labels cases r::world_size (each case exactly once); each rank appends the
names it labelled to `labelled-by-rank<r>.txt` in the store (the test checks them).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from flare_infer import io
from flare_infer.labels import NUM_CLASSES
from flare_infer.pipeline import predict_volume, prepare
from training.data import CachedCase, CaseFiles, build_cache, cache_root, discover_unlabelled, save_npy_atomic
from training.teacher import Teacher, load_teacher
from training.utils import Runtime, barrier, remove_stale_tmp, write_atomic

CONFIDENCE_SCALE = 255  # confidence stored as uint8: round(255 * p_max); resolution 0.004, half the bytes of float16


@dataclass(frozen=True)
class PseudoConfig:
    batch_size: int = 16  # slices per teacher call
    unlabelled_fraction: float = 1.0  # 1.0 = every unlabelled case (ours); the paper's 750 / 2000 = 0.375
    confidence_threshold: float = 0.0  # > 0: Eq. 2 ignores voxels whose teacher confidence is below it
    drop_disagreeing: float = 0.0  # fraction of cases dropped, those whose members agree least
    seed: int = 0  # which subset when unlabelled_fraction < 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, found {self.batch_size}")
        if not 0.0 < self.unlabelled_fraction <= 1.0:
            raise ValueError(f"unlabelled_fraction must lie in (0, 1], found {self.unlabelled_fraction}")
        if not 0.0 <= self.confidence_threshold < 1.0:
            raise ValueError(f"confidence_threshold must lie in [0, 1) (0 = off), found {self.confidence_threshold}")
        if not 0.0 <= self.drop_disagreeing < 1.0:
            raise ValueError(f"drop_disagreeing is a fraction of cases in [0, 1), found {self.drop_disagreeing}")


# ----------------------------------------------------------------------------- the store
@dataclass(frozen=True)
class PseudoStore:
    """Where one teacher's pseudo-labels live, inside the preprocessing cache."""

    root: Path  # cache_root(spec, cache): the images
    dir: Path  # root / pseudo / teacher key

    @classmethod
    def for_teacher(cls, teacher: Teacher, cache_dir: str | Path) -> PseudoStore:
        root = cache_root(teacher.spec, cache_dir)
        return cls(root, root / "pseudo" / teacher.key)

    def image(self, name: str) -> Path:
        return self.root / f"{name}.npy"  # training.data's cache layout

    def labels(self, name: str) -> Path:
        return self.dir / f"{name}.pseudo.npy"

    def confidence(self, name: str) -> Path:
        return self.dir / f"{name}.confidence.npy"

    def record(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def weight(self, name: str, threshold: float) -> Path:
        return self.dir / f"{name}.weight-{threshold:.4f}.npy"

    def is_done(self, name: str) -> bool:
        return self.record(name).is_file()

    def read_record(self, name: str) -> dict:
        return json.loads(self.record(name).read_text())


def quantise_confidence(confidence_zyx: np.ndarray) -> np.ndarray:
    return np.rint(np.asarray(confidence_zyx, np.float32) * CONFIDENCE_SCALE).clip(0, CONFIDENCE_SCALE).astype(np.uint8)


def confidence_mask(confidence_q: np.ndarray, threshold: float) -> np.ndarray:
    """uint8 1 where the (dequantised) teacher confidence is >= threshold, else 0."""
    return (np.asarray(confidence_q, np.float32) / CONFIDENCE_SCALE >= threshold).astype(np.uint8)


def _write_json_atomic(data: dict, path: Path) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n"))


def label_case(case: CaseFiles, teacher: Teacher, store: PseudoStore, cfg: PseudoConfig, rt: Runtime) -> dict:
    """Prepare, predict with the teacher, store label + confidence (+ the cache image if missing); the record."""
    t0 = time.perf_counter()
    prepared = prepare(io.read_ct(case.image), teacher.spec)
    predict = teacher.predict_batch(rt.device, agreement_hw=prepared.vol_zyx.shape[1:])
    labels_zyx, confidence_zyx = predict_volume(prepared, predict, teacher.spec, batch_size=cfg.batch_size)
    if not store.image(case.name).is_file():  # the same bytes training.data.build_cache would write
        save_npy_atomic(prepared.vol_zyx.astype(np.float16), store.image(case.name))
    save_npy_atomic(labels_zyx, store.labels(case.name))
    save_npy_atomic(quantise_confidence(confidence_zyx), store.confidence(case.name))
    record = {
        "name": case.name, "image": str(case.image), "shape_zyx": list(labels_zyx.shape), "teacher": teacher.source,
        "members": len(teacher.models), "agreement": predict.agreement(),
        "mean_confidence": float(np.mean(confidence_zyx, dtype=np.float64)),
        "voxels_per_class": np.bincount(labels_zyx.ravel(), minlength=NUM_CLASSES).tolist(),
        "rank": rt.rank, "seconds": round(time.perf_counter() - t0, 3),
    }  # fmt: skip
    _write_json_atomic(record, store.record(case.name))
    return record


# ----------------------------------------------------------------------------- all cases, sharded
def select_cases(cases: list[CaseFiles], fraction: float, seed: int) -> list[CaseFiles]:
    """All cases (fraction 1), or a seeded random ceil(fraction * n) of them, in name order."""
    cases = sorted(cases, key=lambda c: c.name)
    if fraction >= 1.0:
        return cases
    keep = set(np.random.default_rng(seed).permutation(len(cases))[: math.ceil(fraction * len(cases))].tolist())
    return [c for i, c in enumerate(cases) if i in keep]


def _progress(rt: Runtime) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[rate]}"), disable=not rt.is_main,
    )  # fmt: skip


def label_all(cases: list[CaseFiles], teacher: Teacher, store: PseudoStore, cfg: PseudoConfig, rt: Runtime,
              on_case: Callable[[dict], None] | None = None) -> list[str]:  # fmt: skip
    """Label this rank's share (cases[rank::world_size]) not done yet; barrier; return the names labelled here."""
    store.dir.mkdir(parents=True, exist_ok=True)
    mine = [c for c in cases[rt.rank :: rt.world_size] if not store.is_done(c.name)]
    done_here: list[str] = []
    with _progress(rt) as progress:
        desc = f"pseudo-labels rank {rt.rank}/{rt.world_size}" if rt.distributed else "pseudo-labels"
        task = progress.add_task(desc, total=len(mine), rate="")
        t0 = time.perf_counter()
        for case in mine:
            record = label_case(case, teacher, store, cfg, rt)
            with open(store.dir / f"labelled-by-rank{rt.rank}.txt", "a") as log:
                log.write(case.name + "\n")
            done_here.append(case.name)
            rate = len(done_here) * rt.world_size / (time.perf_counter() - t0)  # all ranks, assuming even shares
            info = f"{rate:.2f} cases/s (all ranks)  agreement {record['agreement']:.3f}"
            progress.update(task, advance=1, rate=info)
            if on_case is not None:
                on_case(record)
    barrier(rt)
    missing = [c.name for c in cases if not store.is_done(c.name)]
    if missing:
        raise RuntimeError(f"{store.dir}: {len(missing)} cases have no pseudo-label after labelling: {missing[:5]}")
    return done_here


def dropped_cases(store: PseudoStore, names: list[str], fraction: float) -> set[str]:
    """The round(fraction * n) cases whose members agree least (lowest mean pairwise Dice; ties by name)."""
    n_drop = int(round(fraction * len(names)))
    if n_drop == 0:
        return set()
    ranked = sorted(names, key=lambda n: (store.read_record(n)["agreement"], n))
    return set(ranked[:n_drop])


def pseudo_cases(store: PseudoStore, names: list[str], cfg: PseudoConfig, rt: Runtime,
                 drop: set[str] | None = None) -> list[CachedCase]:  # fmt: skip
    """CachedCases (image, pseudo-label, optional confidence mask) for training.data.SliceDataset."""
    drop = dropped_cases(store, names, cfg.drop_disagreeing) if drop is None else drop
    keep = [n for n in names if n not in drop]
    if not keep:
        raise ValueError(f"--drop-disagreeing {cfg.drop_disagreeing} drops all {len(names)} pseudo-labelled cases")
    if cfg.confidence_threshold > 0:
        t = cfg.confidence_threshold
        if rt.is_main:
            for n in keep:
                if not store.weight(n, t).is_file():
                    save_npy_atomic(confidence_mask(np.load(store.confidence(n), mmap_mode="r"), t), store.weight(n, t))
        barrier(rt)
    weight = (lambda n: store.weight(n, cfg.confidence_threshold)) if cfg.confidence_threshold > 0 else (lambda n: None)
    return [CachedCase(n, store.image(n), store.labels(n), weight(n)) for n in keep]


def make_pseudo_labels(unlabelled: str | Path, teacher: Teacher, cache_dir: str | Path, cfg: PseudoConfig,
                       rt: Runtime) -> tuple[PseudoStore, list[str]]:  # fmt: skip
    """Label every selected unlabelled case not done yet (this rank's share); return the store and all names."""
    cases = select_cases(discover_unlabelled(unlabelled), cfg.unlabelled_fraction, cfg.seed)
    store = PseudoStore.for_teacher(teacher, cache_dir)
    if rt.local_rank == 0:  # one process per host: its dead writers' files (live ranks' and other hosts' kept)
        for folder in (store.root, store.dir):
            remove_stale_tmp(folder)
    if rt.is_main:
        store.dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomic({"teacher": teacher.source, "members": len(teacher.models), "spec": teacher.spec.to_dict()},
                           store.dir / "teacher.json")  # fmt: skip
    barrier(rt)
    label_all(cases, teacher, store, cfg, rt)
    if rt.is_main:  # every image is in the cache now: this only writes the cache's preprocessing.json
        build_cache(cases, teacher.spec, cache_dir, quiet=True)
    barrier(rt)
    return store, [c.name for c in cases]


# ----------------------------------------------------------------------------- CLI
def main(
    teacher: Path = typer.Option(..., help="RUN/teacher.json (phase one) or a student checkpoint (later rounds)"),
    unlabelled: Path = typer.Option(..., help="folder of unlabelled NAME_0000.nii.gz CTs"),
    cache: Path = typer.Option(None, help="preprocessing cache (default: the teacher run's cache/)"),
    unlabelled_fraction: float = typer.Option(1.0, help="share of the unlabelled cases (paper: 750/2000 = 0.375)"),
    batch_size: int = typer.Option(16, help="slices per teacher call"),
    device: str = typer.Option("auto", help="auto|cuda|cpu"),
    seed: int = typer.Option(0, help="which subset when --unlabelled-fraction < 1"),
) -> None:
    """Pseudo-label every case of UNLABELLED with TEACHER (teacher.json or a checkpoint) into the cache."""
    from training.utils import setup_runtime, teardown

    if cache is None and teacher.suffix != ".json":
        raise typer.BadParameter(f"--cache is required with a checkpoint as --teacher ({teacher}); give the "
                                 "training cache the student uses (by default the phase-one run's cache/)")  # fmt: skip
    rt = setup_runtime(device)
    try:
        t = load_teacher(teacher, rt.device)
        cfg = PseudoConfig(batch_size=batch_size, unlabelled_fraction=unlabelled_fraction, seed=seed)
        cache_dir = cache or Path(teacher).parent / "cache"
        t0 = time.perf_counter()
        store, names = make_pseudo_labels(unlabelled, t, cache_dir, cfg, rt)
        if rt.is_main:
            agreement = [store.read_record(n)["agreement"] for n in names]
            print(f"{len(names)} cases pseudo-labelled in {store.dir} ({time.perf_counter() - t0:.1f} s); "
                  f"member agreement (mean pairwise Dice) min {min(agreement):.3f} mean {np.mean(agreement):.3f}")
    finally:
        teardown(rt)


if __name__ == "__main__":
    from training.cli import typer_app

    app = typer_app()
    app.command()(main)
    app()
