"""The ONNX export: parity with torch on a new shape, the sidecar through flare_infer, the fp16 variant.

    pytest tests/test_export.py -x
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import SimpleITK as sitk
import torch

from flare_infer import geometry
from flare_infer.pipeline import predict_case, predict_volume, prepare
from flare_infer.session import load_model as load_onnx
from flare_infer.spec import ModelSpec, load_spec
from training.export import ExportConfig, ExportError, MainHead, export_checkpoint, export_fp16
from training.loop import save_checkpoint
from training.model import UNet, UNetConfig
from training.phantoms import WIDE_DOMAIN, generate_case

SPEC = ModelSpec(input_channels=1, spacing_xyz_mm=(6.0, 6.0, 10.0))  # coarse: small volumes, fast tests


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _settled_unet(cfg: UNetConfig, seed: int = 0) -> UNet:
    """A Kaiming-initialised U-Net whose batch-norm statistics come from CT slices (as after training)."""
    torch.manual_seed(seed)
    model = UNet(cfg)
    image = generate_case(7, WIDE_DOMAIN, "small")[0]
    vol_zyx = prepare(image, SPEC).vol_zyx
    x = torch.from_numpy(vol_zyx[:, None, :48, :48].copy())  # (Z, 1, 48, 48)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the passes below
    model.train()
    with torch.no_grad():
        for chunk in x.split(8):
            model(chunk)
        # Untrained, the head gives logits up to ~60, where torch's own float32 round-off (vs float64) is
        # ~1e-4; a trained U-Net's logits are ~10, so scale the head to that range.
        model.head.weight.mul_(0.2)
    return model.eval()


def write_checkpoint(path: Path, model: UNet, data_dir: str = "DATA") -> Path:
    """A checkpoint with the keys training.loop writes (model, model_config, spec, train_config, metrics...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {
        "model": model.state_dict(), "model_config": model.cfg.to_dict(), "spec": SPEC.to_dict(),
        "train_config": {"phase": "student", "data": data_dir}, "loop_config": {"epochs": 3},
        "metrics": [{"epoch": 3, "train_loss": 1.0, "val_dsc": 0.42}], "epoch": 2, "git_commit": "0123abc",
    })  # fmt: skip
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[UNet, object, Path]:
    tmp = tmp_path_factory.mktemp("export")
    model = _settled_unet(UNetConfig(width=4))
    ckpt = write_checkpoint(tmp / "best.pt", model)
    # min agreement 0: keep the fp16 file whatever a barely trained model scores; the gate is tested below
    report = export_checkpoint(ckpt, tmp / "student.onnx", ExportConfig(fp16=True, min_fp16_agreement=0.0))
    return model, report, tmp


def test_export_matches_torch_within_1e4_on_shapes_other_than_the_dummy(exported):
    model, report, _ = exported
    cfg = ExportConfig()
    assert report.parity is not None and report.parity.onnx_vs_torch <= 1e-4
    assert report.parity.shape[-2:] != cfg.dummy_shape
    import onnxruntime as ort

    session = ort.InferenceSession(str(report.onnx_path), providers=["CPUExecutionProvider"])
    vol_zyx = prepare(generate_case(11, WIDE_DOMAIN, "small")[0], SPEC).vol_zyx
    for h, w in ((48, 32), (16, 48)):  # batch and shape differ from the dummy's (2, 1, 32, 48); the CT is ~63 wide
        x = np.ascontiguousarray(vol_zyx[5:10, None, :h, :w], dtype=np.float32)
        found = session.run(["logits"], {"input": x})[0]
        with torch.no_grad():
            expected = MainHead(model)(torch.from_numpy(x)).numpy()
        assert found.shape == (5, 14, h, w)
        assert np.abs(found - expected).max() <= 1e-4


def _large_logit_unet() -> UNet:
    """A settled U-Net with its head scaled up: logits ~60, as after one epoch of training, where torch float32
    itself differs from float64 by ~1e-4 (an absolute 1e-4 refused such correct exports)."""
    model = _settled_unet(UNetConfig(width=4), seed=1)
    with torch.no_grad():
        model.head.weight.mul_(25.0)
    return model


