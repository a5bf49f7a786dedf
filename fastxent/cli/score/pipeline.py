"""``fastxent score``: per-row scoring of inputs larger than memory, step by step.

:func:`score_file` checks the options and the output path, opens the inputs
(:func:`.inputs.open_inputs`: read-only memory maps, Zarr arrays, ``.npy``
shards) and checks them, plans the chunks under the memory budget, then
streams: a chunk of rows of the first axis at a time through the public API
(``fastxent.sparse_softmax_cross_entropy`` for the loss alone, else
``fastxent.score``), each chunk's results written straight into output
``.npy`` files and summed for the reductions, its pages released
(:mod:`.files`). The last step reduces the sums and words the summary.

With ``scheduler`` (a Dask scheduler's address) the chunks are scored by the
cluster's workers instead (``fastxent.dask`` on dask arrays whose tasks read
the inputs themselves, :func:`.inputs.as_dask`), each task within the same
budget; their per-row results come back to be written and summed as above.

Chunk size (rows of the first axis)::

    chunk = memory // (logits_row * (2 if the class axis is not last else 1)
                       + the file's logits row again if its byte order is not the machine's
                       + labels_row * (2 if its byte order is not the machine's else 1)
                       + 4 bytes per label (masks)
                       + library_results_row + written_fields_row
                       [+ REFERENCE_BYTES_PER_SCORE per score with backend "numpy"])

where ``library_results_row`` is the loss alone (loss dtype) or the six
``Score`` fields, and ``written_fields_row`` the fields asked for, per row.

From hidden states (``weight_path`` given: ``logits_path`` holds hidden states (N, H)),
the scores are ``hidden @ weight.T + bias``, computed a block at a time by
``fastxent.linear_cross_entropy`` / ``fastxent.linear_score``, and ``logits_row`` is a
row of hidden states plus the V scores of the accumulation dtype the library's block
holds for it (the weight, read whole, comes on top of the budget).
"""

import os
import re
import time
from dataclasses import dataclass

import numpy as np

from ... import _dispatch, _dtypes, _reductions
from ... import Score
from ..common import CommandError, warn
from .files import Output, Pages
from .inputs import check_shapes, first_bad_label, open_hidden, open_inputs

