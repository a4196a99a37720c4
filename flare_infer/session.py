"""ONNX Runtime session as a `predict_batch` callable, checked against the model's sidecar at start-up.

CUDA when available and asked for (`device="auto"` or `"cuda"`), else CPU. The provider that
actually runs is read back from the session (onnxruntime falls back to CPU silently otherwise);
`device="cuda"` without a working CUDA provider is an error. CUDA options keep whole-device memory
low: an arena capped at `CUDA_ARENA_LIMIT_BYTES` growing by what is requested, heuristic cuDNN
algorithm search, and fixed batch shapes (the predictor pads the last batch) so nothing re-tunes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flare_infer.cuda_setup import nvidia_driver_visible, preload_cuda
from flare_infer.labels import NUM_CLASSES
from flare_infer.spec import ModelSpec, SpecError, load_spec

DEVICES = ("auto", "cuda", "cpu")
CUDA_ARENA_LIMIT_BYTES = 768 * 1024**2  # weights + activations of a batch of 16 fit; keeps the device under 1 GB


@dataclass(frozen=True)
class OnnxModel:
    """A loaded model: `predict(batch)` maps (N, C, H, W) float32 to (N, 14, H, W) float32 scores."""

    session: object  # onnxruntime.InferenceSession (import kept lazy for `import flare_infer`)
    spec: ModelSpec
    provider: str  # the execution provider that actually runs
    input_name: str
    output_name: str

    def predict(self, batch_nchw: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch_nchw})[0]

    @property
    def fixed_batch(self) -> bool:
        return self.provider == "CUDAExecutionProvider"


def default_threads() -> int:
    """The cores this process may run on (cgroup/affinity aware where the OS tells), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _providers(device: str, available: list[str]) -> list:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, found {device!r}")
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise RuntimeError(
            f"--device cuda asked for, but this onnxruntime offers only {available}; "
            "install onnxruntime-gpu with a matching CUDA, or use --device cpu"
        )
    if device == "cpu" or not has_cuda:
        return ["CPUExecutionProvider"]
    if device == "auto" and not nvidia_driver_visible():
        # A container started without --gpus: go straight to the CPU instead of loading 2 GB of CUDA
        # libraries only to watch onnxruntime fail to create the CUDA provider.
        return ["CPUExecutionProvider"]
    preload_cuda()  # pip-installed CUDA/cuDNN are not on the loader's path (flare_infer.cuda_setup)
    cuda_options = {
        "gpu_mem_limit": CUDA_ARENA_LIMIT_BYTES,
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "HEURISTIC",
    }
    return [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]


def _dim_matches(dim, expected: int) -> bool:
    """A fixed dim must equal `expected`; a symbolic (str) or unknown (None) dim is accepted."""
    return dim is None or isinstance(dim, str) or dim == expected


def check_io(session, spec: ModelSpec, model_path: Path) -> tuple[str, str]:
    """Input (N, C_in, H, W) with C_in == spec.input_channels, output (N, 14, H, W); symbolic dims pass."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) < 1:
        raise SpecError(
            f"{model_path}: expected one input and at least one output, found {len(inputs)} and {len(outputs)}"
        )
    shape_in, shape_out = inputs[0].shape, outputs[0].shape
    if len(shape_in) != 4 or not _dim_matches(shape_in[1], spec.input_channels):
        raise SpecError(
            f"{model_path}: input must be (N, {spec.input_channels}, H, W) as the sidecar says, found {shape_in}"
        )
    if len(shape_out) != 4 or not _dim_matches(shape_out[1], NUM_CLASSES):
        raise SpecError(f"{model_path}: output must be (N, {NUM_CLASSES}, H, W), found {shape_out}")
    return inputs[0].name, outputs[0].name


def load_model(model_path: str | Path, *, device: str = "auto", threads: int | None = None) -> OnnxModel:
    """Sidecar first (a missing or wrong one is a `SpecError`), then the session and the I/O check."""
    import onnxruntime as ort  # lazy: importing flare_infer stays cheap

    model_path = Path(model_path)
    if not model_path.is_file():
        raise SpecError(f"{model_path}: model file not found")
    spec = load_spec(model_path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = _providers(device, ort.get_available_providers())
    try:
        session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for a corrupt graph
        raise SpecError(f"{model_path}: onnxruntime cannot load it ({e})") from None
    provider = session.get_providers()[0]
    if device == "cuda" and provider != "CUDAExecutionProvider":
        raise RuntimeError(f"--device cuda asked for, but the session runs on {provider} (CUDA failed to start)")
    input_name, output_name = check_io(session, spec, model_path)
    return OnnxModel(session, spec, provider, input_name, output_name)
