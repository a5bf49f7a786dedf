"""Losses and scores from hidden states: the linear layer and the cross-entropy, block by block.

A language model's loss is ``cross_entropy(hidden @ weight.T + bias, labels)``; with a
vocabulary of V = 128256 the logits of a batch are the largest array of a training
step. Here they never exist whole. Rows are processed in blocks of B rows, B sized to
the ``memory`` budget, through one reused (B, V) buffer::

    for each block of rows r:
        buffer = hidden[r] @ weight.T + bias              (BLAS)
        loss[r], buffer = fused kernel(buffer)            (the logits' gradient G over the logits)
        grad_hidden[r] = buffer @ weight                  (BLAS)
        grad_weight += buffer.T @ hidden[r]               (BLAS gemm, beta = 1: fastxent._gemm)
        grad_bias += buffer.sum(0)

The fused kernel is the backend's ``sparse_softmax_cross_entropy`` with ``inplace=True``
(``fastxent/backends/__init__.py``), so a block costs one buffer, not two. The mean's
denominator is computed from the labels before the first block, so each block's
gradient is final when it is folded in.

Validation, dispatch and reductions are the public layer's own (``_validate``,
``_dispatch``, ``_reductions``); ``backend="numpy"`` runs the float64 composition of
``fastxent.reference``.

Memory, beyond the inputs and the outputs: the buffer, ``B * V`` elements of the
accumulation dtype, plus, for 16-bit inputs, two ``(B, H)`` float32 scratches, plus the
scratch of :class:`fastxent._gemm.ProductSum` where no BLAS adds in place, plus ``V``
floats for the bias: all within ``memory``; and O(N) per-row values. B is at least one
row, whatever the budget. 16-bit inputs: numpy and this path multiply in float32, so
the weight is widened once (``V * H * 4`` bytes, outside the budget) and ``grad_weight``
is accumulated in float32 (``V * H * 4`` bytes) and rounded once at the end.
"""

from typing import Any, NamedTuple

import numpy as np

from . import _config, _dispatch, _dtypes, _gemm, _reductions
from . import _validate as check
from ._score import LinearGrad, Score

__all__ = ["linear_cross_entropy", "linear_score"]


# ----------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------

class _Call(NamedTuple):
    """A validated call."""

    backend: str        # the resolved backend name
    on_device: bool
    xp: Any             # numpy or cupy
    hidden: Any         # (..., H)
    weight: Any         # (V, H)
    bias: Any           # (V,) or None
    labels: Any         # hidden's shape without H: the loss's shape
    ignore_index: Any
    budget: int         # bytes for the blocks


def _available_memory(xp):
    """Physical memory of the host, or free memory of the current device; None if unknown."""
    if xp is np:
        return _config.physical_memory()
    try:
        return int(xp.cuda.runtime.memGetInfo()[0])
    except Exception:  # noqa: BLE001 -- a device that cannot say: the minimum default
        return None


def _same_dtype(name, array, hidden):
    if array.dtype != hidden.dtype:
        raise TypeError(f"{name} has dtype {array.dtype} but hidden has dtype {hidden.dtype}; "
                        f"pass both in one dtype")


def _prepare(fn, hidden, weight, labels, bias, ignore_index, memory, backend):
    """Validate the arrays, the labels and ``memory``; pick the backend."""
    named = {"hidden": hidden, "weight": weight, "labels": labels}
    if bias is not None:
        named["bias"] = bias
    on_device, arrays = check.arrays(**named)
    name = _dispatch.resolve(backend, on_device)
    xp = _dispatch.array_module(on_device)
    hidden = check.scores("hidden", arrays["hidden"], min_ndim=0)
    if hidden.ndim == 0:
        raise ValueError("hidden must have a feature axis: shape (..., H), got a 0-d array")
    weight = check.scores("weight", arrays["weight"], min_ndim=0)
    _same_dtype("weight", weight, hidden)
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight has shape {weight.shape}, expected (V, {hidden.shape[-1]}): one row of "
                         f"H = {hidden.shape[-1]} features (hidden's last axis) per class")
    count = weight.shape[0]
    check.num_classes(fn, "weight", count, "sigmoid_cross_entropy")
    if bias is not None:
        bias = check.scores("bias", arrays["bias"], min_ndim=0)
        _same_dtype("bias", bias, hidden)
        if bias.shape != (count,):
            raise ValueError(f"bias has shape {bias.shape}, expected ({count},): one value per class")
    labels = check.class_ids(fn, arrays["labels"], hidden.shape[:-1] + (count,), hidden.ndim - 1,
                             "softmax_cross_entropy on the logits")
    ignore_index = check.ignore_index(ignore_index)
    if not on_device:
        check.label_range(labels, count, ignore_index)
    budget = check.memory(memory)
    if budget is None:
        budget = _config.linear_memory(_available_memory(xp))
    return _Call(name, on_device, xp, hidden, weight, bias, labels, ignore_index, budget)


