"""Synthetic FLARE-style abdominal CT: images and 13-organ labels, with FLARE22's domain shift.

    python -m training.phantoms data/phantoms --labelled 50 --unlabelled 200 --validation 20 --seed 0
    python -m training.phantoms examples --layout examples        # regenerate examples/ (two small cases)
    python -m training.phantoms data/clean --size small --acquisition none   # no acquisition variation

The anatomy is built in *physical* patient coordinates (LPS, mm: +x patient left, +y posterior,
+z superior) and evaluated analytically at each voxel's physical position, so left and right are
correct whatever the grid's direction matrix, and any grid (spacing, size, origin, flips, axis
permutations, oblique) samples the same patient. An anatomical frame `a = (p - centre) / scale`
(mm at scale 1, origin near the renal hilum level on the midline) holds the organ layout.

Each voxel gets a *tissue* code (fat, muscle, bone, kidney cortex, stomach gas, ...); the label is
a lookup from tissue to organ, and the image is the tissue's HU mean for the case's contrast phase
plus texture, partial-volume blur and scanner noise. numpy, scipy and SimpleITK only (no torch), so
`flare_infer`'s tests can import it. Knobs and sizes: docs/PHANTOMS.md.

This module is the patient; the scanner (grid, field of view, reconstruction kernel, padding
outside the reconstruction circle, patient table, z-coverage) is `training/acquisition.py`.
"""

from __future__ import annotations

import gzip
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Annotated

import numpy as np
import SimpleITK as sitk
import typer

from flare_infer.labels import LABEL_NAMES
from training import acquisition as scan  # the scanner: grid, reconstruction, table (training/acquisition.py)
from training import intensity as look  # the randomised look: HU, texture, noise spectrum (training/intensity.py)
from training.acquisition import GEOMETRIES, SIZES, AcquisitionConfig, AcquisitionParams, Grid

# ----------------------------------------------------------------------------------------------
# Tissues: codes in the tissue map; ORGAN_OF gives the FLARE label of each code (0 = background).
# ----------------------------------------------------------------------------------------------
AIR, SKIN, FAT, WALL_MUSCLE, MUSCLE, CAVITY_FAT, BOWEL_WALL, BOWEL_CONTENT, GAS, LUNG = range(10)
BLOOD, BONE, CORTEX_BONE, DISC, CSF, STOOL = range(10, 16)
LIVER, SPLEEN, PANCREAS, AORTA, IVC, GALLBLADDER = range(20, 26)
RK_CORTEX, RK_MEDULLA, LK_CORTEX, LK_MEDULLA, R_ADRENAL, L_ADRENAL = range(26, 32)
ESO_WALL, ESO_AIR, STOMACH_WALL, STOMACH_CONTENT, STOMACH_GAS = range(32, 37)
DUO_WALL, DUO_CONTENT, DUO_GAS = range(37, 40)
N_ANATOMY_TISSUES = 40  # the patient's tissues; the per-case HU jitter is drawn for these only
TABLE_FOAM, TABLE_PLATE = range(40, 42)  # the patient table (acquisition.TableSpec), background
N_TISSUES = 42

ORGAN_OF = np.zeros(N_TISSUES, np.uint8)
for _codes, _value in (
    ((LIVER,), 1), ((RK_CORTEX, RK_MEDULLA), 2), ((SPLEEN,), 3), ((PANCREAS,), 4), ((AORTA,), 5),
    ((IVC,), 6), ((R_ADRENAL,), 7), ((L_ADRENAL,), 8), ((GALLBLADDER,), 9), ((ESO_WALL, ESO_AIR), 10),
    ((STOMACH_WALL, STOMACH_CONTENT, STOMACH_GAS), 11), ((DUO_WALL, DUO_CONTENT, DUO_GAS), 12),
    ((LK_CORTEX, LK_MEDULLA), 13),
):
    ORGAN_OF[list(_codes)] = _value

# Organs paint only inside the body cavity: never onto skin, subcutaneous fat, the abdominal wall or bone.
_ORGAN_FORBIDDEN = np.zeros(N_TISSUES, bool)
_ORGAN_FORBIDDEN[[AIR, SKIN, FAT, WALL_MUSCLE, BONE, CORTEX_BONE, DISC, CSF]] = True
_CAVITY_ONLY = np.zeros(N_TISSUES, bool)
_CAVITY_ONLY[[CAVITY_FAT]] = True

PHASES = ("plain", "arterial", "portal", "delayed")
INTENSITIES = ("classic", "randomised")
ANATOMIES = ("classic", "varied")
# HU means per contrast phase (plain, arterial, portal, delayed); literature-typical values for contrast CT.
HU_BY_PHASE: dict[int, tuple[float, float, float, float]] = {
    LIVER: (58, 80, 118, 95), SPLEEN: (48, 125, 128, 95), PANCREAS: (45, 120, 98, 80),
    AORTA: (45, 300, 165, 115), IVC: (42, 95, 150, 115), BLOOD: (45, 260, 160, 115),
    RK_CORTEX: (35, 210, 185, 150), RK_MEDULLA: (32, 95, 155, 165),
    LK_CORTEX: (35, 210, 185, 150), LK_MEDULLA: (32, 95, 155, 165),
    R_ADRENAL: (32, 60, 50, 45), L_ADRENAL: (32, 60, 50, 45), GALLBLADDER: (12, 14, 16, 18),
    ESO_WALL: (40, 55, 62, 55), STOMACH_WALL: (40, 95, 85, 70), DUO_WALL: (40, 90, 80, 68),
    BOWEL_WALL: (40, 85, 78, 65), MUSCLE: (50, 55, 60, 58), WALL_MUSCLE: (50, 55, 60, 58),
}
HU_FIXED: dict[int, float] = {
    AIR: -1000, SKIN: 30, FAT: -100, CAVITY_FAT: -90, BOWEL_CONTENT: 20, GAS: -900, LUNG: -850,
    BONE: 230, CORTEX_BONE: 700, DISC: 85, CSF: 12, STOOL: -60, ESO_AIR: -850, STOMACH_CONTENT: 12,
    STOMACH_GAS: -900, DUO_CONTENT: 18, DUO_GAS: -900,
}
# Texture: std (HU) of white noise added before the partial-volume blur (which divides it by ~1.7).
TEXTURE_HU = np.full(N_TISSUES, 25.0, np.float32)
for _code, _std in {
    AIR: 10, LUNG: 120, GAS: 80, TABLE_FOAM: 15, TABLE_PLATE: 15,
    BONE: 150, CORTEX_BONE: 150, STOOL: 160, LIVER: 30, SPLEEN: 20,
    PANCREAS: 60, AORTA: 15, IVC: 15, BLOOD: 15, GALLBLADDER: 10, FAT: 30, CAVITY_FAT: 40,
}.items():
    TEXTURE_HU[_code] = _std


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DomainConfig:
    """What varies between the FLARE22 labelled set (narrow) and the unlabelled/validation sets (wide)."""

    name: str
    phases: tuple[str, ...]  # contrast phases drawn from
    phase_weights: tuple[float, ...]  # their probabilities
    noise_std_hu: tuple[float, float]  # scanner noise std range (HU, measured after the blur)
    hu_jitter_hu: float  # per-case, per-tissue shift of the HU means (std, HU)
    contrast_gain: tuple[float, float]  # enhancement (phase HU - plain HU) multiplied by this (bolus timing, dose)
    anatomy_scale: tuple[float, float]  # patient size: organ layout and cavity scale per axis
    fat_mm: tuple[float, float]  # subcutaneous fat thickness (body habitus)
    fov_margin: tuple[float, float]  # in-plane field of view / body width (< 1 cuts the body's sides)
    scan_top_mm: tuple[float, float]  # scan range above the anatomical origin (liver dome ~ +150)
    scan_bottom_mm: tuple[float, float]  # scan range below it (lowest kidney pole ~ -80, pelvis ~ -150)
    intensity: str = "classic"  # "classic" (HU table + white texture) or "randomised" (training/intensity.py)
    anatomy: str = "classic"  # "classic" or "varied" (wider placement and size, organ shapes, pelvic distractors)

    def __post_init__(self) -> None:
        if self.intensity not in INTENSITIES:
            raise ValueError(f"intensity must be one of {INTENSITIES}; found {self.intensity!r}")
        if self.anatomy not in ANATOMIES:
            raise ValueError(f"anatomy must be one of {ANATOMIES}; found {self.anatomy!r}")
        unknown = set(self.phases) - set(PHASES)
        if unknown or len(self.phases) != len(self.phase_weights):
            raise ValueError(
                f"phases must be from {PHASES} with one weight each; found {self.phases}, {self.phase_weights}"
            )
        if self.scan_top_mm[0] < 150 or self.scan_bottom_mm[1] > -95:
            raise ValueError("the scan range must contain every organ: scan_top_mm >= 150 and scan_bottom_mm <= -95")


