"""DICOM out (SEG, RTSTRUCT) read back equal to the mask, dciodvfy-clean where dicom3tools is installed; and the CLI on
DICOM folders: one case per series on its exact grid, the same mask as the same volume given as NIfTI, skips and bad
files named, DICOM output refused for NIfTI input, statistics written.

    pytest tests/test_dicom_output.py -x -q
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("pydicom", reason="the DICOM tests need the `dicom` extra (pip install -e '.[dicom]')")
hd = pytest.importorskip("highdicom", reason="DICOM SEG needs the `dicom` extra's highdicom")
pytest.importorskip("contourpy", reason="RTSTRUCT contours need contourpy (the `dicom` extra)")
import pydicom  # noqa: E402
from dicom_series import MR_IMAGE_STORAGE, OBLIQUE, SeriesSpec, body_hu, expected_image, write_series  # noqa: E402
from matplotlib.path import Path as PolygonPath  # noqa: E402
from test_cli import REPO, run_cli  # noqa: E402

from flare_infer import dicom, dicom_out  # noqa: E402
from flare_infer.geometry import Grid  # noqa: E402
from flare_infer.labels import ORGANS  # noqa: E402


# ------------------------------------------------------------------------------------------------ the writers
def tricky_labels(shape_zyx) -> np.ndarray:
    """Organs that test outlines: a box with a hole, two parts on one slice, a one-pixel line, diagonal pixels, an
    organ on the slice's edge, one on a single slice."""
    labels = np.zeros(shape_zyx, np.uint8)
    labels[1:6, 8:20, 4:16] = 1  # liver, with a hole on slice 3
    labels[3, 12:15, 8:11] = 0
    labels[2, 25:28, 3:6] = 3  # spleen: two parts
    labels[2, 25:28, 20:24] = 3
    labels[4, 30, 10:30] = 7  # right adrenal: one pixel wide
    labels[5, [30, 31, 32], [30, 31, 32]] = 8  # left adrenal: touching at corners only
    labels[:, 0:5, -8:] = 13  # left kidney: on the in-plane edge, every slice
    labels[7, 20:24, 30:40] = 2  # right kidney: the last slice only
    return labels


