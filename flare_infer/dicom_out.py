"""DICOM outputs of a mask on a DICOM series's grid: a Segmentation (SEG, by highdicom) and an RT Structure Set
(RTSTRUCT, by pydicom), each referencing the series's instances, each written atomically.

    python -m flare_infer predict DICOM_DIR OUTPUT_DIR --output-format dicom-seg   # NAME.seg.dcm
    python -m flare_infer predict DICOM_DIR OUTPUT_DIR --output-format rtstruct    # NAME.rtstruct.dcm

Organs are coded with SNOMED CT as DICOM's context groups give them: CID 7154 "Abdominal Segmentation Type"
(liver 10200004, kidney 64033007, spleen 78961009, pancreas 15776009, inferior vena cava 64131007, adrenal gland
23451007, gallbladder 28231008), CID 4 "Anatomic Region" (aorta 15825003, esophagus 32849002, stomach 69695003,
duodenum 38848004, as pydicom's code dictionary holds them); sides by the modifier of CID 2 "Anatomic Modifier"
(right 24028007, left 7771000); the category is CID 7150's "Anatomical Structure" (123037004).

RTSTRUCT contours: per organ and slice, the marching-squares outline (contourpy, matplotlib's contouring) of the
slice's mask at level 0.5, so every contour runs half-way between an organ pixel's centre and a neighbour outside
it: a reader that fills the pixels whose centres lie inside (even-odd over the slice's contours; an inner contour
is a hole) gets the mask back exactly. Written with pydicom rather than rt-utils: rt-utils needs opencv-python
(the GUI build, which needs libGL and shares its module with albumentations' opencv-python-headless), scales the
row direction by PixelSpacing[0] (the distance between rows) and traces contours through the boundary pixels'
centres, so a one-pixel-wide organ has no area.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from flare_infer.labels import ORGANS

# highdicom logs every module it copies at INFO, which the CLI's log would show: its warnings are enough
logging.getLogger("highdicom").setLevel(logging.WARNING)

MANUFACTURER = "flare-ts"
MODEL_NAME = "flare_infer"
SOFTWARE_VERSION = "0.1.0"
SEG_SERIES_NUMBER, RTSTRUCT_SERIES_NUMBER = 9901, 9902
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
CONTOUR_DATA = 0x30060050
STUDY_COMPONENT_MANAGEMENT = "1.2.840.10008.3.1.2.3.2"  # RTReferencedStudySequence's SOP class (PS3.3 C.8.8.5)
OUTPUT_FORMATS = ("nifti", "dicom-seg", "rtstruct")
SUFFIXES = {"nifti": ".nii.gz", "dicom-seg": ".seg.dcm", "rtstruct": ".rtstruct.dcm"}


@dataclass(frozen=True)
class OrganCode:
    value: str
    meaning: str
    side: str = ""  # "right" / "left": SegmentedPropertyTypeModifier (SEG), part of the ROI name (RTSTRUCT)


ORGAN_CODES: dict[int, OrganCode] = {
    1: OrganCode("10200004", "Liver"),
    2: OrganCode("64033007", "Kidney", "right"),
    3: OrganCode("78961009", "Spleen"),
    4: OrganCode("15776009", "Pancreas"),
    5: OrganCode("15825003", "Aorta"),
    6: OrganCode("64131007", "Inferior vena cava"),
    7: OrganCode("23451007", "Adrenal gland", "right"),
    8: OrganCode("23451007", "Adrenal gland", "left"),
    9: OrganCode("28231008", "Gallbladder"),
    10: OrganCode("32849002", "Esophagus"),
    11: OrganCode("69695003", "Stomach"),
    12: OrganCode("38848004", "Duodenum"),
    13: OrganCode("64033007", "Kidney", "left"),
}
SIDES = {"right": ("24028007", "Right"), "left": ("7771000", "Left")}
CATEGORY = ("123037004", "Anatomical Structure")
# display colours (RGB) per label, as 3D Slicer's generic anatomy colours would vary them
COLORS = {
    1: (221, 130, 101), 2: (185, 102, 83), 3: (157, 108, 162), 4: (249, 180, 111), 5: (224, 97, 76),
    6: (0, 151, 206), 7: (244, 214, 49), 8: (244, 214, 49), 9: (139, 150, 98), 10: (211, 171, 143),
    11: (216, 132, 105), 12: (255, 253, 229), 13: (185, 102, 83),
}  # fmt: skip


def output_name(case_name: str, output_format: str) -> str:
    return case_name + SUFFIXES[output_format]


def _check_grid(mask: sitk.Image, headers) -> np.ndarray:
    """The mask's (Z, Y, X) labels; `ValueError` unless it has one slice per header and the headers' rows/columns,
    and at least one organ (a SEG needs one segment, an RTSTRUCT one ROI)."""
    labels_zyx = sitk.GetArrayViewFromImage(mask)
    expected = (len(headers), int(headers[0].Rows), int(headers[0].Columns))
    if labels_zyx.shape != expected:
        raise ValueError(f"the mask's (Z, Y, X) shape {labels_zyx.shape} is not the series's {expected}")
    if not labels_zyx.any():
        raise ValueError(
            "no organ found in this series, and a DICOM SEG or RTSTRUCT must hold at least one segment or ROI: "
            "nothing written (--output-format nifti writes the empty mask)"
        )
    return labels_zyx


def _write_atomically(dataset, path: Path) -> None:
    """`dataset.save_as` a hidden temporary file in the same folder, then rename: no partial output exists."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        dataset.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _code(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator="SCT", meaning=meaning)


