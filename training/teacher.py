"""Phase one: five fold U-Nets, scored on their validation volumes; the best three are the teacher.

    python -m training.teacher --data data/phantoms --out runs/teacher                 # all 5 folds
    python -m training.teacher --data DIR --out RUN --n-folds 3                        # 3 folds, all members
    python -m training.teacher --data DIR --out RUN --folds 3                          # one fold (a job)
    python -m training.teacher --data DIR --out RUN --select-only                      # join the folds
    torchrun --nproc_per_node=8 -m training.teacher --data DIR --out RUN --folds 0     # DDP

Outputs in RUN_DIR: splits.json (5-fold 80/20 by default, seeded), fold_K/{last.pt, best.pt, metrics.csv,
curves.png, score.json}, teacher.json:

    {"members": [{"fold": 2, "checkpoint": "fold_2/best.pt", "score": 0.91}, ...3],
     "folds": [{"fold": 0, "score": ...}, ...], "spec": {ModelSpec dict}, "git_commit": "..."}

`load_teacher(teacher_json, device)` returns a `Teacher` (its members, their shared spec with output
"probabilities"); `teacher.predict_batch(device)` is the `SoftVote` callable (np (N, C, H, W) float32 ->
np (N, 14, H, W) float32 mean softmax of the members) that `flare_infer.pipeline.predict_volume` runs.

A fold's score is the mean 3D DSC over the 13 organs (`mean_organ_dsc`: FLARE22's empty-mask rule,
no NSD, no axial cut; see there why), averaged over its validation cases and computed on the cached
(resampled, canonical) volumes: the same preprocessing as deployment, without the final resampling
back to the input grid.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import typer
from torch import nn

from flare_infer.labels import NUM_CLASSES
from flare_infer.predictor import SliceConfig as PredictSliceConfig
from flare_infer.predictor import predict_slices
from flare_infer.spec import ModelSpec, Normalization
from training.augment import AugmentConfig, Augmenter
from training.cli import typer_app
from training.data import (
    CachedCase,
    DatasetError,
    SliceConfig,
    SliceDataset,
    build_cache,
    closing_workers,
    discover_labelled,
    make_loader,
    set_loader_epoch,
)
from training.fingerprint import load_or_compute_window
from training.loop import LoopConfig, StepContext, fit, load_model, make_optimizer, make_scheduler, prepare_model
from training.losses import deep_supervision_loss, eq1_loss
from training.model import UNet, UNetConfig
from training.utils import Runtime, barrier, git_commit, seed_everything, setup_runtime, teardown

NUM_FOLDS = 5  # the paper's; --n-folds
MIN_FOLDS = 2  # one fold would train and validate on the same cases
TEACHER_SIZE = 3  # the paper's best three; with fewer folds, every fold is a member


class SplitError(ValueError):
    """The labelled cases cannot be split as asked (too few cases, or a run folder split another way)."""


@dataclass(frozen=True)
class TeacherConfig:
    loop: LoopConfig = field(default_factory=LoopConfig)
    model: UNetConfig = field(default_factory=UNetConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    batch_size: int = 40  # the paper's
    patch_size: int = 256  # the paper's
    beta: float = 0.65  # Eq. 1: Dice weight
    aux_weight: float = 0.1  # deep-supervision head's loss weight
    spacing_xyz_mm: tuple[float, float, float] = (1.5, 1.5, 2.5)
    n_std: float = 3.0  # the mean_std kinds' clip
    # "ct_window" (default): a fixed HU window from the labelled foreground, resolved per run (`resolve_window`);
    # "body_mean_std_clip"; "mean_std_clip": the paper's rule over every voxel (flare_infer.preprocess)
    normalization: str = "ct_window"
    window: Normalization | None = None  # the resolved ct_window (RUN/normalization.json)
    oversample: float = 0.0  # share of slices drawn for an organ chosen uniformly (beyond the paper; 0 = off)
    workers: int = 2  # DataLoader workers (and cache-building processes)
    val_batch_size: int = 16

    def spec(self) -> ModelSpec:
        if self.normalization == "ct_window":
            if self.window is None:
                raise ValueError("ct_window normalisation is resolved from the data first: resolve_window(cfg, ...)")
            return ModelSpec(self.model.in_channels, self.spacing_xyz_mm, self.window)
        return ModelSpec(self.model.in_channels, self.spacing_xyz_mm, Normalization(self.normalization, self.n_std))


def resolve_window(cfg: TeacherConfig, cases: list, out: Path, rt: Runtime) -> TeacherConfig:
    """`cfg` with its ct_window computed from the labelled `cases` once per run (out/normalization.json)."""
    if cfg.normalization != "ct_window" or cfg.window is not None:
        return cfg
    if rt.is_main:
        load_or_compute_window(out / "normalization.json", cases, seed=cfg.loop.seed)
    barrier(rt)
    return replace(cfg, window=load_or_compute_window(out / "normalization.json", cases, seed=cfg.loop.seed))


# ----------------------------------------------------------------------------- splits
def check_fold_count(n_cases: int, k: int) -> None:
    """SplitError unless `n_cases` labelled cases make `k` folds (MIN_FOLDS <= k <= n_cases: a validation case each)."""
    if k < MIN_FOLDS:
        raise SplitError(f"cross-validation needs --n-folds >= {MIN_FOLDS}; found {k}")
    if n_cases < k:
        hint = f"use --n-folds {n_cases} or add" if n_cases >= MIN_FOLDS else f"add at least {MIN_FOLDS - n_cases} more"
        raise SplitError(f"{k}-fold cross-validation needs at least {k} labelled cases (one validation case per "
                         f"fold); found {n_cases}: {hint} labelled cases")  # fmt: skip


def make_splits(names: list[str], seed: int, k: int = NUM_FOLDS) -> list[dict[str, list[str]]]:
    """k folds: each case in exactly one validation set (sizes differ by at most one), seeded shuffle."""
    check_fold_count(len(names), k)
    order = np.random.default_rng(seed).permutation(sorted(names))
    vals = [sorted(order[i::k].tolist()) for i in range(k)]
    return [{"train": sorted(set(names) - set(v)), "val": v} for v in vals]


def check_split_folds(path: Path, k: int) -> None:
    """SplitError unless the run's splits.json at `path` has `k` folds."""
    found = len(json.loads(path.read_text())["folds"])
    if found != k:
        raise SplitError(f"{path} has {found} folds, --n-folds asks for {k}: give --n-folds {found}, or a new --out")


