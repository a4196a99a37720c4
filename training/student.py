"""Phase two: the teacher pseudo-labels every unlabelled CT, then the student learns from both (Eq. 1, Eq. 2).

    python -m training.student --data DATA --unlabelled DATA/unlabelled --teacher runs/teacher/teacher.json \
        --out runs/student
    torchrun --nproc_per_node=8 -m training.student --data DATA --unlabelled DATA/unlabelled \
        --teacher runs/teacher/teacher.json --out runs/student                         # DDP (NCCL / gloo)
    python -m training.export runs/student/best.pt weights/student.onnx              # what the container runs

Per round (`--rounds R`, default 1: the paper):
  1. pseudo-labels (training.pseudo): the teacher labels every selected unlabelled case through
     flare_infer's pipeline; resumable, sharded over the torchrun ranks. Round 1's teacher is the
     phase-one ensemble (teacher.json); round k + 1's is round k's student (its best.pt).
  2. the student: a fresh U-Net (Kaiming uniform, the paper), or `--init-from-teacher` (the best
     teacher member in round 1, the previous student later). Each iteration is a labelled batch
     (augmented as in phase one) with Eq. 1, then a pseudo-labelled batch with Eq. 2 (Eq. 1 + the L1
     term, optionally a confidence mask); each an optimizer step. Both add the deep-supervision
     head's loss (weight 0.1) as phase one does; DDP also needs every parameter used in every step.
     An epoch is one pass over the pseudo-labelled slices (the labelled loader cycles alongside).
Round R writes RUN_DIR/{last.pt, best.pt, metrics.csv, curves.png}; earlier rounds RUN_DIR/round_K/.
RUN_DIR/pseudo.json records each round's pseudo-label store, cases used and cases dropped.

Validation: mean organ DSC (flare_infer's evaluation) on the cached volumes of `--validation`
(default DATA/validation when it exists, as `python -m training.phantoms` writes it); without it,
best.pt is the last epoch. Defaults are the paper's phase two (Table 3): Adam (0.5, 0.999), lr 1e-5
with polynomial decay, batch 20, 200 epochs, beta 0.65. See docs/STUDENT.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import typer
from torch import nn

from flare_infer.spec import ModelSpec
from training.augment import AugmentConfig, Augmenter
from training.cli import typer_app
from training.data import (
    CachedCase,
    SliceConfig,
    SliceDataset,
    build_cache,
    closing_workers,
    discover_labelled,
    make_loader,
    set_loader_epoch,
)
from training.loop import LoopConfig, StepContext, fit, load_model, make_optimizer, make_scheduler, prepare_model
from training.losses import deep_supervision_loss, eq1_loss, eq2_loss
from training.model import UNet, UNetConfig
from training.pseudo import (
    PseudoConfig,
    PseudoStore,
    dropped_cases,
    make_pseudo_labels,
    pseudo_cases,
)
from training.teacher import TeacherConfig, load_teacher, score_cases, teacher_spec
from training.utils import Runtime, barrier, seed_everything, setup_runtime, teardown


@dataclass(frozen=True)
class StudentConfig:
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=200, lr=1e-5, val_every=10))
    model: UNetConfig = field(default_factory=UNetConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    batch_size: int = 20  # the paper's, for both the labelled and the pseudo-labelled batch
    patch_size: int = 256
    beta: float = 0.65  # Eq. 1 and Eq. 2: weight of the Dice term
    aux_weight: float = 0.1  # deep-supervision head, as phase one
    augment_pseudo: bool = False  # the paper augments labelled slices only
    # The equal-budget control of phase two: every pseudo-labelled batch is replaced by a labelled one (same steps,
    # same schedule, same initialisation), so that student - control is what the pseudo-labels bought.
    without_pseudo_labels: bool = False
    init_from_teacher: bool = False  # else Kaiming uniform (the paper)
    rounds: int = 1
    oversample: float = 0.0  # share of slices drawn for an organ chosen uniformly (beyond the paper; 0 = off)
    workers: int = 2
    val_batch_size: int = 16

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.batch_size < 1:
            raise ValueError(f"StudentConfig needs rounds, batch_size >= 1; found {self.rounds}, {self.batch_size}")


@dataclass(frozen=True)
class Sources:
    """Where phase two reads from."""

    data: Path  # labelled set (FLARE22 or nnU-Net layout)
    unlabelled: Path
    teacher: Path  # RUN/teacher.json
    validation: Path | None
    cache: Path


# ----------------------------------------------------------------------------- data
def _loader(cases: list[CachedCase], cfg: StudentConfig, augment: bool, rt: Runtime) -> torch.utils.data.DataLoader:
    aug = Augmenter(cfg.augment) if augment and cfg.augment.enabled else None
    ds = SliceDataset(cases, SliceConfig(cfg.model.in_channels, cfg.patch_size), aug)
    return make_loader(ds, batch_size=cfg.batch_size, workers=cfg.workers, oversample=cfg.oversample,
                       seed=cfg.loop.seed, rt=rt)  # fmt: skip


class Alternating:
    """One epoch of items ("labelled", batch), ("pseudo", batch), ...: one pass over the pseudo loader. With
    `without_pseudo_labels` (the control) the second slot of each pair is a labelled batch too: the same steps."""

    def __init__(self, labelled: torch.utils.data.DataLoader, pseudo: torch.utils.data.DataLoader, epoch: int,
                 without_pseudo_labels: bool = False) -> None:
        self.labelled, self.pseudo, self.epoch = labelled, pseudo, epoch
        self.without_pseudo_labels = without_pseudo_labels  # the control: a labelled batch in each pseudo slot

    def __len__(self) -> int:
        return 2 * len(self.pseudo)

    def __iter__(self):
        cycle = 0
        set_loader_epoch(self.pseudo, self.epoch)
        set_loader_epoch(self.labelled, self.epoch * 1000)
        labelled = iter(self.labelled)

        def next_labelled():
            nonlocal cycle, labelled
            try:
                return next(labelled)
            except StopIteration:  # fewer labelled slices than pseudo-labelled ones: a new shuffled pass
                cycle += 1
                set_loader_epoch(self.labelled, self.epoch * 1000 + cycle)
                labelled = iter(self.labelled)
                return next(labelled)

        for pseudo_batch in self.pseudo:
            yield "labelled", next_labelled()
            yield ("labelled", next_labelled()) if self.without_pseudo_labels else ("pseudo", pseudo_batch)


def make_step(cfg: StudentConfig):
    def step(model: nn.Module, item: tuple[str, dict], ctx: StepContext) -> tuple[torch.Tensor, int]:
        kind, batch = item
        image, label = ctx.to_device(batch["image"]), ctx.to_device(batch["label"])
        weight = ctx.to_device(batch["weight"]) if "weight" in batch else None  # (N, H, W) confidence mask
        main, aux = model(image)
        loss_fn = eq1_loss if kind == "labelled" else eq2_loss
        loss = deep_supervision_loss(loss_fn, main, aux, label, aux_weight=cfg.aux_weight, beta=cfg.beta, weight=weight)
        return loss, image.shape[0]

    return step


# ----------------------------------------------------------------------------- one round
def _initial_model(cfg: StudentConfig, teacher_source: Path) -> UNet:
    """Kaiming uniform (UNet's own init), or the weights of the round's best teacher model."""
    model = UNet(cfg.model)
    if not cfg.init_from_teacher:
        return model
    if teacher_source.suffix == ".json":
        best = json.loads(teacher_source.read_text())["members"][0]["checkpoint"]  # members are sorted best first
        teacher_source = teacher_source.parent / best
    source, source_cfg, _ = load_model(teacher_source, "cpu")
    if source_cfg != cfg.model:
        raise ValueError(
            f"--init-from-teacher: {teacher_source} is a U-Net {source_cfg}, the student is {cfg.model}; "
            "give the student the teacher's --width/--depth/--in-channels, or drop --init-from-teacher"
        )
    model.load_state_dict(source.state_dict())
    return model


def train_round(labelled: list[CachedCase], pseudo: list[CachedCase], val: list[CachedCase], cfg: StudentConfig,
                run_dir: Path, teacher_source: Path, meta: dict, rt: Runtime, resume: bool) -> list[dict]:  # fmt: skip
    seed_everything(cfg.loop.seed)
    lab_loader = _loader(labelled, cfg, augment=True, rt=rt)
    ps_loader = _loader(pseudo, cfg, augment=cfg.augment_pseudo, rt=rt)
    model = prepare_model(_initial_model(cfg, teacher_source), rt)
    optimizer = make_optimizer(model, cfg.loop)
    scheduler = make_scheduler(optimizer, cfg.loop.epochs * 2 * len(ps_loader), cfg.loop.poly_power)
    score_cfg = TeacherConfig(model=cfg.model, spacing_xyz_mm=tuple(meta["spec"]["spacing_xyz_mm"]),
                              val_batch_size=cfg.val_batch_size)  # fmt: skip

    def validate(net: nn.Module, epoch: int) -> dict[str, float]:
        return {"val_dsc": float(np.mean(score_cases(net, val, score_cfg, rt.device)))}

    with closing_workers(lab_loader, ps_loader):  # this round's workers end with it
        return fit(model, optimizer, scheduler, make_step(cfg),
                   lambda epoch: Alternating(lab_loader, ps_loader, epoch, cfg.without_pseudo_labels), cfg.loop,
                   run_dir, rt, validate_fn=validate if val else None, meta=meta, resume=resume)  # fmt: skip


# ----------------------------------------------------------------------------- all rounds
def _cache(cases, spec: ModelSpec, cache_dir: Path, workers: int, rt: Runtime) -> list[CachedCase]:
    if rt.is_main:
        build_cache(cases, spec, cache_dir, workers)
    barrier(rt)
    return build_cache(cases, spec, cache_dir, quiet=True)  # all built: paths only


def student_spec(src: Sources, cfg: StudentConfig) -> ModelSpec:
    """The teacher's preprocessing (the cache and the pseudo-labels are on its grid), the student's channels."""
    t = teacher_spec(src.teacher)
    return ModelSpec(cfg.model.in_channels, t.spacing_xyz_mm, t.normalization, output="logits")


def _meta(src: Sources, cfg: StudentConfig, spec: ModelSpec, round_k: int, store: PseudoStore, used: int,
          dropped: set[str]) -> dict:  # fmt: skip
    train = {**json.loads(json.dumps(asdict(cfg), default=str)), "phase": "student", "round": round_k,
             "data": str(src.data), "unlabelled": str(src.unlabelled), "teacher": str(src.teacher),
             "validation": None if src.validation is None else str(src.validation), "pseudo_store": str(store.dir),
             "pseudo_cases": used, "dropped_cases": sorted(dropped)}  # fmt: skip
    return {"model_config": cfg.model.to_dict(), "spec": spec.to_dict(), "train_config": train}


def run(src: Sources, out: Path, cfg: StudentConfig, *, device: str, resume: bool) -> Path:
    """All rounds; returns the final student's best.pt."""
    rt = setup_runtime(device)
    try:
        if rt.is_main:
            out.mkdir(parents=True, exist_ok=True)
        spec = student_spec(src, cfg)
        labelled = _cache(discover_labelled(src.data), spec, src.cache, cfg.workers, rt)
        val = _cache(discover_labelled(src.validation), spec, src.cache, cfg.workers, rt) if src.validation else []
        teacher_source, dropped, summary = src.teacher, None, []
        for k in range(1, cfg.rounds + 1):
            teacher = load_teacher(teacher_source, rt.device)
            if k == 1 and cfg.pseudo.drop_disagreeing > 0 and len(teacher.models) < 2:
                raise ValueError(f"--drop-disagreeing needs a teacher of >= 2 members to disagree; "
                                 f"{teacher_source} has {len(teacher.models)}: drop the option")  # fmt: skip
            store, names = make_pseudo_labels(src.unlabelled, teacher, src.cache, cfg.pseudo, rt)
            del teacher  # free the teacher's memory before the student trains
            if dropped is None:  # round 1: the members' agreement; later teachers are one model, keep the same drop
                dropped = dropped_cases(store, names, cfg.pseudo.drop_disagreeing)
            pseudo = pseudo_cases(store, names, cfg.pseudo, rt, dropped)
            run_dir = out if k == cfg.rounds else out / f"round_{k}"
            meta = _meta(src, cfg, spec, k, store, len(pseudo), dropped)
            summary.append({"round": k, "teacher": str(teacher_source), "store": str(store.dir),
                            "run_dir": str(run_dir), "pseudo_cases": len(pseudo), "dropped": sorted(dropped)})
            if rt.is_main:
                (out / "pseudo.json").write_text(json.dumps(summary, indent=1) + "\n")
            train_round(labelled, pseudo, val, cfg, run_dir, teacher_source, meta, rt, resume)
            barrier(rt)
            teacher_source = run_dir / "best.pt"
        return teacher_source
    finally:
        teardown(rt)


# ----------------------------------------------------------------------------- CLI
app = typer_app()


@app.command()
def main(
    data: Path = typer.Option(..., help="labelled set: FLARE22 (images/, labels/) or nnU-Net (imagesTr/ ...)"),
    unlabelled: Path = typer.Option(..., help="folder of unlabelled NAME_0000.nii.gz CTs"),
    teacher: Path = typer.Option(..., help="RUN/teacher.json from python -m training.teacher"),
    out: Path = typer.Option(..., help="run folder: last.pt, best.pt, metrics.csv, curves.png, pseudo.json"),
    validation: Path = typer.Option(None, help="labelled validation set (default DATA/validation if it exists)"),
    epochs: int = typer.Option(200, help="epochs per round (the paper's; a CPU run wants tens, the smoke run 1)"),
    batch_size: int = typer.Option(20, help="slices per labelled batch and per pseudo-labelled batch"),
    lr: float = typer.Option(1e-5, help="initial lr, polynomial decay to 0"),
    beta: float = typer.Option(0.65, help="Eq. 1 / Eq. 2: weight of the Dice term"),
    aux_weight: float = typer.Option(0.1, help="deep-supervision loss weight"),
    width: int = typer.Option(32, help="U-Net base channels"),
    depth: int = typer.Option(5, help="U-Net encoder levels, the first at full resolution; >= 3"),
    in_channels: int = typer.Option(1, help="adjacent slices as channels (odd)"),
    patch_size: int = typer.Option(256, help="square training crop of each slice, px (at the teacher's spacing)"),
    p_flip: float = typer.Option(0.5, help="probability of each flip"),
    p_rotate: float = typer.Option(0.5, help="probability of a random rotation"),
    p_distort: float = typer.Option(0.2, help="probability of each of elastic, grid, optical distortion"),
    randomise: float = typer.Option(
        0.0, help="probability per slice of SynthSeg-style intensity randomisation (organ HU shifts, gamma, bias, "
        "blur, resolution, noise: training.augment.IntensityRandomiser; 0 = off)"),
    augment_pseudo: bool = typer.Option(False, help="augment pseudo-labelled slices too (paper: no)"),
    without_pseudo_labels: bool = typer.Option(
        False, help="the equal-budget control: each pseudo-labelled batch is replaced by a labelled one (same steps, "
        "schedule and start), so a student's gain over this run is what its pseudo-labels bought"),
    init_from_teacher: bool = typer.Option(False, help="start from the best teacher member (else Kaiming)"),
    confidence_threshold: float = typer.Option(0.0, help="Eq. 2 ignores voxels of teacher confidence below; 0 = off"),
    drop_disagreeing: float = typer.Option(0.0, help="drop this fraction of cases, those the members agree on least"),
    rounds: int = typer.Option(1, help="the student of round k teaches round k + 1"),
    unlabelled_fraction: float = typer.Option(1.0, help="share of unlabelled cases used (paper: 750/2000 = 0.375)"),
    pseudo_batch_size: int = typer.Option(16, help="slices per teacher call while pseudo-labelling"),
    val_every: int = typer.Option(10, help="epochs between validations (and at the last epoch)"),
    device: str = typer.Option("auto", help="auto|cuda|cpu"),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="mixed precision: bf16 where the GPU or CPU runs it "
                             "natively, fp16 on older GPUs, else float32"),
    resume: bool = typer.Option(False, help="continue from last.pt (pseudo-labels done are always kept)"),
    seed: int = typer.Option(0, help="seed of the initialisation, the sampling and the unlabelled subset"),
    oversample: float = typer.Option(
        0.0, help="share of training slices drawn to hold an organ chosen uniformly (small organs oversampled; 0 = "
        "the paper's uniform shuffle)"),
    workers: int = typer.Option(2, help="data loader workers and cache processes"),
    cache: Path = typer.Option(None, help="preprocessing cache (default: the teacher run's cache/)"),
) -> None:
    if validation is None and (data / "validation").is_dir():
        validation = data / "validation"
    cfg = StudentConfig(
        loop=LoopConfig(epochs=epochs, lr=lr, amp=amp, val_every=val_every, seed=seed),
        model=UNetConfig(in_channels=in_channels, width=width, depth=depth),
        augment=AugmentConfig.from_cli(p_flip, p_rotate, p_distort, randomise),
        pseudo=PseudoConfig(batch_size=pseudo_batch_size, unlabelled_fraction=unlabelled_fraction,
                            confidence_threshold=confidence_threshold, drop_disagreeing=drop_disagreeing, seed=seed),
        batch_size=batch_size, patch_size=patch_size, beta=beta, aux_weight=aux_weight, augment_pseudo=augment_pseudo,
        without_pseudo_labels=without_pseudo_labels, init_from_teacher=init_from_teacher, rounds=rounds,
        workers=workers, oversample=oversample,
    )  # fmt: skip
    src = Sources(data, unlabelled, teacher, validation, cache or teacher.parent / "cache")
    best = run(src, out, cfg, device=device, resume=resume)
    if os.environ.get("RANK", "0") == "0":
        print(closing_hint(best))


def closing_hint(best: Path) -> str:
    """The last line: the checkpoint, and an export command that writes beside it (never onto weights/, the
    shipped files: copying the export there is a choice the user makes, README "Train on FLARE22")."""
    return f"student: {best}  (export: python -m training.export {best} {best.parent / 'student.onnx'} --fp16)"


if __name__ == "__main__":
    app()
