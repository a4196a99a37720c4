"""DICOM series in: discovery (one case per CT series, skips with their reasons, names), the volume read in HU on the
series' exact grid (uncompressed, JPEG 2000, JPEG lossless; oblique; slope/intercept; padding), the refusals.

    pytest tests/test_dicom.py -x -q
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("pydicom", reason="the DICOM tests need the `dicom` extra (pip install -e '.[dicom]')")
pytest.importorskip("pylibjpeg", reason="compressed DICOM needs the `dicom` extra's pylibjpeg")
from dicom_series import (  # noqa: E402
    MR_IMAGE_STORAGE,
    OBLIQUE,
    SeriesSpec,
    body_hu,
    expected_image,
    positions,
    write_series,
)

from flare_infer import dicom  # noqa: E402
from flare_infer.io import InputError  # noqa: E402


def assert_same_image(found: sitk.Image, expected: sitk.Image) -> None:
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(found), sitk.GetArrayViewFromImage(expected))
    assert found.GetSize() == expected.GetSize()
    np.testing.assert_allclose(found.GetSpacing(), expected.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(found.GetOrigin(), expected.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(found.GetDirection(), expected.GetDirection(), atol=1e-6)


def read_only_series(folder):
    found = dicom.scan(folder)
    assert len(found.series) == 1, (found.series, found.skipped, found.bad_files)
    return dicom.read_series(found.series[0])


@pytest.mark.parametrize("syntax", ["explicit", "jpeg2000", "jpeg-lossless"])
def test_series_reads_as_hounsfield_units_on_its_oblique_grid(tmp_path, syntax):
    spec = SeriesSpec(hu_zyx=body_hu(), axes=OBLIQUE, syntax=syntax)
    write_series(tmp_path / "a" / "b", spec)  # nested folders, file names in shuffled order
    volume = read_only_series(tmp_path)
    assert_same_image(volume.image, expected_image(spec))
    assert [int(h.InstanceNumber) for h in volume.headers] == list(range(1, 9))  # headers in the image's z order
    assert all("PixelData" not in h for h in volume.headers)


def test_rescale_slope_and_intercept_give_hounsfield_units(tmp_path):
    hu = body_hu().astype(np.float64) + 0.5 * (np.indices(body_hu().shape)[2] % 2)  # half-HU steps need slope 0.5
    spec = SeriesSpec(hu_zyx=hu, slope=0.5, intercept=-2048.0)
    write_series(tmp_path, spec)
    image = read_only_series(tmp_path).image
    assert image.GetPixelID() == sitk.sitkFloat32
    assert_same_image(image, expected_image(spec))


def test_integer_rescale_of_12_bit_data_reads_as_int16(tmp_path):
    spec = SeriesSpec(hu_zyx=body_hu())
    write_series(tmp_path, spec)
    for path in tmp_path.iterdir():  # BitsStored 12: every stored value's HU fits int16
        import pydicom

        ds = pydicom.dcmread(path)
        ds.BitsStored, ds.HighBit = 12, 11
        ds.save_as(path)
    image = read_only_series(tmp_path).image
    assert image.GetPixelID() == sitk.sitkInt16
    assert_same_image(image, expected_image(spec))


def test_padding_value_becomes_air(tmp_path):
    hu = body_hu().astype(np.float64)
    hu[:, :4, :] = np.nan  # stored as the padding value 64000: 62976 HU if it were not honoured
    spec = SeriesSpec(hu_zyx=hu, padding=64000)
    write_series(tmp_path, spec)
    image = read_only_series(tmp_path).image
    assert sitk.GetArrayViewFromImage(image)[:, :4].max() == dicom.PADDING_HU
    assert_same_image(image, expected_image(spec))


def test_signed_stored_values_and_a_negative_padding_value(tmp_path):
    hu = body_hu().astype(np.float64)
    hu[:, :, :3] = np.nan  # stored as the signed padding value -2000, which is -2000 HU if not honoured
    spec = SeriesSpec(hu_zyx=hu, intercept=0.0, signed=True, padding=-2000)
    write_series(tmp_path, spec)
    image = read_only_series(tmp_path).image
    assert image.GetPixelID() == sitk.sitkInt16  # signed 16 bits with intercept 0: every storable value fits
    assert_same_image(image, expected_image(spec))


def test_each_series_is_a_case_and_the_rest_is_skipped_with_its_reason(tmp_path):
    shape = body_hu().shape
    specs = {
        "ct1": SeriesSpec(hu_zyx=body_hu(), description="Abdomen"),
        "ct2": SeriesSpec(hu_zyx=body_hu(), description="Abdomen", syntax="jpeg2000"),  # same name parts
        "scout": SeriesSpec(hu_zyx=body_hu()[:1], image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), series_number=1),
        "mr": SeriesSpec(hu_zyx=body_hu(), modality="MR", sop_class=MR_IMAGE_STORAGE, series_number=7),
        "one": SeriesSpec(hu_zyx=body_hu()[:1], series_number=9),
    }
    for name, spec in specs.items():
        write_series(tmp_path / "study", spec, prefix=name)  # all in one folder
    (tmp_path / "study" / "README.txt").write_text("not DICOM")
    write_series(tmp_path / ".trash", SeriesSpec(hu_zyx=body_hu()))  # a hidden folder: not looked at
    found = dicom.scan(tmp_path)
    assert sorted(s.uid for s in found.series) == sorted([specs["ct1"].series_uid, specs["ct2"].series_uid])
    names = [s.name for s in found.series]
    assert len(set(names)) == 2 and all(n.startswith("PAT_01_3_Abdomen_") for n in names), names
    reasons = "\n".join(found.skipped)
    assert len(found.skipped) == 3, reasons
    assert "localizer" in reasons and "modality MR, not CT" in reasons and "a single image" in reasons
    assert found.not_dicom == 1 and not found.bad_files
    for series in found.series:
        assert dicom.read_series(series).image.GetSize() == shape[::-1]


def test_a_localizer_inside_a_ct_series_is_left_out(tmp_path):
    spec = SeriesSpec(hu_zyx=body_hu())
    write_series(tmp_path, spec)
    scout = SeriesSpec(hu_zyx=body_hu()[:1], image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                       series_uid=spec.series_uid, origin=(0.0, 0.0, 500.0))  # fmt: skip
    write_series(tmp_path, scout, prefix="SCOUT")
    assert_same_image(read_only_series(tmp_path).image, expected_image(spec))


def test_case_names_follow_the_rule_and_never_collide(monkeypatch):
    fields = dict(files=(), modality="CT", sop_classes=frozenset(), localizers=0, patient_id="Doe/Jane",
                  series_number="2", description="Ven 1.0 B30f*")  # fmt: skip
    series = [dicom.Series(uid=f"1.2.{i}", **fields) for i in range(3)]
    names = [s.name for s in dicom.name_series(series)]
    assert all(n.startswith("Doe_Jane_2_Ven_1.0_B30f_") and len(n.rsplit("_", 1)[1]) == 8 for n in names), names
    assert len(set(names)) == 3

    class SameStart:  # a SHA-1 whose first 8 digits collide
        def __init__(self, data):
            self.data = data

        def hexdigest(self):
            return "deadbeef" + self.data.decode().replace(".", "").rjust(32, "0")

    monkeypatch.setattr(dicom.hashlib, "sha1", SameStart)
    names = [s.name for s in dicom.name_series(series)]
    assert len(set(names)) == 3 and all(len(n.rsplit("_", 1)[1]) == 40 for n in names), names


def _refused(tmp_path, spec: SeriesSpec, match: str) -> str:
    write_series(tmp_path, spec)
    with pytest.raises(InputError, match=match) as info:
        read_only_series(tmp_path)
    return str(info.value)


def test_a_missing_slice_is_refused_naming_the_gap(tmp_path):
    spec = SeriesSpec(hu_zyx=body_hu())
    spec.positions = np.delete(positions(SeriesSpec(hu_zyx=body_hu()[:9])), 4, axis=0)[:8]
    message = _refused(tmp_path, spec, "1 missing slice")
    assert "gap of 5.00 mm" in message and "2.50 mm apart" in message


def test_uneven_spacing_is_refused(tmp_path):
    spec = SeriesSpec(hu_zyx=body_hu())
    z = np.array([0, 2.5, 5, 7.5, 9.0, 11.5, 14, 16.5])
    spec.positions = np.asarray(spec.origin) + z[:, None] * np.array([0, 0, 1.0])
    _refused(tmp_path, spec, "uneven slice spacing: 1.500 to 2.500 mm")


def test_two_images_at_one_position_are_refused(tmp_path):
    spec = SeriesSpec(hu_zyx=body_hu())
    p = positions(spec)
    p[5] = p[4]
    spec.positions = p
    _refused(tmp_path, spec, "two images at one position")


def test_gantry_tilt_is_refused_with_its_angle(tmp_path):
    spec = SeriesSpec(hu_zyx=body_hu())
    shear = np.tan(np.radians(15.0)) * 2.5  # each slice shifted along y: a 15 degree tilted gantry
    spec.positions = positions(spec) + np.arange(8)[:, None] * np.array([0.0, shear, 0.0])
    _refused(tmp_path, spec, "gantry tilt: the slice positions leave the slice normal by 15.00 degrees")


def test_slices_of_another_orientation_are_refused(tmp_path):
    spec = SeriesSpec(hu_zyx=body_hu())
    paths = write_series(tmp_path, spec)
    import pydicom

    ds = pydicom.dcmread(paths[3])
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in OBLIQUE[:, 0]] + [f"{v:.6f}" for v in OBLIQUE[:, 1]]
    ds.save_as(paths[3])
    with pytest.raises(InputError, match="slices of different orientation"):
        read_only_series(tmp_path)


def _corrupt(path, how: str) -> None:
    import pydicom

    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 500])
        return
    ds = pydicom.dcmread(path)
    if how == "no pixel data":
        del ds.PixelData
        ds.save_as(path)
    elif how == "unknown transfer syntax":
        ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.8.498.99"  # a private syntax: explicit VR LE data
        ds.save_as(path, implicit_vr=False, little_endian=True)


@pytest.mark.parametrize(
    "how, reason",
    [
        ("truncated", "pixel data truncated or corrupt"),
        ("no pixel data", ": no pixel data$"),
        ("unknown transfer syntax", "transfer syntax 1.2.826.0.1.3680043.8.498.99 .* cannot be decoded"),
    ],
)
def test_a_bad_file_is_refused_naming_the_file_and_the_reason(tmp_path, how, reason):
    paths = write_series(tmp_path, SeriesSpec(hu_zyx=body_hu()))
    _corrupt(paths[2], how)
    with pytest.raises(InputError, match=reason) as info:
        read_only_series(tmp_path)
    assert str(info.value).startswith(f"{paths[2]}: "), str(info.value)


def test_a_file_with_a_broken_header_is_a_bad_file_of_the_scan(tmp_path):
    paths = write_series(tmp_path, SeriesSpec(hu_zyx=body_hu()))
    paths[0].write_bytes(paths[0].read_bytes()[:300])  # the preamble and part of the meta header
    found = dicom.scan(tmp_path)
    assert [p for p, _ in found.bad_files] == [paths[0]], found.bad_files
    assert len(found.series) == 1 and len(found.series[0].files) == 7