def load_or_make_splits(path: Path, names: list[str], seed: int, k: int = NUM_FOLDS) -> list[dict[str, list[str]]]:
    if path.is_file():
        data = json.loads(path.read_text())
        found = sorted({n for f in data["folds"] for n in f["val"]})
        if found != sorted(names):
            raise SplitError(
                f"{path} splits other cases than {path.parent}'s dataset ({len(found)} vs {len(names)} cases); "
                "use a new --out or delete splits.json"
            )
        check_split_folds(path, k)
        return data["folds"]
    folds = make_splits(names, seed, k)
    path.write_text(json.dumps({"seed": seed, "folds": folds}, indent=1) + "\n")
    return folds


# ----------------------------------------------------------------------------- one fold
def _loader(cases: list[CachedCase], cfg: TeacherConfig, rt: Runtime) -> torch.utils.data.DataLoader:
    aug = Augmenter(cfg.augment) if cfg.augment.enabled else None
    ds = SliceDataset(cases, SliceConfig(cfg.model.in_channels, cfg.patch_size), aug)
    return make_loader(ds, batch_size=cfg.batch_size, workers=cfg.workers, oversample=cfg.oversample,
                       seed=cfg.loop.seed, rt=rt)  # fmt: skip


def make_step(cfg: TeacherConfig):
    def step(model: nn.Module, batch: dict, ctx: StepContext) -> tuple[torch.Tensor, int]:
        image, label = ctx.to_device(batch["image"]), ctx.to_device(batch["label"])
        main, aux = model(image)
        loss = deep_supervision_loss(eq1_loss, main, aux, label, aux_weight=cfg.aux_weight, beta=cfg.beta)
        return loss, image.shape[0]

    return step