def test_a_correct_export_of_a_model_with_large_logits_passes_and_records_both_errors(tmp_path):
    ckpt = write_checkpoint(tmp_path / "best.pt", _large_logit_unet())
    report = export_checkpoint(ckpt, tmp_path / "big.onnx", ExportConfig(exporter="torchscript"))
    p = report.parity
    assert p.max_abs_logit > 40 and p.float32_error > 2e-5  # torch's own round-off is of the old tolerance's size
    assert p.onnx_error <= p.tolerance(ExportConfig()) == pytest.approx(4 * p.float32_error + 1e-5)
    checks = load_spec(tmp_path / "big.onnx").extra["checks"]
    assert checks["parity_onnx_error"] == p.onnx_error and checks["parity_float32_error"] == p.float32_error
    assert checks["parity_reference"].startswith("torch float64")


def test_an_export_whose_weights_change_after_export_fails_and_is_removed(tmp_path, monkeypatch):
    import training.export as export_module

    export_onnx = export_module.export_onnx

    def export_then_perturb(model, path, cfg):
        export_onnx(model, path, cfg)
        with torch.no_grad():
            model.head.bias[5] += 1e-3  # the ONNX file now holds other weights than the checkpoint's torch model

    monkeypatch.setattr(export_module, "export_onnx", export_then_perturb)
    ckpt = write_checkpoint(tmp_path / "best.pt", _settled_unet(UNetConfig(width=4)))
    with pytest.raises(ExportError, match="differ from a float64 torch reference"):
        export_checkpoint(ckpt, tmp_path / "wrong.onnx", ExportConfig(exporter="torchscript"))
    assert not (tmp_path / "wrong.onnx").exists()