LABELLED_DOMAIN = DomainConfig(
    name="labelled", phases=("portal",), phase_weights=(1.0,), noise_std_hu=(6.0, 10.0), hu_jitter_hu=4.0,
    contrast_gain=(0.95, 1.05), anatomy_scale=(0.96, 1.04), fat_mm=(15.0, 28.0), fov_margin=(1.10, 1.25),
    scan_top_mm=(165.0, 185.0), scan_bottom_mm=(-160.0, -130.0),
)
WIDE_DOMAIN = DomainConfig(
    name="wide", phases=PHASES, phase_weights=(0.15, 0.3, 0.4, 0.15), noise_std_hu=(8.0, 30.0), hu_jitter_hu=10.0,
    contrast_gain=(0.7, 1.3), anatomy_scale=(0.86, 1.14), fat_mm=(4.0, 60.0), fov_margin=(0.97, 1.45),
    scan_top_mm=(160.0, 260.0), scan_bottom_mm=(-280.0, -105.0),
)
# The randomised look (issue 26): the same patients and scans, drawn with training/intensity.py's wide look.
LABELLED_RANDOMISED = replace(LABELLED_DOMAIN, name="labelled-randomised", intensity="randomised")
WIDE_RANDOMISED = replace(WIDE_DOMAIN, name="wide-randomised", intensity="randomised")
# Both: the randomised look on the varied anatomy (wider organ placement, organ shapes, pelvic distractors).
LABELLED_REAL = replace(LABELLED_RANDOMISED, name="labelled-real", anatomy="varied")
WIDE_REAL = replace(WIDE_RANDOMISED, name="wide-real", anatomy="varied")
DOMAINS = {d.name: d for d in (LABELLED_DOMAIN, WIDE_DOMAIN, LABELLED_RANDOMISED, WIDE_RANDOMISED, LABELLED_REAL,
                               WIDE_REAL)}
DOMAINS_BY_SPLIT = {  # (intensity, anatomy) -> (labelled domain, unlabelled and validation domain)
    ("classic", "classic"): (LABELLED_DOMAIN, WIDE_DOMAIN),
    ("randomised", "classic"): (LABELLED_RANDOMISED, WIDE_RANDOMISED),
    ("randomised", "varied"): (LABELLED_REAL, WIDE_REAL),
}


@dataclass(frozen=True)
class CaseParams:
    """Everything drawn for one case except shapes and noise: recorded in dataset.json."""

    seed: int
    domain: str
    size: str
    phase: str
    noise_std_hu: float
    contrast_gain: float
    scale_xyz: tuple[float, float, float]
    fat_mm: float
    centre_xyz: tuple[float, float, float]  # physical position of the anatomical origin
    geometry: str
    pixel_type: str
    grid: Grid = field(repr=False)
    acquisition: AcquisitionParams | None = None  # None: a clean scan (no acquisition variation)


# ----------------------------------------------------------------------------------------------
# Shapes in the anatomical frame (mm at scale 1)
# ----------------------------------------------------------------------------------------------
def _rotation(deg_zyx: tuple[float, float, float]) -> np.ndarray:
    """Rotation about z, then y, then x (degrees)."""
    cz, cy, cx = (math.cos(math.radians(d)) for d in deg_zyx)
    sz, sy, sx = (math.sin(math.radians(d)) for d in deg_zyx)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class Warp:
    """Smooth displacement sum_m amp_m * u_m * sin(k_m . a + phase_m): per-organ shape variation."""

    amp_u: np.ndarray  # (M, 3) amplitude times unit direction, mm
    k: np.ndarray  # (M, 3) wave vectors, rad/mm
    phase: np.ndarray  # (M,)

    @property
    def reach_mm(self) -> float:
        return float(np.abs(self.amp_u).sum())

    def __call__(self, a: list[np.ndarray]) -> list[np.ndarray]:
        out = [None, None, None]
        for au, k, ph in zip(self.amp_u, self.k, self.phase, strict=True):
            s = np.sin(np.float32(k[0]) * a[0] + np.float32(k[1]) * a[1] + np.float32(k[2]) * a[2] + np.float32(ph))
            for d in range(3):
                if out[d] is None:
                    out[d] = a[d] + np.float32(au[d]) * s
                else:
                    out[d] += np.float32(au[d]) * s
        return out


