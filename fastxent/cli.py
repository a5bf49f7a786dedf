"""The ``fastxent`` command: ``fastxent bench`` and ``fastxent score``.

``fastxent bench``
    fastxent on every available backend beside one read of the logits and its
    installed peers (PyTorch, JAX/optax, TensorFlow, numpy), each result checked
    against the float64 reference; prints a markdown table. See
    ``fastxent/_bench.py``.
``fastxent score LOGITS.npy LABELS.npy -o OUT.npy``
    per-row scoring of ``.npy`` files larger than memory, streamed in chunks
    under a ``--memory`` budget. See ``fastxent/_stream.py``.

Exit status: 0 on success; 1 when a benchmark result disagrees with the
reference, or on an I/O failure while writing; 2 for bad input (options,
files), reported as one line on stderr; 130 when interrupted.

Importing this module is cheap: numpy, numba and the peers are imported by the
subcommand that needs them.
"""

import argparse
import os
import shutil
import signal
import sys
import time


class CommandError(Exception):
    """Bad input to the command: printed as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------
# Progress on a terminal
# ----------------------------------------------------------------------------

class Progress:
    """A progress bar on stderr when it is a terminal; nothing when piped.

    Uses tqdm when installed (``pip install 'fastxent[cli]'``), else a plain
    line rewritten in place at most five times a second.
    """

    def __init__(self, total, unit="", stream=None):
        self.stream = stream or sys.stderr
        self.total = total
        self.unit = unit
        self.done = 0
        self.text = ""
        self.start = time.perf_counter()
        self.last = 0.0
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = None
        self.width = max(20, (shutil.get_terminal_size().columns or 80) - 1)
        if self.enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, unit=unit or "it", unit_scale=bool(unit),
                                file=self.stream, dynamic_ncols=True, leave=False)

    def update(self, count=1, text=None):
        """Advance by ``count``; ``text`` describes what runs next."""
        if not self.enabled:
            return
        if self.bar is not None:
            if text is not None:
                self.bar.set_description_str(text, refresh=False)
            self.bar.update(count)
            return
        self.done += count
        if text is not None:
            self.text = text
        now = time.perf_counter()
        if now - self.last < 0.2 and self.done < self.total:
            return
        self.last = now
        elapsed = now - self.start
        line = f"{self.done:,}/{self.total:,}" + (f" {self.unit}s" if self.unit else "")
        if self.unit and elapsed > 0 and self.done:
            rate = self.done / elapsed
            eta = (self.total - self.done) / rate
            line += f", {rate:,.0f} {self.unit}s/s, ETA {int(eta // 60)}:{int(eta % 60):02d}"
        if self.text:
            line = f"{self.text}  [{line}]"
        self.stream.write("\r" + line[:self.width].ljust(self.width))
        self.stream.flush()

    def close(self):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        else:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()


def _warn(message):
    print(f"fastxent: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------
# fastxent bench
# ----------------------------------------------------------------------------

def _bench(args):
    import json

    # TensorFlow's and XLA's C++ logging (jax, tensorflow peers): warnings and errors
    # only, so the table is not buried under start-up chatter. A user's setting wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from . import _bench as bench

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
    try:
        cases = bench.make_cases(args.ops, args.shapes, args.dtypes, quick=args.quick)
        cases, unusable = bench.usable_cases(cases, strict=args.dtypes is not None)
    except bench.BenchError as exc:
        raise CommandError(str(exc)) from None

    import fastxent

    available = fastxent.available_backends()
    if args.backend:
        backends = [name.strip() for name in args.backend.split(",") if name.strip()]
        for name in backends:
            if name not in available:
                raise CommandError(f"--backend {name!r} is not available here (available: {', '.join(available)})")
    else:
        backends = available
    peers = None
    if args.peers is not None:
        peers = [] if args.peers.strip() == "none" else [p.strip() for p in args.peers.split(",") if p.strip()]
        known = sorted({name for table in (bench._peers.PEERS, bench._peers.GPU_PEERS) for op in table.values() for name in op})
        for name in peers:
            if name not in known:
                raise CommandError(f"--peers: {name!r} is not one of {', '.join(known)} (or 'none')")
    repeat = args.repeat or (bench.QUICK_REPEAT if args.quick else None)

    info = bench.machine()  # before the run: its load average says how busy the machine was
    started = time.perf_counter()
    rows, skipped, notes = bench.run(
        cases, backends, peers=peers, repeat=repeat,
        explicit_numpy=bool(args.backend and "numpy" in backends),
        progress=lambda total: Progress(total), log=_warn)
    skipped = unusable + skipped
    elapsed = time.perf_counter() - started
    info["versions"] = bench.machine()["versions"]  # the peers' modules are imported by now

    print(bench.header(info, repeat))
    print()
    print(bench.table(rows))
    print()
    print(bench.LEGEND)
    if skipped:
        print()
        print("Not measured:")
        print("\n".join(bench.skipped_lines(skipped)))
    for note in notes:
        print(f"\nNote: {note}.")
    print(f"\nTotal wall time {elapsed:.1f} s.")

    settings = {"cases": [[c.op, list(c.shape), c.dtype] for c in cases], "backends": backends,
                "peers": peers, "repeat": repeat, "quick": args.quick, "wall_s": elapsed}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(bench.to_json(rows, skipped, notes, info, settings), handle, indent=1)
    if args.plot:
        bench.plot(rows, args.plot)
    bad = [row for row in rows if row.entry.kind == "backend" and row.agrees is False]
    if bad:
        _warn(f"{len(bad)} fastxent result(s) disagree with the reference (marked ✗)")
        return 1
    return 0


# ----------------------------------------------------------------------------
# fastxent score
# ----------------------------------------------------------------------------

def _score(args):
    from . import _stream

    def on_sigterm(signum, frame):  # noqa: ARG001 -- clean up like Ctrl-C does
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        summary = _stream.score_file(
            args.logits, args.labels, args.output,
            fields=args.fields, reduction=args.reduction, ignore_index=args.ignore_index,
            axis=args.axis, backend=args.backend, memory=args.memory, bfloat16=args.bfloat16,
            progress=lambda total: Progress(total, unit="row"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    for line in summary["stdout"]:
        print(line)
    print(summary["summary"], file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------

SCORE_EPILOG = """\
memory: the logits are memory-mapped and scored CHUNK rows of the first axis
at a time, with
    CHUNK = MEMORY // (bytes of one row of logits
                       [x2 when the class axis is not last: the kernels copy it]
                       + labels + the library's per-row results + the fields written
                       [+ 48 bytes per score with --backend numpy, its float64 work arrays])
