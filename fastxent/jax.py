"""JAX adapter: optax's classification losses computed by fastxent's fused kernels.

Same signatures and values as optax (``optax.softmax_cross_entropy``,
``optax.softmax_cross_entropy_with_integer_labels``,
``optax.sigmoid_binary_cross_entropy``)::

    import fastxent.jax as fxj
    loss = fxj.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

How a call runs
---------------
Each loss is a ``jax.custom_jvp`` around ``jax.pure_callback``: JAX hands the
(CPU) buffers to fastxent's Numba kernels on the host and gets the results
back. The functions work under ``jit``, ``vmap`` and every differentiation
transform, in both modes and to any order: ``grad``, ``value_and_grad``,
``jvp``, ``jacfwd``, ``jacrev``, ``hessian`` (``jax.test_util.check_grads``
with ``order=2, modes=["fwd", "rev"]``, as optax's own tests use it):

* ``vmap_method="broadcast_all"``: the kernels work row by row over any
  leading dimensions, so a vmapped call is one callback over the batched
  arrays (every argument tiled to the batch), not a loop.
* The class axis (or axes) is moved last and flattened in JAX before the
  callback; optax's ``where`` is applied in JAX around the fused op (masked
  scores become ``-inf``, which fastxent treats as masking), so the kernels
  see plain rows.
* The loss's tangent rule runs the fused pass (``return_grad=True``) and
  returns ``sum_c G_c t_c`` per row, linear in the tangent ``t``: reverse
  mode transposes it into one multiply of ``G`` by the cotangent (fused by
  XLA), so a gradient costs the fused pass and nothing more. Without
  differentiation the forward-only kernel runs.
* ``G`` itself comes from a second ``custom_jvp`` (the fused callback) whose
  rule gives the Hessian-vector product: ``p*t - p*(p.t)`` per row (scaled by
  the labels' sum for soft labels), with ``p`` from a third ``custom_jvp``
  around fastxent's softmax whose own tangent is again ``p*t - p*(p.t)``; the
  sigmoid's Hessian diagonal ``s(1-s)`` uses jnp's sigmoid. Every rule is
  linear in its tangents and closed under differentiation, so second and
  higher orders compose; the softmax callback runs only where a second-order
  quantity is asked for (under ``jit`` XLA drops unused callbacks).
* Host calls are serialised (``fastxent._adapters.HOST_LOCK``): XLA may run
  independent callbacks at the same time, and each kernel uses every core.
* Soft labels and sigmoid labels get optax's label derivatives too
  (``-log_softmax(logits)`` and ``-logits``), in both modes; the
  ``log_softmax`` callback runs only when the labels carry a tangent or
  cotangent. At a score of ``-inf`` (``where`` masking included) the
  ``log_softmax`` there is taken as the most negative finite number, so a
  zero label tangent contributes 0 rather than NaN.

The callbacks run on the host: on an accelerator backend JAX copies the
arrays to the host and back, which works but defeats the purpose; use these
functions with JAX on the CPU.

Where fastxent differs from optax, it is on purpose: a score of ``-inf`` whose
label weight is 0 contributes 0 (the ``xlogy`` convention of
``optax.safe_softmax_cross_entropy``; plain optax gives NaN), and a
cross-entropy over a single class is a ``ValueError`` (optax returns 0)
pointing to the sigmoid loss. 16-bit scores are accumulated in float32.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax.custom_derivatives import SymbolicZero

import fastxent as fx
from fastxent._adapters import host_call

__all__ = [
    "linear_cross_entropy",
    "sigmoid_binary_cross_entropy",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
]

#: The kernels run row by row over leading dimensions, so a vmapped callback
#: is one call over the batched (tiled) arrays.
_VMAP_METHOD = "broadcast_all"


# ----------------------------------------------------------------------------
# Host side: plain numpy in, numpy out (class axis last)
# ----------------------------------------------------------------------------

def _host_sparse(logits, labels, *, loss_dtype, with_grad):
    """Integer labels with optax's conventions: -C <= y < 0 wraps, y >= C or < -C gives NaN."""
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    count = logits.shape[-1]
    labels = np.where(labels < 0, labels + count, labels)
    bad = (labels < 0) | (labels >= count)
    if bad.any():
        labels = np.where(bad, 0, labels)
    result = fx.sparse_softmax_cross_entropy(logits, labels, return_grad=with_grad)
    loss, grad = result if with_grad else (result, None)
    loss = np.asarray(loss, dtype=loss_dtype)
    if bad.any():
        # optax: the label's score is a NaN gather, the normaliser's gradient
        # (the softmax) still flows: fastxent's row with label 0, plus one-hot(0).
        loss = np.where(bad, np.asarray(np.nan, loss_dtype), loss)
        if with_grad:
            grad = np.array(grad)
            grad[bad, 0] += 1
    return loss if not with_grad else (loss, grad)


