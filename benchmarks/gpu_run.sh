#!/bin/bash
# The one command for a GPU machine: install the carried wheels, find CUDA, run gpu_bench.py, results in $OUT.
#
#     bash benchmarks/gpu_run.sh                         # from the repository root; OUT defaults to results/gpu
#     OUT=/some/dir GPU_BENCH_ARGS="--cases 3" bash benchmarks/gpu_run.sh
#
# Expects in .whl/ (docs/GPU.md says how to fetch them): onnxruntime-gpu (CUDA 13 build, 1.27+), SimpleITK,
# onnxconverter-common. They go to /tmp/site, first on PYTHONPATH, so this onnxruntime-gpu shadows a CPU
# onnxruntime already installed. CUDA 13 and cuDNN 9 come from the nvidia-* packages beside the machine's
# torch (cu130): their lib folders go on LD_LIBRARY_PATH, which is where onnxruntime's preload_dlls()
# and its CUDA provider look once they do not find them beside onnxruntime itself.
# Total time: gpu_bench.py's own --time-limit (360 s, case generation and model export included) under
# `timeout 420`, plus about a minute of wheel install: the whole call stays under 8 minutes. gpu_bench.py
# rewrites its JSON and Markdown after every configuration, so a cut-off run still leaves what it measured.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "error: installing .whl/*.whl into /tmp/site failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    echo "note: no .whl/*.whl here; using the onnxruntime already installed (docs/GPU.md)"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

NV_LIBS=$(python3 - <<'EOF'
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
dirs = {os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(os.path.join(d, "**", "lib*.so*"), recursive=True)}
print(":".join(sorted(dirs)))
EOF
)
[ -n "$NV_LIBS" ] && export LD_LIBRARY_PATH=$NV_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1 | tee "$OUT/nvidia_smi.txt"
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.__file__, o.get_available_providers())"

# shellcheck disable=SC2086  # GPU_BENCH_ARGS is a list of options on purpose
timeout 420 python3 benchmarks/gpu_bench.py --out "$OUT" --time-limit 360 ${GPU_BENCH_ARGS:-}
status=$?
[ $status -eq 124 ] && echo "gpu_bench.py stopped at the 420 s limit; $OUT holds what it measured"
exit $status