FIELDS = Score._fields
#: Fields that are per-row values of the loss dtype (the others: argmax int64, correct bool).
FLOAT_FIELDS = ("loss", "lse", "target_logprob", "entropy")
#: Fields reduced over the rows that are not ``--ignore-index`` (mean of correct:
#: the accuracy); lse and entropy are reduced over every row, argmax (a class id)
#: not at all. Only target_logprob (NaN on an ignored row) needs the mask to be
#: summed; loss is 0 and correct False there.
COUNTED_FIELDS = ("loss", "target_logprob", "correct")
SUMMED_FIELDS = ("loss", "lse", "target_logprob", "entropy", "correct")
#: Extra bytes per score for the float64 reference's work arrays (x, exp, one-hot, ...).
REFERENCE_BYTES_PER_SCORE = 48
#: Bytes per label of the library's masks (ignored rows, labels out of range).
MASK_BYTES_PER_LABEL = 4
#: The labels' range is scanned at least this many rows at a time.
LABEL_SCAN_ROWS = 1 << 16

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def score_file(logits_path, labels_path, out_path, *, fields="loss", reduction="none", ignore_index=None,
               axis=-1, backend=None, memory="256M", bfloat16=False, progress=None, weight_path=None,
               bias_path=None, scheduler=None):
    """Score ``logits_path`` against ``labels_path`` into ``out_path``; see the module docstring.

    With ``weight_path`` (and optionally ``bias_path``), ``logits_path`` holds hidden
    states and the scores are ``hidden @ weight.T + bias``.

    Returns ``{"summary": one line for stderr, "stdout": lines (reduced values),
    "rows", "seconds", "values", "chunk_rows"}``. Raises
    :class:`fastxent.cli.common.CommandError` for bad input, before anything is
    written when it can be told from the headers and the labels.
    """
    names = _field_names(fields, reduction)
    budget = parse_size(memory)
    _check_backend(backend)
    kind = _output_kind(out_path, names, reduction)
    _check_not_an_input(out_path, (logits_path, labels_path))

    head = None
    if weight_path is None:
        logits, labels = open_inputs(logits_path, labels_path, bfloat16=bfloat16)
        ax = check_shapes(logits, labels, axis, logits_path, labels_path)
    else:
        if axis != -1:
            raise CommandError(f"--axis {axis}: hidden states are (rows, H); the classes are the weight's rows")
        logits, labels, head = open_hidden(logits_path, labels_path, weight_path, bias_path, bfloat16=bfloat16)
        ax = 1
    plan = _plan(logits, labels, ax, names, reduction, backend, budget, memory, logits_path, head)
    message = first_bad_label(labels, plan.classes, ignore_index, max(plan.chunk, LABEL_SCAN_ROWS))
    if message is not None:
        raise CommandError(f"{labels_path}: {message}")

    if scheduler is None:
        compute = _library_call(ax, ignore_index, backend, plan.loss_only, head, budget)
        if plan.rows:
            # One row, untimed: loads (or compiles) the kernels, so rows/s is the streaming's.
            try:
                compute(logits[:1], np.asarray(labels[:1]))
            except (ValueError, TypeError) as exc:
                raise CommandError(f"{logits_path}: {exc}") from None
        chunks = _chunks_here(logits, labels, plan, compute, logits_path)
    else:
        if head is not None:
            raise CommandError("--scheduler with --hidden: hidden states are scored on this machine "
                               "(the cluster path streams logits); drop one of them")
        chunks = _chunks_on_cluster(scheduler, logits, labels, ax, plan, ignore_index, backend, logits_path)
        progress = None  # a Dask progress bar instead
    output = Output(out_path, kind, names) if kind else None
    try:
        if output and reduction == "none":
            output.open({name: (labels.shape, plan.dtypes[name]) for name in names})
        sums, counted, elapsed = _stream(chunks, plan, output, ignore_index, progress)
        reduced = _reduce(sums, counted, plan) if reduction != "none" else {}
        if output:
            if reduced:
                output.write_scalars(reduced)
            output.commit()
    except BaseException:
        if output:
            output.discard()
        raise
    return _summary(logits, plan, sums, counted, elapsed, reduced, memory, out_path)


# ----------------------------------------------------------------------------
# Options and the output path
# ----------------------------------------------------------------------------

