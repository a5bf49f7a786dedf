"""fastxent on Dask arrays: losses, gradients and scoring for arrays that outgrow one machine.

The public functions of ``fastxent`` with the same arguments and semantics, on
``dask.array`` inputs whose chunks are numpy or CuPy arrays; they return dask
arrays, lazily (nothing runs until ``.compute()``/``.persist()``)::

    import dask.array as da
    import fastxent.dask as fxd

    logits = da.from_zarr("eval_logits.zarr")              # (N, C), chunks of rows
    labels = da.from_zarr("eval_labels.zarr")
    loss = fxd.sparse_softmax_cross_entropy(logits, labels, reduction="mean")
    loss.compute()

How the work is laid out follows the logits' chunks along the class axis:

* **Class axis in one chunk** (chunks of rows): each block is one call of the
  in-memory function (its fused kernel), ``return_grad=True`` included; nothing
  is rechunked. Any function, any option.
* **Class axis in several chunks** (a vocabulary split; no worker ever holds a
  whole row): each block reduces to per-row partial statistics (the backends'
  ``softmax_partials``: max, sum of exp, the target score when the label falls in
  the block, the label-smoothing sum, ``score``'s entropy term and argmax), the
  partials merge in a tree reduction with the log-sum-exp combine
  (``fastxent/_partials.py``), and the gradient is a second map over the blocks
  with the merged log-sum-exp (``softmax_block_grad``). For
  ``sparse_softmax_cross_entropy`` (every option), ``score``, ``logsumexp``,
  ``log_softmax`` and ``softmax``; ``softmax_cross_entropy`` (soft labels) needs
  the class axis in one chunk.

Reductions (``"sum"``, ``"mean"`` with ``ignore_index`` and ``class_weight``) are
Dask reductions; a mean's denominator is reduced from the labels alone, so the
gradient of a mean waits only for it. ``return_grad=True`` returns a gradient
chunked like the logits. Bad labels raise the in-memory call's ``ValueError``,
naming the position in the whole array, when the graph runs.

Which scheduler
---------------
The kernels release the GIL (Numba ``nogil``), so every scheduler runs blocks in
parallel:

* **one machine, arrays in memory or on local disk**: the default threaded
  scheduler (``dask.config.set(scheduler="threads")``); one process, no copies.
  Each kernel call is itself parallel over rows on all cores, so a few threads
  suffice.
* **several processes on one machine** (a per-process memory limit, a cluster's
  dashboard, resilience to a crashing worker): ``distributed.LocalCluster``;
  blocks travel between processes only when a task needs them.
* **a cluster**: ``distributed.Client("tcp://scheduler:8786")``; the logits should
  be read where they are (``da.from_zarr`` on shared storage), not sent from the client.
* **many GPUs on one node**: ``dask_cuda.LocalCUDACluster()`` (one worker per GPU)
  with CuPy chunks (``logits.map_blocks(cupy.asarray)``); each block runs on its
  worker's GPU.

Backends are chosen when the graph is built (``backend=``, ``use_backend``,
``FASTXENT_BACKEND``, or where the chunks live: numpy chunks on ``numba``, CuPy
chunks on ``cupy``) and named in every task, so workers need no environment of
their own.
"""

import functools
import operator

import dask.array as da
import numpy as np

from . import _blocks, _dispatch, _dtypes, _partials, _reductions
from . import _validate as check
from . import losses
from ._score import Score

__all__ = [
    "sparse_softmax_cross_entropy",
    "softmax_cross_entropy",
    "sigmoid_cross_entropy",
    "log_softmax",
    "softmax",
    "logsumexp",
    "score",
]

_FIELDS = len(_partials.RECORD)


# ----------------------------------------------------------------------------
# Validation: the in-memory checks, on stand-ins of the dask arrays' shapes and dtypes
# ----------------------------------------------------------------------------

def _dask_array(name, value):
    """``value`` as a dask array (numpy/CuPy arrays in one chunk); chunks of unknown size refused."""
    array = value if isinstance(value, da.Array) else da.asarray(value)
    if any(np.isnan(size) for size in array.shape):
        raise ValueError(f"{name} has chunks of unknown size {array.shape}; call {name}.compute_chunk_sizes() first")
    return array