def test_exported_graph_has_named_dynamic_io_and_only_the_main_head(exported):
    _, report, _ = exported
    graph = onnx.load(str(report.onnx_path))
    assert max(op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")) >= 17
    (inp,), outs = graph.graph.input, graph.graph.output
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert inp.name == "input" and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims(inp) == ["batch", 1, "height", "width"]
    assert [o.name for o in outs] == ["logits"] and dims(outs[0]) == ["batch", 14, "height", "width"]


def test_sidecar_loads_and_runs_through_flare_infer_onnxruntime_path(exported):
    model, report, _ = exported
    spec = load_spec(report.onnx_path)
    assert spec.output == "logits" and spec.input_channels == 1 and spec.spacing_xyz_mm == SPEC.spacing_xyz_mm
    assert spec.extra["provenance"]["commit"] == "0123abc" and spec.extra["provenance"]["width"] == 4
    assert spec.extra["metrics"]["val_dsc"] == pytest.approx(0.42)
    onnx_model = load_onnx(report.onnx_path, device="cpu")
    image = generate_case(12, WIDE_DOMAIN, "small", geometry="oblique")[0]
    mask = predict_case(image, onnx_model.predict, onnx_model.spec, batch_size=4)
    geometry.check_same_grid(image, mask, what="mask")  # raises if the grid differs
    # The ONNX labels are torch's labels: same pipeline, torch as predict_batch.
    prepared = prepare(image, spec)
    labels_onnx, _ = predict_volume(prepared, onnx_model.predict, spec, batch_size=4)

    def torch_batch(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return MainHead(model)(torch.from_numpy(batch)).numpy()

    labels_torch, _ = predict_volume(prepared, torch_batch, spec, batch_size=4)
    assert (labels_onnx == labels_torch).mean() >= 0.9999  # only exact logit ties (1e-5) may flip
    assert sitk.GetArrayViewFromImage(mask).max() > 0


def test_fp16_variant_keeps_float32_io_and_reports_its_agreement(exported):
    _, report, _ = exported
    assert report.fp16_path is not None and report.fp16_path.is_file()
    graph = onnx.load(str(report.fp16_path))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.graph.initializer)
    spec16 = load_spec(report.fp16_path)
    assert spec16.extra["fp16"]["argmax_agreement"] == pytest.approx(report.fp16_agreement)
    assert 0.9 < report.fp16_agreement <= 1.0
    m32, m16 = load_onnx(report.onnx_path, device="cpu"), load_onnx(report.fp16_path, device="cpu")
    x = np.random.default_rng(0).random((2, 1, 48, 48), dtype=np.float32)
    out32, out16 = m32.predict(x), m16.predict(x)
    assert out16.dtype == np.float32 and out16.shape == out32.shape
    assert np.abs(out16 - out32).max() <= 0.05 * max(1.0, np.abs(out32).max())


def test_fp16_below_the_agreement_bar_is_removed_with_a_clear_error(exported):
    _, report, tmp = exported
    out = tmp / "strict" / "student.onnx"
    out.parent.mkdir()
    out.write_bytes(report.onnx_path.read_bytes())
    out.with_suffix(".json").write_bytes(report.onnx_path.with_suffix(".json").read_bytes())
    images = [generate_case(13, WIDE_DOMAIN, "small")[0]]
    agreement_bar = 1.0 + 1e-9  # unreachable: the gate must refuse
    with pytest.raises(ExportError, match="fp16 not written"):
        export_fp16(out, SPEC, {}, ExportConfig(fp16=True, min_fp16_agreement=agreement_bar), images)
    assert not (tmp / "strict" / "student.fp16.onnx").exists()
    assert not (tmp / "strict" / "student.fp16.json").exists()


def test_fp16_below_the_bar_keeps_fp32_says_why_and_exits_0_unless_required(tmp_path, monkeypatch):
    """An undertrained model (fp16 agreement 99.5 % < 99.9 %): `--fp16` keeps the float32 model and exits 0 with
    the reason; `--require-fp16` is the strict form (exit 1, float32 still there)."""
    import typer
    from typer.testing import CliRunner

    import training.export as export_module

    monkeypatch.setattr(export_module, "argmax_agreement", lambda *args, **kwargs: 0.995)
    app = typer.Typer()
    app.command()(export_module.main)
    ckpt = write_checkpoint(tmp_path / "ckpt" / "best.pt", _settled_unet(UNetConfig(width=2)))
    out = tmp_path / "w" / "student.onnx"
    result = CliRunner().invoke(app, [str(ckpt), str(out), "--exporter", "torchscript", "--fp16"])
    assert result.exit_code == 0, result.output
    assert "fp16 argmax agrees with fp32 on 99.500 % of voxels" in result.output and "note:" in result.output
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert not (tmp_path / "w" / "student.fp16.onnx").exists() and not (tmp_path / "w" / "student.fp16.json").exists()
    strict = CliRunner().invoke(app, [str(ckpt), str(out), "--exporter", "torchscript", "--require-fp16"])
    assert strict.exit_code == 1 and "--require-fp16" in strict.output, strict.output
    assert out.is_file() and not (tmp_path / "w" / "student.fp16.onnx").exists()


def test_export_cli_writes_model_and_sidecar(exported, tmp_path):
    import typer
    from typer.testing import CliRunner

    import training.export as export_module

    app = typer.Typer()
    app.command()(export_module.main)
    ckpt = write_checkpoint(tmp_path / "ckpt" / "best.pt", _settled_unet(UNetConfig(width=2)))
    out = str(tmp_path / "w" / "student.onnx")
    args = [str(ckpt), out, "--exporter", "torchscript", "--note", "trained_on=phantoms, a=b"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "parity" in result.output
    extra = load_spec(tmp_path / "w" / "student.onnx").extra
    assert extra["provenance"]["exporter"].endswith("opset 17") and extra["trained_on"] == "phantoms, a=b"
    for bad in ("no-equals-sign", "provenance=overwritten"):
        result = CliRunner().invoke(app, [str(ckpt), out, "--note", bad])
        assert result.exit_code != 0 and "--note takes KEY=TEXT" in result.output, result.output
