"""Reading refuses bad files with a reason before touching voxels; writing is atomic; case names map as nnU-Net.

    pytest tests/test_io.py -x -q

`write_bad_inputs` and `write_good_inputs` are also used by tests/test_cli.py for the mixed folder.
"""

from __future__ import annotations

import gzip
import struct
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


def test_write_mask_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    mask = sitk.Image(8, 8, 3, sitk.sitkUInt8)
    io.write_mask(mask, tmp_path / "case.nii.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["case.nii.gz"]
    assert sitk.ReadImage(str(tmp_path / "case.nii.gz")).GetSize() == (8, 8, 3)

    def failing_write(image, path, useCompression):
        Path(path).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        io.write_mask(mask, tmp_path / "other.nii.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["case.nii.gz"]


def test_output_names_drop_the_channel_suffix_only():
    assert io.output_name("FLARE22_001_0000.nii.gz") == "FLARE22_001.nii.gz"
    assert io.output_name("scan.nii") == "scan.nii"
    assert io.output_name("a_0000_b.nii.gz") == "a_0000_b.nii.gz"


def test_list_cases_takes_nifti_files_and_skips_hidden_and_others(tmp_path):
    for name in ("b.nii.gz", "a.nii", ".hidden.nii.gz", "notes.txt", "c.nii.gz.tmp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dir.nii.gz").mkdir()
    assert [p.name for p in io.list_cases(tmp_path)] == ["a.nii", "b.nii.gz"]
