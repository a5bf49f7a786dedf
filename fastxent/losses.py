"""The public functions: validate, dispatch, run the backend, reduce.

Every function here follows the same three steps:

1. ``_validate`` checks each argument (errors name the argument and value);
2. ``_dispatch`` picks the backend from ``backend=``, ``use_backend``,
   ``FASTXENT_BACKEND`` and where the data lives;
3. the backend kernel runs on normalised arrays (class axis last, rows
   C-contiguous; see ``fastxent/backends/__init__.py``), and the result is
   reduced and put back into the caller's shape here.

``backend="numpy"`` runs ``fastxent.reference`` (float64) on the validated
arguments.
"""

import numpy as np

from . import _dispatch, _dtypes
from . import _validate as check
from ._score import Score


# ----------------------------------------------------------------------------
# Shared plumbing
# ----------------------------------------------------------------------------

def _array_module(on_device):
    if on_device:
        import cupy

        return cupy
    return np


def _reference():
    from . import reference

    return reference


def _contiguous(array, xp):
    """``array`` C-contiguous; a 16-bit float CuPy array is copied through its raw bits,
    since CuPy's own float16/bfloat16 copy kernel needs CUDA headers at run time."""
    if xp is not np and array.dtype.itemsize == 2 and not array.flags.c_contiguous:
        return xp.ascontiguousarray(array.view(np.uint16)).view(array.dtype)
    return xp.ascontiguousarray(array)


def _rows(array, ax, xp):
    """``array`` with axis ``ax`` moved last, as C-contiguous rows ``(N, C)``.

    A view when the class axis is already last and the array C-contiguous;
    otherwise one copy (the kernels need unit stride along a row).
    """
    moved = xp.moveaxis(array, ax, -1)
    count = moved.shape[-1]
    rows = int(np.prod(moved.shape[:-1], dtype=np.int64))
    return _contiguous(moved, xp).reshape(rows, count)


def _label_shape(on_device, labels):
    """The CuPy backend reports a bad label found on the device at its N-d position."""
    return {"label_shape": labels.shape} if on_device else {}


def _unrows(rows, shape, ax, xp):
    """Inverse of ``_rows`` for an output of the input's ``shape``."""
    moved_shape = tuple(shape[:ax]) + tuple(shape[ax + 1:]) + (shape[ax],)
    return xp.moveaxis(rows.reshape(moved_shape), -1, ax)


def _elements(array, xp):
    """``array`` as C-contiguous ``(R, K)``, K the size of the last axis (1 for 0-d)."""
    count = array.shape[-1] if array.ndim else 1
    rows = int(np.prod(array.shape[:-1], dtype=np.int64)) if array.ndim else 1
    return _contiguous(array, xp).reshape(rows, count)


def _grad_scale(grad_output, loss_shape, reduction, denominator, xp):
    """The per-element gradient multiplier handed to a fused kernel.

    ``grad_output`` (already validated to broadcast to ``loss_shape``) times
    the reduction factor: 1 for "none"/"sum", ``1/denominator`` for "mean".
    A Python float when uniform, else a C-contiguous array of ``loss_shape``.
    """
    factor = 1.0
    if reduction == "mean":
        factor = 1.0 / float(denominator)
    if grad_output is None:
        return factor
    if grad_output.ndim == 0 or reduction != "none":
        return float(grad_output) * factor
    scale = xp.broadcast_to(grad_output.astype(np.float64) * factor, tuple(loss_shape))
    return xp.ascontiguousarray(scale)


def _mean_is_empty(reduction, denominator):
    return reduction == "mean" and float(denominator) == 0.0


