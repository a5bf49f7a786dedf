"""The CUDA backend: the backend contract (``fastxent/backends/__init__.py``) on CuPy arrays.

Every function has the argument order and return conventions of the Numba backend,
runs on the arrays' own device and on CuPy's current stream, and copies nothing to
the host. By job:

* ``_build``: the dtype table, the kernel sources of ``kernels/``, the compiled-kernel
  cache (:func:`get_kernel`, :func:`precompile`);
* ``_plans``: launch plans (threads per row, block-per-row, split-row, elementwise grids);
* ``_args``: operands and scalars as the kernels take them, each checked for the size
  the kernel indexes.

bfloat16 on the device is a CuPy array of dtype ``ml_dtypes.bfloat16`` (CuPy >= 14
with ml_dtypes installed); the kernels read its storage as raw bits.

Sparse labels are range-checked by the kernels themselves: a label outside ``[0, C)``
that is not ``ignore_index`` sets a device flag instead of being read out of bounds
(its row gets loss NaN and a zero gradient). Reading the flag back is a
synchronisation; when it is set, :class:`fastxent.backends.BadLabels` is raised and
the public layer words the ``ValueError``. ``fastxent._config.CUDA_CHECK_LABELS = False``
or ``FASTXENT_CUDA_SKIP_LABEL_CHECK=1`` skips the read.

``inplace=True`` (the fused softmax, sigmoid and binary calls): the gradient is written
into the scores' buffer and returned as the gradient, saving an allocation of their size
and its memory traffic; the scores are lost. Each element is read before it is written,
by the same thread (the row kernels synchronise the group before the gradient stores).

``total=True`` (every loss): the loss is returned as its sum, a float64 0-d CuPy array,
for the public layer's reductions. The kernels still write the unreduced loss and the
sum is one CuPy reduction over it on the device: the loss is (N,) for the row
families, and for the elementwise ones a buffer of the scores' size in the
accumulation type (the Numba backend sums per block inside its kernel instead).
"""

import numpy as np

from ... import _config
from ..._score import Score
from .. import FUNCTIONS, Partials
from . import _args as a
from . import _build, _plans
from ._build import acc_dtype_name, get_kernel, instantiations, kernel_source, name_expression, precompile
from ._plans import row_plan, split_plan, vec_ok, vector_width

__all__ = [*FUNCTIONS, "get_kernel", "instantiations", "kernel_source", "name_expression", "precompile"]

# Values of softmax_rows' mode argument (SoftmaxMode in softmax_rows.cu).
_MODE_LOGSUMEXP, _MODE_LOG_SOFTMAX, _MODE_SOFTMAX = 0, 1, 2


def _finish(loss, grad, total):
    """The unreduced loss, or with ``total`` its float64 sum (0-d, on the device)."""
    if total:
        return loss.sum(dtype=np.float64), grad
    return loss, grad


def _info(array):
    """The launch-plan attributes of ``array``'s device."""
    return _plans.device_info(array.device.id)


def _outputs(first, rows_shape, grad_scale, inplace=False):
    """``(loss, grad or None)``: the loss in the loss dtype, the gradient in ``first``'s
    dtype (``first`` itself with ``inplace``)."""
    loss = a.empty(rows_shape, acc_dtype_name(first.dtype))
    if grad_scale is None:
        return loss, None
    return loss, (first if inplace else a.empty(first.shape, first.dtype))


def _row_launch(kernel_name, first, second, fused, args, *checked):
    """Launch a row kernel over ``first``'s (N, C) rows on its plan. ``second``: the dense
    second operand (its dtype is a template parameter, and the fused pass re-reads it) or
    None; ``args`` end before ``vec_ok``, which is computed from ``first`` and ``checked``."""
    n_rows, n_classes = first.shape
    row_bytes = n_classes * (first.dtype.itemsize + (second.dtype.itemsize if second is not None else 0))
    plan = row_plan(n_rows, n_classes, row_bytes, _info(first), fused)
    params = (first.dtype,) + ((second.dtype,) if second is not None else ()) + (plan.group,)
    vec = vec_ok(vector_width(first.dtype), first, *checked)
    a.launch(_build.get_kernel(kernel_name, *params), plan.grid, plan.threads, args + (a.i32(vec),), plan.smem)


# ----------------------------------------------------------------------------
# Softmax family
# ----------------------------------------------------------------------------

