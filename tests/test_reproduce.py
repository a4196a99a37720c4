"""training.reproduce: the --quick run end to end, a --quick --data DIR --seeds 0,1 run on phantoms written to
disk first (slow, each ~3-5 min on 2 shared cores), and the report's sentences. The seeds' statistics and
plumbing without training: tests/test_seeds.py.

pytest tests/test_reproduce.py -x -q
pytest tests/test_reproduce.py -x -q -m "not slow"     # the sentence tests only (seconds)
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from flare_infer.evaluate import evaluate_case, evaluate_folder
from flare_infer.labels import ORGANS
from training.reproduce import bootstrap_ci, compare, paper_claim


# ----------------------------------------------------------------------------- the sentences come from the numbers
def test_compare_says_resolved_when_every_case_improves():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.3, 0.7, 20)
    text = compare("B", "A", a, a + 0.05 + rng.uniform(0, 0.01, 20), "DSC", 2000)
    assert "higher" in text and "excludes 0" in text


def test_compare_says_unresolved_when_differences_straddle_zero():
    rng = np.random.default_rng(1)
    a = rng.uniform(0.3, 0.7, 20)
    text = compare("B", "A", a, a + rng.normal(0, 0.05, 20), "DSC", 2000)
    assert "includes 0" in text


def test_compare_says_lower_when_worse():
    a = np.linspace(0.4, 0.6, 12)
    assert "lower" in compare("B", "A", a, a - 0.1, "DSC", 500)


def test_paper_claim_reports_a_reversed_ordering():
    d = {"single": np.array([0.6, 0.6]), "teacher": np.array([0.5, 0.5]), "student": np.array([0.4, 0.4])}
    assert "does not reproduce" in paper_claim(d)
    d = {"single": np.array([0.4, 0.4]), "teacher": np.array([0.5, 0.5]), "student": np.array([0.6, 0.6])}
    assert "does not reproduce" not in paper_claim(d)


def test_bootstrap_interval_contains_the_mean_and_narrows_with_more_cases():
    rng = np.random.default_rng(2)
    small, large = rng.normal(0.5, 0.1, 10), rng.normal(0.5, 0.1, 400)
    lo_s, hi_s = bootstrap_ci(small, 2000)
    lo_l, hi_l = bootstrap_ci(large, 2000)
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert hi_l - lo_l < hi_s - lo_s


# ----------------------------------------------------------------------------- --quick end to end
_RUN_A_STEP = """
import sys
from pathlib import Path
from training.reproduce import Steps
Steps(Path(sys.argv[1])).module("sleeper", ["timeit", "-n", "1", "-r", "1", "import time; time.sleep(120)"],
                                Path(sys.argv[1]) / "never")
"""


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] not in "ZX"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the death signal is Linux's prctl")
def test_a_killed_run_takes_its_running_step_with_it(tmp_path):
    run = subprocess.Popen([sys.executable, "-c", _RUN_A_STEP, str(tmp_path)])
    try:
        deadline = time.monotonic() + 30
        while not (step := _children(run.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert step, "the run started no step"
        time.sleep(1.0)  # the wrapper has exec'd the step by now
        assert _running(step[0])
        run.kill()  # SIGKILL: the run cannot clean up
        run.wait()
        deadline = time.monotonic() + 10
        while _running(step[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(step[0]), "the step outlived its killed run"
    finally:
        run.kill()
        for pid in _children(run.pid) + (step if "step" in locals() else []):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    results = out / "RESULTS.md"
    cmd = [sys.executable, "-m", "training.reproduce", "--out", str(out / "run"), "--quick", "--results", str(results)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "run", results, cmd


def _section(text: str, title: str) -> list[str]:
    body = text.split(title, 1)[1].split("\n## ", 1)[0]
    return [line for line in body.splitlines() if line.startswith("| ") and not line.startswith("| model")]


def _numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?\d+\.\d+", cell)]


@pytest.mark.slow
def test_quick_run_writes_table4_with_scores_in_unit_range(quick_run):
    _, results, _ = quick_run
    rows = _section(results.read_text(), "## Table 4 analogue")
    assert [r.split("|")[1].strip()[:3] for r in rows] == ["(a)", "(b)", "(c)"]
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        dsc, nsd, cases = _numbers(cells[1]), _numbers(cells[2]), int(cells[3])
        assert len(dsc) == 4 and len(nsd) == 4  # mean, std, interval low, high
        assert all(0.0 <= v <= 1.0 for v in dsc + nsd), row
        assert dsc[2] <= dsc[0] <= dsc[3], f"bootstrap interval must contain the mean: {row}"
        assert cases == 3  # QUICK.validation


def _mean_dsc(cases) -> float:
    return float(np.mean([[case.dsc[o.short] for o in ORGANS] for case in cases]))


@pytest.mark.slow
def test_quick_run_models_beat_all_background_and_the_table_holds_the_measured_numbers(quick_run):
    """Each Table 4 model segments the validation phantoms better than a mask of background only (FLARE22's
    scores: 0 for every organ in the truth, 1 for one absent from both), and row (a) is what scoring the single
    U-Net's masks gives."""
    run_dir, results, _ = quick_run
    truth_dir = run_dir / "data" / "validation" / "labels"
    truths = [sitk.ReadImage(str(p)) for p in sorted(truth_dir.glob("*.nii.gz"))]
    background = _mean_dsc([evaluate_case(np.zeros_like(sitk.GetArrayFromImage(t)), t) for t in truths])
    rows = {r.split("|")[1].strip()[:3]: r for r in _section(results.read_text(), "## Table 4 analogue")}
    table = {key: _numbers(row.split("|")[2])[0] for key, row in rows.items()}  # mean DSC per model
    # --quick trains for seconds (its teacher members score 0.005-0.09 on held-out cases), so the bar is the
    # trivial mask itself: a model that never finds an organ voxel in its place scores exactly that.
    for key, mean_dsc in table.items():
        assert mean_dsc > background, f"{rows[key]}\nall-background scores {background:.4f}"
    measured = _mean_dsc(evaluate_folder(run_dir / "predictions" / "single", truth_dir, workers=1).cases)
    assert table["(a)"] == pytest.approx(measured, abs=0.0006), f"{rows['(a)']}\nmeasured {measured:.4f}"