def parse_size(text):
    """``"256M"``, ``"1.5G"``, ``"64k"``, ``"1000000"`` -> bytes (binary units)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not match:
        raise CommandError(f"--memory {text!r} is not a size like 256M, 1G or 64k")
    value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value < 1:
        raise CommandError(f"--memory {text!r} is not a positive size")
    return value


def _field_names(fields, reduction):
    """The fields of ``--fields`` (a comma-separated string or a list), checked."""
    names = [name.strip() for name in fields.split(",") if name.strip()] if isinstance(fields, str) else list(fields)
    for name in names:
        if name not in FIELDS:
            raise CommandError(f"--fields: {name!r} is not one of {', '.join(FIELDS)}")
    if not names:
        raise CommandError("--fields: no field given")
    if len(set(names)) != len(names):
        raise CommandError(f"--fields: {fields!r} names a field twice")
    if reduction != "none" and "argmax" in names:
        raise CommandError(f"--reduction {reduction} does not apply to argmax (a class id); "
                           "ask for correct to get the accuracy")
    return names


def _check_backend(backend):
    import fastxent

    if backend is None:
        return
    try:
        _dispatch.check_backend_name(backend)
    except ValueError as exc:
        raise CommandError(f"--backend: {exc}") from None
    if backend not in fastxent.available_backends():
        raise CommandError(f"--backend {backend!r} is not available here "
                           f"(available: {', '.join(fastxent.available_backends())})")


def _output_kind(path, fields, reduction):
    """``"npy"``, ``"npz"`` or None (no ``-o``, allowed when reducing); the folder checked."""
    if path is None:
        if reduction == "none":
            raise CommandError("-o OUT is needed with --reduction none (the per-row results go there)")
        return None
    lower = path.lower()
    if lower.endswith(".npz"):
        kind = "npz"
    elif lower.endswith(".npy"):
        kind = "npy"
        if len(fields) > 1:
            raise CommandError(f"-o {path}: several fields ({', '.join(fields)}) go to an .npz file")
    else:
        raise CommandError(f"-o {path}: the output must end with .npy (one field) or .npz")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CommandError(f"-o {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise CommandError(f"-o {path}: is a directory")
    return kind


def _check_not_an_input(out_path, inputs):
    for path in inputs:
        if out_path and os.path.exists(out_path) and os.path.exists(path) and os.path.samefile(out_path, path):
            raise CommandError(f"-o {out_path}: is the input {path}; write the result elsewhere")


# ----------------------------------------------------------------------------
# Chunk planning
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Plan:
    names: list       # the fields asked for
    reduction: str
    loss_only: bool   # the fields are just the loss: the library's loss call, not score
    dtypes: dict      # field -> dtype of its per-row values
    rows: int         # rows of the first axis
    per_row: int      # scores per row of the first axis
    classes: int
    chunk: int        # rows of the first axis per library call
    row_bytes: int    # memory one row of the first axis takes while it is scored


def _plan(logits, labels, ax, names, reduction, backend, budget, memory, logits_path, head=None):
    """How many rows of the first axis a chunk holds under ``budget`` bytes (module docstring);
    ``head`` the ``(weight, bias)`` of hidden states."""
    rows = logits.shape[0]
    per_row = int(np.prod(labels.shape[1:], dtype=np.int64))
    loss_dtype = _dtypes.loss_dtype(logits.dtype)
    dtypes = {name: (loss_dtype if name in FLOAT_FIELDS else np.dtype(np.int64) if name == "argmax"
                     else np.dtype(np.bool_)) for name in FIELDS}
    loss_only = names == ["loss"]
    logits_row = int(np.prod(logits.shape[1:], dtype=np.int64)) * logits.dtype.itemsize
    classes = logits.shape[ax] if head is None else head[0].shape[0]
    if head is not None:  # a row of hidden states, and the block's scores of that row
        logits_row += classes * _dtypes.accumulation_dtype(logits.dtype).itemsize
    # a chunk in the other byte order is copied once more: fastxent brings it to the native order
    swapped_row = 0 if logits.dtype.isnative else int(np.prod(logits.shape[1:], dtype=np.int64)) * logits.dtype.itemsize
    row_bytes = (logits_row * (1 if ax == logits.ndim - 1 else 2) + swapped_row
                 + per_row * (labels.dtype.itemsize * (1 + (not labels.dtype.isnative)) + MASK_BYTES_PER_LABEL)
                 + per_row * (loss_dtype.itemsize if loss_only else sum(d.itemsize for d in dtypes.values()))
                 + (per_row * sum(dtypes[n].itemsize for n in names) if reduction == "none" else 0))
    if backend == "numpy":
        row_bytes += per_row * classes * REFERENCE_BYTES_PER_SCORE
    chunk = budget // max(1, row_bytes)
    if chunk < 1 and rows:
        raise CommandError(f"--memory {memory}: one row of {logits_path} needs {row_bytes:,} bytes; "
                           "raise the budget")
    stored = getattr(logits, "chunks", None)
    if isinstance(stored, tuple) and stored and rows:
        # A Zarr array decodes whole stored chunks: read whole ones, so each is decoded once.
        if chunk >= stored[0]:
            chunk = chunk // stored[0] * stored[0]
        else:
            warn(f"{logits_path}: its stored chunks of {stored[0]:,} rows take more than --memory {memory}; "
                 "each read decodes a whole stored chunk, so the memory used is that chunk's")
    return _Plan(names, reduction, loss_only, dtypes, rows, per_row, classes, max(1, chunk), row_bytes)


# ----------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------

def _library_call(ax, ignore_index, backend, loss_only, head=None, budget=None):
    """``compute(x, y) -> {field: numpy array}``: one chunk through the public API (of the
    linear functions, within ``budget``, when ``head`` holds the weight and bias)."""
    import fastxent

    on_device = backend == "cupy"
    if on_device and head is not None:
        import cupy

        head = tuple(None if a is None else cupy.asarray(a) for a in head)

    def compute(x, y):
        if on_device:
            import cupy

            x, y = cupy.asarray(x), cupy.asarray(y)
        if head is not None:
            options = dict(ignore_index=ignore_index, memory=budget, backend=backend)
            if loss_only:
                values = {"loss": fastxent.linear_cross_entropy(x, head[0], y, head[1], **options)}
            else:
                values = fastxent.linear_score(x, head[0], y, head[1], **options)._asdict()
        elif loss_only:
            values = {"loss": fastxent.sparse_softmax_cross_entropy(
                x, y, axis=ax, ignore_index=ignore_index, backend=backend)}
        else:
            values = fastxent.score(x, y, axis=ax, ignore_index=ignore_index, backend=backend)._asdict()
        if on_device:
            values = {name: value.get() for name, value in values.items()}
        return values
    return compute


def _chunks_here(logits, labels, plan, compute, logits_path):
    """``(start, stop, labels, values)`` of every chunk, scored in this process; each chunk's
    pages are released once it is used."""
    logits_pages = Pages(logits, sequential=True)
    labels_pages = Pages(labels, sequential=True)
    for start in range(0, plan.rows, plan.chunk):
        stop = min(plan.rows, start + plan.chunk)
        x, y = logits[start:stop], np.asarray(labels[start:stop])
        try:
            values = compute(x, y)
        except (ValueError, TypeError) as exc:
            raise CommandError(f"{logits_path}: rows {start}-{stop - 1}: {exc}") from None
        del x
        yield start, stop, y, values
        logits_pages.release_rows(stop)
        labels_pages.release_rows(stop)


def _stream(chunks, plan, output, ignore_index, progress):
    """Write (``output`` with ``--reduction none``) and sum each chunk's results.

    Returns ``(sums per field, rows counted (not ignored), seconds)``.
    """
    sums = {name: 0.0 for name in FIELDS}
    counted = 0
    writing = output is not None and plan.reduction == "none"
    started = time.perf_counter()
    bar = progress(plan.rows * plan.per_row) if progress else None
    try:
        for start, stop, y, values in chunks:
            counted += int(_reductions.mean_denominator(y.reshape(-1), ignore_index, None))
            kept = (y != ignore_index) if ignore_index is not None else None
            for name in SUMMED_FIELDS:
                if name in values:
                    value = values[name] if kept is None or name != "target_logprob" else values[name][kept]
                    sums[name] += float(value.sum(dtype=np.float64))
            if writing:
                for name in plan.names:
                    output.arrays[name][start:stop] = values[name]
                    output.pages[name].release_rows(stop)
            del values
            if bar:
                bar.update((stop - start) * plan.per_row)
    finally:
        if bar:
            bar.close()
    return sums, counted, time.perf_counter() - started


# ----------------------------------------------------------------------------
# On a Dask cluster
# ----------------------------------------------------------------------------

#: Seconds to wait for a Dask scheduler to answer; the environment variable overrides it.
CONNECT_TIMEOUT = 10
CONNECT_TIMEOUT_ENV = "FASTXENT_SCHEDULER_TIMEOUT"


def _connect(address):
    """A ``distributed.Client`` of the scheduler at ``address``; one line of error otherwise."""
    try:
        import distributed
    except ImportError:
        raise CommandError("--scheduler needs Dask's distributed: pip install 'fastxent[dask]'") from None
    try:
        return distributed.Client(address, timeout=float(os.environ.get(CONNECT_TIMEOUT_ENV, CONNECT_TIMEOUT)))
    except (OSError, ValueError, TypeError) as exc:
        raise CommandError(f"--scheduler {address}: cannot reach a Dask scheduler there ({exc})") from None


def _to_host(values):
    """A chunk's results as numpy arrays (from CuPy ones with ``--backend cupy``)."""
    return tuple(value.get() if hasattr(value, "get") and not isinstance(value, np.ndarray) else value
                 for value in values)


