"""Phase one end to end on a tiny dataset: folds, splits, teacher.json, resume, torchrun.

    pytest tests/test_teacher.py
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flare_infer.io import read_ct
from flare_infer.pipeline import predict_volume, prepare
from flare_infer.spec import ModelSpec
from training.loop import load_model
from training.teacher import SplitError, load_or_make_splits, load_teacher, make_splits, select_teacher, teacher_spec

sys.path.insert(0, str(Path(__file__).parent))
from test_data import write_tiny_dataset  # noqa: E402

TINY = ["--epochs", "2", "--batch-size", "8", "--width", "4", "--patch-size", "32", "--spacing", "3,3,5",
        "--val-every", "1", "--workers", "0", "--device", "cpu"]  # fmt: skip


def _teacher(*args: str, env: dict | None = None, module: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(module or ["-m", "training.teacher"]), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=300)


def _epochs(run_dir: Path) -> list[int]:
    with open(run_dir / "metrics.csv") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def test_split_is_disjoint_complete_and_seeded():
    names = [f"c{i:02d}" for i in range(23)]
    folds = make_splits(names, seed=3)
    vals = [set(f["val"]) for f in folds]
    assert sorted(n for v in vals for n in v) == names  # complete, each case validated once
    assert all(a.isdisjoint(b) for i, a in enumerate(vals) for b in vals[i + 1 :])
    assert all(set(f["train"]) == set(names) - set(f["val"]) for f in folds)
    assert {len(v) for v in vals} == {4, 5}  # 80/20
    assert make_splits(names, seed=3) == folds
    assert make_splits(names, seed=4) != folds


def test_fewer_cases_than_folds_is_refused_with_the_fold_count_that_would_work():
    with pytest.raises(SplitError, match=r"5-fold cross-validation needs at least 5 labelled cases .* found 3: use "
                                         r"--n-folds 3"):
        make_splits(["a", "b", "c"], seed=0)
    with pytest.raises(SplitError, match="add at least 1 more"):
        make_splits(["a"], seed=0, k=2)
    folds = make_splits(["a", "b", "c"], seed=0, k=2)
    assert sorted(len(f["val"]) for f in folds) == [1, 2]


def test_a_run_split_into_other_folds_says_which_n_folds_it_was(tmp_path):
    names = [f"c{i}" for i in range(6)]
    load_or_make_splits(tmp_path / "splits.json", names, seed=0, k=3)
    assert len(load_or_make_splits(tmp_path / "splits.json", names, seed=0, k=3)) == 3
    with pytest.raises(SplitError, match="has 3 folds, --n-folds asks for 5: give --n-folds 3"):
        load_or_make_splits(tmp_path / "splits.json", names, seed=0, k=5)


def test_with_fewer_folds_than_the_teacher_size_every_fold_is_a_member(tmp_path):
    for fold, score in ((0, 0.4), (1, 0.7)):
        (tmp_path / f"fold_{fold}").mkdir()
        (tmp_path / f"fold_{fold}" / "score.json").write_text(json.dumps({"fold": fold, "score": score}))
    teacher = select_teacher(tmp_path, ModelSpec(1, (1.0, 1.0, 1.0)), n_folds=2)
    assert [m["fold"] for m in teacher["members"]] == [1, 0]  # best first
    assert [f["fold"] for f in teacher["folds"]] == [0, 1]


def test_too_few_cases_is_one_line_before_any_work(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", 3)
    proc = _teacher("--data", str(data), "--out", str(tmp_path / "run"), *TINY)  # 5 folds by default
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: 5-fold cross-validation needs at least 5 labelled cases (one validation case per fold); found 3: "
        "use --n-folds 3 or add labelled cases"
    ]
    assert not (tmp_path / "run" / "cache").exists() and not (tmp_path / "run" / "splits.json").exists()


def test_selection_refuses_missing_folds(tmp_path):
    (tmp_path / "fold_0").mkdir()
    (tmp_path / "fold_0" / "score.json").write_text(json.dumps({"fold": 0, "score": 0.5}))
    with pytest.raises(FileNotFoundError, match=r"folds \[1, 2, 3, 4\]"):
        select_teacher(tmp_path)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    data = write_tiny_dataset(root / "data", 5)
    out = root / "run"
    proc = _teacher("--data", str(data), "--out", str(out), *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return data, out


@pytest.mark.slow
def test_smoke_run_writes_five_folds_splits_and_a_three_member_teacher(smoke_run):
    _, out = smoke_run
    splits = json.loads((out / "splits.json").read_text())["folds"]
    assert len(splits) == 5
    for k in range(5):
        fold = out / f"fold_{k}"
        for name in ("last.pt", "best.pt", "metrics.csv", "curves.png", "score.json"):
            assert (fold / name).is_file(), fold / name
        assert _epochs(fold) == [1, 2]
    ckpt = torch.load(out / "fold_0" / "last.pt", weights_only=False)
    expected = {"model_config", "spec", "train_config", "metrics", "epoch", "optimizer", "scheduler", "git_commit"}
    assert expected <= set(ckpt)
    teacher = json.loads((out / "teacher.json").read_text())
    scores = {f["fold"]: f["score"] for f in teacher["folds"]}
    assert len(teacher["members"]) == 3
    assert [m["score"] for m in teacher["members"]] == sorted(scores.values(), reverse=True)[:3]
    assert all((out / m["checkpoint"]).is_file() for m in teacher["members"])


@pytest.mark.slow
def test_teacher_soft_votes_through_the_inference_pipeline(smoke_run):
    data, out = smoke_run
    predict_batch = load_teacher(out / "teacher.json", "cpu").predict_batch("cpu")
    x = np.random.default_rng(0).random((3, 1, 32, 48), dtype=np.float32)
    probs = predict_batch(x)
    assert probs.shape == (3, 14, 32, 48) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    members = json.loads((out / "teacher.json").read_text())["members"]
    one = load_model(out / members[0]["checkpoint"], "cpu")[0]
    with torch.no_grad():
        p0 = torch.softmax(one(torch.from_numpy(x))[0], 1).numpy()
    assert not np.allclose(p0, probs, atol=1e-6)  # a mean of three, not one member
    spec = teacher_spec(out / "teacher.json")
    prepared = prepare(read_ct(data / "images" / "case_000_0000.nii.gz"), spec)
    labels_zyx, confidence_zyx = predict_volume(prepared, predict_batch, spec, batch_size=4)
    assert labels_zyx.shape == prepared.vol_zyx.shape and confidence_zyx.max() <= 1.0


@pytest.mark.slow
def test_select_only_rebuilds_the_same_teacher(smoke_run):
    _, out = smoke_run
    before = json.loads((out / "teacher.json").read_text())
    proc = _teacher("--out", str(out), "--select-only")
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = json.loads((out / "teacher.json").read_text())
    assert after["members"] == before["members"]


@pytest.mark.slow
def test_three_cases_train_two_folds_whose_log_names_each_fold_and_both_form_the_teacher(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", 3)
    out = tmp_path / "run"
    proc = _teacher("--data", str(data), "--out", str(out), "--n-folds", "2", *TINY, "--epochs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert len(json.loads((out / "splits.json").read_text())["folds"]) == 2
    teacher = json.loads((out / "teacher.json").read_text())
    assert sorted(m["fold"] for m in teacher["members"]) == [0, 1]  # teacher size 3 > 2 folds: every fold
    lines = proc.stdout.splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith("fold_") and "training cases" in line]
    assert [lines[i].split(":")[0] for i in heads] == ["fold_0", "fold_1"]
    # every epoch line names its fold too, and so does each progress line within the epoch (off a terminal)
    epochs = [next(line for line in lines[i + 1 :] if ": epoch" in line) for i in heads]
    assert epochs[0].startswith("fold_0: epoch 1") and epochs[1].startswith("fold_1: epoch 1")
    steps = [line for line in lines if " step " in line]
    assert steps and all(line.startswith(("fold_0 epoch 1/1 step", "fold_1 epoch 1/1 step")) for line in steps)


@pytest.mark.slow
def test_resume_after_a_kill_continues_from_the_last_epoch(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", 5)
    out = tmp_path / "run"
    args = ["--data", str(data), "--out", str(out), "--folds", "0", *TINY, "--epochs", "3"]
    killed = _teacher(*args, env={"FLARE_TRAINING_FAULT": "stop-after-epoch:2"})
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert _epochs(out / "fold_0") == [1, 2] and not (out / "fold_0" / "score.json").exists()
    first = (out / "fold_0" / "metrics.csv").read_text().splitlines()[1]
    resumed = _teacher(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout and "after epoch 2" in resumed.stdout
    assert _epochs(out / "fold_0") == [1, 2, 3]
    assert (out / "fold_0" / "metrics.csv").read_text().splitlines()[1] == first  # history kept, not redone
    assert torch.load(out / "fold_0" / "last.pt", weights_only=False)["epoch"] == 2  # 0-based: the third


@pytest.mark.slow
def test_two_process_gloo_torchrun_trains_a_fold(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", 5)
    out = tmp_path / "run"
    module = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "training.teacher"]
    proc = _teacher("--data", str(data), "--out", str(out), "--folds", "1", "--oversample", "0.5", *TINY, module=module)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _epochs(out / "fold_1") == [1, 2]  # written once, by rank 0
    assert (out / "fold_1" / "best.pt").is_file() and (out / "fold_1" / "score.json").is_file()
    assert not (out / "teacher.json").exists()  # four folds missing: no selection


def test_amp_on_cpu_is_bf16_only_where_the_cpu_runs_bf16_natively(monkeypatch):
    from training import utils

    rt = utils.Runtime(torch.device("cpu"))
    monkeypatch.setattr(utils, "cpu_has_bf16", lambda: True)
    assert utils.amp_dtype(rt, True) == torch.bfloat16 and utils.amp_dtype(rt, False) is None
    monkeypatch.setattr(utils, "cpu_has_bf16", lambda: False)  # emulated bf16 would be slower: float32
    assert utils.amp_dtype(rt, True) is None


def test_mean_organ_dsc_matches_flare_evaluation_on_organs_without_axial_cut():
    from flare_infer.evaluate import evaluate_case
    from training.teacher import mean_organ_dsc

    rng = np.random.default_rng(0)
    gt = np.zeros((8, 20, 20), np.uint8)
    gt[1:7, 2:10, 2:10] = 1
    gt[2:5, 12:18, 12:18] = 3
    pred = gt.copy()
    pred[1:7, 2:10, 2:5] = 0
    pred[3:6, 12:18, 10:16] = 3
    pred[0, 0:3, 0:3] = 9  # an organ absent from the GT: DSC 0
    pred[rng.random(pred.shape) < 0.02] = 2
    official = evaluate_case(pred, gt, spacing_xyz=(1.0, 1.0, 1.0)).dsc
    assert mean_organ_dsc(pred, gt) == pytest.approx(float(np.mean(list(official.values()))), abs=1e-3)
    assert mean_organ_dsc(gt, gt) == 1.0
