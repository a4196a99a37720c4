"""Per-organ statistics of a mask on its CT's own grid: volume, intensities, bounding box, and whether the organ is
cut by the scan's edge (so its volume is not trusted).

    python -m flare_infer predict INPUT_DIR OUTPUT_DIR --statistics   # NAME.statistics.json per case + statistics.csv

Per organ (all 13, absent ones with `voxels` 0 and nulls): `voxels`; `volume_ml` = voxels x the voxel volume;
`hu_mean`, `hu_median`, `hu_std` (population std) of the CT's values inside the mask (Hounsfield units for a CT);
the bounding box as voxel indices (x, y, z; inclusive), its size in mm along the image's axes and its first and
last voxel centres in patient coordinates (mm, the image's LPS space); `touches_first_slice` (z = 0),
`touches_last_slice` (z = last), `touches_inplane_edge` (x or y at the image's border); `complete` = none of these
(an organ cut by the scan's edge has a volume that is only a lower bound).
"""

from __future__ import annotations

import csv
import io as _io
import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from flare_infer.labels import ORGANS

CSV_FIELDS = (
    "case", "label", "organ", "voxels", "volume_ml", "hu_mean", "hu_median", "hu_std",
    "bbox_min_xyz", "bbox_max_xyz", "bbox_size_mm_xyz", "bbox_first_mm_lps", "bbox_last_mm_lps",
    "touches_first_slice", "touches_last_slice", "touches_inplane_edge", "complete",
)  # fmt: skip


def organ_statistics(image: sitk.Image, mask: sitk.Image) -> dict[str, dict]:
    """{organ name: its statistics} for the 13 organs; `mask` must lie on `image`'s grid (same size)."""
    if image.GetSize() != mask.GetSize():
        raise ValueError(f"the mask's size {mask.GetSize()} is not the image's {image.GetSize()}")
    labels_zyx = sitk.GetArrayViewFromImage(mask)
    values_zyx = sitk.GetArrayViewFromImage(image)
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0  # mm^3 -> mL
    boxes = ndimage.find_objects(labels_zyx, max_label=len(ORGANS))  # one pass: each label's (z, y, x) slices
    return {organ.name: _one(organ.value, boxes[organ.value - 1], labels_zyx, values_zyx, image, voxel_ml)
            for organ in ORGANS}  # fmt: skip


def _one(label: int, box, labels_zyx: np.ndarray, values_zyx: np.ndarray, image: sitk.Image, voxel_ml: float) -> dict:
    if box is None:
        return {"label": label, "voxels": 0, "volume_ml": 0.0, "hu_mean": None, "hu_median": None, "hu_std": None,
                "bbox_min_xyz": None, "bbox_max_xyz": None, "bbox_size_mm_xyz": None, "bbox_first_mm_lps": None,
                "bbox_last_mm_lps": None, "touches_first_slice": False, "touches_last_slice": False,
                "touches_inplane_edge": False, "complete": True}  # fmt: skip
    inside = labels_zyx[box] == label
    values = values_zyx[box][inside].astype(np.float64)
    low_zyx = [s.start for s in box]
    high_zyx = [s.stop - 1 for s in box]
    low_xyz, high_xyz = low_zyx[::-1], high_zyx[::-1]
    size_xyz = image.GetSize()
    first, last = low_zyx[0] == 0, high_zyx[0] == size_xyz[2] - 1
    edge = low_xyz[0] == 0 or low_xyz[1] == 0 or high_xyz[0] == size_xyz[0] - 1 or high_xyz[1] == size_xyz[1] - 1
    return {
        "label": label,
        "voxels": int(inside.sum()),
        "volume_ml": float(inside.sum()) * voxel_ml,
        "hu_mean": float(values.mean()),
        "hu_median": float(np.median(values)),
        "hu_std": float(values.std()),
        "bbox_min_xyz": [int(v) for v in low_xyz],
        "bbox_max_xyz": [int(v) for v in high_xyz],
        "bbox_size_mm_xyz": [
            float((h - lo + 1) * s) for lo, h, s in zip(low_xyz, high_xyz, image.GetSpacing(), strict=True)
        ],
        "bbox_first_mm_lps": list(image.TransformIndexToPhysicalPoint([int(v) for v in low_xyz])),
        "bbox_last_mm_lps": list(image.TransformIndexToPhysicalPoint([int(v) for v in high_xyz])),
        "touches_first_slice": bool(first),
        "touches_last_slice": bool(last),
        "touches_inplane_edge": bool(edge),
        "complete": not (first or last or edge),
    }


def case_document(case: str, image: sitk.Image, mask: sitk.Image) -> dict:
    """The JSON of one case: its grid and its organs' statistics."""
    return {
        "case": case,
        "size_xyz": list(image.GetSize()),
        "spacing_xyz_mm": list(image.GetSpacing()),
        "voxel_volume_ml": float(np.prod(image.GetSpacing())) / 1000.0,
        "organs": organ_statistics(image, mask),
    }


def _write_text(text: str, path: Path) -> None:
    """Write atomically: a hidden temporary file in the same folder, then rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_case_json(document: dict, path: Path) -> None:
    _write_text(json.dumps(document, indent=1) + "\n", Path(path))


def csv_rows(document: dict) -> list[dict]:
    """One row per organ of a case's document, lists as space-separated numbers."""
    rows = []
    for name, stats in document["organs"].items():
        row = {"case": document["case"], "organ": name}
        for key in CSV_FIELDS[3:]:
            value = stats[key]
            if isinstance(value, list):
                value = " ".join(f"{v:g}" for v in value)
            row[key] = "" if value is None else value
        row["label"] = stats["label"]
        rows.append(row)
    return rows


def write_csv(documents: list[dict], path: Path) -> None:
    """One CSV for the run: a row per case and organ."""
    out = _io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for document in documents:
        writer.writerows(csv_rows(document))
    _write_text(out.getvalue(), Path(path))


def json_name(case_name: str) -> str:
    return case_name + ".statistics.json"


def csv_name(shard: tuple[int, int] = (0, 1)) -> str:
    """`statistics.csv`; with --shard K/N (N > 1) `statistics.shardK-of-N.csv`, so shards never overwrite each other."""
    k, n = shard
    return "statistics.csv" if n == 1 else f"statistics.shard{k}-of-{n}.csv"