def segment_description(number: int, label: int):
    """highdicom's description of segment `number` holding organ `label`, with its SNOMED CT codes."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    organ, code = ORGANS[label - 1], ORGAN_CODES[label]
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=organ.name,
        segmented_property_category=_code(*CATEGORY),
        segmented_property_type=_code(code.value, code.meaning),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=MODEL_NAME, version=SOFTWARE_VERSION, family=codes.cid7162.ArtificialIntelligence
        ),
    )
    if code.side:
        # the side modifies the type: inside the type's code item (PS3.3 Segment Description Macro)
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _code(*SIDES[code.side])
        ]
    return description


def write_seg(mask: sitk.Image, headers, path: Path) -> None:
    """A DICOM Segmentation (BINARY) of `mask` on the series of `headers` (its slices in the mask's z order): one
    segment per organ present, numbered 1.. in label order; frames reference their source instances."""
    import highdicom as hd

    labels_zyx = _check_grid(mask, headers)
    present = [int(v) for v in np.unique(labels_zyx) if v != 0]
    segment_of = np.zeros(256, np.uint8)
    segment_of[present] = np.arange(1, len(present) + 1)
    seg = hd.seg.Segmentation(
        source_images=list(headers),
        pixel_array=segment_of[labels_zyx],  # (frames, rows, columns): each value a segment number
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment_description(i + 1, v) for i, v in enumerate(present)],
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=SOFTWARE_VERSION,
        device_serial_number="0",
        series_description="FLARE22 organs (flare_infer)",
    )
    _write_atomically(seg, path)


def slice_contours(slice_yx: np.ndarray) -> list[np.ndarray]:
    """Closed outlines (each (K, 2) as (x, y) = (column, row) pixel indices) of a boolean slice, at level 0.5."""
    import contourpy

    rows, cols = np.flatnonzero(slice_yx.any(axis=1)), np.flatnonzero(slice_yx.any(axis=0))
    if not len(rows):
        return []
    box = slice_yx[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]  # contour the organ's box only
    padded = np.pad(box.astype(np.float64), 1)  # outlines close at the box's (and the slice's) edge
    lines = contourpy.contour_generator(z=padded, name="serial", line_type="Separate").lines(0.5)
    offset = np.array([cols[0] - 1.0, rows[0] - 1.0])  # (x, y) of the padded box's first pixel
    return [_corners(line[:-1]) + offset for line in lines if len(line) >= 4]  # without the repeated end point


def _corners(ring: np.ndarray) -> np.ndarray:
    """A closed outline (K, 2) without its points that lie on a straight run (same polygon, fewer points)."""
    before, after = ring - np.roll(ring, 1, axis=0), np.roll(ring, -1, axis=0) - ring
    turns = np.abs(before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]) > 1e-9
    return ring[turns] if turns.sum() >= 3 else ring


def _index_to_mm(mask: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with point_mm = A @ index_xyz + b: the mask's voxel grid in patient coordinates."""
    direction = np.asarray(mask.GetDirection(), float).reshape(3, 3)
    return direction * np.asarray(mask.GetSpacing(), float), np.asarray(mask.GetOrigin(), float)


def _ds_element(tag: int, values: np.ndarray):
    """A DS element of many numbers, encoded here (to 0.001 mm, at most 16 characters each): pydicom checks and
    converts each value it is given as a number or string (25 us each: 18 s for a case's 700k contour values)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    text = "\\".join(f"{v:.3f}".rstrip("0").rstrip(".") if abs(v) < 1e9 else f"{v:.6g}" for v in values)
    data = text.encode("ascii")
    data += b" " * (len(data) % 2)  # DICOM values have even length
    return RawDataElement(Tag(tag), "DS", len(data), data, 0, False, True)


def _ref(sop_class: str, sop_instance: str):
    from pydicom.dataset import Dataset

    ref = Dataset()
    ref.ReferencedSOPClassUID = sop_class
    ref.ReferencedSOPInstanceUID = sop_instance
    return ref


def _rtstruct_base(headers):
    """The RT Structure Set's patient, study, series, equipment and structure-set references."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    first = headers[0]
    now = datetime.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"):  # fmt: skip
        setattr(ds, key, first.get(key, ""))
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = RTSTRUCT_SERIES_NUMBER
    ds.SeriesDescription = "FLARE22 organs (flare_infer)"
    ds.OperatorsName = ""
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = MANUFACTURER, MODEL_NAME, SOFTWARE_VERSION
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "FLARE22"
    ds.StructureSetDate, ds.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = [_ref(h.SOPClassUID, h.SOPInstanceUID) for h in headers]
    study = _ref(STUDY_COMPONENT_MANAGEMENT, first.StudyInstanceUID)
    study.RTReferencedSeriesSequence = [series]
    frame = Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence = [frame]
    return ds


def _roi(ds, number: int, label: int, contours: list) -> None:
    """Append organ `label` as ROI `number` to the structure set `ds`: its name, contours and observation."""
    from pydicom.dataset import Dataset

    organ, code = ORGANS[label - 1], ORGAN_CODES[label]
    roi = Dataset()
    roi.ROINumber = number
    roi.ReferencedFrameOfReferenceUID = ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID
    roi.ROIName = organ.name
    roi.ROIGenerationAlgorithm = "AUTOMATIC"
    ds.StructureSetROISequence.append(roi)
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber = number
    roi_contour.ROIDisplayColor = list(COLORS[label])
    roi_contour.ContourSequence = contours
    ds.ROIContourSequence.append(roi_contour)
    observation = Dataset()
    observation.ObservationNumber = number
    observation.ReferencedROINumber = number
    observation.RTROIInterpretedType = "ORGAN"
    observation.ROIInterpreter = ""
    identification = Dataset()
    identification.CodeValue, identification.CodingSchemeDesignator = code.value, "SCT"
    identification.CodeMeaning = code.meaning
    observation.RTROIIdentificationCodeSequence = [identification]  # the side is in the ROI name only
    ds.RTROIObservationsSequence.append(observation)


def organ_contours(labels_zyx: np.ndarray, label: int, headers, index_to_mm) -> list:
    """The ContourSequence items of organ `label`: its outlines on each slice, in patient mm, each referencing its
    slice's instance."""
    from pydicom.dataset import Dataset

    a, b = index_to_mm
    items = []
    for z in np.flatnonzero((labels_zyx == label).any(axis=(1, 2))):
        for outline in slice_contours(labels_zyx[z] == label):
            index_xyz = np.column_stack([outline, np.full(len(outline), float(z))])  # (K, 3)
            points_mm = index_xyz @ a.T + b
            item = Dataset()
            item.ContourImageSequence = [_ref(headers[z].SOPClassUID, headers[z].SOPInstanceUID)]
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(points_mm)
            item[CONTOUR_DATA] = _ds_element(CONTOUR_DATA, points_mm.ravel())
            items.append(item)
    return items


def write_rtstruct(mask: sitk.Image, headers, path: Path) -> None:
    """An RT Structure Set of `mask` on the series of `headers`: one ROI per organ present, its contours per slice."""
    labels_zyx = _check_grid(mask, headers)
    ds = _rtstruct_base(headers)
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = [], [], []
    index_to_mm = _index_to_mm(mask)
    for number, label in enumerate((int(v) for v in np.unique(labels_zyx) if v != 0), start=1):
        _roi(ds, number, label, organ_contours(labels_zyx, label, headers, index_to_mm))
    _write_atomically(ds, path)


def write(output_format: str, mask: sitk.Image, headers, path: Path) -> None:
    {"dicom-seg": write_seg, "rtstruct": write_rtstruct}[output_format](mask, headers, path)