def _kernel_scale(return_grad, grad_output, loss_shape, reduction, denominator, xp, elementwise=False):
    """``(empty, grad_scale)`` for a backend call.

    ``empty``: a mean over a zero denominator, whose gradient is all zeros (no
    fused pass needed); ``grad_scale``: None for the forward-only kernel, else
    the multiplier in the kernel's layout (rows ``(N,)`` or elements ``(R, K)``).
    """
    empty = return_grad and _mean_is_empty(reduction, denominator)
    if not return_grad or empty:
        return empty, None
    scale = _grad_scale(grad_output, loss_shape, reduction, denominator, xp)
    if isinstance(scale, float):
        return empty, scale
    return empty, (_elements(scale, xp) if elementwise else scale.reshape(-1))


def _reduce(loss, reduction, denominator, xp):
    """Reduce the unreduced loss; a reduced loss is a 0-d array of the loss dtype.

    A mean over a zero denominator is 0.0 (never NaN), as DESIGN.md requires.
    """
    if reduction == "none":
        return loss
    total = loss.sum(dtype=np.float64)
    if reduction == "mean":
        denominator = float(denominator)
        total = total / denominator if denominator != 0.0 else total * 0.0
    return xp.asarray(total, dtype=loss.dtype)


def _finish(loss, grad, reduction, denominator, return_grad, xp, zero_grad_like=None):
    loss = _reduce(loss, reduction, denominator, xp)
    if not return_grad:
        return loss
    if zero_grad_like is not None:
        grad = xp.zeros_like(zero_grad_like)
    return loss, grad


def _setup(backend, **named):
    on_device, arrays = check.arrays(**named)
    name = _dispatch.resolve(backend, on_device)
    return on_device, name, arrays


# ----------------------------------------------------------------------------
# Softmax family
# ----------------------------------------------------------------------------

