"""``fastxent score``: per-row scoring of ``.npy`` files larger than memory.

The logits and labels are memory-mapped (``np.load(mmap_mode="r")``) and
scored a chunk of rows of the first axis at a time through the public API
(``fastxent.sparse_softmax_cross_entropy`` for the loss alone, else
``fastxent.score``); each chunk's results go straight into output ``.npy``
files opened with ``np.lib.format.open_memmap``. Once a chunk is done, its
pages of every mapping are dropped from the process (``madvise(MADV_DONTNEED)``;
the data stays in the page cache, dirty output pages are written back by the
kernel as usual), so the resident memory stays near the ``--memory`` budget
whatever the size of the files.

Chunk size (rows of the first axis)::

    chunk = memory // (logits_row * (1 + 1 if the class axis is not last
                                    + 1 if the file's byte order is not the machine's)
                       + labels_row * (2 if its byte order is not the machine's else 1)
                       + 4 bytes per label (masks)
                       + library_results_row + written_fields_row
                       [+ 48 bytes per score with backend "numpy"])

where ``library_results_row`` is the loss alone (loss dtype) or the six
``Score`` fields, and ``written_fields_row`` the fields asked for, per row.

The output is written to temporary files beside ``OUT`` (``.OUT.*.tmp``)
and renamed onto ``OUT`` at the end; any failure or interruption removes
them, so no half-written result is ever left under ``OUT``'s name.
"""

import mmap
import os
import re
import tempfile
import time
import zipfile

import numpy as np

from . import _dtypes
from ._score import Score
from .cli import CommandError

FIELDS = Score._fields
#: Fields that are per-row values of the loss dtype (the others: argmax int64, correct bool).
FLOAT_FIELDS = ("loss", "lse", "target_logprob", "entropy")
#: Extra bytes per score for the float64 reference's work arrays (x, exp, one-hot, ...).
REFERENCE_BYTES_PER_SCORE = 48

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text):
    """``"256M"``, ``"1.5G"``, ``"64k"``, ``"1000000"`` -> bytes (binary units)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not match:
        raise CommandError(f"--memory {text!r} is not a size like 256M, 1G or 64k")
    value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value < 1:
        raise CommandError(f"--memory {text!r} is not a positive size")
    return value


# ----------------------------------------------------------------------------
# Reading .npy headers: every problem is one line naming the file
# ----------------------------------------------------------------------------

def _describe_dtype(dtype):
    return dtype.name if dtype.names is None else str(dtype)


def open_npy(path):
    """A read-only memory map of the ``.npy`` file ``path``, after checking it is whole."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 -- closed below
    except FileNotFoundError:
        raise CommandError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CommandError(f"{path}: is a directory, not a .npy file") from None
    except PermissionError:
        raise CommandError(f"{path}: permission denied") from None
    except OSError as exc:
        raise CommandError(f"{path}: cannot open ({exc.strerror or exc})") from None
    with handle:
        try:
            version = np.lib.format.read_magic(handle)
        except (ValueError, OSError) as exc:
            raise CommandError(f"{path}: not a .npy file ({exc})") from None
        try:
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                shape, fortran, dtype = np.lib.format._read_array_header(handle, version)
        except (ValueError, OSError, SyntaxError) as exc:
            raise CommandError(f"{path}: corrupt .npy header ({exc})") from None
        data_start = handle.tell()
    if dtype.hasobject:
        raise CommandError(f"{path}: holds Python objects (a pickled array), not numbers")
    if fortran and len(shape) > 1:
        raise CommandError(f"{path}: is stored in Fortran order; rows must be contiguous to stream "
                           "them (rewrite it with np.save(path, np.ascontiguousarray(a)))")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = os.path.getsize(path)
    if size - data_start < expected:
        raise CommandError(
            f"{path}: truncated: its header promises {_describe_dtype(dtype)} of shape {tuple(shape)} "
            f"({expected:,} bytes of data) but the file holds {max(0, size - data_start):,}")
    if expected == 0:
        return np.zeros(shape, dtype)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise CommandError(f"{path}: cannot map it ({exc})") from None


