"""FLARE22 evaluation: per-case, per-organ DSC and NSD as the organisers computed them.

    python -m flare_infer evaluate PRED_DIR GT_DIR [--csv OUT.csv] [--markdown OUT.md] [--flare-2024]
        [--workers N] [--allow-missing] [--debug]          (or python -m flare_infer.evaluate ...)

For every ground-truth case `NAME.nii.gz` (or `NAME.nii`, any case of the extension) in GT_DIR, the
prediction `PRED_DIR/NAME.nii.gz` or `PRED_DIR/NAME.nii` (what `predict` writes for either input):
- masks in the organisers' axis order (x, y, z) as nibabel loads them, spacing from the GT header;
- both empty: DSC = NSD = 1; GT empty, prediction not: 0, 0; GT present, prediction empty: 0, 0;
- aorta, IVC and esophagus: both masks cut to the GT's axial range [z_min, z_max) on the third
  axis first. The top GT slice is excluded: the organisers' quirk, reproduced on purpose;
- NSD with DeepMind's surface-distance algorithm at the FLARE22 tolerances (`flare_infer.metrics`);
- every score rounded to 4 decimals per case (numpy rounding of the float64, as `round()` on the
  organisers' numpy floats did).
CSV columns as the organisers' script writes them: Name, the 13 `*_DSC`, the 13 `*_NSD`; every
number written as a float (`1.0`, `0.0`, `0.9523`), NaN as an empty cell.
Folders: a prediction folder that is missing, holds no mask or no mask named like a ground-truth case is
an error (exit 2) naming it, never a table of zeros. Ground-truth cases without a prediction are listed in
one line and counted, not scored, and the exit status is 1; `--allow-missing` scores them as empty masks
(0 for every organ of the GT), as the FLARE22 organisers did, and exits 0.
Exit status: 0 every case scored, 1 a case failed or a prediction is missing, 2 a usage error.
Library: `evaluate_case` (in-memory images or arrays, for training) and `evaluate_folder`.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from flare_infer.cli import HelpFormatter, UsageError, add_debug, at_least, one_line_errors
from flare_infer.labels import AXIAL_RANGE_CUT_VALUES, ORGANS, Organ
from flare_infer.metrics import dice, fast_surface_dice, find_boxes, import_scipy, organiser_spacing

DSC_COLUMNS = tuple(f"{o.short}_DSC" for o in ORGANS)
NSD_COLUMNS = tuple(f"{o.short}_NSD" for o in ORGANS)
CSV_COLUMNS = ("Name", *DSC_COLUMNS, *NSD_COLUMNS)
FLARE24_MIN_DSC_FOR_NSD = 0.2  # FLARE24 scripts: NSD = 0 when DSC < 0.2
MASK_SUFFIXES = (".nii.gz", ".nii")  # matched whatever their case (`.NII.GZ`), as flare_infer.io does


DESCRIPTION = """Score the masks of PRED_DIR against the ground truth of GT_DIR: FLARE22's DSC and NSD per case
and organ, as the organisers' script computes them; a per-organ table on stdout.

A prediction folder that is missing, empty or holds no mask named like a ground-truth case is an error
(exit 2). Cases without a prediction are listed and not scored (exit 1) unless --allow-missing."""


class CaseError(ValueError):
    """A case that cannot be scored (shape mismatch, unreadable file): says which and why."""


class FolderError(UsageError):
    """A prediction or ground-truth folder that cannot be scored at all: names it and says what to do."""


@dataclass(frozen=True)
class CaseScores:
    """Rounded DSC and NSD per organ short name (`Liver`, `RK`, ...) for one case."""

    name: str
    dsc: dict[str, float]
    nsd: dict[str, float]

    def row(self) -> dict[str, object]:
        """The CSV row: Name, *_DSC, *_NSD in the organisers' column order."""
        return {
            "Name": self.name,
            **{f"{o.short}_DSC": self.dsc[o.short] for o in ORGANS},
            **{f"{o.short}_NSD": self.nsd[o.short] for o in ORGANS},
        }


