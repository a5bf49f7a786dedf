"""Linear + cross-entropy from hidden states on the CPU: fastxent against PyTorch and the bare matmuls.

Entries (``fastxent/cli/bench/linear.py``, the ones ``fastxent bench --linear`` times),
timed side by side in one process on the same float32 data (hidden (N, H), weight
(V, H), labels (N,), mean reduction), round-robin, the order reversed every repetition,
median of ``--reps`` after ``--warmup``:

* ``fastxent``: ``fx.linear_cross_entropy`` (default ``memory``), forward only and
  forward+backward (``return_grad=True``);
* ``torch linear+CE``: ``F.cross_entropy(F.linear(h, W), y)``, and ``loss.backward()``;
* ``torch chunked``: ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``
  (PyTorch 2.13's chunked path, its CPU defaults), and ``loss.backward()``;
* the yardstick: the three bare products of the same shapes, each timed alone with
  numpy (the BLAS fastxent calls) into preallocated outputs: ``h @ W.T`` (the
  forward's), ``G @ W`` and ``G.T @ h`` (the backward's), G an (N, V) array.

Memory, per entry, in a fresh subprocess: the peak resident set during one call
(``VmHWM`` reset through ``/proc/self/clear_refs``) minus the resident set before it
(inputs allocated, kernels compiled), with glibc handing blocks over 64 KiB back on
free (``MALLOC_MMAP_THRESHOLD_``); "above grads" subtracts the gradients the call
returns (fastxent's ``LinearGrad``, torch's ``.grad`` of h and W), which every entry
must produce.

Run (writes bench/results/linear.md and prints it)::

    python bench/bench_linear.py
    python bench/bench_linear.py --shapes 2048x1024x32000 --reps 3 --blocks 64M,256M,1G

``--blocks`` adds fastxent forward+backward at each of those ``memory`` budgets. In the
test run (benchmarks disabled) ``bench_linear`` checks fastxent against torch on a small
shape, once per entry.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from bench_train_step import _reset_peak, _status_kib, round_robin  # noqa: E402

import fastxent as fx  # noqa: E402
from fastxent.cli.bench.linear import entries, make_data  # noqa: E402  (the entries fastxent bench --linear times)

RESULTS = Path(__file__).resolve().parent / "results" / "linear.md"
DEFAULT_SHAPES = "2048x1024x32000,512x1024x128256"


# ----------------------------------------------------------------------------
# pytest: a smoke run of every entry (benchmarks disabled)
# ----------------------------------------------------------------------------

def bench_linear(benchmark):
    hidden, weight, labels = make_data(48, 16, 300)
    calls = entries(hidden, weight, labels, blocks=("8K",))
    benchmark.group = "linear|48x16x300|float32"
    benchmark(calls["fastxent fwd+bwd"])
    expected, (grad_hidden, grad_weight) = calls["torch linear+CE fwd+bwd"]()
    for name, call in calls.items():
        loss, grads = call()
        if name.startswith("matmul"):
            continue
        np.testing.assert_allclose(float(loss), expected, rtol=2e-5, err_msg=name)
        for got, want in zip(grads, (grad_hidden, grad_weight)):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------
# Script
# ----------------------------------------------------------------------------

def memory_of(shape, name, blocks):
    """In a subprocess: peak resident-set increase of one call of entry ``name``, and its gradients' bytes."""
    calls = entries(*make_data(*shape), blocks=blocks)
    call = calls[name]
    call()  # compile, first-touch torch's pools
    _reset_peak()
    before = _status_kib("VmRSS")
    _, grads = call()
    peak = (_status_kib("VmHWM") - before) * 1024
    return {"peak": peak, "grads": int(sum(np.asarray(g).nbytes for g in grads))}


def _memory_in_subprocess(shape, name, blocks):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    args = [sys.executable, __file__, "--memory-of", name, "--shapes", "x".join(map(str, shape)),
            "--blocks", ",".join(blocks)]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _isa():
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")),
                 platform.machine())
    return f"{model}, {'AVX-512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags else 'no AVX2'}"


def render(shape, timing, memory, command):
    n, h, v = shape
    mm_fwd = timing["matmul h@W.T"]
    mm_all = mm_fwd + timing["matmul G@W"] + timing["matmul G.T@h"]
    lines = [f"### N={n}, H={h}, V={v}, float32 (logits {n * v * 4 / 2**20:.0f} MiB)", "",
             "| entry | median | / bare matmuls | fastxent speed-up | peak RSS above inputs | above grads |",
             "|---|---|---|---|---|---|"]
    for name, seconds in timing.items():
        kind = "fwd+bwd" if ("fwd+bwd" in name) else "fwd"
        yardstick = mm_all if kind == "fwd+bwd" else mm_fwd
        ours = timing[f"fastxent {kind}"]
        ratio = "" if name.startswith("matmul") else f"{seconds / yardstick:.2f}×"
        speedup = "" if name.startswith(("matmul", "fastxent")) else f"{seconds / ours:.2f}×"
        mem = memory.get(name)
        peak = "" if mem is None else f"{mem['peak'] / 2**20:.0f} MiB"
        above = "" if mem is None or not mem["grads"] else f"{(mem['peak'] - mem['grads']) / 2**20:.0f} MiB"
        lines.append(f"| {name} | {seconds * 1e3:.0f} ms | {ratio} | {speedup} | {peak} | {above} |")
    lines += ["", f"Bare matmuls: forward {mm_fwd * 1e3:.0f} ms, all three {mm_all * 1e3:.0f} ms. "
              f"fastxent's default memory here: {fx.linear._config.linear_memory(fx.linear._config.physical_memory()) / 2**20:.0f} MiB.", ""]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="NxHxV,... (default %(default)s)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--blocks", default="", help="memory budgets for extra fastxent fwd+bwd entries, e.g. 64M,1G")
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess memory figures")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shapes = [tuple(int(k) for k in s.split("x")) for s in args.shapes.split(",")]
    blocks = tuple(b for b in args.blocks.split(",") if b)
    if args.memory_of:
        print(json.dumps(memory_of(shapes[0], args.memory_of, blocks)))
        return
    command = "python bench/bench_linear.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load = os.getloadavg()
    lines = ["## Linear + cross-entropy from hidden states, CPU", "",
             f"{_isa()}, {os.cpu_count()} cores, torch {torch.__version__}, numpy {np.__version__}; "
             f"load average before the run {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}. "
             f"Median of {args.reps} after {args.warmup} warm-up, one process, round-robin.", "",
             "```", command.strip(), "```", ""]
    report = {}
    for shape in shapes:
        times = round_robin(entries(*make_data(*shape), blocks=blocks), args.warmup, args.reps)
        timing = {name: statistics.median(ts) for name, ts in times.items()}
        memory = {} if args.no_memory else {name: _memory_in_subprocess(shape, name, blocks)
                                             for name in timing if not name.startswith("matmul")}
        lines += render(shape, timing, memory, command)
        report["x".join(map(str, shape))] = {"timing": timing, "memory": memory}
        print("\n".join(lines[-(len(timing) + 6):]), flush=True)
    load = os.getloadavg()
    lines.append(f"Load average after the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