class SoftVote:
    """predict_batch for flare_infer: np (N, C, H, W) f32 -> np (N, 14, H, W) f32, the mean softmax of `models`
    (soft voting; eval mode, no grad). The one ensemble of the project: fold scoring, the teacher, pseudo-labels.

    With `agreement_hw` (the volume's real, unpadded (h, w)) it also accumulates, per pair of members, the
    joint histogram of their argmax labels over that region, from which `agreement()` gives their mean
    pairwise organ Dice; pseudo-labelling records it per case.
    """

    def __init__(self, models, device: str | torch.device, agreement_hw: tuple[int, int] | None = None) -> None:
        self.models, self.device, self.agreement_hw = tuple(models), torch.device(device), agreement_hw
        n = len(self.models) if agreement_hw is not None else 0
        self.pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        self.joint = torch.zeros(len(self.pairs), NUM_CLASSES * NUM_CLASSES, dtype=torch.int64, device=self.device)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        total, labels = None, []
        with torch.no_grad():
            for m in self.models:
                probs = torch.softmax(m(x)[0].float(), dim=1)  # (N, 14, H, W)
                total = probs if total is None else total + probs
                if self.pairs:
                    h, w = self.agreement_hw
                    labels.append(probs[:, :, :h, :w].argmax(dim=1))  # (N, h, w)
            for k, (i, j) in enumerate(self.pairs):
                self.joint[k] += torch.bincount((labels[i] * NUM_CLASSES + labels[j]).flatten(),
                                                minlength=NUM_CLASSES * NUM_CLASSES)  # fmt: skip
        return (total / len(self.models)).cpu().numpy()

    def agreement(self) -> float:
        """Mean over member pairs of their mean organ DSC (`confusion_dscs`); 1.0 with one member."""
        if len(self.models) == 1:
            return 1.0
        if self.agreement_hw is None:
            raise ValueError("SoftVote(..., agreement_hw=(h, w)) counts the members' agreement; it was built without")
        n = NUM_CLASSES
        return float(np.mean([confusion_dscs(j.view(n, n).cpu().numpy()).mean() for j in self.joint]))


def score_cases(model: nn.Module, cases: list[CachedCase], cfg: TeacherConfig, device: torch.device) -> list[float]:
    """Mean organ DSC of each case, predicted slice by slice on its cached volume."""
    predict = SoftVote([model], device)
    slice_cfg = PredictSliceConfig(cfg.model.in_channels, cfg.val_batch_size, output="probabilities")
    scores = []
    for case in cases:
        labels_zyx, _ = predict_slices(predict, np.asarray(case.image(), dtype=np.float32), slice_cfg)
        scores.append(mean_organ_dsc(labels_zyx, np.asarray(case.label())))
    return scores


def confusion_dscs(confusion: np.ndarray) -> np.ndarray:
    """3D DSC of each of the 13 organs (label order) from a (14, 14) confusion matrix of two labellings, with
    FLARE22's empty-mask rule: an organ absent from both scores 1, from one only 0.

    The one Dice of the training code: fold scores, the members' agreement, the pseudo-label quality
    report. The rule is the challenge's (and `flare_infer.evaluate`'s), so all three read on the same scale
    as the official scores; an organ both labellings leave out is an agreement, not a gap.
    """
    inter = np.diag(confusion)[1:].astype(np.float64)
    total = confusion.sum(0)[1:] + confusion.sum(1)[1:]  # |a| + |b| per organ
    return np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)


def organ_dscs(pred_zyx: np.ndarray, gt_zyx: np.ndarray) -> np.ndarray:
    """`confusion_dscs` of a prediction against its ground truth (any shapes, equal)."""
    n = NUM_CLASSES
    confusion = np.bincount(gt_zyx.astype(np.int64).ravel() * n + pred_zyx.ravel(), minlength=n * n).reshape(n, n)
    return confusion_dscs(confusion)


def mean_organ_dsc(pred_zyx: np.ndarray, gt_zyx: np.ndarray) -> float:
    """Mean of `organ_dscs` over the 13 organs.

    DSC only: flare_infer.evaluate.evaluate_case also computes NSD, which on an early, noisy
    prediction costs minutes per volume, and the organisers' axial-range cut (aorta, IVC,
    oesophagus) is left out; this number ranks folds, the official scores come from
    `python -m flare_infer.evaluate` on restored masks.
    """
    return float(organ_dscs(pred_zyx, gt_zyx).mean())