@dataclass(frozen=True)
class FolderResult:
    cases: list[CaseScores]
    errors: dict[str, str] = field(default_factory=dict)  # case name -> message
    missing: list[str] = field(default_factory=list)  # GT cases without a prediction
    missing_scored: bool = False  # True: the missing cases are in `cases`, scored as empty masks (--allow-missing)
    notes: dict[str, str] = field(default_factory=dict)  # case name -> a warning about a scored case


# ------------------------------------------------------------------------------- per organ
def _round4(value: float) -> float:
    # The organisers called round() on numpy float64 values, which rounds the numpy way.
    return float(np.round(np.float64(value), 4))


def _organ_pair(gt_xyz: np.ndarray, pred_xyz: np.ndarray, value: int, box_gt, box_pred):
    """Both organ masks cropped to their union box (after the axial cut): all their voxels, smaller arrays."""
    boxes = [b for b in (box_gt, box_pred) if b is not None]
    union = [slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3)]
    if value in AXIAL_RANGE_CUT_VALUES:
        # Organisers: gt[:, :, z_lower:z_upper] with z_upper = max labelled index, so the top GT
        # slice is excluded. Reproduced on purpose so our numbers match theirs line by line.
        z_lower, z_upper = box_gt[2].start, box_gt[2].stop - 1
        start = max(union[2].start, z_lower)
        union[2] = slice(start, max(start, min(union[2].stop, z_upper)))
    crop = tuple(union)
    return gt_xyz[crop] == value, pred_xyz[crop] == value


def organ_scores(mask_gt: np.ndarray, mask_pred: np.ndarray, spacing_xyz, organ: Organ, flare_2024: bool):
    """Unrounded (DSC, NSD) of one organ pair that is present in the GT or the prediction (after any cut)."""
    dsc = dice(mask_gt, mask_pred)
    if flare_2024 and dsc < FLARE24_MIN_DSC_FOR_NSD:
        return dsc, 0.0
    return dsc, fast_surface_dice(mask_gt, mask_pred, spacing_xyz, organ.nsd_tolerance_mm)


def _organ_job(args):
    return organ_scores(*args)


def evaluate_arrays(
    pred_xyz: np.ndarray,
    gt_xyz: np.ndarray,
    spacing_xyz,
    *,
    name: str = "case",
    flare_2024: bool = False,
    workers: int = 1,
) -> CaseScores:
    """Score one case given label arrays in nibabel order (x, y, z) and the GT spacing (x, y, z) in mm.

    workers > 1 scores the organs in that many threads (largest crops first).
    """
    if pred_xyz.shape != gt_xyz.shape:
        raise CaseError(
            f"{name}: prediction shape {pred_xyz.shape} differs from ground truth shape {gt_xyz.shape} "
            "(x, y, z); the prediction must be on the ground truth's grid: restore it onto the input image"
        )
    spacing = organiser_spacing(spacing_xyz)
    # The organisers cast with np.uint8(...): same here, whatever the stored pixel type.
    gt_xyz = np.asarray(gt_xyz).astype(np.uint8, copy=False)
    pred_xyz = np.asarray(pred_xyz).astype(np.uint8, copy=False)
    # Threads, not processes: find_objects and numpy's array passes release the GIL,
    # and threads share the volumes without copying them.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        boxes_gt, boxes_pred = pool.map(_label_boxes, (gt_xyz, pred_xyz))
        results: dict[int, tuple[float, float]] = {}
        jobs = []
        for organ in ORGANS:
            box_gt, box_pred = boxes_gt.get(organ.value), boxes_pred.get(organ.value)
            if box_gt is None:
                results[organ.value] = (1, 1) if box_pred is None else (0, 0)
                continue
            mask_gt, mask_pred = _organ_pair(gt_xyz, pred_xyz, organ.value, box_gt, box_pred)
            jobs.append((mask_gt, mask_pred, spacing, organ, flare_2024))
        jobs.sort(key=lambda job: -job[0].size)  # largest first: better balance across workers
        scores = list(pool.map(_organ_job, jobs))
    for job, score in zip(jobs, scores, strict=True):
        results[job[3].value] = score
    return CaseScores(
        name=name,
        dsc={o.short: _round4(results[o.value][0]) for o in ORGANS},
        nsd={o.short: _round4(results[o.value][1]) for o in ORGANS},
    )


