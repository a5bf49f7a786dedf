"""The inputs of ``fastxent score``: opened, checked, one line naming the file for each problem.

:func:`open_inputs` (logits) and :func:`open_hidden` (hidden states and the output
layer) are the one place the pipeline reads its inputs: they turn the paths into
arrays with ``.shape``, ``.dtype`` and ``__getitem__`` after checking that each
file is whole and of a dtype fastxent scores. An input is

* a ``.npy`` file (a read-only memory map);
* a Zarr array (a directory holding ``zarr.json`` or ``.zarray``; needs ``zarr``);
* a set of ``.npy`` shards, stacked along the first axis in sorted order: a glob
  pattern (``'logits-*.npy'``, quoted; :class:`Shards`).

(Hidden states and the output layer: ``.npy`` files.) :func:`check_shapes` and
:func:`first_bad_label` check the arrays against each other and the labels'
range, before anything is written. :func:`as_dask` turns an opened input into a
dask array whose tasks open the files themselves (a cluster's workers read them
where they lie, nothing is sent from the client).
"""

import glob
import os
import re

import numpy as np

from ... import _dtypes, _validate
from ..common import CommandError
from .files import Pages


def open_inputs(logits_path, labels_path, *, bfloat16=False):
    """``(logits, labels)``: the arrays of the two inputs, their dtypes checked.

    ``bfloat16``: read 2-byte raw items of the logits as ``ml_dtypes.bfloat16``.
    """
    logits = _check_logits(logits_path, open_array(logits_path), bfloat16)
    labels = _check_labels(labels_path, open_array(labels_path))
    return logits, labels


def open_array(path):
    """The array at ``path``: a ``.npy`` file, a Zarr array, or ``.npy`` shards (a glob; module docstring)."""
    path = os.fspath(path)
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in ("zarr.json", ".zarray")):
        return open_zarr(path)
    if os.path.isdir(path):
        raise CommandError(f"{path}: is a directory, not a .npy file nor a Zarr array (no zarr.json or "
                           f".zarray); for .npy shards pass a quoted glob: '{os.path.join(path, '*.npy')}'")
    if glob.has_magic(path) and not os.path.exists(path):
        return Shards(path, sorted(glob.glob(path)))
    return open_npy(path)


def open_zarr(path):
    """A Zarr array, read-only (reads decode whole Zarr chunks: the plan lines its chunks up with them)."""
    try:
        import zarr
    except ImportError:
        raise CommandError(f"{path}: reading a Zarr array needs zarr: pip install 'fastxent[dask]'") from None
    try:
        return zarr.open_array(path, mode="r")
    except Exception as exc:  # noqa: BLE001 -- any failure to open is bad input
        raise CommandError(f"{path}: not a readable Zarr array ({type(exc).__name__}: {exc})") from None


class Shards:
    """``.npy`` files stacked along their first axis, in sorted order, as one read-only array.

    Each file is memory-mapped (:func:`open_npy`); a slice of rows reads the shards it
    spans (a copy when it spans two). ``release_rows`` drops the pages of the rows
    consumed, shard by shard (:class:`.files.Pages`).
    """

    def __init__(self, pattern, paths):
        if not paths:
            raise CommandError(f"{pattern}: no .npy file matches")
        self.pattern = pattern
        self.paths = paths
        self.parts = [open_npy(path) for path in paths]
        first = self.parts[0]
        for path, part in zip(paths, self.parts):
            if part.ndim == 0 or part.shape[1:] != first.shape[1:] or part.dtype != first.dtype:
                raise CommandError(
                    f"{path}: a shard of {_describe_dtype(part.dtype)} {part.shape} among shards of "
                    f"{_describe_dtype(first.dtype)} (rows,) + {first.shape[1:]} ({paths[0]})")
        self.starts = np.cumsum([0] + [part.shape[0] for part in self.parts])
        self.shape = (int(self.starts[-1]),) + first.shape[1:]
        self.dtype = first.dtype
        self.ndim = first.ndim
        self.nbytes = sum(part.nbytes for part in self.parts)
        self.pages = [Pages(part, sequential=True) for part in self.parts]

    def view(self, dtype):
        """The same shards read as ``dtype`` (bfloat16 from raw 2-byte items)."""
        viewed = object.__new__(Shards)
        viewed.__dict__.update(self.__dict__, dtype=np.dtype(dtype), parts=[p.view(dtype) for p in self.parts])
        return viewed

    def __getitem__(self, index):
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("Shards are read by slices of rows")
        start, stop, _ = index.indices(self.shape[0])
        pieces = []
        for part, first in zip(self.parts, self.starts[:-1]):
            lo, hi = max(start, first), min(stop, first + part.shape[0])
            if lo < hi:
                pieces.append(part[lo - first:hi - first])
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty((0,) + self.shape[1:], self.dtype)

    def release_rows(self, rows):
        """Drop the pages of the first ``rows`` rows (of every shard they cover)."""
        for pages, part, first in zip(self.pages, self.parts, self.starts[:-1]):
            pages.release_rows(min(max(0, rows - first), part.shape[0]))