def sparse_softmax_cross_entropy(logits, labels, *, axis=-1, ignore_index=None, class_weight=None,
                                 label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="none",
                                 return_grad=False, grad_output=None, backend=None):
    r"""Softmax cross-entropy with integer class ids (PyTorch's ``cross_entropy``).

    Per row ``i`` with label ``y_i``, class weights ``w`` (ones when None) and
    smoothing ``eps``::

        lse_i = log(sum_c exp(x_ic))
        l_i   = (1-eps) * w[y_i] * (lse_i - x_{i,y_i}) + (eps/C) * sum_c w_c (lse_i - x_ic)
                + z_loss * lse_i**2

    Rows whose label equals ``ignore_index`` give 0 and are not counted. With
    ``softcap`` c the scores are first replaced by ``c * tanh(x / c)``.

    Parameters
    ----------
    logits : array of float16, bfloat16, float32 or float64
        Scores, with the class axis ``axis`` (C >= 2).
    labels : integer array
        Class ids, exactly ``logits.shape`` without the class axis.
    axis : int
        The class axis.
    ignore_index : int or None
        Label value whose rows are skipped (PyTorch uses -100).
    class_weight : array (C,) or None
        Finite weight per class, any sign (as in PyTorch); ``"mean"`` divides by
        ``sum_i w[y_i]`` over the counted rows, and is 0.0 when that sum is 0.
    label_smoothing : float in [0, 1]
    z_loss : float >= 0
        PaLM's auxiliary ``z_loss * lse**2`` per counted row.
    softcap : float > 0 or None
        Gemma 2's logit soft-capping.
    reduction : {"none", "sum", "mean"}
        ``"mean"`` divides by ``sum_i w[y_i]`` over counted rows (PyTorch); 0.0
        when that is 0.
    return_grad : bool
        Also return the gradient with respect to ``logits`` from the same pass.
    grad_output : array or float, optional
        The incoming gradient; broadcasts against the loss.
    backend : {"numba", "numpy", "cupy"} or None

    Returns
    -------
    loss : array
        ``logits.shape`` without the class axis, or 0-d when reduced; float32
        for 16-bit scores, else the scores' dtype.
    grad : array, only with ``return_grad=True``
        ``d sum(grad_output * loss) / d logits``, in the logits' dtype.

    Examples
    --------
    >>> import numpy as np, fastxent as fx
    >>> logits = np.array([[2.0, 0.0, -1.0]], dtype=np.float32)
    >>> fx.sparse_softmax_cross_entropy(logits, np.array([0]))
    array([0.16984604], dtype=float32)
    """
    fn = "sparse_softmax_cross_entropy"
    on_device, name, arr = _setup(backend, logits=logits, labels=labels)
    xp = _array_module(on_device)
    logits = check.scores("logits", arr["logits"])
    ax = check.axis(axis, logits.ndim)
    count = logits.shape[ax]
    check.num_classes(fn, "logits", count, "sigmoid_cross_entropy")
    labels = check.class_ids(fn, arr["labels"], logits.shape, ax, "softmax_cross_entropy")
    ignore_index = check.ignore_index(ignore_index)
    class_weight = check.class_weight(class_weight, count, on_device)
    label_smoothing = check.label_smoothing(label_smoothing)
    z_loss = check.z_loss(z_loss)
    softcap = check.softcap(softcap)
    reduction = check.reduction(reduction)
    return_grad = check.flag("return_grad", return_grad)
    loss_shape = labels.shape
    grad_output = check.grad_output(grad_output, () if reduction != "none" else loss_shape, on_device, xp)
    if not on_device:
        check.label_range(labels, count, ignore_index)

    if name == "numpy":
        return _reference().sparse_softmax_cross_entropy(
            logits, labels, axis=ax, ignore_index=ignore_index, class_weight=class_weight,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, reduction=reduction,
            return_grad=return_grad, grad_output=grad_output)

    flat_labels = labels.reshape(-1)
    denominator = 1.0
    if reduction == "mean":
        counted = flat_labels != ignore_index if ignore_index is not None else None
        if class_weight is None:
            denominator = flat_labels.size if counted is None else counted.sum()
        else:
            weights = xp.asarray(class_weight)
            picked = weights[xp.clip(flat_labels, 0, count - 1)]
            denominator = picked.sum() if counted is None else (picked * counted).sum()
    kernels = _dispatch.backend_module(name)
    empty, scale = _kernel_scale(return_grad, grad_output, loss_shape, reduction, denominator, xp)
    rows = _rows(logits, ax, xp)
    loss, grad = kernels.sparse_softmax_cross_entropy(
        rows, flat_labels, ignore_index, class_weight, label_smoothing, z_loss, softcap, scale,
        **_label_shape(on_device, labels))
    if grad is not None:
        grad = _unrows(grad, logits.shape, ax, xp)
    return _finish(loss.reshape(loss_shape), grad, reduction, denominator, return_grad, xp,
                   zero_grad_like=logits if empty else None)


