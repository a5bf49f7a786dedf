"""The public functions: validate, dispatch, run the backend, reduce.

Every function here follows the same three steps:

1. ``_validate`` checks each argument (errors name the argument and value), in
   :func:`_prepare` for what all functions share;
2. ``_dispatch`` picks the backend from ``backend=``, ``use_backend``,
   ``FASTXENT_BACKEND`` and where the data lives;
3. :func:`_run` hands the backend normalised arrays (class axis last, rows
   C-contiguous; see ``fastxent/backends/__init__.py``), and the result is
   reduced (``_reductions``) and put back into the caller's shape.

``backend="numpy"`` runs ``fastxent.reference`` (float64) on the validated
arguments.
"""

import contextlib
from typing import Any, NamedTuple

import numpy as np

from . import _dispatch, _dtypes, _reductions
from . import _validate as check
from ._score import Score

# ----------------------------------------------------------------------------
# Shared plumbing
# ----------------------------------------------------------------------------

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
    rows = int(np.prod(moved.shape[:-1], dtype=np.int64))
    return _contiguous(moved, xp).reshape(rows, moved.shape[-1])


def _unrows(rows, shape, ax, xp):
    """Inverse of ``_rows`` for an output of the input's ``shape``."""
    moved_shape = tuple(shape[:ax]) + tuple(shape[ax + 1:]) + (shape[ax],)
    return xp.moveaxis(rows.reshape(moved_shape), -1, ax)


def _elements(array, xp):
    """``array`` as C-contiguous ``(R, K)``, K the size of the last axis (1 for 0-d)."""
    count = array.shape[-1] if array.ndim else 1
    rows = int(np.prod(array.shape[:-1], dtype=np.int64)) if array.ndim else 1
    return _contiguous(array, xp).reshape(rows, count)


class _Call(NamedTuple):
    """A validated call: where it runs and its normalised arguments."""

    backend: str             # the resolved backend name
    on_device: bool          # CUDA arrays (the backend is then "cupy")
    xp: Any                  # numpy or cupy
    first: Any               # logits / probs / x
    labels: Any              # the second array (labels, or v); None for the building blocks
    axis: Any                # the class axis, None for elementwise functions
    loss_shape: tuple
    reduction: str
    return_grad: bool
    grad_output: Any
    inplace: bool            # the gradient is written over ``first`` (the caller's buffer)


def _prepare(fn, backend, first_name, first, labels, *, second_name="labels", axis=None, labels_kind=None,
             single_class_hint=None, other_labels=None, reduction="none", return_grad=False, grad_output=None,
             ignore_index=None, inplace=False):
    """Validate what every public function shares; returns ``(_Call, ignore_index)``.

    ``axis`` None: an elementwise function (labels, when given, have the scores' shape);
    else a row function over class axis ``axis`` with ``labels_kind`` "ids" (sparse class
    ids, range-checked on the host here), "dense" (distributions) or None (no labels).
    ``single_class_hint`` names the binary alternative that C == 1 is refused for;
    ``other_labels`` the function taking the other kind of labels (error hints).
    """
    original = first
    named = {first_name: first} if labels is None else {first_name: first, second_name: labels}
    on_device, arrays = check.arrays(**named)
    name = _dispatch.resolve(backend, on_device)
    xp = _dispatch.array_module(on_device)
    first = check.scores(first_name, arrays[first_name], min_ndim=0 if axis is None else 1)
    labels = arrays.get(second_name)
    if axis is None:
        loss_shape = first.shape
        if labels is not None:
            labels = check.dense_labels(fn, "labels", labels, first.shape)
    else:
        axis = check.axis(axis, first.ndim)
        count = first.shape[axis]
        check.num_classes(fn, first_name, count, single_class_hint)
        loss_shape = tuple(first.shape[:axis]) + tuple(first.shape[axis + 1:])
        if labels_kind == "ids":
            labels = check.class_ids(fn, labels, first.shape, axis, other_labels)
            ignore_index = check.ignore_index(ignore_index)
            if not on_device:
                check.label_range(labels, count, ignore_index)
        elif labels_kind == "dense":
            labels = check.dense_labels(fn, "labels", labels, first.shape, other_labels)
    reduction = check.reduction(reduction)
    return_grad = check.flag("return_grad", return_grad)
    grad_output = check.grad_output(grad_output, () if reduction != "none" else loss_shape, on_device, xp)
    inplace = check.inplace(inplace, return_grad, first_name, original, first, axis, labels, xp)
    return (_Call(name, on_device, xp, first, labels, axis, loss_shape, reduction, return_grad, grad_output,
                  inplace), ignore_index)