def sparse_softmax_cross_entropy(logits, labels, ignore_index, class_weight, label_smoothing,
                                 z_loss, softcap, grad_scale, *, total=False, inplace=False):
    """Sparse softmax cross-entropy of (N, C) rows: ``(loss (N,), grad (N, C) or None)``.

    Few rows of many classes (N < SMs, C >= ``CUDA_SPLIT_MIN_CLASSES``) take the
    split-row path.
    """
    n_rows, n_classes = logits.shape
    with a.device(logits):
        loss, grad = _outputs(logits, n_rows, grad_scale, inplace)
        if n_rows == 0:
            return _finish(loss, grad, total)
        info = _info(logits)
        ids = a.class_ids(labels, n_rows)
        weights, weight_sum = a.class_weight_args(class_weight, n_classes)
        scale, scale_value = a.scale_args(grad_scale, n_rows)
        ignore, has_ignore = a.ignore_args(ignore_index)
        options = (weights, weight_sum, a.f64(label_smoothing), a.f64(z_loss),
                   a.f64(softcap if softcap is not None else 0.0), ignore, has_ignore)
        flag = a.label_flag()
        vec = vec_ok(vector_width(logits.dtype), logits, grad)
        split = split_plan(n_rows, n_classes, info)
        if split is not None:
            _sparse_split(logits, ids, split, options, scale, scale_value, loss, grad, vec, flag)
        else:
            plan = row_plan(n_rows, n_classes, n_classes * logits.dtype.itemsize, info, grad is not None)
            kernel = _build.get_kernel("sparse_xent_rows", logits.dtype, ids.dtype, plan.group)
            a.launch(kernel, plan.grid, plan.threads,
                     (logits, ids, a.i64(n_rows), a.i64(n_classes), *options, scale, scale_value, loss,
                      a.pointer(grad), a.i32(vec), flag), plan.smem)
        a.check_label_flag(flag)
        return _finish(loss, grad, total)


#: Accumulation-type words of the device structs the split path keeps in global memory
#: (kernels/fx_formulas.cuh; their sizes are checked by tests/test_cuda_host_formulas.py).
SPARSE_STATS_WORDS = 4   # SparseStats<A>: Online (m, s), GapSum (t, h)
LOG_NORM_WORDS = 2       # LogNorm<A>: m, log_s


