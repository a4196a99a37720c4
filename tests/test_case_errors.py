"""A case that fails with an unexpected exception (not io.InputError) fails alone (issue 29, item 3).

    pytest tests/test_case_errors.py

The CLI's per-case `except Exception` turns any error into `ERROR <name>: <Type>: <message>` on stderr, puts the
traceback in the log (a bug's whereabouts, which an InputError's reason does not need), goes on with the other
cases and exits 1. Mutations caught: the except narrowed to `io.InputError` (the run stops at the failing case:
ZeroDivisionError out of app); the traceback line removed; the type left out of the ERROR line.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import SimpleITK as sitk
from onnx_standin import make_standin_model

import flare_infer.__main__ as cli
from flare_infer import io, pipeline


def _ct(path, seed: int) -> None:
    a = np.random.default_rng(seed).integers(-1000, 400, (4, 48, 48)).astype(np.int16)
    image = sitk.GetImageFromArray(a)
    image.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(image, str(path))


def test_an_unexpected_error_fails_its_case_only_with_its_type_and_a_traceback(tmp_path, monkeypatch, capsys, caplog):
    model = make_standin_model(tmp_path / "model", input_channels=3)
    inputs = tmp_path / "in"
    inputs.mkdir()
    names = ["a_0000.nii.gz", "b_0000.nii.gz", "c_0000.nii.gz"]
    for i, name in enumerate(names):
        _ct(inputs / name, i)
    real = pipeline.predict_file

    def planted_bug(input_path, *args, **kwargs):
        if input_path.name == "b_0000.nii.gz":
            return 1 / 0  # a bug of ours, not the input's fault
        return real(input_path, *args, **kwargs)

    monkeypatch.setattr(pipeline, "predict_file", planted_bug)
    with caplog.at_level(logging.INFO, logger="flare_infer"), pytest.raises(SystemExit) as exit_:
        cli.app(["predict", str(inputs), str(tmp_path / "out"), "--model", str(model), "--device", "cpu",
                 "--no-read-ahead"])  # fmt: skip
    assert exit_.value.code == cli.EXIT_CASE_FAILED
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.startswith("ERROR ")] == [
        "ERROR b_0000.nii.gz: ZeroDivisionError: division by zero"
    ]
    traced = [r for r in caplog.records if r.exc_info and r.levelno == logging.ERROR]
    assert len(traced) == 1 and traced[0].exc_info[0] is ZeroDivisionError
    assert "b_0000.nii.gz" in traced[0].getMessage() and "in planted_bug" in caplog.text  # the traceback's frames
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.nii.gz", "c.nii.gz"]  # the others went on


def test_an_input_error_gets_its_reason_and_no_traceback(tmp_path, monkeypatch, capsys, caplog):
    """The bad input's reason is the whole story: no traceback for it."""
    model = make_standin_model(tmp_path / "model", input_channels=3)
    inputs = tmp_path / "in"
    inputs.mkdir()
    _ct(inputs / "a_0000.nii.gz", 0)
    (inputs / "broken_0000.nii.gz").write_bytes(b"not a nifti")
    with caplog.at_level(logging.INFO, logger="flare_infer"), pytest.raises(SystemExit) as exit_:
        cli.app(["predict", str(inputs), str(tmp_path / "out"), "--model", str(model), "--device", "cpu"])
    assert exit_.value.code == cli.EXIT_CASE_FAILED
    assert any(ln.startswith("ERROR broken_0000.nii.gz: ") for ln in capsys.readouterr().err.splitlines())
    assert not [r for r in caplog.records if r.exc_info]
    assert io.output_name("a_0000.nii.gz") in [p.name for p in (tmp_path / "out").iterdir()]
