#!/usr/bin/env bash
# One prepared run for a machine with an NVIDIA GPU (H200 in issue 6): the CUDA backend's
# test suite, then the GPU benchmark. Everything lands under $OUT (default bench/results):
#   test_cupy.log, test_cupy.xml   pytest's output and JUnit report
#   gpu.json, gpu.md, bench.log    the benchmark (see bench/bench_gpu.py)
# Needs python3 with numpy, ml_dtypes, pytest, CuPy (>= 14 for bfloat16) and, for the
# peers, torch with CUDA. The first run compiles ~190 kernel instantiations with NVRTC
# (precompiled in parallel threads, ~1 min on 16 cores; CuPy caches them on disk).
# Usage: bash bench/run_gpu.sh [--quick]   (--quick: small benchmark shapes only)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"

"$PYTHON" - <<'EOF' 2>&1 | tee "$OUT/bench.log"
import cupy, numpy
print("cupy", cupy.__version__, "numpy", numpy.__version__, "devices", cupy.cuda.runtime.getDeviceCount())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.cuda.is_available())
except ImportError:
    print("torch not installed: no torch peers")
EOF

status=0
"$PYTHON" -m pytest tests/test_cupy.py -q -p no:cacheprovider -rfEs --durations=15 \
    --junitxml="$OUT/test_cupy.xml" 2>&1 | tee "$OUT/test_cupy.log" || status=1

quick=()
if [ "${1:-}" = "--quick" ]; then quick=(--quick); fi
"$PYTHON" bench/bench_gpu.py --out "$OUT" "${quick[@]}" 2>&1 | tee -a "$OUT/bench.log" || status=1

echo "run_gpu: tests and benchmark done (status $status); results in $OUT"
exit $status
