"""Let onnxruntime-gpu find CUDA and cuDNN when they come as nvidia-* pip packages (as in the container).

onnxruntime-gpu installed with its `[cuda,cudnn]` extras brings the CUDA runtime, cuBLAS, cuFFT, cuRAND
and cuDNN as wheels under site-packages/nvidia/, where the dynamic loader does not look. onnxruntime's
`preload_dlls()` (since 1.21) loads them by path before a CUDA session is created: without it the CUDA
provider fails to load (`libcublasLt.so.12: cannot open shared object file`) and onnxruntime falls back to
the CPU. The session is meant to use it as follows (device "auto" asks for CUDA only where a driver is seen,
so a container started without `--gpus` goes straight to the CPU, quietly and without loading the
CUDA libraries):

    if device == "auto" and not nvidia_driver_visible():
        providers = ["CPUExecutionProvider"]     # and say: no NVIDIA GPU visible, running on the CPU
    elif device != "cpu":
        preload_cuda()                           # before onnxruntime.InferenceSession(...)

    python -c "from flare_infer.cuda_setup import preload_cuda; print(preload_cuda())"
"""

from __future__ import annotations

from pathlib import Path

# The kernel driver shows itself here on the host and, through the NVIDIA container toolkit, in a container
# started with --gpus; neither exists in a container started without a GPU.
DRIVER_MARKERS = (Path("/proc/driver/nvidia/version"), Path("/dev/nvidiactl"))


def nvidia_driver_visible() -> bool:
    return any(p.exists() for p in DRIVER_MARKERS)


def preload_cuda() -> bool:
    """Load the pip-installed CUDA and cuDNN libraries if this onnxruntime can use them; True if loaded.

    False (and nothing loaded) when onnxruntime has no CUDA provider, no NVIDIA driver is visible, or this
    onnxruntime predates `preload_dlls` (then CUDA must be on the loader's path, e.g. LD_LIBRARY_PATH).
    A library that cannot be loaded is left to the session, which then falls back to (or, with
    `--device cuda`, fails on) the CPU and says so.
    """
    import onnxruntime as ort  # lazy: importing flare_infer stays cheap

    if "CUDAExecutionProvider" not in ort.get_available_providers() or not nvidia_driver_visible():
        return False
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return False
    try:
        preload(cuda=True, cudnn=True, msvc=False)
    except (OSError, RuntimeError):  # RuntimeError: onnxruntime found no library folder
        return False
    return True
