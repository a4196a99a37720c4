#!/bin/sh
# Phase two across the domain gap (issue 26, item 4): does the student's pseudo-labelled training transfer to the
# real CT better than its teacher, and better than the same training without pseudo-labels?
#   sh benchmarks/phase_two_control.sh RUN_DIR [RESULTS_DIR]
# RUN_DIR is a finished `sh weights/train.sh RUN_DIR` run (its teacher, student, data). Three models are scored by
# benchmarks/real_ct.py on ../shared/data/real-ct (silver labels, validation only):
#   teacher   RUN_DIR/teacher/fold_0/best.pt: phase one's member, the student's start
#   student   RUN_DIR/student/best.pt: train.sh's student (labelled batches with Eq. 1, pseudo-labelled with Eq. 2)
#   control   RUN_DIR/control/best.pt: the same command with --without-pseudo-labels (every pseudo-labelled batch
#             replaced by a labelled one: the same start, steps and schedule), trained here
# student - control is what the pseudo-labels bought at an equal budget; student - teacher is what phase two
# bought in all. The control's options must stay those of train.sh's student (below). Every step resumes; a
# scored model is skipped. RESULTS_DIR default docs/results/phase_two. Time: the student's own (about 20 min on
# 2 idle cores) plus about 1 min per export and score.
set -eu
RUN=${1:?usage: sh benchmarks/phase_two_control.sh RUN_DIR [RESULTS_DIR]}
RESULTS=${2:-docs/results/phase_two}
COMMON="--width 16 --depth 5 --patch-size 128 --batch-size 16 --lr 1e-3 --p-flip 0 --p-rotate 0 --p-distort 0.1
        --oversample 0.5 --device cpu --amp --workers 0 --seed 0 --randomise 0.5"
python -m training.student --data "$RUN/data_mixed/labelled" --unlabelled "$RUN/data_varied/unlabelled" \
    --teacher "$RUN/teacher/fold_0/best.pt" --validation "$RUN/data_varied/validation" --out "$RUN/control" \
    --epochs 4 --val-every 1 --init-from-teacher --confidence-threshold 0.9 --unlabelled-fraction 0.5 --resume \
    --without-pseudo-labels $COMMON
mkdir -p "$RESULTS"
for pair in teacher:teacher/fold_0 student:student control:control; do
    name=${pair%%:*} dir=$RUN/${pair#*:}
    [ -f "$RESULTS/real_ct_$name.json" ] && continue
    PYTHONWARNINGS=ignore python -m training.export "$dir/best.pt" "$dir/$name.onnx" --exporter torchscript \
        --no-check --note "trained_on=synthetic phantoms only: phase two's $name (benchmarks/phase_two_control.sh)"
    python benchmarks/real_ct.py --model "$dir/$name.onnx" --out "$RESULTS/real_ct_$name.json"
done