@pytest.fixture(scope="module")
def series_and_mask(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ct")
    write_series(folder, SeriesSpec(hu_zyx=body_hu(), axes=OBLIQUE, spacing_xyz=(0.7, 1.3, 3.0)))
    volume = dicom.read_series(dicom.scan(folder).series[0])
    mask = sitk.GetImageFromArray(tricky_labels(body_hu().shape))
    mask.CopyInformation(volume.image)
    return volume, mask


def seg_labels(path: Path, headers) -> np.ndarray:
    """The organ labels (Z, Y, X) a DICOM SEG holds, by highdicom; organs found by their SNOMED codes and sides."""
    seg = hd.seg.segread(path)
    uids = [h.SOPInstanceUID for h in headers]
    segments = seg.get_pixels_by_source_instance(uids, assert_missing_frames_are_empty=True)  # (Z, Y, X, S)
    labels = np.zeros(segments.shape[:3], np.uint8)
    for number in seg.get_segment_numbers():
        description = seg.get_segment_description(number)
        code = description.SegmentedPropertyTypeCodeSequence[0]
        side = code.get("SegmentedPropertyTypeModifierCodeSequence", [None])[0]
        found = dicom_out.OrganCode(code.CodeValue, code.CodeMeaning, side.CodeMeaning.lower() if side else "")
        label = next(v for v, c in dicom_out.ORGAN_CODES.items() if c == found)
        assert description.SegmentLabel == ORGANS[label - 1].name
        labels[segments[..., number - 1] > 0] = label
    return labels


def test_seg_reads_back_as_the_mask_with_organ_codes_and_source_references(tmp_path, series_and_mask):
    volume, mask = series_and_mask
    dicom_out.write_seg(mask, volume.headers, tmp_path / "case.seg.dcm")
    assert [p.name for p in tmp_path.iterdir()] == ["case.seg.dcm"]
    np.testing.assert_array_equal(seg_labels(tmp_path / "case.seg.dcm", volume.headers),
                                  sitk.GetArrayViewFromImage(mask))  # fmt: skip
    seg = pydicom.dcmread(tmp_path / "case.seg.dcm")
    assert seg.FrameOfReferenceUID == volume.headers[0].FrameOfReferenceUID
    referenced = {r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
                  for r in s.ReferencedInstanceSequence}  # fmt: skip
    assert referenced == {h.SOPInstanceUID for h in volume.headers}
    assert len(seg.SegmentSequence) == 6  # the organs present only


def rtstruct_labels(path: Path, mask: sitk.Image, headers) -> np.ndarray:
    """The organ labels (Z, Y, X) an RTSTRUCT's contours enclose: a pixel belongs to an ROI where its centre lies
    inside an odd number of the ROI's contours on its slice (an inner contour is a hole)."""
    ds = pydicom.dcmread(path)
    names = {roi.ROINumber: roi.ROIName for roi in ds.StructureSetROISequence}
    label_of = {o.name: o.value for o in ORGANS}
    slice_of = {h.SOPInstanceUID: z for z, h in enumerate(headers)}
    direction = np.asarray(mask.GetDirection()).reshape(3, 3)
    to_index = np.linalg.inv(direction * np.asarray(mask.GetSpacing()))  # mm -> continuous index (x, y, z)
    size_x, size_y, size_z = mask.GetSize()
    centres = np.stack(np.meshgrid(np.arange(size_x), np.arange(size_y)), -1).reshape(-1, 2)  # (x, y) per pixel
    labels = np.zeros((size_z, size_y, size_x), np.uint8)
    for roi in ds.ROIContourSequence:
        inside = np.zeros(labels.shape, bool)
        for contour in roi.ContourSequence:
            z = slice_of[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            points = np.asarray(contour.ContourData, float).reshape(-1, 3)
            index = (points - np.asarray(mask.GetOrigin())) @ to_index.T
            np.testing.assert_allclose(index[:, 2], z, atol=1e-3)  # on its slice's plane
            hit = PolygonPath(index[:, :2]).contains_points(centres).reshape(size_y, size_x)
            inside[z] ^= hit
        labels[inside] = label_of[names[roi.ReferencedROINumber]]
    return labels


def test_rtstruct_contours_enclose_exactly_the_mask(tmp_path, series_and_mask):
    # The agreement tested: every pixel whose centre the contours enclose (even-odd) is the organ's, and only those
    # (DSC 1 per organ), for holes, split parts, one-pixel lines, corner-touching pixels and organs on the edge.
    volume, mask = series_and_mask
    dicom_out.write_rtstruct(mask, volume.headers, tmp_path / "case.rtstruct.dcm")
    assert [p.name for p in tmp_path.iterdir()] == ["case.rtstruct.dcm"]
    np.testing.assert_array_equal(rtstruct_labels(tmp_path / "case.rtstruct.dcm", mask, volume.headers),
                                  sitk.GetArrayViewFromImage(mask))  # fmt: skip
    ds = pydicom.dcmread(tmp_path / "case.rtstruct.dcm")
    assert [r.ROIName for r in ds.StructureSetROISequence] == [ORGANS[v - 1].name for v in (1, 2, 3, 7, 8, 13)]
    assert {o.RTROIIdentificationCodeSequence[0].CodeValue for o in ds.RTROIObservationsSequence} == {
        dicom_out.ORGAN_CODES[v].value for v in (1, 2, 3, 7, 8, 13)
    }
    listed = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    listed_uids = [r.ReferencedSOPInstanceUID for r in listed.ContourImageSequence]
    assert listed_uids == [h.SOPInstanceUID for h in volume.headers]


def test_outlines_lie_half_way_between_inside_and_outside_pixels():
    square = np.zeros((6, 6), bool)
    square[2:4, 1:4] = True
    (outline,) = dicom_out.slice_contours(square)
    assert outline.min(axis=0).tolist() == [0.5, 1.5] and outline.max(axis=0).tolist() == [3.5, 3.5]  # (x, y)
    assert len(outline) == 8  # the chamfered rectangle's corners only: straight runs carry no points


def test_a_mask_off_the_series_grid_is_refused_and_nothing_written(tmp_path, series_and_mask):
    volume, mask = series_and_mask
    for write in (dicom_out.write_seg, dicom_out.write_rtstruct):
        with pytest.raises(ValueError, match="is not the series"):
            write(mask, volume.headers[:-1], tmp_path / "case.dcm")
    assert not any(tmp_path.iterdir())


def test_an_empty_mask_is_refused_with_the_reason_and_nothing_written(tmp_path, series_and_mask):
    volume, mask = series_and_mask
    empty = sitk.Image(mask.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(mask)
    for write in (dicom_out.write_seg, dicom_out.write_rtstruct):
        with pytest.raises(ValueError, match="no organ found in this series"):
            write(empty, volume.headers, tmp_path / "case.dcm")
    assert not any(tmp_path.iterdir())


def test_a_failed_write_leaves_no_file(tmp_path, series_and_mask, monkeypatch):
    volume, mask = series_and_mask

    def failing_save(self, path, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pydicom.Dataset, "save_as", failing_save)
    with pytest.raises(OSError, match="disk full"):
        dicom_out.write_rtstruct(mask, volume.headers, tmp_path / "case.rtstruct.dcm")
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed (apt-get install dicom3tools)")
@pytest.mark.parametrize("write", ["write_seg", "write_rtstruct"])
def test_dciodvfy_finds_no_errors(tmp_path, series_and_mask, write):
    volume, mask = series_and_mask
    getattr(dicom_out, write)(mask, volume.headers, tmp_path / "out.dcm")
    result = subprocess.run(["dciodvfy", str(tmp_path / "out.dcm")], capture_output=True, text=True, timeout=120)
    report = result.stdout + result.stderr
    assert not [ln for ln in report.splitlines() if ln.startswith("Error")], report


# ------------------------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from onnx_standin import make_standin_model

    return make_standin_model(tmp_path_factory.mktemp("model"), input_channels=3)


def study_folder(root: Path) -> dict[str, SeriesSpec]:
    """Two CT series (uncompressed oblique, JPEG 2000), a localizer, an MR series, a CT series with a bad file."""
    specs = {
        "oblique": SeriesSpec(hu_zyx=body_hu((10, 48, 56)), axes=OBLIQUE, description="oblique", series_number=2),
        "j2k": SeriesSpec(hu_zyx=body_hu((9, 40, 40)), syntax="jpeg2000", description="j2k", series_number=3,
                          spacing_xyz=(0.9, 0.9, 5.0)),  # fmt: skip
        "scout": SeriesSpec(hu_zyx=body_hu((1, 40, 40)), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                            series_number=1, description="scout"),  # fmt: skip
        "mr": SeriesSpec(hu_zyx=body_hu((4, 40, 40)), modality="MR", sop_class=MR_IMAGE_STORAGE, series_number=5),
        "broken": SeriesSpec(hu_zyx=body_hu((6, 40, 40)), description="broken", series_number=6),
    }
    for name, spec in specs.items():
        paths = write_series(root / "study" / name, spec)
        if name == "broken":
            paths[2].write_bytes(paths[2].read_bytes()[:-300])
    return specs


def nifti_of(spec: SeriesSpec, path: Path) -> None:
    """The same volume as a NIfTI file, made from the series' HU and geometry (not by the DICOM reader)."""
    sitk.WriteImage(sitk.Cast(expected_image(spec), sitk.sitkInt16), str(path))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("runs")
    specs = study_folder(root / "dicom")
    (root / "dicom" / "notes.txt").write_text("not DICOM")
    args = ["--model", str(model), "--device", "cpu", "--batch-size", "4"]
    found = {s.uid: s.name for s in dicom.scan(root / "dicom").series}
    (root / "nifti").mkdir()
    for key in ("oblique", "j2k"):
        nifti_of(specs[key], root / "nifti" / f"{found[specs[key].series_uid]}.nii.gz")
    results = {
        "nifti": run_cli("predict", str(root / "dicom"), str(root / "out_nifti"), *args, "--statistics"),
        "seg": run_cli("predict", str(root / "dicom"), str(root / "out_seg"), *args, "--output-format", "dicom-seg"),
        "rt": run_cli("predict", str(root / "dicom"), str(root / "out_rt"), *args, "--output-format", "rtstruct"),
        "from_nifti": run_cli("predict", str(root / "nifti"), str(root / "out_from_nifti"), *args),
    }
    return root, specs, found, results


def test_each_ct_series_is_a_case_on_its_exact_grid_and_the_rest_is_named(runs):
    root, specs, found, results = runs
    result = results["nifti"]
    assert result.returncode == 1, result.stderr  # the broken series failed, the others are written
    names = {key: found[specs[key].series_uid] for key in ("oblique", "j2k", "broken")}
    written = sorted(p.name for p in (root / "out_nifti").iterdir())
    per_case = [f"{names[key]}{suffix}" for key in ("oblique", "j2k") for suffix in (".nii.gz", ".statistics.json")]
    assert written == sorted([*per_case, "statistics.csv"]), written
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("ERROR")]
    assert len(errors) == 1 and errors[0].startswith(f"ERROR {names['broken']}: ") and "IM" in errors[0], errors
    assert "pixel data truncated or corrupt" in errors[0]
    skips = [ln for ln in result.stderr.splitlines() if ln.startswith("SKIP")]
    assert len(skips) == 2 and any("localizer" in ln for ln in skips) and any("modality MR" in ln for ln in skips)
    assert "1 files without the DICOM preamble" in result.stderr
    for key in ("oblique", "j2k"):
        expected = sitk.ReadImage(str(root / "nifti" / f"{names[key]}.nii.gz"))
        mask = sitk.ReadImage(str(root / "out_nifti" / f"{names[key]}.nii.gz"))
        assert Grid.of(mask).differences(Grid.of(expected), atol=1e-4) == [], key
        assert mask.GetSize() == tuple(specs[key].hu_zyx.shape[::-1])


def test_dicom_input_gives_the_same_mask_as_the_same_volume_as_nifti(runs):
    root, specs, found, results = runs
    assert results["from_nifti"].returncode == 0, results["from_nifti"].stderr
    for key in ("oblique", "j2k"):
        name = found[specs[key].series_uid]
        from_dicom = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "out_nifti" / f"{name}.nii.gz")))
        from_nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "out_from_nifti" / f"{name}.nii.gz")))
        assert from_nifti.max() > 0, "the stand-in labels the body"
        np.testing.assert_array_equal(from_dicom, from_nifti, err_msg=key)