def _label_boxes(labels_xyz: np.ndarray) -> dict[int, tuple[slice, slice, slice]]:
    """Bounding box of every organ label in one pass over the volume (in memory order)."""
    found = find_boxes(labels_xyz, max_label=len(ORGANS))
    return {value: box for value, box in enumerate(found, start=1) if box is not None}


# ----------------------------------------------------------------------------- images, files
def _to_xyz(volume) -> tuple[np.ndarray, tuple[float, float, float] | None]:
    """(array in nibabel order (x, y, z), spacing or None) from a SimpleITK image or a (Z, Y, X) array."""
    if isinstance(volume, np.ndarray):
        return volume.transpose(2, 1, 0), None
    import SimpleITK as sitk

    return sitk.GetArrayViewFromImage(volume).transpose(2, 1, 0), tuple(volume.GetSpacing())


def evaluate_case(
    pred, gt, *, spacing_xyz=None, name: str = "case", flare_2024: bool = False, workers: int = 1
) -> CaseScores:
    """Score one case. `pred` and `gt`: SimpleITK images, or numpy label arrays (Z, Y, X) as
    `GetArrayFromImage` gives them. Spacing comes from the GT image (x, y, z, mm); pass `spacing_xyz`
    when `gt` is an array. Returns `CaseScores` (rounded to 4 decimals as the organisers did).
    """
    gt_xyz, gt_spacing = _to_xyz(gt)
    pred_xyz, _ = _to_xyz(pred)
    spacing = spacing_xyz if spacing_xyz is not None else gt_spacing
    if spacing is None:
        raise ValueError("gt is a numpy array: pass spacing_xyz=(x, y, z) in mm (the GT header's spacing)")
    return evaluate_arrays(pred_xyz, gt_xyz, spacing, name=name, flare_2024=flare_2024, workers=workers)


def _read_labels(path: Path):
    import SimpleITK as sitk

    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise CaseError(f"{path}: cannot be read as an image ({str(e).strip().splitlines()[-1]})") from e


def grid_note(pred, gt) -> str | None:
    """One line when the prediction's spacing/origin/direction differ from the GT's; None when they agree.

    The organisers compared raw arrays and never looked at the geometry; neither do the scores here, but a
    prediction on another grid is almost certainly a bug worth a line in the report.
    """
    same = np.allclose(pred.GetSpacing(), gt.GetSpacing(), atol=1e-3) and np.allclose(
        pred.GetOrigin(), gt.GetOrigin(), atol=1e-2
    )
    if same and np.allclose(pred.GetDirection(), gt.GetDirection(), atol=1e-4):
        return None
    return ("prediction spacing/origin/direction differ from the ground truth's; scored voxel by voxel as the "
            "organisers did: check that the mask was restored onto the input image's grid")  # fmt: skip