def _stand_in(array):
    """A zero-stride numpy array of ``array``'s shape and dtype: what the in-memory
    validators read (shape, dtype) without computing anything."""
    return np.broadcast_to(np.zeros((), dtype=array.dtype), array.shape)


def _backend(backend, logits):
    """``(backend name, array module)``: resolved now, from where the chunks live."""
    on_device = _dispatch.is_cuda_array(logits._meta)
    return _dispatch.resolve(backend, on_device), _dispatch.array_module(on_device)


def _aligned(array, chunks):
    """``array`` rechunked to ``chunks`` (labels and per-row arrays are small beside the logits)."""
    return array if array.chunks == chunks else array.rechunk(chunks)


def _grad_output(value, loss_shape, reduction, chunks):
    """The validated ``grad_output``: None, a float, a 0-d dask array, or a dask array of
    the loss's shape chunked like the loss."""
    if value is None:
        return None
    if isinstance(value, da.Array):
        check.grad_output(_stand_in(value), () if reduction != "none" else loss_shape, False, np)
        if value.ndim == 0:
            return value
        return _aligned(da.broadcast_to(value, loss_shape), chunks)
    array = check.grad_output(value, () if reduction != "none" else loss_shape, False, np)
    if array.ndim == 0:
        return float(array)
    return _aligned(da.broadcast_to(da.asarray(array), loss_shape), chunks)


def _check_label_block(labels, num_classes, ignore_index, block_info=None):
    origin = [start for start, _ in block_info[0]["array-location"]] if block_info else None
    return _blocks.check_labels(labels, num_classes, ignore_index, origin)


def _checked(labels, num_classes, ignore_index):
    """Class ids that raise the in-memory ``ValueError`` (position in the whole array) when
    one is outside ``[0, C)`` and not ``ignore_index``: every loss and gradient reads these."""
    return labels.map_blocks(_check_label_block, num_classes, ignore_index, dtype=labels.dtype)


class _Call:
    """A validated call: the backend, and the arrays with the class axis last, labels
    chunked like the logits' rows (class ids) or like the logits (dense labels)."""

    def __init__(self, fn, backend, first_name, logits, labels, *, axis=None, labels_kind=None,
                 single_class_hint=None, other_labels=None, reduction="none", return_grad=False,
                 grad_output=None, ignore_index=None):
        logits = _dask_array(first_name, logits)
        check.scores(first_name, _stand_in(logits), min_ndim=0 if axis is None else 1)
        self.backend, self.xp = _backend(backend, logits)
        self.ignore_index = check.ignore_index(ignore_index)
        self.reduction = check.reduction(reduction)
        self.return_grad = check.flag("return_grad", return_grad)
        self.loss_dtype = _dtypes.loss_dtype(logits.dtype)
        self.labels = None
        if axis is None:  # elementwise
            self.axis = None
            self.logits = logits
            self.loss_shape = logits.shape
            loss_chunks = logits.chunks
            labels = _dask_array("labels", labels)
            check.dense_labels(fn, "labels", _stand_in(labels), logits.shape)
            self.labels = _aligned(labels, logits.chunks)
        else:
            self.axis = check.axis(axis, logits.ndim)
            self.num_classes = logits.shape[self.axis]
            check.num_classes(fn, first_name, self.num_classes, single_class_hint)
            self.logits = da.moveaxis(logits, self.axis, -1)
            self.loss_shape = self.logits.shape[:-1]
            loss_chunks = self.logits.chunks[:-1]
            if labels_kind == "ids":
                labels = _dask_array("labels", labels)
                check.class_ids(fn, _stand_in(labels), logits.shape, self.axis, other_labels)
                self.labels = _checked(_aligned(labels, loss_chunks), self.num_classes, self.ignore_index)
            elif labels_kind == "dense":
                labels = _dask_array("labels", labels)
                check.dense_labels(fn, "labels", _stand_in(labels), logits.shape, other_labels)
                self.labels = _aligned(da.moveaxis(labels, self.axis, -1), self.logits.chunks)
        self.grad_output = _grad_output(grad_output, self.loss_shape, self.reduction, loss_chunks)

    @property
    def split(self):
        """True when the class axis is in several chunks (a vocabulary split)."""
        return self.axis is not None and len(self.logits.chunks[-1]) > 1

    def meta(self, ndim, dtype):
        """An empty array of the chunks' kind (numpy or CuPy): a dask output's ``meta``."""
        return self.xp.empty((0,) * ndim, dtype=dtype)

    def restore(self, out):
        """An output with the class axis last, put back where the caller had it."""
        return out if self.axis is None else da.moveaxis(out, -1, self.axis)


