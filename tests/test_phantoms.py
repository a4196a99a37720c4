"""The synthetic FLARE-style CT generator: anatomy, geometry, determinism, domain shift, layout.

    pytest tests/test_phantoms.py -x -q
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from flare_infer.labels import LABEL_NAMES, ORGANS
from training.phantoms import (
    GEOMETRIES,
    LABELLED_DOMAIN,
    WIDE_DOMAIN,
    case_seed,
    generate_case,
    generate_dataset,
    sample_case_params,
)

LEFT_OF = [(3, 1, "spleen", "liver"), (13, 2, "left kidney", "right kidney"), (8, 7, "left adrenal", "right adrenal")]


@pytest.fixture(scope="module")
def cases_by_geometry() -> dict[str, tuple[sitk.Image, sitk.Image]]:
    return {g: generate_case(100 + i, LABELLED_DOMAIN, "small", geometry=g) for i, g in enumerate(GEOMETRIES)}


def _centroids_lps(label: sitk.Image) -> dict[int, np.ndarray]:
    """Physical (LPS, mm) centroid of each organ, from its voxels' continuous indices."""
    arr = sitk.GetArrayFromImage(label)
    out = {}
    for value in range(1, 14):
        kji = np.argwhere(arr == value)
        if len(kji):
            ijk = kji[:, ::-1].mean(0)
            out[value] = np.array(label.TransformContinuousIndexToPhysicalPoint(ijk.tolist()))
    return out


def test_every_organ_is_present_in_a_labelled_case(cases_by_geometry):
    for geometry, (_, label) in cases_by_geometry.items():
        values = set(np.unique(sitk.GetArrayViewFromImage(label)).tolist())
        assert values == set(range(14)), f"{geometry}: missing labels {set(range(14)) - values}"
        assert label.GetPixelID() == sitk.sitkUInt8


def test_label_is_on_the_image_grid(cases_by_geometry):
    for image, label in cases_by_geometry.values():
        assert image.GetSize() == label.GetSize()
        assert image.GetOrigin() == label.GetOrigin()
        assert image.GetSpacing() == label.GetSpacing()
        assert image.GetDirection() == label.GetDirection()


def test_left_organs_are_on_the_patient_left_whatever_the_direction(cases_by_geometry):
    for geometry, (_, label) in cases_by_geometry.items():
        c = _centroids_lps(label)
        for left, right, left_name, right_name in LEFT_OF:
            # LPS: +x is the patient's left.
            assert c[left][0] > c[right][0] + 20, f"{geometry}: {left_name} not left of {right_name}"
        assert c[5][0] > c[6][0], f"{geometry}: aorta should lie left of the IVC"
        assert c[2][1] > c[4][1] and c[13][1] > c[4][1], f"{geometry}: kidneys should be posterior to the pancreas"
        assert c[7][2] > c[2][2] and c[8][2] > c[13][2], f"{geometry}: adrenals should lie above the kidneys"


def test_organ_sizes_are_plausible_none_swallowed(cases_by_geometry):
    # Volumes in ml, wide on purpose: catches an organ painted over by another or blown up by a bug.
    expected_ml = {1: (900, 3000), 2: (80, 260), 3: (100, 450), 4: (25, 160), 5: (25, 200), 6: (25, 200),
                   7: (2, 15), 8: (2, 15), 9: (10, 90), 10: (3, 60), 11: (150, 1200), 12: (30, 250), 13: (80, 260)}
    for geometry, (_, label) in cases_by_geometry.items():
        voxel_ml = float(np.prod(label.GetSpacing())) / 1000
        counts = np.bincount(sitk.GetArrayViewFromImage(label).ravel(), minlength=14)
        for value, (lo, hi) in expected_ml.items():
            ml = counts[value] * voxel_ml
            assert lo <= ml <= hi, f"{geometry}: {LABEL_NAMES[str(value)]} is {ml:.1f} ml, expected {lo}-{hi}"


def test_geometry_varies_across_a_set():
    params = [sample_case_params(case_seed(0, "unlabelled", i), WIDE_DOMAIN, "full") for i in range(40)]
    directions = {tuple(np.round(p.grid.direction, 3)) for p in params}
    spacings = {tuple(np.round(p.grid.spacing_xyz, 3)) for p in params}
    assert len(directions) >= 4 and len(spacings) >= 10
    assert {p.pixel_type for p in params} >= {"int16", "int32"}
    assert any(p.geometry == "oblique" for p in params) and any(p.geometry == "permuted" for p in params)
    full = [p.grid for p in params]
    assert all(0.6 - 1e-6 <= min(g.spacing_xyz) and max(g.size_xyz) <= 512 for g in full)


