#!/usr/bin/env bash
# One prepared CPU benchmark run, for a quiet machine (nothing else running): the
# figures of bench/RESULTS.md and the README's "Results". Everything lands under $OUT
# (default bench/results/cpu-<isa>):
#   machine.txt          CPU model, ISA flags, threads, load average before and after
#   bench_native.{json,txt}  fastxent bench, the kernels compiled for this CPU, every peer
#   bench_avx2.{json,txt}    the same cases, the kernels compiled for haswell (AVX2), no peers
#                           (skipped where this CPU has AVX-512 off already)
#   linear.{json,txt}    fastxent bench --linear (fused linear + cross-entropy)
#   inplace.txt          bench/bench_inplace.py (time and peak memory of inplace=True)
# Usage: bash bench/run_cpu.sh [--quick]   (--quick: fastxent bench --quick only, a smoke test)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"
if grep -qw avx512f /proc/cpuinfo; then isa=avx512; else isa=avx2; fi
OUT="${OUT:-bench/results/cpu-$isa}"
mkdir -p "$OUT"
quick=()
[[ "${1:-}" == "--quick" ]] && quick=(--quick)

{
    grep -m1 "model name" /proc/cpuinfo
    echo "isa: $isa ($(grep -m1 -o 'avx512[a-z_]*' /proc/cpuinfo | sort -u | tr '\n' ' '))"
    echo "cores: $(nproc)  numba threads: $("$PYTHON" -c 'import numba; print(numba.get_num_threads())')"
    echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/machine.txt"

status=0
"$PYTHON" -m fastxent.cli bench "${quick[@]}" --json "$OUT/bench_native.json" 2>&1 | tee "$OUT/bench_native.txt" \
    || status=1
if [[ $isa == avx512 ]]; then
    # The AVX2 build on the same machine: Numba compiles for haswell in a fresh cache.
    avx2_cache=$(mktemp -d)
    NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES= NUMBA_CACHE_DIR="$avx2_cache" \
        "$PYTHON" -m fastxent.cli bench "${quick[@]}" --peers none --json "$OUT/bench_avx2.json" 2>&1 \
        | tee "$OUT/bench_avx2.txt" || status=1
    rm -rf "$avx2_cache"
fi
if [[ ${#quick[@]} == 0 ]]; then
    "$PYTHON" -m fastxent.cli bench --linear --json "$OUT/linear.json" 2>&1 | tee "$OUT/linear.txt" || status=1
    "$PYTHON" bench/bench_inplace.py 2>&1 | tee "$OUT/inplace.txt" || status=1
fi
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.txt"
exit $status
