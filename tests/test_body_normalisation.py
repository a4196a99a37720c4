"""The body finder, the crop and the normalisation kinds (flare_infer.preprocess): same body, same input.

    pytest tests/test_body_normalisation.py -q

The acquisition changes come from training.acquisition and keep every existing voxel where it was in space.
The model spacing in these tests equals the CT's own in-plane spacing, so widening the field of view by whole
voxels keeps the resampled grids aligned and the network's input can be compared voxel for voxel: ct_window
must then be identical inside the body (tolerance 1e-5, float32 round-off), while the paper's global rule is not.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from flare_infer.pipeline import predict_case, prepare
from flare_infer.preprocess import AIR_HU, find_body, mean_std
from flare_infer.spec import ModelSpec, Normalization
from training.acquisition import add_table, crop_fov_to_body, pad_outside_circle, widen_fov
from training.phantoms import LABELLED_DOMAIN, generate_case

REAL_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-ct" / "example_ct.nii.gz"
WINDOW = Normalization("ct_window", window_hu=(-100.0, 300.0))
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def phantom() -> tuple[sitk.Image, sitk.Image]:
    return generate_case(11, LABELLED_DOMAIN, "small", geometry="ras")


@pytest.fixture(scope="module")
def real_ct() -> tuple[sitk.Image, sitk.Image]:
    if not REAL_CT.is_file():
        pytest.skip(f"{REAL_CT} is absent (a clone without ../shared): the real-CT check needs it")
    image = sitk.ReadImage(str(REAL_CT))
    label = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    label.CopyInformation(image)
    return image, label


def _spec(image: sitk.Image, norm: Normalization) -> ModelSpec:
    s = image.GetSpacing()
    return ModelSpec(1, (s[0], s[1], 4.0), norm)


def _changes(image, label) -> dict[str, sitk.Image]:
    wide = widen_fov(image, label, 20)
    return {
        "pad_-3024": pad_outside_circle(image, label, -3024)[0],
        "pad_-2048": pad_outside_circle(image, label, -2048)[0],
        "pad_0": pad_outside_circle(image, label, 0)[0],
        "wide_air": wide[0],
        "wide_pad_0": pad_outside_circle(*wide, 0)[0],
        "wide_pad_-3024": pad_outside_circle(*wide, -3024)[0],
        "table": add_table(image, label)[0],
        "fov_body_box": crop_fov_to_body(image, label, margin_mm=20)[0],
    }


def _full(p) -> np.ndarray:
    """The network input on the whole resampled grid, NaN outside the body's box."""
    full = np.full(p.full_shape_zyx, np.nan, np.float32)
    full[p.box_zyx] = p.vol_zyx
    return full


def _on_reference_voxels(image: sitk.Image, changed: sitk.Image, spec: ModelSpec):
    """(reference input, changed input moved onto the reference's voxels, reference body), all (Z, Y, X).

    Both resampled grids share spacing and direction and, here, voxel positions up to a whole-voxel shift.
    """
    ref, new = prepare(image, spec), prepare(changed, spec)
    m = np.array(ref.resampled.GetDirection()).reshape(3, 3) @ np.diag(ref.resampled.GetSpacing())
    shift_xyz = np.linalg.solve(m, np.subtract(new.resampled.GetOrigin(), ref.resampled.GetOrigin()))
    assert np.allclose(shift_xyz, np.round(shift_xyz), atol=1e-3), f"grids not aligned: {shift_xyz}"
    shift = np.round(shift_xyz[::-1]).astype(int)  # ref index of new's voxel 0, (z, y, x)
    a, b = _full(ref), _full(new)
    moved = np.full(a.shape, np.nan, np.float32)
    dst = tuple(slice(max(0, k), min(n, k + m_)) for k, n, m_ in zip(shift, a.shape, b.shape, strict=True))
    src = tuple(slice(d.start - k, d.stop - k) for d, k in zip(dst, shift, strict=True))
    moved[dst] = b[src]
    body = find_body(sitk.GetArrayViewFromImage(ref.resampled), spec.spacing_xyz_mm).mask_zyx
    return a, moved, body


def _largest_difference(image, changed, spec) -> float:
    from scipy import ndimage

    ref, moved, body = _on_reference_voxels(image, changed, spec)
    inner = ndimage.binary_erosion(body, iterations=2)  # the outline moves with an interpolated circle rim
    found = inner & ~np.isnan(moved)
    assert found.sum() > 0.9 * inner.sum(), f"only {found.sum()} of {inner.sum()} body voxels found again"
    return float(np.abs(ref[found] - moved[found]).max())


