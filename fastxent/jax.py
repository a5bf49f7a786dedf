"""JAX adapter: optax's classification losses computed by fastxent's fused kernels.

Same signatures and values as optax (``optax.softmax_cross_entropy``,
``optax.softmax_cross_entropy_with_integer_labels``,
``optax.sigmoid_binary_cross_entropy``)::

    import fastxent.jax as fxj
    loss = fxj.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

How a call runs
---------------
Each loss is a ``jax.custom_vjp`` around ``jax.pure_callback``: JAX hands the
(CPU) buffers to fastxent's Numba kernels on the host and gets the results
back. The functions work under ``jit``, ``grad``, ``value_and_grad`` and
``vmap``:

* ``vmap_method="broadcast_all"``: the kernels work row by row over any
  leading dimensions, so a vmapped call is one callback over the batched
  arrays (every argument tiled to the batch), not a loop.
* The class axis (or axes) is moved last and flattened in JAX before the
  callback; optax's ``where`` is applied in JAX around the fused op (masked
  scores become ``-inf``, which fastxent treats as masking), so the kernels
  see plain rows.
* Under differentiation the forward callback runs the fused pass
  (``return_grad=True``) and keeps the gradient as the residual (logits-sized,
  in the logits' dtype); the backward is one multiply by the incoming
  cotangent, fused by XLA. Without differentiation the forward-only kernel runs.
* Host calls are serialised (``fastxent._adapters.HOST_LOCK``): XLA may run
  independent callbacks at the same time, and each kernel uses every core.
* Soft labels and sigmoid labels get optax's label cotangents too
  (``-log_softmax(logits)`` and ``-logits``); under ``jit`` XLA drops that work
  (and its callback) when nobody asks for it.

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
# Fused ops (class axis last) with their VJPs
# ----------------------------------------------------------------------------

@jax.custom_vjp
def _sparse_op(logits, labels):
    return _callback(_host_sparse, _struct(logits.shape[:-1], logits.dtype), logits, labels,
                     loss_dtype=logits.dtype, with_grad=False)


def _sparse_fwd(logits, labels):
    loss, grad = _callback(_host_sparse, (_struct(logits.shape[:-1], logits.dtype), _struct(logits.shape, logits.dtype)),
                           logits, labels, loss_dtype=logits.dtype, with_grad=True)
    return loss, grad


def _sparse_bwd(grad, cotangent):
    return (grad * cotangent[..., None].astype(grad.dtype), None)


_sparse_op.defvjp(_sparse_fwd, _sparse_bwd)


@jax.custom_vjp
def _soft_op(logits, labels):
    loss_dtype = jnp.result_type(logits.dtype, labels.dtype)
    return _callback(_host_soft, _struct(logits.shape[:-1], loss_dtype), logits, labels,
                     loss_dtype=loss_dtype, with_grad=False)


def _soft_fwd(logits, labels):
    loss_dtype = jnp.result_type(logits.dtype, labels.dtype)
    loss, grad = _callback(_host_soft, (_struct(logits.shape[:-1], loss_dtype), _struct(logits.shape, logits.dtype)),
                           logits, labels, loss_dtype=loss_dtype, with_grad=True)
    return loss, (grad, logits, jnp.zeros((), labels.dtype))


def _soft_bwd(residuals, cotangent):
    grad, logits, labels_like = residuals
    labels_dtype = labels_like.dtype
    cotangent = cotangent[..., None]
    log_probs = _callback(_host_log_softmax, _struct(logits.shape, labels_dtype), logits, out_dtype=labels_dtype)
    return grad * cotangent.astype(grad.dtype), (-cotangent * log_probs).astype(labels_dtype)


_soft_op.defvjp(_soft_fwd, _soft_bwd)


@jax.custom_vjp
def _sigmoid_op(logits, labels):
    return _callback(_host_sigmoid, _struct(logits.shape, logits.dtype), logits, labels, with_grad=False)


def _sigmoid_fwd(logits, labels):
    loss, grad = _callback(_host_sigmoid, (_struct(logits.shape, logits.dtype), _struct(logits.shape, logits.dtype)),
                           logits, labels, with_grad=True)
    return loss, (grad, logits)


def _sigmoid_bwd(residuals, cotangent):
    grad, logits = residuals
    return grad * cotangent, -cotangent * logits


_sigmoid_op.defvjp(_sigmoid_fwd, _sigmoid_bwd)


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
