"""ONNX Runtime session as a `predict_batch` callable, checked against the model's sidecar at start-up.

CUDA when available and asked for (`device="auto"` or `"cuda"`), else CPU. The provider that
actually runs is read back from the session (onnxruntime falls back to CPU silently otherwise);
`device="cuda"` without a working CUDA provider is an error. CUDA options aim at low whole-device
memory: an arena capped at `cuda_arena_bytes` (default `CUDA_ARENA_LIMIT_BYTES`) growing by what is
requested, heuristic cuDNN algorithm search, and fixed batch shapes (the predictor pads the last
batch) so nothing re-tunes. What these give on a GPU has not been measured (docs/GPU.md).

On CUDA, `precision="auto"` runs `NAME.fp16.onnx` instead of `NAME.onnx` where its sidecar records a
passed agreement check against this model (`fp16_sibling`). A CUDA out-of-memory error never fails a
case: the batch is run again in halves (down to one slice), then on a CPU session of the fp32 model,
each step logged (`OnnxModel.predict`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from flare_infer.cuda_setup import nvidia_driver_visible, preload_cuda
from flare_infer.labels import NUM_CLASSES
from flare_infer.spec import ModelSpec, SpecError, load_spec

log = logging.getLogger("flare_infer")

DEVICES = ("auto", "cuda", "cpu")
PRECISIONS = ("auto", "fp32", "fp16")
CUDA = "CUDAExecutionProvider"
# A cap on onnxruntime's CUDA arena (weights + activations), chosen by arithmetic: one full-resolution
# activation of a batch of 16 at 352 x 352 is 254 MB (docs/GPU.md). What it means for the whole
# device (CUDA context, cuDNN/cuBLAS workspaces on top) is unmeasured: no GPU has been available to
# this project so far. Configurable: `load_model(cuda_arena_bytes=...)`, `predict --cuda-arena-mib`.
CUDA_ARENA_LIMIT_BYTES = 768 * 1024**2
# The threshold an fp16 sibling must have passed; `python -m training.export --fp16` applies it too
# (ExportConfig.min_fp16_agreement defaults to this constant): share of
# voxels whose argmax equals the fp32 model's on whole check CTs.
FP16_MIN_AGREEMENT = 0.999
# onnxruntime's CUDA out-of-memory errors: the arena ("BFCArena::AllocateRawInternal Failed to allocate
# memory for requested buffer of size N"), a CUDA call ("CUDA failure 2: out of memory"), cuBLAS/cuDNN.
OUT_OF_MEMORY_MARKERS = (
    "Failed to allocate memory", "CUDA failure 2", "out of memory", "ALLOC_FAILED", "cudaErrorMemoryAllocation",
)  # fmt: skip


def is_out_of_memory(error: BaseException) -> bool:
    return any(marker in str(error) for marker in OUT_OF_MEMORY_MARKERS)


@dataclass
class OnnxModel:
    """A loaded model: `predict(batch)` maps (N, C, H, W) float32 to (N, 14, H, W) float32 scores.

    Not frozen: after a CUDA out-of-memory error it remembers the batch that fits (`max_batch`) and,
    past one slice, replaces its session with a CPU one (`provider` then says so).
    """

    session: object  # onnxruntime.InferenceSession (import kept lazy for `import flare_infer`)
    spec: ModelSpec
    provider: str  # the execution provider that actually runs
    input_name: str
    output_name: str
    model_path: Path | None = None  # the file the session runs
    cpu_model_path: Path | None = None  # the fp32 model a CPU fallback opens (None: no fallback)
    threads: int | None = None
    max_batch: int | None = None  # set after a CUDA out-of-memory error: the largest batch run since

    def _run(self, batch_nchw: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch_nchw})[0]

    def predict(self, batch_nchw: np.ndarray) -> np.ndarray:
        """Scores of a batch; on CUDA out of memory: halves of the batch, down to 1, then the CPU session."""
        while True:
            size = min(len(batch_nchw), self.max_batch or len(batch_nchw))
            try:
                if size == len(batch_nchw):
                    return self._run(batch_nchw)
                return np.concatenate([self._run(batch_nchw[i : i + size]) for i in range(0, len(batch_nchw), size)])
            except Exception as e:  # onnxruntime's own exception types; anything but out of memory goes up
                if self.provider != CUDA or not is_out_of_memory(e):
                    raise
                self._shrink_after_out_of_memory(size, e)

    def _shrink_after_out_of_memory(self, size: int, error: Exception) -> None:
        text = str(error)
        reason = next((text[text.index(m) :][:100] for m in OUT_OF_MEMORY_MARKERS if m in text), type(error).__name__)
        if size > 1:
            self.max_batch = size // 2
            log.warning("WARNING: CUDA out of memory at batch %d (%s): retrying in batches of %d",
                        size, reason, self.max_batch)  # fmt: skip
            return
        if self.cpu_model_path is None:
            raise error
        log.warning("WARNING: CUDA out of memory at batch 1 (%s): continuing on the CPU with %s",
                    reason, self.cpu_model_path)  # fmt: skip
        self.session = _open_session(self.cpu_model_path, ["CPUExecutionProvider"], self.threads)
        self.input_name, self.output_name = check_io(self.session, self.spec, self.cpu_model_path)
        self.provider, self.model_path, self.max_batch = "CPUExecutionProvider", self.cpu_model_path, None

    @property
    def fixed_batch(self) -> bool:
        return self.provider == CUDA


def default_threads() -> int:
    """The CPUs' worth of time this process may use (affinity and cgroup CPU quota: flare_infer.hosts), at least 1."""
    from flare_infer.hosts import available_cpus

    return available_cpus()


