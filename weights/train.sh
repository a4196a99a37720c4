#!/bin/sh
# The recipe of the shipped weights/student.onnx: synthetic CTs, a CPU-sized network.
#   sh weights/train.sh [RUN_DIR]          (default runs/shipped; about 50 min on 2 idle CPU cores)
# On FLARE22, replace the phantoms step by your data folders and use the paper's sizes
# (README "Training"): --width 32 --spacing 1.5,1.5,2.5 --patch-size 256 and the default epochs.
set -eu
RUN=${1:-runs/shipped}
# Light augmentation: no flips or rotations (every CT is reoriented to LPS before the network, and a
# left-right flip swaps the kidneys' and adrenals' sides), distortions at 0.1: a CPU's few hundred steps
# learn the anatomy instead of the augmentations.
COMMON="--width 16 --depth 5 --patch-size 128 --batch-size 16 --lr 1e-3 --p-flip 0 --p-rotate 0 --p-distort 0.1
        --device cpu --no-amp --workers 0 --seed 0"

python -m training.phantoms "$RUN/data" --labelled 10 --unlabelled 12 --validation 4 --seed 1 --size small
# Phase one: five folds, the best three form the teacher (teacher.json).
python -m training.teacher --data "$RUN/data/labelled" --out "$RUN/teacher" --epochs 6 --spacing 3,3,4 \
    --val-every 3 $COMMON
# Phase two: every unlabelled case pseudo-labelled, Eq. 2, started from the best teacher member.
# Confidence filtering (beyond the paper): this CPU-trained teacher labels half of each wide-domain CT as
# pancreas at a mean confidence under 0.55; without the filter the student learned that (pancreas DSC 0.005
# on examples/ after 4 epochs), so Eq. 2 only counts voxels the teacher gives >= 0.9.
python -m training.student --data "$RUN/data/labelled" --unlabelled "$RUN/data/unlabelled" \
    --teacher "$RUN/teacher/teacher.json" --validation "$RUN/data/validation" --out "$RUN/student" \
    --epochs 8 --val-every 4 --init-from-teacher --confidence-threshold 0.9 $COMMON
python -m training.export "$RUN/student/best.pt" weights/student.onnx --fp16 --check-cases examples/inputs
python -m flare_infer predict examples/inputs "$RUN/examples-pred" --model weights/student.onnx --device cpu
python -m flare_infer.evaluate "$RUN/examples-pred" examples/labels