def _host_soft(logits, labels, *, loss_dtype, with_grad):
    result = fx.softmax_cross_entropy(np.asarray(logits), np.asarray(labels), return_grad=with_grad)
    if with_grad:
        return np.asarray(result[0], dtype=loss_dtype), result[1]
    return np.asarray(result, dtype=loss_dtype)


def _host_log_softmax(logits, *, out_dtype):
    return np.asarray(fx.log_softmax(np.asarray(logits)), dtype=out_dtype)


def _host_softmax(logits):
    return fx.softmax(np.asarray(logits))


def _host_sigmoid(logits, labels, *, with_grad):
    logits = np.asarray(logits)
    result = fx.sigmoid_cross_entropy(logits, np.asarray(labels), return_grad=with_grad)
    if with_grad:
        return np.asarray(result[0], dtype=logits.dtype), result[1]
    return np.asarray(result, dtype=logits.dtype)


def _callback(host, shapes, *args, **options):
    return jax.pure_callback(functools.partial(host_call, host, **options), shapes, *args,
                             vmap_method=_VMAP_METHOD)


def _struct(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


# ----------------------------------------------------------------------------
# Fused ops (class axis last) with their JVPs
# ----------------------------------------------------------------------------
#
# Each loss is a custom_jvp whose primal is the forward-only callback and whose
# tangent rule calls a second custom_jvp, the fused (loss, gradient) callback:
# the loss's tangent is sum_c G_c t_c, linear in t, so JAX transposes it for
# reverse mode (the cotangent times G, one multiply) and never needs more than
# the fused pass for first order. The fused op's own rule gives the gradient's
# tangent, H t, from the probabilities p (a third custom_jvp around fastxent's
# softmax, whose tangent p*t - p*(p.t) is again in p): every rule is linear in
# its tangents and closed under differentiation, so jvp, grad, jacfwd, jacrev
# and hessian compose to any order. Under jit XLA drops the callbacks nobody
# uses (the softmax one unless second order is asked).

def _acc(dtype):
    """Accumulation dtype of the tangent sums: float32 for 16-bit, else the dtype."""
    return jnp.promote_types(dtype, jnp.float32)


def _row_dot(a, b, dtype):
    """``sum_c a_c b_c`` over the last axis, accumulated in float32 or wider, as ``dtype``."""
    acc = _acc(jnp.result_type(a.dtype, b.dtype))
    return jnp.sum(a.astype(acc) * b.astype(acc), axis=-1).astype(dtype)


def _softmax_hvp(p, t):
    """``(diag(p) - p p^T) t`` per row, in ``t``'s dtype (p is treated through its own rule)."""
    acc = _acc(t.dtype)
    pa, ta = p.astype(acc), t.astype(acc)
    return (pa * ta - pa * jnp.sum(pa * ta, axis=-1, keepdims=True)).astype(t.dtype)


def _is_zero(tangent):
    return isinstance(tangent, SymbolicZero)


@jax.custom_jvp
def _softmax_op(logits):
    return _callback(_host_softmax, _struct(logits.shape, logits.dtype), logits)


@_softmax_op.defjvp
def _softmax_jvp(primals, tangents):
    (logits,), (tangent,) = primals, tangents
    p = _softmax_op(logits)
    return p, _softmax_hvp(p, tangent)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _log_softmax_op(logits, out_dtype):
    return _callback(_host_log_softmax, _struct(logits.shape, out_dtype), logits, out_dtype=out_dtype)


@_log_softmax_op.defjvp
def _log_softmax_jvp(out_dtype, primals, tangents):
    (logits,), (tangent,) = primals, tangents
    p = _softmax_op(logits)
    acc = _acc(tangent.dtype)
    ta = tangent.astype(acc)
    tangent_out = ta - jnp.sum(p.astype(acc) * ta, axis=-1, keepdims=True)
    return _log_softmax_op(logits, out_dtype), tangent_out.astype(out_dtype)


# Integer labels -------------------------------------------------------------

def _sparse_loss_struct(logits):
    return _struct(logits.shape[:-1], logits.dtype)


@jax.custom_jvp
def _sparse_op(logits, labels):
    return _callback(_host_sparse, _sparse_loss_struct(logits), logits, labels,
                     loss_dtype=logits.dtype, with_grad=False)


@jax.custom_jvp
def _sparse_fused(logits, labels):
    return _callback(_host_sparse, (_sparse_loss_struct(logits), _struct(logits.shape, logits.dtype)),
                     logits, labels, loss_dtype=logits.dtype, with_grad=True)


@_sparse_op.defjvp
def _sparse_jvp(primals, tangents):
    logits, labels = primals
    loss, grad = _sparse_fused(logits, labels)
    return loss, _row_dot(grad, tangents[0], loss.dtype)


@_sparse_fused.defjvp
def _sparse_fused_jvp(primals, tangents):
    logits, labels = primals
    tangent = tangents[0]
    loss, grad = _sparse_fused(logits, labels)
    hvp = _softmax_hvp(_softmax_op(logits), tangent)  # one-hot labels: H = diag(p) - p p^T
    return (loss, grad), (_row_dot(grad, tangent, loss.dtype), hvp)


# Soft labels ----------------------------------------------------------------

def _soft_structs(logits, labels):
    loss_dtype = jnp.result_type(logits.dtype, labels.dtype)
    return _struct(logits.shape[:-1], loss_dtype), _struct(logits.shape, logits.dtype)


@jax.custom_jvp
def _soft_op(logits, labels):
    loss_struct, _ = _soft_structs(logits, labels)
    return _callback(_host_soft, loss_struct, logits, labels, loss_dtype=loss_struct.dtype, with_grad=False)


@jax.custom_jvp
def _soft_fused(logits, labels):
    loss_struct, grad_struct = _soft_structs(logits, labels)
    return _callback(_host_soft, (loss_struct, grad_struct), logits, labels, loss_dtype=loss_struct.dtype,
                     with_grad=True)


def _soft_loss_tangent(logits, labels, grad, loss_dtype, logits_tangent, labels_tangent):
    """``sum_c G_c t_c - sum_c log_softmax(x)_c s_c`` (optax's label derivative), zeros skipped.

    Where a score is -inf (``where`` masking included) ``log_softmax`` is taken as
    the most negative finite value rather than -inf, so that a zero label tangent
    there adds 0 (not ``-inf * 0 = NaN``) and a cotangent is large, not infinite.
    """
    tangent = jnp.zeros(grad.shape[:-1], loss_dtype)
    if not _is_zero(logits_tangent):
        tangent = tangent + _row_dot(grad, logits_tangent, loss_dtype)
    if not _is_zero(labels_tangent):
        log_p = _log_softmax_op(logits, labels.dtype)
        log_p = jnp.where(jnp.isneginf(log_p), jnp.finfo(log_p.dtype).min, log_p)
        tangent = tangent - _row_dot(log_p, labels_tangent, loss_dtype)
    return tangent


def _soft_jvp(primals, tangents):
    logits, labels = primals
    loss, grad = _soft_fused(logits, labels)
    return loss, _soft_loss_tangent(logits, labels, grad, loss.dtype, *tangents)


_soft_op.defjvp(_soft_jvp, symbolic_zeros=True)


def _soft_fused_jvp(primals, tangents):
    logits, labels = primals
    logits_tangent, labels_tangent = tangents
    loss, grad = _soft_fused(logits, labels)
    loss_tangent = _soft_loss_tangent(logits, labels, grad, loss.dtype, logits_tangent, labels_tangent)
    # grad = p sum(y) - y:  d grad = sum(y) H t + p sum(s) - s.
    acc = _acc(grad.dtype)
    grad_tangent = jnp.zeros(grad.shape, acc)
    if not (_is_zero(logits_tangent) and _is_zero(labels_tangent)):
        p = _softmax_op(logits)
    if not _is_zero(logits_tangent):
        total = jnp.sum(labels.astype(acc), axis=-1, keepdims=True)
        grad_tangent = grad_tangent + total * _softmax_hvp(p, logits_tangent).astype(acc)
    if not _is_zero(labels_tangent):
        s = labels_tangent.astype(acc)
        grad_tangent = grad_tangent + p.astype(acc) * jnp.sum(s, axis=-1, keepdims=True) - s
    return (loss, grad), (loss_tangent, grad_tangent.astype(grad.dtype))


_soft_fused.defjvp(_soft_fused_jvp, symbolic_zeros=True)


# Sigmoid --------------------------------------------------------------------

@jax.custom_jvp
def _sigmoid_op(logits, labels):
    return _callback(_host_sigmoid, _struct(logits.shape, logits.dtype), logits, labels, with_grad=False)


@jax.custom_jvp
def _sigmoid_fused(logits, labels):
    return _callback(_host_sigmoid, (_struct(logits.shape, logits.dtype), _struct(logits.shape, logits.dtype)),
                     logits, labels, with_grad=True)


def _sigmoid_loss_tangent(logits, grad, logits_tangent, labels_tangent):
    """``G t - x s`` elementwise (optax's label derivative is ``-x``), zeros skipped."""
    tangent = jnp.zeros(grad.shape, grad.dtype)
    if not _is_zero(logits_tangent):
        tangent = tangent + grad * logits_tangent
    if not _is_zero(labels_tangent):
        tangent = tangent - logits * labels_tangent
    return tangent


def _sigmoid_jvp(primals, tangents):
    logits, _ = primals
    loss, grad = _sigmoid_fused(*primals)
    return loss, _sigmoid_loss_tangent(logits, grad, *tangents)


_sigmoid_op.defjvp(_sigmoid_jvp, symbolic_zeros=True)


def _sigmoid_fused_jvp(primals, tangents):
    # grad = sigmoid(x) - z: d grad = s (1 - s) t - dz, the Hessian's diagonal
    # (fastxent.sigmoid_cross_entropy_hessian_diag) from jnp's sigmoid, which JAX
    # differentiates natively.
    logits, labels = primals
    logits_tangent, labels_tangent = tangents
    loss, grad = _sigmoid_fused(logits, labels)
    grad_tangent = jnp.zeros(grad.shape, grad.dtype)
    if not _is_zero(logits_tangent):
        s = jax.nn.sigmoid(logits)
        grad_tangent = grad_tangent + s * (1 - s) * logits_tangent
    if not _is_zero(labels_tangent):
        grad_tangent = grad_tangent - labels_tangent
    return (loss, grad), (_sigmoid_loss_tangent(logits, grad, logits_tangent, labels_tangent), grad_tangent)


_sigmoid_fused.defjvp(_sigmoid_fused_jvp, symbolic_zeros=True)


# ----------------------------------------------------------------------------
# Shapes, axes and where (in JAX, around the fused ops)
# ----------------------------------------------------------------------------

def _check_floating(name, array):
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating point array, got dtype {array.dtype}")


def _class_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool):
        axes = (int(axis),)
    elif isinstance(axis, tuple):
        axes = axis
    else:
        raise ValueError(f"axis must be an int, a tuple of ints or None, got {axis!r}")
    canonical = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of bounds for an array of dimension {ndim}")
        canonical.append(a % ndim)
    if len(set(canonical)) != len(canonical):
        raise ValueError(f"axis {axis!r} repeats an axis")
    return tuple(canonical)


