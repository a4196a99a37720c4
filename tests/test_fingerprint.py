"""The training set's ct_window (training.fingerprint): percentiles of the labelled organ voxels, once per run.

    pytest tests/test_fingerprint.py -q
"""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import SimpleITK as sitk

from training.data import CaseFiles, DatasetError
from training.fingerprint import foreground_window, load_or_compute_window


def _case(tmp_path, name: str, hu_zyx: np.ndarray, label_zyx: np.ndarray) -> CaseFiles:
    image, label = sitk.GetImageFromArray(hu_zyx), sitk.GetImageFromArray(label_zyx)
    for im in (image, label):
        im.SetSpacing((2.0, 2.0, 3.0))
    sitk.WriteImage(image, str(tmp_path / f"{name}_0000.nii.gz"))
    sitk.WriteImage(label, str(tmp_path / f"{name}.nii.gz"))
    return CaseFiles(name, tmp_path / f"{name}_0000.nii.gz", tmp_path / f"{name}.nii.gz")


@pytest.fixture
def cases(tmp_path):
    rng = np.random.default_rng(0)
    out, organ_values = [], []
    for i in range(3):
        hu = rng.normal(-1000, 5, (12, 40, 40)).astype(np.int16)  # air everywhere ...
        label = np.zeros(hu.shape, np.uint8)
        label[3:9, 10:30, 10:30] = 1 + i
        hu[label > 0] = rng.normal(40 + 60 * i, 30, int((label > 0).sum())).astype(np.int16)  # ... organs inside
        organ_values.append(hu[label > 0].astype(np.float64))
        out.append(_case(tmp_path, f"c{i}", hu, label))
    return out, np.concatenate(organ_values)


def test_the_window_is_the_organ_voxels_percentiles(cases):
    files, values = cases
    norm = foreground_window(files, voxels_per_case=10**6)  # every organ voxel: the sample is the whole set
    gc.collect()
    assert norm.kind == "ct_window"
    np.testing.assert_allclose(norm.window_hu, np.round(np.percentile(values, (0.5, 99.5)), 3), atol=1e-9)
    clipped = np.clip(values, *norm.window_hu)
    assert norm.stats["foreground_mean_hu"] == pytest.approx(clipped.mean(), abs=1e-3)
    assert norm.stats["cases"] == 3 and norm.stats["voxels"] == values.size


def test_the_window_ignores_air_padding_and_table_outside_the_labels(cases, tmp_path):
    files, values = cases
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(files[0].image)))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(files[0].label)))
    hu[:, :3, :] = -3024  # padding
    hu[:, 36:38, :] = 200  # a table
    changed = [_case(tmp_path, "c0b", hu, label), *files[1:]]
    assert foreground_window(changed, voxels_per_case=10**6) == foreground_window(files, voxels_per_case=10**6)


def test_the_window_is_stored_once_per_run_and_read_back(cases, tmp_path):
    files, _ = cases
    path = tmp_path / "normalization.json"
    first = load_or_compute_window(path, files)
    stored = json.loads(path.read_text())
    assert stored["kind"] == "ct_window" and stored["window_hu"] == list(first.window_hu)
    assert load_or_compute_window(path, files[:1]) == first  # read back, not recomputed from other cases


def test_an_unlabelled_case_is_refused(cases):
    files, _ = cases
    with pytest.raises(DatasetError, match="needs labelled cases"):
        foreground_window([CaseFiles("x", files[0].image, None)])