and the pages of each chunk are released (madvise) once it is scored, so the
peak resident memory is about the budget plus the interpreter, numpy, numba
and the compiled kernels (~150-250 MB), whatever the size of the files.

fields (per row): loss, lse, target_logprob, entropy, argmax, correct
(fastxent.score); loss alone calls fastxent.sparse_softmax_cross_entropy.
reduction sum|mean: loss, target_logprob and correct over the rows that are not
--ignore-index (mean of correct = accuracy), lse and entropy over every row;
the scalars (float64) are printed, and written when -o is given.
"""


def build_parser():
    parser = _Parser(prog="fastxent", description="Fused cross-entropy kernels: benchmark and batch scoring.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"fastxent {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{bench,score}")

    bench = commands.add_parser(
        "bench", help="time fastxent beside its peers and one read of the data; check against the reference",
        description="Time fastxent on every available backend beside one read of the logits and every "
                    "installed peer, check each result against the float64 reference, print a table. "
                    "With no options: a built-in set of shapes (under a minute on 2 cores).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--shapes", help="comma-separated ROWSxCLASSES, e.g. 4096x32000,1000000x10")
    bench.add_argument("--dtypes", help="comma-separated: float16, bfloat16, float32, float64 (default float32)")
    bench.add_argument("--ops", help="comma-separated: sparse_fwd, sparse_fwd_bwd, score, sigmoid_fwd, "
                                     "sigmoid_fwd_bwd (default all)")
    bench.add_argument("--repeat", type=_positive_int, help="timed runs per entry (default: 3 or more, "
                                                            "about 0.5-2 s of each)")
    bench.add_argument("--backend", help="comma-separated fastxent backends (default: every available one)")
    bench.add_argument("--peers", help="comma-separated peers to include, or 'none' (default: every installed one)")
    bench.add_argument("--json", metavar="FILE", help="also write every measurement as JSON")
    bench.add_argument("--plot", metavar="FILE.png", help="plot GB/s against the number of classes (matplotlib)")
    bench.add_argument("--quick", action="store_true", help="tiny shapes, 3 runs: a smoke test")
    bench.set_defaults(func=_bench)

    score = commands.add_parser(
        "score", help="score .npy files larger than memory, row by row",
        description="Per-row scores of LOGITS.npy against integer LABELS.npy, streamed in chunks "
                    "under a memory budget. The result goes to a temporary file beside OUT, "
                    "renamed at the end: an interrupted run leaves no partial output.",
        epilog=SCORE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    score.add_argument("logits", metavar="LOGITS.npy", help="float16/bfloat16/float32/float64 scores")
    score.add_argument("labels", metavar="LABELS.npy", help="integer class ids, the logits' shape without the class axis")
    score.add_argument("-o", "--output", metavar="OUT",
                       help="OUT.npy (one field) or OUT.npz (any); optional with --reduction sum|mean")
    score.add_argument("--fields", default="loss", help="comma-separated (default: loss)")
    score.add_argument("--reduction", default="none", choices=("none", "sum", "mean"))
    score.add_argument("--ignore-index", type=int, default=None, metavar="N",
                       help="rows with this label score 0 and are not counted (e.g. -100)")
    score.add_argument("--axis", type=int, default=-1,
                       help="the class axis (default -1); not 0: the first axis is the one streamed")
    score.add_argument("--backend", default=None, help="numba (default on the host), numpy, or cupy")
    score.add_argument("--memory", default="256M",
                       help="memory budget for a chunk, e.g. 64M, 1G (default 256M); see below")
    score.add_argument("--bfloat16", action="store_true",
                       help="read 2-byte logits (raw '|V2', uint16 or int16 items, as np.save writes "
                            "ml_dtypes.bfloat16) as bfloat16")
    score.set_defaults(func=_score)
    return parser


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def main(argv=None):
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except CommandError as exc:
        print(f"fastxent {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastxent {args.command}: interrupted; no output written", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (| head): exit quietly, as Unix tools do.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- silence the flush at exit
        except OSError:
            pass
        return 1


if __name__ == "__main__":
    # Run the module's importable copy, so that ``fastxent.cli.CommandError`` (raised
    # by the helpers) is the class main() catches, also under ``python -m fastxent.cli``.
    from fastxent.cli import main as _main

    sys.exit(_main())