def _evaluate_file_pair(args) -> tuple[CaseScores, str | None]:
    pred_path, gt_path, flare_2024, threads = args
    import SimpleITK  # noqa: F401  (here, not in the reading threads: an import holds the GIL)

    paths = [gt_path] if pred_path is None else [gt_path, pred_path]
    # Both files at once, and scipy's import (0.5 s of CPU) meanwhile: ITK releases the GIL while it reads.
    with ThreadPoolExecutor(min(threads, len(paths))) as pool:
        reads = [pool.submit(_read_labels, path) for path in paths]
        import_scipy()
        gt, *pred = (read.result() for read in reads)
    note = None
    if pred_path is None:
        # Scored as an empty prediction: 0 for organs in the GT, 1 for organs absent from both.
        pred = np.zeros(gt.GetSize()[::-1], np.uint8)
    else:
        pred = pred[0]
        if pred.GetSize() == gt.GetSize():
            note = grid_note(pred, gt)
    scores = evaluate_case(
        pred, gt, name=gt_path.name, spacing_xyz=gt.GetSpacing(), flare_2024=flare_2024, workers=threads
    )
    return scores, note


def case_stem(name: str) -> str | None:
    """`NAME.nii.gz` / `NAME.nii` (any case of the extension) -> `NAME`; None for other files."""
    lower = name.lower()
    suffix = next((s for s in MASK_SUFFIXES if lower.endswith(s)), None)
    return None if suffix is None or name.startswith(".") else name[: -len(suffix)]


def _mask_files(folder: Path) -> dict[str, list[Path]]:
    """{case stem: its mask files} of a folder (hidden files skipped)."""
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        stem = case_stem(path.name)
        if stem is not None and path.is_file():
            found.setdefault(stem, []).append(path)
    return found


def gt_cases(gt_dir: Path) -> list[Path]:
    """The ground-truth masks of GT_DIR, sorted; FolderError (naming it) for a missing or empty folder."""
    gt_dir = Path(gt_dir)
    if not gt_dir.is_dir():
        raise FolderError(f"ground-truth folder {gt_dir} does not exist or is not a folder: expected a folder of "
                          "NAME.nii.gz label files (the second argument, GT_DIR)")  # fmt: skip
    cases = [path for paths in _mask_files(gt_dir).values() for path in paths]
    if not cases:
        raise FolderError(f"ground-truth folder {gt_dir} holds no *.nii.gz or *.nii file: expected NAME.nii.gz "
                          "label files (the second argument, GT_DIR)")  # fmt: skip
    return sorted(cases)


def match_predictions(pred_dir: Path, gt_paths: list[Path]) -> list[tuple[Path, list[Path]]]:
    """(GT mask, its prediction files: none, one, or `.nii` and `.nii.gz` both) per GT case.

    FolderError when PRED_DIR is missing, holds no mask, or holds none named like a GT case: scoring such a
    folder would only report zeros.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise FolderError(f"prediction folder {pred_dir} does not exist or is not a folder: expected the OUTPUT_DIR "
                          "of `python -m flare_infer predict` (the first argument, PRED_DIR)")  # fmt: skip
    predictions = _mask_files(pred_dir)
    if not predictions:
        raise FolderError(f"prediction folder {pred_dir} holds no *.nii.gz or *.nii file: expected one mask per "
                          f"ground-truth case, such as {gt_paths[0].name}")  # fmt: skip
    pairs = [(gt, predictions.get(case_stem(gt.name), [])) for gt in gt_paths]
    if not any(files for _, files in pairs):
        example = next(iter(predictions.values()))[0].name
        raise FolderError(
            f"prediction folder {pred_dir} holds {len(predictions)} masks but none named like the "
            f"{len(gt_paths)} ground-truth cases of {gt_paths[0].parent} (expected {gt_paths[0].name}, found "
            f"{example}): check the folders and their order (PRED_DIR first, then GT_DIR)"
        )
    return pairs


def default_workers() -> int:
    """The CPUs' worth of time this process may use (affinity and cgroup CPU quota: flare_infer.hosts), at least 1."""
    from flare_infer.hosts import available_cpus

    return available_cpus()