def _classes_last(array, axes):
    """``array`` with ``axes`` moved last (in the order given) and flattened into one."""
    batch = tuple(i for i in range(array.ndim) if i not in axes)
    if batch + axes != tuple(range(array.ndim)):
        array = jnp.transpose(array, batch + axes)
    return array.reshape(tuple(array.shape[:len(batch)]) + (-1,))


def _check_classes(function, count, alternative):
    if count == 0:
        raise ValueError(f"{function}: the logits have 0 classes; there is nothing to normalise over")
    if count == 1:
        raise ValueError(f"{function} over a single class is always 0; for one score per example use "
                         f"{alternative}")


def _where_mask(where, logits, axes):
    where = jnp.asarray(where)
    if where.ndim != logits.ndim:
        where = jnp.expand_dims(where, axes)
    return jnp.broadcast_to(where.astype(bool), logits.shape)


def _masked_scores(logits, mask):
    """Masked scores become -inf (fastxent's masking); rows with nothing left become 0 (loss 0)."""
    any_valid = jnp.any(mask, axis=-1, keepdims=True)
    fill = jnp.where(any_valid, -jnp.inf, 0.0).astype(logits.dtype)
    return jnp.where(mask, logits, fill), any_valid[..., 0]


# ----------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------

def softmax_cross_entropy(logits, labels, axis=-1, where=None):
    r"""``optax.softmax_cross_entropy``, computed by fastxent.

    Per example: ``-sum_c labels_c * log_softmax(logits)_c`` along ``axis``
    (an int, a tuple of ints, or None for all axes); labels need not sum to 1.
    With ``where`` (the logits' shape, or the batch shape), entries outside it
    are left out of both the normaliser and the sum; an example with no entry
    left has loss 0.

    Parameters
    ----------
    logits : array, float
    labels : array, the logits' shape
    axis : int, tuple of ints or None
    where : bool array, optional

    Returns
    -------
    array
        The logits' shape without ``axis``, in the promoted dtype of logits and labels.

    Examples
    --------
    >>> import jax.numpy as jnp, fastxent.jax as fxj
    >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
    >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    >>> loss = fxj.softmax_cross_entropy(logits, labels)  # [0.2761, 2.9518]
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    _check_floating("logits", logits)
    if labels.shape != logits.shape:
        raise ValueError(f"labels has shape {labels.shape}, expected the logits' shape {logits.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        labels = labels.astype(logits.dtype)
    axes = _class_axes(axis, logits.ndim)
    x = _classes_last(logits, axes)
    y = _classes_last(labels, axes)
    _check_classes("softmax_cross_entropy", x.shape[-1], "optax.sigmoid_binary_cross_entropy")
    if where is None:
        return _soft_op(x, y)
    mask = _classes_last(_where_mask(where, logits, axes), axes)
    x, any_valid = _masked_scores(x, mask)
    y = jnp.where(mask, y, jnp.zeros((), y.dtype))
    return _soft_op(x, y)


def softmax_cross_entropy_with_integer_labels(logits, labels, axis=-1, where=None):
    r"""``optax.softmax_cross_entropy_with_integer_labels``, computed by fastxent.

    Per example: ``logsumexp(logits) - logits[label]`` along ``axis`` (an int or
    a tuple of ints; with a tuple a label is a flat index into the class
    slice, in the order of the axes given). As in optax a label in ``[-C, 0)``
    counts from the end and one outside ``[-C, C)`` gives NaN; with ``where``
    the normaliser runs over the entries inside it only (the label's own score
    is taken as is), and an example with no entry left has loss 0.

    Parameters
    ----------
    logits : array, float
    labels : integer array, the logits' shape without ``axis``
    axis : int or tuple of ints
    where : bool array, optional

    Returns
    -------
    array
        ``labels``' shape, in the logits' dtype.

    Examples
    --------
    >>> import jax.numpy as jnp, fastxent.jax as fxj
    >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
    >>> loss = fxj.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 1]))
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    _check_floating("logits", logits)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype}; for one-hot or "
                        "soft labels use softmax_cross_entropy")
    if axis is None:
        raise ValueError("axis must be an int or a tuple of ints, got None")
    axes = _class_axes(axis, logits.ndim)
    x = _classes_last(logits, axes)
    if labels.shape != x.shape[:-1]:
        raise ValueError(f"labels has shape {labels.shape}, expected {x.shape[:-1]} (the logits' shape "
                         f"{logits.shape} without axis {axis})")
    _check_classes("softmax_cross_entropy_with_integer_labels", x.shape[-1],
                   "optax.sigmoid_binary_cross_entropy")
    if where is None:
        return _sparse_op(x, labels)
    mask = _classes_last(_where_mask(where, logits, axes), axes)
    masked, any_valid = _masked_scores(x, mask)
    # The fused op needs the label inside the mask; where it is not, use the
    # first valid class k and add back x'_k - x_y (0 when the label is valid).
    count = x.shape[-1]
    wrapped = jnp.where(labels < 0, labels + count, labels)
    safe = jnp.clip(wrapped, 0, count - 1)
    in_range = (wrapped >= 0) & (wrapped < count)
    label_valid = in_range & jnp.take_along_axis(mask, safe[..., None], axis=-1)[..., 0]
    # A label outside [-C, C) goes to the fused op as is, which gives optax's NaN.
    anchor = jnp.where(label_valid | ~in_range, labels, jnp.argmax(mask, axis=-1).astype(labels.dtype))
    anchor_score = jnp.take_along_axis(masked, jnp.clip(anchor, 0, count - 1)[..., None].astype(jnp.int32),
                                       axis=-1)[..., 0]
    label_score = jnp.take_along_axis(x, safe[..., None].astype(jnp.int32), axis=-1)[..., 0]
    correction = jnp.where(label_valid, jnp.zeros((), x.dtype), anchor_score - label_score)
    out = _sparse_op(masked, anchor) + correction
    return jnp.where(any_valid, out, jnp.zeros((), out.dtype))


