"""FLARE22 DSC/NSD: known answers on hand-made masks, the organisers' rules and quirk, files and CSV.

pytest tests/test_evaluate.py -x
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from flare_infer import evaluate, metrics
from flare_infer.evaluate import CaseError, evaluate_arrays, evaluate_case, evaluate_folder, write_csv

SPACING = (0.75, 0.625, 3.0)  # anisotropic, exact in float32 like a NIfTI header's pixdim


# ------------------------------------------------------------------------------ known answers
def _shifted_cubes(n: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    gt = np.zeros((n + 8,) * 3, bool)
    gt[4 : 4 + n, 4 : 4 + n, 4 : 4 + n] = True
    return gt, np.roll(gt, 1, axis=axis)


def _cube_areas(n: int, s_shift: float, s_a: float, s_b: float) -> tuple[float, float]:
    """(total surfel area, area of the surfels farther than min(spacing) from the shifted copy).

    The marching-cubes surface of a voxel cube: flat faces ((n - 1)^2 corner points each, area =
    the in-plane spacings' product), edges chamfered ((n - 1) points each, 0.5 * length step *
    diagonal) and corner triangles (0.125 * |(s_a s_b, s_shift s_b, s_shift s_a)|). Shifted by one
    voxel along `shift`, a cube's surfels on its trailing face (with its rim) and the interior of
    its leading face are one spacing step away from the other surface; all others lie on it.
    """
    m = n - 1
    corner = 0.125 * math.sqrt((s_a * s_b) ** 2 + (s_shift * s_b) ** 2 + (s_shift * s_a) ** 2)
    edge_b = 0.5 * s_b * math.hypot(s_shift, s_a)  # edges along b, chamfered across shift and a
    edge_a = 0.5 * s_a * math.hypot(s_shift, s_b)
    edge_shift = 0.5 * s_shift * math.hypot(s_a, s_b)
    total = (
        2 * m * m * (s_a * s_b + s_shift * s_b + s_shift * s_a) + 4 * m * (edge_b + edge_a + edge_shift) + 8 * corner
    )
    trailing_face = m * m * s_a * s_b + 2 * m * (edge_b + edge_a) + 4 * corner
    leading_interior = m * m * s_a * s_b
    return total, trailing_face + leading_interior


@pytest.mark.parametrize("axis", [0, 2])
def test_cube_shifted_one_voxel_has_hand_computed_nsd(axis):
    n = 6
    gt, pred = _shifted_cubes(n, axis)
    others = [SPACING[a] for a in range(3) if a != axis]
    total, missed = _cube_areas(n, SPACING[axis], *others)
    tol_below = 0.5 * min(SPACING)
    expected = 1 - missed / total  # both cubes miss the same area by symmetry
    assert metrics.fast_surface_dice(gt, pred, SPACING, tol_below) == pytest.approx(expected, rel=1e-12)
    reference = metrics.reference_surface_distances(gt, pred, SPACING)
    assert metrics.surface_dice_at_tolerance(reference, tol_below) == pytest.approx(expected, rel=1e-12)
    assert np.sum(reference.surfel_areas_gt) == pytest.approx(total, rel=1e-12)
    # Every surfel is at most one step along the shift axis away: a larger tolerance gives 1.
    assert metrics.fast_surface_dice(gt, pred, SPACING, SPACING[axis] * 1.01) == 1.0
    assert metrics.dice(gt, pred) == pytest.approx((n - 1) / n)


def test_area_table_matches_flat_face_and_corner_geometry():
    table = metrics.surfel_area_table(SPACING)
    s0, s1, s2 = SPACING
    # Codes 15 / 51 / 85: four voxels on one side of a plane normal to axis 0 / 1 / 2.
    assert table[15] == pytest.approx(s1 * s2)
    assert table[51] == pytest.approx(s0 * s2)
    assert table[85] == pytest.approx(s0 * s1)
    assert table[1] == pytest.approx(0.125 * math.sqrt((s1 * s2) ** 2 + (s0 * s2) ** 2 + (s0 * s1) ** 2))
    assert table[0] == table[255] == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_fast_nsd_equals_reference_and_uncropped_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(6, 18, 3))
    gt = rng.random(shape) < 0.3
    pred = np.roll(gt, tuple(rng.integers(-2, 3, 3)), axis=(0, 1, 2)) ^ (rng.random(shape) < 0.05)
    spacing = tuple(float(np.float32(s)) for s in rng.uniform(0.5, 3.0, 3))
    for tol in (1.0, 2.0, 5.0):
        fast = metrics.fast_surface_dice(gt, pred, spacing, tol)
        cropped = metrics.surface_dice_at_tolerance(metrics.reference_surface_distances(gt, pred, spacing), tol)
        whole = metrics.surface_dice_at_tolerance(
            metrics.reference_surface_distances(gt, pred, spacing, crop_to_union=False), tol
        )
        assert fast == pytest.approx(cropped, abs=1e-14)
        assert whole == pytest.approx(cropped, abs=1e-14)


@pytest.mark.parametrize("tree_after", [0, 3, metrics.TREE_AFTER_LOOKUPS])  # tree after offset 0; part-way; none
def test_surfel_distances_within_tolerance_equal_the_distance_transform_bit_for_bit(tree_after):
    rng = np.random.default_rng(7)
    shape = (20, 18, 16)
    gt = rng.random(shape) < 0.3
    pred = np.roll(gt, (1, -2, 1), axis=(0, 1, 2)) ^ (rng.random(shape) < 0.05)
    pred[:3] = False  # GT surfels beyond the tolerance of any prediction surfel
    spacing, tol = (0.75, 0.625, 3.0), 2.5
    lo, hi = np.zeros(3, int), np.array(shape) - 1
    areas = metrics.surfel_area_table(spacing)
    coords_gt, coords_pred = metrics._surfels(gt, lo, hi, areas)[0], metrics._surfels(pred, lo, hi, areas)[0]
    got = metrics._distances_within(coords_gt, coords_pred, spacing, tol, tree_after=tree_after)
    edt = metrics._edt_or_inf(metrics._borders(metrics._neighbour_codes(pred, lo, hi)), spacing)
    expected = edt[tuple(coords_gt.T)]  # the organisers' distance of each GT surfel to the prediction's surface
    expected[expected > tol] = np.inf
    np.testing.assert_array_equal(got, expected)
    assert (got == 0).any() and ((got > 0) & (got <= tol)).any() and np.isinf(got).any()


def test_the_cached_tables_cannot_be_changed_by_a_caller():
    offsets, distances = metrics.ball_offsets(SPACING, 2.0)
    for cached in (offsets, distances, metrics.surfel_area_table(SPACING)):
        with pytest.raises(ValueError, match="read-only"):
            cached[0] = 0


def test_far_stray_blob_is_scored_like_the_reference():
    # A prediction blob far from the organ: outside the tolerance window, must still count as a miss.
    gt = np.zeros((40, 30, 20), bool)
    gt[5:12, 5:12, 3:9] = True
    pred = gt.copy()
    pred[33:36, 24:27, 15:18] = True
    for tol in (2.0, 7.0):
        expected = metrics.surface_dice_at_tolerance(metrics.reference_surface_distances(gt, pred, SPACING), tol)
        assert metrics.fast_surface_dice(gt, pred, SPACING, tol) == pytest.approx(expected, abs=1e-14)
        assert expected < 1


# ------------------------------------------------------------------------------- case rules
def _case_zyx() -> np.ndarray:
    """(Z, Y, X) labels: liver block and an aorta tube over slices 5..15, a kidney (RK) blob."""
    labels = np.zeros((24, 20, 22), np.uint8)
    labels[5:16, 2:9, 2:10] = 1  # liver
    labels[5:16, 12:15, 12:15] = 5  # aorta
    labels[8:12, 14:18, 3:8] = 2  # right kidney
    return labels


def test_empty_rules_one_one_for_absent_zero_zero_for_either_empty():
    gt = _case_zyx()
    pred = gt.copy()
    pred[pred == 2] = 0  # RK in GT, not predicted
    pred[18:21, 2:5, 2:5] = 3  # spleen predicted, absent from GT
    scores = evaluate_case(pred, gt, spacing_xyz=SPACING)
    assert (scores.dsc["RK"], scores.nsd["RK"]) == (0.0, 0.0)
    assert (scores.dsc["Spleen"], scores.nsd["Spleen"]) == (0.0, 0.0)
    assert (scores.dsc["LK"], scores.nsd["LK"]) == (1.0, 1.0)  # absent from both
    assert (scores.dsc["Liver"], scores.nsd["Liver"]) == (1.0, 1.0)


def test_axial_cut_ignores_top_gt_slice_and_outside_range_for_aorta_not_liver():
    gt = _case_zyx()
    pred = gt.copy()
    pred[15][gt[15] == 5] = 0  # remove the aorta's top GT slice (z = 15, the last labelled one)
    pred[15][gt[15] == 1] = 0  # and the liver's
    pred[19:22, 12:15, 12:15] = 5  # aorta above the GT's range
    pred[19:22, 2:5, 2:5] = 1  # liver above it too
    scores = evaluate_case(pred, gt, spacing_xyz=SPACING)
    assert (scores.dsc["Aorta"], scores.nsd["Aorta"]) == (1.0, 1.0)
    assert scores.dsc["Liver"] < 1 and scores.nsd["Liver"] < 1


def test_axial_cut_keeps_bottom_gt_slice():
    gt = _case_zyx()
    pred = gt.copy()
    pred[5][gt[5] == 5] = 0  # z_min is inclusive: a missing bottom slice counts
    assert evaluate_case(pred, gt, spacing_xyz=SPACING).dsc["Aorta"] < 1


def test_images_and_arrays_give_the_same_scores_with_header_spacing():
    gt, pred = _case_zyx(), np.roll(_case_zyx(), 1, axis=1)
    gt_image, pred_image = sitk.GetImageFromArray(gt), sitk.GetImageFromArray(pred)
    gt_image.SetSpacing(SPACING)  # (x, y, z) header spacing of the (Z, Y, X) array
    pred_image.CopyInformation(gt_image)
    from_images = evaluate_case(pred_image, gt_image)
    from_arrays = evaluate_arrays(pred.transpose(2, 1, 0), gt.transpose(2, 1, 0), SPACING)
    assert from_images.row() == from_arrays.row()
    assert evaluate_case(pred_image, gt_image, workers=2).row() == from_images.row()


def test_scores_are_rounded_to_four_decimals():
    gt, pred = _case_zyx(), np.roll(_case_zyx(), 1, axis=2)
    scores = evaluate_case(pred, gt, spacing_xyz=(0.8, 0.8, 2.5))
    values = [*scores.dsc.values(), *scores.nsd.values()]
    assert any(0 < v < 1 for v in values)
    assert all(v == round(v, 4) for v in values)


def test_flare_2024_rule_zeroes_nsd_below_dsc_0_2_only_when_asked():
    gt = _case_zyx()
    pred = gt.copy()
    pred[pred == 2] = 0
    pred[8:9, 14:15, 3:8] = 2  # a sliver of the kidney: DSC < 0.2, surface partly within tolerance
    default = evaluate_case(pred, gt, spacing_xyz=SPACING)
    flare24 = evaluate_case(pred, gt, spacing_xyz=SPACING, flare_2024=True)
    assert default.dsc["RK"] < 0.2 and default.nsd["RK"] > 0
    assert flare24.nsd["RK"] == 0.0 and flare24.dsc["RK"] == default.dsc["RK"]


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(CaseError, match="prediction shape .* differs from ground truth shape"):
        evaluate_case(np.zeros((3, 4, 5), np.uint8), np.zeros((3, 4, 6), np.uint8), spacing_xyz=(1, 1, 1))


# ----------------------------------------------------------------------------- folders, CSV
def _write(labels_zyx: np.ndarray, path, spacing_xyz=SPACING) -> None:
    image = sitk.GetImageFromArray(labels_zyx)
    image.SetSpacing(spacing_xyz)
    lower = Path(path).with_name(Path(path).name.lower())  # ITK writes only lower-case extensions
    sitk.WriteImage(image, str(lower))
    lower.rename(path)


def test_csv_header_is_the_organisers(tmp_path):
    path = tmp_path / "out.csv"
    gt = _case_zyx()
    write_csv([evaluate_case(gt, gt, spacing_xyz=(1, 1, 1), name="case_0001.nii.gz")], path)
    lines = path.read_text().splitlines()
    assert lines[0] == (
        "Name,Liver_DSC,RK_DSC,Spleen_DSC,Pancreas_DSC,Aorta_DSC,IVC_DSC,RAG_DSC,LAG_DSC,Gallbladder_DSC,"
        "Esophagus_DSC,Stomach_DSC,Duodenum_DSC,LK_DSC,Liver_NSD,RK_NSD,Spleen_NSD,Pancreas_NSD,Aorta_NSD,"
        "IVC_NSD,RAG_NSD,LAG_NSD,Gallbladder_NSD,Esophagus_NSD,Stomach_NSD,Duodenum_NSD,LK_NSD"
    )
    # Liver, RK, Aorta computed; the other 10 organs absent from both, decided by the empty-mask rule
    # (which the organisers' pandas wrote as `1`): every number is written the same way, as a float.
    values = lines[1].split(",")[1:]
    assert values[:13] == ["1.0"] * 13
    assert values[13:] == values[:13]


def _folders(tmp_path, gt_names, pred_names):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    for name in gt_names:
        _write(_case_zyx(), gt_dir / name)
    for name in pred_names:
        _write(_case_zyx(), pred_dir / name)
    return pred_dir, gt_dir


def test_missing_prediction_scores_zero_for_present_organs_only_with_allow_missing(tmp_path):
    pred_dir, gt_dir = _folders(tmp_path, ["case_a.nii.gz", "case_b.nii.gz"], ["case_a.nii.gz"])
    result = evaluate_folder(pred_dir, gt_dir, allow_missing=True)
    assert result.missing == ["case_b.nii.gz"] and result.missing_scored
    by_name = {c.name: c for c in result.cases}
    missing = by_name["case_b.nii.gz"]
    assert missing.dsc["Liver"] == missing.nsd["Liver"] == 0.0  # present in the GT
    assert missing.dsc["Spleen"] == missing.nsd["Spleen"] == 1.0  # absent from both
    assert by_name["case_a.nii.gz"].dsc["Liver"] == 1.0
    strict = evaluate_folder(pred_dir, gt_dir)  # without it: listed, not scored
    assert strict.missing == ["case_b.nii.gz"] and [c.name for c in strict.cases] == ["case_a.nii.gz"]


def test_missing_predictions_are_listed_in_one_line_counted_and_exit_1(tmp_path, capsys):
    names = [f"case_{k}.nii.gz" for k in "abcd"]
    pred_dir, gt_dir = _folders(tmp_path, names, names[:2])
    assert evaluate.main(pred_dir, gt_dir, workers=1) == 1
    out, err = capsys.readouterr()
    assert "2 cases scored, 2 missing predictions not scored" in out
    assert "missing predictions (2, not scored): case_c.nii.gz, case_d.nii.gz" in out
    (line,) = err.strip().splitlines()
    assert "2 of 4 ground-truth cases have no prediction" in line and "case_c.nii.gz, case_d.nii.gz" in line
    assert "--allow-missing" in line
    assert evaluate.main(pred_dir, gt_dir, workers=1, allow_missing=True) == 0
    assert "4 cases scored, 2 missing predictions scored as empty" in capsys.readouterr().out


@pytest.mark.parametrize("problem", ["missing", "empty", "mismatched", "gt missing"])
def test_a_prediction_folder_that_cannot_be_scored_exits_2_naming_it_in_one_line(problem, tmp_path, capsys):
    pred_dir, gt_dir = _folders(tmp_path, ["case_a.nii.gz", "case_b.nii.gz"], [])
    if problem == "missing":
        pred_dir = tmp_path / "typo"
    elif problem == "mismatched":
        _write(_case_zyx(), pred_dir / "other_case.nii.gz")
    elif problem == "gt missing":
        _write(_case_zyx(), pred_dir / "case_a.nii.gz")
        gt_dir = tmp_path / "no_labels"
    for argv in ([str(pred_dir), str(gt_dir)], [str(pred_dir), str(gt_dir), "--allow-missing"]):
        with pytest.raises(SystemExit) as exit_info:
            evaluate._cli([*argv, "--csv", str(tmp_path / "s.csv"), "--workers", "1"])
        assert exit_info.value.code == 2
        out, err = capsys.readouterr()
        assert out == "" and "Traceback" not in err
        (line,) = err.strip().splitlines()
        named = gt_dir if problem == "gt missing" else pred_dir
        assert line.startswith("error: ") and f"folder {named} " in line, line
    assert not (tmp_path / "s.csv").exists()


def test_nii_and_upper_case_predictions_are_found_and_two_for_one_case_are_an_error(tmp_path):
    pred_dir, gt_dir = _folders(tmp_path, ["case_a.nii.gz", "case_b.nii.gz", "case_c.NII.GZ", "case_d.nii"],
                                ["case_a.nii", "case_b.NII.GZ", "case_c.nii.gz", "case_d.nii.gz"])  # fmt: skip
    _write(_case_zyx(), pred_dir / "case_e.nii.gz")  # no GT: ignored
    result = evaluate_folder(pred_dir, gt_dir, workers=1)
    assert not result.missing and not result.errors
    assert {c.name: c.dsc["Liver"] for c in result.cases} == dict.fromkeys(
        ["case_a.nii.gz", "case_b.nii.gz", "case_c.NII.GZ", "case_d.nii"], 1.0)  # fmt: skip
    _write(_case_zyx(), pred_dir / "case_a.nii.gz")  # now case_a has two
    result = evaluate_folder(pred_dir, gt_dir, workers=1)
    assert list(result.errors) == ["case_a.nii.gz"] and "case_a.nii, case_a.nii.gz" in result.errors["case_a.nii.gz"]


def test_a_prediction_on_another_grid_is_noted_in_the_report_not_warned_with_source(tmp_path, capsys):
    pred_dir, gt_dir = _folders(tmp_path, ["case_a.nii.gz"], [])
    _write(_case_zyx(), pred_dir / "case_a.nii.gz", spacing_xyz=(1.0, 1.0, 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert evaluate.main(pred_dir, gt_dir, workers=1) == 0
    out, err = capsys.readouterr()
    assert "warning: case_a.nii.gz: prediction spacing/origin/direction differ" in out and err == ""


def test_shape_mismatch_fails_that_case_only_and_the_cli_exits_non_zero(tmp_path, capsys):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    for name in ("case_a.nii.gz", "case_b.nii.gz"):
        _write(_case_zyx(), gt_dir / name)
    _write(_case_zyx(), pred_dir / "case_a.nii.gz")
    _write(_case_zyx()[:, :, :-1], pred_dir / "case_b.nii.gz")
    csv_path, md_path = tmp_path / "scores.csv", tmp_path / "scores.md"
    code = evaluate.main(pred_dir, gt_dir, csv=csv_path, markdown=md_path, workers=2)
    assert code == 1
    assert "case_b.nii.gz" in capsys.readouterr().err
    assert [line.split(",")[0] for line in csv_path.read_text().splitlines()[1:]] == ["case_a.nii.gz"]
    markdown = md_path.read_text()
    assert "| liver | 1.0000 | 1.0000 |" in markdown  # one case: the mean without a std
    assert "| **mean** | 1.0000 | 1.0000 |" in markdown


def test_single_slice_gt_aorta_is_cut_to_nothing_and_scored_nan_like_the_organisers(tmp_path):
    gt = _case_zyx()
    gt[gt == 5] = 0
    gt[7, 12:15, 12:15] = 5  # one labelled slice: [z_min, z_max) is empty
    scores = evaluate_case(gt, gt, spacing_xyz=SPACING, name="c.nii.gz")
    assert math.isnan(scores.dsc["Aorta"]) and math.isnan(scores.nsd["Aorta"])
    write_csv([scores], tmp_path / "s.csv")
    row = (tmp_path / "s.csv").read_text().splitlines()[1].split(",")
    assert row[5] == "" and row[13 + 5] == ""  # empty cells, as pandas writes NaN


# ------------------------------------------------------------------- fast path = organisers' path
def test_neighbour_codes_equal_deepminds_correlation():
    rng = np.random.default_rng(3)
    for _ in range(12):
        mask = rng.random(tuple(rng.integers(1, 9, 3))) < 0.5
        lo, hi = np.zeros(3, int), np.array(mask.shape) - 1
        ours = metrics._neighbour_codes(mask, lo, hi)
        theirs = metrics._neighbour_codes_correlate(mask, lo, hi)
        assert ours.shape == theirs.shape and np.array_equal(ours, theirs)


def test_nsd_counts_a_surfel_at_exactly_the_tolerance_like_the_reference():
    # Shifted by 2 voxels of 1.5 mm along x: the trailing surfels lie at exactly 3.0 mm (exact in binary).
    spacing = (1.5, 0.75, 1.25)
    gt = np.zeros((14, 12, 12), bool)
    gt[3:9, 3:9, 3:9] = True
    pred = np.roll(gt, 2, axis=0)
    for tol in (3.0, np.nextafter(3.0, 0.0)):
        expected = metrics.surface_dice_at_tolerance(metrics.reference_surface_distances(gt, pred, spacing), tol)
        assert metrics.fast_surface_dice(gt, pred, spacing, tol) == pytest.approx(expected, abs=1e-14)
    assert metrics.fast_surface_dice(gt, pred, spacing, 3.0) > metrics.fast_surface_dice(
        gt, pred, spacing, np.nextafter(3.0, 0.0)
    )


def _organisers_loop(pred_xyz: np.ndarray, gt_xyz: np.ndarray, spacing_xyz) -> dict[str, tuple[float, float]]:
    """FLARE22_DSC_NSD_Eval.py's per-organ loop on whole volumes, with DeepMind's code path (the reference)."""
    spacing = metrics.organiser_spacing(spacing_xyz)
    scores = {}
    for organ in evaluate.ORGANS:
        i = organ.value
        if not (gt_xyz == i).any():
            dsc = nsd = 1 if not (pred_xyz == i).any() else 0
        else:
            z = np.where(gt_xyz == i)[2]
            cut = slice(z.min(), z.max()) if i in evaluate.AXIAL_RANGE_CUT_VALUES else slice(None)
            gt_i, pred_i = gt_xyz[:, :, cut] == i, pred_xyz[:, :, cut] == i
            dsc = metrics.dice(gt_i, pred_i)
            distances = metrics.reference_surface_distances(gt_i, pred_i, spacing)
            nsd = metrics.surface_dice_at_tolerance(distances, organ.nsd_tolerance_mm)
        scores[organ.short] = (float(np.round(np.float64(dsc), 4)), float(np.round(np.float64(nsd), 4)))
    return scores


def _thirteen_organ_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(Z, Y, X) GT with 13 blobs of different sizes, and a network-like prediction (shift, ragged edge, strays)."""
    rng = np.random.default_rng(seed)
    shape = (30, 40, 44)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    gt = np.zeros(shape, np.uint8)
    for value in range(1, 14):
        centre = rng.uniform(0.2, 0.8, 3) * shape
        radii = rng.uniform(1.5, 8.0, 3)
        inside = sum(((c - m) / r) ** 2 for c, m, r in zip((z, y, x), centre, radii, strict=True)) <= 1
        gt[inside] = value
    pred = np.roll(gt, (1, -1, 1), axis=(0, 1, 2))
    pred[(rng.random(shape) < 0.1) & (pred > 0)] = 0
    pred[rng.integers(0, 30), rng.integers(0, 40), rng.integers(0, 44)] = 3  # a stray voxel
    return gt, pred