def evaluate_folder(
    pred_dir, gt_dir, *, flare_2024: bool = False, workers: int | None = None, allow_missing: bool = False
) -> FolderResult:
    """Score every GT case against the prediction of the same name (`.nii.gz` or `.nii`).

    A GT case without a prediction is listed in `missing`; with allow_missing it is scored as an empty mask
    (the FLARE22 organisers' rule), else it is not scored. FolderError for a prediction folder that is missing,
    empty or holds no mask named like a GT case. A case with two predictions (`.nii` and `.nii.gz`) is an error.
    workers (default: the cores allowed) > 1: cases in a process pool (at most one process per case),
    organs in threads with the rest; a single case reads its two files and scores its organs in threads.
    """
    workers = workers or default_workers()
    jobs, missing, errors = [], [], {}
    for gt_path, found in match_predictions(Path(pred_dir), gt_cases(Path(gt_dir))):
        if len(found) > 1:
            errors[gt_path.name] = (f"{len(found)} predictions for one case ({', '.join(p.name for p in found)}): "
                                    f"keep one of them in {found[0].parent}")  # fmt: skip
            continue
        if not found:
            missing.append(gt_path.name)
            if not allow_missing:
                continue
        jobs.append((found[0] if found else None, gt_path, flare_2024))
    # Cases in processes; what is left of `workers` goes to organ threads inside each case.
    processes = max(1, min(workers, len(jobs)))
    jobs = [(*job, max(1, workers // processes)) for job in jobs]
    cases, notes = [], {}
    pool = ProcessPoolExecutor(processes, mp_context=get_context("forkserver")) if processes > 1 else None
    try:
        pending = [(job[1].name, pool.submit(_evaluate_file_pair, job) if pool else job) for job in jobs]
        for name, item in pending:
            try:
                scores, note = item.result() if pool else _evaluate_file_pair(item)
            except CaseError as e:
                errors[name] = str(e)
                continue
            cases.append(scores)
            if note is not None:
                notes[name] = note
    finally:
        if pool:
            pool.shutdown()
    return FolderResult(cases=cases, errors=errors, missing=missing, missing_scored=allow_missing, notes=notes)


# --------------------------------------------------------------------------------- reports
def _csv_value(value) -> str:
    # Every number as a float (`0.9523`, `1.0`, `0.0`), NaN as an empty cell. The organisers' pandas wrote a
    # column that only the empty-mask rules decided as ints (`1`, `0`); the numbers are the same, the
    # mixed formatting is not kept (issue 17).
    value = float(value)
    return "" if math.isnan(value) else repr(value)


def write_csv(cases: Sequence[CaseScores], path) -> None:
    """Per-case CSV in the organisers' column order; every number written as a float."""
    lines = [",".join(CSV_COLUMNS)]
    for row in (case.row() for case in cases):
        lines.append(",".join([str(row["Name"]), *(_csv_value(row[c]) for c in CSV_COLUMNS[1:])]))
    Path(path).write_text("\n".join(lines) + "\n")


def mean_std(values: Sequence[float]) -> str:
    """'mean +/- sample std' of the values, NaNs skipped; a single value alone; 'n/a' when none is left."""
    data = np.array(values, dtype=float)
    data = data[~np.isnan(data)]
    if data.size == 0:
        return "n/a"
    if data.size == 1:
        return f"{data[0]:.4f}"
    return f"{np.mean(data):.4f} +/- {np.std(data, ddof=1):.4f}"  # sample std, as pandas' .std()


def summary_markdown(result: FolderResult) -> str:
    """Per-organ mean +/- std (sample std over cases) for DSC and NSD, then the overall means."""
    cases = result.cases
    how = "scored as empty" if result.missing_scored else "not scored"
    lines = [
        f"FLARE22 evaluation: {len(cases)} cases scored"
        + (f", {len(result.missing)} missing predictions {how}" if result.missing else "")
        + (f", {len(result.errors)} cases failed" if result.errors else ""),
        "",
        "| Organ | DSC (mean +/- std) | NSD (mean +/- std) |",
        "|---|---|---|",
    ]
    for organ in ORGANS:
        dsc = [c.dsc[organ.short] for c in cases]
        nsd = [c.nsd[organ.short] for c in cases]
        lines.append(f"| {organ.name} | {mean_std(dsc)} | {mean_std(nsd)} |")
    all_dsc = [v for c in cases for v in c.dsc.values()]
    all_nsd = [v for c in cases for v in c.nsd.values()]
    lines.append(
        f"| **mean** | {np.nanmean(all_dsc) if cases else float('nan'):.4f} | "
        f"{np.nanmean(all_nsd) if cases else float('nan'):.4f} |"
    )
    if result.missing:
        lines.append(f"\nmissing predictions ({len(result.missing)}, {how}): {', '.join(result.missing)}")
    for name, message in result.notes.items():
        lines.append(f"\nwarning: {name}: {message}")
    for name, message in result.errors.items():
        lines.append(f"\nerror: {name}: {message}")
    return "\n".join(lines) + "\n"


def main(
    pred_dir: Path,
    gt_dir: Path,
    csv: Path | None = None,
    markdown: Path | None = None,
    flare_2024: bool = False,
    workers: int | None = None,
    allow_missing: bool = False,
) -> int:
    """Score, write the CSV and table, print the table; the exit status (FolderError propagates: usage, 2)."""
    result = evaluate_folder(pred_dir, gt_dir, flare_2024=flare_2024, workers=workers, allow_missing=allow_missing)
    if csv is not None:
        write_csv(result.cases, csv)
    text = summary_markdown(result)
    if markdown is not None:
        Path(markdown).write_text(text)
    print(text, end="")
    if result.missing and not allow_missing:
        print(f"error: {len(result.missing)} of {len(result.missing) + len(result.cases) + len(result.errors)} "
              f"ground-truth cases have no prediction in {pred_dir} and were not scored: "
              f"{', '.join(result.missing)}. Predict them, or pass --allow-missing to score them as empty masks "
              "(FLARE22's rule)", file=sys.stderr)  # fmt: skip
    for name, message in result.errors.items():
        print(f"error: {name}: {message}", file=sys.stderr)
    return 1 if result.errors or (result.missing and not allow_missing) else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m flare_infer evaluate` and `python -m flare_infer.evaluate`."""
    parser.add_argument("pred_dir", type=Path, metavar="PRED_DIR",
                        help="folder of predicted masks NAME.nii.gz or NAME.nii (predict's OUTPUT_DIR)")
    parser.add_argument("gt_dir", type=Path, metavar="GT_DIR", help="folder of ground-truth masks NAME.nii.gz")
    parser.add_argument("--csv", type=Path, metavar="OUT.csv", help="write the per-case CSV (organisers' columns) here")
    parser.add_argument("--markdown", type=Path, metavar="OUT.md", help="write the per-organ mean +/- std table here")
    parser.add_argument("--flare-2024", action="store_true", help="FLARE24 rule: NSD = 0 when DSC < 0.2")
    parser.add_argument("--workers", type=at_least(1), metavar="N",
                        help="cases in processes, organs in threads (default: the cores allowed)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="score a GT case without a prediction as an empty mask (FLARE22's rule) and exit 0; "
                             "without it such cases are listed, not scored, and the exit status is 1")
    add_debug(parser)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    return main(args.pred_dir, args.gt_dir, args.csv, args.markdown, args.flare_2024, args.workers,
                args.allow_missing)  # fmt: skip


def _cli(argv: list[str] | None = None, prog: str = "python -m flare_infer.evaluate") -> None:
    # argparse, not typer: typer and the pydantic it loads cost 0.3 s of CPU per start (docs/PERFORMANCE.md).
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, formatter_class=HelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    sys.exit(one_line_errors(lambda: run(args), debug=args.debug))


if __name__ == "__main__":
    _cli()