def test_same_seed_gives_identical_arrays_and_another_seed_does_not():
    a_img, a_lab = generate_case(7, WIDE_DOMAIN, "small")
    b_img, b_lab = generate_case(7, WIDE_DOMAIN, "small")
    c_img, _ = generate_case(8, WIDE_DOMAIN, "small")
    assert np.array_equal(sitk.GetArrayViewFromImage(a_img), sitk.GetArrayViewFromImage(b_img))
    assert np.array_equal(sitk.GetArrayViewFromImage(a_lab), sitk.GetArrayViewFromImage(b_lab))
    assert a_img.GetDirection() == b_img.GetDirection() and a_img.GetOrigin() == b_img.GetOrigin()
    assert a_img.GetSize() != c_img.GetSize() or not np.array_equal(
        sitk.GetArrayViewFromImage(a_img), sitk.GetArrayViewFromImage(c_img))


def _liver_stats(image: sitk.Image, label: sitk.Image) -> tuple[float, float]:
    """Mean HU and the HU std of voxel-to-neighbour differences (noise) inside the eroded liver."""
    img = sitk.GetArrayFromImage(image).astype(np.float32)
    liver = sitk.GetArrayFromImage(sitk.BinaryErode(label == 1, [2, 2, 1])) > 0
    diff = (img[:, :, 1:] - img[:, :, :-1])[liver[:, :, 1:] & liver[:, :, :-1]]
    return float(img[liver].mean()), float(diff.std() / np.sqrt(2))


def test_labelled_and_validation_differ_in_the_documented_knobs():
    n = 6
    lab = [sample_case_params(case_seed(0, "labelled", i), LABELLED_DOMAIN, "small") for i in range(n)]
    val = [sample_case_params(case_seed(0, "validation", i), WIDE_DOMAIN, "small") for i in range(n)]
    assert {p.phase for p in lab} == {"portal"} and len({p.phase for p in val}) >= 2
    body = lambda ps: np.ptp([p.fat_mm + 140 * p.scale_xyz[0] for p in ps])  # noqa: E731
    assert body(val) > body(lab)
    # Measured on the voxels, not only in the parameters: noise and liver HU spread.
    lab_stats = [_liver_stats(*generate_case(case_seed(0, "labelled", i), LABELLED_DOMAIN, "small")) for i in range(4)]
    val_stats = [_liver_stats(*generate_case(case_seed(0, "validation", i), WIDE_DOMAIN, "small")) for i in range(4)]
    assert np.mean([s[1] for s in val_stats]) > np.mean([s[1] for s in lab_stats])
    assert np.ptp([s[0] for s in val_stats]) > np.ptp([s[0] for s in lab_stats])


def test_dataset_layout_and_dataset_json(tmp_path):
    meta = generate_dataset(tmp_path, labelled=2, unlabelled=1, validation=1, seed=3, size="small", progress=False)
    expected = [
        "labelled/images/FLARE22_Tr_0001_0000.nii.gz", "labelled/labels/FLARE22_Tr_0001.nii.gz",
        "labelled/images/FLARE22_Tr_0002_0000.nii.gz", "labelled/labels/FLARE22_Tr_0002.nii.gz",
        "unlabelled/Case_00001_0000.nii.gz",
        "validation/images/FLARETs_0001_0000.nii.gz", "validation/labels/FLARETs_0001.nii.gz", "dataset.json",
    ]
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == sorted(expected), "unexpected files (a leftover temporary file?)"
    on_disk = json.loads((tmp_path / "dataset.json").read_text())
    assert on_disk["labels"] == LABEL_NAMES == meta["labels"]
    assert len(on_disk["labels"]) == len(ORGANS) + 1
    img = sitk.ReadImage(str(tmp_path / expected[0]))
    lab = sitk.ReadImage(str(tmp_path / expected[1]))
    assert lab.GetPixelID() == sitk.sitkUInt8 and lab.GetSize() == img.GetSize()
    assert on_disk["cases"]["FLARE22_Tr_0001_0000.nii.gz"]["phase"] == "portal"


def test_examples_are_regenerated_identically_with_two_geometries(tmp_path):
    from training.phantoms import generate_examples

    paths = generate_examples(tmp_path / "a")
    again = generate_examples(tmp_path / "b")
    assert [p.name for p in paths] == ["FLARE22_Ex_0001_0000.nii.gz", "FLARE22_Ex_0001.nii.gz",
                                       "FLARE22_Ex_0002_0000.nii.gz", "FLARE22_Ex_0002.nii.gz"]
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(paths, again, strict=True))
    directions = [sitk.ReadImage(str(p)).GetDirection() for p in paths[::2]]
    assert directions[0] == (1, 0, 0, 0, 1, 0, 0, 0, 1) and not np.allclose(directions[1], directions[0])
