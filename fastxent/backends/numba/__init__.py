"""The Numba CPU backend: the backend contract (``fastxent/backends/__init__.py``) on numpy arrays.

This module is the Python side of the backend: it brings validated arrays into
the form the kernels read (16-bit scores as integer views, labels as int32/int64,
per-element options as flat windows), allocates the outputs and launches. The
kernels live by job:

* ``_math``: branch-free exp/log/log1p/tanh and 16-bit storage, which LLVM vectorises;
* ``_rows``: compile options and the per-row machinery (chunked max and
  log-sum-exp, the online merge, label smoothing, windows);
* ``_softmax``: sparse and soft-label softmax cross-entropy, logsumexp,
  log_softmax, softmax;
* ``_moments``: ``score`` and the softmax hvp (one-read row moments);
* ``_partials``: a block of classes of a split row (partial statistics, the
  block's gradient from the merged normaliser);
* ``_elementwise``: sigmoid cross-entropy and its Hessian diagonal;
* ``_probs``: binary, categorical and sparse categorical cross-entropy on probabilities.

Design rules and their measurements are in docs/design.md ("The Numba backend").
Compiled variants: every distinct argument type is one more compilation
(seconds each, cached on disk afterwards), so options that cost nothing when
neutral are always passed (class weights of ones, ``ignore_index`` -1, a
1-element gradient scale read with step 0); only ``softcap`` (a tanh per element)
and the gradient are pruned at compile time when ``None``.
"""

import numba
import numpy as np

from ... import _config, _dtypes
from ..._score import Score
from .. import FUNCTIONS, Partials
from . import _elementwise, _moments, _partials, _probs, _softmax
from ._rows import IN_PLACE

__all__ = list(FUNCTIONS)

# ----------------------------------------------------------------------------
# Arrays as the kernels read them
# ----------------------------------------------------------------------------

#: Dense label dtypes the kernels read as they are (any other is cast to the accumulation dtype).
_LABEL_STORAGE = ("float16", "bfloat16", "float32", "float64", "bool")


def _kernel_view(array):
    """The array as Numba sees it: float16 as int16 bits, bfloat16 as uint16 bits
    (Numba has no float16 on the CPU and knows nothing of ml_dtypes)."""
    if array.dtype == np.float16:
        return array.view(np.int16)
    if _dtypes.is_bfloat16(array.dtype):
        return array.view(np.uint16)
    return array


def _scores_view(array, writes=False):
    """:func:`_kernel_view` of an input, read-only unless the kernel writes into it
    (``inplace``): one compiled variant, and one rounding, whether the caller's array
    is writeable or not (a memory-mapped file is read-only; the two variants
    vectorised a sum differently and differed by an ulp)."""
    view = _kernel_view(array)
    return view if writes else _readonly(view)


def _acc(dtype):
    """The accumulation type as the numpy scalar type the kernels are typed with."""
    return _dtypes.accumulation_dtype(dtype).type


def _label_view(labels, acc):
    """Dense labels (or ``v``) in their own dtype when ``nm.load`` reads it (a copy
    would be input-sized), else cast to ``acc``."""
    if labels.dtype.name in _LABEL_STORAGE:
        return _readonly(_kernel_view(labels))
    return _readonly(labels.astype(acc))


def _class_ids(labels):
    """Labels as int32 or int64 (one compiled kernel each); other integer widths are widened."""
    if labels.dtype in (np.int32, np.int64):
        return labels
    return labels.astype(np.int64)


def _ignore_value(ignore_index):
    """``ignore_index`` as an int64 the kernel compares with; -1 (never a valid label) for None."""
    if ignore_index is None or not -2**63 <= ignore_index < 2**63:
        return -1
    return ignore_index


def _flat(array):
    """A C-contiguous array as a 1-D view."""
    return array.reshape(array.size)


def _readonly(array):
    """A read-only view: option arrays always reach a kernel read-only (Numba
    compiles read-only and writeable arrays separately; the caller's array stays writeable)."""
    view = array.view()
    view.flags.writeable = False
    return view


def _block(size):
    """Elements per block of an elementwise kernel (read at each call: tests may patch the tunable)."""
    return max(1, min(_config.NUMBA_CHUNK, size))