def softmax_cross_entropy(logits, labels, *, axis=-1, label_smoothing=0.0, softcap=None,
                          reduction="none", return_grad=False, grad_output=None, backend=None):
    r"""Softmax cross-entropy with a distribution over classes (soft labels).

    Per row: ``loss = sum(y) * lse(x) - sum_c y_c x_c``, that is
    ``-sum_c y_c log p_c`` (TensorFlow's value); the gradient is
    ``softmax(x) * sum(y) - y`` (PyTorch's and optax's). Labels need not sum to
    1; terms with ``y_c == 0`` contribute 0 even where ``x_c = -inf``. With
    ``label_smoothing`` eps the labels become ``(1-eps) y + eps/C``; with
    ``softcap`` c the scores become ``c tanh(x/c)``. ``"mean"`` divides by the
    number of rows.

    Labels must be float (or bool) with exactly the logits' shape; integer
    class ids belong to :func:`sparse_softmax_cross_entropy`.

    Examples
    --------
    >>> import numpy as np, fastxent as fx
    >>> logits = np.array([[2.0, 0.0, -1.0]])
    >>> fx.softmax_cross_entropy(logits, np.array([[0.5, 0.5, 0.0]]))
    array([1.16984602])
    """
    fn = "softmax_cross_entropy"
    on_device, name, arr = _setup(backend, logits=logits, labels=labels)
    xp = _array_module(on_device)
    logits = check.scores("logits", arr["logits"])
    ax = check.axis(axis, logits.ndim)
    count = logits.shape[ax]
    check.num_classes(fn, "logits", count, "sigmoid_cross_entropy")
    labels = check.dense_labels(fn, "labels", arr["labels"], logits.shape, "sparse_softmax_cross_entropy")
    label_smoothing = check.label_smoothing(label_smoothing)
    softcap = check.softcap(softcap)
    reduction = check.reduction(reduction)
    return_grad = check.flag("return_grad", return_grad)
    loss_shape = tuple(logits.shape[:ax]) + tuple(logits.shape[ax + 1:])
    grad_output = check.grad_output(grad_output, () if reduction != "none" else loss_shape, on_device, xp)

    if name == "numpy":
        return _reference().softmax_cross_entropy(
            logits, labels, axis=ax, label_smoothing=label_smoothing, softcap=softcap,
            reduction=reduction, return_grad=return_grad, grad_output=grad_output)

    denominator = int(np.prod(loss_shape, dtype=np.int64))
    empty, scale = _kernel_scale(return_grad, grad_output, loss_shape, reduction, denominator, xp)
    kernels = _dispatch.backend_module(name)
    loss, grad = kernels.softmax_cross_entropy(
        _rows(logits, ax, xp), _rows(labels, ax, xp), label_smoothing, softcap, scale)
    if grad is not None:
        grad = _unrows(grad, logits.shape, ax, xp)
    return _finish(loss.reshape(loss_shape), grad, reduction, denominator, return_grad, xp,
                   zero_grad_like=logits if empty else None)


# ----------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------

def _building_block(fn, x, axis, backend):
    on_device, name, arr = _setup(backend, x=x)
    xp = _array_module(on_device)
    x = check.scores("x", arr["x"])
    ax = check.axis(axis, x.ndim)
    check.num_classes(fn, "x", x.shape[ax])
    if name == "numpy":
        return getattr(_reference(), fn)(x, axis=ax)
    out = getattr(_dispatch.backend_module(name), fn)(_rows(x, ax, xp))
    if out.ndim == 1:
        return out.reshape(tuple(x.shape[:ax]) + tuple(x.shape[ax + 1:]))
    return _unrows(out, x.shape, ax, xp)


def log_softmax(x, *, axis=-1, backend=None):
    """``x - logsumexp(x)`` along ``axis``, in ``x``'s dtype (C == 1 gives 0).

    Examples
    --------
    >>> import numpy as np, fastxent as fx
    >>> fx.log_softmax(np.array([0.0, 0.0]))
    array([-0.69314718, -0.69314718])
    """
    return _building_block("log_softmax", x, axis, backend)


def softmax(x, *, axis=-1, backend=None):
    """``exp(x - logsumexp(x))`` along ``axis``, in ``x``'s dtype.

    Examples
    --------
    >>> import numpy as np, fastxent as fx
    >>> fx.softmax(np.array([0.0, 0.0]))
    array([0.5, 0.5])
    """
    return _building_block("softmax", x, axis, backend)


def logsumexp(x, *, axis=-1, backend=None):
    """``log(sum(exp(x)))`` along ``axis``, computed stably (max-shifted).

    float32 for 16-bit input, else ``x``'s dtype; the shape drops ``axis``.

    Examples
    --------
    >>> import numpy as np, fastxent as fx
    >>> fx.logsumexp(np.array([1000.0, 1000.0]))
    array(1000.69314718)
    """
    return _building_block("logsumexp", x, axis, backend)


# ----------------------------------------------------------------------------
# Sigmoid and probability families
# ----------------------------------------------------------------------------

