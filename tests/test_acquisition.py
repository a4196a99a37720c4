"""Acquisition variation (training/acquisition.py): draws, rates, the generator's scans, single perturbations.

    pytest tests/test_acquisition.py -x -q
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from training.acquisition import (
    LABELLED_ACQUISITION,
    PADDING_VALUES,
    WIDE_ACQUISITION,
    Grid,
    TableSpec,
    add_table,
    blur_sigma_zyx,
    crop_fov_to_body,
    draw_acquisition,
    inplane_axes,
    outside_circle_zyx,
    pad_outside_circle,
    reconstruct,
    widen_fov,
)
from training.phantoms import (
    LABELLED_DOMAIN,
    WIDE_DOMAIN,
    _sample,
    case_from_record,
    generate_case,
    generate_dataset,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLE_NAMES = ("FLARE22_Ex_0001", "FLARE22_Ex_0002")  # LPS and oblique


def _seed_where(config, predicate, start: int = 0) -> int:
    """The first seed whose acquisition draw satisfies `predicate` (draws only, no voxels)."""
    return next(s for s in range(start, start + 2000) if predicate(draw_acquisition(s, config)))


def _arrays(image: sitk.Image, label: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    return sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)


def _assert_same_grid(a: sitk.Image, b: sitk.Image, atol: float = 0.0) -> None:
    """Identical grids; `atol` (mm) for one read back from NIfTI (float32 header fields)."""
    ga, gb = Grid.of(a), Grid.of(b)
    assert ga.size_xyz == gb.size_xyz, f"{ga} != {gb}"
    for name in ("spacing_xyz", "origin_xyz", "direction"):
        assert np.allclose(getattr(ga, name), getattr(gb, name), rtol=0, atol=atol), f"{ga} != {gb}"


@pytest.fixture(scope="module")
def examples() -> dict[str, tuple[sitk.Image, sitk.Image]]:
    return {name: (sitk.ReadImage(str(EXAMPLES / "inputs" / f"{name}_0000.nii.gz")),
                   sitk.ReadImage(str(EXAMPLES / "labels" / f"{name}.nii.gz"))) for name in EXAMPLE_NAMES}


# ------------------------------------------------------------------------------------------------
# Draws: determinism, independence from the patient, rates
# ------------------------------------------------------------------------------------------------
def test_acquisition_draws_and_voxels_are_deterministic_for_a_seed():
    assert draw_acquisition(11, WIDE_ACQUISITION) == draw_acquisition(11, WIDE_ACQUISITION)
    assert draw_acquisition(11, WIDE_ACQUISITION) != draw_acquisition(12, WIDE_ACQUISITION)
    seed = _seed_where(WIDE_ACQUISITION, lambda a: a.table is not None and a.padding is not None and a.sharp_gain > 0)
    a_img, a_lab = _arrays(*generate_case(seed, WIDE_DOMAIN, "small", acquisition=WIDE_ACQUISITION))
    b_img, b_lab = _arrays(*generate_case(seed, WIDE_DOMAIN, "small", acquisition=WIDE_ACQUISITION))
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)


def test_acquisition_does_not_change_the_patient():
    for seed in range(6):
        clean, clean_rng = _sample(seed, WIDE_DOMAIN, "small", None, None)
        varied, varied_rng = _sample(seed, WIDE_DOMAIN, "small", None, WIDE_ACQUISITION)
        for name in ("phase", "noise_std_hu", "contrast_gain", "scale_xyz", "fat_mm", "centre_xyz", "geometry",
                     "pixel_type"):
            assert getattr(clean, name) == getattr(varied, name), name
        # The main stream is where the anatomy is drawn next: it must be where the clean case left it.
        assert clean_rng.bit_generator.state == varied_rng.bit_generator.state
        assert np.array_equal(clean.grid.direction, varied.grid.direction)


@pytest.mark.parametrize("config", [LABELLED_ACQUISITION, WIDE_ACQUISITION], ids=lambda c: c.name)
def test_drawn_frequencies_are_near_the_documented_rates(config):
    n = 600
    draws = [draw_acquisition(seed, config) for seed in range(n)]

    def near(count: int, p: float, what: str) -> None:
        sd = np.sqrt(n * p * (1 - p))  # binomial: within 4 sd, or the rate is wrong
        assert abs(count - n * p) <= 4 * sd + 1, f"{config.name} {what}: {count}/{n}, expected rate {p}"

    for value, weight in zip(PADDING_VALUES, config.padding_weights, strict=True):
        near(sum(d.padding == value for d in draws), weight, f"padding {value}")
    near(sum(d.table is not None for d in draws), config.table_rate, "table")
    near(sum(d.sharp_gain > 0 for d in draws), config.sharp_rate, "sharp kernel")
    near(sum(d.z_cut == "top" for d in draws), config.z_cut_rate / 2, "z cut at the top")
    near(sum(d.z_cut == "bottom" for d in draws), config.z_cut_rate / 2, "z cut at the bottom")
    margins = np.array([d.fov_margin for d in draws])
    assert config.fov_margin[0] <= margins.min() and margins.max() <= config.fov_margin[1]
    assert np.ptp(margins) > 0.8 * np.diff(config.fov_margin)[0]
    offsets = np.abs([d.fov_offset for d in draws])
    assert offsets.max() <= config.fov_offset and offsets.max() > 0.9 * config.fov_offset


# ------------------------------------------------------------------------------------------------
# The generator's scans
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("geometry", ["oblique", "permuted"])
def test_generated_scan_is_padded_outside_the_circle_with_labels_zero(geometry):
    for value in (-3024.0, 0.0):
        seed = _seed_where(WIDE_ACQUISITION, lambda a, v=value: a.padding == v)
        image, label = generate_case(seed, WIDE_DOMAIN, "small", geometry=geometry, acquisition=WIDE_ACQUISITION)
        img, lab = _arrays(image, label)
        outside = np.broadcast_to(outside_circle_zyx(Grid.of(image)), img.shape)
        assert 0.1 < outside.mean() < 0.3  # the corners of a square: 1 - pi / 4 = 0.21
        assert (img[outside] == value).all() and (lab[outside] == 0).all()
        if value < -1024:  # padding, not tissue: never inside the circle
            assert not (img[~outside] == value).any()


def test_a_tight_field_of_view_cuts_organs_and_the_circle_unlabels_them():
    # The same draws with and without padding give the same grid and patient: the unpadded label shows
    # what the circle cut. A tight field of view; seed 4 puts organ voxels outside the circle.
    tight = replace(WIDE_ACQUISITION, fov_margin=(0.8, 0.9))
    padded = generate_case(4, WIDE_DOMAIN, "small", geometry="oblique",
                           acquisition=replace(tight, padding_weights=(0.0, 1.0, 0.0, 0.0, 0.0)))
    unpadded = generate_case(4, WIDE_DOMAIN, "small", geometry="oblique",
                             acquisition=replace(tight, padding_weights=(1.0, 0.0, 0.0, 0.0, 0.0)))
    _assert_same_grid(padded[0], unpadded[0])
    (img, lab), (_, lab_full) = _arrays(*padded), _arrays(*unpadded)
    outside = np.broadcast_to(outside_circle_zyx(Grid.of(padded[0])), lab.shape)
    assert (lab_full[outside] > 0).sum() > 100, "precondition: organs reach outside the circle"
    assert (lab[outside] == 0).all() and (img[outside] == -1024).all()
    assert np.array_equal(lab[~outside], lab_full[~outside])


def test_table_is_background_and_lies_under_the_body():
    seed = _seed_where(WIDE_ACQUISITION, lambda a: a.table is not None and a.padding is None and a.z_cut == "none")
    with_table = generate_case(seed, WIDE_DOMAIN, "small", geometry="ras", acquisition=WIDE_ACQUISITION)
    no_table = generate_case(seed, WIDE_DOMAIN, "small", geometry="ras",
                             acquisition=replace(WIDE_ACQUISITION, table_rate=0.0))
    _assert_same_grid(with_table[0], no_table[0])
    (img_t, lab_t), (img_n, lab_n) = _arrays(*with_table), _arrays(*no_table)
    assert np.array_equal(lab_t, lab_n), "the table must not change the label"
    plate = (img_t.astype(float) - img_n > 500) & (lab_t == 0)  # air (-1000) became plate (-100..200)
    assert plate.sum() > 200, "no table found"
    # Under the body: every plate voxel is posterior (+y) of every labelled voxel. RAS grid: index j runs to -y.
    plate_j, organ_j = np.nonzero(plate.any((0, 2)))[0], np.nonzero((lab_t > 0).any((0, 2)))[0]
    assert plate_j.max() < organ_j.min()


def test_z_cut_scans_start_or_end_inside_an_organ():
    for cut, organ, slab in (("top", 1, -1), ("bottom", 2, 0)):  # liver at the top, right kidney at the bottom
        seed = _seed_where(LABELLED_ACQUISITION, lambda a, c=cut: a.z_cut == c)
        _, label = generate_case(seed, LABELLED_DOMAIN, "small", geometry="lps", acquisition=LABELLED_ACQUISITION)
        _, clean = generate_case(seed, LABELLED_DOMAIN, "small", geometry="lps")
        lab = sitk.GetArrayViewFromImage(label)
        assert (lab[slab] == organ).sum() > 20, f"{cut} cut: organ {organ} should be cut by the end slice"
        assert lab.shape[0] < sitk.GetArrayViewFromImage(clean).shape[0]


def test_sharp_kernel_raises_noise_and_a_soft_one_lowers_it():
    noise = np.random.default_rng(0).standard_normal((8, 64, 64)).astype(np.float32)
    std = {}
    for name, scale, gain in (("standard", 1.0, 0.0), ("soft", 1.5, 0.0), ("sharp", 1.0, 1.0)):
        std[name] = reconstruct(noise.copy(), blur_sigma_zyx((1.0, 1.0, 3.0), scale), gain).std()
    assert std["soft"] < 0.85 * std["standard"] and std["sharp"] > 1.3 * std["standard"]


def test_dataset_json_records_the_acquisition_and_none_gives_clean_scans(tmp_path):
    on = generate_dataset(tmp_path / "on", labelled=1, unlabelled=0, validation=1, size="small", progress=False)
    off = generate_dataset(tmp_path / "off", labelled=1, unlabelled=0, validation=1, size="small",
                           acquisition="none", progress=False)
    case = json.loads((tmp_path / "on" / "dataset.json").read_text())["cases"]["FLARETs_0001_0000.nii.gz"]
    assert case["acquisition"]["config"] == "wide" and "padding" in case["acquisition"]
    assert on["acquisition"]["labelled"]["name"] == "labelled"
    assert all(c["acquisition"] is None for c in off["cases"].values())
    clean, _ = generate_case(off["cases"]["FLARE22_Tr_0001_0000.nii.gz"]["seed"], LABELLED_DOMAIN, "small")
    written = sitk.ReadImage(str(tmp_path / "off" / "labelled" / "images" / "FLARE22_Tr_0001_0000.nii.gz"))
    assert np.array_equal(sitk.GetArrayViewFromImage(written), sitk.GetArrayViewFromImage(clean))
    # A case's record regenerates it (hidden truth of unlabelled cases): same grid, same voxels.
    again, again_label = case_from_record(case)
    written = sitk.ReadImage(str(tmp_path / "on" / "validation" / "images" / "FLARETs_0001_0000.nii.gz"))
    written_label = sitk.ReadImage(str(tmp_path / "on" / "validation" / "labels" / "FLARETs_0001.nii.gz"))
    _assert_same_grid(again, written, atol=1e-3)
    assert np.array_equal(sitk.GetArrayViewFromImage(again), sitk.GetArrayViewFromImage(written))
    assert np.array_equal(sitk.GetArrayViewFromImage(again_label), sitk.GetArrayViewFromImage(written_label))


def test_cli_help_lists_the_acquisition_choices():
    import typer
    from typer.testing import CliRunner

    from training.phantoms import main

    app = typer.Typer()
    app.command()(main)
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "default|none" in result.output


def test_bundled_examples_are_unchanged(tmp_path):
    from training.phantoms import generate_examples

    for path in generate_examples(tmp_path):
        ours = sitk.ReadImage(str(path))
        shipped = sitk.ReadImage(str(EXAMPLES / path.parent.name / path.name))
        _assert_same_grid(ours, shipped)
        assert ours.GetPixelID() == shipped.GetPixelID()
        assert np.array_equal(sitk.GetArrayViewFromImage(ours), sitk.GetArrayViewFromImage(shipped)), path.name


# ------------------------------------------------------------------------------------------------
# Single perturbations of an existing image
# ------------------------------------------------------------------------------------------------
def test_inplane_axes_follow_the_directions_closest_to_x_and_y():
    assert inplane_axes(np.eye(3).ravel()) == (0, 1, 2)
    # Sagittal slices stored along index i: index j runs along -x, k along +y, i along z.
    permuted = np.array([[0, -1, 0], [0, 0, 1], [1, 0, 0]], float)
    assert inplane_axes(permuted.ravel()) == (1, 2, 0)


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
@pytest.mark.parametrize("value", [-3024.0, -2048.0, 0.0])
def test_pad_outside_circle_keeps_the_grid_and_zeroes_the_label_there(examples, name, value):
    image, label = examples[name]
    padded, padded_label = pad_outside_circle(image, label, value)
    _assert_same_grid(padded, image)
    _assert_same_grid(padded_label, image)
    assert padded.GetPixelID() == image.GetPixelID() and padded_label.GetPixelID() == label.GetPixelID()
    img, lab = _arrays(padded, padded_label)
    before, before_lab = _arrays(image, label)
    outside = np.broadcast_to(outside_circle_zyx(Grid.of(image)), img.shape)
    assert (img[outside] == value).all() and (lab[outside] == 0).all()
    assert np.array_equal(img[~outside], before[~outside]) and np.array_equal(lab[~outside], before_lab[~outside])


def test_pad_value_is_clipped_to_the_pixel_type(examples):
    image, label = examples["FLARE22_Ex_0001"]
    as_uint8 = sitk.Cast(sitk.Clamp(image, lowerBound=0, upperBound=255), sitk.sitkUInt8)
    padded, _ = pad_outside_circle(as_uint8, label, -1024.0)
    outside = np.broadcast_to(outside_circle_zyx(Grid.of(image)), sitk.GetArrayViewFromImage(padded).shape)
    assert padded.GetPixelID() == sitk.sitkUInt8 and (sitk.GetArrayViewFromImage(padded)[outside] == 0).all()


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_widen_fov_keeps_physical_positions_and_fills_the_border(examples, name):
    image, label = examples[name]
    wide, wide_label = widen_fov(image, label, 7, fill=-3024)
    _assert_same_grid(wide, wide_label)
    assert wide.GetPixelID() == image.GetPixelID()
    assert wide.GetSize() == (image.GetSize()[0] + 14, image.GetSize()[1] + 14, image.GetSize()[2])
    for ijk in ((0, 0, 0), (5, 90, 40), tuple(s - 1 for s in image.GetSize())):
        moved = (ijk[0] + 7, ijk[1] + 7, ijk[2])
        assert np.allclose(image.TransformIndexToPhysicalPoint(ijk), wide.TransformIndexToPhysicalPoint(moved))
        assert image[ijk] == wide[moved] and label[ijk] == wide_label[moved]
    img, lab = _arrays(wide, wide_label)
    border = np.ones(img.shape, bool)
    border[:, 7:-7, 7:-7] = False
    assert (img[border] == -3024).all() and (lab[border] == 0).all()


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_crop_fov_to_body_keeps_the_body_and_its_positions(examples, name):
    image, label = examples[name]
    counts = np.bincount(sitk.GetArrayViewFromImage(label).ravel(), minlength=14)
    cropped, cropped_label = crop_fov_to_body(image, label, margin_mm=5.0)
    _assert_same_grid(cropped, cropped_label)
    assert cropped.GetPixelID() == image.GetPixelID() and cropped.GetDirection() == image.GetDirection()
    assert cropped.GetSize()[2] == image.GetSize()[2] and cropped.GetSize()[0] < image.GetSize()[0]
    assert np.array_equal(np.bincount(sitk.GetArrayViewFromImage(cropped_label).ravel(), minlength=14)[1:],
                          counts[1:]), "an organ voxel was cropped away"
    # The crop's first voxel sits where it sat in the original.
    start = image.TransformPhysicalPointToIndex(cropped.GetOrigin())
    assert image[start] == cropped[0, 0, 0]
    # Margins >= 0 keep every body voxel; a negative one cuts the body's sides.
    body = lambda img: int((sitk.GetArrayViewFromImage(img) > -500).sum())  # noqa: E731
    assert body(cropped) == body(crop_fov_to_body(image, label)[0]) == body(image)
    assert body(crop_fov_to_body(image, label, margin_mm=-20.0)[0]) < 0.95 * body(image)


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_add_table_paints_background_under_the_body(examples, name):
    image, label = examples[name]
    spec = TableSpec(foam_mm=10.0, thickness_mm=12.0, plate_hu=150.0)
    with_table, table_label = add_table(image, label, spec, noise_std_hu=0.0)
    _assert_same_grid(with_table, table_label)
    _assert_same_grid(with_table, image)
    assert with_table.GetPixelID() == image.GetPixelID()
    assert np.array_equal(sitk.GetArrayViewFromImage(table_label), sitk.GetArrayViewFromImage(label))
    img, before = sitk.GetArrayViewFromImage(with_table), sitk.GetArrayViewFromImage(image)
    changed = img != before
    assert (sitk.GetArrayViewFromImage(label)[changed] == 0).all()
    assert (before[changed] <= -500).all(), "the table may only replace air"
    plate = changed & (img == 150)
    assert plate.sum() > 500 and set(np.unique(img[changed]).tolist()) == {-900, 150}
    # Posterior (+y) of the body: compare physical y of plate voxels with that of labelled voxels.
    y_of = lambda mask: np.array([image.TransformIndexToPhysicalPoint(tuple(int(v) for v in kji[::-1]))[1]  # noqa: E731
                                  for kji in np.argwhere(mask)[::50]])
    assert y_of(plate).min() > y_of(sitk.GetArrayViewFromImage(label) > 0).max()