def test_seg_and_rtstruct_outputs_equal_the_nifti_mask(runs):
    root, specs, found, results = runs
    for key in ("seg", "rt"):
        assert results[key].returncode == 1, results[key].stderr  # the broken series, as above
        assert "copy attributes" not in results[key].stderr  # highdicom's INFO lines stay out of the log
    for key in ("oblique", "j2k"):
        name = found[specs[key].series_uid]
        mask = sitk.ReadImage(str(root / "out_nifti" / f"{name}.nii.gz"))
        series = next(s for s in dicom.scan(root / "dicom").series if s.name == name)
        headers = dicom.read_series(series).headers
        expected = sitk.GetArrayViewFromImage(mask)
        np.testing.assert_array_equal(seg_labels(root / "out_seg" / f"{name}.seg.dcm", headers), expected)
        rt = rtstruct_labels(root / "out_rt" / f"{name}.rtstruct.dcm", mask, headers)
        np.testing.assert_array_equal(rt, expected)
    assert not [p for p in (root / "out_seg").iterdir() if not p.name.endswith(".seg.dcm")]


def test_statistics_of_the_run_match_the_written_masks(runs):
    root, specs, found, _ = runs
    rows = list(csv.DictReader((root / "out_nifti" / "statistics.csv").open()))
    assert len(rows) == 2 * len(ORGANS)
    for key in ("oblique", "j2k"):
        name = found[specs[key].series_uid]
        document = json.loads((root / "out_nifti" / f"{name}.statistics.json").read_text())
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "out_nifti" / f"{name}.nii.gz")))
        for organ in ORGANS:
            assert document["organs"][organ.name]["voxels"] == int((labels == organ.value).sum())
            row = next(r for r in rows if r["case"] == name and r["organ"] == organ.name)
            assert int(row["voxels"]) == document["organs"][organ.name]["voxels"]