@contextlib.contextmanager
def _device_labels(call, ignore_index):
    """Turn a device backend's :class:`~fastxent.backends.BadLabels` into the host path's ValueError."""
    # elementwise calls (axis None) have no class ids, so no device backend flags them
    count = None if call.axis is None else call.first.shape[call.axis]
    with check.device_labels(call.labels, count, ignore_index):
        yield


def _run(call, fn, denominator, options, reference_options, ignore_index=None):
    """Run ``fn`` on the backend of ``call`` (or the reference) and finish the result.

    ``options``: the backend arguments after the labels, in the contract's order
    (``fastxent/backends/__init__.py``); ``reference_options``: the reference's keywords.
    A reduced loss is asked of the backend as a sum (``total=True``), so it needs no
    unreduced buffer; ``inplace`` reaches the backend only when set.
    """
    xp = call.xp
    if call.backend == "numpy":
        axis = {} if call.axis is None else {"axis": call.axis}
        result = getattr(_reference(), fn)(call.first, call.labels, **axis, **reference_options,
                                           reduction=call.reduction, return_grad=call.return_grad,
                                           grad_output=call.grad_output)
        if call.inplace:
            loss, grad = result
            call.first[...] = grad
            return loss, call.first
        return result
    empty = call.return_grad and _reductions.empty_mean(call.reduction, denominator)
    scale = None
    if call.return_grad and not empty:
        scale = _reductions.grad_scale(call.grad_output, call.loss_shape, call.reduction, denominator, xp)
        if not isinstance(scale, float):
            scale = _elements(scale, xp) if call.axis is None else scale.reshape(-1)
    if call.axis is None:
        first, labels = _elements(call.first, xp), _elements(call.labels, xp)
    else:
        first = _rows(call.first, call.axis, xp)
        sparse = call.labels.ndim < call.first.ndim
        labels = call.labels.reshape(-1) if sparse else _rows(call.labels, call.axis, xp)
    reduced = call.reduction != "none"
    keywords = {"total": reduced, **({"inplace": True} if call.inplace else {})}
    with _device_labels(call, ignore_index):
        loss, grad = getattr(_dispatch.backend_module(call.backend), fn)(first, labels, *options, scale, **keywords)
    if reduced:
        loss = _reductions.from_total(loss, call.reduction, denominator, _dtypes.loss_dtype(call.first.dtype), xp)
    else:
        loss = loss.reshape(call.loss_shape)
    if not call.return_grad:
        return loss
    if empty and call.inplace:
        call.first[...] = 0
        grad = call.first
    elif empty:
        grad = xp.zeros_like(call.first)
    elif call.axis is None:
        grad = grad.reshape(call.first.shape)
    else:
        grad = _unrows(grad, call.first.shape, call.axis, xp)
    return loss, grad


def _row_count(call):
    """The denominator of a mean over rows (the loss's size)."""
    return int(np.prod(call.loss_shape, dtype=np.int64))


# ----------------------------------------------------------------------------
# Softmax family
# ----------------------------------------------------------------------------

