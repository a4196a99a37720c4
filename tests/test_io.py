"""Reading refuses bad files with a reason before touching voxels; writing is atomic; case names map as nnU-Net.

    pytest tests/test_io.py -x -q

`write_bad_inputs` and `write_good_inputs` are also used by tests/test_cli.py for the mixed folder.
"""

from __future__ import annotations

import gzip
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from flare_infer import io

# NIfTI-1 header offsets (bytes): dim[8] int16 at 40, pixdim[8] float32 at 76, qform/sform codes at 252/254,
# srow_x float32[4] at 280.
_DIM, _PIXDIM, _QFORM_CODE, _SFORM_CODE, _SROW_X = 40, 76, 252, 254, 280


def _image(vol_zyx: np.ndarray, spacing=(1.5, 1.5, 3.0), direction=None) -> sitk.Image:
    image = sitk.GetImageFromArray(vol_zyx)
    image.SetSpacing(spacing)
    image.SetOrigin((-20.0, 35.0, 110.0))
    if direction is not None:
        image.SetDirection(direction)
    return image


def _ct(shape_zyx=(6, 64, 64), dtype=np.int16) -> np.ndarray:
    """A body-like blob in air, so normalisation has something to scale."""
    z, y, x = np.indices(shape_zyx)
    cy, cx = (shape_zyx[1] - 1) / 2, (shape_zyx[2] - 1) / 2
    body = ((y - cy) / (0.4 * shape_zyx[1])) ** 2 + ((x - cx) / (0.45 * shape_zyx[2])) ** 2 <= 1
    organ = ((y - cy) / (0.15 * shape_zyx[1])) ** 2 + ((x - 0.35 * shape_zyx[2]) / (0.1 * shape_zyx[2])) ** 2 <= 1
    hu = np.where(organ, 300, np.where(body, 40, -1000))
    return ((hu + 1000) // 10 if dtype == np.uint8 else hu).astype(dtype)


def _patched(path: Path, source: sitk.Image, patches: list[tuple[int, str, tuple]]) -> Path:
    """Write `source` as .nii.gz, then overwrite header fields: (offset, struct format, values)."""
    sitk.WriteImage(source, str(path))
    raw = bytearray(gzip.decompress(path.read_bytes()))
    for offset, fmt, values in patches:
        struct.pack_into(fmt, raw, offset, *values)
    path.write_bytes(gzip.compress(bytes(raw)))
    return path


def write_bad_inputs(folder: Path) -> dict[str, str]:
    """Every kind of bad case the issue lists; returns {file name: a word its error message must contain}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.nii.gz").write_bytes(b"")
    sitk.WriteImage(_image(_ct()), str(folder / "whole.nii.gz"))
    whole = (folder / "whole.nii.gz").read_bytes()
    (folder / "whole.nii.gz").unlink()
    (folder / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
    (folder / "text.nii.gz").write_text("this is not an image\n")
    sitk.WriteImage(sitk.GetImageFromArray(_ct()[0]), str(folder / "flat2d.nii.gz"))
    sitk.WriteImage(sitk.JoinSeries([_image(_ct())] * 2), str(folder / "fourd.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([_ct()] * 3, -1), isVector=True), str(folder / "vector.nii.gz"))
    nan = _ct(dtype=np.float32)
    nan[2, 30, 30] = np.nan
    sitk.WriteImage(_image(nan), str(folder / "nan.nii.gz"))
    inf = _ct(dtype=np.float64)
    inf[0, 0, 0] = np.inf
    sitk.WriteImage(_image(inf), str(folder / "inf.nii.gz"))
    # Zero x spacing in the sform (the only place NIfTI readers take it from without defaulting to 1 mm).
    _patched(folder / "zero_spacing.nii.gz", _image(_ct()), [(_QFORM_CODE, "<h", (0,)), (_SROW_X, "<4f", (0, 0, 0, 0))])
    _patched(folder / "negative_spacing.nii.gz", _image(_ct()), [(_PIXDIM + 4 * 3, "<f", (-3.0,))])
    _patched(folder / "absurd_size.nii.gz", _image(_ct()), [(_DIM + 2, "<3h", (30000, 30000, 30000))])
    return {
        "empty.nii.gz": "empty",
        "truncated.nii.gz": "truncated",
        "text.nii.gz": "header",
        "flat2d.nii.gz": "3D",
        "fourd.nii.gz": "3D",
        "vector.nii.gz": "components",
        "nan.nii.gz": "NaN",
        "inf.nii.gz": "infinite",
        "zero_spacing.nii.gz": "header",
        "negative_spacing.nii.gz": "spacing",
        "absurd_size.nii.gz": "voxels",
    }


def good_inputs() -> dict[str, sitk.Image]:
    """Unusual but valid cases: one slice, 10 mm slices, oblique, five pixel types, in-plane 64 to 1024."""
    c, s = np.cos(np.radians(10.0)), np.sin(np.radians(10.0))
    oblique = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)  # 10 degrees about the patient axis
    return {
        "single_slice_0000.nii.gz": _image(_ct((1, 96, 96))),
        "thick10mm.nii.gz": _image(_ct((5, 96, 96), np.int32), spacing=(0.9, 0.9, 10.0)),
        "oblique.nii": _image(_ct((6, 80, 80), np.float32), direction=oblique),
        "bytes_uint8.nii.gz": _image(_ct((4, 64, 64), np.uint8)),
        "doubles.nii.gz": _image(_ct((4, 64, 64), np.float64)),
        "wide1024.nii.gz": _image(_ct((2, 1024, 1024)), spacing=(0.4, 0.4, 2.5)),
    }


def write_good_inputs(folder: Path) -> list[str]:
    """Write `good_inputs()` into folder; return their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = good_inputs()
    for name, image in cases.items():
        sitk.WriteImage(image, str(folder / name))
    return list(cases)


def test_every_bad_input_is_refused_with_its_reason(tmp_path):
    expected = write_bad_inputs(tmp_path)
    for name, word in expected.items():
        with pytest.raises(io.InputError, match=word) as info:
            io.read_ct(tmp_path / name)
        assert str(info.value), name


def test_absurd_size_is_refused_from_the_header_stating_the_limit(tmp_path):
    write_bad_inputs(tmp_path)
    with pytest.raises(io.InputError, match=str(io.MAX_VOXELS)):
        io.read_ct(tmp_path / "absurd_size.nii.gz")


def test_unusual_valid_inputs_are_read_with_their_geometry(tmp_path):
    write_good_inputs(tmp_path)
    for name, written in good_inputs().items():
        image = io.read_ct(tmp_path / name)
        assert image.GetSize() == written.GetSize() and image.GetPixelID() == written.GetPixelID(), name
        # NIfTI stores spacing and origin as float32 and the direction as a quaternion: round-off only.
        np.testing.assert_allclose(image.GetSpacing(), written.GetSpacing(), rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(image.GetOrigin(), written.GetOrigin(), atol=1e-4, err_msg=name)
        np.testing.assert_allclose(image.GetDirection(), written.GetDirection(), atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(written), name)


@pytest.mark.parametrize("writer", ["isal", "itk"])
def test_write_mask_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch, writer):
    mask = sitk.Image(8, 8, 3, sitk.sitkUInt8)
    if writer == "itk":
        monkeypatch.setitem(sys.modules, "isal", None)
    io.write_mask(mask, tmp_path / "case.nii.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["case.nii.gz"]
    assert sitk.ReadImage(str(tmp_path / "case.nii.gz")).GetSize() == (8, 8, 3)

    if writer == "itk":
        def failing_write(image, path, useCompression=False):
            Path(path).write_bytes(b"half a file")
            raise RuntimeError("disk full")

        monkeypatch.setattr(sitk, "WriteImage", failing_write)
    else:
        class FailingStream:  # the header goes out, then the disk fills
            calls = 0

            def compress(self, data):
                self.calls += 1
                if self.calls > 1:
                    raise RuntimeError("disk full")
                return b"half a file"

        from isal import isal_zlib

        monkeypatch.setattr(isal_zlib, "compressobj", lambda *args: FailingStream())
    with pytest.raises(RuntimeError, match="disk full"):
        io.write_mask(mask, tmp_path / "other.nii.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["case.nii.gz"]


_GEOMETRIES = {  # size, spacing, origin, direction
    "axial": ((96, 80, 7), (0.8, 0.8, 2.5), (-200.0, 150.0, 30.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
    "flipped_one_slice": ((300, 20, 1), (0.7, 0.75, 5.0), (10.0, -20.0, 300.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1)),
    "oblique": ((33, 45, 9), (1.0, 1.2, 3.0), (1.0, 2.0, 3.0), (0.955, -0.296, 0, 0.296, 0.955, 0, 0, 0, 1)),
    "permuted": ((5, 260, 40), (4.0, 1.1, 0.9), (0.0, 0.0, 0.0), (0, 0, 1, 0, 1, 0, -1, 0, 0)),
}


@pytest.mark.parametrize("name", _GEOMETRIES)
def test_a_mask_written_through_isal_holds_the_bytes_itk_writes(tmp_path, name):
    size, spacing, origin, direction = _GEOMETRIES[name]
    mask = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 14, size[::-1]).astype(np.uint8))
    mask.SetSpacing(spacing)
    mask.SetOrigin(origin)
    mask.SetDirection(direction)
    sitk.WriteImage(mask, str(tmp_path / "itk.nii"))
    assert io.write_gzip_nifti(mask, tmp_path / "isal.nii.gz")
    assert gzip.decompress((tmp_path / "isal.nii.gz").read_bytes()) == (tmp_path / "itk.nii").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["isal.nii.gz", "itk.nii"]  # the header's probe is gone


def test_write_mask_compresses_a_uint8_mask_with_isal_and_anything_else_with_itk(tmp_path, monkeypatch):
    written_by_itk = []
    itk_write = sitk.WriteImage
    def recorded_write(image, path, *args, **kwargs):
        written_by_itk.append(Path(path).name)
        itk_write(image, path, *args, **kwargs)

    monkeypatch.setattr(sitk, "WriteImage", recorded_write)
    io.write_mask(sitk.Image(8, 8, 3, sitk.sitkUInt8), tmp_path / "mask.nii.gz")
    assert not [n for n in written_by_itk if n.endswith(".nii.gz")]  # only the one-voxel header probe, a .nii
    io.write_mask(sitk.Image(8, 8, 3, sitk.sitkInt16), tmp_path / "int16.nii.gz")
    io.write_mask(sitk.Image(8, 8, 3, sitk.sitkUInt8), tmp_path / "plain.nii")
    io.write_mask(sitk.Image(8, 8, sitk.sitkUInt8), tmp_path / "flat.nii.gz")
    pid = os.getpid()
    by_itk = [n for n in written_by_itk if not n.endswith(".header.nii")]
    assert by_itk == [f".int16.nii.gz.{pid}.tmp.nii.gz", f".plain.nii.{pid}.tmp.nii", f".flat.nii.gz.{pid}.tmp.nii.gz"]
    assert sitk.ReadImage(str(tmp_path / "flat.nii.gz")).GetSize() == (8, 8)
    written = {"mask.nii.gz": sitk.sitkUInt8, "int16.nii.gz": sitk.sitkInt16, "plain.nii": sitk.sitkUInt8}
    for name, pixel in written.items():
        image = sitk.ReadImage(str(tmp_path / name))
        assert image.GetSize() == (8, 8, 3) and image.GetPixelID() == pixel


def test_without_isal_the_mask_is_written_by_itk(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "isal", None)
    assert not io.write_gzip_nifti(sitk.Image(8, 8, 3, sitk.sitkUInt8), tmp_path / "mask.nii.gz")
    assert not list(tmp_path.iterdir())


def test_output_names_drop_the_channel_suffix_only():
    assert io.output_name("FLARE22_001_0000.nii.gz") == "FLARE22_001.nii.gz"
    assert io.output_name("scan.nii") == "scan.nii"
    assert io.output_name("a_0000_b.nii.gz") == "a_0000_b.nii.gz"


def test_list_cases_takes_nifti_files_and_skips_hidden_and_others(tmp_path):
    for name in ("b.nii.gz", "a.nii", ".hidden.nii.gz", "notes.txt", "c.nii.gz.tmp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dir.nii.gz").mkdir()
    assert [p.name for p in io.list_cases(tmp_path)] == ["a.nii", "b.nii.gz"]


# ------------------------------------------------------------------------------ voxels decompressed by isal
_SCL_SLOPE = 112  # NIfTI-1: scl_slope float32 at 112, scl_inter at 116


def _nii_bytes(image: sitk.Image, tmp_path: Path) -> bytes:
    """The uncompressed NIfTI-1 file ITK writes for `image`."""
    sitk.WriteImage(image, str(tmp_path / "plain.nii"))
    return (tmp_path / "plain.nii").read_bytes()


def _fast_and_itk(path: Path) -> tuple[sitk.Image | None, sitk.Image]:
    return io.read_gzip_voxels(path, io._header(path)), sitk.ReadImage(str(path))


def _assert_same_image(found: sitk.Image, expected: sitk.Image) -> None:
    assert found.GetPixelID() == expected.GetPixelID() and found.GetSize() == expected.GetSize()
    assert (found.GetOrigin(), found.GetSpacing(), found.GetDirection()) == (
        expected.GetOrigin(), expected.GetSpacing(), expected.GetDirection()
    )  # fmt: skip
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(found), sitk.GetArrayViewFromImage(expected))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("direction", [None, (-1, 0, 0, 0, -1, 0, 0, 0, 1), (0, 0, 1, 0, 1, 0, -1, 0, 0)])
def test_a_plain_nii_gz_read_through_isal_is_the_image_itk_reads(tmp_path, dtype, direction):
    vol = (np.random.default_rng(0).normal(0, 60, (7, 33, 45)) + (100 if np.dtype(dtype).kind == "u" else 0))
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(_image(vol.astype(dtype), direction=direction), str(path), useCompression=True)
    fast, itk = _fast_and_itk(path)
    assert fast is not None  # isal took it
    _assert_same_image(fast, itk)


def test_a_nii_gz_of_two_gzip_members_is_read_whole(tmp_path):
    raw = _nii_bytes(_image(_ct()), tmp_path)
    path = tmp_path / "ct.nii.gz"
    path.write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]))  # as `cat a.gz b.gz` makes
    fast, itk = _fast_and_itk(path)
    assert fast is not None
    _assert_same_image(fast, itk)
    _assert_same_image(io.read_ct(path), itk)