def test_dicom_output_of_nifti_input_is_a_usage_error(runs, model):
    root = runs[0]
    result = run_cli("predict", str(root / "nifti"), str(root / "out_refused"), "--model", str(model),
                     "--output-format", "rtstruct")  # fmt: skip
    assert result.returncode == 2 and "needs DICOM input" in result.stderr, result.stderr
    assert not (root / "out_refused").exists() or not any((root / "out_refused").iterdir())


def test_a_folder_without_ct_series_is_a_usage_error(tmp_path, model):
    write_series(tmp_path / "in", SeriesSpec(hu_zyx=body_hu((4, 40, 40)), modality="MR", sop_class=MR_IMAGE_STORAGE))
    result = run_cli("predict", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(model))
    assert result.returncode == 2 and "no DICOM CT series (1 series skipped" in result.stderr, result.stderr
    assert "SKIP series 3" in result.stderr


def test_a_nifti_folder_never_imports_the_dicom_libraries(tmp_path, model):
    from test_io import write_good_inputs

    write_good_inputs(tmp_path / "in")
    code = (
        "import sys\n"
        "from flare_infer.__main__ import app\n"
        f"try: app(['predict', {str(tmp_path / 'in')!r}, {str(tmp_path / 'out')!r}, '--model', {str(model)!r}])\n"
        "except SystemExit as e: print('exit', e.code)\n"
        "print(sorted(m for m in ('pydicom', 'highdicom', 'flare_infer.dicom', 'flare_infer.dicom_out') "
        "if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.stdout.split("\n")[:2] == ["exit 0", "[]"], result.stderr[-2000:]


def test_a_dicom_folder_without_the_extra_is_a_usage_error_saying_so(tmp_path, model):
    write_series(tmp_path / "in", SeriesSpec(hu_zyx=body_hu((4, 40, 40))))
    code = (
        "import sys\n"
        "sys.modules['pydicom'] = None\n"  # as if the `dicom` extra were not installed
        "from flare_infer.__main__ import app\n"
        f"app(['predict', {str(tmp_path / 'in')!r}, {str(tmp_path / 'out')!r}, '--model', {str(model)!r}])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2 and "DICOM input needs the `dicom` extra" in result.stderr, result.stderr[-2000:]


def test_a_file_with_a_broken_header_is_one_error_line_and_the_series_goes_on(tmp_path, model):
    write_series(tmp_path / "in" / "ct", SeriesSpec(hu_zyx=body_hu((6, 40, 40))))
    other = write_series(tmp_path / "in" / "other", SeriesSpec(hu_zyx=body_hu((3, 40, 40))))[0]
    broken = tmp_path / "in" / "other" / "broken.dcm"
    broken.write_bytes(other.read_bytes()[:300])  # the preamble and part of the meta header
    for path in other.parent.glob("IM*"):
        path.unlink()
    result = run_cli("predict", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(model))
    assert result.returncode == 1, result.stderr  # the run failed for that file, the series is written
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("ERROR")]
    assert errors == [f"ERROR {Path('other') / 'broken.dcm'}: no SeriesInstanceUID or SOPClassUID: truncated, "
                      "or not an image"], result.stderr  # fmt: skip
    assert [p.suffix for p in (tmp_path / "out").iterdir()] == [".gz"]