def _to_device(block):
    import cupy

    return cupy.asarray(block)


def _chunks_on_cluster(address, logits, labels, ax, plan, ignore_index, backend, logits_path):
    """``(start, stop, labels, values)`` of every chunk, scored by the workers of the Dask
    scheduler at ``address`` (in the order they finish). The tasks read the inputs where
    they lie (the paths must be visible to the workers) and score a chunk of
    ``plan.chunk`` rows each, the memory budget of one chunk per task. On a terminal,
    Dask's progress bar runs (on stderr) until every chunk is done."""
    import contextlib
    import sys

    import dask
    import distributed

    from ... import dask as fxd
    from .inputs import as_dask

    client = _connect(address)
    try:
        x, y = as_dask(logits, plan.chunk), as_dask(labels, plan.chunk)
        if backend == "cupy":
            import cupy

            x = x.map_blocks(_to_device, meta=cupy.empty((0,) * x.ndim, dtype=x.dtype))
            y = y.map_blocks(_to_device, meta=cupy.empty((0,) * y.ndim, dtype=y.dtype))
        try:
            if plan.loss_only:
                fields = {"loss": fxd.sparse_softmax_cross_entropy(x, y, axis=ax, ignore_index=ignore_index,
                                                                   backend=backend)}
            else:
                fields = fxd.score(x, y, axis=ax, ignore_index=ignore_index, backend=backend)._asdict()
        except (ValueError, TypeError) as exc:
            raise CommandError(f"{logits_path}: {exc}") from None
        names = list(fields)
        bounds = np.cumsum((0,) + x.chunks[0])
        tasks = [dask.delayed(_to_host)([fields[name].blocks[i] for name in names])
                 for i in range(len(x.chunks[0]))]
        futures = client.compute(tasks)
        where = {future.key: i for i, future in enumerate(futures)}
        if getattr(sys.stderr, "isatty", lambda: False)():
            with contextlib.redirect_stdout(sys.stderr):
                distributed.progress(futures)
        for future in distributed.as_completed(futures):
            i = where[future.key]
            start, stop = int(bounds[i]), int(bounds[i + 1])
            try:
                values = future.result()
            except (ValueError, TypeError) as exc:
                raise CommandError(f"{logits_path}: rows {start}-{stop - 1}: {exc}") from None
            future.release()
            yield start, stop, np.asarray(labels[start:stop]), dict(zip(names, values))
    finally:
        client.close()


