"""The Table 4 claim across training seeds: statistics, the report section, table4.json and the figure.

    python -m training.reproduce --out runs/reproduce --seeds 0,1,2     # calls this module; no CLI of its own

`training.reproduce` trains the claim's models once per seed and scores them on the same validation
cases; this module gets their per-case scores as arrays of shape (seeds, cases) and writes:
  - the section of the report (per-seed means, the across-seed mean and sd, paired differences with a
    95% interval over seeds and cases, one generated sentence per comparison);
  - `table4.json` (machine-readable) and `table4_seeds.png` (matplotlib, Agg) beside each other.

The interval is a crossed (two-way) bootstrap, because every seed scores the *same* validation cases:
each resample draws the seeds with replacement and, independently, the cases with replacement (one set
of case indices for every drawn seed and for both models of a comparison), and takes the mean over the
drawn seeds and cases. A bootstrap over cases alone would treat 3 seeds as if they were the population
of training runs; one that drew cases separately per seed would count the same hard case as 3
independent draws and give too narrow an interval. numpy only (matplotlib for the figure), no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# table4.json's model keys, in report order, with the label the report and the figure use
MODELS = {
    "single": "(a) single U-Net",
    "single_equal_steps": "(a') single U-Net, as many steps as ours",
    "teacher": "(b) teacher ensemble (seed 0 only)",
    "student_paper": "(c) student, paper's setting",
    "student_ours": "student, our recipe",
}
# (subject, reference): the subject minus the reference, per case
COMPARISONS = (
    ("student_ours", "single"),
    ("student_ours", "single_equal_steps"),
    ("student_paper", "single"),
    ("student_ours", "student_paper"),
    ("single_equal_steps", "single"),
    ("student_paper", "teacher"),
)
TEACHER_SEED = 0  # the one teacher every seed's students learn from


@dataclass(frozen=True)
class ModelScores:
    """One model's per-case mean organ scores, (seeds, cases), and its optimizer steps per seed."""

    dsc: np.ndarray  # (S, C)
    nsd: np.ndarray  # (S, C)
    steps: list[int]  # per seed

    def __post_init__(self) -> None:
        if self.dsc.ndim != 2 or self.dsc.shape != self.nsd.shape or len(self.steps) != self.dsc.shape[0]:
            raise ValueError(f"expected dsc and nsd of shape (seeds, cases) and one step count per seed; found "
                             f"{self.dsc.shape}, {self.nsd.shape}, {len(self.steps)} step counts")  # fmt: skip


