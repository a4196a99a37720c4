"""DICOM CT series as cases: find the series in a folder tree, check each, read it as the `sitk.Image` the NIfTI
path gives (so `flare_infer.pipeline` never knows the difference).

    python -m flare_infer predict DICOM_DIR OUTPUT_DIR [--output-format nifti|dicom-seg|rtstruct] [--statistics]

The CLI comes here only when INPUT_DIR holds no `*.nii.gz` / `*.nii`; pydicom (the `dicom` extra) is imported then.

- Every file below INPUT_DIR (hidden files and folders left out) with the DICOM preamble is read, header only;
  files without it are ignored, counted in one log line. Each SeriesInstanceUID is one series.
- Skipped, with one `SKIP` line each (not a failure): another modality than CT, another SOP class than CT Image
  Storage (secondary captures, dose reports, Enhanced CT), localizers/scouts (ImageType LOCALIZER), single images.
- Refused when read, with one `ERROR <case>: <reason>` line (a failed case): slices of different size, spacing or
  orientation; two images at one position; missing slices; uneven spacing; a gantry tilt (slice positions not along
  the slice normal: the stack is sheared, which an image grid cannot hold); a file whose pixel data is missing,
  truncated or in a transfer syntax no installed decoder reads (the reason names the file).
- Case names (the output stems): `<PatientID>_<SeriesNumber>_<SeriesDescription>_<8 hex digits of the SHA-1 of the
  SeriesInstanceUID>`, each part reduced to letters, digits, `-` and `.` (others `_`), cut at 32 characters, left out
  when empty. Two series never share a name: where the 8 digits collide, both take all 40.
- Voxels: pydicom decodes (GDCM or pylibjpeg-openjpeg for JPEG 2000, GDCM for JPEG lossless), then each slice's
  RescaleSlope and RescaleIntercept give Hounsfield units; stored values equal to PixelPaddingValue (or within
  PixelPaddingValue .. PixelPaddingRangeLimit) become `PADDING_HU` (air), as the padding of a NIfTI CT is. int16
  where every slope and intercept is an integer and every storable value fits (12-bit data), int32 for other
  integers, else float32.
- Grid: slices sorted along the normal of ImageOrientationPatient; x along a row, y along a column, z the normal;
  spacing (PixelSpacing[1], PixelSpacing[0], slice distance); origin the first slice's ImagePositionPatient.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import threading
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom  # the `dicom` extra: imported at once, so a missing extra is one clear usage error in the CLI
import SimpleITK as sitk

from flare_infer.geometry import voxels_to_fill
from flare_infer.io import MAX_VOXELS, InputError

log = logging.getLogger("flare_infer")

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DICOMDIR_STORAGE = "1.2.840.10008.1.3.10"
PADDING_HU = -1024  # air: what padded voxels become, as a NIfTI CT's padding reaches the pipeline
SPACING_RTOL = 0.01  # slice distances may differ by 1 % (positions are written with a few decimals)
SPACING_ATOL_MM = 0.01
TILT_TOLERANCE = 1e-3  # sideways shift per mm along the normal (0.06 degree) still counts as no tilt
ORTHO_TOLERANCE = 1e-3  # |row . column| and |row| - 1 of ImageOrientationPatient
_PREAMBLE = 128


class SeriesSkipped(Exception):
    """A series that is not a CT volume (localizer, other modality, single image): skipped, not a failure."""


@dataclass(frozen=True)
class Series:
    """One SeriesInstanceUID: its files and the header fields that name it and decide whether it is a CT volume."""

    uid: str
    files: tuple[Path, ...]
    modality: str
    sop_classes: frozenset[str]
    localizers: int  # files whose ImageType holds LOCALIZER
    patient_id: str = ""
    series_number: str = ""
    description: str = ""
    name: str = ""  # the case name, set by `name_series`

    def skip_reason(self) -> str | None:
        """Why this series is no CT volume, or None."""
        if self.modality != "CT":
            return f"modality {self.modality or '(none)'}, not CT"
        if self.sop_classes != {CT_IMAGE_STORAGE}:
            others = sorted(self.sop_classes - {CT_IMAGE_STORAGE})
            return f"SOP class {', '.join(_sop_name(s) for s in others)}: only CT Image Storage is read"
        if self.localizers == len(self.files):
            return "localizer/scout images (ImageType LOCALIZER), not a volume"
        if len(self.files) - self.localizers < 2:
            return "a single image, not a volume"
        return None


@dataclass
class Scan:
    """What a folder holds: the CT series to process (named), and the lines for everything else."""

    series: list[Series] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "<series>: <reason>"
    bad_files: list[tuple[Path, str]] = field(default_factory=list)  # DICOM files whose header cannot be used
    not_dicom: int = 0


def _sop_name(uid: str) -> str:
    name = pydicom.uid.UID(uid).name
    return name if name != uid else uid


def has_preamble(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            f.seek(_PREAMBLE)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def scan(input_dir: str | Path) -> Scan:
    """Every DICOM file below `input_dir`, grouped by SeriesInstanceUID; headers only (no pixel data read)."""
    found = Scan()
    groups: dict[str, list[tuple[Path, object]]] = defaultdict(list)
    for path in sorted(p for p in Path(input_dir).rglob("*") if p.is_file() and not _hidden(p, input_dir)):
        if not has_preamble(path):
            found.not_dicom += 1
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as e:  # pydicom raises many types for damaged headers
            found.bad_files.append((path, f"DICOM header unreadable ({type(e).__name__}: {e})"))
            continue
        if ds.file_meta.get("MediaStorageSOPClassUID") == DICOMDIR_STORAGE:
            continue
        if not ds.get("SeriesInstanceUID") or not ds.get("SOPClassUID"):
            found.bad_files.append((path, "no SeriesInstanceUID or SOPClassUID: truncated, or not an image"))
            continue
        groups[str(ds.SeriesInstanceUID)].append((path, ds))
    for uid, members in groups.items():
        series = _series_of(uid, members)
        reason = series.skip_reason()
        if reason:
            found.skipped.append(f"{_label(series)}: {reason}")
        else:
            found.series.append(series)
    found.series = name_series(found.series)
    found.skipped.sort()
    return found


def _hidden(path: Path, root: str | Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _series_of(uid: str, members: list) -> Series:
    first = members[0][1]
    return Series(
        uid=uid,
        files=tuple(p for p, _ in members),
        modality=str(first.get("Modality", "")),
        sop_classes=frozenset(str(ds.SOPClassUID) for _, ds in members),
        localizers=sum(_is_localizer(ds) for _, ds in members),
        patient_id=str(first.get("PatientID", "")),
        series_number=str(first.get("SeriesNumber", "")),
        description=str(first.get("SeriesDescription", "")),
    )


def _is_localizer(ds) -> bool:
    image_type = ds.get("ImageType") or []
    return "LOCALIZER" in [str(v).upper() for v in (image_type if not isinstance(image_type, str) else [image_type])]


def _label(series: Series) -> str:
    """How log lines name a series that gets no case name: its number, description and UID."""
    return f"series {series.series_number or '?'} '{series.description}' ({series.uid}, {len(series.files)} files)"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.\-]+", "_", text).strip("_.")[:32]


def name_series(series: list[Series]) -> list[Series]:
    """The series with their case names (module docstring), sorted by name; no two names are equal."""

    def name(s: Series, digits: int) -> str:
        digest = hashlib.sha1(s.uid.encode()).hexdigest()[:digits]
        return "_".join(p for p in (_safe(s.patient_id), _safe(s.series_number), _safe(s.description), digest) if p)

    names = [name(s, 8) for s in series]
    names = [name(s, 40) if names.count(n) > 1 else n for s, n in zip(series, names, strict=True)]
    if len(set(names)) != len(names):  # two identical SeriesInstanceUIDs cannot be: grouping is by UID
        raise AssertionError(f"case names collide: {names}")
    named = [replace(s, name=n) for s, n in zip(series, names, strict=True)]
    return sorted(named, key=lambda s: s.name)


@dataclass(frozen=True)
class SliceGeometry:
    """The grid of a sorted stack of slices, in SimpleITK's terms."""

    size_xyz: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]
    direction: tuple[float, ...]  # row-major 3x3; columns: along a row, along a column, the slice normal