def sigmoid_binary_cross_entropy(logits, labels):
    r"""``optax.sigmoid_binary_cross_entropy``, computed by fastxent.

    Elementwise ``-z log sigmoid(x) - (1 - z) log sigmoid(-x)``, stable for any
    finite score; ``labels`` are cast to the logits' dtype and broadcast
    against them as in optax.

    Parameters
    ----------
    logits : array, float
    labels : array broadcastable against ``logits``

    Returns
    -------
    array
        The broadcast shape, in the logits' dtype.

    Examples
    --------
    >>> import jax.numpy as jnp, fastxent.jax as fxj
    >>> loss = fxj.sigmoid_binary_cross_entropy(jnp.array([0.0, 2.0]), jnp.array([1.0, 0.0]))
    """
    logits = jnp.asarray(logits)
    _check_floating("logits", logits)
    labels = jnp.asarray(labels).astype(logits.dtype)
    shape = jnp.broadcast_shapes(logits.shape, labels.shape)
    return _sigmoid_op(jnp.broadcast_to(logits, shape), jnp.broadcast_to(labels, shape))


# ----------------------------------------------------------------------------
# Linear layer + cross-entropy from hidden states (fastxent.linear_cross_entropy)
# ----------------------------------------------------------------------------

#: A callback over the whole weight: under vmap it runs once per batch element
#: (tiling the weight, as "broadcast_all" would, is not what a shared head means).
_LINEAR_VMAP_METHOD = "sequential"