# ----------------------------------------------------------------------------- statistics
def crossed_bootstrap(values_sc: np.ndarray, n: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of `values_sc` (seeds, cases): seeds and cases resampled independently.

    Each resample r draws S seed indices and C case indices with replacement; its statistic is the mean of
    values[s, c] over the drawn seeds s and cases c (the same case indices for every seed).
    """
    n_seeds, n_cases = values_sc.shape
    rng = np.random.default_rng(seed)
    case_idx = rng.integers(0, n_cases, size=(n, n_cases))  # (R, C)
    seed_idx = rng.integers(0, n_seeds, size=(n, n_seeds))  # (R, S)
    per_seed = values_sc[:, case_idx].mean(axis=2)  # (S, R): each seed's mean over resample r's cases
    stats = np.take_along_axis(per_seed.T, seed_idx, axis=1).mean(axis=1)  # (R,)
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


@dataclass(frozen=True)
class Difference:
    subject: str
    reference: str
    mean: float  # mean over seeds and cases of subject - reference
    lo: float
    hi: float

    @property
    def resolved(self) -> bool:
        return self.lo > 0 or self.hi < 0


def paired_difference(subject: str, reference: str, a_sc: np.ndarray, b_sc: np.ndarray, n: int) -> Difference:
    """b - a (subject b, reference a) per seed and case, with the crossed bootstrap interval of its mean.

    Paired: the difference is taken case by case within a seed, so both models get the same resampled cases.
    """
    diff = b_sc - a_sc
    lo, hi = crossed_bootstrap(diff, n)
    return Difference(subject, reference, float(diff.mean()), lo, hi)


def sentence(d: Difference, metric: str, n_seeds: int, n_cases: int) -> str:
    """One plain sentence from the numbers: resolved (the interval excludes 0) or not."""
    direction = "higher" if d.mean > 0 else "lower" if d.mean < 0 else "no different"
    verdict = ("resolved: the interval excludes 0" if d.resolved
               else "not resolved: the interval includes 0")  # fmt: skip
    subject = MODELS[d.subject][0].upper() + MODELS[d.subject][1:]
    return (f"{subject} is {abs(d.mean):.4f} {direction} in mean {metric} than {MODELS[d.reference]} "
            f"over {n_seeds} seed(s) x {n_cases} cases (95% crossed-bootstrap interval of the difference "
            f"[{d.lo:+.4f}, {d.hi:+.4f}]); {verdict}.")  # fmt: skip


def _sd(values: np.ndarray) -> float | None:
    return float(values.std(ddof=1)) if len(values) > 1 else None


# ----------------------------------------------------------------------------- outputs
def table4_json(seeds: list[int], scores: dict[str, ModelScores], n_boot: int) -> dict:
    """table4.json's content: per model the per-seed mean DSC and NSD and its optimizer steps; the comparisons."""
    n_cases = next(iter(scores.values())).dsc.shape[1]
    models = {}
    for key, m in scores.items():
        models[key] = {"mean_dsc": [round(float(v), 6) for v in m.dsc.mean(axis=1)],
                       "mean_nsd": [round(float(v), 6) for v in m.nsd.mean(axis=1)],
                       "steps": m.steps[0], "steps_per_seed": m.steps}  # fmt: skip
    models["teacher"]["note"] = (f"one teacher, trained once at seed {TEACHER_SEED}, for every seed: its value is "
                                 "repeated once per seed")  # fmt: skip
    comparisons = [paired_difference(s, r, scores[r].dsc, scores[s].dsc, n_boot) for s, r in COMPARISONS]
    return {
        "seeds": seeds, "cases": n_cases, "teacher_seed": TEACHER_SEED, "models": models,
        "comparisons_dsc": [{"subject": d.subject, "reference": d.reference, "mean": round(d.mean, 6),
                             "ci95": [round(d.lo, 6), round(d.hi, 6)], "resolved": d.resolved} for d in comparisons],
        "interval": f"crossed bootstrap, {n_boot} resamples (seeds and cases drawn independently, with replacement; "
                    "the same case indices for every seed and both models), percentile 2.5-97.5",
    }  # fmt: skip


def plot(path: Path, seeds: list[int], scores: dict[str, ModelScores], n_boot: int) -> None:
    """Mean DSC per model: the across-seed mean (bar), each seed's value (points), the crossed 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(scores)
    fig, ax = plt.subplots(figsize=(8, 4))
    for x, key in enumerate(keys):
        per_seed = scores[key].dsc.mean(axis=1)  # (S,)
        lo, hi = crossed_bootstrap(scores[key].dsc, n_boot)
        ax.bar(x, per_seed.mean(), color="#c8d6e5", width=0.6)
        ax.errorbar(x, per_seed.mean(), yerr=[[per_seed.mean() - lo], [hi - per_seed.mean()]], color="black",
                    capsize=6)  # fmt: skip
        offsets = np.linspace(-0.15, 0.15, len(per_seed)) if len(per_seed) > 1 else np.zeros(1)
        ax.scatter(x + offsets, per_seed, color="#d35400", zorder=3, s=18)
    ax.set_xticks(range(len(keys)), [MODELS[k].replace(", ", ",\n", 1) for k in keys], fontsize=7)
    ax.set_ylabel("mean DSC (validation cases)")
    ax.set_title(f"Seeds {', '.join(map(str, seeds))}: mean (bar), each seed (points), crossed 95% interval",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(seeds: list[int], scores: dict[str, ModelScores], n_boot: int, figure: str, table_json: str) -> list[str]:
    """The report's Markdown section; `figure` and `table_json` are the paths as the report links them."""
    n_seeds, n_cases = len(seeds), next(iter(scores.values())).dsc.shape[1]
    head = " | ".join(f"seed {s}" for s in seeds)
    lines = [
        f"## The claim across training seeds ({', '.join(map(str, seeds))})",
        "",
        f"The data and the teacher's folds are the same for every seed, and so is the teacher: one teacher, trained "
        f"once at seed {TEACHER_SEED} (the expensive step), teaches every seed's students. The seed changes the "
        "networks' initialisation, the slice sampling and augmentation, and which unlabelled cases the paper's "
        "0.375 share draws. (a') is the single U-Net trained for as many optimizer steps as our recipe's student "
        "had in total, its starting teacher member's steps included (rounded up to whole epochs; steps below). "
        f"Numbers: `{table_json}`; figure: `{figure}`.",
        "",
        f"| model | {head} | mean DSC over seeds | sd over seeds | 95% interval | mean NSD over seeds | steps |",
        "|---|" + "---|" * n_seeds + "---|---|---|---|---|",
    ]
    for key, m in scores.items():
        per_seed = m.dsc.mean(axis=1)
        lo, hi = crossed_bootstrap(m.dsc, n_boot)
        sd = None if key == "teacher" else _sd(per_seed)  # one teacher: no spread over seeds to show
        lines.append(f"| {MODELS[key]} | " + " | ".join(f"{v:.4f}" for v in per_seed)
                     + f" | {per_seed.mean():.4f} | {'-' if sd is None else f'{sd:.4f}'} | [{lo:.4f}, {hi:.4f}] | "
                     f"{m.nsd.mean():.4f} | {m.steps[0]} |")  # fmt: skip
    lines += [
        "",
        f"Per seed: the mean over the {n_cases} validation cases of each case's mean organ DSC; sd: over the seeds' "
        f"means (ddof 1). Intervals: a crossed bootstrap ({n_boot} resamples, seed 0): each resample draws the "
        "seeds with replacement and, independently, the cases with replacement, the same case indices for every "
        "seed and for both models of a difference; the statistic is the mean over the drawn seeds and cases; "
        "the interval is its 2.5th to 97.5th percentile. Differences are paired (case by case within a seed).",
        *(["With one seed the interval is over the cases only (every seed draw is that seed)."] if n_seeds == 1
          else []),
        "",
        *["- " + sentence(paired_difference(s, r, scores[r].dsc, scores[s].dsc, n_boot), "DSC", n_seeds, n_cases)
          for s, r in COMPARISONS],
        "",
        f"![Mean DSC per model and seed]({figure})",
        "",
    ]  # fmt: skip
    return lines


def write_outputs(results_dir: Path, seeds: list[int], scores: dict[str, ModelScores], n_boot: int,
                  extra: dict | None = None) -> None:  # fmt: skip
    """results_dir/table4.json (with `extra`'s keys, e.g. the run's seconds) and results_dir/table4_seeds.png."""
    results_dir.mkdir(parents=True, exist_ok=True)
    content = {**table4_json(seeds, scores, n_boot), **(extra or {})}
    (results_dir / "table4.json").write_text(json.dumps(content, indent=1) + "\n")
    plot(results_dir / "table4_seeds.png", seeds, scores, n_boot)