def _orientation(ds, path: Path) -> np.ndarray:
    """(3, 3) columns: the row direction, the column direction, their normal; orthonormalised after a check."""
    iop = np.asarray([float(v) for v in ds.get("ImageOrientationPatient") or []], float)
    if iop.shape != (6,) or not np.all(np.isfinite(iop)):
        raise InputError(f"{path}: ImageOrientationPatient missing or not 6 numbers")
    row, col = iop[:3], iop[3:]
    if abs(row @ col) > ORTHO_TOLERANCE or max(abs(np.linalg.norm(row) - 1), abs(np.linalg.norm(col) - 1)) > 1e-2:
        raise InputError(f"{path}: ImageOrientationPatient {list(iop)} is not two orthogonal unit vectors")
    row = row / np.linalg.norm(row)
    col = col - (col @ row) * row
    col = col / np.linalg.norm(col)
    return np.column_stack([row, col, np.cross(row, col)])


def sort_and_check(headers: list, paths: list[Path]) -> tuple[list[int], SliceGeometry]:
    """The slice order (indices into `headers`, along the normal) and the grid; `InputError` with the reason for
    a stack that is not one evenly spaced, untilted volume."""
    axes = _orientation(headers[0], paths[0])
    for ds, path in zip(headers, paths, strict=True):
        if not np.allclose(_orientation(ds, path), axes, atol=ORTHO_TOLERANCE):
            raise InputError(f"slices of different orientation ({paths[0].name} and {path.name})")
        for key in ("Rows", "Columns", "PixelSpacing"):
            if _values(ds, key) != _values(headers[0], key):
                raise InputError(
                    f"slices of different {key}: {_values(headers[0], key)} in {paths[0].name}, "
                    f"{_values(ds, key)} in {path.name}"
                )
    positions = np.asarray([_position(ds, path) for ds, path in zip(headers, paths, strict=True)])  # (N, 3) mm
    along = positions @ axes[:, 2]
    order = [int(i) for i in np.argsort(along, kind="stable")]
    along, positions = along[order], positions[order]
    spacing_z = _check_spacing(along, [paths[i] for i in order])
    _check_tilt(positions, along, axes)
    row_spacing, col_spacing = (float(v) for v in headers[0].PixelSpacing)
    size = (int(headers[0].Columns), int(headers[0].Rows), len(headers))
    if int(np.prod(size, dtype=np.int64)) > MAX_VOXELS:
        raise InputError(f"size {size} is above {MAX_VOXELS} voxels (1024 x 1024 x 2048)")
    if min(row_spacing, col_spacing) <= 0:
        raise InputError(f"PixelSpacing must be positive, found {list(headers[0].PixelSpacing)}")
    geometry = SliceGeometry(
        size, (col_spacing, row_spacing, spacing_z), tuple(float(v) for v in positions[0]), tuple(axes.ravel())
    )
    return order, geometry