def _pos_weight_for_kernel(pos_weight, shape, xp):
    """``None``/float as is; a per-last-axis vector as ``(K,)``; anything else as full ``(R, K)``."""
    if pos_weight is None or isinstance(pos_weight, float):
        return pos_weight
    count = shape[-1] if len(shape) else 1
    squeezed = pos_weight.reshape(pos_weight.shape[-1:]) if (
        pos_weight.ndim >= 1 and pos_weight.size == pos_weight.shape[-1]) else None
    if squeezed is not None and squeezed.shape[0] in (1, count):
        vector = np.ascontiguousarray(np.broadcast_to(squeezed, (count,)), dtype=np.float64)
        return xp.asarray(vector)
    full = np.ascontiguousarray(np.broadcast_to(pos_weight, tuple(shape)), dtype=np.float64)
    return _elements(xp.asarray(full), xp)


def _elementwise(fn, first_name, first, labels, options, reduction, return_grad, grad_output, backend,
                 extra_check=None):
    on_device, name, arr = _setup(backend, **{first_name: first, "labels": labels})
    xp = _array_module(on_device)
    first = check.scores(first_name, arr[first_name], min_ndim=0)
    labels = check.dense_labels(fn, "labels", arr["labels"], first.shape)
    if extra_check is not None:
        options = extra_check(options, first.shape, on_device)
    reduction = check.reduction(reduction)
    return_grad = check.flag("return_grad", return_grad)
    grad_output = check.grad_output(grad_output, () if reduction != "none" else first.shape, on_device, xp)
    if name == "numpy":
        return getattr(_reference(), fn)(first, labels, **options, reduction=reduction,
                                         return_grad=return_grad, grad_output=grad_output)
    denominator = first.size
    empty, scale = _kernel_scale(return_grad, grad_output, first.shape, reduction, denominator, xp,
                                 elementwise=True)
    kernel_options = dict(options)
    if "pos_weight" in kernel_options:
        kernel_options["pos_weight"] = _pos_weight_for_kernel(kernel_options["pos_weight"], first.shape, xp)
    loss, grad = getattr(_dispatch.backend_module(name), fn)(
        _elements(first, xp), _elements(labels, xp), *kernel_options.values(), scale)
    if grad is not None:
        grad = grad.reshape(first.shape)
    return _finish(loss.reshape(first.shape), grad, reduction, denominator, return_grad, xp,
                   zero_grad_like=first if empty else None)


def sigmoid_cross_entropy(logits, labels, *, pos_weight=None, label_smoothing=0.0, reduction="none",
                          return_grad=False, grad_output=None, backend=None):
    r"""Independent binary / multi-label cross-entropy on scores (sigmoid family).

    Elementwise, stable for any finite ``x``::

        loss = max(x, 0) - x z + log1p(exp(-|x|))

    With ``pos_weight`` q (TensorFlow's ``weighted_cross_entropy_with_logits``,
    PyTorch's ``pos_weight``)::

        loss = (1 - z) x + (1 + (q - 1) z) (log1p(exp(-|x|)) + max(-x, 0))

    ``label_smoothing`` eps maps ``z`` to ``(1-eps) z + eps/2`` (Keras).
    ``"mean"`` divides by the number of elements.

    Examples
    --------
    >>> import numpy as np, fastxent as fx
    >>> fx.sigmoid_cross_entropy(np.array([0.0, 2.0]), np.array([1.0, 0.0]))
    array([0.69314718, 2.12692801])
    """
    def options_check(options, shape, on_device):
        return {"pos_weight": check.pos_weight(options["pos_weight"], shape, on_device),
                "label_smoothing": check.label_smoothing(options["label_smoothing"])}

    return _elementwise("sigmoid_cross_entropy", "logits", logits, labels,
                        {"pos_weight": pos_weight, "label_smoothing": label_smoothing},
                        reduction, return_grad, grad_output, backend, options_check)


