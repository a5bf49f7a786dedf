#!/usr/bin/env bash
# Compile every CUDA kernel instantiation of kernels/ for sm_80 and sm_90, warnings as errors:
# the nvcc front end for both, code generation once per arch (nvcc -ptx for sm_80; for sm_90
# CuPy's NVRTC on the loader's exact source and options, or nvcc -ptx where NVRTC is unusable).
# Run from the repository root: bash ci/check_kernels.sh. Skips (exit 0) without nvcc.
# The work is in ci/check_kernels.py, which reads the instantiations from the backend's
# dtype table (fastxent/backends/cuda/_build.py).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v nvcc >/dev/null 2>&1 && [ ! -x /usr/local/cuda/bin/nvcc ]; then
    echo "check_kernels: SKIPPED, nvcc not found (install the CUDA toolkit to compile kernels/)"
    exit 0
fi
if ! command -v nvcc >/dev/null 2>&1; then
    export PATH="/usr/local/cuda/bin:$PATH"
fi

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
    if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi

exec "$PYTHON" ci/check_kernels.py "$@"
