"""Organ statistics against values computed by hand on a synthetic case with known volumes, organs cut by the first
slice, the last slice and the in-plane edge, and an absent organ.

    pytest tests/test_statistics.py -x -q
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from flare_infer import statistics
from flare_infer.labels import ORGANS

SPACING = (0.5, 0.8, 2.0)  # mm: a voxel is 0.8 mm^3 = 0.0008 mL
ORIGIN = (10.0, -20.0, 30.0)
DIRECTION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # x axis along +y, y axis along -x (patient), z along z


@pytest.fixture()
def case():
    """(image, mask): 10 slices of 16 x 20; HU 10 * z in the liver, 60 in the spleen but one voxel of 240, -1000
    elsewhere."""
    labels = np.zeros((10, 16, 20), np.uint8)  # (z, y, x)
    labels[2:6, 3:8, 4:10] = 1  # liver: 4 x 5 x 6 = 120 voxels, inside
    labels[0:3, 10:13, 12:14] = 3  # spleen: 3 x 3 x 2 = 18 voxels, on the first slice
    labels[8:10, 12:14, 2:4] = 2  # right kidney: 2 x 2 x 2 = 8, on the last slice
    labels[6:8, 0:2, 15:20] = 13  # left kidney: 2 x 2 x 5 = 20, on the y = 0 and x = 19 edges
    hu = np.full(labels.shape, -1000, np.int16)
    hu[labels == 1] = (10 * np.indices(labels.shape)[0])[labels == 1]
    hu[labels == 3] = 60
    hu[0, 10, 12] = 240  # one bright spleen voxel: mean and median apart
    image, mask = sitk.GetImageFromArray(hu), sitk.GetImageFromArray(labels)
    for im in (image, mask):
        im.SetSpacing(SPACING)
        im.SetOrigin(ORIGIN)
        im.SetDirection(DIRECTION)
    return image, mask


def test_statistics_equal_the_values_computed_by_hand(case):
    organs = statistics.organ_statistics(*case)
    liver = organs["liver"]
    assert liver["voxels"] == 120 and liver["volume_ml"] == pytest.approx(120 * 0.0008)
    # 30 voxels each of 20, 30, 40, 50 HU: mean 35, median (30 + 40) / 2, std sqrt((15^2 + 5^2 + 5^2 + 15^2) / 4)
    assert (liver["hu_mean"], liver["hu_median"]) == (pytest.approx(35.0), pytest.approx(35.0))
    assert liver["hu_std"] == pytest.approx(np.sqrt(125.0))
    assert liver["bbox_min_xyz"] == [4, 3, 2] and liver["bbox_max_xyz"] == [9, 7, 5]
    assert liver["bbox_size_mm_xyz"] == pytest.approx([6 * 0.5, 5 * 0.8, 4 * 2.0])
    # index (4, 3, 2) -> origin + 4 * 0.5 along +y, 3 * 0.8 along -x, 2 * 2 along z
    assert liver["bbox_first_mm_lps"] == pytest.approx([10.0 - 2.4, -20.0 + 2.0, 30.0 + 4.0])
    assert liver["bbox_last_mm_lps"] == pytest.approx([10.0 - 5.6, -20.0 + 4.5, 30.0 + 10.0])
    assert liver["complete"] and not (liver["touches_first_slice"] or liver["touches_last_slice"])


def test_organs_cut_by_the_scan_edge_are_marked_incomplete(case):
    organs = statistics.organ_statistics(*case)
    spleen, right, left = organs["spleen"], organs["right kidney"], organs["left kidney"]
    assert spleen["voxels"] == 18 and spleen["volume_ml"] == pytest.approx(18 * 0.0008)
    # 17 voxels of 60 HU and one of 240: mean 70, median 60, std sqrt((17 * 10^2 + 170^2) / 18) = sqrt(1700)
    assert (spleen["hu_mean"], spleen["hu_median"]) == (pytest.approx(70.0), 60.0)
    assert spleen["hu_std"] == pytest.approx(np.sqrt(1700.0))
    assert spleen["touches_first_slice"] and not spleen["touches_last_slice"] and not spleen["touches_inplane_edge"]
    assert right["voxels"] == 8 and right["touches_last_slice"] and not right["touches_first_slice"]
    assert left["voxels"] == 20 and left["touches_inplane_edge"] and not left["touches_first_slice"]
    assert not any(o["complete"] for o in (spleen, right, left))
    assert right["hu_mean"] == -1000.0  # the CT's values under the mask, whatever they are


def test_an_inplane_edge_is_any_of_the_four_sides():
    for side in ("x0", "x1", "y0", "y1"):
        labels = np.zeros((5, 8, 9), np.uint8)
        box = {"x0": np.s_[2, 3:5, 0], "x1": np.s_[2, 3:5, 8], "y0": np.s_[2, 0, 3:5], "y1": np.s_[2, 7, 3:5]}[side]
        labels[box] = 4
        organ = statistics.organ_statistics(sitk.GetImageFromArray(labels.astype(np.int16)),
                                            sitk.GetImageFromArray(labels))["pancreas"]  # fmt: skip
        assert organ["touches_inplane_edge"] and not organ["complete"], side


def test_absent_organs_have_zero_volume_and_no_values(case):
    organs = statistics.organ_statistics(*case)
    assert list(organs) == [o.name for o in ORGANS]
    pancreas = organs["pancreas"]
    assert pancreas["voxels"] == 0 and pancreas["volume_ml"] == 0.0 and pancreas["hu_mean"] is None
    assert pancreas["bbox_min_xyz"] is None


def test_a_mask_of_another_size_is_refused(case):
    image, _ = case
    with pytest.raises(ValueError, match="is not the image's"):
        statistics.organ_statistics(image, sitk.Image(3, 3, 3, sitk.sitkUInt8))


def test_json_and_csv_hold_the_same_numbers(case, tmp_path):
    document = statistics.case_document("case_a", *case)
    statistics.write_case_json(document, tmp_path / statistics.json_name("case_a"))
    statistics.write_csv([document, statistics.case_document("case_b", *case)], tmp_path / statistics.csv_name())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_a.statistics.json", "statistics.csv"]
    assert json.loads((tmp_path / "case_a.statistics.json").read_text()) == document
    rows = list(csv.DictReader((tmp_path / "statistics.csv").open()))
    assert len(rows) == 2 * len(ORGANS) and [r["case"] for r in rows[:: len(ORGANS)]] == ["case_a", "case_b"]
    liver = rows[0]
    assert (liver["organ"], liver["label"], liver["voxels"], liver["bbox_min_xyz"]) == ("liver", "1", "120", "4 3 2")
    assert float(liver["volume_ml"]) == pytest.approx(0.096) and liver["complete"] == "True"
    pancreas = next(r for r in rows if r["organ"] == "pancreas")
    assert pancreas["hu_mean"] == "" and pancreas["voxels"] == "0"


def test_shards_write_their_own_csv():
    assert statistics.csv_name((0, 1)) == "statistics.csv"
    assert statistics.csv_name((1, 4)) == "statistics.shard1-of-4.csv"
