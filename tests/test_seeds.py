"""The Table 4 claim across seeds: the crossed bootstrap, the sentences, table4.json, the step count of (a'),
and the per-seed plumbing of training.reproduce (folders, --seed, resume), without training anything.

    pytest tests/test_seeds.py -x -q          # seconds
"""

import json
from pathlib import Path

import numpy as np
import pytest

from training import reproduce
from training.reproduce import FULL, QUICK, Plan, Steps, epochs_for_steps, model_steps, ours_total_steps, train_seed
from training.seeds_report import (
    COMPARISONS,
    MODELS,
    ModelScores,
    crossed_bootstrap,
    paired_difference,
    section,
    sentence,
    table4_json,
    write_outputs,
)

torch = pytest.importorskip("torch")


# ----------------------------------------------------------------------------- the crossed bootstrap
def _case_scores(seeds: int, cases: int, seed: int = 0) -> np.ndarray:
    """(seeds, cases): a hard-or-easy case effect shared by every seed, plus a little seed-and-case noise."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0.3, 0.8, cases)[None, :] + rng.normal(0, 0.02, (seeds, cases))


def test_identical_models_give_an_interval_containing_zero():
    a = _case_scores(3, 20)
    d = paired_difference("student_ours", "single", a, a.copy(), 2000)
    assert d.lo <= 0 <= d.hi and not d.resolved


def test_a_constant_shift_gives_an_interval_around_the_shift():
    a = _case_scores(3, 20)
    d = paired_difference("student_ours", "single", a, a + 0.1, 2000)
    assert d.mean == pytest.approx(0.1) and d.lo == pytest.approx(0.1) and d.hi == pytest.approx(0.1)
    assert d.resolved


def test_the_difference_is_paired_so_a_shift_stays_resolved_despite_large_case_variation():
    """Cases range 0.3-0.8 but the subject is 0.02 higher on every one: pairing (the same resampled cases for both
    models) resolves it; resampling the two models' cases separately would not."""
    rng = np.random.default_rng(3)
    a = _case_scores(3, 20) + rng.normal(0, 0.001, (3, 20))
    d = paired_difference("student_ours", "single", a, a + 0.02 + rng.normal(0, 0.002, (3, 20)), 2000)
    assert d.resolved and 0.015 < d.lo < d.hi < 0.025


def test_seeds_that_disagree_widen_the_interval_to_include_zero():
    """+0.3 at one seed, 0 at the other two, the same on every case: a bootstrap over cases alone would give
    [0.1, 0.1]; drawing the seeds too includes the seeds that show no gain."""
    a = _case_scores(3, 20)
    shift = np.array([0.3, 0.0, 0.0])[:, None]
    lo, hi = crossed_bootstrap(a + shift - a, 4000)
    assert lo <= 0.0 and hi >= 0.29


def test_the_same_case_indices_serve_every_seed():
    """A case effect shared by the seeds (the same validation cases) must not average out over the seeds: the
    interval with 3 identical seeds equals the interval of one seed."""
    one = _case_scores(1, 15)
    three = np.repeat(one, 3, axis=0)
    assert crossed_bootstrap(three, 3000) == pytest.approx(crossed_bootstrap(one, 3000))


def test_sentence_says_resolved_only_when_the_interval_excludes_zero():
    a = _case_scores(2, 10)
    yes = sentence(paired_difference("student_ours", "single", a, a + 0.05, 1000), "DSC", 2, 10)
    no = sentence(paired_difference("student_ours", "single", a, a.copy(), 1000), "DSC", 2, 10)
    assert "higher" in yes and "resolved: the interval excludes 0" in yes
    assert "not resolved: the interval includes 0" in no


# ----------------------------------------------------------------------------- table4.json and the section
def _scores(n_seeds: int = 3, n_cases: int = 8) -> dict[str, ModelScores]:
    out = {}
    for i, key in enumerate(MODELS):
        dsc = _case_scores(n_seeds, n_cases, seed=i)
        out[key] = ModelScores(dsc=dsc, nsd=dsc - 0.05, steps=[100 + i] * n_seeds)
    return out