def _values(ds, key: str):
    value = ds.get(key)
    return [float(v) for v in value] if key == "PixelSpacing" and value is not None else value


def _position(ds, path: Path) -> np.ndarray:
    ipp = np.asarray([float(v) for v in ds.get("ImagePositionPatient") or []], float)
    if ipp.shape != (3,) or not np.all(np.isfinite(ipp)):
        raise InputError(f"{path}: ImagePositionPatient missing or not 3 numbers")
    return ipp


def _check_spacing(along: np.ndarray, paths: list[Path]) -> float:
    """The slice distance of positions `along` the normal (sorted); `InputError` for duplicates, gaps, unevenness."""
    steps = np.diff(along)
    typical = float(np.median(steps))
    same = np.flatnonzero(steps <= SPACING_ATOL_MM)
    if len(same):
        i = int(same[0])
        raise InputError(
            f"two images at one position ({along[i]:.2f} mm along the normal: {paths[i].name}, {paths[i + 1].name}):"
            " more than one volume in this series (several phases or acquisitions?); split the series"
        )
    tolerance = max(SPACING_RTOL * typical, SPACING_ATOL_MM)
    off = np.flatnonzero(np.abs(steps - typical) > tolerance)
    if not len(off):
        return float((along[-1] - along[0]) / (len(along) - 1))
    ratios = steps[off] / typical
    if np.all(np.abs(ratios - np.round(ratios)) * typical <= tolerance) and np.all(ratios > 1.5):
        missing = int(np.round(ratios).sum() - len(ratios))
        i = int(off[0])
        raise InputError(
            f"{missing} missing slice(s): a gap of {steps[i]:.2f} mm after {paths[i].name} "
            f"({along[i]:.2f} mm along the normal) where the slices are {typical:.2f} mm apart; "
            "export the whole series again"
        )
    raise InputError(
        f"uneven slice spacing: {steps.min():.3f} to {steps.max():.3f} mm between neighbouring slices "
        f"(typical {typical:.3f} mm); resample to even spacing first (e.g. convert with dcm2niix)"
    )