def _check_logits(path, logits, bfloat16):
    dtype = logits.dtype
    if bfloat16:
        if dtype.itemsize != 2 or dtype.kind not in "Viu" or _dtypes.is_bfloat16(dtype):
            if _dtypes.is_bfloat16(dtype):
                return logits
            raise CommandError(f"{path}: --bfloat16 reads 2-byte raw items (|V2, uint16, int16), "
                               f"but the file holds {_describe_dtype(dtype)}")
        try:
            import ml_dtypes
        except ImportError:
            raise CommandError("--bfloat16 needs ml_dtypes: pip install 'fastxent[bfloat16]'") from None
        return logits.view(ml_dtypes.bfloat16)
    if _dtypes.is_score_dtype(dtype):
        return logits
    if dtype.kind == "V" and dtype.itemsize == 2 and dtype.names is None:
        raise CommandError(f"{path}: holds 2-byte raw items (|V2), which is how np.save writes "
                           "bfloat16; pass --bfloat16 to read them as bfloat16")
    kind = {"i": "integer", "u": "integer", "b": "boolean", "c": "complex", "U": "text", "S": "bytes",
            "M": "datetime", "m": "timedelta", "V": "raw/structured"}.get(dtype.kind, "non-float")
    raise CommandError(f"{path}: logits must be float16, bfloat16, float32 or float64 scores, "
                       f"got {kind} dtype {_describe_dtype(dtype)}")


def _check_labels(path, labels):
    dtype = labels.dtype
    if dtype.kind in "iu":
        return labels
    if dtype.kind in "fb" or _dtypes.is_bfloat16(dtype):
        hint = "; cast them with .astype(np.int64) if they are class ids"
        raise CommandError(f"{path}: labels must be integer class ids, got {dtype.name}{hint}")
    raise CommandError(f"{path}: labels must be integer class ids, got non-numeric dtype "
                       f"{_describe_dtype(dtype)}")


def _output_kind(path, fields, reduction):
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


# ----------------------------------------------------------------------------
# Memory: release the pages of each chunk once it is used
# ----------------------------------------------------------------------------