@pytest.mark.slow
def test_quick_run_table5_lists_every_organ_with_scores_in_unit_range(quick_run):
    _, results, _ = quick_run
    rows = [r for r in _section(results.read_text(), "## Table 5 analogue") if not r.startswith("| organ ")]
    names = [r.split("|")[1].strip() for r in rows]
    assert names == [o.name for o in ORGANS]
    for row in rows:
        values = _numbers(row)
        assert len(values) == 4 and all(0.0 <= v <= 1.0 for v in values[::2]), row


@pytest.mark.slow
def test_quick_run_reports_every_ablation_timing_and_command(quick_run):
    run_dir, results, _ = quick_run
    text = results.read_text()
    ablations = ("unlabelled cases used", "confidence filtering", "input slices", "largest-component", "slice sampling")
    for what in ablations:
        assert what in text
    timing = _section(text, "### Inference time per case")
    assert {r.split("|")[1].strip() for r in timing} >= {"single", "teacher", "student_onnx"}
    steps = json.loads((run_dir / "steps.json").read_text())
    assert steps["teacher"]["command"].startswith("python -m training.teacher ")
    assert steps["predict_student"]["command"].startswith("python -m flare_infer predict ")
    # as steps.json records it, the run folder written RUN_DIR (the report names no path of the machine)
    assert f"`{steps['student_paper']['command']}`".replace(str(run_dir), "RUN_DIR") in text
    assert str(run_dir) not in text


@pytest.mark.slow
def test_quick_run_reports_our_recipe_the_members_and_pseudo_label_quality(quick_run):
    run_dir, results, _ = quick_run
    text = results.read_text()
    ours = _section(text, "## Our recipe")
    assert [r.split("|")[1].strip() for r in ours] == ["(a) single U-Net", "(c) student, paper's setting",
                                                       "student, our recipe"]  # fmt: skip
    assert all(0.0 <= v <= 1.0 for r in ours for v in _numbers(r))
    members = [r for r in _section(text, "## Where the student's labels come from") if "member, fold" in r]
    assert len(members) == 3 and all(r.split("|")[2].strip() == "4" for r in members)  # 4/5 of 5 labelled cases
    quality = json.loads((run_dir / "pseudo_quality.json").read_text())
    assert len(quality["cases"]) == 4  # QUICK.unlabelled, every case checked against its regenerated truth
    for case in quality["cases"]:
        assert 0.0 <= case["mean_dsc"] <= 1.0 and 0.0 <= case["kept_region"] <= 1.0
        assert set(case["dsc"]) == {o.short for o in ORGANS}
    assert "Pseudo-labels against the generator's hidden truth on the 4 unlabelled cases" in text


@pytest.mark.slow
def test_quick_run_resumes_without_redoing_finished_steps(quick_run):
    run_dir, _, cmd = quick_run
    before = json.loads((run_dir / "steps.json").read_text())
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "teacher: done before" in proc.stdout and "student_paper: done before" in proc.stdout
    assert json.loads((run_dir / "steps.json").read_text()) == before


