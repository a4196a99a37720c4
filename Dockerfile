# The inference image: flare_infer, predict.sh and weights/ on a slim Python, with onnxruntime and (by default)
# CUDA 12 + cuDNN 9 from pip packages. No torch, no training code, no compilers. See docs/CONTAINER.md.
#
#   docker build -t flare:latest .
#   docker run --gpus all --rm -v $PWD/inputs:/workspace/inputs -v $PWD/outputs:/workspace/outputs flare:latest
#
# Build arguments:
#   BASE_IMAGE   a Debian-like image with python3 3.11 and its venv module (the pins in requirements-image.txt
#                are for CPython 3.11 on x86_64); on machines without a registry, ../shared/tools/offline-base-image.sh
#   ORT_PACKAGE  the onnxruntime flavour with its version: the CUDA 12 GPU build by default (NVIDIA driver >= 525),
#                "onnxruntime-gpu[cuda,cudnn]==1.31.1" for CUDA 13 (driver >= 580), "onnxruntime==1.26.0" for CPU only
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG ORT_PACKAGE="onnxruntime-gpu[cuda,cudnn]==1.26.0"

# NVIDIA_DRIVER_CAPABILITIES: the NVIDIA container toolkit mounts the driver's CUDA library only for "compute".
# PYTHONPATH: `python -m flare_infer` works from any working directory.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/workspace \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# The dependencies first, so that changing the code or the weights rebuilds only the small layers below.
# Every version is pinned by the constraints file (-c), ORT_PACKAGE carries its own pin; binary wheels only,
# so no compiler is ever needed. pip and setuptools leave the venv afterwards: nothing installs at run time.
COPY requirements-image.txt /opt/requirements-image.txt
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install --no-cache-dir --only-binary=:all: -c /opt/requirements-image.txt \
      numpy simpleitk scipy typer isal "${ORT_PACKAGE}" \
 && /opt/venv/bin/python -m pip check \
 && /opt/venv/bin/python -m pip uninstall --yes --quiet setuptools pip

WORKDIR /workspace
COPY container/entrypoint.sh /usr/local/bin/flare-entrypoint
COPY predict.sh ./
COPY flare_infer/ ./flare_infer/
COPY weights/ ./weights/
# Byte-compile now: the organisers start a fresh container per case, and a non-root user could not write
# the cache anyway. outputs/ is world-writable only for runs without a bind mount (with one, the host's
# folder and its permissions take its place).
RUN python -m compileall -q flare_infer \
 && mkdir -p inputs outputs \
 && chmod 1777 outputs

# Run through sh, so the entry point does not depend on the file mode that a checkout gives it.
ENTRYPOINT ["/bin/sh", "/usr/local/bin/flare-entrypoint"]
CMD ["sh", "predict.sh"]