def _host_linear(hidden, weight, bias, labels, class_weight, grad_output=None, *, options, loss_dtype, with_grad):
    """fastxent.linear_cross_entropy on host arrays: the loss, and the gradients when asked."""
    reduction, ignore_index, label_smoothing, z_loss, softcap, memory = options
    result = fx.linear_cross_entropy(
        np.asarray(hidden), np.asarray(weight), np.asarray(labels), None if bias is None else np.asarray(bias),
        ignore_index=ignore_index, class_weight=None if class_weight is None else np.asarray(class_weight),
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, reduction=reduction,
        return_grad=with_grad, grad_output=None if grad_output is None else np.asarray(grad_output), memory=memory)
    if not with_grad:
        return np.asarray(result, dtype=loss_dtype)
    loss, grad = result
    return (np.asarray(loss, dtype=loss_dtype), grad.hidden, grad.weight) + (() if bias is None else (grad.bias,))


def _linear_callback(shapes, hidden, weight, bias, labels, class_weight, grad_output=None, **options):
    host = functools.partial(host_call, _host_linear, **options)
    return jax.pure_callback(host, shapes, hidden, weight, bias, labels, class_weight, grad_output,
                             vmap_method=_LINEAR_VMAP_METHOD)


def _linear_shapes(hidden, weight, bias, labels, options, with_grad):
    loss = _struct(labels.shape if options[0] == "none" else (), hidden.dtype)
    if not with_grad:
        return loss
    grads = (_struct(hidden.shape, hidden.dtype), _struct(weight.shape, weight.dtype))
    return (loss, *grads) + (() if bias is None else (_struct(bias.shape, bias.dtype),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _linear_op(hidden, weight, bias, labels, class_weight, options):
    return _linear_callback(_linear_shapes(hidden, weight, bias, labels, options, False), hidden, weight, bias,
                            labels, class_weight, options=options, loss_dtype=hidden.dtype, with_grad=False)


def _linear_fwd(hidden, weight, bias, labels, class_weight, options):
    if options[0] == "none":  # the gradients need each row's cotangent: computed in backward
        loss = _linear_op(hidden, weight, bias, labels, class_weight, options)
        return loss, (hidden, weight, bias, labels, class_weight)
    loss, *grads = _linear_callback(_linear_shapes(hidden, weight, bias, labels, options, True), hidden, weight,
                                    bias, labels, class_weight, options=options, loss_dtype=hidden.dtype,
                                    with_grad=True)
    return loss, tuple(grads)


def _linear_bwd(options, residuals, cotangent):
    if options[0] == "none":
        hidden, weight, bias, labels, class_weight = residuals
        _, *grads = _linear_callback(_linear_shapes(hidden, weight, bias, labels, options, True), hidden, weight,
                                     bias, labels, class_weight, cotangent, options=options,
                                     loss_dtype=hidden.dtype, with_grad=True)
    else:
        grads = [g * cotangent.astype(g.dtype) for g in residuals]
    grad_bias = grads[2] if len(grads) == 3 else None
    return grads[0], grads[1], grad_bias, None, None


_linear_op.defvjp(_linear_fwd, _linear_bwd)


def linear_cross_entropy(hidden, weight, labels, bias=None, *, reduction="mean", ignore_index=None,
                         class_weight=None, label_smoothing=0.0, z_loss=0.0, softcap=None, memory=None):
    r"""Softmax cross-entropy of ``hidden @ weight.T + bias`` with integer labels, the logits never whole.

    :func:`fastxent.linear_cross_entropy` as a ``jax.custom_vjp`` (CPU, through
    ``jax.pure_callback``): the blocks of rows are sized to ``memory``; for a mean or a
    sum the forward computes the gradients of ``hidden``, ``weight`` and ``bias`` and the
    backward scales them by the cotangent; with ``reduction="none"`` the backward runs
    the blocks again with each row's cotangent. Works under ``jit``, ``grad`` and
    ``vmap`` (one callback per batch element). Options as in
    :func:`fastxent.linear_cross_entropy`; a mean over nothing is 0 with zero gradients.

    Parameters
    ----------
    hidden : array (..., H), float
    weight : array (V, H), ``hidden``'s dtype
    labels : integer array, ``hidden``'s shape without the last axis
    bias : array (V,) or None
    reduction : {"mean", "sum", "none"}
    ignore_index, class_weight, label_smoothing, z_loss, softcap, memory
        As in :func:`fastxent.linear_cross_entropy`.

    Returns
    -------
    array
        0-d for ``"mean"``/``"sum"``, else ``labels``' shape; ``hidden``'s dtype.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, fastxent.jax as fxj
    >>> hidden, head = jnp.ones((4, 8)), jnp.zeros((10, 8))
    >>> grads = jax.grad(fxj.linear_cross_entropy, argnums=(0, 1))(hidden, head, jnp.array([1, 2, 3, 4]))
    """
    hidden, weight, labels = jnp.asarray(hidden), jnp.asarray(weight), jnp.asarray(labels)
    _check_floating("hidden", hidden)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r} must be one of ['none', 'sum', 'mean']")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels has shape {labels.shape}, expected {hidden.shape[:-1]} (hidden's shape "
                         f"{hidden.shape} without its last axis)")
    bias = None if bias is None else jnp.asarray(bias)
    class_weight = None if class_weight is None else jnp.asarray(class_weight, dtype=jnp.float32)
    options = (reduction, ignore_index, float(label_smoothing), float(z_loss),
               None if softcap is None else float(softcap), memory)
    return _linear_op(hidden, weight, bias, labels, class_weight, options)
