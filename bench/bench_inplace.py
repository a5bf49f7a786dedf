"""``inplace=True`` against the default fused call: time and peak memory, side by side.

Run: ``python bench/bench_inplace.py [--repeat N]``. For each case (sparse softmax
cross-entropy forward+backward, ``reduction="mean"``, 4096 x 32000 float32 and
bfloat16; sigmoid cross-entropy forward+backward, mean, 16384 x 1000 float32) it
prints, measured in this process one after the other:

* the median time of one read of the logits (``x.max()``), of the fused call
  (a new gradient array each call), of the fused call with ``inplace=True``
  (the gradient over the same buffer, call after call), and of torch's
  forward+backward when torch is installed;
* the peak memory of one call beyond its inputs, each mode in a fresh
  subprocess: ``ru_maxrss`` after the call minus ``ru_maxrss`` once the inputs
  exist and the kernels are compiled (on a tiny call). The target of issue 12:
  in place, input + O(rows).

A script, not a test: figures depend on the machine and its load (printed with
them); compare within one run (docs/design.md, "Measuring speed").
"""

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

CASES = {
    "sparse 4096x32000 float32": ("sparse", (4096, 32000), "float32"),
    "sparse 4096x32000 bfloat16": ("sparse", (4096, 32000), "bfloat16"),
    "sigmoid 16384x1000 float32": ("sigmoid", (16384, 1000), "float32"),
}


def _inputs(kind, shape, dtype):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(shape, dtype=np.float32) * 3
    if dtype == "bfloat16":
        import ml_dtypes

        logits = logits.astype(ml_dtypes.bfloat16)
    if kind == "sparse":
        return logits, rng.integers(0, shape[1], shape[0])
    return logits, (rng.random(shape) < 0.5).astype(np.float32)


def _call(kind, logits, labels, inplace):
    import fastxent as fx

    fn = fx.sparse_softmax_cross_entropy if kind == "sparse" else fx.sigmoid_cross_entropy
    return fn(logits, labels, reduction="mean", return_grad=True, inplace=inplace)


def _torch_call(kind, logits, labels):
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    if logits.dtype.name == "bfloat16":
        x = torch.from_numpy(logits.view(np.uint16).astype(np.int16)).view(torch.bfloat16)
    else:
        x = torch.from_numpy(logits)
    y = torch.from_numpy(labels)
    loss_fn = F.cross_entropy if kind == "sparse" else F.binary_cross_entropy_with_logits

    def run():
        leaf = x.detach().requires_grad_()
        loss_fn(leaf, y).backward()
        return leaf.grad

    return run


def _median_ms(fn, repeat, setup=None):
    """Median ms of ``fn()``; ``setup()`` (untimed) before each call: the inplace call gets
    its scores back, not the previous call's gradient (values in [-1, 1], another input)."""
    if setup:
        setup()
    fn()
    times = []
    for _ in range(repeat):
        if setup:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _peak_child(case, inplace):
    """In a fresh process: the call's peak memory beyond inputs and compilation, in MB."""
    kind, shape, dtype = CASES[case]
    logits, labels = _inputs(kind, shape, dtype)
    tiny_logits, tiny_labels = _inputs(kind, (4, shape[1]), dtype)
    _call(kind, tiny_logits, tiny_labels, inplace)               # compile (or load) the kernels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _call(kind, logits, labels, inplace)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) / 1024.0)   # ru_maxrss is in KiB on Linux


def _peak_mb(case, inplace):
    out = subprocess.run([sys.executable, __file__, "--peak-child", case, str(int(inplace))],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--peak-child", nargs=2, metavar=("CASE", "INPLACE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        _peak_child(args.peak_child[0], bool(int(args.peak_child[1])))
        return
    import numba

    print(f"# {platform.processor() or platform.machine()}, numba threads {numba.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| case | read | fused | fused inplace | torch fwd+bwd | input MB | peak MB fused | peak MB inplace |")
    print("|---|---|---|---|---|---|---|---|")
    for case, (kind, shape, dtype) in CASES.items():
        logits, labels = _inputs(kind, shape, dtype)
        read = logits.view(np.uint16) if dtype == "bfloat16" else logits
        buffer = logits.copy()
        times = [_median_ms(lambda: read.max(), args.repeat),
                 _median_ms(lambda: _call(kind, logits, labels, False), args.repeat),
                 _median_ms(lambda: _call(kind, buffer, labels, True), args.repeat,
                            setup=lambda: np.copyto(buffer, logits))]
        torch_run = _torch_call(kind, logits, labels)
        torch_ms = f"{_median_ms(torch_run, max(2, args.repeat // 2)):.1f} ms" if torch_run else "-"
        buffer = None   # freed before the subprocesses measure their peaks
        peaks = [_peak_mb(case, False), _peak_mb(case, True)]
        print(f"| {case} | {times[0]:.1f} ms | {times[1]:.1f} ms | {times[2]:.1f} ms | {torch_ms} | "
              f"{logits.nbytes / 1e6:.0f} | {peaks[0]:.0f} | {peaks[1]:.0f} |", flush=True)
    print(f"# load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