@pytest.mark.parametrize("seed", range(3))
def test_fast_evaluation_equals_the_organisers_loop_on_13_organ_cases(seed):
    gt, pred = _thirteen_organ_case(seed)
    spacing = (0.8, 0.8, 2.5)  # not exact in float32: the organisers' float32 zooms matter
    expected = _organisers_loop(pred.transpose(2, 1, 0), gt.transpose(2, 1, 0), spacing)
    for workers in (1, 2):
        scores = evaluate_case(pred, gt, spacing_xyz=spacing, workers=workers)
        assert {o.short: (scores.dsc[o.short], scores.nsd[o.short]) for o in evaluate.ORGANS} == expected


def test_boxes_of_a_transposed_view_are_the_boxes_of_its_copy():
    gt, _ = _thirteen_organ_case(0)
    view = gt.transpose(2, 1, 0)  # what evaluate_case makes of SimpleITK's (Z, Y, X) array
    assert view.flags.f_contiguous and not view.flags.c_contiguous
    assert metrics.find_boxes(view, 13) == metrics.find_boxes(np.ascontiguousarray(view), 13)


@pytest.mark.parametrize("max_label", [0, 13])
def test_boxes_inside_the_nonzero_box_equal_find_objects_on_the_whole_volume(max_label):
    from scipy import ndimage

    rng = np.random.default_rng(4)
    labels = np.zeros((30, 40, 50), np.uint8)
    labels[5:20, 10:30, 8:40] = rng.integers(0, 12, (15, 20, 32)) * (rng.random((15, 20, 32)) < 0.01)
    labels[29, 0, 49] = 12  # a label alone at the volume's far corner, one at its near edge
    labels[7, 39, 0] = 3
    for volume in (labels, labels[:, :, :30].copy(), np.zeros_like(labels), labels[::-1, ::-1].copy()):
        assert metrics.find_boxes(volume, max_label) == ndimage.find_objects(volume, max_label)


def test_command_line_writes_the_csv_and_exits_zero(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    _write(_case_zyx(), gt_dir / "case_a.nii.gz")
    _write(np.roll(_case_zyx(), 1, axis=2), pred_dir / "case_a.nii.gz")
    with pytest.raises(SystemExit) as exit_info:
        evaluate._cli([str(pred_dir), str(gt_dir), "--csv", str(tmp_path / "s.csv"), "--workers", "2"])
    assert exit_info.value.code == 0
    assert (tmp_path / "s.csv").read_text().splitlines()[1].startswith("case_a.nii.gz,0.")