def binary_cross_entropy(probs, labels, *, epsilon=1e-7, label_smoothing=0.0, reduction="none",
                         return_grad=False, grad_output=None, backend=None):
    r"""Binary cross-entropy on probabilities (Keras ``from_logits=False``).

    ``p`` is clipped to ``[epsilon, 1 - epsilon]`` (both bounds rounded to the
    input dtype, as Keras computes them), then
    ``loss = -(z log p + (1 - z) log(1 - p))``; a term whose weight is 0
    contributes 0. The gradient with respect to ``probs`` is that of the clipped
    formula (0 where clipped). Prefer :func:`sigmoid_cross_entropy` on scores:
    it is exact where probabilities saturate.

    Examples
    --------
    >>> import numpy as np, fastxent as fx
    >>> fx.binary_cross_entropy(np.array([0.5, 0.9]), np.array([1.0, 1.0]))
    array([0.69314718, 0.10536052])
    """
    def options_check(options, shape, on_device):
        return {"epsilon": check.epsilon(options["epsilon"]),
                "label_smoothing": check.label_smoothing(options["label_smoothing"])}

    return _elementwise("binary_cross_entropy", "probs", probs, labels,
                        {"epsilon": epsilon, "label_smoothing": label_smoothing},
                        reduction, return_grad, grad_output, backend, options_check)


def categorical_cross_entropy(probs, labels, *, axis=-1, epsilon=1e-7, label_smoothing=0.0,
                              reduction="none", return_grad=False, grad_output=None, backend=None):
    r"""Cross-entropy on class probabilities with a distribution as labels (Keras).

    Per row: ``q = probs / sum(probs)``, clipped to ``[epsilon, 1 - epsilon]``,
    then ``loss = -sum_c y_c log q_c``. ``label_smoothing`` eps maps ``y`` to
    ``(1-eps) y + eps/C``. ``"mean"`` divides by the number of rows.

    Examples
    --------
    >>> import numpy as np, fastxent as fx
    >>> fx.categorical_cross_entropy(np.array([[0.5, 0.5]]), np.array([[1.0, 0.0]]))
    array([0.69314718])
    """
    fn = "categorical_cross_entropy"
    on_device, name, arr = _setup(backend, probs=probs, labels=labels)
    xp = _array_module(on_device)
    probs = check.scores("probs", arr["probs"])
    ax = check.axis(axis, probs.ndim)
    count = probs.shape[ax]
    check.num_classes(fn, "probs", count, "binary_cross_entropy")
    labels = check.dense_labels(fn, "labels", arr["labels"], probs.shape, "sparse_categorical_cross_entropy")
    epsilon = check.epsilon(epsilon)
    label_smoothing = check.label_smoothing(label_smoothing)
    reduction = check.reduction(reduction)
    return_grad = check.flag("return_grad", return_grad)
    loss_shape = tuple(probs.shape[:ax]) + tuple(probs.shape[ax + 1:])
    grad_output = check.grad_output(grad_output, () if reduction != "none" else loss_shape, on_device, xp)
    if name == "numpy":
        return _reference().categorical_cross_entropy(
            probs, labels, axis=ax, epsilon=epsilon, label_smoothing=label_smoothing,
            reduction=reduction, return_grad=return_grad, grad_output=grad_output)
    denominator = int(np.prod(loss_shape, dtype=np.int64))
    empty, scale = _kernel_scale(return_grad, grad_output, loss_shape, reduction, denominator, xp)
    loss, grad = _dispatch.backend_module(name).categorical_cross_entropy(
        _rows(probs, ax, xp), _rows(labels, ax, xp), epsilon, label_smoothing, scale)
    if grad is not None:
        grad = _unrows(grad, probs.shape, ax, xp)
    return _finish(loss.reshape(loss_shape), grad, reduction, denominator, return_grad, xp,
                   zero_grad_like=probs if empty else None)


