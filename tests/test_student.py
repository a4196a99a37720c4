"""Phase two end to end on a tiny generated set: a tiny phase-one teacher, pseudo-labels, the student, --resume.

    pytest tests/test_student.py -x
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from flare_infer import pipeline
from flare_infer.labels import NUM_CLASSES
from flare_infer.predictor import SliceConfig, predict_slices
from training.augment import AugmentConfig
from training.data import discover_labelled
from training.loop import LoopConfig, load_model
from training.model import UNetConfig
from training.phantoms import generate_dataset
from training.student import Alternating, app
from training.teacher import TeacherConfig
from training.teacher import run as run_teacher

# Small enough for seconds per run on 2 CPU cores: 8 mm voxels, width 2, 32 x 32 patches, one epoch.
TINY = ["--width", "2", "--batch-size", "8", "--patch-size", "32", "--workers", "0", "--val-every", "1",
        "--device", "cpu", "--pseudo-batch-size", "8"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def phase_one(tmp_path_factory) -> tuple[Path, Path]:
    """A generated set (5 labelled, 2 unlabelled, 1 validation) and the teacher of a one-epoch phase-one run."""
    tmp = tmp_path_factory.mktemp("phase2")
    data = tmp / "data"
    generate_dataset(data, labelled=5, unlabelled=2, validation=1, size="small", progress=False)
    cfg = TeacherConfig(loop=LoopConfig(epochs=1, val_every=1), model=UNetConfig(width=2),
                        augment=AugmentConfig(0, 0, 0, 0, 0, 0, 0), batch_size=8, patch_size=32,
                        spacing_xyz_mm=(8.0, 8.0, 12.0), workers=0)  # fmt: skip
    run_teacher(data, tmp / "teacher", [0, 1, 2, 3, 4], cfg, device="cpu", resume=False, cache=None, select_only=False)
    return data, tmp / "teacher" / "teacher.json"


def _student(data: Path, teacher: Path, out: Path, *extra: str):
    args = ["--data", str(data), "--unlabelled", str(data / "unlabelled"), "--teacher", str(teacher),
            "--out", str(out), *TINY, *extra]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def recomputed_val_dsc(checkpoint: Path, validation: Path) -> float:
    """best.pt's mean organ DSC on the validation cases, recomputed apart from the training code: the files read
    and prepared by flare_infer.pipeline, the checkpoint's U-Net, DSC per organ with FLARE22's empty-mask rule."""
    model, _, spec = load_model(checkpoint)

    def predict_batch(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(batch))[0].float().numpy()

    case_means = []
    for case in discover_labelled(validation):
        prepared = pipeline.prepare(sitk.ReadImage(str(case.image)), spec)
        truth_zyx = pipeline.label_on_prepared(sitk.ReadImage(str(case.label)), prepared)
        # The training cache stores the prepared volume as float16 (training/data.py); near chance the score hinges
        # on a handful of voxels whose argmax that rounding flips, so round the same way.
        vol_zyx = prepared.vol_zyx.astype(np.float16).astype(np.float32)
        pred_zyx = predict_slices(predict_batch, vol_zyx, SliceConfig(spec.input_channels, batch_size=8))[0]
        dscs = []
        for organ in range(1, NUM_CLASSES):
            p, t = pred_zyx == organ, truth_zyx == organ
            dscs.append(1.0 if not (p.any() or t.any()) else 2 * (p & t).sum() / (p.sum() + t.sum()))
        case_means.append(np.mean(dscs))
    return float(np.mean(case_means))


def test_student_smoke_run_then_resume_continues(phase_one, tmp_path):
    data, teacher = phase_one
    out = tmp_path / "student"
    _student(data, teacher, out, "--epochs", "1")
    for name in ("last.pt", "best.pt", "metrics.csv", "curves.png", "pseudo.json"):
        assert (out / name).is_file(), name
    first = _rows(out)
    assert len(first) == 1
    # The logged score is best.pt's on the validation set (one epoch: best is that epoch). The tiny model is
    # near chance (~4e-4) but its number is specific; 1% allows the few voxels that float rounding flips.
    recomputed = recomputed_val_dsc(out / "best.pt", data / "validation")
    assert float(first[0]["val_dsc"]) == pytest.approx(recomputed, rel=0.01) and recomputed > 0
    model, cfg, spec = load_model(out / "best.pt")
    assert cfg.width == 2 and spec.spacing_xyz_mm == (8.0, 8.0, 12.0) and spec.output == "logits"
    ckpt = torch.load(out / "last.pt", weights_only=False)
    train = ckpt["train_config"]
    assert train["phase"] == "student" and train["pseudo_cases"] == 2 and train["data"] == str(data)
    assert ckpt["loop_config"]["lr"] == 1e-5 and tuple(ckpt["loop_config"]["adam_betas"]) == (0.5, 0.999)

    result = _student(data, teacher, out, "--epochs", "2", "--resume")
    assert "resuming" in result.output
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[0] == first[0]  # epoch 1 kept, not retrained


def test_rounds_threshold_drop_and_init_from_teacher(phase_one, tmp_path):
    data, teacher = phase_one
    out = tmp_path / "rounds"
    _student(data, teacher, out, "--epochs", "1", "--rounds", "2", "--confidence-threshold", "0.5",
             "--drop-disagreeing", "0.5", "--init-from-teacher", "--oversample", "0.5")  # fmt: skip
    rounds = json.loads((out / "pseudo.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["teacher"] == str(teacher) and rounds[1]["teacher"] == str(out / "round_1" / "best.pt")
    assert rounds[0]["store"] != rounds[1]["store"]  # a new teacher never reuses old pseudo-labels
    assert len(rounds[0]["dropped"]) == 1 and rounds[0]["dropped"] == rounds[1]["dropped"]
    assert rounds[0]["pseudo_cases"] == rounds[1]["pseudo_cases"] == 1
    assert (out / "round_1" / "best.pt").is_file() and (out / "best.pt").is_file()
    store = Path(rounds[1]["store"])
    assert len(list(store.glob("*.weight-0.5000.npy"))) == 1  # the confidence mask of the kept case


def test_each_iteration_is_a_labelled_then_a_pseudo_labelled_batch():
    labelled, pseudo = [f"L{i}" for i in range(2)], [f"P{i}" for i in range(5)]  # loaders: any iterables with len
    items = list(Alternating(labelled, pseudo, epoch=0))
    assert len(Alternating(labelled, pseudo, epoch=0)) == len(items) == 10
    assert [k for k, _ in items] == ["labelled", "pseudo"] * 5
    assert [b for _, b in items[1::2]] == pseudo  # one pass over the pseudo-labelled slices
    assert [b for _, b in items[0::2]] == ["L0", "L1", "L0", "L1", "L0"]  # the labelled loader cycles


def test_the_control_puts_a_labelled_batch_in_every_pseudo_slot():
    """--without-pseudo-labels: the same number of steps as the student, every one of them labelled (Eq. 1), the
    labelled loader cycling on; no pseudo-labelled batch is ever used."""
    labelled, pseudo = [f"L{i}" for i in range(3)], [f"P{i}" for i in range(4)]
    items = list(Alternating(labelled, pseudo, epoch=0, without_pseudo_labels=True))
    assert len(Alternating(labelled, pseudo, epoch=0, without_pseudo_labels=True)) == len(items) == 8
    assert [k for k, _ in items] == ["labelled"] * 8
    assert [b for _, b in items] == ["L0", "L1", "L2", "L0", "L1", "L2", "L0", "L1"]


def test_the_control_option_reaches_the_training_config(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("training.student.run", lambda src, out, cfg, **kw: seen.setdefault("cfg", cfg) and out)
    for flag, expected in (([], False), (["--without-pseudo-labels"], True)):
        seen.clear()
        result = CliRunner().invoke(app, ["--data", str(tmp_path), "--unlabelled", str(tmp_path), "--teacher",
                                          str(tmp_path / "t.json"), "--out", str(tmp_path / "o"), *flag])
        assert result.exit_code == 0, result.output
        assert seen["cfg"].without_pseudo_labels is expected