def _providers(device: str, available: list[str], cuda_arena_bytes: int | None = None) -> list:
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
        # A container started without --gpus: go straight to the CPU instead of loading the (large) CUDA
        # libraries only to watch onnxruntime fail to create the CUDA provider.
        return ["CPUExecutionProvider"]
    preload_cuda()  # pip-installed CUDA/cuDNN are not on the loader's path (flare_infer.cuda_setup)
    cuda_options = {
        "gpu_mem_limit": cuda_arena_bytes or CUDA_ARENA_LIMIT_BYTES,
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


def fp16_sibling(model_path: Path, spec: ModelSpec) -> Path | None:
    """`NAME.fp16.onnx` beside `NAME.onnx` if its sidecar says it was checked against this model and passed.

    `python -m training.export --fp16` writes the fp16 file only when its argmax agrees with the fp32
    model's on >= 99.9 % of the voxels of whole CTs, and records `fp16.argmax_agreement` and `check_cts`;
    a file converted without that check, for another model or with other preprocessing is not used.
    """
    candidate = model_path.with_name(f"{model_path.stem}.fp16.onnx")
    if model_path.name.endswith(".fp16.onnx") or not candidate.is_file():
        return None
    try:
        half_spec = load_spec(candidate)
    except SpecError:
        return None
    if replace(half_spec, extra={}) != replace(spec, extra={}):
        return None
    info = half_spec.extra.get("fp16") or {}
    agreement, check_cts = info.get("argmax_agreement"), info.get("check_cts")
    checked = isinstance(agreement, (int, float)) and isinstance(check_cts, int) and check_cts >= 1
    if info.get("of") != model_path.name or not checked or agreement < FP16_MIN_AGREEMENT:
        return None
    return candidate


def _open_session(model_path: Path, providers: list, threads: int | None):
    import onnxruntime as ort  # lazy: importing flare_infer stays cheap

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    # No spinning: between runs ONNX Runtime's threads would busy-wait on the cores that reduce the last batch's
    # scores meanwhile (predictor.predict_slices).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for a corrupt graph
        raise SpecError(f"{model_path}: onnxruntime cannot load it ({e})") from None


def load_model(
    model_path: str | Path,
    *,
    device: str = "auto",
    threads: int | None = None,
    precision: str = "auto",
    cuda_arena_bytes: int | None = None,
) -> OnnxModel:
    """Sidecar first (a missing or wrong one is a `SpecError`), then the session and the I/O check.

    precision: "auto" runs the checked fp16 sibling (`fp16_sibling`) when the session runs on CUDA, else
    the model itself; "fp32" always the model itself; "fp16" requires the checked sibling on CUDA.
    """
    import onnxruntime as ort  # lazy: importing flare_infer stays cheap

    model_path = Path(model_path)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, found {precision!r}")
    if not model_path.is_file():
        raise SpecError(f"{model_path}: model file not found")
    spec = load_spec(model_path)
    providers = _providers(device, ort.get_available_providers(), cuda_arena_bytes)
    on_cuda = providers[0] != "CPUExecutionProvider"
    half = fp16_sibling(model_path, spec) if on_cuda and precision != "fp32" else None
    if precision == "fp16" and half is None:
        raise RuntimeError(
            f"--precision fp16 needs CUDA and {model_path.stem}.fp16.onnx beside {model_path} with a passed "
            "agreement check in its sidecar (python -m training.export --fp16); use --precision auto or fp32"
        )
    run_path = half or model_path
    session = _open_session(run_path, providers, threads)
    provider = session.get_providers()[0]
    if device == "cuda" and provider != CUDA:
        raise RuntimeError(f"--device cuda asked for, but the session runs on {provider} (CUDA failed to start)")
    if half is not None and provider != CUDA:  # CUDA failed to start: fp16 is for the GPU, the CPU runs fp32
        run_path, session = model_path, _open_session(model_path, ["CPUExecutionProvider"], threads)
        provider = session.get_providers()[0]
    input_name, output_name = check_io(session, spec, run_path)
    return OnnxModel(
        session, spec, provider, input_name, output_name,
        model_path=run_path, cpu_model_path=model_path, threads=threads,
    )  # fmt: skip