def sparse_categorical_cross_entropy(probs, labels, *, axis=-1, epsilon=1e-7, ignore_index=None,
                                     reduction="none", return_grad=False, grad_output=None, backend=None):
    r"""Cross-entropy on class probabilities with integer class ids (Keras).

    Per row: ``q = probs / sum(probs)``, clipped to ``[epsilon, 1 - epsilon]``,
    ``loss = -log q_y``. Rows labelled ``ignore_index`` give 0 and are not
    counted; ``"mean"`` divides by the number of counted rows.

    Examples
    --------
    >>> import numpy as np, fastxent as fx
    >>> fx.sparse_categorical_cross_entropy(np.array([[0.25, 0.75]]), np.array([1]))
    array([0.28768207])
    """
    fn = "sparse_categorical_cross_entropy"
    on_device, name, arr = _setup(backend, probs=probs, labels=labels)
    xp = _array_module(on_device)
    probs = check.scores("probs", arr["probs"])
    ax = check.axis(axis, probs.ndim)
    count = probs.shape[ax]
    check.num_classes(fn, "probs", count, "binary_cross_entropy")
    labels = check.class_ids(fn, arr["labels"], probs.shape, ax, "categorical_cross_entropy")
    epsilon = check.epsilon(epsilon)
    ignore_index = check.ignore_index(ignore_index)
    reduction = check.reduction(reduction)
    return_grad = check.flag("return_grad", return_grad)
    loss_shape = labels.shape
    grad_output = check.grad_output(grad_output, () if reduction != "none" else loss_shape, on_device, xp)
    if not on_device:
        check.label_range(labels, count, ignore_index)
    if name == "numpy":
        return _reference().sparse_categorical_cross_entropy(
            probs, labels, axis=ax, epsilon=epsilon, ignore_index=ignore_index,
            reduction=reduction, return_grad=return_grad, grad_output=grad_output)
    flat_labels = labels.reshape(-1)
    denominator = flat_labels.size
    if reduction == "mean" and ignore_index is not None:
        denominator = (flat_labels != ignore_index).sum()
    empty, scale = _kernel_scale(return_grad, grad_output, loss_shape, reduction, denominator, xp)
    loss, grad = _dispatch.backend_module(name).sparse_categorical_cross_entropy(
        _rows(probs, ax, xp), flat_labels, epsilon, ignore_index, scale, **_label_shape(on_device, labels))
    if grad is not None:
        grad = _unrows(grad, probs.shape, ax, xp)
    return _finish(loss.reshape(loss_shape), grad, reduction, denominator, return_grad, xp,
                   zero_grad_like=probs if empty else None)


# ----------------------------------------------------------------------------
# Second order
# ----------------------------------------------------------------------------

def softmax_cross_entropy_hvp(logits, v, *, axis=-1, backend=None):
    r"""Hessian-vector product of the softmax cross-entropy, per row, never forming H.

    ``H = diag(p) - p p^T`` with ``p = softmax(x)`` (the Hessian for labels
    summing to 1; it does not depend on the labels), so
    ``H v = p * v - p * (p . v)``. Returned in the logits' dtype and shape.

    Examples
    --------
    >>> import numpy as np, fastxent as fx
    >>> fx.softmax_cross_entropy_hvp(np.zeros((1, 2)), np.array([[1.0, 0.0]]))
    array([[ 0.25, -0.25]])
    """
    on_device, name, arr = _setup(backend, logits=logits, v=v)
    xp = _array_module(on_device)
    logits = check.scores("logits", arr["logits"])
    ax = check.axis(axis, logits.ndim)
    check.num_classes("softmax_cross_entropy_hvp", "logits", logits.shape[ax])
    vector = arr["v"]
    if not _dtypes.is_real_float(vector.dtype):
        raise TypeError(f"v must be a float array, got dtype {vector.dtype}")
    if vector.shape != logits.shape:
        raise ValueError(f"v has shape {vector.shape}, expected the logits' shape {logits.shape}")
    if name == "numpy":
        return _reference().softmax_cross_entropy_hvp(logits, vector, axis=ax)
    out = _dispatch.backend_module(name).softmax_cross_entropy_hvp(_rows(logits, ax, xp), _rows(vector, ax, xp))
    return _unrows(out, logits.shape, ax, xp)