def sparse_softmax_cross_entropy(logits, labels, *, axis=-1, ignore_index=None, class_weight=None,
                                 label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="none",
                                 return_grad=False, grad_output=None, inplace=False, backend=None):
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
    inplace : bool
        With ``return_grad=True``: write the gradient over ``logits`` and return
        it as ``grad``, a view of the same buffer. The fused pass then allocates
        nothing of the logits' size (what Liger-Kernel and QuACK do in training,
        where the logits are dead after the backward pass), and skips the page
        faults of a fresh gradient array; the price is the logits themselves.
        ``logits`` must be a writable array, C-contiguous along the class axis,
        not sharing memory with ``labels``; else a ``ValueError``. Default
        False: inputs are never modified.
    backend : {"numba", "numpy", "cupy"} or None

    Returns
    -------
    loss : array
        ``logits.shape`` without the class axis, or 0-d when reduced; float32
        for 16-bit scores, else the scores' dtype.
    grad : array, only with ``return_grad=True``
        ``d sum(grad_output * loss) / d logits``, in the logits' dtype (the
        logits' own buffer with ``inplace=True``).

    Examples
    --------
    >>> import numpy as np, fastxent as fx
    >>> logits = np.array([[2.0, 0.0, -1.0]], dtype=np.float32)
    >>> fx.sparse_softmax_cross_entropy(logits, np.array([0]))
    array([0.16984604], dtype=float32)
    >>> loss, grad = fx.sparse_softmax_cross_entropy(logits, np.array([0]), return_grad=True, inplace=True)
    >>> bool(np.shares_memory(grad, logits))
    True
    """
    call, ignore_index = _prepare(
        "sparse_softmax_cross_entropy", backend, "logits", logits, labels, axis=axis, labels_kind="ids",
        single_class_hint="sigmoid_cross_entropy", other_labels="softmax_cross_entropy", reduction=reduction,
        return_grad=return_grad, grad_output=grad_output, ignore_index=ignore_index, inplace=inplace)
    class_weight = check.class_weight(class_weight, call.first.shape[call.axis], call.on_device)
    label_smoothing = check.label_smoothing(label_smoothing)
    z_loss = check.z_loss(z_loss)
    softcap = check.softcap(softcap)
    denominator = 1.0
    if call.reduction == "mean" and call.backend != "numpy":
        denominator = _reductions.mean_denominator(call.labels.reshape(-1), ignore_index, class_weight, call.xp)
    share = _dtypes.kernel_smoothing(label_smoothing, call.first.shape[call.axis], call.first.dtype)
    return _run(call, "sparse_softmax_cross_entropy", denominator,
                (ignore_index, class_weight, share, z_loss, softcap),
                {"ignore_index": ignore_index, "class_weight": class_weight, "label_smoothing": label_smoothing,
                 "z_loss": z_loss, "softcap": softcap}, ignore_index)


def softmax_cross_entropy(logits, labels, *, axis=-1, label_smoothing=0.0, softcap=None,
                          reduction="none", return_grad=False, grad_output=None, inplace=False, backend=None):
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

    ``inplace=True`` (with ``return_grad=True``) writes the gradient over
    ``logits`` and returns it as ``grad``, a view of that buffer: nothing of
    ``logits``'s size is allocated, at the price of ``logits`` itself (see
    :func:`sparse_softmax_cross_entropy`); ``logits`` must be writable and
    C-contiguous along the class axis, else a ``ValueError``. By default inputs are never modified.

    Examples
    --------
    >>> import numpy as np, fastxent as fx
    >>> logits = np.array([[2.0, 0.0, -1.0]])
    >>> fx.softmax_cross_entropy(logits, np.array([[0.5, 0.5, 0.0]]))
    array([1.16984602])
    """
    call, _ = _prepare(
        "softmax_cross_entropy", backend, "logits", logits, labels, axis=axis, labels_kind="dense",
        single_class_hint="sigmoid_cross_entropy", other_labels="sparse_softmax_cross_entropy",
        reduction=reduction, return_grad=return_grad, grad_output=grad_output, inplace=inplace)
    label_smoothing = check.label_smoothing(label_smoothing)
    softcap = check.softcap(softcap)
    share = _dtypes.kernel_smoothing(label_smoothing, call.first.shape[call.axis], call.first.dtype)
    return _run(call, "softmax_cross_entropy", _row_count(call), (share, softcap),
                {"label_smoothing": label_smoothing, "softcap": softcap})


# ----------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------

def _building_block(fn, x, axis, backend):
    call, _ = _prepare(fn, backend, "x", x, None, axis=axis)
    if call.backend == "numpy":
        return getattr(_reference(), fn)(call.first, axis=call.axis)
    out = getattr(_dispatch.backend_module(call.backend), fn)(_rows(call.first, call.axis, call.xp))
    if out.ndim == 1:
        return out.reshape(call.loss_shape)
    return _unrows(out, call.first.shape, call.axis, call.xp)


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