def _sparse_split(logits, ids, split, options, scale, scale_value, loss, grad, vec, flag):
    """The split-row path: partial statistics per chunk, a merge per row, the gradient per chunk."""
    n_rows, n_classes = logits.shape
    weights, weight_sum, eps, zl, cap, ignore, has_ignore = options
    acc = acc_dtype_name(logits.dtype)
    partial = a.empty((n_rows * split.splits, SPARSE_STATS_WORDS), acc)
    row_norm = a.empty((n_rows, LOG_NORM_WORDS), acc)
    grid2d = (split.splits, n_rows)
    threads = (_config.CUDA_SPLIT_BLOCK_THREADS,)
    _build.get_kernel("sparse_xent_partial", logits.dtype, ids.dtype)(
        grid2d, threads, (logits, ids, a.i64(n_classes), a.i64(split.chunk), weights, eps, cap, ignore, has_ignore,
                          partial, a.i32(vec)))
    rows_per_block = _config.CUDA_GROUP_BLOCK_THREADS // 32
    a.launch(_build.get_kernel("sparse_xent_merge", logits.dtype, ids.dtype), -(-n_rows // rows_per_block),
             _config.CUDA_GROUP_BLOCK_THREADS,
             (logits, ids, a.i64(n_rows), a.i64(n_classes), a.i64(split.splits), weights, weight_sum, eps, zl,
              cap, ignore, has_ignore, partial, row_norm, loss, flag))
    if grad is not None:
        _build.get_kernel("sparse_xent_split_grad", logits.dtype, ids.dtype)(
            grid2d, threads, (logits, ids, a.i64(n_classes), a.i64(split.chunk), weights, weight_sum, eps, zl, cap,
                              ignore, has_ignore, row_norm, scale, scale_value, grad, a.i32(vec)))


def softmax_cross_entropy(logits, labels, label_smoothing, softcap, grad_scale, *, total=False, inplace=False):
    """Soft-label softmax cross-entropy of (N, C) rows; ``inplace`` as the sparse one."""
    n_rows, n_classes = logits.shape
    with a.device(logits):
        loss, grad = _outputs(logits, n_rows, grad_scale, inplace)
        if n_rows == 0:
            return _finish(loss, grad, total)
        targets = a.dense_operand(labels, logits.dtype, _info(logits), logits.shape)
        scale, scale_value = a.scale_args(grad_scale, n_rows)
        _row_launch("soft_xent_rows", logits, targets, grad is not None,
                    (logits, targets, a.i64(n_rows), a.i64(n_classes), a.f64(label_smoothing),
                     a.f64(softcap if softcap is not None else 0.0), scale, scale_value, loss, a.pointer(grad)),
                    targets, grad)
        return _finish(loss, grad, total)


def _softmax_rows(x, mode):
    n_rows, n_classes = x.shape
    with a.device(x):
        if mode == _MODE_LOGSUMEXP:
            lse, out = a.empty(n_rows, acc_dtype_name(x.dtype)), None
        else:
            lse, out = None, a.empty(x.shape, x.dtype)
        if n_rows:
            _row_launch("softmax_rows", x, None, mode != _MODE_LOGSUMEXP,
                        (x, a.i64(n_rows), a.i64(n_classes), a.i32(mode), a.pointer(lse), a.pointer(out)), out)
    return lse if mode == _MODE_LOGSUMEXP else out


def log_softmax(x):
    """``x - logsumexp(x)`` per row, in x's dtype (torch's rules for non-finite rows)."""
    return _softmax_rows(x, _MODE_LOG_SOFTMAX)


def softmax(x):
    """``exp(x - logsumexp(x))`` per row, in x's dtype."""
    return _softmax_rows(x, _MODE_SOFTMAX)


def logsumexp(x):
    """Row logsumexp (N,) in the loss dtype: -inf for an all -inf row, +inf with +inf."""
    return _softmax_rows(x, _MODE_LOGSUMEXP)


def softmax_cross_entropy_hvp(logits, v):
    """``p * v - p * (p . v)`` per row, in the logits' dtype."""
    n_rows, n_classes = logits.shape
    with a.device(logits):
        out = a.empty(logits.shape, logits.dtype)
        if n_rows == 0:
            return out
        vector = a.dense_operand(v, logits.dtype, _info(logits), logits.shape, "v")
        _row_launch("hvp_rows", logits, vector, True, (logits, vector, a.i64(n_rows), a.i64(n_classes), out),
                    vector, out)
    return out


def score(logits, labels, ignore_index):
    """The scoring bundle of (N, C) rows in one read; a :class:`fastxent.Score` of (N,) arrays."""
    n_rows, n_classes = logits.shape
    with a.device(logits):
        acc = acc_dtype_name(logits.dtype)
        fields = Score(loss=a.empty(n_rows, acc), lse=a.empty(n_rows, acc), target_logprob=a.empty(n_rows, acc),
                       entropy=a.empty(n_rows, acc), argmax=a.empty(n_rows, np.int64),
                       correct=a.empty(n_rows, np.bool_))
        if n_rows == 0:
            return fields
        ids = a.class_ids(labels, n_rows)
        ignore, has_ignore = a.ignore_args(ignore_index)
        flag = a.label_flag()
        plan = row_plan(n_rows, n_classes, n_classes * logits.dtype.itemsize, _info(logits), False)
        a.launch(_build.get_kernel("score_rows", logits.dtype, ids.dtype, plan.group), plan.grid, plan.threads,
                 (logits, ids, a.i64(n_rows), a.i64(n_classes), ignore, has_ignore, *fields,
                  a.i32(vec_ok(vector_width(logits.dtype), logits)), flag))
        a.check_label_flag(flag)
    return fields


# ----------------------------------------------------------------------------
# Probability inputs
# ----------------------------------------------------------------------------

def categorical_cross_entropy(probs, labels, epsilon, label_smoothing, grad_scale, *, total=False):
    """Keras categorical cross-entropy of (N, C) probability rows."""
    n_rows, n_classes = probs.shape
    with a.device(probs):
        loss, grad = _outputs(probs, n_rows, grad_scale)
        if n_rows == 0:
            return _finish(loss, grad, total)
        targets = a.dense_operand(labels, probs.dtype, _info(probs), probs.shape)
        lo, hi = a.clip_args(epsilon, probs.dtype)
        scale, scale_value = a.scale_args(grad_scale, n_rows)
        _row_launch("categorical_rows", probs, targets, True,
                    (probs, targets, a.i64(n_rows), a.i64(n_classes), lo, hi, a.f64(label_smoothing), scale,
                     scale_value, loss, a.pointer(grad)), targets, grad)
        return _finish(loss, grad, total)


def sparse_categorical_cross_entropy(probs, labels, epsilon, ignore_index, grad_scale, *, total=False):
    """Keras sparse categorical cross-entropy of (N, C) probability rows."""
    n_rows, n_classes = probs.shape
    with a.device(probs):
        loss, grad = _outputs(probs, n_rows, grad_scale)
        if n_rows == 0:
            return _finish(loss, grad, total)
        ids = a.class_ids(labels, n_rows)
        lo, hi = a.clip_args(epsilon, probs.dtype)
        ignore, has_ignore = a.ignore_args(ignore_index)
        scale, scale_value = a.scale_args(grad_scale, n_rows)
        flag = a.label_flag()
        plan = row_plan(n_rows, n_classes, n_classes * probs.dtype.itemsize, _info(probs),
                        grad is not None)
        kernel = _build.get_kernel("sparse_categorical_rows", probs.dtype, ids.dtype, plan.group)
        a.launch(kernel, plan.grid, plan.threads,
                 (probs, ids, a.i64(n_rows), a.i64(n_classes), lo, hi, ignore, has_ignore, scale, scale_value,
                  loss, a.pointer(grad), a.i32(vec_ok(vector_width(probs.dtype), probs)), flag), plan.smem)
        a.check_label_flag(flag)
        return _finish(loss, grad, total)


# ----------------------------------------------------------------------------
# Elementwise families
# ----------------------------------------------------------------------------

def _elementwise_launch(kernel_name, first, targets, args, *checked):
    """Launch an elementwise kernel over ``first``'s elements; ``vec_ok`` from ``checked``."""
    vec = vector_width(first.dtype)
    a.launch(_build.get_kernel(kernel_name, first.dtype, targets.dtype),
             _plans.elementwise_grid(first.size, vec, _info(first)), _config.CUDA_ELEMENTWISE_BLOCK_THREADS,
             args + (a.i32(vec_ok(vec, first, targets, *checked)),))


def sigmoid_cross_entropy(logits, labels, pos_weight, label_smoothing, grad_scale, *, total=False, inplace=False):
    """Elementwise sigmoid cross-entropy of (R, K) scores; ``(loss (R, K), grad or None)``."""
    with a.device(logits):
        loss, grad = _outputs(logits, logits.shape, grad_scale, inplace)
        if logits.size == 0:
            return _finish(loss, grad, total)
        targets = a.dense_operand(labels, logits.dtype, _info(logits), logits.shape)
        mode, weights, weight_value = a.pos_weight_args(pos_weight, logits.shape)
        scale, scale_value = a.scale_args(grad_scale, logits.size)
        _elementwise_launch("sigmoid_xent_elems", logits, targets,
                            (logits, targets, a.i64(logits.size), a.i64(logits.shape[-1]), mode, weights,
                             weight_value, a.f64(label_smoothing), scale, scale_value, loss, a.pointer(grad)),
                            loss, grad)
        return _finish(loss, grad, total)


def sigmoid_cross_entropy_hessian_diag(logits, labels, pos_weight):
    """``(1 + (q-1) z) s (1-s)`` elementwise, in the logits' dtype and (R, K) shape."""
    with a.device(logits):
        out = a.empty(logits.shape, logits.dtype)
        if logits.size == 0:
            return out
        targets = a.dense_operand(labels, logits.dtype, _info(logits), logits.shape)
        mode, weights, weight_value = a.pos_weight_args(pos_weight, logits.shape)
        _elementwise_launch("sigmoid_hess_elems", logits, targets,
                            (logits, targets, a.i64(logits.size), a.i64(logits.shape[-1]), mode, weights,
                             weight_value, out), out)
    return out


def binary_cross_entropy(probs, labels, epsilon, label_smoothing, grad_scale, *, total=False, inplace=False):
    """Keras binary cross-entropy of (R, K) probabilities; ``(loss, grad or None)``."""
    with a.device(probs):
        loss, grad = _outputs(probs, probs.shape, grad_scale, inplace)
        if probs.size == 0:
            return _finish(loss, grad, total)
        targets = a.dense_operand(labels, probs.dtype, _info(probs), probs.shape)
        lo, hi = a.clip_args(epsilon, probs.dtype)
        scale, scale_value = a.scale_args(grad_scale, probs.size)
        _elementwise_launch("binary_xent_elems", probs, targets,
                            (probs, targets, a.i64(probs.size), lo, hi, a.f64(label_smoothing), scale, scale_value,
                             loss, a.pointer(grad)), loss, grad)
        return _finish(loss, grad, total)


# ----------------------------------------------------------------------------
# A block of classes of a split row
# ----------------------------------------------------------------------------

def _block_ids(labels, n_rows):
    """A split row's class ids as int64 (one instantiation per kernel: N ids beside N x C scores)."""
    import cupy

    if labels is None:
        return cupy.full(n_rows, -1, dtype=np.int64)
    return a.class_ids(labels, n_rows).astype(np.int64, copy=False)


def softmax_partials(logits, labels, offset, ignore_index, class_weight, softcap, moments):
    """Partial statistics of a block ``(N, Cb)`` of classes from ``offset``: a
    :class:`fastxent._partials.Partials` of (N,) arrays."""
    import cupy

    n_rows, n_classes = logits.shape
    with a.device(logits):
        acc = acc_dtype_name(logits.dtype)
        peak, total, target, anchor, gap = (cupy.zeros(n_rows, dtype=acc) for _ in range(5))
        spread = cupy.zeros(n_rows, dtype=acc) if moments else None
        best = cupy.zeros(n_rows, dtype=np.int64) if moments else None
        best_value = cupy.zeros(n_rows, dtype=acc) if moments else None
        if n_rows == 0:
            return Partials(peak, total, target, anchor, gap, spread, best, best_value)
        ids = _block_ids(labels, n_rows)
        ignore, has_ignore = a.ignore_args(ignore_index)
        plan = row_plan(n_rows, n_classes, n_classes * logits.dtype.itemsize, _info(logits), False)
        head = (logits, ids, a.i64(n_rows), a.i64(n_classes), a.i64(offset), ignore, has_ignore)
        vec = a.i32(vec_ok(vector_width(logits.dtype), logits))
        if moments:
            a.launch(_build.get_kernel("score_partials_rows", logits.dtype, plan.group), plan.grid, plan.threads,
                     head + (peak, total, target, spread, best, best_value, vec))
        else:
            a.launch(_build.get_kernel("sparse_partials_rows", logits.dtype, plan.group), plan.grid, plan.threads,
                     head + (a.block_weights(class_weight, offset, n_classes),
                             a.f64(softcap if softcap is not None else 0.0), peak, total, target, anchor, gap, vec))
    return Partials(peak, total, target, anchor, gap, spread, best, best_value)


def softmax_block_grad(logits, labels, offset, ignore_index, class_weight, softcap, shift, log_sum, p_coef,
                       target_coef, weight_coef):
    """The gradient of a block ``(N, Cb)`` of classes from ``offset``, from the rows' merged
    normaliser and coefficients; in the logits' dtype."""
    n_rows, n_classes = logits.shape
    with a.device(logits):
        grad = a.empty(logits.shape, logits.dtype)
        if n_rows == 0:
            return grad
        ignore, has_ignore = a.ignore_args(ignore_index)
        weights = a.block_weights(class_weight, offset, n_classes)
        rows = [a.row_values(name, values, n_rows) for name, values in
                (("shift", shift), ("log_sum", log_sum), ("p_coef", p_coef), ("target_coef", target_coef))]
        coef = a.NULL if class_weight is None else a.row_values("weight_coef", weight_coef, n_rows)
        plan = row_plan(n_rows, n_classes, n_classes * logits.dtype.itemsize, _info(logits), False)
        a.launch(_build.get_kernel("softmax_block_grad_rows", logits.dtype, plan.group), plan.grid, plan.threads,
                 (logits, _block_ids(labels, n_rows), a.i64(n_rows), a.i64(n_classes), a.i64(offset), ignore,
                  has_ignore, weights, a.f64(softcap if softcap is not None else 0.0), *rows, coef, grad,
                  a.i32(vec_ok(vector_width(logits.dtype), logits, grad))))
    return grad