# ----------------------------------------------------------------------------- --data DIR and --seeds, end to end
@pytest.fixture(scope="module")
def data_run(tmp_path_factory):
    """Phantoms written to disk first, then `--data` pointing at them (quick sizes, seeds 0 and 1): proves the
    path, not the numbers."""
    root = tmp_path_factory.mktemp("reproduce_data")
    data = root / "flare22"
    gen = [sys.executable, "-m", "training.phantoms", str(data), "--labelled", "5", "--unlabelled", "4",
           "--validation", "3", "--seed", "0", "--size", "small"]  # fmt: skip
    assert subprocess.run(gen, capture_output=True, text=True).returncode == 0
    results = root / "report" / "RESULTS.md"
    cmd = [sys.executable, "-m", "training.reproduce", "--out", str(root / "run"), "--quick", "--seeds", "0,1",
           "--data", str(data), "--results", str(results)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "run", data, results, cmd


@pytest.mark.slow
def test_data_run_uses_the_given_folder_and_skips_the_phantoms_and_the_hidden_truth(data_run):
    run_dir, data, results, _ = data_run
    steps = json.loads((run_dir / "steps.json").read_text())
    assert "data" not in steps and "pseudo_quality" not in steps
    assert not (run_dir / "data").exists() and not (run_dir / "pseudo_quality.json").exists()
    assert f"--data {data}/labelled" in steps["teacher"]["command"]
    assert str(data / "validation" / "labels") in steps["evaluate_single"]["command"]
    text = results.read_text()
    assert f"Data: `--data {data}`: 5 labelled, 4 unlabelled and 3 validation cases" in text
    assert "Pseudo-label quality: not measured" in text


@pytest.mark.slow
def test_data_run_trains_each_seed_in_its_own_folder_with_its_seed(data_run):
    run_dir, _, _, _ = data_run
    seed0, seed1 = (
        json.loads((run_dir / "steps.json").read_text()),
        json.loads((run_dir / "seed_1" / "steps.json").read_text()),
    )
    for name in ("student_paper", "student_ours"):
        assert "--seed 0 " in seed0[name]["command"] and "--seed 1 " in seed1[name]["command"]
        assert f"{run_dir}/seed_1/students/" in seed1[name]["command"]
        assert f"--teacher {run_dir}/teacher/teacher.json" in seed1[name]["command"]  # the one teacher
    assert "seed=1" in seed1["single"]["command"] and "seed=1" in seed1["single_equal_steps"]["command"]
    for rel in ("single/fold_0/last.pt", "single_equal_steps/fold_0/last.pt", "students/paper/best.pt",
                "students/ours/best.pt", "eval/single_equal_steps.csv"):  # fmt: skip
        assert (run_dir / rel).is_file() and (run_dir / "seed_1" / rel).is_file(), rel
    assert not (run_dir / "seed_1" / "teacher").exists()


@pytest.mark.slow
def test_data_run_writes_table4_json_with_equal_steps_from_the_checkpoints(data_run):
    from training.reproduce import optimizer_steps, ours_total_steps

    run_dir, _, results, _ = data_run
    table = json.loads((results.parent / "results" / "table4.json").read_text())
    assert table["seeds"] == [0, 1] and table["cases"] == 3
    assert set(table["models"]) == {"single", "single_equal_steps", "teacher", "student_paper", "student_ours"}
    for m in table["models"].values():
        assert len(m["mean_dsc"]) == 2 and all(0.0 <= v <= 1.0 for v in m["mean_dsc"] + m["mean_nsd"])
    assert table["models"]["teacher"]["mean_dsc"][0] == table["models"]["teacher"]["mean_dsc"][1]
    per_epoch = optimizer_steps(run_dir / "single" / "fold_0" / "last.pt")[0] // 3  # QUICK.teacher_epochs
    for seed, base in ((0, run_dir), (1, run_dir / "seed_1")):
        target = ours_total_steps(run_dir / "teacher" / "teacher.json", base / "students" / "ours" / "best.pt")
        equal = table["models"]["single_equal_steps"]["steps_per_seed"][seed]
        assert table["models"]["student_ours"]["steps_per_seed"][seed] == target
        assert target <= equal < target + per_epoch  # whole epochs, rounded up
    assert (results.parent / "results" / "table4_seeds.png").stat().st_size > 1000
    text = results.read_text()
    assert "## The claim across training seeds (0, 1)" in text and "results/table4_seeds.png" in text


@pytest.mark.slow
def test_data_run_resumes_without_redoing_any_seed(data_run):
    run_dir, _, _, cmd = data_run
    before = json.loads((run_dir / "seed_1" / "steps.json").read_text())
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "student_ours: done before" in proc.stdout and "single_equal_steps: done before" in proc.stdout
    assert json.loads((run_dir / "seed_1" / "steps.json").read_text()) == before
