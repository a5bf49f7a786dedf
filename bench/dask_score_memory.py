"""Row-chunked ``fastxent.dask.score`` of a 4 GB Zarr array within a per-worker memory limit.

A ``distributed.LocalCluster`` of 2 worker processes, each with ``--memory-limit`` (1 GB by
default: the nanny restarts a worker that passes 95% of it), reads a
``--rows`` x ``--classes`` float32 Zarr array in chunks of ``--chunk-rows`` rows and
scores it: the mean loss, the accuracy and the mean entropy, and the per-row loss and
argmax written to Zarr beside the input; then, on restarted workers, the command
``fastxent score --scheduler`` of the same input (``--memory`` = ``--cli-memory``), its
per-row loss and argmax written to an ``.npz``. Reported for each:
each worker's peak resident memory (``ru_maxrss``) against the limit, its baseline
(after a one-chunk warm-up that loads the kernels), whether any worker was restarted,
the throughput beside the in-process ``fastxent.score`` of one chunk, and a check of
``--check-rows`` rows against the float64 reference.

Run (the lead's quiet-machine rerun; writes 4 GB under --path once, ~2 min)::

    python bench/dask_score_memory.py --path /tmp/fastxent-4g.zarr --json bench/results/dask_score_memory.json
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

import fastxent as fx
import fastxent.dask as fxd
from fastxent import reference as ref

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dask_scaling import _cpu, _load  # noqa: E402


def _write_inputs(path, rows, classes, chunk_rows):
    """The logits (standard normal x 3, float32, uncompressed) and labels, chunk by chunk."""
    import zarr

    logits_path, labels_path = os.path.join(path, "logits"), os.path.join(path, "labels")
    if os.path.exists(logits_path):
        existing = zarr.open_array(logits_path, mode="r")
        if existing.shape == (rows, classes) and existing.chunks == (chunk_rows, classes):
            return logits_path, labels_path
    logits = zarr.create_array(store=logits_path, shape=(rows, classes), chunks=(chunk_rows, classes),
                               dtype="float32", compressors=None, overwrite=True)
    rng = np.random.default_rng(0)
    for start in range(0, rows, chunk_rows):
        stop = min(rows, start + chunk_rows)
        logits[start:stop] = rng.standard_normal((stop - start, classes), dtype=np.float32) * 3
    labels = zarr.create_array(store=labels_path, shape=(rows,), chunks=(chunk_rows,), dtype="int64",
                               compressors=None, overwrite=True)
    labels[:] = rng.integers(0, classes, rows)
    return logits_path, labels_path


def _peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="/tmp/fastxent-score-4g.zarr")
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--classes", type=int, default=32768)
    parser.add_argument("--chunk-rows", type=int, default=512)
    parser.add_argument("--memory-limit", default="1GB")
    parser.add_argument("--check-rows", type=int, default=64)
    parser.add_argument("--cli-memory", default="128M", help="--memory of the fastxent score run")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import dask
    import dask.array as da
    import distributed

    start = time.perf_counter()
    logits_path, labels_path = _write_inputs(args.path, args.rows, args.classes, args.chunk_rows)
    print(f"# inputs ready in {time.perf_counter() - start:.1f} s; {_cpu()}; load {_load()}", file=sys.stderr)
    size_gb = args.rows * args.classes * 4 / 1e9
    env = {"NUMBA_NUM_THREADS": "1"}
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None, env=env,
                                  memory_limit=args.memory_limit, silence_logs=40) as cluster, \
            distributed.Client(cluster) as client:
        logits = da.from_zarr(logits_path)
        labels = da.from_zarr(labels_path)
        warm = fxd.score(logits[:args.chunk_rows], labels[:args.chunk_rows])
        client.compute(warm.loss.sum()).result()                    # kernels loaded in the worker that ran it
        client.run(lambda: fx.score(np.zeros((2, 4), np.float32), np.zeros(2, np.int64)))  # ... and in every one
        baseline = client.run(_peak_rss_mib)
        pids = client.run(os.getpid)
        load_before = _load()

        fields = fxd.score(logits, labels)
        out = os.path.join(args.path, "scores")
        stores = [fields.loss.to_zarr(os.path.join(out, "loss"), overwrite=True, compute=False),
                  fields.argmax.to_zarr(os.path.join(out, "argmax"), overwrite=True, compute=False)]
        summaries = [fields.loss.mean(), fields.correct.mean(), fields.entropy.mean()]
        start = time.perf_counter()
        results = client.compute(summaries + stores, sync=True)
        seconds = time.perf_counter() - start
        load_after = _load()
        peaks = client.run(_peak_rss_mib)
        restarted = client.run(os.getpid) != pids

        sample = slice(0, args.check_rows)
        want = ref.score(logits[sample].compute(), labels[sample].compute())
        got_loss = da.from_zarr(os.path.join(out, "loss"))[sample].compute()
        matches = bool(np.allclose(got_loss, want.loss, rtol=2e-5, atol=2e-5))

        # The command line on the same cluster, restarted: its own peaks.
        client.restart()
        client.run(lambda: fx.score(np.zeros((2, 4), np.float32), np.zeros(2, np.int64)))
        cli_baseline = client.run(_peak_rss_mib)
        cli_pids = client.run(os.getpid)
        npz = os.path.join(args.path, "scores.npz")
        command = [sys.executable, "-m", "fastxent.cli", "score", logits_path, labels_path, "-o", npz,
                   "--fields", "loss,argmax", "--memory", args.cli_memory, "--scheduler", cluster.scheduler_address]
        start = time.perf_counter()
        run = subprocess.run(command, capture_output=True, text=True)
        cli_seconds = time.perf_counter() - start
        if run.returncode != 0:
            raise SystemExit(f"fastxent score failed:\n{run.stderr}")
        cli_peaks = client.run(_peak_rss_mib)
        cli_restarted = client.run(os.getpid) != cli_pids
        with np.load(npz) as written:
            cli_matches = bool(np.allclose(written["loss"][sample], want.loss, rtol=2e-5, atol=2e-5))
        cli_summary = run.stderr.strip().splitlines()[-1]

    block = np.random.default_rng(0).standard_normal((args.chunk_rows, args.classes), dtype=np.float32) * 3
    block_labels = np.zeros(args.chunk_rows, dtype=np.int64)
    fx.score(block, block_labels)
    times = []
    for _ in range(3):
        begin = time.perf_counter()
        fx.score(block, block_labels)
        times.append(time.perf_counter() - begin)
    in_process = float(np.median(times)) * args.rows / args.chunk_rows

    limit = dask.utils.parse_bytes(args.memory_limit) / 2**20
    print(f"\n`fastxent.dask.score` of a {args.rows} x {args.classes} float32 Zarr array ({size_gb:.2f} GB, "
          f"uncompressed, chunks of {args.chunk_rows} rows = {args.chunk_rows * args.classes * 4 / 2**20:.0f} MiB) "
          f"on a 2-worker LocalCluster, memory limit {args.memory_limit} per worker; {_cpu()}; load average "
          f"{load_before} (before) .. {load_after} (after)\n")
    print("| worker | baseline (after warm-up) | peak resident | limit | peak / limit |")
    print("|---|---:|---:|---:|---:|")
    for address in sorted(peaks):
        print(f"| {address} | {baseline[address]:.0f} MiB | {peaks[address]:.0f} MiB | {limit:.0f} MiB | "
              f"{peaks[address] / limit:.2f} |")
    print(f"\nworkers restarted: {'yes' if restarted else 'no'}; reference on {args.check_rows} rows: "
          f"{'matches' if matches else 'DOES NOT MATCH'}; mean loss {float(results[0]):.4f}, accuracy "
          f"{float(results[1]):.5f}, mean entropy {float(results[2]):.4f}")
    print(f"time {seconds:.1f} s = {args.rows / seconds:.0f} rows/s, {size_gb / seconds:.2f} GB/s; in-process "
          f"fx.score of one chunk x {args.rows // args.chunk_rows} chunks: {in_process:.1f} s "
          f"(ratio {seconds / in_process:.2f}x)")
    print(f"\n`fastxent score --scheduler ... --memory {args.cli_memory}` on the restarted workers "
          f"(wall {cli_seconds:.1f} s with start-up):\n")
    print("| worker | baseline | peak resident | limit | peak / limit |")
    print("|---|---:|---:|---:|---:|")
    for address in sorted(cli_peaks):
        print(f"| {address} | {cli_baseline[address]:.0f} MiB | {cli_peaks[address]:.0f} MiB | {limit:.0f} MiB | "
              f"{cli_peaks[address] / limit:.2f} |")
    print(f"\nworkers restarted: {'yes' if cli_restarted else 'no'}; reference on {args.check_rows} rows: "
          f"{'matches' if cli_matches else 'DOES NOT MATCH'}; summary: {cli_summary}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"shape": [args.rows, args.classes], "chunk_rows": args.chunk_rows, "cpu": _cpu(),
                       "memory_limit": args.memory_limit, "baseline_mib": baseline, "peak_mib": peaks,
                       "restarted": restarted, "matches": matches, "seconds": seconds,
                       "in_process_estimate_seconds": in_process, "load": [load_before, load_after],
                       "cli": {"memory": args.cli_memory, "baseline_mib": cli_baseline, "peak_mib": cli_peaks,
                               "restarted": cli_restarted, "matches": cli_matches, "wall_seconds": cli_seconds,
                               "summary": cli_summary}}, handle, indent=1)
    if restarted or cli_restarted or not (matches and cli_matches) or max(
            list(peaks.values()) + list(cli_peaks.values())) > limit:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