def sigmoid_cross_entropy(logits, labels, *, pos_weight=None, label_smoothing=0.0, reduction="none",
                          return_grad=False, grad_output=None, inplace=False, backend=None):
    r"""Independent binary / multi-label cross-entropy on scores (sigmoid family).

    Elementwise, stable for any finite ``x``::

        loss = max(x, 0) - x z + log1p(exp(-|x|))

    With ``pos_weight`` q (TensorFlow's ``weighted_cross_entropy_with_logits``,
    PyTorch's ``pos_weight``)::

        loss = (1 - z) x + (1 + (q - 1) z) (log1p(exp(-|x|)) + max(-x, 0))

    ``label_smoothing`` eps maps ``z`` to ``(1-eps) z + eps/2`` (Keras).
    ``"mean"`` divides by the number of elements; a reduced loss is summed
    inside the kernel, without an unreduced buffer of the logits' size.

    ``inplace=True`` (with ``return_grad=True``) writes the gradient over
    ``logits`` and returns it as ``grad``, a view of that buffer: nothing of
    ``logits``'s size is allocated, at the price of ``logits`` itself (see
    :func:`sparse_softmax_cross_entropy`); ``logits`` must be writable and
    C-contiguous, else a ``ValueError``. By default inputs are never modified.

    Examples
    --------
    >>> import numpy as np, fastxent as fx
    >>> fx.sigmoid_cross_entropy(np.array([0.0, 2.0]), np.array([1.0, 0.0]))
    array([0.69314718, 2.12692801])
    """
    call, _ = _prepare("sigmoid_cross_entropy", backend, "logits", logits, labels, reduction=reduction,
                       return_grad=return_grad, grad_output=grad_output, inplace=inplace)
    pos_weight = check.pos_weight(pos_weight, call.first.shape, call.on_device)
    label_smoothing = check.label_smoothing(label_smoothing)
    return _run(call, "sigmoid_cross_entropy", call.first.size,
                (_pos_weight_for_kernel(pos_weight, call.first.shape, call.xp), label_smoothing),
                {"pos_weight": pos_weight, "label_smoothing": label_smoothing})


def binary_cross_entropy(probs, labels, *, epsilon=1e-7, label_smoothing=0.0, reduction="none",
                         return_grad=False, grad_output=None, inplace=False, backend=None):
    r"""Binary cross-entropy on probabilities (Keras ``from_logits=False``).

    ``p`` is clipped to ``[epsilon, 1 - epsilon]`` (both bounds rounded to the
    input dtype, as Keras computes them), then
    ``loss = -(z log p + (1 - z) log(1 - p))``; a term whose weight is 0
    contributes 0. The gradient with respect to ``probs`` is that of the clipped
    formula (0 where clipped). Prefer :func:`sigmoid_cross_entropy` on scores:
    it is exact where probabilities saturate.

    ``inplace=True`` (with ``return_grad=True``) writes the gradient over
    ``probs`` and returns it as ``grad``, a view of that buffer: nothing of
    ``probs``'s size is allocated, at the price of ``probs`` itself (see
    :func:`sparse_softmax_cross_entropy`); ``probs`` must be writable and
    C-contiguous, else a ``ValueError``. By default inputs are never modified.

    Examples
    --------
    >>> import numpy as np, fastxent as fx
    >>> fx.binary_cross_entropy(np.array([0.5, 0.9]), np.array([1.0, 1.0]))
    array([0.69314718, 0.10536052])
    """
    call, _ = _prepare("binary_cross_entropy", backend, "probs", probs, labels, reduction=reduction,
                       return_grad=return_grad, grad_output=grad_output, inplace=inplace)
    epsilon = check.epsilon(epsilon)
    label_smoothing = check.label_smoothing(label_smoothing)
    return _run(call, "binary_cross_entropy", call.first.size, (epsilon, label_smoothing),
                {"epsilon": epsilon, "label_smoothing": label_smoothing})


def categorical_cross_entropy(probs, labels, *, axis=-1, epsilon=1e-7, label_smoothing=0.0,
                              reduction="none", return_grad=False, grad_output=None, backend=None):
    r"""Cross-entropy on class probabilities with a distribution as labels (Keras).

    Per row: ``q = probs / sum(probs)``, clipped to ``[epsilon, 1 - epsilon]``,
    then ``loss = -sum_c y_c log q_c``. ``label_smoothing`` eps maps ``y`` to
    ``(1-eps) y + eps/C``. ``"mean"`` divides by the number of rows. A row whose
    sum overflows the accumulation dtype (float32 probabilities summing past 3.4e38)
    has every ``q`` at 0, clipped to ``epsilon``: loss ``-sum_c y_c log(epsilon)``,
    gradient 0 (Keras sums in the input dtype and gives the same; the float64
    reference, which does not overflow, gives the normalised answer).

    Examples
    --------
    >>> import numpy as np, fastxent as fx
    >>> fx.categorical_cross_entropy(np.array([[0.5, 0.5]]), np.array([[1.0, 0.0]]))
    array([0.69314718])
    """
    call, _ = _prepare(
        "categorical_cross_entropy", backend, "probs", probs, labels, axis=axis, labels_kind="dense",
        single_class_hint="binary_cross_entropy", other_labels="sparse_categorical_cross_entropy",
        reduction=reduction, return_grad=return_grad, grad_output=grad_output)
    epsilon = check.epsilon(epsilon)
    label_smoothing = check.label_smoothing(label_smoothing)
    return _run(call, "categorical_cross_entropy", _row_count(call), (epsilon, label_smoothing),
                {"epsilon": epsilon, "label_smoothing": label_smoothing})