def test_a_nii_gz_of_mostly_one_value_is_inflated_a_bounded_part_at_a_time(tmp_path):
    vol = np.zeros((300, 256, 256), np.uint8)  # 19.7 MB of voxels in a file of about 20 kB
    vol[150, 100:110, 100:110] = 7
    path = tmp_path / "flat.nii.gz"
    sitk.WriteImage(_image(vol), str(path), useCompression=True)
    fast, itk = _fast_and_itk(path)
    assert fast is not None and path.stat().st_size < io._GZIP_OUTPUT_BYTES // 100
    _assert_same_image(fast, itk)


def test_bytes_after_the_voxels_are_ignored_as_itk_ignores_them(tmp_path):
    raw = _nii_bytes(_image(_ct()), tmp_path)
    path = tmp_path / "ct.nii.gz"
    path.write_bytes(gzip.compress(raw + bytes(range(200))))
    fast, itk = _fast_and_itk(path)
    assert fast is not None
    _assert_same_image(fast, itk)


def test_compressed_voxels_damaged_in_the_middle_are_refused_with_the_reason(tmp_path):
    vol = np.random.default_rng(0).integers(-1000, 1000, (20, 128, 128)).astype(np.int16)  # compresses little
    data = bytearray(gzip.compress(_nii_bytes(_image(vol), tmp_path)))
    data[-len(data) // 4 : -len(data) // 4 + 64] = bytes(64)  # the gzip trailer (size) intact: only inflating sees it
    path = tmp_path / "damaged.nii.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(io.InputError, match="corrupt"):
        io.read_ct(path)


@pytest.mark.parametrize(("slope", "inter"), [(2.0, -5.0), (2.0, 0.0), (1.0, -5.0)])
def test_scaled_intensities_are_left_to_itk(tmp_path, slope, inter):
    raw = bytearray(_nii_bytes(_image(_ct(dtype=np.float32).astype(np.float32)), tmp_path))
    raw[_SCL_SLOPE : _SCL_SLOPE + 8] = struct.pack("<ff", slope, inter)  # float voxels: ITK keeps float32, scales
    path = tmp_path / "ct.nii.gz"
    path.write_bytes(gzip.compress(bytes(raw)))
    fast, itk = _fast_and_itk(path)
    assert fast is None
    _assert_same_image(io.read_ct(path), itk)
    assert sitk.GetArrayViewFromImage(itk).min() == slope * -1000 + inter  # the scaling applied


def test_a_header_of_another_byte_order_or_version_is_left_to_itk(tmp_path):
    voxels = np.zeros(16, np.uint8)
    for first in (struct.pack(">i", 348), struct.pack("<i", 540)):
        path = tmp_path / "other.nii.gz"
        path.write_bytes(gzip.compress(first + bytes(348) + bytes(range(16))))
        assert io._inflate_into(voxels, path, skip=352, inflate=__import__("isal").isal_zlib) is None
    path.write_bytes(gzip.compress(struct.pack("<i", 348) + bytes(348) + bytes(range(16))))
    assert io._inflate_into(voxels, path, skip=352, inflate=__import__("isal").isal_zlib) == 16
    assert voxels.tolist() == list(range(16))


def _scaled_float_file(tmp_path: Path, vol: np.ndarray) -> Path:
    """A float32 `.nii.gz` with scl_slope 2: the files ITK, not isal, reads."""
    raw = bytearray(_nii_bytes(_image(vol.astype(np.float32)), tmp_path))
    raw[_SCL_SLOPE : _SCL_SLOPE + 8] = struct.pack("<ff", 2.0, 0.0)
    path = tmp_path / "scaled.nii.gz"
    path.write_bytes(gzip.compress(bytes(raw)))
    return path


def test_only_files_itk_reads_are_inflated_beforehand_for_the_payload_check(tmp_path, monkeypatch):
    checked = []
    monkeypatch.setattr(io, "check_nifti_payload", lambda path, reader: checked.append(path.name))
    plain = tmp_path / "plain.nii.gz"
    sitk.WriteImage(_image(_ct(dtype=np.float32)), str(plain), useCompression=True)
    io.read_ct(plain)  # isal's read: NaN and truncation seen in its own pass
    io.read_ct(_scaled_float_file(tmp_path, _ct()))
    assert checked == ["scaled.nii.gz"]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_infinity_in_a_file_itk_reads_is_refused(tmp_path, bad):
    vol = _ct(dtype=np.float32)
    vol[2, 30, 30] = bad
    with pytest.raises(io.InputError, match="NaN or infinite"):
        io.read_ct(_scaled_float_file(tmp_path, vol))


def test_a_4d_header_is_left_to_itk(tmp_path):
    raw = bytearray(_nii_bytes(_image(_ct()), tmp_path))
    raw[_DIM : _DIM + 2], raw[_DIM + 8 : _DIM + 10] = struct.pack("<h", 4), struct.pack("<h", 1)  # dim[0] 4, dim[4] 1
    path = tmp_path / "ct.nii.gz"
    path.write_bytes(gzip.compress(bytes(raw)))
    assert _fast_and_itk(path)[0] is None


def test_without_isal_itk_reads(tmp_path, monkeypatch):
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(_image(_ct()), str(path), useCompression=True)
    monkeypatch.setitem(sys.modules, "isal", None)  # `import isal` raises ImportError
    fast, itk = _fast_and_itk(path)
    assert fast is None
    _assert_same_image(io.read_ct(path), itk)


def test_read_ahead_holds_no_case_above_its_byte_cap(tmp_path):
    """The read-ahead schedules a NIfTI only if its voxels (by the header) fit under max_bytes: a larger case is
    read in its turn, so the read-ahead adds at most the cap to a run's peak; a reader of its own is not capped."""
    small, large = tmp_path / "small_0000.nii.gz", tmp_path / "large_0000.nii.gz"
    sitk.WriteImage(sitk.Image(32, 32, 8, sitk.sitkInt16), str(small))  # 16 KiB of voxels
    sitk.WriteImage(sitk.Image(32, 32, 8, sitk.sitkFloat32), str(large))  # 32 KiB
    with io.ReadAhead(max_bytes=32 * 32 * 8 * 2) as ahead:
        ahead.schedule(small)
        ahead.schedule(large)
        assert set(ahead._scheduled) == {os.path.abspath(small)}
        assert ahead.read(large).GetSize() == (32, 32, 8)  # still read, in its turn
        assert ahead.read(small).GetSize() == (32, 32, 8)
    assert io.READ_AHEAD_MAX_BYTES == 128 * 2**20
    with io.ReadAhead(read=io.read_ct, max_bytes=1) as ahead:  # another reader: its cases are not sized
        ahead.schedule(large)
        assert set(ahead._scheduled) == {os.path.abspath(large)}