def test_table4_json_has_the_schema_docs_promise(tmp_path):
    scores = _scores()
    write_outputs(tmp_path, [0, 1, 2], scores, 500)
    t = json.loads((tmp_path / "table4.json").read_text())
    assert t["seeds"] == [0, 1, 2]
    assert set(t["models"]) == {"single", "single_equal_steps", "teacher", "student_paper", "student_ours"}
    for key, m in t["models"].items():
        assert len(m["mean_dsc"]) == 3 and len(m["mean_nsd"]) == 3 and isinstance(m["steps"], int)
        assert m["mean_dsc"] == pytest.approx(scores[key].dsc.mean(axis=1).tolist(), abs=1e-6)
    assert "seed 0" in t["models"]["teacher"]["note"]
    assert [(c["subject"], c["reference"]) for c in t["comparisons_dsc"]] == list(COMPARISONS)
    assert (tmp_path / "table4_seeds.png").stat().st_size > 1000


def test_table4_json_refuses_scores_of_mismatched_shapes():
    with pytest.raises(ValueError, match="seeds, cases"):
        ModelScores(dsc=np.zeros((3, 4)), nsd=np.zeros((3, 4)), steps=[1, 2])


def test_section_has_a_row_per_model_with_each_seed_and_a_sentence_per_comparison():
    scores = _scores()
    lines = section([0, 1, 2], scores, 500, "results/table4_seeds.png", "results/table4.json")
    rows = [r for r in lines if r.startswith("| (") or r.startswith("| student")]
    assert len(rows) == len(MODELS)
    single = next(r for r in rows if r.startswith("| (a) single"))
    cells = [c.strip() for c in single.split("|")[1:-1]]
    assert [float(c) for c in cells[1:4]] == pytest.approx(scores["single"].dsc.mean(axis=1), abs=1e-4)
    assert float(cells[5]) == pytest.approx(scores["single"].dsc.mean(axis=1).std(ddof=1), abs=1e-4)
    assert sum(line.startswith("- ") and "resolved" in line for line in lines) == len(COMPARISONS)
    assert table4_json([0, 1, 2], scores, 500)["cases"] == 8


# ----------------------------------------------------------------------------- (a')'s step count
def _checkpoint(path: Path, steps: int, epochs: int) -> Path:
    """A stand-in training checkpoint: only what optimizer_steps reads (the LR scheduler's count, the epoch)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"scheduler": {"last_epoch": steps}, "epoch": epochs - 1}, path)
    return path


def _teacher(root: Path, member_steps: tuple[int, int, int] = (33, 30, 27)) -> Path:
    """teacher.json whose best member (listed first) has member_steps[0] steps."""
    folds = (2, 0, 4)
    for fold, steps in zip(folds, member_steps, strict=True):
        _checkpoint(root / "teacher" / f"fold_{fold}" / "best.pt", steps, 3)
    path = root / "teacher" / "teacher.json"
    path.write_text(json.dumps({"members": [{"fold": f, "checkpoint": f"fold_{f}/best.pt"} for f in folds]}))
    return path


def test_ours_total_steps_is_the_best_members_steps_plus_the_students(tmp_path):
    teacher = _teacher(tmp_path, (33, 30, 27))
    ours = _checkpoint(tmp_path / "students" / "ours" / "best.pt", 48, 2)
    assert ours_total_steps(teacher, ours) == 33 + 48


def test_equal_steps_epochs_reach_the_target_from_the_single_runs_steps_per_epoch(tmp_path):
    single = _checkpoint(tmp_path / "single" / "fold_0" / "last.pt", 39, 3)  # 13 steps per epoch
    assert epochs_for_steps(81, single) == 7  # 81 / 13 = 6.2 -> 7 epochs, 91 steps
    assert epochs_for_steps(78, single) == 6  # exactly 6 epochs


def test_model_steps_reads_every_claim_models_checkpoint(tmp_path):
    _teacher(tmp_path, (33, 30, 27))
    for rel, steps in (("single/fold_0/last.pt", 39), ("single_equal_steps/fold_0/last.pt", 91),
                       ("students/paper/best.pt", 40), ("students/ours/best.pt", 48)):  # fmt: skip
        _checkpoint(tmp_path / "seed_1" / rel, steps, 3)
    plan = Plan(out=tmp_path, data=tmp_path / "data", sizes=QUICK, device="cpu", seeds=(0, 1), generated=True)
    assert model_steps(plan, 1) == {"single": 39, "single_equal_steps": 91, "student_paper": 40,
                                    "student_ours": 33 + 48, "teacher": 33 + 30 + 27}  # fmt: skip


# ----------------------------------------------------------------------------- the seeds' plumbing
class RecordingSteps(Steps):
    """Steps that record what would run instead of running it; a call's output appears as if it had run."""

    def __init__(self, out: Path) -> None:
        super().__init__(out)
        self.ran: list[tuple[str, list[str] | str, Path]] = []

    def module(self, name, argv, output):
        self.ran.append((name, argv, output))

    def call(self, name, description, fn, output):
        self.ran.append((name, description, output))