def train_fold(fold: int, split: dict, cached: dict[str, CachedCase], cfg: TeacherConfig, out: Path,
               rt: Runtime, resume: bool) -> float:  # fmt: skip
    """Train one fold into out/fold_K; return its validation score (best.pt's)."""
    seed_everything(cfg.loop.seed + fold)
    run_dir = out / f"fold_{fold}"
    if rt.is_main:  # the fold's header; training.loop's epoch lines below carry its name too
        print(f"fold_{fold}: {len(split['train'])} training cases, {len(split['val'])} validation cases -> {run_dir}",
              flush=True)  # fmt: skip
    train_cases = [cached[n] for n in split["train"]]
    val_cases = [cached[n] for n in split["val"]]
    loader = _loader(train_cases, cfg, rt)
    model = prepare_model(UNet(cfg.model), rt)
    optimizer = make_optimizer(model, cfg.loop)
    scheduler = make_scheduler(optimizer, cfg.loop.epochs * len(loader), cfg.loop.poly_power)

    def batches(epoch: int):
        set_loader_epoch(loader, epoch)
        return loader

    def validate(net: nn.Module, epoch: int) -> dict[str, float]:
        return {"val_dsc": float(np.mean(score_cases(net, val_cases, cfg, rt.device)))}

    meta = {"model_config": cfg.model.to_dict(), "spec": cfg.spec().to_dict(), "train_config": _jsonable(cfg),
            "fold": fold, "split": split}  # fmt: skip
    with closing_workers(loader):  # this fold's workers end here, not when the collector finds the loader
        history = fit(model, optimizer, scheduler, make_step(cfg), batches, cfg.loop, run_dir, rt,
                      validate_fn=validate, meta=meta, resume=resume)  # fmt: skip
    scores = [r["val_dsc"] for r in history if "val_dsc" in r]
    score = max(scores) if scores else float("nan")
    if rt.is_main:
        (run_dir / "score.json").write_text(json.dumps({"fold": fold, "score": score, "val": split["val"]}) + "\n")
    barrier(rt)
    return score


# ----------------------------------------------------------------------------- selection, the teacher
def select_teacher(out: Path, spec: ModelSpec | None = None, k: int = TEACHER_SIZE, n_folds: int = NUM_FOLDS) -> dict:
    """Read fold_*/score.json of the `n_folds` folds, keep the best min(k, n_folds), write out/teacher.json."""
    found = {}
    for fold in range(n_folds):
        path = out / f"fold_{fold}" / "score.json"
        if path.is_file():
            found[fold] = json.loads(path.read_text())["score"]
    missing = sorted(set(range(n_folds)) - set(found))
    if missing:
        raise FileNotFoundError(
            f"{out}: folds {missing} have no score.json (not trained or not finished); "
            f"run `python -m training.teacher --data DATA --out {out} --n-folds {n_folds} "
            f"--folds {','.join(map(str, missing))}` first"
        )
    ranked = sorted(found, key=lambda f: -(found[f] if math.isfinite(found[f]) else -1.0))
    members = [{"fold": f, "checkpoint": f"fold_{f}/best.pt", "score": found[f]} for f in ranked[:k]]
    if spec is None:
        _, _, spec = load_model(out / members[0]["checkpoint"])
    teacher = {"members": members, "folds": [{"fold": f, "score": found[f]} for f in range(n_folds)],
               "spec": spec.to_dict(), "git_commit": git_commit()}  # fmt: skip
    (out / "teacher.json").write_text(json.dumps(teacher, indent=2) + "\n")
    return teacher


@dataclass(frozen=True)
class Teacher:
    """Models whose mean softmax (`SoftVote`) labels the cases; `key` names their pseudo-label store."""

    models: tuple[nn.Module, ...]
    spec: ModelSpec  # the members' shared preprocessing, output "probabilities"
    key: str  # hash of teacher.json and the member checkpoints (or of the one checkpoint)
    source: str  # teacher.json or a checkpoint

    def predict_batch(self, device: str | torch.device, agreement_hw: tuple[int, int] | None = None) -> SoftVote:
        return SoftVote(self.models, device, agreement_hw)


