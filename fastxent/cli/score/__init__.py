"""``fastxent score``: per-row scoring of ``.npy`` files, ``.npy`` shards and Zarr arrays larger than memory.

This module holds the subcommand's options and runs it; the parts, one job each:

* :mod:`.inputs`: the inputs opened and checked (the one place inputs are read): a
  ``.npy`` file, a Zarr array, ``.npy`` shards;
* :mod:`.files`: memory pages released as chunks are used; the output written, then renamed;
* :mod:`.pipeline`: :func:`score_file`, the steps: checks, chunk plan, streaming (here, or on
  a Dask cluster with ``--scheduler``), reductions.
"""

import argparse
import signal
import sys

from ..common import CommandError, Progress
from .pipeline import REFERENCE_BYTES_PER_SCORE, score_file

__all__ = ["add_parser", "command", "score_file"]

EPILOG = f"""\
memory: the logits are memory-mapped and scored CHUNK rows of the first axis
at a time, with
    CHUNK = MEMORY // (bytes of one row of logits
                       [x2 when the class axis is not last: the kernels copy it]
                       + labels + the library's per-row results + the fields written
                       [+ {REFERENCE_BYTES_PER_SCORE} bytes per score with --backend numpy, its float64 work arrays])
and the pages of each chunk are released (madvise) once it is scored, so the
peak resident memory is about the budget plus the interpreter, numpy, numba
and the compiled kernels (~150-250 MB), whatever the size of the files.
A Zarr input is read in whole stored chunks (CHUNK is rounded down to a
multiple of them).

inputs: a .npy file; a Zarr array (a directory with zarr.json or .zarray);
.npy shards stacked along the first axis in sorted order: a quoted glob
('logits-*.npy').

--scheduler ADDRESS: the chunks are scored by the workers of the Dask cluster
at ADDRESS (e.g. tcp://10.0.0.5:8786; start one with `dask scheduler` and
`dask worker ADDRESS --nthreads 1 --memory-limit 2GB`), one task per chunk
within MEMORY, the inputs read by the workers themselves (the paths must be
visible to them); the results are written here. On a terminal, Dask's progress
bar shows the tasks. The scheduler must answer within 10 s
(FASTXENT_SCHEDULER_TIMEOUT=SECONDS to change it). Needs pip install 'fastxent[dask]'.

fields (per row): loss, lse, target_logprob, entropy, argmax, correct
(fastxent.score); loss alone calls fastxent.sparse_softmax_cross_entropy.
reduction sum|mean: loss, target_logprob and correct over the rows that are not
--ignore-index (mean of correct = accuracy), lse and entropy over every row;
the scalars (float64) are printed, and written when -o is given.
"""


def add_parser(commands):
    """Add ``score`` and its options to the ``fastxent`` subcommands."""
    parser = commands.add_parser(
        "score", help="score .npy files, .npy shards or Zarr arrays larger than memory, row by row",
        description="Per-row scores of LOGITS against integer LABELS, streamed in chunks "
                    "under a memory budget. The result goes to a temporary file beside OUT, "
                    "renamed at the end: an interrupted run leaves no partial output.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logits", metavar="LOGITS", nargs="?",
                        help="float16/bfloat16/float32/float64 scores: .npy, Zarr array, or .npy shards "
                             "(not with --hidden)")
    parser.add_argument("labels", metavar="LABELS",
                        help="integer class ids, the logits' shape without the class axis")
    parser.add_argument("-o", "--output", metavar="OUT",
                        help="OUT.npy (one field) or OUT.npz (any); optional with --reduction sum|mean")
    parser.add_argument("--fields", default="loss", help="comma-separated (default: loss)")
    parser.add_argument("--reduction", default="none", choices=("none", "sum", "mean"))
    parser.add_argument("--ignore-index", type=int, default=None, metavar="N",
                        help="rows with this label score 0 and are not counted (e.g. -100)")
    parser.add_argument("--axis", type=int, default=-1,
                        help="the class axis (default -1); not 0: the first axis is the one streamed")
    parser.add_argument("--backend", default=None, help="numba (default on the host), numpy, or cupy")
    parser.add_argument("--memory", default="256M",
                        help="memory budget for a chunk, e.g. 64M, 1G (default 256M); see below")
    parser.add_argument("--hidden", metavar="H.npy",
                        help="hidden states (rows, H) instead of logits: the scores are H @ W.T + B, computed "
                             "a block of rows at a time (fastxent.linear_score), never whole")
    parser.add_argument("--weight", metavar="W.npy", help="with --hidden: the output layer (V, H), read whole")
    parser.add_argument("--bias", metavar="B.npy", help="with --hidden: the bias (V,), optional")
    parser.add_argument("--bfloat16", action="store_true",
                        help="read 2-byte logits (raw '|V2', uint16 or int16 items, as np.save writes "
                             "ml_dtypes.bfloat16) as bfloat16")
    parser.add_argument("--scheduler", metavar="ADDRESS", default=None,
                        help="score on the Dask cluster whose scheduler is at ADDRESS; see below")
    parser.set_defaults(func=command)


def command(args):
    """Run ``fastxent score``; return the exit status."""
    def on_sigterm(signum, frame):  # noqa: ARG001 -- clean up like Ctrl-C does
        raise KeyboardInterrupt

    if args.hidden is None and (args.weight or args.bias):
        raise CommandError("--weight and --bias go with --hidden H.npy (hidden states)")
    if args.hidden is not None and (args.logits is not None or args.weight is None):
        raise CommandError("--hidden H.npy takes --weight W.npy (and optionally --bias B.npy) and only "
                           "LABELS.npy as positional argument, not LOGITS.npy")
    if args.hidden is None and args.logits is None:
        raise CommandError("give LOGITS.npy LABELS.npy, or --hidden H.npy --weight W.npy LABELS.npy")
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        summary = score_file(
            args.logits if args.hidden is None else args.hidden, args.labels, args.output,
            weight_path=args.weight, bias_path=args.bias,
            fields=args.fields, reduction=args.reduction, ignore_index=args.ignore_index,
            axis=args.axis, backend=args.backend, memory=args.memory, bfloat16=args.bfloat16,
            progress=lambda total: Progress(total, unit="row"), scheduler=args.scheduler)
    finally:
        signal.signal(signal.SIGTERM, previous)
    for line in summary["stdout"]:
        print(line)
    print(summary["summary"], file=sys.stderr)
    return 0
