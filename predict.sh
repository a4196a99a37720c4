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
MODEL=${FLARE_MODEL:-$SCRIPT_DIR/weights/student.onnx}
if [ -n "${FLARE_MODEL:-}" ] || [ -f "$MODEL" ]; then
    set -- --model "$MODEL"
else
    set --
fi
PYTHONPATH="$SCRIPT_DIR${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH

# FLARE_ARGS is split on purpose (word splitting) so several options can be passed.
# shellcheck disable=SC2086
exec "${PYTHON:-python3}" -m flare_infer predict "$INPUT_DIR" "$OUTPUT_DIR" "$@" ${FLARE_ARGS:-}