def _file_hash(paths: list[Path]) -> str:
    h = hashlib.sha1()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def load_teacher(teacher: str | Path, device: str | torch.device = "cpu") -> Teacher:
    """A phase-one teacher.json (its members, best first) or one checkpoint (a one-member teacher: a student
    teaching the next round, a single U-Net); the members must share their preprocessing."""
    path = Path(teacher)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no teacher here; expected RUN/teacher.json from `python -m training.teacher`")
    if path.suffix == ".json":
        ckpts = [path.parent / m["checkpoint"] for m in json.loads(path.read_text())["members"]]
        files = [path, *ckpts]
    else:
        ckpts, files = [path], [path]
    loaded = [load_model(c, device) for c in ckpts]  # (model in eval mode, UNetConfig, ModelSpec) each
    specs = {(s.spacing_xyz_mm, s.normalization, s.input_channels) for _, _, s in loaded}
    if len(specs) != 1:
        raise ValueError(f"{path}: the members disagree on preprocessing (spacing, normalisation, channels): {specs}")
    spec = ModelSpec.from_dict({**loaded[0][2].to_dict(), "output": "probabilities"}, source=str(path))
    return Teacher(tuple(m for m, _, _ in loaded), spec, _file_hash(files), str(path))


def teacher_spec(teacher: str | Path) -> ModelSpec:
    """The members' ModelSpec with output "probabilities": read from teacher.json without loading the models, or
    from the checkpoint of a one-member teacher (what `load_teacher` takes too)."""
    path = Path(teacher)
    d = json.loads(path.read_text())["spec"] if path.suffix == ".json" else load_model(path, "cpu")[2].to_dict()
    return ModelSpec.from_dict({**d, "output": "probabilities"}, source=str(path))


def _jsonable(cfg: TeacherConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))


# ----------------------------------------------------------------------------- CLI
def run(data: Path, out: Path, folds: list[int] | None, cfg: TeacherConfig, *, device: str, resume: bool,
        cache: Path | None, select_only: bool, n_folds: int = NUM_FOLDS) -> None:  # fmt: skip
    """Train `folds` (None: all `n_folds`) of the run in `out`, then select the teacher once every fold is done."""
    folds = list(range(n_folds)) if folds is None else folds
    if not all(0 <= f < n_folds for f in folds):
        raise SplitError(f"--folds must be numbers in 0..{n_folds - 1} with --n-folds {n_folds}; found {folds}")
    rt = setup_runtime(device)
    try:
        if rt.is_main:
            out.mkdir(parents=True, exist_ok=True)
        if select_only:
            if rt.is_main:
                if (out / "splits.json").is_file():  # the folds this run was split into
                    check_split_folds(out / "splits.json", n_folds)
                _print_teacher(select_teacher(out, n_folds=n_folds))
            return
        cases = discover_labelled(data)
        check_fold_count(len(cases), n_folds)  # before the cache: seconds, not the cache's minutes
        cfg = resolve_window(cfg, cases, out, rt)
        spec = cfg.spec()
        cache_dir = cache or out / "cache"
        if rt.is_main:
            build_cache(cases, spec, cache_dir, cfg.workers)
        barrier(rt)
        cached = {c.name: c for c in build_cache(cases, spec, cache_dir, quiet=True)}  # all built: paths only
        if rt.is_main:
            load_or_make_splits(out / "splits.json", sorted(cached), cfg.loop.seed, n_folds)
        barrier(rt)
        splits = load_or_make_splits(out / "splits.json", sorted(cached), cfg.loop.seed, n_folds)
        for fold in folds:
            train_fold(fold, splits[fold], cached, cfg, out, rt, resume)
        if rt.is_main and all((out / f"fold_{f}" / "score.json").is_file() for f in range(n_folds)):
            _print_teacher(select_teacher(out, spec, n_folds=n_folds))
    finally:
        teardown(rt)


def _print_teacher(teacher: dict) -> None:
    members = ", ".join(f"fold {m['fold']} ({m['score']:.4f})" for m in teacher["members"])
    print(f"teacher: {members}")


def _parse_folds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        folds = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise typer.BadParameter(f"--folds takes comma-separated fold numbers like 0,1,2,3,4; found {text!r}") from None
    if not folds:
        raise typer.BadParameter(f"--folds takes comma-separated fold numbers like 0,1,2,3,4; found {text!r}")
    return folds


app = typer_app()