def _check_tilt(positions: np.ndarray, along: np.ndarray, axes: np.ndarray) -> None:
    """Refuse a stack whose slice positions move sideways along the normal (gantry tilt: a sheared volume)."""
    shift = positions[-1] - positions[0]
    sideways = shift - (shift @ axes[:, 2]) * axes[:, 2]
    extent = along[-1] - along[0]
    if np.linalg.norm(sideways) > TILT_TOLERANCE * extent:
        angle = np.degrees(np.arctan2(np.linalg.norm(sideways), extent))
        raise InputError(
            f"gantry tilt: the slice positions leave the slice normal by {angle:.2f} degrees, a sheared volume that "
            "an image grid cannot hold; resample it onto a straight grid first (e.g. dcm2niix corrects the tilt)"
        )


@dataclass(frozen=True)
class SeriesVolume:
    """What reading a series gives: the image, and the sorted headers (no pixel data) the DICOM writers need."""

    image: sitk.Image
    headers: tuple  # pydicom Datasets in the image's slice order (z index), PixelData removed
    geometry: SliceGeometry


def read_series(series: Series) -> SeriesVolume:
    """Decode, check and stack a series's CT images (not its localizers); `InputError` names the file and reason."""
    headers, paths = [], []
    for path in series.files:
        try:
            ds = pydicom.dcmread(path)
        except Exception as e:
            raise InputError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
        if _is_localizer(ds):
            continue
        headers.append(ds)
        paths.append(path)
    order, geometry = sort_and_check(headers, paths)
    headers, paths = [headers[i] for i in order], [paths[i] for i in order]
    pixel_id, scale = _pixel_type(headers, paths)
    image = sitk.Image(list(geometry.size_xyz), pixel_id)
    vol_zyx = voxels_to_fill(image)  # (Z, Y, X), written slice by slice
    for z, (ds, path) in enumerate(zip(headers, paths, strict=True)):
        vol_zyx[z] = _hounsfield(ds, path, scale[z])
        del ds.PixelData  # the writers need the headers only
    image.SetSpacing(geometry.spacing_xyz)
    image.SetOrigin(geometry.origin_xyz)
    image.SetDirection(geometry.direction)
    return SeriesVolume(image, tuple(headers), geometry)


def _pixel_type(headers: list, paths: list[Path]) -> tuple[int, list[tuple[float, float]]]:
    """int16 where every slope and intercept is an integer and every storable value's HU fits it (12-bit data),
    int32 where they are integers (16-bit data), else float32; and each slice's (slope, intercept)."""
    scale = []
    for ds, path in zip(headers, paths, strict=True):
        if "RescaleSlope" not in ds or "RescaleIntercept" not in ds:
            raise InputError(f"{path}: no RescaleSlope/RescaleIntercept, so the Hounsfield units are unknown")
        scale.append((float(ds.RescaleSlope), float(ds.RescaleIntercept)))
    bits, signed = int(headers[0].get("BitsStored", 16)), int(headers[0].get("PixelRepresentation", 0)) == 1
    stored = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    integral = all(s.is_integer() and i.is_integer() for s, i in scale)
    extremes = [s * v + i for s, i in scale for v in stored] + [PADDING_HU]
    for dtype, pixel_id in ((np.int16, sitk.sitkInt16), (np.int32, sitk.sitkInt32)):
        if integral and np.iinfo(dtype).min <= min(extremes) and max(extremes) <= np.iinfo(dtype).max:
            return pixel_id, scale
    return sitk.sitkFloat32, scale


