"""The real-CT check (benchmarks/real_ct.py) and what predict says about the weights it runs (issue 26).

    pytest tests/test_real_ct.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from onnx_standin import make_standin_model
from test_io import write_good_inputs

from flare_infer import preview
from flare_infer.labels import ORGANS

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import real_ct  # noqa: E402

REAL_DIR = REPO.parent / "shared" / "data" / "real-ct"


def test_totalsegmentator_values_map_to_flare_as_the_readme_says():
    """../shared/data/real-ct/README.md: {5: 1, 2: 2, 1: 3, 7: 4, 52: 5, 63: 6, 8: 7, 9: 8, 4: 9, 15: 10, 6: 11,
    19: 12, 3: 13}, every other value 0."""
    source = np.arange(120, dtype=np.uint8).reshape(2, 3, 20)
    flare = real_ct.to_flare_labels(source)
    readme = {5: 1, 2: 2, 1: 3, 7: 4, 52: 5, 63: 6, 8: 7, 9: 8, 4: 9, 15: 10, 6: 11, 19: 12, 3: 13}
    for value in range(120):
        assert flare.ravel()[value] == readme.get(value, 0), value
    assert flare.dtype == np.uint8


def test_summary_means_count_liver_spleen_kidneys_and_the_organs_present():
    class Scores:
        dsc = {o.short: 0.0 for o in ORGANS}
        nsd = {o.short: 0.0 for o in ORGANS}

    by_name = {o.name: o for o in ORGANS}
    for name, value in (("liver", 0.9), ("spleen", 0.8), ("right kidney", 0.7), ("left kidney", 0.6),
                        ("pancreas", 0.5), ("esophagus", 1.0)):
        Scores.dsc[by_name[name].short] = value
    label = np.zeros((4, 4, 4), np.uint8)
    for i, name in enumerate(("liver", "spleen", "right kidney", "left kidney", "pancreas")):
        label.flat[i] = by_name[name].value
    out = real_ct.summarise(Scores, label)
    assert out["mean_dsc_big4"] == pytest.approx(0.75)
    assert out["mean_dsc_present"] == pytest.approx(0.7)  # esophagus absent from the labels: not counted
    assert out["organs_present"] == ["liver", "right kidney", "spleen", "pancreas", "left kidney"]


def test_preview_can_take_its_slices_from_another_mask(monkeypatch, tmp_path):
    """Prediction and reference rows of the real-CT preview show the same planes: the reference chooses them."""
    image = sitk.Image(20, 20, 20, sitk.sitkInt16)
    pred, ref = sitk.Image(20, 20, 20, sitk.sitkUInt8), sitk.Image(20, 20, 20, sitk.sitkUInt8)
    for im in (pred, ref):
        im.CopyInformation(image)
    pred[3, 3, 3], ref[15, 15, 15] = 1, 1
    seen = []
    original = preview._slices_zyx
    monkeypatch.setattr(preview, "_slices_zyx", lambda shape, lab: seen.append(lab) or original(shape, lab))
    preview.save_preview(image, pred, tmp_path / "a.png", slices_from=ref)
    assert np.array_equal(seen[-1], sitk.GetArrayFromImage(sitk.DICOMOrient(ref, "LPS")))
    preview.save_preview(image, pred, tmp_path / "b.png")
    assert np.array_equal(seen[-1], sitk.GetArrayFromImage(sitk.DICOMOrient(pred, "LPS")))


def test_predict_says_once_what_the_weights_were_trained_on(tmp_path):
    model = make_standin_model(tmp_path / "model", input_channels=1)
    sidecar = json.loads(model.with_suffix(".json").read_text())
    sidecar["trained_on"] = "synthetic phantoms only: a test"
    model.with_suffix(".json").write_text(json.dumps(sidecar))
    inputs = tmp_path / "in"
    names = write_good_inputs(inputs)
    assert len(names) >= 2
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "flare_infer", "predict", str(inputs), str(tmp_path / "out"),
                          "--model", str(model), "--device", "cpu"], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("weights trained on synthetic phantoms only: a test") == 1


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_DIR / real_ct.CT_NAME).is_file(),
                    reason="the real CT lives in ../shared/data/real-ct beside the checkout (not in a user's clone)")
def test_real_ct_check_writes_its_record(tmp_path):
    """The committed command on the shipped weights: a JSON with every organ and both means, and the preview."""
    out = tmp_path / "real_ct.json"
    real_ct.main(["--out", str(out), "--threads", "1"])
    record = json.loads(out.read_text())
    assert set(record["dsc"]) == {o.name for o in ORGANS}
    assert record["organs_present"] and "esophagus" not in record["organs_present"]  # absent from its labels
    assert 0.0 <= record["mean_dsc_big4"] <= 1.0 and 0.0 <= record["mean_dsc_present"] <= 1.0
    assert record["voxels_label"]["liver"] == 41692  # the README's count after the mapping
    assert out.with_suffix(".png").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_DIR / real_ct.CT_NAME).is_file(),
                    reason="the real CT lives in ../shared/data/real-ct beside the checkout (not in a user's clone)")
def test_real_ct_check_can_score_with_the_largest_component_clean_up(tmp_path):
    """--postprocess lcc reaches predict: no organ grows, and the shipped weights' scattered voxels on this case
    (small spleen and adrenal islands in the bowel and bladder, docs/results/real_ct.png) go."""
    plain, lcc = tmp_path / "plain.json", tmp_path / "lcc.json"
    real_ct.main(["--out", str(plain), "--threads", "1", "--preview", "none"])
    real_ct.main(["--out", str(lcc), "--threads", "1", "--preview", "none", "--postprocess", "lcc"])
    a, b = (json.loads(p.read_text()) for p in (plain, lcc))
    assert a["postprocess"] == "none" and b["postprocess"] == "lcc"
    assert all(b["voxels_pred"][o] <= a["voxels_pred"][o] for o in a["voxels_pred"])
    assert sum(b["voxels_pred"].values()) < sum(a["voxels_pred"].values())


def test_the_thin_slice_copy_covers_the_same_body_finer_and_noisier():
    """benchmarks/real_ct_thin.py's input: the same extent and direction on a 0.75 x 0.75 x 1.6 mm grid, int16,
    white noise of the stated std on a flat region, and the same noise for the same seed."""
    from benchmarks import real_ct_thin

    ct = sitk.GetImageFromArray(np.full((10, 12, 12), 40, np.int32))
    ct.SetSpacing((3.0, 3.0, 3.0))
    ct.SetOrigin((-10.0, 5.0, 2.0))
    ct.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    thin = real_ct_thin.thin_copy(ct)
    assert thin.GetSpacing() == real_ct_thin.THIN_SPACING and thin.GetPixelID() == sitk.sitkInt16
    assert thin.GetSize() == (48, 48, 19)  # 36 / 0.75 and 30 / 1.6, rounded
    assert thin.GetOrigin() == ct.GetOrigin() and thin.GetDirection() == ct.GetDirection()
    inner = sitk.GetArrayViewFromImage(thin)[2:-2, 4:-4, 4:-4].astype(float)
    assert abs(inner.mean() - 40) < 2 and abs(inner.std() - real_ct_thin.NOISE_HU) < 2
    assert np.array_equal(sitk.GetArrayViewFromImage(real_ct_thin.thin_copy(ct)), sitk.GetArrayViewFromImage(thin))
