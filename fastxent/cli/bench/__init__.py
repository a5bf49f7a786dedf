"""``fastxent bench``: fastxent beside its yardstick and its peers, checked against the reference.

This module holds the subcommand's options and its steps (options -> cases ->
run -> report); the parts, one job each:

* :mod:`.cases`: the ops, the cases (op, shape, dtype), their synthetic data;
* :mod:`.peers`: what each op is compared with (fastxent, the read
  yardstick, PyTorch, JAX/optax, TensorFlow, numpy; torch on a CUDA device);
* :mod:`.timing`: one entry timed (``perf_counter``; CUDA events, L2 flushed);
* :mod:`.agreement`: each result checked against the float64 reference;
* :mod:`.runner`: the entries of each case, measured one after the other;
* :mod:`.report`: the table, the machine, the JSON, the plot;
* :mod:`.linear`: ``--linear``, linear + cross-entropy from hidden states beside the
  bare matrix multiplies (its own table).

``bench/bench_cpu.py`` and ``bench/bench_gpu.py`` build on the same parts.
"""

import argparse
import os
import time

from ..common import CommandError, Progress, warn


def add_parser(commands):
    """Add ``bench`` and its options to the ``fastxent`` subcommands."""
    parser = commands.add_parser(
        "bench", help="time fastxent beside its peers and one read of the data; check against the reference",
        description="Time fastxent on every available backend beside one read of the logits and every "
                    "installed peer, check each result against the float64 reference, print a table. "
                    "With no options: a built-in set of shapes (under a minute on 2 cores).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", help="comma-separated ROWSxCLASSES, e.g. 4096x32000,1000000x10")
    parser.add_argument("--dtypes", help="comma-separated: float16, bfloat16, float32, float64 (default float32)")
    parser.add_argument("--ops", help="comma-separated: sparse_fwd, sparse_fwd_bwd, score, sigmoid_fwd, "
                                      "sigmoid_fwd_bwd (default all)")
    parser.add_argument("--repeat", type=_positive_int, help="timed runs per entry (default: 3 or more, "
                                                             "about 0.5-2 s of each)")
    parser.add_argument("--backend", help="comma-separated fastxent backends (default: every available one)")
    parser.add_argument("--peers", help="comma-separated peers to include, or 'none' (default: every installed one)")
    parser.add_argument("--json", metavar="FILE", help="also write every measurement as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="plot GB/s against the number of classes (matplotlib)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 runs: a smoke test")
    parser.add_argument("--linear", metavar="NxHxV", nargs="?", const="default",
                        help="instead of the logits cases: linear + cross-entropy from hidden states (N, H) and "
                             "a head (V, H), float32, beside torch and the bare matmuls; comma-separated shapes, "
                             "default 2048x1024x32000,512x1024x128256")
    parser.set_defaults(func=command)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def command(args):
    """Run ``fastxent bench``; return the exit status."""
    # TensorFlow's and XLA's C++ logging (jax, tensorflow peers): warnings and errors
    # only, so the table is not buried under start-up chatter. A user's setting wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from . import report, runner
    from .cases import QUICK_REPEAT, BenchError, make_cases, usable_cases

    _check_outputs(args)
    if args.linear is not None:
        return _linear_command(args)
    try:
        cases = make_cases(args.ops, args.shapes, args.dtypes, quick=args.quick)
        cases, unusable = usable_cases(cases, strict=args.dtypes is not None)
    except BenchError as exc:
        raise CommandError(str(exc)) from None
    backends = _chosen_backends(args.backend)
    peers = _chosen_peers(args.peers)
    repeat = args.repeat or (QUICK_REPEAT if args.quick else None)

    info = report.machine()  # before the run: its load average says how busy the machine was
    started = time.perf_counter()
    rows, skipped, notes = runner.run(
        cases, backends, peers=peers, repeat=repeat,
        explicit_numpy=bool(args.backend and "numpy" in backends),
        progress=lambda total: Progress(total), log=warn)
    skipped = unusable + skipped
    elapsed = time.perf_counter() - started
    info["versions"] = report.machine()["versions"]  # the peers' modules are imported by now

    print(report.text(rows, skipped, notes, info, repeat, elapsed))
    settings = {"cases": [[c.op, list(c.shape), c.dtype] for c in cases], "backends": backends,
                "peers": peers, "repeat": repeat, "quick": args.quick, "wall_s": elapsed}
    if args.json:
        report.write_json(args.json, rows, skipped, notes, info, settings)
    if args.plot:
        report.plot(rows, args.plot)
    bad = [row for row in rows if row.entry.kind == "backend" and row.agrees is False]
    if bad:
        warn(f"{len(bad)} fastxent result(s) disagree with the reference (marked ✗)")
        return 1
    return 0


def _linear_command(args):
    """``fastxent bench --linear``: its own table (see :mod:`.linear`)."""
    import json

    from . import linear, report

    try:
        shapes = linear.QUICK_SHAPES if args.quick else linear.parse_shapes(args.linear)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    info = report.machine()
    repeat = args.repeat or (3 if args.quick else None)
    results = linear.run(shapes, repeat, log=warn)
    print(report.header(info, repeat))
    print(linear.table(results))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": info, "linear": {"x".join(map(str, s)): {name: {"median_s": t, "problem": v}
                                                                           for name, (t, v) in r.items()}
                                                   for s, r in results.items()}}, out, indent=1, default=str)
    bad = [v for r in results.values() for name, (_, v) in r.items() if v and name.startswith("fastxent")]
    return 1 if bad else 0


def _check_outputs(args):
    """``--plot`` needs matplotlib; ``--json``/``--plot`` a folder that exists (checked before the run)."""
    if args.plot:
        try:
            import matplotlib  # noqa: F401 -- checked before an hour of benchmarking
        except ImportError:
            raise CommandError("--plot needs matplotlib: pip install 'fastxent[plot]'") from None
    for path, option in ((args.json, "--json"), (args.plot, "--plot")):
        if path:
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                raise CommandError(f"{option} {path}: the folder {folder} does not exist")


def _chosen_backends(text):
    """The fastxent backends of ``--backend`` (default: every available one)."""
    import fastxent

    available = fastxent.available_backends()
    if not text:
        return available
    backends = [name.strip() for name in text.split(",") if name.strip()]
    for name in backends:
        if name not in available:
            raise CommandError(f"--backend {name!r} is not available here (available: {', '.join(available)})")
    return backends


def _chosen_peers(text):
    """The peers of ``--peers``: None (every installed one), or the names to keep."""
    from .peers import GPU_PEERS, PEERS

    if text is None:
        return None
    peers = [] if text.strip() == "none" else [p.strip() for p in text.split(",") if p.strip()]
    known = sorted({name for table in (PEERS, GPU_PEERS) for op in table.values() for name in op})
    for name in peers:
        if name not in known:
            raise CommandError(f"--peers: {name!r} is not one of {', '.join(known)} (or 'none')")
    return peers
