"""The 13 FLARE22 organs: label values, names, CSV short names and NSD tolerances.

One constant, used everywhere (generator, training, inference, evaluation). Values and
tolerances follow the FLARE22 challenge (`../shared/FLARE22.md`); the short names are the
column stems of the organisers' evaluation CSV (`Liver_DSC`, `RK_DSC`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Organ:
    value: int  # label value in the uint8 mask
    name: str  # human-readable name
    short: str  # column stem in the organisers' CSV
    nsd_tolerance_mm: float  # NSD tolerance used by FLARE22


ORGANS: tuple[Organ, ...] = (
    Organ(1, "liver", "Liver", 5.0),
    Organ(2, "right kidney", "RK", 3.0),
    Organ(3, "spleen", "Spleen", 3.0),
    Organ(4, "pancreas", "Pancreas", 5.0),
    Organ(5, "aorta", "Aorta", 2.0),
    Organ(6, "inferior vena cava", "IVC", 2.0),
    Organ(7, "right adrenal gland", "RAG", 2.0),
    Organ(8, "left adrenal gland", "LAG", 2.0),
    Organ(9, "gallbladder", "Gallbladder", 2.0),
    Organ(10, "esophagus", "Esophagus", 3.0),
    Organ(11, "stomach", "Stomach", 5.0),
    Organ(12, "duodenum", "Duodenum", 7.0),
    Organ(13, "left kidney", "LK", 3.0),
)

NUM_CLASSES = len(ORGANS) + 1  # 14: background + 13 organs

# {"0": "background", "1": "liver", ...}: the label map as the model sidecar and dataset.json store it.
LABEL_NAMES: dict[str, str] = {"0": "background", **{str(o.value): o.name for o in ORGANS}}

ORGAN_BY_VALUE: dict[int, Organ] = {o.value: o for o in ORGANS}

# Organs whose scores FLARE22 computes after cutting both masks to the ground truth's axial range.
AXIAL_RANGE_CUT_VALUES: frozenset[int] = frozenset({5, 6, 10})