@pytest.mark.parametrize("change", ["pad_-3024", "pad_-2048", "pad_0", "wide_air", "wide_pad_0", "table",
                                    "fov_body_box"])
def test_ct_window_input_inside_the_body_ignores_padding_fov_and_table_on_a_phantom(phantom, change):
    image, label = phantom
    spec = _spec(image, WINDOW)
    assert _largest_difference(image, _changes(image, label)[change], spec) <= TOLERANCE


# The real CT's field of view is tight: the circle inscribed in it cuts the body, so it is padded once widened.
@pytest.mark.parametrize("change", ["wide_air", "wide_pad_-3024", "wide_pad_0", "table", "fov_body_box"])
def test_ct_window_input_inside_the_body_ignores_padding_fov_and_table_on_the_real_ct(real_ct, change):
    image, label = real_ct
    spec = _spec(image, WINDOW)
    assert _largest_difference(image, _changes(image, label)[change], spec) <= TOLERANCE


@pytest.mark.parametrize("change", ["pad_-3024", "wide_air", "pad_0"])
def test_the_papers_global_rule_does_change_with_the_acquisition(phantom, change):
    """The defect the new kinds remove, and proof that the comparison above can see a difference."""
    image, label = phantom
    spec = _spec(image, Normalization("mean_std_clip", 3.0))
    assert _largest_difference(image, _changes(image, label)[change], spec) > 0.02