class _Pages:
    """Drops the pages of a memory-mapped array from this process as it is consumed.

    ``np.memmap`` maps the file from ``offset`` rounded down to the allocation
    granularity, so array byte ``j`` sits at ``offset % granularity + j`` in
    the mapping; ``release(upto)`` drops every whole page before array byte
    ``upto``. For a read-only map the pages stay in the page cache; for an
    output (shared, writable) map the kernel moves their dirty state to the
    page cache and writes them back as usual. A no-op where ``madvise`` is
    missing (not Linux/macOS).
    """

    def __init__(self, array, sequential=False):
        self.map = getattr(array, "_mmap", None)
        if self.map is None or not hasattr(self.map, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            self.map = None
            return
        self.start = int(getattr(array, "offset", 0)) % mmap.ALLOCATIONGRANULARITY
        self.released = 0
        if sequential and hasattr(mmap, "MADV_SEQUENTIAL"):
            try:
                self.map.madvise(mmap.MADV_SEQUENTIAL)
            except OSError:
                pass

    def release(self, upto):
        if self.map is None:
            return
        end = (self.start + upto) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > self.released:
            self.map.madvise(mmap.MADV_DONTNEED, self.released, end - self.released)
            self.released = end


# ----------------------------------------------------------------------------
# Output files
# ----------------------------------------------------------------------------

class _Output:
    """Per-field temporary ``.npy`` files beside ``path``, renamed (or zipped) onto it at the end."""

    def __init__(self, path, kind, fields):
        self.path = path
        self.kind = kind
        self.fields = fields
        self.folder = os.path.dirname(os.path.abspath(path))
        self.base = os.path.basename(path)
        self.temps = []
        self.arrays = {}
        self.pages = {}

    def _temp(self, suffix):
        handle, name = tempfile.mkstemp(dir=self.folder, prefix=f".{self.base}.", suffix=suffix)
        os.close(handle)
        self.temps.append(name)
        return name

    def open(self, shapes_dtypes):
        for name, (shape, dtype) in shapes_dtypes.items():
            array = np.lib.format.open_memmap(self._temp(f".{name}.tmp"), mode="w+", dtype=dtype, shape=shape)
            self.arrays[name] = array
            self.pages[name] = _Pages(array)

    def write_scalars(self, values):
        for name, value in values.items():
            temp = self._temp(f".{name}.tmp")
            with open(temp, "wb") as handle:
                np.lib.format.write_array(handle, np.asarray(value, dtype=np.float64))

    def commit(self):
        """Flush, close and move the result onto ``path`` (one rename: all or nothing)."""
        for array in self.arrays.values():
            array.flush()
        self.arrays.clear()
        self.pages.clear()
        field_files = list(self.temps)
        if self.kind == "npy":
            final = field_files[0]
        else:
            final = self._temp(".npz.tmp")
            # np.savez's layout: a zip of NAME.npy members, stored uncompressed;
            # ZipFile.write streams each file, so memory stays bounded here too.
            with zipfile.ZipFile(final, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
                for name, temp in zip(self.fields, field_files):
                    archive.write(temp, arcname=f"{name}.npy")
        os.replace(final, self.path)
        self.temps.remove(final)
        self.discard()  # the per-field files zipped into the .npz

    def discard(self):
        self.arrays.clear()
        self.pages.clear()
        for name in self.temps:
            try:
                os.unlink(name)
            except OSError:
                pass
        self.temps.clear()


# ----------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------

def _first_bad_label(labels, num_classes, ignore_index, chunk_rows):
    """Scan the labels chunk by chunk for one outside ``[0, C)``; fastxent's message or None."""
    from . import _validate

    pages = _Pages(labels, sequential=True)
    row_bytes = labels.strides[0] if labels.ndim and labels.shape[0] else 0
    for start in range(0, labels.shape[0], chunk_rows):
        stop = min(labels.shape[0], start + chunk_rows)
        message = _validate.bad_label_message(labels[start:stop], num_classes, ignore_index)
        pages.release(stop * row_bytes)
        if message is not None:
            # The library numbers rows within the chunk it was given: renumber in the file.
            return re.sub(r"^labels\[(\d+)", lambda m: f"labels[{int(m.group(1)) + start}", message)
    return None


def score_file(logits_path, labels_path, out_path, *, fields="loss", reduction="none", ignore_index=None,
               axis=-1, backend=None, memory="256M", bfloat16=False, progress=None):
    """Score ``logits_path`` against ``labels_path`` into ``out_path``; see the module docstring.

    Returns ``{"summary": one line for stderr, "stdout": lines (reduced values),
    "rows", "seconds", "values"}``. Raises :class:`fastxent.cli.CommandError`
    for bad input, before anything is written when it can be told from the
    headers and the labels.
    """
    import fastxent
    from . import _dispatch

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
    budget = parse_size(memory)
    if backend is not None:
        try:
            _dispatch.check_backend_name(backend)
        except ValueError as exc:
            raise CommandError(f"--backend: {exc}") from None
        if backend not in fastxent.available_backends():
            raise CommandError(f"--backend {backend!r} is not available here "
                               f"(available: {', '.join(fastxent.available_backends())})")
    kind = _output_kind(out_path, names, reduction)
    for path in (logits_path, labels_path):
        if out_path and os.path.exists(out_path) and os.path.exists(path) and os.path.samefile(out_path, path):
            raise CommandError(f"-o {out_path}: is the input {path}; write the result elsewhere")

    logits = _check_logits(logits_path, open_npy(logits_path), bfloat16)
    labels = _check_labels(labels_path, open_npy(labels_path))
    if logits.ndim < 2:
        raise CommandError(f"{logits_path}: logits of shape {logits.shape} have no row axis to stream "
                           "(need at least 2 dimensions: rows and classes)")
    if not -logits.ndim <= axis < logits.ndim:
        raise CommandError(f"--axis {axis} is out of range for {logits_path} of shape {logits.shape}")
    ax = axis % logits.ndim
    if ax == 0:
        raise CommandError(
            f"--axis {axis} puts the classes of {logits_path} (shape {logits.shape}) on the first axis, "
            "the one streamed; save the logits with the classes on another axis "
            "(np.save(path, np.moveaxis(a, 0, -1))) or score them in memory with fastxent.score")
    count = logits.shape[ax]
    expected = logits.shape[:ax] + logits.shape[ax + 1:]
    if labels.shape != expected:
        if labels.ndim == len(expected) and labels.shape[0] != logits.shape[0]:
            problem = (f"{labels_path}: holds {labels.shape[0]:,} rows but {logits_path} holds "
                       f"{logits.shape[0]:,}")
        else:
            problem = f"{labels_path}: shape {labels.shape} does not match {logits_path}"
        raise CommandError(f"{problem} (expected labels of shape {expected}: the logits' shape "
                           f"{logits.shape} without class axis {ax})")

    rows = logits.shape[0]
    per_row = int(np.prod(labels.shape[1:], dtype=np.int64))  # scores per row of the first axis
    loss_dtype = _dtypes.loss_dtype(logits.dtype)
    out_dtypes = {name: (loss_dtype if name in FLOAT_FIELDS else np.dtype(np.int64) if name == "argmax"
                         else np.dtype(np.bool_)) for name in FIELDS}
    loss_only = names == ["loss"]
    logits_row = int(np.prod(logits.shape[1:], dtype=np.int64)) * logits.dtype.itemsize
    # a chunk in the other byte order is copied once more (fastxent brings it to the native order)
    copies = 1 + (ax != logits.ndim - 1) + (not logits.dtype.isnative)
    row_bytes = (logits_row * copies
                 + per_row * (labels.dtype.itemsize * (1 + (not labels.dtype.isnative)) + 4)
                 + per_row * (loss_dtype.itemsize if loss_only else sum(d.itemsize for d in out_dtypes.values()))
                 + (per_row * sum(out_dtypes[n].itemsize for n in names) if reduction == "none" else 0))
    if backend == "numpy":
        row_bytes += per_row * count * REFERENCE_BYTES_PER_SCORE
    chunk = budget // max(1, row_bytes)
    if chunk < 1 and rows:
        raise CommandError(f"--memory {memory}: one row of {logits_path} needs {row_bytes:,} bytes; "
                           "raise the budget")
    chunk = max(1, chunk)

    message = _first_bad_label(labels, count, ignore_index, max(chunk, 1 << 16))
    if message is not None:
        raise CommandError(f"{labels_path}: {message}")

    output = _Output(out_path, kind, names) if kind else None
    on_device = backend == "cupy"

    def compute(x, y):
        if on_device:
            import cupy

            x, y = cupy.asarray(x), cupy.asarray(y)
        if loss_only:
            values = {"loss": fastxent.sparse_softmax_cross_entropy(
                x, y, axis=ax, ignore_index=ignore_index, backend=backend)}
        else:
            values = fastxent.score(x, y, axis=ax, ignore_index=ignore_index, backend=backend)._asdict()
        if on_device:
            values = {name: value.get() for name, value in values.items()}
        return values

    if rows:
        # One row, untimed: loads (or compiles) the kernels, so rows/s is the streaming's.
        try:
            compute(logits[:1], np.asarray(labels[:1]))
        except (ValueError, TypeError) as exc:
            raise CommandError(f"{logits_path}: {exc}") from None
    sums = {name: 0.0 for name in FIELDS}
    counted = 0
    bar = None
    started = time.perf_counter()
    try:
        if output and reduction == "none":
            output.open({name: (labels.shape, out_dtypes[name]) for name in names})
        logits_pages = _Pages(logits, sequential=True)
        labels_pages = _Pages(labels, sequential=True)
        bar = progress(rows * per_row) if progress else None
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk)
            x, y = logits[start:stop], np.asarray(labels[start:stop])
            try:
                values = compute(x, y)
            except (ValueError, TypeError) as exc:
                raise CommandError(f"{logits_path}: rows {start}-{stop - 1}: {exc}") from None
            kept = (y != ignore_index) if ignore_index is not None else None
            counted += int(kept.sum()) if kept is not None else y.size
            for name, value in values.items():
                if name in ("loss", "correct"):
                    sums[name] += float(value.sum(dtype=np.float64))
                elif name == "target_logprob":
                    sums[name] += float((value if kept is None else value[kept]).sum(dtype=np.float64))
                elif name in ("lse", "entropy"):
                    sums[name] += float(value.sum(dtype=np.float64))
            if output and reduction == "none":
                for name in names:
                    output.arrays[name][start:stop] = values[name]
                    output.pages[name].release(stop * output.arrays[name].strides[0]
                                               if output.arrays[name].ndim else 0)
            del values, x
            logits_pages.release(stop * logits.strides[0])
            labels_pages.release(stop * labels.strides[0] if labels.ndim else 0)
            if bar:
                bar.update((stop - start) * per_row)
        if bar:
            bar.close()
            bar = None
        elapsed = time.perf_counter() - started

        total = rows * per_row
        reduced = {}
        if reduction != "none":
            for name in names:
                denominator = total if name in ("lse", "entropy") else counted
                value = sums[name]
                reduced[name] = value if reduction == "sum" else (value / denominator if denominator else 0.0)
            if output:
                output.write_scalars(reduced)
        if output:
            output.commit()
    except BaseException:
        if bar:
            bar.close()
        if output:
            output.discard()
        raise

    gigabytes = logits.nbytes / 1e9
    rate = total / elapsed if elapsed > 0 else float("inf")
    line = (f"fastxent score: {total:,} rows x {count:,} classes ({logits.dtype.name}, {gigabytes:.2f} GB) "
            f"in {elapsed:.2f} s: {rate:,.0f} rows/s, {gigabytes / elapsed if elapsed > 0 else 0:.2f} GB/s; "
            f"chunks of {chunk:,} rows under --memory {memory}")
    line += f"; mean loss {sums['loss'] / counted:.6g} over {counted:,} rows" if counted else "; no row counted"
    if not loss_only and counted:
        line += f"; accuracy {sums['correct'] / counted:.4f}"
    if out_path:
        line += f" -> {out_path}"
    stdout = []
    if reduced:
        stdout = ([repr(reduced[names[0]])] if len(names) == 1
                  else [f"{name} {reduced[name]!r}" for name in names])
    return {"summary": line, "stdout": stdout, "rows": total, "seconds": elapsed, "values": reduced,
            "chunk_rows": chunk}