@app.command()
def main(
    data: Path = typer.Option(None, help="dataset folder: FLARE22 (images/, labels/) or nnU-Net (imagesTr/ ...)"),
    out: Path = typer.Option(..., help="run folder: splits.json, fold_K/, teacher.json"),
    folds: str = typer.Option(None, help="folds to train in this job, e.g. 0,2 (default: all --n-folds)"),
    n_folds: int = typer.Option(NUM_FOLDS, min=MIN_FOLDS, help=f"cross-validation folds, at least {MIN_FOLDS} and at "
                                f"most the labelled cases; the teacher is the best {TEACHER_SIZE} folds, or every "
                                f"fold when there are fewer than {TEACHER_SIZE}"),  # fmt: skip
    epochs: int = typer.Option(3000, help="epochs per fold (the paper's; a CPU run wants tens, the smoke run 1)"),
    batch_size: int = typer.Option(40, help="slices per batch"),
    lr: float = typer.Option(2e-4, help="initial learning rate, polynomial decay to 0 (Adam)"),
    beta: float = typer.Option(0.65, help="Eq. 1: weight of the Dice term"),
    aux_weight: float = typer.Option(0.1, help="deep-supervision loss weight"),
    width: int = typer.Option(32, help="U-Net base channels"),
    depth: int = typer.Option(5, help="U-Net encoder levels, the first at full resolution; >= 3"),
    in_channels: int = typer.Option(1, help="adjacent slices as channels (odd)"),
    patch_size: int = typer.Option(256, help="square training crop of each slice, px (at --spacing)"),
    spacing: str = typer.Option("1.5,1.5,2.5", help="x,y,z mm"),
    p_flip: float = typer.Option(0.5, help="probability of each flip"),
    p_rotate: float = typer.Option(0.5, help="probability of a random rotation"),
    p_distort: float = typer.Option(0.2, help="probability of each of elastic, grid, optical distortion"),
    randomise: float = typer.Option(
        0.0, help="probability per slice of SynthSeg-style intensity randomisation (organ HU shifts, gamma, bias, "
        "blur, resolution, noise: training.augment.IntensityRandomiser; 0 = off)"),
    val_every: int = typer.Option(50, help="epochs between validations (and at the last epoch)"),
    device: str = typer.Option("auto", help="auto|cuda|cpu"),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="mixed precision: bf16 where the GPU or CPU runs it "
                             "natively, fp16 on older GPUs, else float32"),
    resume: bool = typer.Option(False, help="continue each fold from its last.pt"),
    seed: int = typer.Option(0, help="seed of the split, the initialisation and the sampling"),
    oversample: float = typer.Option(
        0.0, help="share of training slices drawn to hold an organ chosen uniformly (small organs oversampled; 0 = "
        "the paper's uniform shuffle)"),
    normalization: str = typer.Option(
        "ct_window", help="ct_window (a fixed HU window from the labelled foreground, inside the body), "
        "body_mean_std_clip, or mean_std_clip (the paper's, over every voxel: depends on the field of view and "
        "padding; docs/INFERENCE.md)"),
    workers: int = typer.Option(2, help="data loader workers and cache processes"),
    cache: Path = typer.Option(None, help="preprocessing cache folder (default RUN_DIR/cache)"),
    select_only: bool = typer.Option(False, help="only pick the best folds into teacher.json (as --n-folds says)"),
) -> None:
    if data is None and not select_only:
        raise typer.BadParameter("--data is required unless --select-only")
    cfg = TeacherConfig(
        loop=LoopConfig(epochs=epochs, lr=lr, amp=amp, val_every=val_every, seed=seed),
        # no aux head when its weight is 0: DDP refuses parameters that get no gradient
        model=UNetConfig(in_channels=in_channels, width=width, depth=depth, deep_supervision=aux_weight > 0),
        augment=AugmentConfig.from_cli(p_flip, p_rotate, p_distort, randomise),
        batch_size=batch_size, patch_size=patch_size, beta=beta, aux_weight=aux_weight,
        spacing_xyz_mm=tuple(float(s) for s in spacing.split(",")), workers=workers, oversample=oversample,
        normalization=normalization,
    )  # fmt: skip
    try:
        run(data, out, _parse_folds(folds), cfg, device=device, resume=resume, cache=cache, select_only=select_only,
            n_folds=n_folds)  # fmt: skip
    except (SplitError, DatasetError) as e:  # the user's data or options: one line, not a traceback
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


if __name__ == "__main__":
    app()