# ----------------------------------------------------------------------------
# Blocks of logits
# ----------------------------------------------------------------------------

class _Blocks:
    """The logits ``hidden @ weight.T + bias`` a block of rows at a time, in one reused buffer.

    Iterating yields ``(start, stop, hidden_rows, logits)``: the block's rows of hidden
    (float32 for 16-bit inputs) and its logits, both in the accumulation dtype.
    ``with_grad`` reserves the budget the gradients' scratches take.
    """

    def __init__(self, call, with_grad):
        xp = self.xp = call.xp
        self.acc = _dtypes.accumulation_dtype(call.hidden.dtype)
        features = call.hidden.shape[-1]
        classes = call.weight.shape[0]
        self.rows = call.hidden.reshape(-1, features)
        count = self.rows.shape[0]
        widen = call.hidden.dtype != self.acc
        self.weight = call.weight.astype(self.acc) if widen else call.weight
        self.bias = None if call.bias is None else call.bias.astype(self.acc, copy=False)
        size = self.acc.itemsize
        per_row = (classes + (features if widen else 0) * (2 if with_grad else 1)) * size
        fixed = 0
        if with_grad:
            fixed += _gemm.scratch_rows(classes, xp) * features * size
            fixed += (classes * size) if call.bias is not None else 0
        self.block = int(max(1, min(max(count, 1), (call.budget - fixed) // per_row)))
        self.buffer = xp.empty((self.block, classes), dtype=self.acc)
        self.widened = xp.empty((self.block, features), dtype=self.acc) if widen else None

    def __iter__(self):
        for start in range(0, self.rows.shape[0], self.block):
            stop = min(start + self.block, self.rows.shape[0])
            rows = self.rows[start:stop]
            if self.widened is not None:
                self.widened[:stop - start] = rows
                rows = self.widened[:stop - start]
            logits = self.buffer[:stop - start]
            self.xp.matmul(rows, self.weight.T, out=logits)
            if self.bias is not None:
                logits += self.bias
            yield start, stop, rows, logits


class _Gradients:
    """``grad_hidden``, ``grad_weight`` and ``grad_bias``, folded in block by block from G."""

    def __init__(self, call, blocks):
        xp = self.xp = call.xp
        self.call = call
        self.blocks = blocks
        acc = blocks.acc
        self.hidden = xp.empty(call.hidden.shape, dtype=call.hidden.dtype)
        self.hidden_rows = self.hidden.reshape(blocks.rows.shape)
        self.narrowed = None if call.hidden.dtype == acc else xp.empty(blocks.widened.shape, dtype=acc)
        self.weight = xp.zeros(call.weight.shape, dtype=acc)
        self.products = _gemm.ProductSum(self.weight, xp)
        self.bias = None if call.bias is None else xp.zeros(call.bias.shape, dtype=acc)
        self.column_sum = None if call.bias is None else xp.empty(call.bias.shape, dtype=acc)

    def add(self, start, stop, rows, grad):
        """Fold in the block ``[start, stop)``: its rows of hidden and its logits' gradient."""
        xp = self.xp
        out = self.hidden_rows[start:stop] if self.narrowed is None else self.narrowed[:stop - start]
        xp.matmul(grad, self.blocks.weight, out=out)
        if self.narrowed is not None:
            self.hidden_rows[start:stop] = out
        self.products.add(grad, rows)
        if self.bias is not None:
            xp.sum(grad, axis=0, out=self.column_sum)
            self.bias += self.column_sum

    def result(self):
        """The :class:`LinearGrad`, each gradient in its argument's dtype."""
        call = self.call
        return LinearGrad(
            hidden=self.hidden,
            weight=self.weight.astype(call.weight.dtype, copy=False),
            bias=None if self.bias is None else self.bias.astype(call.bias.dtype, copy=False))


def _zero_gradients(call):
    xp = call.xp
    return LinearGrad(xp.zeros_like(call.hidden), xp.zeros_like(call.weight),
                      None if call.bias is None else xp.zeros_like(call.bias))


# ----------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------

def linear_cross_entropy(hidden, weight, labels, bias=None, *, ignore_index=None, class_weight=None,
                         label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="none", return_grad=False,
                         grad_output=None, memory=None, backend=None):
    r"""Softmax cross-entropy of the logits ``hidden @ weight.T + bias``, never forming them whole.

    Per row ``i`` with ``x_i = hidden_i @ weight.T + bias``, exactly
    :func:`fastxent.sparse_softmax_cross_entropy` of those logits (every option with its
    semantics there)::

        lse_i = log(sum_c exp(x_ic))
        l_i   = (1-eps) * w[y_i] * (lse_i - x_{i,y_i}) + (eps/C) * sum_c w_c (lse_i - x_ic)
                + z_loss * lse_i**2

    and with ``G`` the gradient of ``sum(grad_output * loss)`` with respect to the logits::

        d/d hidden = G @ weight,   d/d weight = G.T @ hidden,   d/d bias = G.sum(0)

    The logits are computed a block of rows at a time (numpy's matmul on the host,
    CuPy's cuBLAS on the device) into one buffer that the fused kernel overwrites with
    its gradient; each block's gradient is folded into the three gradients at once. See
    the module docstring for the memory this takes.

    Parameters
    ----------
    hidden : array (..., H) of float16, bfloat16, float32 or float64
        Hidden states, one per row (any leading shape).
    weight : array (V, H), ``hidden``'s dtype
        The output layer (``torch.nn.Linear(H, V).weight``), V >= 2 classes.
    labels : integer array
        Class ids, ``hidden``'s shape without its last axis.
    bias : array (V,), ``hidden``'s dtype, or None
    ignore_index, class_weight, label_smoothing, z_loss, softcap, reduction, grad_output
        As in :func:`fastxent.sparse_softmax_cross_entropy`; ``"mean"`` divides by
        ``sum_i w[y_i]`` over the counted rows (0.0, with zero gradients, when that is 0).
    return_grad : bool
        Also return the gradients of ``hidden``, ``weight`` and ``bias``.
    memory : int, str or None
        Budget for the blocks, in bytes or as ``"256M"``, ``"1G"`` (binary units). Default:
        1/32 of the machine's memory (of the device's free memory), within [64 MiB, 1 GiB]
        (``fastxent._config.LINEAR_MEMORY_*``). A block holds at least one row.
    backend : {"numba", "numpy", "cupy"} or None

    Returns
    -------
    loss : array
        ``labels``' shape, or 0-d when reduced; float32 for 16-bit inputs, else their dtype.
    grad : :class:`fastxent.LinearGrad`, only with ``return_grad=True``
        ``(hidden, weight, bias)`` gradients, each in its argument's shape and dtype
        (``bias`` None without a bias); 16-bit inputs are accumulated in float32.

    Examples
    --------
    >>> import numpy as np, fastxent as fx
    >>> hidden = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    >>> weight = np.array([[2.0, 0.0], [0.0, 0.0], [-1.0, 0.0]], dtype=np.float32)
    >>> fx.linear_cross_entropy(hidden, weight, np.array([0, 2]))
    array([0.16984604, 1.0986123 ], dtype=float32)
    >>> loss, grad = fx.linear_cross_entropy(hidden, weight, np.array([0, 2]), reduction="mean",
    ...                                      return_grad=True, memory="1M")
    >>> grad.weight.shape
    (3, 2)
    """
    fn = "linear_cross_entropy"
    call = _prepare(fn, hidden, weight, labels, bias, ignore_index, memory, backend)
    xp = call.xp
    class_weight = check.class_weight(class_weight, call.weight.shape[0], call.on_device)
    label_smoothing = check.label_smoothing(label_smoothing)
    z_loss = check.z_loss(z_loss)
    softcap = check.softcap(softcap)
    reduction = check.reduction(reduction)
    return_grad = check.flag("return_grad", return_grad)
    loss_shape = call.labels.shape
    grad_output = check.grad_output(grad_output, () if reduction != "none" else loss_shape, call.on_device, xp)
    if call.backend == "numpy":
        from . import reference

        return reference.linear_cross_entropy(
            call.hidden, call.weight, call.labels, call.bias, ignore_index=call.ignore_index,
            class_weight=class_weight, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
            reduction=reduction, return_grad=return_grad, grad_output=grad_output)
    labels = call.labels.reshape(-1)
    denominator = 1.0
    if reduction == "mean":
        denominator = _reductions.mean_denominator(labels, call.ignore_index, class_weight, xp)
    scale = None
    if return_grad and not _reductions.empty_mean(reduction, denominator):
        scale = _reductions.grad_scale(grad_output, loss_shape, reduction, denominator, xp)
        if not isinstance(scale, float):
            scale = scale.reshape(-1)
    blocks = _Blocks(call, with_grad=scale is not None)
    grads = _Gradients(call, blocks) if scale is not None else None
    kernel = _dispatch.backend_module(call.backend).sparse_softmax_cross_entropy
    loss = xp.empty(labels.shape, dtype=_dtypes.loss_dtype(call.hidden.dtype))
    for start, stop, rows, logits in blocks:
        block_scale = scale if scale is None or isinstance(scale, float) else scale[start:stop]
        with check.device_labels(call.labels, logits.shape[1], call.ignore_index):
            loss[start:stop], grad = kernel(logits, labels[start:stop], call.ignore_index, class_weight,
                                            label_smoothing, z_loss, softcap, block_scale, inplace=True)
        if grads is not None:
            grads.add(start, stop, rows, grad)
    loss = _reductions.reduce(loss.reshape(loss_shape), reduction, denominator, xp)
    if not return_grad:
        return loss
    return loss, (grads.result() if grads is not None else _zero_gradients(call))


def linear_score(hidden, weight, labels, bias=None, *, ignore_index=None, memory=None, backend=None):
    r"""The :func:`fastxent.score` bundle of the logits ``hidden @ weight.T + bias``, never forming them whole.

    Perplexity and accuracy of a model from its hidden states: per row, ``loss``
    (``lse - x_y``), ``lse``, ``target_logprob``, ``entropy``, ``argmax`` and ``correct``,
    with :func:`fastxent.score`'s semantics (an ignored row has loss 0, target_logprob NaN
    and correct False). The logits are computed a block of rows at a time within
    ``memory`` (as in :func:`linear_cross_entropy`).

    Parameters
    ----------
    hidden : array (..., H); weight : array (V, H); labels : integer array (...);
    bias : array (V,) or None; ignore_index : int or None; memory : int, str or None;
    backend : {"numba", "numpy", "cupy"} or None
        As in :func:`linear_cross_entropy`.

    Returns
    -------
    Score
        Fields of ``labels``' shape; float fields float32 for 16-bit inputs, else their dtype.

    Examples
    --------
    >>> import numpy as np, fastxent as fx
    >>> hidden = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> weight = np.array([[2.0, 0.0], [0.0, 3.0]])
    >>> s = fx.linear_score(hidden, weight, np.array([0, 0]))
    >>> s.correct.tolist(), s.argmax.tolist()
    ([True, False], [0, 1])
    """
    call = _prepare("linear_score", hidden, weight, labels, bias, ignore_index, memory, backend)
    if call.backend == "numpy":
        from . import reference

        return reference.linear_score(call.hidden, call.weight, call.labels, call.bias,
                                      ignore_index=call.ignore_index)
    xp = call.xp
    labels = call.labels.reshape(-1)
    value = _dtypes.loss_dtype(call.hidden.dtype)
    fields = Score(*(xp.empty(labels.shape, dtype=dtype) for dtype in (value, value, value, value, np.int64,
                                                                          np.bool_)))
    kernel = _dispatch.backend_module(call.backend).score
    for start, stop, _, logits in _Blocks(call, with_grad=False):
        with check.device_labels(call.labels, logits.shape[1], call.ignore_index):
            block = kernel(logits, labels[start:stop], call.ignore_index)
        for field, part in zip(fields, block):
            field[start:stop] = part
    return Score(*(field.reshape(call.labels.shape) for field in fields))