def _index(array):
    return tuple(range(array.ndim))


def _single(value):
    """A block of an axis that is contracted but in one chunk: ``da.blockwise`` hands it over as
    a list of one block (``concatenate=True`` would copy it into a new array: a second copy of
    every block of logits)."""
    while isinstance(value, list):
        (value,) = value
    return value


def _per_block(function):
    """A block function whose arguments may come as one-block lists (:func:`_single`)."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        return function(*(_single(value) for value in args), **kwargs)

    return run


def _arg(value):
    """``(value, index)`` for ``da.blockwise``: a 0-d dask array or a constant."""
    return (value, ()) if isinstance(value, da.Array) else (value, None)


# ----------------------------------------------------------------------------
# Reductions
# ----------------------------------------------------------------------------

def _denominator_chunk(labels, axis, keepdims, ignore_index=None, class_weight=None):
    xp = _partials.array_module(labels)
    value = _reductions.mean_denominator(labels.reshape(-1), ignore_index, class_weight, xp)
    return xp.asarray(value, dtype=np.float64).reshape((1,) * labels.ndim)


def _sum_chunk(values, axis, keepdims):
    return values.sum(axis=axis, keepdims=keepdims)


def _denominator(call, class_weight=None):
    """The denominator of a mean: ``sum_i w[y_i]`` over the rows not ignored for class ids
    (``_reductions.mean_denominator``, as a Dask reduction of the labels), else the
    number of rows (or elements); 1.0 when the reduction is not a mean."""
    if call.reduction != "mean":
        return 1.0
    if call.labels is None or call.labels.ndim != len(call.loss_shape) or call.axis is None:
        return float(np.prod(call.loss_shape, dtype=np.int64))
    flat = call.labels.reshape(-1)
    chunk = functools.partial(_denominator_chunk, ignore_index=call.ignore_index, class_weight=class_weight)
    return da.reduction(flat, chunk, _sum_chunk, combine=_sum_chunk, axis=0, dtype=np.float64,
                        meta=call.meta(0, np.float64))


def _finish_reduction(total, denominator, reduction, loss_dtype):
    xp = _partials.array_module(total)
    return _reductions.reduce(total, reduction, denominator, xp).astype(loss_dtype)


def _reduce(call, loss, denominator):
    """The unreduced dask ``loss`` reduced as the in-memory call reduces (``_reductions.reduce``)."""
    if call.reduction == "none":
        return loss
    total = loss.sum(dtype=np.float64)
    return da.blockwise(_finish_reduction, (), total, (), *_arg(denominator), dtype=call.loss_dtype,
                        meta=call.meta(0, call.loss_dtype), reduction=call.reduction, loss_dtype=call.loss_dtype)


def _grad_scale(grad_output, loss_shape, reduction, denominator):
    """The gradient multiplier of a block (``_reductions.grad_scale``), or None for a mean
    over nothing (the gradient is then zeros)."""
    if _reductions.empty_mean(reduction, denominator):
        return None
    if grad_output is not None and not isinstance(grad_output, float):
        grad_output = _partials.array_module(grad_output).asarray(grad_output)
    elif grad_output is not None:
        grad_output = np.asarray(grad_output)
    return _reductions.grad_scale(grad_output, loss_shape, reduction, denominator,
                                  _partials.array_module(grad_output) if grad_output is not None else np)


# ----------------------------------------------------------------------------
# Class axis in one chunk: one in-memory call per block
# ----------------------------------------------------------------------------

@_per_block
def _block_call(logits, labels, grad_output, denominator, *, fn, options, reduction, return_grad, backend):
    """The in-memory ``fn`` on one block: the unreduced loss, or ``(loss, grad)``."""
    function = getattr(losses, fn)
    if not return_grad:
        return function(logits, labels, **options, backend=backend)
    loss_shape = logits.shape if "axis" not in options else logits.shape[:-1]
    scale = _grad_scale(grad_output, loss_shape, reduction, denominator)
    if scale is None:
        return function(logits, labels, **options, backend=backend), _partials.array_module(logits).zeros_like(logits)
    return function(logits, labels, **options, backend=backend, return_grad=True, grad_output=scale)


def _in_blocks(call, fn, options, denominator):
    """``fn`` on each block (``options`` with ``axis=-1`` for the row functions): the
    unreduced loss, or ``(loss, grad)``."""
    index = _index(call.logits)
    loss_index = index if call.axis is None else index[:-1]
    labels_index = index if call.labels.ndim == call.logits.ndim else index[:-1]
    grad_output = call.grad_output
    grad_index = None if grad_output is None or not isinstance(grad_output, da.Array) else (
        () if grad_output.ndim == 0 else loss_index)
    arguments = (call.logits, index, call.labels, labels_index, grad_output, grad_index, *_arg(denominator))
    keywords = {"fn": fn, "options": options, "reduction": call.reduction, "backend": call.backend}
    if not call.return_grad:
        return da.blockwise(_block_call, loss_index, *arguments, dtype=call.loss_dtype,
                            meta=call.meta(len(loss_index), call.loss_dtype), return_grad=False, **keywords), None
    pairs = da.blockwise(_block_call, loss_index, *arguments, dtype=object,
                         meta=np.empty((0,) * len(loss_index), dtype=object), return_grad=True, **keywords)
    loss = da.blockwise(operator.itemgetter(0), loss_index, pairs, loss_index, dtype=call.loss_dtype,
                        meta=call.meta(len(loss_index), call.loss_dtype))
    new_axes = {} if call.axis is None else {index[-1]: call.logits.shape[-1]}
    grad = da.blockwise(operator.itemgetter(1), index, pairs, loss_index, new_axes=new_axes,
                        dtype=call.logits.dtype, meta=call.meta(len(index), call.logits.dtype))
    return loss, grad


def _finish(call, loss, grad, denominator):
    loss = _reduce(call, loss, denominator)
    return (loss, call.restore(grad)) if call.return_grad else loss


# ----------------------------------------------------------------------------
# Class axis in several chunks: partials, a tree merge, a second map for the gradient
# ----------------------------------------------------------------------------

def _partials_block(block, *rest, kind, options, backend):
    labels = rest[0] if kind != "lse" else None
    columns = rest[-1]
    return _blocks.partials(block, labels, int(columns[0]), kind=kind, backend=backend, **options)


def _keep(records, axis, keepdims):
    return records


def _flat(blocks):
    if isinstance(blocks, list):
        for block in blocks:
            yield from _flat(block)
    else:
        yield blocks


def _merge_step(records, axis, keepdims):
    """One step of the tree: the records of a few neighbouring blocks (a nested list, in block
    order) merged into one record per row. Concatenated here, on the blocks' own device
    (``xp.concatenate``)."""
    blocks = list(_flat(records))
    xp = _partials.array_module(blocks[0])
    merged = _partials.merge(xp.concatenate(blocks, axis=axis[0]) if len(blocks) > 1 else blocks[0], axis=axis[0])
    return xp.expand_dims(merged, axis[0]) if keepdims else merged


def _merged(call, kind, options):
    """The rows' merged records ``(..., F)``: each block's partials (``_blocks.partials``),
    merged pairwise along the class axis in a tree (``_partials.merge``)."""
    index = _index(call.logits)
    classes = index[-1]
    columns = da.arange(call.logits.shape[-1], chunks=(call.logits.chunks[-1],))
    labels = () if kind == "lse" else (call.labels, index[:-1])
    records = da.blockwise(_partials_block, index + (len(index),), call.logits, index, *labels, columns, (classes,),
                           new_axes={len(index): _FIELDS}, adjust_chunks={classes: 1}, dtype=np.float64,
                           meta=call.meta(len(index) + 1, np.float64), kind=kind, options=options,
                           backend=call.backend)
    return da.reduction(records, _keep, _merge_step, combine=_merge_step, axis=classes, concatenate=False,
                        dtype=np.float64, meta=call.meta(len(index), np.float64))


def _rows_args(call, merged):
    """blockwise arguments of the merged records, one record per row of the loss."""
    index = _index(call.logits)[:-1]
    return merged, index + (len(index) + 1,)


@_per_block
def _sparse_loss_block(merged, labels, options, loss_dtype):
    return _partials.sparse_loss(merged, labels, loss_dtype=loss_dtype, **options)


@_per_block
def _sparse_grad_block(block, labels, columns, merged, grad_output, denominator, *, options, reduction, backend):
    scale = _grad_scale(grad_output, labels.shape, reduction, denominator)
    if scale is None:
        return _partials.array_module(block).zeros_like(block)
    return _blocks.sparse_grad(block, labels, merged, scale, int(columns[0]), backend=backend, **options)


def _sparse_split(call, options, z_loss):
    """The vocabulary-split sparse softmax cross-entropy: ``(loss, grad or None)`` unreduced."""
    merged = _merged(call, "sparse", {k: options[k] for k in ("ignore_index", "class_weight", "label_smoothing",
                                                                 "softcap")})
    index = _index(call.logits)
    row_options = {"ignore_index": options["ignore_index"], "class_weight": options["class_weight"],
                   "label_smoothing": options["label_smoothing"], "z_loss": z_loss, "num_classes": call.num_classes}
    loss = da.blockwise(_sparse_loss_block, index[:-1], *_rows_args(call, merged), call.labels, index[:-1],
                        dtype=call.loss_dtype, meta=call.meta(len(index) - 1, call.loss_dtype),
                        options=row_options, loss_dtype=call.loss_dtype)
    return loss, merged


def _sparse_split_grad(call, merged, options, z_loss, denominator):
    index = _index(call.logits)
    columns = da.arange(call.logits.shape[-1], chunks=(call.logits.chunks[-1],))
    grad_output = call.grad_output
    grad_index = None if not isinstance(grad_output, da.Array) else (() if grad_output.ndim == 0 else index[:-1])
    grad_options = dict(options, z_loss=z_loss, num_classes=call.num_classes)
    return da.blockwise(_sparse_grad_block, index, call.logits, index, call.labels, index[:-1], columns, index[-1:],
                        *_rows_args(call, merged), grad_output, grad_index, *_arg(denominator), dtype=call.logits.dtype, meta=call.meta(len(index), call.logits.dtype), options=grad_options,
                        reduction=call.reduction, backend=call.backend)


# ----------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------

def sparse_softmax_cross_entropy(logits, labels, *, axis=-1, ignore_index=None, class_weight=None,
                                 label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="none",
                                 return_grad=False, grad_output=None, backend=None):
    r"""Softmax cross-entropy with integer class ids, on dask arrays (:func:`fastxent.sparse_softmax_cross_entropy`).

    Per row ``i`` with label ``y_i``, class weights ``w`` (ones when None) and smoothing ``eps``::

        l_i = (1-eps) w[y_i] (lse_i - x_{i,y_i}) + (eps/C) sum_c w_c (lse_i - x_ic) + z_loss lse_i**2

    The arguments, dtypes and results of the in-memory function; ``logits`` and
    ``labels`` (and a per-row ``grad_output``) may be dask arrays. With the class
    axis in several chunks each block contributes partial statistics, merged in a
    tree, and no task holds a whole row.

    Returns
    -------
    loss : dask array
        The logits' shape without the class axis, or 0-d when reduced.
    grad : dask array, only with ``return_grad=True``
        Chunked like the logits.

    Examples
    --------
    >>> import dask.array as da, numpy as np, fastxent.dask as fxd
    >>> logits = da.from_array(np.array([[2.0, 0.0, -1.0]]), chunks=(1, 2))   # a row split in two
    >>> fxd.sparse_softmax_cross_entropy(logits, np.array([0])).compute()
    array([0.16984602])
    """
    fn = "sparse_softmax_cross_entropy"
    call = _Call(fn, backend, "logits", logits, labels, axis=axis, labels_kind="ids",
                 single_class_hint="sigmoid_cross_entropy", other_labels="softmax_cross_entropy",
                 reduction=reduction, return_grad=return_grad, grad_output=grad_output, ignore_index=ignore_index)
    class_weight = check.class_weight(class_weight, call.num_classes, False)
    options = {"ignore_index": call.ignore_index, "class_weight": class_weight,
               "label_smoothing": check.label_smoothing(label_smoothing), "softcap": check.softcap(softcap)}
    z_loss = check.z_loss(z_loss)
    denominator = _denominator(call, class_weight)
    if not call.split:
        loss, grad = _in_blocks(call, fn, dict(options, z_loss=z_loss, axis=-1), denominator)
        return _finish(call, loss, grad, denominator)
    loss, merged = _sparse_split(call, options, z_loss)
    grad = _sparse_split_grad(call, merged, options, z_loss, denominator) if call.return_grad else None
    return _finish(call, loss, grad, denominator)


def softmax_cross_entropy(logits, labels, *, axis=-1, label_smoothing=0.0, softcap=None, reduction="none",
                          return_grad=False, grad_output=None, backend=None):
    r"""Softmax cross-entropy with soft labels, on dask arrays (:func:`fastxent.softmax_cross_entropy`).

    Per row: ``loss = sum(y) * lse(x) - sum_c y_c x_c``. The class axis must be in one
    chunk (``logits.rechunk({axis: -1})``): a soft-label row is not split.

    Examples
    --------
    >>> import dask.array as da, numpy as np, fastxent.dask as fxd
    >>> logits = da.from_array(np.array([[2.0, 0.0, -1.0]]))
    >>> fxd.softmax_cross_entropy(logits, np.array([[0.5, 0.5, 0.0]])).compute()
    array([1.16984602])
    """
    fn = "softmax_cross_entropy"
    call = _Call(fn, backend, "logits", logits, labels, axis=axis, labels_kind="dense",
                 single_class_hint="sigmoid_cross_entropy", other_labels="sparse_softmax_cross_entropy",
                 reduction=reduction, return_grad=return_grad, grad_output=grad_output)
    if call.split:
        raise ValueError(
            f"softmax_cross_entropy needs the class axis (axis={call.axis}) in one chunk, got chunks "
            f"{call.logits.chunks[-1]}; rechunk with logits.rechunk({{{call.axis}: -1}}) (only "
            "sparse_softmax_cross_entropy, score, logsumexp, log_softmax and softmax split rows)")
    options = {"axis": -1, "label_smoothing": check.label_smoothing(label_smoothing),
               "softcap": check.softcap(softcap)}
    denominator = _denominator(call)
    loss, grad = _in_blocks(call, fn, options, denominator)
    return _finish(call, loss, grad, denominator)


def _pos_weight_blocks(pos_weight, logits):
    """``pos_weight`` (validated: None, a float or a host array broadcasting to the logits) as
    a constant, or a dask array whose blocks line up with the logits' blocks (dimensions
    of size 1 stay size 1, so a per-class vector stays a vector in each block)."""
    if pos_weight is None or isinstance(pos_weight, float):
        return pos_weight, None
    full = pos_weight.reshape((1,) * (logits.ndim - pos_weight.ndim) + pos_weight.shape)
    chunks = tuple((1,) if size == 1 and logits.shape[d] != 1 else logits.chunks[d]
                   for d, size in enumerate(full.shape))
    return da.from_array(full, chunks=chunks), _index(logits)


def _sigmoid_block(logits, labels, pos_weight, grad_output, denominator, *, options, reduction, return_grad,
                   backend):
    return _block_call(logits, labels, grad_output, denominator, fn="sigmoid_cross_entropy",
                       options=dict(options, pos_weight=pos_weight), reduction=reduction, return_grad=return_grad,
                       backend=backend)


def sigmoid_cross_entropy(logits, labels, *, pos_weight=None, label_smoothing=0.0, reduction="none",
                          return_grad=False, grad_output=None, backend=None):
    r"""Independent binary / multi-label cross-entropy on scores, on dask arrays
    (:func:`fastxent.sigmoid_cross_entropy`); elementwise, so any chunks.

    ``loss = max(x, 0) - x z + log1p(exp(-|x|))``; with ``pos_weight`` q TensorFlow's
    ``weighted_cross_entropy_with_logits``. ``pos_weight`` is a host array (or a number)
    broadcasting to the logits.

    Examples
    --------
    >>> import dask.array as da, numpy as np, fastxent.dask as fxd
    >>> fxd.sigmoid_cross_entropy(da.from_array(np.array([0.0, 2.0])), np.array([1.0, 0.0])).compute()
    array([0.69314718, 2.12692801])
    """
    call = _Call("sigmoid_cross_entropy", backend, "logits", logits, labels, reduction=reduction,
                 return_grad=return_grad, grad_output=grad_output)
    pos_weight = check.pos_weight(pos_weight, call.logits.shape, False)
    weights, weights_index = _pos_weight_blocks(pos_weight, call.logits)
    options = {"label_smoothing": check.label_smoothing(label_smoothing)}
    denominator = _denominator(call)
    index = _index(call.logits)
    grad_output = call.grad_output
    grad_index = None if not isinstance(grad_output, da.Array) else (() if grad_output.ndim == 0 else index)
    arguments = (call.logits, index, call.labels, index, weights, weights_index, grad_output, grad_index,
                 *_arg(denominator))
    keywords = {"options": options, "reduction": call.reduction, "backend": call.backend}
    if not call.return_grad:
        loss = da.blockwise(_sigmoid_block, index, *arguments, dtype=call.loss_dtype,
                            meta=call.meta(len(index), call.loss_dtype), return_grad=False, **keywords)
        return _reduce(call, loss, denominator)
    pairs = da.blockwise(_sigmoid_block, index, *arguments, dtype=object, meta=np.empty((0,) * len(index), object),
                         return_grad=True, **keywords)
    loss = da.blockwise(operator.itemgetter(0), index, pairs, index, dtype=call.loss_dtype,
                        meta=call.meta(len(index), call.loss_dtype))
    grad = da.blockwise(operator.itemgetter(1), index, pairs, index, dtype=call.logits.dtype,
                        meta=call.meta(len(index), call.logits.dtype))
    return _reduce(call, loss, denominator), grad


@_per_block
def _building_block_call(x, *, fn, backend):
    return getattr(losses, fn)(x, axis=-1, backend=backend)


@_per_block
def _lse_block(merged, loss_dtype):
    return _partials.logsumexp(merged, loss_dtype)


@_per_block
def _log_probs_block(block, merged, *, exponentiate):
    shift, log_sum = _partials.normaliser(merged)
    return _partials.log_probs(block, shift, log_sum, block.dtype, exponentiate=exponentiate)


def _building_block(fn, x, axis, backend):
    call = _Call(fn, backend, "x", x, None, axis=axis)
    index = _index(call.logits)
    out_index = index[:-1] if fn == "logsumexp" else index
    out_dtype = call.loss_dtype if fn == "logsumexp" else call.logits.dtype
    meta = call.meta(len(out_index), out_dtype)
    if not call.split:
        out = da.blockwise(_building_block_call, out_index, call.logits, index, dtype=out_dtype,
                           meta=meta, fn=fn, backend=call.backend)
    else:
        merged = _merged(call, "lse", {})
        if fn == "logsumexp":
            out = da.blockwise(_lse_block, out_index, *_rows_args(call, merged), dtype=out_dtype,
                               meta=meta, loss_dtype=out_dtype)
        else:
            out = da.blockwise(_log_probs_block, index, call.logits, index, *_rows_args(call, merged),
                               dtype=out_dtype, meta=meta, exponentiate=fn == "softmax")
    return out if fn == "logsumexp" else call.restore(out)


def log_softmax(x, *, axis=-1, backend=None):
    """``x - logsumexp(x)`` along ``axis``, on a dask array (:func:`fastxent.log_softmax`), in x's dtype.

    Examples
    --------
    >>> import dask.array as da, numpy as np, fastxent.dask as fxd
    >>> fxd.log_softmax(da.zeros(2, chunks=1)).compute()
    array([-0.69314718, -0.69314718])
    """
    return _building_block("log_softmax", x, axis, backend)


def softmax(x, *, axis=-1, backend=None):
    """``exp(x - logsumexp(x))`` along ``axis``, on a dask array (:func:`fastxent.softmax`).

    Examples
    --------
    >>> import dask.array as da, numpy as np, fastxent.dask as fxd
    >>> fxd.softmax(da.zeros(2, chunks=1)).compute()
    array([0.5, 0.5])
    """
    return _building_block("softmax", x, axis, backend)


def logsumexp(x, *, axis=-1, backend=None):
    """``log(sum(exp(x)))`` along ``axis``, on a dask array (:func:`fastxent.logsumexp`): float32
    for 16-bit input, else x's dtype; ``-inf`` for an all ``-inf`` row, ``+inf`` for one
    holding ``+inf`` and no NaN.

    Examples
    --------
    >>> import dask.array as da, numpy as np, fastxent.dask as fxd
    >>> fxd.logsumexp(da.from_array(np.array([1000.0, 1000.0]), chunks=1)).compute()
    array(1000.69314718)
    """
    return _building_block("logsumexp", x, axis, backend)


@_per_block
def _score_block(logits, labels, *, ignore_index, backend):
    return losses.score(logits, labels, axis=-1, ignore_index=ignore_index, backend=backend)


@_per_block
def _score_split_block(merged, labels, *, ignore_index, loss_dtype):
    return _partials.score(merged, labels, ignore_index, loss_dtype)


def score(logits, labels, *, axis=-1, ignore_index=None, backend=None):
    r"""The scoring bundle (:func:`fastxent.score`) of dask arrays: a :class:`fastxent.Score` of
    dask arrays (loss, lse, target_logprob, entropy, argmax, correct), each with the
    logits' shape minus the class axis, from one read of the logits.

    Examples
    --------
    >>> import dask.array as da, numpy as np, fastxent.dask as fxd
    >>> s = fxd.score(da.from_array(np.array([[2.0, 0.0]]), chunks=(1, 1)), np.array([0]))
    >>> bool(s.correct.compute()[0]), int(s.argmax.compute()[0])
    (True, 0)
    """
    call = _Call("score", backend, "logits", logits, labels, axis=axis, labels_kind="ids",
                 other_labels="softmax_cross_entropy", ignore_index=ignore_index)
    index = _index(call.logits)
    rows = index[:-1]
    if call.split:
        merged = _merged(call, "score", {"ignore_index": call.ignore_index})
        bundles = da.blockwise(_score_split_block, rows, *_rows_args(call, merged), call.labels, rows,
                               dtype=object, meta=np.empty((0,) * len(rows), object),
                               ignore_index=call.ignore_index, loss_dtype=call.loss_dtype)
    else:
        bundles = da.blockwise(_score_block, rows, call.logits, index, call.labels, rows, dtype=object,
                               meta=np.empty((0,) * len(rows), object), ignore_index=call.ignore_index,
                               backend=call.backend)
    dtypes = {"argmax": np.int64, "correct": np.bool_}
    fields = []
    for k, name in enumerate(Score._fields):
        dtype = dtypes.get(name, call.loss_dtype)
        fields.append(da.blockwise(operator.itemgetter(k), rows, bundles, rows, dtype=dtype,
                                   meta=call.meta(len(rows), dtype)))
    return Score(*fields)