def test_body_mean_std_ignores_padding_and_fov_but_not_the_z_coverage(phantom):
    image, label = phantom
    spec = _spec(image, Normalization("body_mean_std_clip", 3.0))
    for change in ("pad_-3024", "pad_0", "wide_air"):
        assert _largest_difference(image, _changes(image, label)[change], spec) <= 1e-4, change
    n = image.GetSize()[2]
    half = image[:, :, : n // 2]  # half the z-coverage: the body's statistics change
    ref, moved, _ = _on_reference_voxels(image, half, spec)
    found = ~np.isnan(ref) & ~np.isnan(moved)
    assert np.abs(ref[found] - moved[found]).max() > 0.01


def test_old_mean_std_clip_sidecars_load_and_normalise_exactly_as_before(phantom):
    old = {"format": "flare-onnx/1", "input_channels": 1, "spacing_xyz_mm": [3.0, 3.0, 4.0],
           "normalization": {"kind": "mean_std_clip", "n_std": 3.0}, "output": "logits",
           "labels": ModelSpec().labels}  # fmt: skip
    spec = ModelSpec.from_dict(old)
    assert spec.to_dict()["normalization"] == {"kind": "mean_std_clip", "n_std": 3.0}
    p = prepare(phantom[0], spec)
    hu = sitk.GetArrayViewFromImage(p.resampled).astype(np.float64)
    mean, std = hu.mean(), hu.std()  # every voxel of the resampled volume, as before
    expected = np.clip((hu - (mean - 3 * std)) / (6 * std), 0, 1)[p.box_zyx]
    np.testing.assert_allclose(p.vol_zyx, expected, atol=2e-6)
    assert np.allclose(mean_std(sitk.GetArrayViewFromImage(p.resampled)), (mean, std), rtol=1e-5)


def test_ct_window_maps_the_window_to_0_1_and_outside_the_body_to_air(phantom):
    p = prepare(phantom[0], _spec(phantom[0], WINDOW))
    hu = sitk.GetArrayViewFromImage(p.resampled)[p.box_zyx]
    body = find_body(sitk.GetArrayViewFromImage(p.resampled), p.resampled.GetSpacing()).mask_zyx[p.box_zyx]
    expected = np.clip((np.where(body, hu, AIR_HU) + 100.0) / 400.0, 0, 1)
    np.testing.assert_allclose(p.vol_zyx, expected, atol=1e-6)
    assert (~body).any() and body.any()


def test_body_mean_std_clip_takes_its_statistics_over_the_body_and_makes_outside_it_air():
    arr = sitk.GetArrayFromImage(_body_ct())
    arr[arr > -500] += np.random.default_rng(0).normal(0, 30, (arr > -500).sum()).astype(np.int16)  # tissue, not one HU
    arr[:, 50:52, 15:66] = 200  # a plate under the back, inside the box's margin (as the table test below)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((3.0, 3.0, 4.0))
    p = prepare(image, ModelSpec(1, (3.0, 3.0, 4.0), Normalization("body_mean_std_clip", n_std=3.0)))
    hu = sitk.GetArrayViewFromImage(p.resampled)
    body = find_body(hu, p.resampled.GetSpacing()).mask_zyx
    mean, std = hu[body].astype(np.float64).mean(), hu[body].astype(np.float64).std()
    expected = np.clip((np.where(body, hu, AIR_HU)[p.box_zyx] - (mean - 3 * std)) / (6 * std), 0, 1)
    np.testing.assert_allclose(p.vol_zyx, expected, atol=2e-6)
    assert (np.clip((hu[p.box_zyx] - (mean - 3 * std)) / (6 * std), 0, 1) > expected + 0.1).any()  # the plate


def test_sidecar_records_the_window_and_rejects_a_bad_one():
    d = ModelSpec(normalization=Normalization("ct_window", window_hu=(-90.0, 770.0), stats={"cases": 30})).to_dict()
    assert d["normalization"] == {"kind": "ct_window", "window_hu": [-90.0, 770.0], "stats": {"cases": 30}}
    assert ModelSpec.from_dict(d).normalization.window_hu == (-90.0, 770.0)
    for bad in ({"kind": "ct_window"}, {"kind": "ct_window", "window_hu": [5, 5]}, {"kind": "zscore"}):
        with pytest.raises(ValueError, match="normalization"):
            ModelSpec.from_dict({**d, "normalization": bad})


# ---------------------------------------------------------------------------------------- edge cases
def _constant_ct(value: float, size=(40, 40, 12)) -> sitk.Image:
    image = sitk.Image(size, sitk.sitkInt16) + int(value)
    image.SetSpacing((3.0, 3.0, 4.0))
    return image


def _zeros_model(batch: np.ndarray) -> np.ndarray:
    scores = np.zeros((batch.shape[0], 14, *batch.shape[2:]), np.float32)
    scores[:, 1] = 5.0  # "liver" everywhere the network is asked: outside the body box it is never asked
    return scores


@pytest.mark.parametrize("value", [-1024, -3024])
def test_a_ct_without_a_body_gives_all_background_and_one_log_line(value, caplog):
    image = _constant_ct(value)
    with caplog.at_level(logging.WARNING, logger="flare_infer"):
        mask = predict_case(image, _zeros_model, ModelSpec(1, (3.0, 3.0, 4.0), WINDOW), batch_size=4)
    assert sitk.GetArrayViewFromImage(mask).max() == 0
    assert mask.GetSize() == image.GetSize()
    assert [r.getMessage() for r in caplog.records if "no body found" in r.getMessage()] != []


def _body_ct(with_arms: bool = False, edge: bool = False) -> sitk.Image:
    z, y, x = np.mgrid[0:12, 0:60, 0:80]
    cx = 6 if edge else 40
    trunk = ((x - cx) / 25.0) ** 2 + ((y - 30) / 18.0) ** 2 <= 1
    arr = np.where(trunk, 40, -1000).astype(np.int16)
    if with_arms:
        for ax in (3, 77):
            arr[((x - ax) / 2.5) ** 2 + ((y - 30) / 4.0) ** 2 <= 1] = 60
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((3.0, 3.0, 4.0))
    return image


def test_a_body_touching_the_edge_of_the_field_of_view_is_found_and_boxed():
    image = _body_ct(edge=True)
    body = find_body(sitk.GetArrayViewFromImage(image), (3.0, 3.0, 4.0))
    assert body.box_zyx[2].start == 0 and body.mask_zyx[:, 30, 0].all() and not body.notes
    mask = predict_case(image, _zeros_model, ModelSpec(1, (3.0, 3.0, 4.0), WINDOW), batch_size=4)
    assert sitk.GetArrayViewFromImage(mask)[:, 30, 0].all()


def test_arms_beside_the_trunk_are_left_out_of_the_body_and_the_box():
    image = _body_ct(with_arms=True)
    body = find_body(sitk.GetArrayViewFromImage(image), (3.0, 3.0, 4.0))
    assert not body.mask_zyx[:, 30, 3].any() and body.mask_zyx[:, 30, 40].all()
    # trunk x in 15..65, margin 15 mm = 5 voxels: 10..70; the arms' centres (3, 77) are outside
    assert (body.box_zyx[2].start, body.box_zyx[2].stop) == (10, 71)
    mask = predict_case(image, _zeros_model, ModelSpec(1, (3.0, 3.0, 4.0), WINDOW), batch_size=4)
    assert sitk.GetArrayViewFromImage(mask)[:, 30, 3].max() == 0


def test_padding_of_zero_hu_touching_the_body_is_not_taken_for_body(phantom):
    image, label = phantom
    ref = find_body(sitk.GetArrayViewFromImage(image), image.GetSpacing())
    padded = pad_outside_circle(image, label, 0)[0]
    found = find_body(sitk.GetArrayViewFromImage(padded), image.GetSpacing())
    assert found.padding_hu == 0.0
    for a, b in zip(found.box_zyx, ref.box_zyx, strict=True):
        assert abs(a.start - b.start) <= 1 and abs(a.stop - b.stop) <= 1


def test_intensities_that_are_not_hounsfield_units_are_named_with_their_range(caplog):
    arr = (sitk.GetArrayFromImage(_body_ct()).astype(np.int32) + 1024).astype(np.uint16)  # no rescale: min 24
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((3.0, 3.0, 4.0))
    with caplog.at_level(logging.WARNING, logger="flare_infer"):
        predict_case(image, _zeros_model, ModelSpec(1, (3.0, 3.0, 4.0), WINDOW), batch_size=4)
    lines = [r.getMessage() for r in caplog.records if "Hounsfield" in r.getMessage()]
    assert len(lines) == 1 and "24..1064" in lines[0]


def test_a_table_inside_the_box_is_air_to_the_network():
    arr = sitk.GetArrayFromImage(_body_ct())
    arr[:, 50:52, 15:66] = 200  # a plate 2 voxels (6 mm) under the back (trunk y 12..48): inside the 15 mm margin
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((3.0, 3.0, 4.0))
    p = prepare(image, ModelSpec(1, (3.0, 3.0, 4.0), WINDOW))
    (z0, y0, x0) = (s.start for s in p.box_zyx)
    assert p.box_zyx[1].stop > 52  # the plate's rows are in the box ...
    assert p.vol_zyx[:, 50 - y0 : 52 - y0, 20 - x0 : 60 - x0].max() == 0.0  # ... and the network sees air there
    assert p.vol_zyx[:, 30 - y0, 40 - x0].min() > 0.3  # the trunk (40 HU) is seen: (40 + 100) / 400


# ------------------------------------------------------------------------------ no organ lost to the crop
def _every_organ_voxel_in_the_box(image: sitk.Image, label: sitk.Image, spacing=(3.0, 3.0, 4.0)) -> None:
    from flare_infer.pipeline import label_on_prepared

    p = prepare(image, ModelSpec(1, spacing, WINDOW))
    inside = label_on_prepared(label, p)  # raises if a labelled voxel lies outside the body's box
    assert np.count_nonzero(inside) > 0


@pytest.mark.parametrize("name", ["FLARE22_Ex_0001", "FLARE22_Ex_0002"])
def test_the_body_box_holds_every_organ_voxel_of_the_examples(name):
    root = Path(__file__).resolve().parents[1] / "examples"
    image = sitk.ReadImage(str(root / "inputs" / f"{name}_0000.nii.gz"))
    _every_organ_voxel_in_the_box(image, sitk.ReadImage(str(root / "labels" / f"{name}.nii.gz")))


def test_the_body_box_holds_every_organ_voxel_of_the_real_ct(real_ct):
    image, _ = real_ct
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(REAL_CT.with_name("example_seg_fast_force_split.nii.gz"))))
    lut = np.zeros(256, np.uint8)
    for ts, flare in {5: 1, 2: 2, 1: 3, 7: 4, 52: 5, 63: 6, 8: 7, 9: 8, 4: 9, 15: 10, 6: 11, 19: 12, 3: 13}.items():
        lut[ts] = flare  # the silver-standard label map's TotalSegmentator numbering (shared/data/real-ct/README.md)
    label = sitk.GetImageFromArray(lut[seg])
    label.CopyInformation(image)
    _every_organ_voxel_in_the_box(image, label)