def sparse_categorical_cross_entropy(probs, labels, *, axis=-1, epsilon=1e-7, ignore_index=None,
                                     reduction="none", return_grad=False, grad_output=None, backend=None):
    r"""Cross-entropy on class probabilities with integer class ids (Keras).

    Per row: ``q = probs / sum(probs)``, clipped to ``[epsilon, 1 - epsilon]``,
    ``loss = -log q_y``. Rows labelled ``ignore_index`` give 0 and are not
    counted; ``"mean"`` divides by the number of counted rows. A row whose sum
    overflows the accumulation dtype gives ``-log(epsilon)`` and gradient 0, as
    :func:`categorical_cross_entropy`.

    Examples
    --------
    >>> import numpy as np, fastxent as fx
    >>> fx.sparse_categorical_cross_entropy(np.array([[0.25, 0.75]]), np.array([1]))
    array([0.28768207])
    """
    call, ignore_index = _prepare(
        "sparse_categorical_cross_entropy", backend, "probs", probs, labels, axis=axis, labels_kind="ids",
        single_class_hint="binary_cross_entropy", other_labels="categorical_cross_entropy", reduction=reduction,
        return_grad=return_grad, grad_output=grad_output, ignore_index=ignore_index)
    epsilon = check.epsilon(epsilon)
    denominator = 1.0
    if call.reduction == "mean" and call.backend != "numpy":
        denominator = _reductions.mean_denominator(call.labels.reshape(-1), ignore_index, None, call.xp)
    return _run(call, "sparse_categorical_cross_entropy", denominator, (epsilon, ignore_index),
                {"epsilon": epsilon, "ignore_index": ignore_index}, ignore_index)


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
    call, _ = _prepare("softmax_cross_entropy_hvp", backend, "logits", logits, v, second_name="v", axis=axis)
    vector = call.labels
    if not _dtypes.is_real_float(vector.dtype):
        raise TypeError(f"v must be a float array, got dtype {vector.dtype}")
    if vector.shape != call.first.shape:
        raise ValueError(f"v has shape {vector.shape}, expected the logits' shape {call.first.shape}")
    if call.backend == "numpy":
        return _reference().softmax_cross_entropy_hvp(call.first, vector, axis=call.axis)
    out = _dispatch.backend_module(call.backend).softmax_cross_entropy_hvp(
        _rows(call.first, call.axis, call.xp), _rows(vector, call.axis, call.xp))
    return _unrows(out, call.first.shape, call.axis, call.xp)


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
    call, _ = _prepare("sigmoid_cross_entropy_hessian_diag", backend, "logits", logits, labels)
    pos_weight = check.pos_weight(pos_weight, call.first.shape, call.on_device)
    if call.backend == "numpy":
        return _reference().sigmoid_cross_entropy_hessian_diag(call.first, call.labels, pos_weight=pos_weight)
    out = _dispatch.backend_module(call.backend).sigmoid_cross_entropy_hessian_diag(
        _elements(call.first, call.xp), _elements(call.labels, call.xp),
        _pos_weight_for_kernel(pos_weight, call.first.shape, call.xp))
    return out.reshape(call.first.shape)


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
    call, ignore_index = _prepare("score", backend, "logits", logits, labels, axis=axis, labels_kind="ids",
                                  other_labels="softmax_cross_entropy", ignore_index=ignore_index)
    if call.backend == "numpy":
        return _reference().score(call.first, call.labels, axis=call.axis, ignore_index=ignore_index)
    with _device_labels(call, ignore_index):
        fields = _dispatch.backend_module(call.backend).score(
            _rows(call.first, call.axis, call.xp), call.labels.reshape(-1), ignore_index)
    return Score(*(field.reshape(call.loss_shape) for field in fields))