def _random_warp(rng: np.random.Generator, amp_mm: float, wavelength_mm: tuple[float, float], n: int = 2) -> Warp:
    u = rng.normal(size=(n, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    kdir = rng.normal(size=(n, 3))
    kdir /= np.linalg.norm(kdir, axis=1, keepdims=True)
    k = kdir * (2 * math.pi / rng.uniform(*wavelength_mm, size=(n, 1)))
    return Warp(u * rng.uniform(0.5, 1.0, size=(n, 1)) * amp_mm, k, rng.uniform(0, 2 * math.pi, size=n))


@dataclass(frozen=True)
class Ellipsoid:
    centre: np.ndarray  # (3,)
    half: np.ndarray  # (3,) half-axes before rotation
    rot: np.ndarray  # (3, 3)
    warp: Warp | None = None

    def aabb(self) -> tuple[np.ndarray, np.ndarray]:
        reach = np.abs(self.rot) @ self.half + (self.warp.reach_mm if self.warp else 0.0)
        return self.centre - reach, self.centre + reach

    def radius(self, a: list[np.ndarray]) -> np.ndarray:
        """Normalised radius: < 1 inside."""
        a = self.warp(a) if self.warp else a
        d = [a[i] - np.float32(self.centre[i]) for i in range(3)]
        r2 = 0
        for ax in range(3):  # q_ax = (R^T d)_ax / half_ax
            q = (d[0] * np.float32(self.rot[0, ax]) + d[1] * np.float32(self.rot[1, ax])
                 + d[2] * np.float32(self.rot[2, ax])) / np.float32(self.half[ax])
            r2 = r2 + q * q
        return np.sqrt(r2)


@dataclass(frozen=True)
class Tube:
    points: np.ndarray  # (N, 3) centre line
    radii: np.ndarray  # (N,) radius at each point, mm
    warp: Warp | None = None

    def aabb(self) -> tuple[np.ndarray, np.ndarray]:
        reach = self.radii.max() + (self.warp.reach_mm if self.warp else 0.0)
        return self.points.min(0) - reach, self.points.max(0) + reach

    def signed_distance(self, a: list[np.ndarray], frame: _Frame | None = None,
                        box: tuple[slice, slice, slice] | None = None) -> np.ndarray:
        """Distance to the tube's surface in mm (< 0 inside; +inf far from it when `frame` and `box` are given).

        With the frame and the index box of `a`, each segment is evaluated only on its own sub-box:
        a long curved tube (colon, aorta) then costs about as much as its volume, not its bounding box.
        """
        a = np.broadcast_arrays(*(self.warp(a) if self.warp else a))
        best = np.full(a[0].shape, np.inf, np.float32)
        pad = (self.warp.reach_mm if self.warp else 0.0) + 1.0
        for p0, p1, r0, r1 in zip(self.points[:-1], self.points[1:], self.radii[:-1], self.radii[1:], strict=True):
            sub = (slice(None),) * 3
            if frame is not None and box is not None:
                reach = max(r0, r1) + pad
                sub = _local(frame.box(np.minimum(p0, p1) - reach, np.maximum(p0, p1) + reach), box)
                if sub is None:
                    continue
            seg = p1 - p0
            d = [a[i][sub] - np.float32(p0[i]) for i in range(3)]
            seg32 = (seg / (seg @ seg)).astype(np.float32)  # t = d . seg / |seg|^2: position along the segment
            t = np.clip(d[0] * seg32[0] + d[1] * seg32[1] + d[2] * seg32[2], 0, 1)
            dist2 = sum((d[i] - t * np.float32(seg[i])) ** 2 for i in range(3))
            sd = np.sqrt(dist2) - (np.float32(r0) + t * np.float32(r1 - r0))
            np.minimum(best[sub], sd, out=best[sub])
        return best


def _local(sub_box, box) -> tuple[slice, slice, slice] | None:
    """`sub_box` (global index slices) relative to `box`, clipped to it; None if they do not meet."""
    if sub_box is None:
        return None
    out = []
    for s, b in zip(sub_box, box, strict=True):
        start, stop = max(s.start, b.start) - b.start, min(s.stop, b.stop) - b.start
        if stop <= start:
            return None
        out.append(slice(start, stop))
    return tuple(out)


def _smooth_path(points: list[tuple[float, ...]], radii: list[float],
                 per_segment: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Catmull-Rom through the control points: a curved tube from a few anatomical landmarks."""
    p = np.asarray(points, float)
    r = np.asarray(radii, float)
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out, rad = [], []
    for s in range(len(p) - 1):
        p0, p1, p2, p3 = ext[s : s + 4]
        for t in np.linspace(0, 1, per_segment, endpoint=False):
            out.append(0.5 * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                              + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3))
            rad.append(r[s] + (r[s + 1] - r[s]) * t)
    out.append(p[-1])
    rad.append(r[-1])
    return np.array(out), np.array(rad)


# The layout (anatomical frame, mm): centres, half-axes, rotations (deg about z, y, x), tube landmarks.
_ELLIPSOIDS = {
    "liver_right": ((-62, -5, 65), (78, 70, 80), (0, 0, 0)),
    "liver_left": ((5, -52, 88), (52, 32, 42), (15, 0, 0)),
    "spleen": ((92, 52, 82), (24, 52, 44), (-35, 0, 10)),
    "right_kidney": ((-64, 55, -25), (27, 24, 54), (25, 0, -12)),
    "left_kidney": ((64, 55, -5), (27, 24, 54), (-25, 0, -12)),
    "right_adrenal": ((-42, 40, 50), (6.5, 14, 20), (-30, 0, 0)),
    "left_adrenal": ((44, 36, 54), (6.5, 14, 20), (30, 0, 0)),
    "gallbladder": ((-62, -58, 18), (16, 16, 32), (0, 0, 30)),
    "heart": ((10, -40, 215), (70, 55, 65), (0, 0, 0)),
    "lung_right": ((-82, 30, 200), (68, 78, 125), (0, 0, 0)),
    "lung_left": ((82, 30, 200), (68, 78, 125), (0, 0, 0)),
}
_TUBES = {  # landmarks (x, y, z) and radii
    "aorta": ([(14, 12, -135), (14, 12, 0), (10, 15, 80), (8, 22, 140), (26, 30, 280)], [10, 11, 11.5, 12, 12]),
    "ivc": ([(-22, 8, -135), (-24, 5, 0), (-30, 0, 60), (-24, 4, 125), (-12, -5, 165)], [11, 12, 12.5, 12, 13]),
    "esophagus": ([(0, 4, 300), (-2, 0, 160), (10, -8, 125), (28, -12, 105), (42, -8, 98)], [8, 8, 8.5, 9, 9]),
    "stomach": ([(55, 15, 118), (60, -15, 88), (50, -45, 58), (25, -65, 36), (-5, -65, 30), (-22, -55, 32)],
                [34, 38, 32, 26, 20, 14]),
    "duodenum": ([(-22, -55, 32), (-40, -38, 34), (-55, -15, 15), (-55, -10, -25), (-35, -20, -47),
                  (0, -24, -52), (28, -20, -37), (35, -25, -12)], [13, 14, 13, 13, 12, 12, 12, 11]),
    "pancreas": ([(-30, -18, -5), (-12, -30, 12), (15, -28, 20), (45, -10, 28), (70, 15, 38)], [15, 11, 11, 10, 9]),
    "colon": ([(-95, 0, -150), (-98, -5, -40), (-85, -45, 10), (0, -78, 5), (85, -45, 40), (95, 10, 10),
               (92, 10, -120)], [22, 24, 22, 20, 20, 18, 18]),
}
CAVITY_HALF = (140.0, 105.0)  # abdominal cavity ellipse (inside the wall muscles), centred at (0, CAVITY_Y)
CAVITY_Y = 5.0
WALL_MM = 12.0
SKIN_MM = 2.5


@dataclass(frozen=True)
class Anatomy:
    """One patient: jittered shapes in the anatomical frame."""

    ellipsoids: dict[str, Ellipsoid]
    tubes: dict[str, Tube]
    stomach_gas_y: float  # anterior (smaller y) of this anatomical y the stomach lumen holds gas
    duodenum_gas_y: float
    esophagus_air: bool
    bowel_waves: np.ndarray  # (M, 4): k_x, k_y, k_z, phase of the small-bowel field
    vertebra_phase_mm: float
    distractors: tuple = ()  # (Ellipsoid, tissue code): unlabelled look-alikes (bladder, femoral heads), "varied"
    # The varied anatomy's shapes (empty in the classic one): carved away from an organ, or added to it.
    carve: dict = field(default_factory=dict)  # organ -> Ellipsoid removed from it (spleen's hilar face, renal sinus)
    caudate: Ellipsoid | None = None  # the caudate lobe: liver beside the IVC
    renal_vessels: tuple = ()  # Tubes from each renal sinus to the aorta and the IVC: enhanced blood, unlabelled


def _sample_anatomy(rng: np.random.Generator) -> Anatomy:
    ellipsoids = {}
    for name, (c, h, rot) in _ELLIPSOIDS.items():
        big = name.startswith(("lung", "heart", "liver"))
        centre = np.array(c, float) + rng.normal(0, 6 if big else 4, 3)
        half = np.array(h, float) * rng.uniform(0.9, 1.1) * rng.uniform(0.94, 1.06, 3)
        if name.endswith("adrenal"):  # keep them >= ~11 mm thick so they survive 2.5 mm resampling
            half[0] = max(half[0], 5.5)
        angles = np.array(rot, float) + rng.normal(0, 6, 3)
        amp = 0.08 * float(np.min(half)) + 2.0
        warp = _random_warp(rng, amp, (60, 160))
        rigid = name.startswith(("lung", "heart"))  # big boxes, and their shape hardly matters
        ellipsoids[name] = Ellipsoid(centre, half, _rotation(tuple(angles)), None if rigid else warp)
    tubes = {}
    for name, (pts, rad) in _TUBES.items():
        p = np.array(pts, float) + rng.normal(0, 3.5, (len(pts), 3))
        r = np.array(rad, float) * rng.uniform(0.9, 1.1) * rng.uniform(0.95, 1.05, len(rad))
        path, radii = _smooth_path(list(map(tuple, p)), list(r))
        amp = 2.0 if name in ("aorta", "ivc", "esophagus") else 5.0
        warp = _random_warp(rng, amp, (80, 200))
        tubes[name] = Tube(path, radii, None if name == "colon" else warp)  # the colon's box is most of the abdomen
    k = rng.normal(size=(6, 3))
    k = k / np.linalg.norm(k, axis=1, keepdims=True) * (2 * math.pi / rng.uniform(45, 90, (6, 1)))
    waves = np.hstack([k, rng.uniform(0, 2 * math.pi, (6, 1))])
    st = tubes["stomach"]
    gas_frac, duo_gas = rng.uniform(0, 0.35), rng.uniform(0, 0.2)
    y_lo, y_hi = (st.points[:, 1] - st.radii).min(), (st.points[:, 1] + st.radii).max()
    du = tubes["duodenum"]
    dy_lo, dy_hi = (du.points[:, 1] - du.radii).min(), (du.points[:, 1] + du.radii).max()
    return Anatomy(ellipsoids, tubes, y_lo + gas_frac * (y_hi - y_lo), dy_lo + duo_gas * (dy_hi - dy_lo),
                   bool(rng.random() < 0.4), waves, float(rng.uniform(0, 32)))


ANATOMY_STREAM = 0xA7A  # the varied anatomy's stream key beside the case seed: the classic draws are not moved
_DISTRACTOR_OK = np.zeros(N_TISSUES, bool)  # what a distractor may cover: soft tissue, fat, bowel; not air or skin
_DISTRACTOR_OK[[FAT, WALL_MUSCLE, MUSCLE, CAVITY_FAT, BOWEL_WALL, BOWEL_CONTENT, GAS, STOOL]] = True


def _vary_anatomy(anatomy: Anatomy, seed: int) -> Anatomy:
    """The "varied" anatomy: the classic patient with wider organ placement and size, organ shapes beyond
    ellipsoids (`_shape_organs`) and pelvic distractors.

    Real livers reach below the kidneys' upper poles laterally and spleens lie lower and more lateral than the
    classic layout's; real scans below the kidneys show a bladder and femoral heads that a network must not take
    for organs (../shared/SIM2REAL.md, pitfall 2). Draws from its own stream (`ANATOMY_STREAM`), after the
    classic ones, so the classic patient and look are unchanged.
    """
    rng = np.random.default_rng([seed, ANATOMY_STREAM])
    moves = {  # name: (extra shift std mm, systematic shift range (x, y, z) mm, scale range per axis)
        # The liver's right lobe may reach the kidneys' lower poles (a low liver, a Riedel lobe), the spleen may lie
        # beside the upper half of the left kidney, posterolateral against the ribs, and the kidneys move a vertebra
        # up or down on their own: the network must find each organ by its look, not its height.
        "liver_right": (6.0, ((-8, 4), (-6, 10), (-55, 0)), (0.88, 1.2)),
        "liver_left": (6.0, ((-10, 10), (-6, 6), (-15, 5)), (0.8, 1.25)),
        "spleen": (5.0, ((-4, 10), (0, 16), (-70, 5)), (0.95, 1.4)),  # more lateral: cut by the cavity wall
        "right_kidney": (6.0, ((-6, 6), (-6, 6), (-30, 25)), (0.85, 1.12)),
        "left_kidney": (6.0, ((-6, 6), (-6, 6), (-30, 25)), (0.85, 1.12)),
        "gallbladder": (5.0, ((-8, 8), (-8, 8), (-15, 10)), (0.8, 1.25)),
    }
    ellipsoids = dict(anatomy.ellipsoids)
    for name, (std, shift, scale) in moves.items():
        e = ellipsoids[name]
        centre = e.centre + rng.normal(0, std, 3) + np.array([rng.uniform(*r) for r in shift])
        if name == "spleen":  # a low spleen lies lateral to the left kidney's upper half, not on it: this turns the
            centre[0] += 0.25 * max(0.0, e.centre[2] - centre[2])  # ray along which _against_the_wall places it
        half = e.half * rng.uniform(*scale, 3)
        ellipsoids[name] = replace(e, centre=centre, half=half)
    ellipsoids["spleen"] = _against_the_wall(ellipsoids["spleen"], rng)
    bladder = Ellipsoid(np.array([rng.normal(0, 8), rng.uniform(-45, -15), rng.uniform(-215, -175)]),
                        np.array([45.0, 32.0, 32.0]) * rng.uniform(0.45, 1.3, 3), _rotation((rng.normal(0, 10), 0, 0)))
    heads = tuple(Ellipsoid(np.array([side * rng.uniform(80, 95), rng.uniform(0, 20), rng.uniform(-265, -240)]),
                            np.full(3, rng.uniform(21, 27)), np.eye(3)) for side in (-1, 1))
    distractors = ((bladder, BOWEL_CONTENT), *((head, BONE) for head in heads))
    return _shape_organs(replace(anatomy, ellipsoids=ellipsoids, distractors=distractors), rng)


def _against_the_wall(spleen: Ellipsoid, rng: np.random.Generator) -> Ellipsoid:
    """The spleen along the posterolateral cavity wall: its long axis tangent to the wall, its thin axis along the
    wall's normal, its outer face 0-8 mm inside the wall (the classic layout points the long axis through the wall,
    so the wall cuts off much of it)."""
    a, b = CAVITY_HALF
    u = np.array([spleen.centre[0], spleen.centre[1] - CAVITY_Y])
    wall = u / math.sqrt((u[0] / a) ** 2 + (u[1] / b) ** 2)  # where the ray from the cavity's centre meets the wall
    normal = np.array([wall[0] / a**2, wall[1] / b**2])
    normal /= np.linalg.norm(normal)
    inset = spleen.half[0] + rng.uniform(0, 8)
    centre = spleen.centre.copy()
    centre[:2] = wall - normal * inset + np.array([0, CAVITY_Y])
    # _rotation's first angle turns local x (the thin axis) to (cos, sin): the wall's normal.
    angle = math.degrees(math.atan2(normal[1], normal[0])) + rng.normal(0, 8)
    return replace(spleen, centre=centre, rot=_rotation((angle, rng.normal(0, 6), 10 + rng.normal(0, 6))))


def _at_height(tube: Tube, z: float) -> np.ndarray:
    """The point of the tube's centre line nearest to height `z`."""
    return tube.points[np.argmin(np.abs(tube.points[:, 2] - z))]


def _offset(e: Ellipsoid, local: tuple[float, float, float], half: np.ndarray) -> Ellipsoid:
    """An ellipsoid in `e`'s own frame: centre at `local` half-axes of `e`, half-axes `half`, same rotation."""
    return Ellipsoid(e.centre + e.rot @ (np.asarray(local) * e.half), np.asarray(half, float), e.rot, e.warp)


def _shape_organs(anatomy: Anatomy, rng: np.random.Generator) -> Anatomy:
    """Shapes beyond ellipsoids (issue 26, item 2), drawn after the varied placement from the same stream.

    - The spleen is a crescent: its medial (hilar) face is carved by an ellipsoid beside it, so it is concave
      towards the stomach and the kidney and convex against the ribs (its axial section is a bean or a comma).
    - Each kidney is a bean: an anteromedial renal sinus is carved out (fat, left unlabelled as in FLARE22's and
      TotalSegmentator's masks), and a renal vein and artery run from it to the IVC and the aorta (enhanced blood,
      unlabelled: bright tubes that are neither aorta nor IVC).
    - The liver gets a caudate lobe beside the IVC, most of the time.
    """
    e, t = anatomy.ellipsoids, anatomy.tubes
    spleen = e["spleen"]
    depth = rng.uniform(1.1, 1.6)  # the hilar face reaches 0.1-0.6 of the spleen's half-thickness from its centre
    carve = {"spleen": _offset(spleen, (-depth - 0.5, rng.uniform(-0.25, 0.25), rng.uniform(-0.2, 0.2)),
                               spleen.half * np.array([1.5, rng.uniform(0.55, 0.8), rng.uniform(0.7, 0.95)]))}
    vessels = []
    for name, side in (("right_kidney", -1), ("left_kidney", 1)):
        k = e[name]
        # Medial is -side in x; the kidney's rotation turns the hilum anteromedially.
        sinus = Ellipsoid(k.centre + np.array([-side * k.half[0] * rng.uniform(0.55, 0.8),
                                               -k.half[1] * rng.uniform(0.1, 0.3), rng.normal(0, 4)]),
                          k.half * np.array([rng.uniform(0.4, 0.55), rng.uniform(0.3, 0.45), rng.uniform(0.3, 0.45)]),
                          k.rot)
        carve[name] = sinus
        hilum = sinus.centre
        for target, radius in ((t["ivc"], rng.uniform(4.0, 6.5)), (t["aorta"], rng.uniform(2.5, 4.0))):
            point = _at_height(target, hilum[2])
            mid = (hilum + point) / 2 + np.array([0, rng.normal(-6, 3), rng.normal(0, 4)])
            path, radii = _smooth_path([tuple(hilum), tuple(mid), tuple(point)], [radius, radius, radius])
            vessels.append(Tube(path, radii))
    caudate = None
    if rng.random() < 0.8:
        ivc = t["ivc"]
        at = _at_height(ivc, rng.uniform(55, 90))
        caudate = Ellipsoid(at + np.array([rng.uniform(12, 22), rng.uniform(-18, -10), 0]),
                            np.array([rng.uniform(12, 20), rng.uniform(10, 15), rng.uniform(20, 32)]),
                            _rotation((rng.normal(0, 10), 0, 0)))
    return replace(anatomy, carve=carve, caudate=caudate, renal_vessels=tuple(vessels))


# ----------------------------------------------------------------------------------------------
# Case parameters: the patient, and the scan (training/acquisition.py) around it
# ----------------------------------------------------------------------------------------------
def sample_case_params(seed: int, domain: DomainConfig, size: str = "small", *, geometry: str | None = None,
                       acquisition: AcquisitionConfig | None = None) -> CaseParams:
    """Draw the patient-level and acquisition parameters of case `seed` (no voxels)."""
    params, _ = _sample(seed, domain, size, geometry, acquisition)
    return params


def _body_width_mm(scale: np.ndarray, fat_mm: float) -> float:
    return 2 * ((CAVITY_HALF[0] + WALL_MM) * scale[0] + fat_mm + SKIN_MM)


def _sample(seed: int, domain: DomainConfig, size: str, geometry: str | None,
            acquisition: AcquisitionConfig | None = None) -> tuple[CaseParams, np.random.Generator]:
    """The case's parameters and its main stream, positioned for the anatomy draws.

    The main stream draws in the order the generator always used (the bundled examples depend on
    it); acquisition variation comes from its own stream and only changes the grid's field of
    view, centring and z-range.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, found {size!r}")
    rng = np.random.default_rng(seed)
    phase = str(rng.choice(domain.phases, p=np.array(domain.phase_weights) / sum(domain.phase_weights)))
    scale = rng.uniform(*domain.anatomy_scale) * rng.uniform(0.97, 1.03, 3)
    fat_mm = float(rng.uniform(*domain.fat_mm))
    centre = np.array([rng.uniform(-30, 30), rng.uniform(-250, 50), rng.uniform(-1200, 200)])
    drawn = str(rng.choice(GEOMETRIES, p=scan.GEOMETRY_WEIGHTS))
    geometry = geometry or drawn
    direction = scan.draw_direction(rng, geometry)
    plan = scan.draw_scan_plan(rng, SIZES[size], fov_margin=domain.fov_margin, scan_top_mm=domain.scan_top_mm,
                          scan_bottom_mm=domain.scan_bottom_mm, scale_z=float(scale[2]))
    acq = scan.draw_acquisition(seed, acquisition) if acquisition is not None else None
    body_width = _body_width_mm(scale, fat_mm)
    if acq is not None:
        plan = scan.vary_scan_plan(plan, acq, body_width_mm=body_width, scale_z=float(scale[2]))
    grid = scan.grid_for(plan, SIZES[size], body_width_mm=body_width, centre=centre, direction=direction)
    params = CaseParams(
        seed=seed, domain=domain.name, size=size, phase=phase, noise_std_hu=float(rng.uniform(*domain.noise_std_hu)),
        contrast_gain=float(rng.uniform(*domain.contrast_gain)), scale_xyz=tuple(float(s) for s in scale),
        fat_mm=fat_mm, centre_xyz=tuple(float(c) for c in centre), geometry=geometry,
        pixel_type=str(rng.choice(scan.PIXEL_TYPES, p=scan.PIXEL_TYPE_WEIGHTS)), grid=grid, acquisition=acq,
    )
    return params, rng


# ----------------------------------------------------------------------------------------------
# Painting the tissue map
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Frame:
    """Index -> anatomical coordinates: a = (origin + M @ ijk - centre) / scale."""

    matrix: np.ndarray  # (3, 3) physical per index step
    offset: np.ndarray  # (3,) origin - centre
    scale: np.ndarray  # (3,)
    size_xyz: np.ndarray  # (3,)

    @classmethod
    def of(cls, params: CaseParams) -> _Frame:
        """The frame of a case's grid, patient centre and scale."""
        g = params.grid
        return cls(g.matrix, np.array(g.origin_xyz) - np.array(params.centre_xyz), np.array(params.scale_xyz),
                   np.array(g.size_xyz))

    def coords(self, box: tuple[slice, slice, slice]) -> list[np.ndarray]:
        """Anatomical x, y, z (float32) for the voxels of the (z, y, x) index `box`.

        Each array broadcasts to the box's shape but only varies along the index axes it depends
        on: on an axis-aligned grid (identity, flips, permutations) x, y and z are 1D each, so
        whatever depends on (x, y) only (body outline, spine) is computed once per slice plane.
        """
        ks, js, is_ = (np.arange(s.start, s.stop, dtype=np.float64) for s in box)
        out = []
        for ax in range(3):
            m = self.matrix[ax] / self.scale[ax]
            c = np.float32(self.offset[ax] / self.scale[ax])
            for coef, idx, shape in ((m[0], is_, (1, 1, -1)), (m[1], js, (1, -1, 1)), (m[2], ks, (-1, 1, 1))):
                if abs(coef) > 1e-9:
                    c = c + (coef * idx).astype(np.float32).reshape(shape)
            out.append(np.asarray(c, np.float32).reshape((1, 1, 1)) if np.ndim(c) == 0 else c)
        return out

    def z_range(self) -> tuple[float, float]:
        """Lowest and highest anatomical z of the grid's corners."""
        corners = np.array([[i, j, k] for i in (0, self.size_xyz[0] - 1) for j in (0, self.size_xyz[1] - 1)
                            for k in (0, self.size_xyz[2] - 1)], float)
        z = ((corners @ self.matrix.T)[:, 2] + self.offset[2]) / self.scale[2]
        return float(z.min()) - 1.0, float(z.max()) + 1.0

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index box (z, y, x slices) containing the anatomical box [lo, hi], or None if outside the grid."""
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        ijk = np.linalg.solve(self.matrix, (corners * self.scale - self.offset).T)  # (3, 8)
        start = np.clip(np.floor(ijk.min(1)).astype(int) - 1, 0, self.size_xyz)
        stop = np.clip(np.ceil(ijk.max(1)).astype(int) + 2, 0, self.size_xyz)
        if (stop <= start).any():
            return None
        return slice(start[2], stop[2]), slice(start[1], stop[1]), slice(start[0], stop[0])


def _paint(tissue: np.ndarray, box, codes: np.ndarray, inside: np.ndarray, allowed: np.ndarray | None) -> None:
    """tissue[box] = codes where inside (and the current tissue is allowed to be overwritten)."""
    view = tissue[box]
    inside = np.broadcast_to(inside, view.shape)
    mask = inside if allowed is None else inside & allowed[view]
    view[mask] = np.broadcast_to(codes, view.shape)[mask] if isinstance(codes, np.ndarray) else codes


def _paint_body(tissue: np.ndarray, frame: _Frame, anatomy: Anatomy, fat_mm: float) -> None:
    """Body layers and ribs slab by slab (they span every voxel), then spine and pelvis in their boxes."""
    nz = tissue.shape[0]
    sx, sy = frame.scale[0], frame.scale[1]
    for k0 in range(0, nz, 32):
        box = (slice(k0, min(nz, k0 + 32)), slice(0, tissue.shape[1]), slice(0, tissue.shape[2]))
        x, y, z = frame.coords(box)
        out = tissue[box]
        x2, y2 = x * x, (y - np.float32(CAVITY_Y)) ** 2
        layers = np.full(np.broadcast_shapes(x.shape, y.shape), AIR, np.uint8)  # (x, y) only
        for grow_mm, code in ((WALL_MM + fat_mm + SKIN_MM, SKIN), (WALL_MM + fat_mm, FAT), (WALL_MM, WALL_MUSCLE),
                              (0.0, CAVITY_FAT)):
            # Inside the cavity ellipse grown by grow_mm physical mm (the wall scales with the patient).
            gx = WALL_MM + (grow_mm - WALL_MM) / sx if grow_mm else 0.0
            gy = WALL_MM + (grow_mm - WALL_MM) / sy if grow_mm else 0.0
            cx, cy = np.float32((CAVITY_HALF[0] + gx) ** -2), np.float32((CAVITY_HALF[1] + gy) ** -2)
            layers[x2 * cx + y2 * cy < 1] = code
        out[...] = layers
        band = layers == WALL_MUSCLE
        # Ribs: oblique bands in the wall above the lower costal margin, not across the anterior midline.
        rib = band & (((z + 0.3 * y) / np.float32(24)) % 1 < 0.33) & (z > -35 + 0.4 * np.abs(x))
        rib &= ~((y < -30) & (np.abs(x) < 60))
        _set(out, rib, BONE)
    z_lo, z_hi = frame.z_range()
    regions = (((-70, 10, z_lo), (70, 110, z_hi), _paint_spine), ((-140, 0, z_lo), (140, 80, -115), _paint_pelvis))
    for lo, hi, paint in regions:
        box = frame.box(np.array(lo, float), np.array(hi, float))
        if box is not None:
            paint(tissue[box], *frame.coords(box), anatomy)


def _set(out: np.ndarray, mask: np.ndarray, code: int) -> None:
    """out[mask] = code, with `mask` broadcast to out's shape (it may vary along fewer axes)."""
    out[np.broadcast_to(mask, out.shape)] = code


def _paint_spine(out: np.ndarray, x, y, z, anatomy: Anatomy) -> None:
    ax = np.abs(x)
    psoas_r = np.clip((20 - z) * 0.16, 0, 26)  # psoas grows from L1 downwards
    _set(out, ((ax - 40) ** 2 + (y - 38) ** 2 < psoas_r**2), MUSCLE)
    _set(out, ((ax - 34) / 24) ** 2 + ((y - 85) / 20) ** 2 < 1, MUSCLE)  # erector spinae
    level = ((z + np.float32(anatomy.vertebra_phase_mm)) / np.float32(32)) % 1
    body = ((x / 22) ** 2 + ((y - 40) / 18) ** 2)
    _set(out, body < 1, CORTEX_BONE)
    _set(out, body < 0.78, BONE)
    _set(out, (body < 1) & (level < 0.2), DISC)
    arch = (x / 22) ** 2 + ((y - 72) / 16) ** 2 < 1
    spinous = ((x / 5) ** 2 + ((y - 92) / 14) ** 2 < 1) & (level > 0.3)
    _set(out, (arch | spinous) & (level > 0.15), BONE)
    _set(out, (x / 9) ** 2 + ((y - 68) / 8) ** 2 < 1, CSF)


def _paint_pelvis(out: np.ndarray, x, y, z, anatomy: Anatomy) -> None:
    ax = np.abs(x)
    low = z < -115
    outer = ((ax - 88) / 48) ** 2 + ((y - 40) / 34) ** 2 < 1
    inner = ((ax - 80) / 39) ** 2 + ((y - 34) / 25) ** 2 < 1
    _set(out, low & outer & ~inner, BONE)
    sacrum = (z < -150) & ((x / 45) ** 2 + ((y - 55) / 20) ** 2 < 1)
    _set(out, sacrum, BONE)


def _paint_shape(tissue, frame: _Frame, shape, fn, allowed) -> None:
    """Evaluate `fn(coords, frame, box) -> (inside, codes)` on the shape's index box and paint it."""
    box = frame.box(*shape.aabb())
    if box is None:
        return
    inside, codes = fn(frame.coords(box), frame, box)
    _paint(tissue, box, codes, inside, allowed)


def _paint_bowel(tissue: np.ndarray, frame: _Frame, anatomy: Anatomy) -> None:
    """Small-bowel loops, fluid and gas pockets: iso-bands of a random smooth field in the lower cavity."""
    box = frame.box(np.array([-140.0, -105, -300]), np.array([140.0, 60, 25]))
    if box is None:
        return
    x, y, z = frame.coords(box)
    f = sum(np.sin(w[0] * x + w[1] * y + w[2] * z + np.float32(w[3])) for w in anatomy.bowel_waves.astype(np.float32))
    f = f / np.float32(len(anatomy.bowel_waves))
    codes = np.full(f.shape, BOWEL_WALL, np.uint8)
    codes[f > 0.28] = BOWEL_CONTENT
    codes[f > 0.6] = GAS
    inside = (f > 0.12) & (z < 25 - 0.3 * np.maximum(y, 0))
    _paint(tissue, box, codes, inside, _CAVITY_ONLY)


def _organ_painters(anatomy: Anatomy) -> list[tuple[object, object, np.ndarray | None]]:
    """(shape, fn, allowed) in painting order: later organs overwrite earlier ones where they meet."""
    e, t = anatomy.ellipsoids, anatomy.tubes

    def solid(shape, code):
        if isinstance(shape, Tube):
            return shape, lambda a, f, b: (shape.signed_distance(a, f, b) < 0, code)
        return shape, lambda a, f, b: (shape.radius(a) < 1, code)

    def halo(shape: Ellipsoid, mm: float):  # perirenal / periadrenal fat
        grown = replace(shape, half=shape.half + mm)
        return grown, lambda a, f, b: (grown.radius(a) < 1, CAVITY_FAT)

    def tube_halo(shape: Tube, mm: float):  # a fat plane between a hollow organ and the look-alike bowel
        grown = replace(shape, radii=shape.radii + mm)
        return grown, lambda a, f, b: (grown.signed_distance(a, f, b) < 0, CAVITY_FAT)

    def carved(name: str, inside: np.ndarray, a: list[np.ndarray]) -> np.ndarray:
        cut = anatomy.carve.get(name)
        return inside if cut is None else inside & ~(cut.radius(a) < 1)

    def kidney(name: str, cortex: int, medulla: int):
        shape = e[name]

        def fn(a, f, b):
            r = shape.radius(a)
            return carved(name, r < 1, a), np.where(r < 0.72, medulla, cortex).astype(np.uint8)
        return shape, fn

    def spleen(shape: Ellipsoid):
        return shape, lambda a, f, b: (carved("spleen", shape.radius(a) < 1, a), SPLEEN)

    def hollow(shape: Tube, wall_mm: float, wall: int, content: int, gas: int | None, gas_y: float):
        def fn(a, f, b):
            sd = shape.signed_distance(a, f, b)
            codes = np.where(sd < -wall_mm, content, wall).astype(np.uint8)
            if gas is not None:
                codes[(sd < -wall_mm) & (a[1] < gas_y)] = gas
            return sd < 0, codes
        return shape, fn

    def liver(shape: Ellipsoid):
        # The visceral surface slopes: the right lobe reaches lowest laterally, the medial liver ends
        # higher (a wedge in coronal view rather than an egg).
        def fn(a, f, b):
            floor = np.float32(shape.centre[2] - 85) + np.float32(0.4) * (a[0] - np.float32(shape.centre[0] - 75))
            return (shape.radius(a) < 1) & (a[2] > floor), LIVER
        return shape, fn

    def esophagus(shape: Tube):
        def fn(a, f, b):
            sd = shape.signed_distance(a, f, b)
            air = (sd < -5.5) if anatomy.esophagus_air else np.zeros(sd.shape, bool)
            return sd < 0, np.where(air, ESO_AIR, ESO_WALL).astype(np.uint8)
        return shape, fn

    allowed_organ = ~_ORGAN_FORBIDDEN
    bowel = np.zeros(N_TISSUES, bool)
    bowel[[BOWEL_WALL, BOWEL_CONTENT, GAS, STOOL]] = True
    lung_ok = np.zeros(N_TISSUES, bool)
    lung_ok[[CAVITY_FAT, BOWEL_WALL, BOWEL_CONTENT, GAS, STOOL]] = True
    steps = [
        (*solid(t["colon"], STOOL), lung_ok),
        (*solid(e["lung_right"], LUNG), lung_ok),
        (*solid(e["lung_left"], LUNG), lung_ok),
        (*solid(e["heart"], BLOOD), allowed_organ),
        (*liver(e["liver_right"]), allowed_organ),
        (*solid(e["liver_left"], LIVER), allowed_organ),
        *(((*solid(anatomy.caudate, LIVER), allowed_organ),) if anatomy.caudate is not None else ()),
        (*esophagus(t["esophagus"]), allowed_organ),
        (*tube_halo(t["stomach"], 4.0), bowel),
        (*hollow(t["stomach"], 5.0, STOMACH_WALL, STOMACH_CONTENT, STOMACH_GAS, anatomy.stomach_gas_y), allowed_organ),
        (*spleen(e["spleen"]), allowed_organ),
        (*halo(e["right_kidney"], 6.0), allowed_organ),
        (*halo(e["left_kidney"], 6.0), allowed_organ),
        (*kidney("right_kidney", RK_CORTEX, RK_MEDULLA), allowed_organ),
        (*kidney("left_kidney", LK_CORTEX, LK_MEDULLA), allowed_organ),
        *((*solid(vessel, BLOOD), allowed_organ) for vessel in anatomy.renal_vessels),
        (*solid(t["pancreas"], PANCREAS), allowed_organ),
        (*tube_halo(t["duodenum"], 4.0), bowel),
        (*hollow(t["duodenum"], 3.5, DUO_WALL, DUO_CONTENT, DUO_GAS, anatomy.duodenum_gas_y), allowed_organ),
        (*solid(e["gallbladder"], GALLBLADDER), allowed_organ),
        (*solid(t["ivc"], IVC), allowed_organ),
        (*solid(t["aorta"], AORTA), allowed_organ),
        (*halo(e["right_adrenal"], 4.0), allowed_organ),
        (*halo(e["left_adrenal"], 4.0), allowed_organ),
        (*solid(e["right_adrenal"], R_ADRENAL), allowed_organ),
        (*solid(e["left_adrenal"], L_ADRENAL), allowed_organ),
    ]
    return steps


def _tissue_map(params: CaseParams, anatomy: Anatomy) -> np.ndarray:
    frame = _Frame.of(params)
    tissue = np.empty(params.grid.size_xyz[::-1], np.uint8)  # (z, y, x) in index order
    _paint_body(tissue, frame, anatomy, params.fat_mm)
    _paint_bowel(tissue, frame, anatomy)
    for shape, code in anatomy.distractors:  # before the organs: they never cover one
        _paint_shape(tissue, frame, shape, lambda a, f, b, shape=shape, code=code: (shape.radius(a) < 1, code),
                     _DISTRACTOR_OK)
    for shape, fn, allowed in _organ_painters(anatomy):
        _paint_shape(tissue, frame, shape, fn, allowed)
    if params.acquisition is not None and params.acquisition.table is not None:
        _paint_table(tissue, params)
    return tissue


def _paint_table(tissue: np.ndarray, params: CaseParams) -> None:
    """The patient table under the body's back (on air only): background, like the air it replaces."""
    sx, sy = params.scale_xyz[:2]
    cx, cy = params.centre_xyz[:2]
    body = scan.BodyBox(centre_x=cx, half_width=_body_width_mm(np.array(params.scale_xyz), params.fat_mm) / 2,
                   back_y=cy + sy * (CAVITY_Y + CAVITY_HALF[1] + WALL_MM) + params.fat_mm + SKIN_MM)
    scan.paint_table(tissue, params.grid, params.acquisition.table, body, tissue == AIR, (TABLE_FOAM, TABLE_PLATE))


# ----------------------------------------------------------------------------------------------
# Intensities
# ----------------------------------------------------------------------------------------------
def _hu_table(params: CaseParams, rng: np.random.Generator, domain: DomainConfig) -> np.ndarray:
    phase = PHASES.index(params.phase)
    table = np.zeros(N_TISSUES, np.float32)
    for code, value in HU_FIXED.items():
        table[code] = value
    for code, values in HU_BY_PHASE.items():
        table[code] = values[0] + params.contrast_gain * (values[phase] - values[0])
    jitter = np.zeros(N_TISSUES, np.float32)
    jitter[:N_ANATOMY_TISSUES] = rng.normal(0, domain.hu_jitter_hu, N_ANATOMY_TISSUES)
    table_spec = params.acquisition.table if params.acquisition is not None else None
    if table_spec is not None:
        table[TABLE_FOAM], table[TABLE_PLATE] = table_spec.foam_hu, table_spec.plate_hu
    soft = (table > -200) & (table < 400)  # air, lung and bone keep their physics
    table[soft] += jitter[soft]
    return table


def _intensities(tissue: np.ndarray, params: CaseParams, rng: np.random.Generator, domain: DomainConfig) -> np.ndarray:
    """HU volume (z, y, x float32): tissue means, texture and scanner noise, then the reconstruction.

    The scanner noise goes in before the partial-volume blur (one random field for texture and
    noise, half the cost), so it comes out spatially correlated as real CT noise is; its std before
    the blur is raised so that after it the noise has `params.noise_std_hu`. A sharp kernel
    (unsharp mask, acquisition.reconstruct) then raises edges and noise, as on a real scanner.
    """
    acq = params.acquisition
    sigma_zyx = scan.blur_sigma_zyx(params.grid.spacing_xyz, acq.blur_scale if acq is not None else 1.0)
    pre_noise = params.noise_std_hu / scan.noise_gain(sigma_zyx, 2.0)
    amplitude = np.sqrt(TEXTURE_HU**2 + np.float32(pre_noise) ** 2).astype(np.float32)
    hu = _hu_table(params, rng, domain)[tissue]
    hu += amplitude[tissue] * rng.standard_normal(tissue.shape, dtype=np.float32)
    hu = scan.reconstruct(hu, sigma_zyx, acq.sharp_gain if acq is not None else 0.0)
    return np.clip(hu, -1024, 3071, out=hu)


# The randomised look's tissue groups: SynthSeg-random means for "soft" (organs, muscle, bowel, blood), fat and
# bone each in their own range; air, gas, lung and the table keep their physics.
_LOOK_GROUPS = {name: np.zeros(N_TISSUES, bool) for name in ("soft", "fat", "bone")}
_LOOK_GROUPS["fat"][[FAT, CAVITY_FAT]] = True
_LOOK_GROUPS["bone"][[BONE, CORTEX_BONE]] = True
_LOOK_GROUPS["soft"][[SKIN, WALL_MUSCLE, MUSCLE, BOWEL_WALL, BOWEL_CONTENT, BLOOD, DISC, CSF, STOOL]] = True
_LOOK_GROUPS["soft"][LIVER:N_ANATOMY_TISSUES] = True
for _gas in (ESO_AIR, STOMACH_GAS, DUO_GAS):
    _LOOK_GROUPS["soft"][_gas] = False
# Grain (white, before the blur) kept in the randomised look where it is structure, not scanner noise.
_LOOK_GRAIN_HU = np.zeros(N_TISSUES, np.float32)
_LOOK_GRAIN_HU[[LUNG, GAS, STOOL, BONE, CORTEX_BONE]] = TEXTURE_HU[[LUNG, GAS, STOOL, BONE, CORTEX_BONE]]


def _randomised_intensities(tissue: np.ndarray, params: CaseParams) -> np.ndarray:
    """HU volume of the randomised look (training/intensity.py), from the case's own look stream."""
    rng = look.look_rng(params.seed)
    phase = PHASES.index(params.phase)
    prior, plain = np.zeros(N_TISSUES, np.float32), np.zeros(N_TISSUES, np.float32)
    for code, value in HU_FIXED.items():
        prior[code] = plain[code] = value
    for code, values in HU_BY_PHASE.items():
        prior[code], plain[code] = values[phase], values[0]
    table_spec = params.acquisition.table if params.acquisition is not None else None
    if table_spec is not None:
        prior[TABLE_FOAM], prior[TABLE_PLATE] = table_spec.foam_hu, table_spec.plate_hu
    means, _ = look.draw_means(rng, look.RANDOMISED, prior, plain, _LOOK_GROUPS)
    acq = params.acquisition
    sigma_zyx = scan.blur_sigma_zyx(params.grid.spacing_xyz, acq.blur_scale if acq is not None else 1.0)
    spacing_zyx = tuple(float(s) for s in params.grid.spacing_xyz[::-1])

    def reconstruct(hu: np.ndarray) -> np.ndarray:
        hu += _LOOK_GRAIN_HU[tissue] * rng.standard_normal(tissue.shape, dtype=np.float32)
        return scan.reconstruct(hu, sigma_zyx, acq.sharp_gain if acq is not None else 0.0)

    hu = look.render(tissue, means, spacing_zyx, rng, look.RANDOMISED, vessel_codes=(LIVER, SPLEEN),
                     reconstruct=reconstruct)
    return np.clip(hu, -1024, 3071, out=hu)


def _to_image(arr_zyx: np.ndarray, grid: Grid) -> sitk.Image:
    img = sitk.GetImageFromArray(arr_zyx)
    img.SetSpacing(grid.spacing_xyz)
    img.SetOrigin(grid.origin_xyz)
    img.SetDirection(grid.direction)
    return img


def generate_case(seed: int, domain: DomainConfig = LABELLED_DOMAIN, size: str = "small", *,
                  geometry: str | None = None,
                  acquisition: AcquisitionConfig | None = None) -> tuple[sitk.Image, sitk.Image]:
    """One synthetic CT and its label (uint8 0..13) on exactly the same grid.

    Args:
        seed: the case's seed; the same seed (and domain, size, geometry) gives identical voxels.
        domain: LABELLED_DOMAIN (narrow) or WIDE_DOMAIN (unlabelled and validation), or your own.
        size: "small" (tests, quick runs) or "full" (FLARE22-like 0.6-1.0 mm, up to 512 x 512).
        geometry: force a direction kind from GEOMETRIES instead of drawing it.
        acquisition: acquisition variation (field of view, padding, table, kernel, z-coverage), e.g.
            acquisition.WIDE_ACQUISITION; None (default) gives a clean scan. The patient is the same either way.
    """
    image, label, _ = _generate(seed, domain, size, geometry, acquisition)
    return image, label


def case_from_record(record: dict) -> tuple[sitk.Image, sitk.Image]:
    """Regenerate a case of a written set from its dataset.json record (`meta["cases"][name]`): same voxels.

    The record names the domain, size, drawn geometry and acquisition (None for a clean scan), so
    the hidden truth of an "unlabelled" case comes out on exactly the grid of the file on disk.
    """
    acq = record.get("acquisition")
    return generate_case(record["seed"], DOMAINS[record["domain"]], record["size"], geometry=record["geometry"],
                         acquisition=scan.ACQUISITIONS[acq["config"]] if acq else None)


def _generate(seed: int, domain: DomainConfig, size: str, geometry: str | None,
              acquisition: AcquisitionConfig | None = None):
    params, rng = _sample(seed, domain, size, geometry, acquisition)
    anatomy = _sample_anatomy(rng)
    if domain.anatomy == "varied":
        anatomy = _vary_anatomy(anatomy, params.seed)
    tissue = _tissue_map(params, anatomy)
    if domain.intensity == "randomised":
        hu = _randomised_intensities(tissue, params)
    else:
        hu = _intensities(tissue, params, rng, domain)
    label = ORGAN_OF[tissue]
    if params.acquisition is not None and params.acquisition.padding is not None:
        scan.pad_circle_arrays(hu, label, params.grid, params.acquisition.padding)  # after the HU clip
    if params.pixel_type != "float32":
        hu = np.rint(hu).astype(params.pixel_type)
    return _to_image(hu, params.grid), _to_image(label, params.grid), params


# ----------------------------------------------------------------------------------------------
# Data sets on disk
# ----------------------------------------------------------------------------------------------
SPLITS = {"labelled": 1, "unlabelled": 2, "validation": 3, "examples": 4}
ACQUISITION_MODES = ("default", "none")


def case_seed(seed: int, split: str, index: int) -> int:
    """A case's seed from the set's seed: stable whatever the number of cases asked for."""
    return int(np.random.SeedSequence([seed, SPLITS[split], index]).generate_state(1)[0])


def write_image(image: sitk.Image, path: Path) -> None:
    """Write a .nii.gz atomically: temporary files beside the target, then rename.

    The NIfTI is written uncompressed and gzipped at level 1: twice as fast as SimpleITK's own
    compression for a full case (mostly incompressible noise), for files ~15% larger.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_name(f".tmp-{path.stem}")  # "x.nii.gz" -> ".tmp-x.nii"
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        sitk.WriteImage(image, str(raw), False)
        with open(raw, "rb") as src, open(tmp, "wb") as out:
            # No name and no time in the gzip header: the same case gives the same bytes.
            with gzip.GzipFile(filename="", mode="wb", compresslevel=1, fileobj=out, mtime=0) as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        tmp.replace(path)
    finally:
        raw.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)


def _case_record(params: CaseParams) -> dict:
    d = asdict(params)
    d["grid"] = asdict(params.grid)
    return d


def _jobs(labelled: int, unlabelled: int, validation: int) -> list[tuple[str, int, str, str | None]]:
    """(split, index, image path, label path or None) for every case of the set."""
    jobs = [("labelled", i, f"labelled/images/FLARE22_Tr_{i + 1:04d}_0000.nii.gz",
             f"labelled/labels/FLARE22_Tr_{i + 1:04d}.nii.gz") for i in range(labelled)]
    jobs += [("unlabelled", i, f"unlabelled/Case_{i + 1:05d}_0000.nii.gz", None) for i in range(unlabelled)]
    jobs += [("validation", i, f"validation/images/FLARETs_{i + 1:04d}_0000.nii.gz",
              f"validation/labels/FLARETs_{i + 1:04d}.nii.gz") for i in range(validation)]
    return jobs


def generate_dataset(out_dir: str | Path, *, labelled: int = 50, unlabelled: int = 200, validation: int = 20,
                     seed: int = 0, size: str = "full", acquisition: str = "default", intensity: str = "classic",
                     anatomy: str = "classic", progress: bool = True) -> dict:
    """Write a FLARE22-layout synthetic set and its dataset.json; returns the dataset.json content.

    `acquisition`: "default" varies the acquisition at each split's rates (acquisition.ACQUISITION_BY_SPLIT);
    "none" writes clean scans. `intensity`: "classic" or "randomised" (training/intensity.py's wide look: the
    same patients and scans as "classic", other HU, texture and noise). `anatomy`: "classic" or "varied" (wider
    organ placement and size, organ shapes, pelvic distractors; with the randomised look only).
    """
    if (intensity, anatomy) not in DOMAINS_BY_SPLIT:
        raise ValueError(f"(intensity, anatomy) must be one of {tuple(DOMAINS_BY_SPLIT)}, found {(intensity, anatomy)}")
    labelled_domain, wide_domain = DOMAINS_BY_SPLIT[intensity, anatomy]
    if acquisition not in ACQUISITION_MODES:
        raise ValueError(f"acquisition must be one of {ACQUISITION_MODES}, found {acquisition!r}")
    acq_by_split = scan.ACQUISITION_BY_SPLIT if acquisition == "default" else dict.fromkeys(scan.ACQUISITION_BY_SPLIT)
    out = Path(out_dir)
    jobs = _jobs(labelled, unlabelled, validation)
    cases = {}
    for split, index, image_rel, label_rel in _progress(jobs, progress, f"phantoms -> {out}"):
        domain = labelled_domain if split == "labelled" else wide_domain
        image, label, params = _generate(case_seed(seed, split, index), domain, size, None, acq_by_split[split])
        write_image(image, out / image_rel)
        if label_rel:
            write_image(label, out / label_rel)
        cases[Path(image_rel).name] = {"split": split, **_case_record(params)}
    meta = {
        "name": "FLARE22-style synthetic phantoms", "generator": "python -m training.phantoms",
        "seed": seed, "size": size, "labels": dict(LABEL_NAMES), "numTraining": labelled,
        "numUnlabelled": unlabelled, "numValidation": validation, "file_ending": ".nii.gz",
        "domains": {"labelled": asdict(labelled_domain), "unlabelled": asdict(wide_domain),
                    "validation": asdict(wide_domain)},
        "acquisition": {split: asdict(cfg) if cfg else None for split, cfg in acq_by_split.items()},
        "cases": cases,
    }
    tmp = out / ".dataset.json.tmp"
    out.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    tmp.replace(out / "dataset.json")
    return meta


EXAMPLES = (("FLARE22_Ex_0001", 0, "lps"), ("FLARE22_Ex_0002", 1, "oblique"))  # name, index, geometry


def generate_examples(out_dir: str | Path = "examples", *, seed: int = 0) -> list[Path]:
    """The bundled examples: small labelled-domain cases, one LPS and one oblique RAS-like grid."""
    out = Path(out_dir)
    written = []
    for name, index, geometry in EXAMPLES:
        image, label = generate_case(case_seed(seed, "examples", index), LABELLED_DOMAIN, "example", geometry=geometry)
        if image.GetPixelID() != sitk.sitkInt16:  # keep the examples small and in the common type
            image = sitk.Cast(image, sitk.sitkInt16)
        write_image(image, out / "inputs" / f"{name}_0000.nii.gz")
        write_image(label, out / "labels" / f"{name}.nii.gz")
        written += [out / "inputs" / f"{name}_0000.nii.gz", out / "labels" / f"{name}.nii.gz"]
    return written


def _progress(items: list, enabled: bool, title: str):
    if not enabled or len(items) < 4:
        yield from items
        return
    from rich.progress import Progress

    with Progress() as bar:
        task = bar.add_task(title, total=len(items))
        for item in items:
            yield item
            bar.advance(task)


class AcquisitionMode(str, Enum):
    default = "default"  # each split's acquisition variation (docs/PHANTOMS.md)
    none = "none"  # clean scans


class IntensityChoice(str, Enum):  # --intensity
    classic = "classic"  # one HU table per phase, white texture
    randomised = "randomised"  # training/intensity.py: SynthSeg-random or widened prior HU, texture, noise spectrum


class AnatomyChoice(str, Enum):  # --anatomy
    classic = "classic"
    varied = "varied"  # wider placement and size, organ shapes, bladder, femoral heads (with --intensity randomised)


class SizeChoice(str, Enum):  # --size: listed in --help, checked by click
    small = "small"
    full = "full"


class LayoutChoice(str, Enum):  # --layout
    flare22 = "flare22"
    examples = "examples"


def main(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="folder to write (FLARE22 layout: labelled/, "
                                            "unlabelled/, validation/, dataset.json)", show_default=False)],
    labelled: Annotated[int, typer.Option(help="labelled CTs with labels (the narrow domain)")] = 50,
    unlabelled: Annotated[int, typer.Option(help="unlabelled CTs (the wide domain)")] = 200,
    validation: Annotated[int, typer.Option(help="validation CTs with labels (the wide domain)")] = 20,
    seed: Annotated[int, typer.Option(help="the set's seed: the same seed writes the same files")] = 0,
    size: Annotated[SizeChoice, typer.Option(help="small: 128-160 px at 2.2-3.2 mm in-plane, for tests and CPU "
                                             "training; full: FLARE22-like 384-512 px at 0.6-1.0 mm "
                                             "(docs/PHANTOMS.md)")] = SizeChoice.small,
    layout: Annotated[LayoutChoice, typer.Option(help="flare22: a dataset; examples: regenerate the bundled "
                                                 "examples/ (counts and --size ignored)")] = LayoutChoice.flare22,
    acquisition: Annotated[AcquisitionMode, typer.Option(help="default: field of view, padding, table, kernel and "
                                                         "z-coverage vary at each split's rates; none: clean "
                                                         "scans")] = AcquisitionMode.default,
    intensity: Annotated[IntensityChoice, typer.Option(help="classic: one HU table per contrast phase; randomised: "
                                                       "HU, texture and noise drawn wide per case "
                                                       "(training/intensity.py)")] = IntensityChoice.classic,
    anatomy: Annotated[AnatomyChoice, typer.Option(help="classic: the fixed layout with small jitter; varied: wider "
                                                   "organ placement and size, a crescent spleen, kidneys with a "
                                                   "sinus and renal vessels, a caudate lobe, bladder and femoral "
                                                   "heads (needs --intensity randomised)")] = AnatomyChoice.classic,
) -> None:
    """Generate a synthetic FLARE22-style set (layout flare22) or the bundled examples (layout examples).

    --acquisition default varies field of view, padding, table, kernel and z-coverage at each split's
    rates; none writes clean scans. The bundled examples are always clean. --intensity randomised draws each
    case's HU, texture and noise wide (training/intensity.py; docs/PHANTOMS.md), for training that must
    transfer to real CT.
    """
    size, layout = SizeChoice(size).value, LayoutChoice(layout).value  # the enums or their strings
    t0 = time.perf_counter()
    if layout == "examples":
        paths = generate_examples(out_dir, seed=seed)
        typer.echo(f"wrote {len(paths)} files under {out_dir} in {time.perf_counter() - t0:.1f} s")
        return
    meta = generate_dataset(out_dir, labelled=labelled, unlabelled=unlabelled, validation=validation,
                            seed=seed, size=size, acquisition=acquisition.value,
                            intensity=IntensityChoice(intensity).value, anatomy=AnatomyChoice(anatomy).value)
    typer.echo(f"wrote {len(meta['cases'])} cases to {out_dir} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    from training.cli import typer_app

    app = typer_app()
    app.command()(main)
    app()
