"""A stand-in ONNX model for tests: pointwise thresholds on the normalised intensity, no training, no torch.

The graph takes the centre channel x of an (N, C, H, W) batch and scores each class linearly in x
so that the argmax is `classes[i]` for x in band i, [t_{i-1}, t_i) of `thresholds`; unused classes
score far below and never win. `standin_classes` applies the same bands in numpy, which is
what the tests compare the pipeline against. Used by tests/test_pipeline.py, tests/test_cli.py and
the container smoke test:

    from tests.onnx_standin import make_standin_model
    onnx_path = make_standin_model(tmp_path)        # tmp_path/standin.onnx + standin.json
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from flare_infer.labels import NUM_CLASSES
from flare_infer.spec import ModelSpec

# Bands on the normalised intensity: < 0.35 background, liver, spleen, > 0.75 left kidney.
THRESHOLDS = (0.35, 0.55, 0.75)
CLASSES = (0, 1, 3, 13)
SHARPNESS = 50.0  # logit slope: softmax confidence near 0.5 at a threshold, near 1 inside a wide band
_UNUSED_SCORE = -1.0e4


def standin_classes(x: np.ndarray, thresholds=THRESHOLDS, classes=CLASSES) -> np.ndarray:
    """The stand-in's labels computed directly in numpy on normalised intensities (uint8)."""
    return np.asarray(classes, np.uint8)[np.digitize(x, thresholds)]


def _linear_scores(thresholds, classes) -> tuple[np.ndarray, np.ndarray]:
    """Slopes and intercepts (14,) with argmax_k(slope_k * x + intercept_k) == the band of x.

    Band i scores s_i(x) = SHARPNESS * sum_{j<i} (x - t_j): s_i - s_{i-1} = SHARPNESS * (x - t_{i-1}) is positive
    exactly while x is above t_{i-1}, so s rises up to x's band and falls after it. Unused classes never win.
    """
    t = np.asarray(thresholds, np.float64)
    if len(classes) != len(t) + 1 or np.any(np.diff(t) <= 0) or len(set(classes)) != len(classes):
        raise ValueError(f"need increasing thresholds and one more distinct class, found {thresholds}, {classes}")
    slope = np.zeros(NUM_CLASSES, np.float32)
    intercept = np.full(NUM_CLASSES, _UNUSED_SCORE, np.float32)
    for i, cls in enumerate(classes):
        slope[cls] = SHARPNESS * i
        intercept[cls] = -SHARPNESS * t[:i].sum()
    return slope, intercept


def standin_graph(input_channels: int, thresholds=THRESHOLDS, classes=CLASSES) -> onnx.ModelProto:
    slope, intercept = _linear_scores(thresholds, classes)
    k = input_channels // 2
    inits = [
        numpy_helper.from_array(slope.reshape(1, NUM_CLASSES, 1, 1), "slope"),
        numpy_helper.from_array(intercept.reshape(1, NUM_CLASSES, 1, 1), "intercept"),
        numpy_helper.from_array(np.array([k], np.int64), "start"),
        numpy_helper.from_array(np.array([k + 1], np.int64), "end"),
        numpy_helper.from_array(np.array([1], np.int64), "axis"),
    ]
    nodes = [
        helper.make_node("Slice", ["input", "start", "end", "axis"], ["centre"]),  # (N, 1, H, W)
        helper.make_node("Mul", ["centre", "slope"], ["scaled"]),  # (N, 14, H, W)
        helper.make_node("Add", ["scaled", "intercept"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "threshold_standin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", input_channels, "H", "W"])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", NUM_CLASSES, "H", "W"])],
        inits,
    )
    # IR 8 / opset 17: loadable by every onnxruntime >= 1.14, including older GPU builds in containers.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def make_standin_model(
    dir: Path, name: str = "standin", input_channels: int = 1, thresholds=THRESHOLDS, classes=CLASSES
) -> Path:
    """Write `dir/NAME.onnx` and its sidecar `dir/NAME.json`; return the .onnx path."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    onnx_path = dir / f"{name}.onnx"
    onnx.save(standin_graph(input_channels, thresholds, classes), str(onnx_path))
    spec = ModelSpec(
        input_channels=input_channels,
        output="logits",
        extra={"provenance": {"kind": "threshold stand-in", "thresholds": list(thresholds), "classes": list(classes)}},
    )
    spec.save(onnx_path.with_suffix(".json"))
    return onnx_path