def sigmoid_cross_entropy_hessian_diag(logits, labels, *, pos_weight=None, backend=None):
    r"""Elementwise second derivative of :func:`sigmoid_cross_entropy`.

    ``(1 + (q - 1) z) * s * (1 - s)`` with ``s = sigmoid(x)``, q = pos_weight
    (1 when None); in the logits' dtype. The Hessian is diagonal, so this is
    all of it.

    Examples
    --------
    >>> import numpy as np, fastxent as fx
    >>> fx.sigmoid_cross_entropy_hessian_diag(np.array([0.0]), np.array([1.0]))
    array([0.25])
    """
    fn = "sigmoid_cross_entropy_hessian_diag"
    on_device, name, arr = _setup(backend, logits=logits, labels=labels)
    xp = _array_module(on_device)
    logits = check.scores("logits", arr["logits"], min_ndim=0)
    labels = check.dense_labels(fn, "labels", arr["labels"], logits.shape)
    pos_weight = check.pos_weight(pos_weight, logits.shape, on_device)
    if name == "numpy":
        return _reference().sigmoid_cross_entropy_hessian_diag(logits, labels, pos_weight=pos_weight)
    out = _dispatch.backend_module(name).sigmoid_cross_entropy_hessian_diag(
        _elements(logits, xp), _elements(labels, xp), _pos_weight_for_kernel(pos_weight, logits.shape, xp))
    return out.reshape(logits.shape)


# ----------------------------------------------------------------------------
# One-pass scoring
# ----------------------------------------------------------------------------

def score(logits, labels, *, axis=-1, ignore_index=None, backend=None):
    r"""Everything an evaluation job wants from a batch, in one read of the logits.

    Returns a :class:`fastxent.Score` of per-row arrays (the logits' shape
    without the class axis):

    * ``loss``: ``lse - x_y``, the unreduced sparse softmax cross-entropy;
    * ``lse``: ``log(sum_c exp(x_c))``;
    * ``target_logprob``: ``x_y - lse``;
    * ``entropy``: ``-sum_c p_c log p_c`` of the predicted distribution;
    * ``argmax``: int64, the first index of the largest score;
    * ``correct``: bool, ``argmax == y``.

    An ignored row (label == ``ignore_index``) has loss 0, target_logprob NaN
    and correct False; its lse, entropy and argmax are computed as usual. Count
    the rows that matter with ``labels != ignore_index``.

    Examples
    --------
    >>> import numpy as np, fastxent as fx
    >>> s = fx.score(np.array([[2.0, 0.0]]), np.array([0]))
    >>> bool(s.correct[0]), int(s.argmax[0])
    (True, 0)
    """
    fn = "score"
    on_device, name, arr = _setup(backend, logits=logits, labels=labels)
    xp = _array_module(on_device)
    logits = check.scores("logits", arr["logits"])
    ax = check.axis(axis, logits.ndim)
    count = logits.shape[ax]
    check.num_classes(fn, "logits", count)
    labels = check.class_ids(fn, arr["labels"], logits.shape, ax, "softmax_cross_entropy")
    ignore_index = check.ignore_index(ignore_index)
    if not on_device:
        check.label_range(labels, count, ignore_index)
    if name == "numpy":
        return _reference().score(logits, labels, axis=ax, ignore_index=ignore_index)
    fields = _dispatch.backend_module(name).score(_rows(logits, ax, xp), labels.reshape(-1), ignore_index,
                                                  **_label_shape(on_device, labels))
    return Score(*(field.reshape(labels.shape) for field in fields))