def test_the_body_box_holds_every_organ_voxel_of_a_full_size_scan_with_table_and_zero_padding():
    from training.acquisition import LABELLED_ACQUISITION, draw_acquisition

    seed = next(s for s in range(500) if (a := draw_acquisition(s, LABELLED_ACQUISITION)).padding == 0.0
                and a.table is not None)  # fmt: skip
    image, label = generate_case(seed, LABELLED_DOMAIN, "full", geometry="lps", acquisition=LABELLED_ACQUISITION)
    _every_organ_voxel_in_the_box(image, label, spacing=(1.5, 1.5, 2.5))


@pytest.mark.parametrize("air", [((0, 0), (0, 0), (0, 0)), ((2, 3), (5, 7), (3, 4))], ids=["filling", "in_air"])
def test_in_plane_holes_are_those_binary_fill_holes_fills_slice_by_slice(air):
    from scipy import ndimage

    from flare_infer.preprocess import _holes_in_plane

    mask = ndimage.binary_opening(np.random.default_rng(0).random((20, 60, 70)) > 0.45)
    mask[-1, -3:, -3:] = True
    mask[-1, -2, -2] = False  # a hole in the last slice, against the mask's last row and column
    mask[0, :3, :3] = True
    mask[0, 1, 1] = False  # and in the first, against its first row and column
    mask = np.pad(mask, air)
    expected = np.stack([ndimage.binary_fill_holes(s) for s in mask])
    assert (expected & ~mask).any()  # there are holes to fill
    np.testing.assert_array_equal(mask | _holes_in_plane(mask), expected)