def _seed_checkpoints(base: Path) -> None:
    _checkpoint(base / "single" / "fold_0" / "last.pt", 39, 3)
    _checkpoint(base / "students" / "ours" / "best.pt", 48, 2)


def test_each_seed_trains_into_its_own_folder_with_its_seed_and_the_one_teacher(tmp_path):
    teacher = _teacher(tmp_path)
    plan = Plan(out=tmp_path, data=tmp_path / "data", sizes=FULL, device="cpu", seeds=(0, 1, 2), generated=True)
    outputs = {}
    for seed in plan.seeds:
        base = tmp_path if seed == 0 else tmp_path / f"seed_{seed}"
        _seed_checkpoints(base)
        steps = RecordingSteps(base)
        train_seed(steps, plan, seed)
        assert [name for name, _, _ in steps.ran] == ["single", "student_paper", "student_ours", "single_equal_steps"]
        for _, what, output in steps.ran:
            assert output.is_relative_to(base) and (seed == 0 or output.is_relative_to(tmp_path / f"seed_{seed}"))
            outputs.setdefault(seed, []).append(output)
            if isinstance(what, list):  # a student: its --seed and the seed-0 teacher
                assert what[what.index("--seed") + 1] == str(seed)
                assert what[what.index("--teacher") + 1] == str(teacher)
        assert "epochs=7" in steps.ran[-1][1] and f"seed={seed}" in steps.ran[-1][1]  # (33 + 48) / 13 per epoch
    assert not set(outputs[0]) & set(outputs[1]) and not set(outputs[1]) & set(outputs[2])


def test_a_finished_seed_is_skipped_on_resume(tmp_path, monkeypatch, capsys):
    _teacher(tmp_path)
    plan = Plan(out=tmp_path, data=tmp_path / "data", sizes=QUICK, device="cpu", seeds=(0, 1), generated=True)
    base = tmp_path / "seed_1"
    _seed_checkpoints(base)
    for rel in ("students/paper/best.pt", "single_equal_steps/fold_0/last.pt"):
        _checkpoint(base / rel, 40, 2)
    done = {name: {"command": "earlier", "seconds": 1.0} for name in reproduce.CLAIM_TRAINING}
    (base / "steps.json").write_text(json.dumps(done))

    def refuse(*args, **kwargs):
        raise AssertionError("a finished step ran again")

    monkeypatch.setattr(reproduce.subprocess, "run", refuse)
    monkeypatch.setattr(reproduce, "train_single_unet", refuse)
    train_seed(Steps(base), plan, 1)
    assert capsys.readouterr().out.count("done before") == 4
    assert json.loads((base / "steps.json").read_text()) == done


def test_plan_refuses_repeated_or_negative_seeds(tmp_path):
    for seeds in ((0, 0), (-1,), ()):
        with pytest.raises(ValueError, match="distinct non-negative"):
            Plan(out=tmp_path, data=tmp_path, sizes=QUICK, device="cpu", seeds=seeds, generated=True)


def test_paper_sizes_are_the_papers_recipe():
    p = reproduce.PAPER
    assert (p.width, p.spacing, p.patch, p.batch, p.lr, p.teacher_epochs) == (32, "1.5,1.5,2.5", 256, 40, 2e-4, 3000)
    assert (p.student_batch, p.student_lr, p.student_epochs) == (20, 1e-5, 200)
    argv = reproduce.student_argv(Path("d"), Path("t.json"), Path("o"), [], p, "cuda", seed=2)
    assert argv[argv.index("--batch-size") + 1] == "20" and argv[argv.index("--lr") + 1] == "1e-05"
    assert argv[argv.index("--seed") + 1] == "2"
