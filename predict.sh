#!/bin/sh
# Segment every CT in INPUT_DIR into OUTPUT_DIR (the organisers run `sh predict.sh` in /workspace).
#   sh predict.sh [INPUT_DIR [OUTPUT_DIR]]      defaults: /workspace/inputs /workspace/outputs
# Extra options go to the CLI through FLARE_ARGS, e.g. FLARE_ARGS="--device cpu --preview".
# The caller's relative paths stay valid: the script resolves its own folder for the model and the
# package instead of changing directory. PYTHON overrides the interpreter (default: python3 on PATH,
# the image's virtual environment).
set -eu

INPUT_DIR=${1:-/workspace/inputs}
OUTPUT_DIR=${2:-/workspace/outputs}
SCRIPT_DIR=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)

mkdir -p -- "$OUTPUT_DIR"

# The model: FLARE_MODEL, else weights/student.onnx beside this script; without either the CLI looks in
# its default places and says how to train and export the weights.
# --precision auto: when the session runs on CUDA, the CLI runs NAME.fp16.onnx (weights/student.fp16.onnx)
# instead, where that file's sidecar records a passed agreement check against NAME.onnx (fp16.of,
# fp16.argmax_agreement >= 0.999 over fp16.check_cts CTs, as `python -m training.export --fp16` writes it);
# on the CPU, or without such a file, NAME.onnx. FLARE_ARGS="--precision fp32" keeps fp32 on the GPU.
MODEL=${FLARE_MODEL:-$SCRIPT_DIR/weights/student.onnx}
if [ -n "${FLARE_MODEL:-}" ] || [ -f "$MODEL" ]; then
    set -- --model "$MODEL" --precision auto
else
    set -- --precision auto
fi
PYTHONPATH="$SCRIPT_DIR${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH

# FLARE_ARGS is split on purpose (word splitting) so several options can be passed.
# shellcheck disable=SC2086
exec "${PYTHON:-python3}" -m flare_infer predict "$INPUT_DIR" "$OUTPUT_DIR" "$@" ${FLARE_ARGS:-}
