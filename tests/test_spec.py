"""The model sidecar (flare_infer.spec): round trip, validation, clear errors."""

import json

import pytest

from flare_infer.labels import LABEL_NAMES, NUM_CLASSES, ORGANS
from flare_infer.spec import ModelSpec, SpecError, load_spec


def test_label_map_has_thirteen_organs_in_flare22_order():
    assert NUM_CLASSES == 14
    assert [o.value for o in ORGANS] == list(range(1, 14))
    assert LABEL_NAMES["1"] == "liver" and LABEL_NAMES["13"] == "left kidney"
    assert {o.short for o in ORGANS} >= {"Liver", "RK", "LK", "IVC", "RAG", "LAG"}


def test_sidecar_round_trip_keeps_extra_fields(tmp_path):
    spec = ModelSpec(input_channels=3, spacing_xyz_mm=(1.5, 1.5, 2.5), extra={"provenance": {"commit": "abc"}})
    spec.save(tmp_path / "m.json")
    loaded = load_spec(tmp_path / "m.onnx")
    assert loaded == spec
    assert json.loads((tmp_path / "m.json").read_text())["format"] == "flare-onnx/1"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format": "flare-onnx/9"}, "unknown format"),
        ({"input_channels": 2}, "odd integer"),
        ({"spacing_xyz_mm": [1.5, 0, 2.5]}, "three positive numbers"),
        ({"output": "softmax"}, "output must be one of"),
        ({"labels": {"0": "background", "1": "liver"}}, "14 FLARE22 classes"),
        ({"normalization": {"kind": "zscore", "n_std": 3.0}}, "normalization.kind"),
    ],
)
def test_invalid_sidecar_is_refused_with_the_file_and_the_reason(tmp_path, change, message):
    data = ModelSpec().to_dict() | change
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SpecError, match=message) as err:
        load_spec(path)
    assert str(path) in str(err.value)


def test_missing_sidecar_says_how_to_make_one(tmp_path):
    with pytest.raises(SpecError, match="training.export"):
        load_spec(tmp_path / "student.onnx")


def test_missing_required_key_is_named(tmp_path):
    data = ModelSpec().to_dict()
    del data["spacing_xyz_mm"]
    (tmp_path / "m.json").write_text(json.dumps(data))
    with pytest.raises(SpecError, match="spacing_xyz_mm"):
        load_spec(tmp_path / "m.json")