def _hounsfield(ds, path: Path, scale: tuple[float, float]) -> np.ndarray:
    """One slice in HU, (Y, X); `InputError` for missing, truncated or undecodable pixel data."""
    if "PixelData" not in ds:
        raise InputError(f"{path}: no pixel data")
    if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise InputError(f"{path}: expected one grey frame, found SamplesPerPixel {ds.get('SamplesPerPixel')}, "
                         f"NumberOfFrames {ds.get('NumberOfFrames')}")  # fmt: skip
    syntax = ds.file_meta.get("TransferSyntaxUID", "(none)")
    try:
        stored = ds.pixel_array
    except NotImplementedError as e:
        raise InputError(
            f"{path}: transfer syntax {syntax} ({_sop_name(str(syntax))}) cannot be decoded here ({e}); "
            "install the `dicom` extra (python-gdcm, pylibjpeg) or decompress the files (e.g. gdcmconv --raw)"
        ) from None
    except Exception as e:  # truncated or corrupt pixel data: pydicom and its decoders raise several types
        raise InputError(f"{path}: pixel data truncated or corrupt ({type(e).__name__}: {e})") from None
    if stored.shape != (int(ds.Rows), int(ds.Columns)):
        raise InputError(f"{path}: pixel data of shape {stored.shape}, expected ({ds.Rows}, {ds.Columns})")
    slope, intercept = scale
    hu = stored.astype(np.float64) * slope + intercept
    padding = _padding(ds, stored)
    if padding is not None:
        hu[padding] = PADDING_HU
    return hu


def _padding(ds, stored: np.ndarray) -> np.ndarray | None:
    """Where the stored values are PixelPaddingValue (or between it and PixelPaddingRangeLimit); None if none."""
    if "PixelPaddingValue" not in ds:
        return None
    value = _as_stored_int(ds.PixelPaddingValue, ds)
    limit = _as_stored_int(ds.PixelPaddingRangeLimit, ds) if "PixelPaddingRangeLimit" in ds else value
    low, high = min(value, limit), max(value, limit)
    return (stored >= low) & (stored <= high)


def _as_stored_int(value, ds) -> int:
    """A US/SS value (pydicom may leave an ambiguous one as bytes) as the stored pixels' integer."""
    if isinstance(value, bytes):
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        return int.from_bytes(value[:2], "little", signed=signed)
    return int(value)


class SeriesReader:
    """The CLI's reader of DICOM cases: `reader(path)` reads the series named `path.name` (an `io.ReadAhead`'s read
    function). With `keep_headers`, the sorted headers of each series read wait for the DICOM writers
    (`headers(name)` takes them); `bad_files` counts the DICOM files `scan` could not use (failures of the run)."""

    def __init__(self, series: list[Series], *, bad_files: int = 0, keep_headers: bool = False) -> None:
        self._series = {s.name: s for s in series}
        self._headers: dict[str, tuple] = {}
        self._lock = threading.Lock()
        self.bad_files = bad_files
        self.keep_headers = keep_headers

    def __call__(self, path: str | Path) -> sitk.Image:
        volume = read_series(self._series[Path(path).name])
        if self.keep_headers:
            with self._lock:
                self._headers[Path(path).name] = volume.headers
        return volume.image

    def headers(self, name: str) -> tuple:
        """The sorted headers of the series `name`, once read; taken (each is asked for once)."""
        with self._lock:
            return self._headers.pop(name)


def case_paths(input_dir: Path, series: list[Series]) -> list[Path]:
    """The CLI's case "paths" of DICOM series: INPUT_DIR/<case name> (not files; `SeriesReader` maps them)."""
    return [Path(input_dir) / s.name for s in series]


def log_scan(found: Scan, input_dir: Path) -> None:
    """One line per skipped series and per unusable file; one for the files that are not DICOM."""
    for line in found.skipped:
        log.info("SKIP %s", line)
    for path, reason in found.bad_files:
        print(f"ERROR {os.path.relpath(path, input_dir)}: {reason}", flush=True, file=sys.stderr)
    if found.not_dicom:
        log.info("%d files without the DICOM preamble (DICM at byte 128) ignored", found.not_dicom)