def _window_values(option, size, block, acc):
    """A per-element option as ``(flat read-only values in acc, period)`` (``_rows.window``).

    ``option``: a float (uniform), a ``(K,)`` vector along the last axis, or
    the full ``(R, K)`` array.
    """
    if np.ndim(option) == 0:
        return _readonly(np.full(block, option, dtype=acc)), 1
    if option.ndim == 1:
        count = option.shape[0]
        repeats = -(-(block + count) // count) if count else 1
        return _readonly(np.tile(option.astype(acc), repeats)), max(count, 1)
    return _readonly(np.ascontiguousarray(option, dtype=acc).reshape(size)), 0


def _clip_bounds(epsilon, dtype, acc):
    lo, hi = _dtypes.clip_bounds(epsilon, dtype)
    return acc(lo), acc(hi)


# ----------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------

def _new_like(array, shape=None):
    """An uninitialised output of ``array``'s dtype, and its kernel view."""
    out = np.empty(array.shape if shape is None else shape, dtype=array.dtype)
    return out, _kernel_view(out)


def _loss_out(size, dtype):
    return np.empty(size, dtype=_dtypes.loss_dtype(dtype))


def _grad_scale_values(grad_scale, rows):
    """``(scale, step)`` of a row kernel: a uniform ``grad_scale`` is a 1-element array
    read with step 0, so one compiled kernel serves both cases without an N-sized
    array of copies."""
    if isinstance(grad_scale, float):
        return _readonly(np.full(1, grad_scale, dtype=np.float64)), 0
    return _readonly(np.ascontiguousarray(grad_scale, dtype=np.float64).reshape(rows)), 1


def _gradient(first, grad_scale, inplace):
    """``(grad, what the kernel takes as grad)``: ``(None, None)`` forward-only; in place
    ``first`` itself and ``_rows.IN_PLACE``; else a new array and its kernel view."""
    if grad_scale is None:
        return None, None
    if inplace:
        return first, IN_PLACE
    return _new_like(first)


def _row_outputs(first, grad_scale, inplace=False):
    """``(loss, grad, grad for the kernel, scale, step)`` of a row kernel; grad ``None`` forward-only."""
    rows = first.shape[0]
    loss = _loss_out(rows, first.dtype)
    grad, target = _gradient(first, grad_scale, inplace)
    if grad is None:
        return loss, None, None, None, 0
    return (loss, grad, target) + _grad_scale_values(grad_scale, rows)


def _elementwise_outputs(first, grad_scale, block, total, inplace):
    """``(loss, totals, grad, flat grad for the kernel, scale values, scale period)``.

    ``total``: no loss array, ``totals`` one partial sum per block (the kernel
    sums); else ``totals`` None. grad ``None`` forward-only.
    """
    acc = _acc(first.dtype)
    if total:
        loss, totals = None, np.empty(-(-first.size // block), dtype=np.float64)   # sigmoid_kernel's subtotals
    else:
        loss, totals = _loss_out(first.size, first.dtype), None
    grad, target = _gradient(first, grad_scale, inplace)
    if grad is None:
        return loss, totals, None, None, _readonly(np.zeros(1, dtype=acc)), 1
    scale, period = _window_values(grad_scale, first.size, block, acc)
    return loss, totals, grad, (target if inplace else _flat(target)), scale, period


def _finish(loss, grad, total):
    """A contract function's return value: the unreduced loss, or with ``total`` its sum
    (a float64 0-d array; ``loss`` may already be per-block partial sums)."""
    if total:
        return np.asarray(loss.sum(dtype=np.float64)), grad
    return loss, grad


def _rows_per_task(rows, count):
    """Rows per ``prange`` task of the fused row kernels: about ``NUMBA_TASK_CLASSES``
    scores each (a task allocates one scratch row), and at least a few tasks per thread."""
    per_thread = -(-rows // (4 * numba.get_num_threads()))
    return max(1, min(per_thread, _config.NUMBA_TASK_CLASSES // max(count, 1)))


# ----------------------------------------------------------------------------
# Softmax family and building blocks
# ----------------------------------------------------------------------------

def sparse_softmax_cross_entropy(logits, labels, ignore_index, class_weight, label_smoothing, z_loss,
                                 softcap, grad_scale, *, total=False, inplace=False):
    acc = _acc(logits.dtype)
    count = logits.shape[1]
    loss, grad, target, scale, step = _row_outputs(logits, grad_scale, inplace)
    # Ones when unweighted: one compiled kernel for both (C reads per smoothed row);
    # in the accumulation type, as a float64 -> float32 conversion in the
    # gradient loop halves its speed.
    weights = np.ones(count, dtype=acc) if class_weight is None else class_weight.astype(acc)
    ids, ignore = _class_ids(labels), _ignore_value(ignore_index)
    if softcap is None and label_smoothing == 0 and count < _config.NUMBA_SHORT_ROW:
        _softmax.sparse_short_kernel(_scores_view(logits, inplace), ids, ignore, weights, acc(z_loss), scale, step,
                                     loss, target, acc)
        return _finish(loss, grad, total)
    _softmax.sparse_kernel(_scores_view(logits, inplace), ids, ignore, weights, acc(weights.sum()),
                           acc(label_smoothing), acc(z_loss), None if softcap is None else acc(softcap), scale, step,
                           softcap is None, _rows_per_task(*logits.shape), loss, target, acc)
    return _finish(loss, grad, total)


def softmax_cross_entropy(logits, labels, label_smoothing, softcap, grad_scale, *, total=False, inplace=False):
    acc = _acc(logits.dtype)
    loss, grad, target, scale, step = _row_outputs(logits, grad_scale, inplace)
    _softmax.soft_kernel(_scores_view(logits, inplace), _label_view(labels, acc), acc(label_smoothing),
                         None if softcap is None else acc(softcap), scale, step, softcap is None,
                         _rows_per_task(*logits.shape), loss, target, acc)
    return _finish(loss, grad, total)


def logsumexp(x):
    out = _loss_out(x.shape[0], x.dtype)
    _softmax.lse_kernel(_scores_view(x), out, _acc(x.dtype))
    return out


def log_softmax(x):
    out, view = _new_like(x)
    _softmax.log_softmax_kernel(_scores_view(x), view, False, _acc(x.dtype))
    return out


def softmax(x):
    out, view = _new_like(x)
    _softmax.log_softmax_kernel(_scores_view(x), view, True, _acc(x.dtype))
    return out


# ----------------------------------------------------------------------------
# Sigmoid and probability families
# ----------------------------------------------------------------------------

def sigmoid_cross_entropy(logits, labels, pos_weight, label_smoothing, grad_scale, *, total=False, inplace=False):
    acc = _acc(logits.dtype)
    block = _block(logits.size)
    weights, period = _window_values(1.0 if pos_weight is None else pos_weight, logits.size, block, acc)
    loss, totals, grad, target, scale, scale_period = _elementwise_outputs(logits, grad_scale, block, total, inplace)
    _elementwise.sigmoid_kernel(_flat(_scores_view(logits, inplace)), _flat(_label_view(labels, acc)), weights, period,
                                acc(1.0 - label_smoothing), acc(label_smoothing / 2.0), scale, scale_period,
                                block, loss, totals, target, acc)
    return _finish(totals, grad, True) if total else (loss.reshape(logits.shape), grad)


def sigmoid_cross_entropy_hessian_diag(logits, labels, pos_weight):
    acc = _acc(logits.dtype)
    block = _block(logits.size)
    weights, period = _window_values(1.0 if pos_weight is None else pos_weight, logits.size, block, acc)
    out, view = _new_like(logits)
    _elementwise.sigmoid_hessian_kernel(_flat(_scores_view(logits)), _flat(_label_view(labels, acc)), weights,
                                        period, block, _flat(view), acc)
    return out


def binary_cross_entropy(probs, labels, epsilon, label_smoothing, grad_scale, *, total=False, inplace=False):
    acc = _acc(probs.dtype)
    block = _block(probs.size)
    lo, hi = _clip_bounds(epsilon, probs.dtype, acc)
    loss, totals, grad, target, scale, scale_period = _elementwise_outputs(probs, grad_scale, block, total, inplace)
    _probs.binary_kernel(_flat(_scores_view(probs, inplace)), _flat(_label_view(labels, acc)), lo, hi,
                         acc(1.0 - label_smoothing), acc(label_smoothing / 2.0), scale, scale_period, block,
                         loss, totals, target, acc)
    return _finish(totals, grad, True) if total else (loss.reshape(probs.shape), grad)


def categorical_cross_entropy(probs, labels, epsilon, label_smoothing, grad_scale, *, total=False):
    acc = _acc(probs.dtype)
    lo, hi = _clip_bounds(epsilon, probs.dtype, acc)
    loss, grad, target, scale, step = _row_outputs(probs, grad_scale)
    _probs.categorical_kernel(_scores_view(probs), _label_view(labels, acc), lo, hi, acc(1.0 - label_smoothing),
                              acc(label_smoothing / probs.shape[1]), scale, step, loss, target, acc)
    return _finish(loss, grad, total)


def sparse_categorical_cross_entropy(probs, labels, epsilon, ignore_index, grad_scale, *, total=False):
    acc = _acc(probs.dtype)
    lo, hi = _clip_bounds(epsilon, probs.dtype, acc)
    loss, grad, target, scale, step = _row_outputs(probs, grad_scale)
    _probs.sparse_categorical_kernel(_scores_view(probs), _class_ids(labels), _ignore_value(ignore_index), lo, hi,
                                     scale, step, loss, target, acc)
    return _finish(loss, grad, total)


# ----------------------------------------------------------------------------
# Second order and scoring
# ----------------------------------------------------------------------------

def softmax_cross_entropy_hvp(logits, v):
    acc = _acc(logits.dtype)
    out, view = _new_like(logits)
    _moments.hvp_kernel(_scores_view(logits), _label_view(v, acc), view, acc)
    return out


def score(logits, labels, ignore_index):
    rows = logits.shape[0]
    loss, lse, target, entropy = (_loss_out(rows, logits.dtype) for _ in range(4))
    argmax = np.empty(rows, dtype=np.int64)
    correct = np.empty(rows, dtype=np.bool_)
    _moments.score_kernel(_scores_view(logits), _class_ids(labels), _ignore_value(ignore_index), loss, lse, target,
                          entropy, argmax, correct, _acc(logits.dtype))
    return Score(loss, lse, target, entropy, argmax, correct)


# ----------------------------------------------------------------------------
# A block of classes of a split row
# ----------------------------------------------------------------------------

def softmax_partials(logits, labels, offset, ignore_index, class_weight, softcap, moments):
    acc = _acc(logits.dtype)
    rows = logits.shape[0]
    peak, total, target = (_loss_out(rows, logits.dtype) for _ in range(3))
    anchor = np.zeros(rows, dtype=acc)
    gap = np.zeros(rows, dtype=acc)
    spread = _loss_out(rows, logits.dtype) if moments else None
    best = np.empty(rows, dtype=np.int64) if moments else None
    best_value = _loss_out(rows, logits.dtype) if moments else None
    # No labels: class ids of -1, in no block (one compiled kernel for both cases).
    ids = np.full(rows, -1, dtype=np.int64) if labels is None else _class_ids(labels)
    _partials.partials_kernel(_scores_view(logits), ids,
                              _ignore_value(ignore_index), np.int64(offset),
                              None if class_weight is None else _readonly(class_weight.astype(acc)),
                              None if softcap is None else acc(softcap), peak, total, target, anchor, gap, spread,
                              best, best_value, acc)
    return Partials(peak, total, target, anchor, gap, spread, best, best_value)


def softmax_block_grad(logits, labels, offset, ignore_index, class_weight, softcap, shift, log_sum, p_coef,
                       target_coef, weight_coef):
    acc = _acc(logits.dtype)
    grad, view = _new_like(logits)

    def rows(values):
        return _readonly(np.ascontiguousarray(values, dtype=np.float64))

    # An unused weight_coef is an empty float64 array: one compiled signature for both cases.
    _partials.block_grad_kernel(_scores_view(logits), _class_ids(labels), _ignore_value(ignore_index),
                                np.int64(offset), None if class_weight is None else _readonly(class_weight.astype(acc)),
                                None if softcap is None else acc(softcap), rows(shift), rows(log_sum), rows(p_coef),
                                rows(target_coef), rows(np.zeros(0) if weight_coef is None else weight_coef), view,
                                acc)
    return grad