class NpyRows:
    """A ``.npy`` file read by slices of rows, mapped where it is read: what a task of
    :func:`as_dask` holds (pickled as the path and layout, never as the data)."""

    def __init__(self, array):
        self.path = array.filename
        self.offset = array.offset
        self.shape = array.shape
        self.dtype = array.dtype
        self.ndim = array.ndim

    def __getitem__(self, index):
        data = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
        return np.array(data[index])


def as_dask(array, chunk_rows):
    """A dask array of an opened input, chunked by ``chunk_rows`` rows of the first axis
    (the other axes whole), whose tasks read the files themselves."""
    import dask.array as da

    chunks = (chunk_rows,) + tuple(array.shape[1:])
    if isinstance(array, Shards):
        return da.concatenate([as_dask(part, chunk_rows) for part in array.parts], axis=0)
    if isinstance(array, np.memmap):
        return da.from_array(NpyRows(array), chunks=chunks, asarray=True)
    if isinstance(array, np.ndarray):  # an empty input
        return da.from_array(array, chunks=chunks)
    return da.from_zarr(array, chunks=chunks)


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


def _check_logits(path, logits, bfloat16, what="logits"):
    dtype = logits.dtype
    if bfloat16:
        if not hasattr(logits, "view"):
            raise CommandError(f"{path}: --bfloat16 reads the raw items of .npy files, not of a Zarr array "
                               "(store the scores as float32, or as bfloat16 in .npy files)")
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
    raise CommandError(f"{path}: {what} must be float16, bfloat16, float32 or float64, "
                       f"got {kind} dtype {_describe_dtype(dtype)}")


def open_hidden(hidden_path, labels_path, weight_path, bias_path=None, *, bfloat16=False):
    """``(hidden, labels, (weight, bias or None))`` for scores ``hidden @ weight.T + bias``.

    The hidden states (N, H) and the labels (N,) are memory-mapped and streamed; the
    output layer (V, H) and the bias (V,) are read whole, in the hidden states' dtype.
    """
    hidden = _check_logits(hidden_path, open_npy(hidden_path), bfloat16, "hidden states")
    labels = _check_labels(labels_path, open_npy(labels_path))
    weight = np.array(_check_logits(weight_path, open_npy(weight_path), bfloat16, "the weight"))
    if hidden.ndim != 2:
        raise CommandError(f"{hidden_path}: hidden states must be (rows, H), got shape {hidden.shape}")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[1]:
        raise CommandError(f"{weight_path}: the weight must be (V, {hidden.shape[1]}) for hidden states of "
                           f"shape {hidden.shape} ({hidden_path}), got shape {weight.shape}")
    bias = None
    if bias_path is not None:
        bias = np.array(_check_logits(bias_path, open_npy(bias_path), bfloat16, "the bias"))
        if bias.shape != weight.shape[:1]:
            raise CommandError(f"{bias_path}: the bias must be ({weight.shape[0]},), one value per row of "
                               f"{weight_path}, got shape {bias.shape}")
    for path, array in ((weight_path, weight), (bias_path, bias)):
        if array is not None and array.dtype != hidden.dtype:
            raise CommandError(f"{path}: holds {array.dtype.name} but {hidden_path} holds {hidden.dtype.name}; "
                               "save them in one dtype")
    if labels.shape != hidden.shape[:1]:
        raise CommandError(f"{labels_path}: shape {labels.shape} does not match {hidden_path} (expected "
                           f"{hidden.shape[:1]}: one label per row of hidden states)")
    return hidden, labels, (weight, bias)


def _check_labels(path, labels):
    dtype = labels.dtype
    if dtype.kind in "iu":
        return labels
    if dtype.kind in "fb" or _dtypes.is_bfloat16(dtype):
        hint = "; cast them with .astype(np.int64) if they are class ids"
        raise CommandError(f"{path}: labels must be integer class ids, got {dtype.name}{hint}")
    raise CommandError(f"{path}: labels must be integer class ids, got non-numeric dtype "
                       f"{_describe_dtype(dtype)}")


def check_shapes(logits, labels, axis, logits_path, labels_path):
    """The class axis (``0 <= ax < logits.ndim``, not the streamed first axis) once the shapes agree."""
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
    expected = logits.shape[:ax] + logits.shape[ax + 1:]
    if labels.shape != expected:
        if labels.ndim == len(expected) and labels.shape[0] != logits.shape[0]:
            problem = (f"{labels_path}: holds {labels.shape[0]:,} rows but {logits_path} holds "
                       f"{logits.shape[0]:,}")
        else:
            problem = f"{labels_path}: shape {labels.shape} does not match {logits_path}"
        raise CommandError(f"{problem} (expected labels of shape {expected}: the logits' shape "
                           f"{logits.shape} without class axis {ax})")
    return ax


def first_bad_label(labels, num_classes, ignore_index, chunk_rows):
    """Scan the labels chunk by chunk for one outside ``[0, C)``; fastxent's message or None."""
    pages = Pages(labels, sequential=True)
    for start in range(0, labels.shape[0], chunk_rows):
        stop = min(labels.shape[0], start + chunk_rows)
        message = _validate.bad_label_message(labels[start:stop], num_classes, ignore_index)
        pages.release_rows(stop)
        if message is not None:
            # The library numbers rows within the chunk it was given: renumber in the file.
            return re.sub(r"^labels\[(\d+)", lambda m: f"labels[{int(m.group(1)) + start}", message)
    return None
