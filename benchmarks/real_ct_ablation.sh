#!/bin/sh
# The real-CT ablation of issue 26: which change bought how much on ../shared/data/real-ct, at one training budget.
#   sh benchmarks/real_ct_ablation.sh [RUN_DIR [RESULTS_DIR]]
# Rows, each one teacher member (fold 0 of 2: the same 20 labelled phantoms, the same 2 epochs, the same network and
# options as weights/train.sh's teacher), then exported and scored by benchmarks/real_ct.py:
#   classic      the generator's classic look (one HU table per phase, white texture)
#   look         the randomised look (training/intensity.py): the same patients and scans, other HU and texture
#   look+random  the randomised look and the training-time randomisation (--randomise 0.5)
#   +anatomy     the same on the varied anatomy (--anatomy varied: wider organ placement and size, a crescent spleen
#                along the wall, kidney sinus and renal vessels, a caudate lobe, bladder, femoral heads), the same
#                seed: other organ positions and shapes, the same looks' draws. (The committed real_ct_+anatomy_v1
#                row is the first varied anatomy, generator at commit 0c70379; this script no longer makes it.)
# Phase two is measured by weights/train.sh's own run (its teacher and its student, docs/PHANTOMS.md).
# The data: python -m training.phantoms with seed 5, small size, 40 labelled cases per kind.
# Every step resumes (the teacher's --resume; a finished row is skipped). RUN_DIR default runs/ablation;
# RESULTS_DIR default docs/results/real_ct_ablation. Time: about 8 min of CPU per row on 2 cores (idle).
set -eu
RUN=${1:-runs/ablation}
RESULTS=${2:-docs/results/real_ct_ablation}
COMMON="--n-folds 2 --folds 0 --epochs 2 --val-every 2 --spacing 3,3,4 --width 16 --depth 5 --patch-size 128
        --batch-size 16 --lr 1e-3 --p-flip 0 --p-rotate 0 --p-distort 0.1 --oversample 0.5 --device cpu --amp
        --workers 0 --seed 0 --resume"
data() {  # NAME INTENSITY ANATOMY
    [ -f "$RUN/data_$1/dataset.json" ] || python -m training.phantoms "$RUN/data_$1" --labelled 40 \
        --unlabelled 0 --validation 0 --seed 5 --size small --intensity "$2" --anatomy "$3"
}
data classic classic classic
data randomised randomised classic
data real randomised varied
row() {  # NAME DATA EXTRA_OPTIONS
    name=$1 look=$2
    shift 2
    [ -f "$RESULTS/real_ct_$name.json" ] && return 0
    python -m training.teacher --data "$RUN/data_$look/labelled" --out "$RUN/$name" $COMMON "$@"
    python -m training.export "$RUN/$name/fold_0/best.pt" "$RUN/$name/member.onnx" --no-check \
        --note "trained_on=synthetic phantoms only: ablation row $name (benchmarks/real_ct_ablation.sh)"
    python benchmarks/real_ct.py --model "$RUN/$name/member.onnx" --out "$RESULTS/real_ct_$name.json"
}
row classic classic
row look randomised
row look+random randomised --randomise 0.5
row +anatomy real --randomise 0.5
