"""Micro-benchmark: ``fastxent.backends.numba._math.exp_approx`` against ``numpy.exp`` on float32.

Run: ``python bench/micro_exp.py [N]`` (default N = 16M). Prints G elements/s,
median of repeats, for

* ``np.exp(x, out=...)`` -- numpy's own SIMD float32 exp, one thread;
* ``exp_approx`` map ``out[i] = exp(x[i])``, parallel (all Numba threads) and one thread;
* ``exp_approx`` sum ``s += exp(x[i] - m)`` (the softmax denominator), parallel and one thread;
* the same sum on a 1M-element slice repeated (L3-resident: arithmetic throughput);
* a plain sum ``s += x[i] - m`` beside it: the read bandwidth that bounds a pass.

A script, not a test: numbers depend on the machine and its load; compare
ratios within one run (docs/design.md, "Measuring speed").
"""

import os
import sys
import time

import numba
import numpy as np
from numba import njit, prange

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastxent.backends.numba import _math as nm  # noqa: E402

FASTMATH = nm.KERNEL_FASTMATH


@njit(parallel=True, fastmath=FASTMATH)
def exp_map(x, out):
    for i in prange(x.shape[0]):
        out[i] = nm.exp_approx(x[i])


@njit(parallel=True, fastmath=FASTMATH)
def exp_sum(x, m):
    total = nm.acc_type_zero(x)
    for i in prange(x.shape[0]):
        total += nm.exp_approx(x[i] - m)
    return total


@njit(parallel=True, fastmath=FASTMATH)
def plain_sum(x, m):
    total = nm.acc_type_zero(x)
    for i in prange(x.shape[0]):
        total += x[i] - m
    return total


def rate(fn, n, repeats=7, min_seconds=0.05):
    """G elements/s of ``fn()`` over ``n`` elements: median of ``repeats`` timed batches."""
    fn()
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if time.perf_counter() - start >= min_seconds:
            break
        calls *= 2
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return n / np.median(samples) / 1e9


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 16 * 2 ** 20
    rng = np.random.default_rng(0)
    x = rng.uniform(-20.0, 5.0, n).astype(np.float32)
    out = np.empty_like(x)
    m = np.float32(5.0)
    hot = x[: 1 << 20].copy()                    # 4 MiB: resident in L3, large enough to amortise the thread launch
    threads = numba.get_num_threads()
    print(f"N = {n:,} float32, numba threads = {threads}, "
          f"threading layer = {numba.config.THREADING_LAYER}, load average = {os.getloadavg()[0]:.2f}")

    rows = [("np.exp(x, out=out)  [numpy, 1 thread]", lambda: np.exp(x, out=out), n)]
    for label, count in ((f"{threads} threads", threads), ("1 thread", 1)):
        def run(fn, *args, count=count):
            def call():
                numba.set_num_threads(count)
                return fn(*args)
            return call
        rows += [
            (f"exp_approx map      [{label}]", run(exp_map, x, out), n),
            (f"exp_approx sum      [{label}]", run(exp_sum, x, m), n),
            (f"exp_approx sum hot  [{label}] (1M, L3-resident)", run(exp_sum, hot, m), hot.size),
            (f"plain sum x - m     [{label}] (read bandwidth)", run(plain_sum, x, m), n),
        ]
    numba.set_num_threads(threads)
    exp_map(x, out)
    error = np.max(np.abs(out.astype(np.float64) / np.exp(x.astype(np.float64)) - 1))
    print(f"max relative error of exp_approx on these inputs: {error:.2e}")
    baseline = None
    for label, fn, count in rows:
        value = rate(fn, count)
        baseline = baseline or value
        print(f"  {label:58s} {value:6.2f} G elem/s  ({value / baseline:5.1f}x numpy)")
    numba.set_num_threads(threads)
    simd = nm.simd_report(exp_sum)
    print(f"vector instructions in exp_sum: zmm {simd['zmm']}, ymm {simd['ymm']}; "
          f"libm calls: {simd['libm'] or 'none'}")


if __name__ == "__main__":
    main()