# ----------------------------------------------------------------------------
# Reductions and the summary
# ----------------------------------------------------------------------------

def _reduce(sums, counted, plan):
    """``{field: float}``: the sums, or the means (0.0 when nothing was counted)."""
    total = plan.rows * plan.per_row
    reduced = {}
    for name in plan.names:
        denominator = counted if name in COUNTED_FIELDS else total
        value = sums[name]
        reduced[name] = value if plan.reduction == "sum" else (value / denominator if denominator else 0.0)
    return reduced


def _summary(logits, plan, sums, counted, elapsed, reduced, memory, out_path):
    """The result of :func:`score_file`: the summary line, the lines for stdout, the figures."""
    total = plan.rows * plan.per_row
    gigabytes = logits.nbytes / 1e9
    rate = total / elapsed if elapsed > 0 else float("inf")
    line = (f"fastxent score: {total:,} rows x {plan.classes:,} classes ({logits.dtype.name}, "
            f"{gigabytes:.2f} GB) in {elapsed:.2f} s: {rate:,.0f} rows/s, "
            f"{gigabytes / elapsed if elapsed > 0 else 0:.2f} GB/s; "
            f"chunks of {plan.chunk:,} rows under --memory {memory}")
    line += f"; mean loss {sums['loss'] / counted:.6g} over {counted:,} rows" if counted else "; no row counted"
    if not plan.loss_only and counted:
        line += f"; accuracy {sums['correct'] / counted:.4f}"
    if out_path:
        line += f" -> {out_path}"
    stdout = []
    if reduced:
        names = plan.names
        stdout = [repr(reduced[names[0]])] if len(names) == 1 else [f"{name} {reduced[name]!r}" for name in names]
    return {"summary": line, "stdout": stdout, "rows": total, "seconds": elapsed, "values": reduced,
            "chunk_rows": plan.chunk}