def test_the_body_is_the_largest_component_above_500_hu_with_its_in_plane_holes_filled():
    from scipy import ndimage

    rng = np.random.default_rng(3)
    hu = np.full((30, 90, 100), -1000.0, np.float32)  # air around: the body's box is a part of the volume
    hu[4:26, 20:70, 15:80] = rng.normal(40, 20, (22, 50, 65))  # the trunk
    hu[8:22, 30:45, 25:40] = -900  # a lung: a hole inside the trunk
    hu[4:26, 20:70, 17:19] = -1000  # an air gap splitting off the trunk's left edge as a second, smaller part
    hu[10:20, 80:85, 10:90] = 300  # a table under it, a third component
    body = find_body(hu, (3.0, 3.0, 4.0))
    components, n = ndimage.label(hu > -500)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    largest = components == sizes.argmax()
    expected = np.stack([ndimage.binary_fill_holes(s) for s in largest])
    assert n == 3 and (expected & ~largest).any()
    np.testing.assert_array_equal(body.mask_zyx, expected)


def test_of_two_equal_largest_parts_the_body_is_the_one_met_first_in_memory_order():
    hu = np.full((10, 40, 60), -1000.0, np.float32)
    hu[2:8, 10:30, 35:50] = 40.0  # met first in C order (row 10 before row 12), although further right
    hu[2:8, 12:32, 5:20] = 40.0  # the same size
    body = find_body(hu, (3.0, 3.0, 4.0))
    assert body.mask_zyx[5, 20, 40] and not body.mask_zyx[5, 20, 10]


def test_the_largest_part_wins_when_the_volume_is_counted_in_parts():
    hu = np.full((128, 100, 100), -1000.0, np.float32)  # the labelled box: 1.28 M voxels, counted per 1 M
    hu[0:64, 0:40, 0:40] = 40.0  # the larger part, all in the first million voxels
    hu[90:128, 60:100, 60:100] = 40.0  # the smaller one, most of it in the last part counted
    body = find_body(hu, (3.0, 3.0, 4.0))
    assert body.mask_zyx[30, 20, 20] and not body.mask_zyx[110, 80, 80]


def test_a_view_of_an_images_voxels_outlives_every_other_reference_to_the_image():
    import gc

    import SimpleITK as sitk

    from flare_infer.geometry import array_view

    expected = np.arange(64 * 64 * 16, dtype=np.uint32).reshape(16, 64, 64)
    view = array_view(sitk.GetImageFromArray(expected))  # the image's only reference is the view's
    gc.collect()
    others = [sitk.Image([64, 64, 16], sitk.sitkUInt32) + 7 for _ in range(8)]  # would reuse freed voxels
    np.testing.assert_array_equal(view, expected)
    assert not view.flags.writeable and len(others) == 8


def test_predicting_does_not_import_scipy(tmp_path):
    """scipy's import costs about 0.5 s of CPU per process (docs/PERFORMANCE.md); only lcc clean-up, FOV padding at or
    above -500 HU and evaluation need it."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, SimpleITK as sitk\n"
        "from flare_infer import pipeline\n"
        "from flare_infer.spec import ModelSpec\n"
        "hu = np.full((30, 90, 100), -1000, np.int16); hu[4:26, 20:70, 15:80] = 40; hu[8:22, 30:45, 25:40] = -900\n"
        "image = sitk.GetImageFromArray(hu); image.SetSpacing((1.5, 1.5, 3.0))\n"
        "prepared = pipeline.prepare(image, ModelSpec(spacing_xyz_mm=(3.0, 3.0, 4.0)))\n"
        "assert prepared.vol_zyx.size, 'no body found'\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'scipy'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
