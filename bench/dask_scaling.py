"""fastxent on Dask against the in-process call: rows/s, side by side in one run.

Sparse softmax cross-entropy, loss and gradient (``return_grad=True``), float32, on

* the in-process call (``fastxent.sparse_softmax_cross_entropy`` on a numpy array);
* ``fastxent.dask`` with the threaded scheduler (one process);
* ``fastxent.dask`` on a ``distributed.LocalCluster`` of 2 worker processes,

each row-chunked (chunks of rows, the class axis whole) and class-chunked (a
vocabulary split: every row in ``--class-chunks`` blocks, no task holds a row). The
logits are made where they are used (on the workers for the cluster, from the same
seed) and kept in memory before the clock starts; the gradient is kept where it is
made (``persist``), the loss gathered; what is timed is the loss and the gradient of
every row. Each layout is checked against the float64 reference on ``--check-rows``
rows. Prints a markdown table and writes ``--json``.

Run (the lead's quiet-machine rerun; ~3 min, 10 GB of RAM at 4096 x 131072)::

    python bench/dask_scaling.py --json bench/results/dask_scaling.json

Every figure names the CPU it was measured on (``lscpu``) and the load average.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

import fastxent as fx
import fastxent.dask as fxd
from fastxent import reference as ref


def _cpu():
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "?")
    isa = "AVX-512" if "avx512f" in text else "AVX2" if "avx2" in text else "no AVX2"
    return f"{model} ({isa}, {os.cpu_count()} cores)"


def _load():
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _median_time(run, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), times


def _make_logits(shape, chunks, seed):
    """The benchmark's logits as a dask array (generated block by block where it is computed)."""
    import dask.array as da

    return (da.random.default_rng(seed).standard_normal(shape, dtype=np.float32, chunks=chunks) * 3).astype(
        np.float32)


def _check(logits_rows, labels_rows, loss_rows, grad_rows, what):
    """The loss and gradient of a few rows against the float64 reference (tolerances of tests/support.py)."""
    want_loss, want_grad = ref.sparse_softmax_cross_entropy(logits_rows, labels_rows, return_grad=True)
    loss_ok = np.allclose(loss_rows, want_loss, rtol=2e-5, atol=2e-5)
    grad_ok = np.allclose(grad_rows, want_grad, rtol=1e-4, atol=2e-6)
    if not (loss_ok and grad_ok):
        raise SystemExit(f"{what}: does not match the reference (loss {loss_ok}, grad {grad_ok})")
    return "matches"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=131072)
    parser.add_argument("--row-chunk", type=int, default=256, help="rows per chunk, row-chunked layout")
    parser.add_argument("--class-chunks", type=int, default=16, help="blocks per row, class-chunked layout")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--check-rows", type=int, default=16)
    parser.add_argument("--worker-numba-threads", type=int, default=1,
                        help="NUMBA_NUM_THREADS of each cluster worker (2 workers x 1 thread on 2 cores)")
    parser.add_argument("--skip", default="", help="comma-separated entries to skip: inprocess,threads,cluster")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import dask
    import distributed

    shape = (args.rows, args.classes)
    layouts = {"row-chunked": (args.row_chunk, args.classes),
               "class-chunked": (args.rows, -(-args.classes // args.class_chunks))}
    labels = np.random.default_rng(1).integers(0, args.classes, args.rows)
    sample = slice(0, args.check_rows)
    skip = set(filter(None, args.skip.split(",")))
    results = []
    print(f"# {args.rows} x {args.classes} float32, loss + gradient; {_cpu()}; load before: {_load()}",
          file=sys.stderr)

    def record(entry, layout, chunks, seconds, times, check):
        results.append({"entry": entry, "layout": layout, "chunks": list(chunks), "seconds": seconds,
                        "times": times, "rows_per_s": args.rows / seconds, "check": check, "load": _load()})
        print(f"{entry:10s} {layout:14s} {seconds:8.3f} s  {args.rows / seconds:10.0f} rows/s  {check}",
              file=sys.stderr)

    if "inprocess" not in skip:
        with dask.config.set(scheduler="threads"):
            x = _make_logits(shape, layouts["row-chunked"], seed=0).compute()
        fx.sparse_softmax_cross_entropy(x[:2], labels[:2], return_grad=True)   # compile / load the kernels
        outputs = {}

        def in_process():
            outputs["result"] = None
            outputs["result"] = fx.sparse_softmax_cross_entropy(x, labels, return_grad=True)

        seconds, times = _median_time(in_process, args.repeat)
        loss, grad = outputs.pop("result")
        record("in-process", "-", shape, seconds, times, _check(x[sample], labels[sample], loss[sample],
                                                               grad[sample], "in-process"))
        del x, loss, grad

    def dask_entries(entry, persist, gather):
        for layout, chunks in layouts.items():
            (logits,) = persist(_make_logits(shape, chunks, seed=0))
            kept = {}

            def run(logits=logits):
                kept.clear()
                # One graph for both: the fused blocks (or the merged partials) are computed once.
                kept["loss"], kept["grad"] = persist(*fxd.sparse_softmax_cross_entropy(logits, labels,
                                                                                       return_grad=True))
                gather(kept["loss"])

            run()   # warm-up: kernels compiled or loaded in every process
            seconds, times = _median_time(run, args.repeat)
            check = _check(gather(logits[sample]), labels[sample], gather(kept["loss"][sample]),
                           gather(kept["grad"][sample]), f"{entry} {layout}")
            record(entry, layout, chunks, seconds, times, check)
            kept.clear()
            del logits

    if "threads" not in skip:
        with dask.config.set(scheduler="threads"):
            dask_entries("threads", dask.persist, lambda a: a.compute())

    if "cluster" not in skip:
        env = {"NUMBA_NUM_THREADS": str(args.worker_numba_threads)}
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None, env=env,
                                      memory_limit=0, silence_logs=40) as cluster, distributed.Client(cluster) as client:

            def persist(*arrays):
                arrays = client.persist(list(arrays))
                distributed.wait(arrays)
                return arrays

            dask_entries("cluster", persist, lambda a: client.compute(a).result())

    baseline = next((r["seconds"] for r in results if r["entry"] == "in-process"), None)
    print(f"\n{args.rows} x {args.classes} float32, sparse softmax cross-entropy, loss + gradient; {_cpu()}; "
          f"load average {results[0]['load'] if results else _load()} (start) .. {_load()} (end)\n")
    print("| entry | layout | chunks | median of " f"{args.repeat} | rows/s | time / in-process | reference |")
    print("|---|---|---|---:|---:|---:|---|")
    for r in results:
        ratio = f"{r['seconds'] / baseline:.2f}x" if baseline else "-"
        print(f"| {r['entry']} | {r['layout']} | {tuple(r['chunks'])} | {r['seconds']:.3f} s | "
              f"{r['rows_per_s']:.0f} | {ratio} | {r['check']} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"shape": list(shape), "cpu": _cpu(), "worker_numba_threads": args.worker_numba_threads,
                       "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
