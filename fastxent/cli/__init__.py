"""The ``fastxent`` command: ``fastxent bench`` and ``fastxent score``.

``fastxent bench``
    fastxent on every available backend beside one read of the logits and its
    installed peers (PyTorch, JAX/optax, TensorFlow, numpy), each result checked
    against the float64 reference; prints a markdown table. See
    ``fastxent/cli/bench/``.
``fastxent score LOGITS.npy LABELS.npy -o OUT.npy``
    per-row scoring of ``.npy`` files larger than memory, streamed in chunks
    under a ``--memory`` budget. See ``fastxent/cli/score/``.

Exit status: 0 on success; 1 when a benchmark result disagrees with the
reference, or on an I/O failure while writing; 2 for bad input (options,
files), reported as one line on stderr; 130 when interrupted.

The package sits on top of the library: it imports the public ``fastxent``
API and a few of its internal modules, and nothing in the library imports it.
Importing it is cheap: numba, the peers and matplotlib are imported by the
subcommand that needs them.

Layout: this module (the entry point and the top-level parser), ``common``
(the bad-input error, the progress bar), ``peers`` (what ``bench`` compares
fastxent with), ``bench/`` and ``score/`` (one subcommand each: its options
and its steps).
"""

import argparse
import os
import sys

from . import bench, score
from .common import CommandError


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser():
    """The ``fastxent`` parser; each subcommand adds its own options."""
    from .. import __version__

    parser = _Parser(prog="fastxent", description="Fused cross-entropy kernels: benchmark and batch scoring.")
    parser.add_argument("--version", action="version", version=f"fastxent {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{bench,score}")
    bench.add_parser(commands)
    score.add_parser(commands)
    return parser


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
