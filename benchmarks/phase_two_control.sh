#!/bin/sh
# Phase two across the domain gap (issue 26, item 4), at an equal budget: what do the teacher's pseudo-labels buy
# on the real CT, against the same training without them?
#   sh benchmarks/phase_two_control.sh RUN_DIR [RESULTS_DIR]
# RUN_DIR is a `sh weights/train.sh RUN_DIR` run (its data and teacher; its phase two is the control below, so a
# finished run is reused). Two arms from the same teacher, the same command but for one flag:
#   student   RUN_DIR/pseudo_student: the method's student: labelled batches (Eq. 1) alternating with batches of
#             the unlabelled phantoms pseudo-labelled by the teacher (Eq. 2)
#   control   RUN_DIR/student: --without-pseudo-labels, every pseudo-labelled batch replaced by a labelled one (the
#             same start, steps and schedule): weights/train.sh's phase two, the shipped weights' arm
# Each arm and the teacher (RUN_DIR/teacher/fold_0/best.pt) are exported and scored by benchmarks/real_ct.py on
# ../shared/data/real-ct (silver labels, validation only): RESULTS_DIR/real_ct_{teacher,student,control}.json.
# student - control is what the pseudo-labels bought; the arms' options must stay train.sh's (its test says so).
# Every step resumes; a scored model is skipped. RESULTS_DIR default docs/results/phase_two. Time: one phase two
# (about 10 min on 2 idle cores), two if train.sh's has not run, plus about 1 min per export and score.
set -eu
RUN=${1:?usage: sh benchmarks/phase_two_control.sh RUN_DIR [RESULTS_DIR]}
RESULTS=${2:-docs/results/phase_two}
COMMON="--width 16 --depth 5 --patch-size 128 --batch-size 16 --lr 1e-3 --p-flip 0 --p-rotate 0 --p-distort 0.1
        --oversample 0.5 --device cpu --amp --workers 0 --seed 0 --randomise 0.5"
arm() {  # OUT [--without-pseudo-labels]
    out=$1
    shift
    python -m training.student --data "$RUN/data_mixed/labelled" --unlabelled "$RUN/data_varied/unlabelled" \
        --teacher "$RUN/teacher/fold_0/best.pt" --validation "$RUN/data_varied/validation" --out "$out" \
        --epochs 4 --val-every 1 --init-from-teacher --confidence-threshold 0.9 --unlabelled-fraction 0.5 --resume \
        "$@" $COMMON
}
arm "$RUN/student" --without-pseudo-labels
arm "$RUN/pseudo_student"
mkdir -p "$RESULTS"
for pair in teacher:teacher/fold_0 student:pseudo_student control:student; do
    name=${pair%%:*} dir=$RUN/${pair#*:}
    [ -f "$RESULTS/real_ct_$name.json" ] && continue
    PYTHONWARNINGS=ignore python -m training.export "$dir/best.pt" "$dir/$name.onnx" --exporter torchscript \
        --no-check --note "trained_on=synthetic phantoms only: phase two's $name (benchmarks/phase_two_control.sh)"
    python benchmarks/real_ct.py --model "$dir/$name.onnx" --out "$RESULTS/real_ct_$name.json"
done
