"""Synthetic DICOM CT series for the DICOM tests, written with pydicom (JPEG 2000 encoded by pydicom's
pylibjpeg-openjpeg encoder; JPEG lossless frames by GDCM inside SimpleITK, as pydicom has no such encoder).

    from dicom_series import SeriesSpec, write_series
    paths = write_series(tmp_path / "ct", SeriesSpec(hu_zyx=volume))
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pydicom = pytest.importorskip("pydicom", reason="the DICOM tests need the `dicom` extra (pip install -e '.[dicom]')")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    generate_uid,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
c10, s10 = np.cos(np.radians(10.0)), np.sin(np.radians(10.0))
OBLIQUE = np.array([[c10, 0.0, s10], [0.0, 1.0, 0.0], [-s10, 0.0, c10]])  # columns: row, column, normal; 10 deg


def body_hu(shape_zyx=(8, 40, 48)) -> np.ndarray:
    """A body-like blob in air with a bright organ (as tests/test_io.py's `_ct`), int16 HU."""
    z, y, x = np.indices(shape_zyx)
    cy, cx = (shape_zyx[1] - 1) / 2, (shape_zyx[2] - 1) / 2
    body = ((y - cy) / (0.4 * shape_zyx[1])) ** 2 + ((x - cx) / (0.45 * shape_zyx[2])) ** 2 <= 1
    organ = ((y - cy) / (0.15 * shape_zyx[1])) ** 2 + ((x - 0.35 * shape_zyx[2]) / (0.1 * shape_zyx[2])) ** 2 <= 1
    return np.where(organ, 300, np.where(body, 40 + (z % 3) * 5, -1000)).astype(np.int16)


@dataclass
class SeriesSpec:
    """A series to write: HU voxels (Z, Y, X) and how they are stored and placed."""

    hu_zyx: np.ndarray
    spacing_xyz: tuple[float, float, float] = (0.8, 1.1, 2.5)  # x: along a row (PixelSpacing[1])
    origin: tuple[float, float, float] = (-30.0, 12.5, 140.0)
    axes: np.ndarray = field(default_factory=lambda: np.eye(3))  # columns: row direction, column direction, normal
    slope: float = 1.0
    intercept: float = -1024.0
    syntax: str = "explicit"  # explicit | jpeg2000 | jpeg-lossless
    modality: str = "CT"
    sop_class: str = CT_IMAGE_STORAGE
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    series_uid: str = field(default_factory=generate_uid)
    study_uid: str = "1.2.826.0.1.3680043.8.498.1"
    frame_uid: str = "1.2.826.0.1.3680043.8.498.2"
    patient_id: str = "PAT 01"
    series_number: int = 3
    description: str = "Abdomen 2.5mm"
    padding: int | None = None  # stored PixelPaddingValue; where hu_zyx is NaN the stored value is this
    signed: bool = False  # int16 stored values (PixelRepresentation 1), else uint16
    positions: np.ndarray | None = None  # (Z, 3) ImagePositionPatient override (gaps, tilt)


def stored_values(spec: SeriesSpec) -> np.ndarray:
    """uint16 (int16 if `signed`) stored values: (HU - intercept) / slope, rounded; NaN voxels hold the padding."""
    hu = np.asarray(spec.hu_zyx, np.float64)
    stored = np.round((np.nan_to_num(hu, nan=0.0) - spec.intercept) / spec.slope)
    if spec.padding is not None:
        stored[np.isnan(hu)] = spec.padding
    dtype = np.int16 if spec.signed else np.uint16
    assert np.iinfo(dtype).min <= stored.min() and stored.max() <= np.iinfo(dtype).max, "the volume does not fit"
    return stored.astype(dtype)


def positions(spec: SeriesSpec) -> np.ndarray:
    if spec.positions is not None:
        return np.asarray(spec.positions, float)
    z = np.arange(spec.hu_zyx.shape[0])[:, None]
    return np.asarray(spec.origin) + z * spec.spacing_xyz[2] * spec.axes[:, 2]


def expected_image(spec: SeriesSpec) -> sitk.Image:
    """The image the reader must give: HU (padding as air), the series' grid."""
    hu = np.where(np.isnan(spec.hu_zyx), -1024.0, spec.hu_zyx) if spec.padding is not None else spec.hu_zyx
    image = sitk.GetImageFromArray(np.asarray(hu, np.float32))
    image.SetSpacing(spec.spacing_xyz)
    image.SetOrigin(tuple(float(v) for v in positions(spec)[0]))
    image.SetDirection(tuple(spec.axes.ravel()))
    return image


def _jpeg_lossless_frame(frame: np.ndarray) -> bytes:
    """One uint16 frame as a JPEG lossless (process 14, SV1) codestream, compressed by GDCM."""
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "frame.dcm")
        writer = sitk.ImageFileWriter()
        writer.SetImageIO("GDCMImageIO")
        writer.SetFileName(path)
        writer.SetUseCompression(True)
        writer.SetCompressor("JPEG")
        writer.Execute(sitk.GetImageFromArray(frame))
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == JPEGLosslessSV1, ds.file_meta.TransferSyntaxUID
        from pydicom.encaps import generate_frames

        return next(generate_frames(ds.PixelData, number_of_frames=1))


def slice_dataset(spec: SeriesSpec, z: int, stored: np.ndarray, position: np.ndarray) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = spec.sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", spec.patient_id, "", "O"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = spec.study_uid, "20261207", "120000", "1"
    ds.ReferringPhysicianName, ds.AccessionNumber = "", ""
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = spec.series_uid, spec.series_number, spec.description
    ds.Modality, ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = spec.modality, spec.frame_uid, ""
    ds.Manufacturer, ds.InstanceNumber, ds.ImageType = "test", z + 1, list(spec.image_type)
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in spec.axes[:, 0]] + [f"{v:.8f}" for v in spec.axes[:, 1]]
    ds.PixelSpacing = [spec.spacing_xyz[1], spec.spacing_xyz[0]]  # rows apart, columns apart
    ds.SliceThickness = spec.spacing_xyz[2]
    ds.KVP, ds.AcquisitionNumber = 120, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, int(spec.signed)
    if spec.modality == "CT":
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = spec.intercept, spec.slope, "HU"
    if spec.padding is not None:
        ds.PixelPaddingValue = spec.padding
    ds.PixelData = stored.tobytes()
    if spec.syntax == "jpeg2000":
        ds.compress(JPEG2000Lossless, stored)
    elif spec.syntax == "jpeg-lossless":
        ds.PixelData = encapsulate([_jpeg_lossless_frame(stored)])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    return ds


def write_series(folder: Path, spec: SeriesSpec, *, prefix: str = "IM") -> list[Path]:
    """One file per slice, named in shuffled order (readers must sort by position, not by name)."""
    folder.mkdir(parents=True, exist_ok=True)
    stored = stored_values(spec)
    order = np.random.default_rng(len(stored)).permutation(len(stored))
    paths = []
    for z, pos in enumerate(positions(spec)):
        ds = slice_dataset(spec, z, stored[z], pos)
        path = folder / f"{prefix}{order[z]:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
