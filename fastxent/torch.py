"""PyTorch adapter: fastxent as the loss kernel of ``torch.nn.functional``.

Drop-in replacements with torch's signatures and semantics::

    import fastxent.torch as fxt
    loss = fxt.cross_entropy(logits, target)                     # F.cross_entropy
    loss = fxt.binary_cross_entropy_with_logits(logits, target)  # F.binary_cross_entropy_with_logits
    criterion = fxt.CrossEntropyLoss(label_smoothing=0.1)        # nn.CrossEntropyLoss

How a call runs
---------------
* **CPU tensors** are handed to the Numba backend without a copy:
  ``tensor.detach().numpy()`` for float16/float32/float64, and for bfloat16 a
  view of the same bits, ``t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)``.
  The results come back with ``torch.from_numpy`` (again no copy).
* **CUDA tensors** are handed to the CuPy backend through DLPack
  (``cupy.from_dlpack``; bfloat16 as an int16 view retyped to
  ``ml_dtypes.bfloat16``, which needs CuPy >= 14), with CuPy's current
  stream set to the tensor's current torch stream, so the kernel is ordered
  after whatever produced the logits and before whatever consumes the loss;
  the results come back with ``torch.from_dlpack``. Nothing is copied between
  host and device. (Written, not yet run on a GPU.)
* Anything else (MPS, XLA, meta tensors) is a ``TypeError``.

Forward and backward
--------------------
Each loss is one ``torch.autograd.Function``. Its forward runs fastxent's
fused pass (``return_grad=True``): one read of the logits yields the loss and
the gradient of the (reduced) loss. The gradient is saved for backward; the
logits are not. Backward hands the saved gradient over as is when the incoming
gradient is exactly 1 (``loss.backward()`` on a mean or sum, a CPU check), and
otherwise multiplies it by the incoming gradient (one elementwise pass).

Why the gradient and not the row log-sum-exp: keeping ``lse`` (N floats)
would also need the logits kept alive (N x C) to recompute the softmax in
backward, and a second read of them. Keeping the gradient costs the same
N x C (in the logits' dtype) and lets the logits be freed after forward. For
logits of N x C elements of b bytes:

=====================================  ======================  ======================
                                       this adapter            ``F.cross_entropy``
=====================================  ======================  ======================
saved between forward and backward     N*C*b (gradient)        N*C*b (log_softmax)
allocated in forward                   N*C*b + loss            N*C*b + loss
allocated in backward (grad_out == 1)  0                       2*N*C*b (two passes)
=====================================  ======================  ======================

(``bench/bench_train_step.py`` measures both.) When no gradient is needed
(``torch.no_grad()``, or logits that do not require grad) the forward-only
kernel runs and nothing is saved.

Double backward is not supported: the saved gradient is a constant in the
logits, so a graph built through it would silently miss the second-order
terms (torch's ``once_differentiable`` does not prevent that, e.g. in a
gradient penalty). Backward therefore raises a ``RuntimeError`` that says so
whenever it runs with ``create_graph=True``.
Gradients with respect to ``target`` (which torch provides) are not computed
by the fused kernel: when ``target`` (or ``weight``/``pos_weight``) requires
grad, the call is delegated to torch's own function, so results stay exact
(and torch raises its own error where it has no such gradient). Under ``torch.compile`` the functions here are a graph break
(``torch.compiler.disable``): the model around them is compiled, the loss runs
eagerly.

Deliberate differences from torch: a cross-entropy over a single class
(C == 1, always 0 in torch) is a ``ValueError`` pointing to
``binary_cross_entropy_with_logits``, as everywhere in fastxent; bad targets
are ``ValueError``/``TypeError`` naming the offending value; class-index
targets may be any integer dtype (torch wants int64 or uint8).
"""

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn import _reduction

import fastxent as fx
from fastxent._adapters import host_lock

__all__ = [
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "linear_cross_entropy",
]

_REDUCTIONS = ("none", "mean", "sum")


# ----------------------------------------------------------------------------
# Tensors to arrays and back, without copies
# ----------------------------------------------------------------------------

def _as_array(tensor):
    """A numpy (CPU) or CuPy (CUDA) view of ``tensor``'s data; never a copy."""
    t = tensor.detach()
    if t.device.type == "cpu":
        t = t.resolve_conj().resolve_neg()
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    if t.device.type == "cuda":
        # The dispatcher's own DLPack route: bfloat16 included (through an int16
        # view where CuPy's DLPack import refuses it), ordered on CuPy's current
        # stream, which _on_stream_of makes the tensor's torch stream.
        from fastxent._dispatch import as_device_array

        return as_device_array(t)
    raise TypeError(f"fastxent.torch runs on CPU and CUDA tensors, got a tensor on device {t.device}")


def _as_tensor(array):
    """The torch tensor over a numpy or CuPy result; never a copy."""
    if isinstance(array, (np.ndarray, np.generic)):
        array = np.asarray(array)
        if array.dtype.name == "bfloat16":
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)
    if getattr(array.dtype, "name", "") == "bfloat16":  # CuPy + ml_dtypes: hand the bits over
        return torch.from_dlpack(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_dlpack(array)


@contextlib.contextmanager
def _on_stream_of(tensor):
    """Run the enclosed CuPy launches on ``tensor``'s device and current torch stream.

    Host (Numba) calls run under the adapters' host lock instead (see
    ``fastxent._adapters``): torch code may call from several threads.
    """
    if tensor.device.type != "cuda":
        with host_lock():
            yield
        return
    import cupy

    index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index)
    with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream.cuda_stream, index):
        yield


def _optional_array(tensor):
    return None if tensor is None else _as_array(tensor)


# ----------------------------------------------------------------------------
# Shared checks
# ----------------------------------------------------------------------------

def _check_tensor(name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _reduction_of(size_average, reduce, reduction):
    """torch's mapping of the deprecated ``size_average``/``reduce`` (with its warning)."""
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not a valid value; expected one of {list(_REDUCTIONS)}")
    return reduction


def _needs_grad(input):
    return torch.is_grad_enabled() and input.requires_grad


def _any_requires_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _nan(dtype, device):
    return torch.full((), math.nan, dtype=dtype, device=device)


def _first_order_only(name):
    """Refuse ``create_graph=True``: the saved gradient carries no graph to differentiate."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"fastxent.torch.{name} does not support double backward (create_graph=True): its "
            "backward hands over the gradient saved by the fused forward, which is a constant "
            f"in the logits; use torch.nn.functional.{name} where second derivatives are needed")


def _scaled(grad, grad_output, class_dim):
    """``grad`` times the incoming gradient; the saved tensor itself when that is exactly 1.

    ``class_dim`` is where the incoming per-row gradient is broadcast along the
    classes (``None`` for elementwise losses, whose gradient has the input's shape).
    """
    if grad_output.dim() == 0:
        if grad_output.device.type == "cpu" and grad_output.item() == 1.0:
            return grad
        return grad * grad_output
    if class_dim is not None:
        grad_output = grad_output.unsqueeze(class_dim)
    return grad * grad_output


# ----------------------------------------------------------------------------
# cross_entropy
# ----------------------------------------------------------------------------

def _class_dim(input):
    if input.dim() == 0:
        raise ValueError("input must have a class dimension, got a 0-d tensor")
    return 1 if input.dim() >= 2 else 0


def _counted_weight(target, weight, ignore_index, count):
    """``sum_i w[y_i]`` over the rows not ignored: the denominator of torch's mean."""
    counted = target != ignore_index
    if weight is None:
        return float(counted.sum()), counted
    safe = target.clamp(0, max(count - 1, 0)).long()
    picked = weight.detach().to(device=target.device, dtype=torch.float64)[safe]
    return float((picked * counted).sum()), counted


def _cross_entropy_arrays(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                          softcap, need_grad):
    """(loss, grad or None) as tensors, torch's semantics, computed by fastxent."""
    class_dim = _class_dim(input)
    count = input.shape[class_dim]
    probabilities = target.shape == input.shape
    out_dtype = input.dtype
    with _on_stream_of(input):
        x = _as_array(input)
        if probabilities:
            if not (target.is_floating_point()):
                raise TypeError(
                    f"target has the input's shape {tuple(input.shape)}, so it holds class "
                    f"probabilities and must be floating point, got {target.dtype}")
            if z_loss:
                raise ValueError(f"z_loss={z_loss} applies to class-index targets only, "
                                 "not to class probabilities")
            if weight is not None:
                # torch: -sum_c w_c y'_c log p_c with y' the smoothed target. Folding
                # w into the labels keeps it one fused pass (fastxent's soft labels
                # need not sum to 1): the loss and the gradient are torch's.
                accumulate = torch.float64 if input.dtype == torch.float64 else torch.float32
                shape = [1] * input.dim()
                shape[class_dim] = count
                folded = target.detach().to(accumulate)
                if label_smoothing:
                    folded = folded * (1.0 - label_smoothing) + label_smoothing / count
                target = folded * weight.detach().to(device=folded.device, dtype=accumulate).reshape(shape)
                label_smoothing = 0.0
            y = _as_array(target)
            rows = input.numel() // max(count, 1)
            options = dict(axis=class_dim, label_smoothing=label_smoothing, softcap=softcap)
            if reduction == "mean" and rows == 0 and count > 0:
                fx.softmax_cross_entropy(x, y, **options)  # validation only
                return _nan(out_dtype, input.device), (torch.zeros_like(input) if need_grad else None)
            result = fx.softmax_cross_entropy(x, y, **options, reduction=reduction, return_grad=need_grad)
        else:
            if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
                raise TypeError(
                    f"target of shape {tuple(target.shape)} holds class indices and must be an "
                    f"integer tensor, got {target.dtype} (class probabilities have the input's "
                    f"shape {tuple(input.shape)})")
            y = _as_array(target)
            options = dict(axis=class_dim, ignore_index=ignore_index, class_weight=_optional_array(weight),
                           label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
            if reduction == "mean":
                denominator, counted = _counted_weight(target, weight, ignore_index, count)
                if denominator == 0.0:
                    # torch divides by zero here: the mean is NaN; ignored rows get a
                    # zero gradient and counted rows (all of weight 0) NaN.
                    fx.sparse_softmax_cross_entropy(x, y, **options)  # validation only
                    grad = None
                    if need_grad:
                        grad = torch.zeros_like(input).masked_fill_(counted.unsqueeze(class_dim), math.nan)
                    return _nan(out_dtype, input.device), grad
            result = fx.sparse_softmax_cross_entropy(x, y, **options, reduction=reduction,
                                                          return_grad=need_grad)
    if need_grad:
        loss, grad = result
        return _as_tensor(loss).to(out_dtype), _as_tensor(grad)
    return _as_tensor(result).to(out_dtype), None


class _CrossEntropyFunction(torch.autograd.Function):
    """Fused softmax cross-entropy: forward saves the gradient, backward scales it."""

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap):
        loss, grad = _cross_entropy_arrays(input, target, weight, ignore_index, reduction,
                                           label_smoothing, z_loss, softcap, need_grad=True)
        ctx.save_for_backward(grad)
        ctx.class_dim = _class_dim(input)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        _first_order_only("cross_entropy")
        (grad,) = ctx.saved_tensors
        return _scaled(grad, grad_output, ctx.class_dim), None, None, None, None, None, None, None


@torch.compiler.disable
def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0, *, z_loss=0.0, softcap=None):
    r"""``torch.nn.functional.cross_entropy``, computed by fastxent's fused kernel.

    Same signature and semantics as torch's: the class dimension is 1 (0 for
    a 1-D ``input``, one unbatched sample); ``target`` holds class indices
    (shape of ``input`` without the class dimension) or, when it has
    ``input``'s shape, class probabilities (floating point). Per row, with
    class weights ``w`` (ones when None) and smoothing ``eps``::

        l_i = (1-eps) * w[y_i] * (-log p_{i,y_i}) + (eps/C) * sum_c w_c (-log p_ic)

    for class indices (rows whose target is ``ignore_index`` give 0 and are not
    counted), and ``-sum_c w_c y'_ic log p_ic`` with ``y' = (1-eps) y + eps/C``
    for probabilities. ``"mean"`` divides by ``sum_i w[y_i]`` over the counted
    rows (by the number of rows for probabilities); like torch, a mean over
    nothing (all rows ignored, an empty batch, weights summing to 0) is NaN.
    The loss has ``input``'s dtype and the gradient too (fastxent accumulates
    16-bit inputs in float32).

    Parameters
    ----------
    input : Tensor (C,), (N, C) or (N, C, d1, ...)
        Scores: float16, bfloat16, float32 or float64, on the CPU or a CUDA device.
    target : Tensor
        Class indices (any integer dtype) or class probabilities.
    weight : Tensor (C,), optional
    size_average, reduce : deprecated
        Mapped to ``reduction`` as torch maps them (with torch's warning).
    ignore_index : int
    reduction : {"mean", "sum", "none"}
    label_smoothing : float in [0, 1]
    z_loss : float >= 0, keyword-only
        fastxent extra: PaLM's ``z_loss * logsumexp(x)**2`` per counted row
        (class-index targets only).
    softcap : float > 0 or None, keyword-only
        fastxent extra: Gemma 2's ``softcap * tanh(x / softcap)`` before the softmax.

    Returns
    -------
    Tensor
        0-d for ``"mean"``/``"sum"``, else ``target``'s shape (indices) or
        ``input``'s shape without the class dimension (probabilities).

    Notes
    -----
    Memory: the forward saves the gradient (N*C elements in ``input``'s dtype)
    and not the logits; backward is one multiply (none when the incoming
    gradient is 1). See the module docstring for the numbers beside torch's.

    Examples
    --------
    >>> import torch, fastxent.torch as fxt
    >>> logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]], requires_grad=True)
    >>> loss = fxt.cross_entropy(logits, torch.tensor([0, 2]))
    >>> loss.backward()
    """
    _check_tensor("input", input)
    _check_tensor("target", target)
    reduction = _reduction_of(size_average, reduce, reduction)
    if _any_requires_grad(target, weight):
        if z_loss or softcap is not None:
            raise ValueError("z_loss and softcap need a target and weight that do not require grad")
        return F.cross_entropy(input, target, weight=weight, ignore_index=ignore_index,
                               reduction=reduction, label_smoothing=label_smoothing)
    if _needs_grad(input):
        return _CrossEntropyFunction.apply(input, target, weight, ignore_index, reduction,
                                           label_smoothing, z_loss, softcap)
    loss, _ = _cross_entropy_arrays(input, target, weight, ignore_index, reduction, label_smoothing,
                                    z_loss, softcap, need_grad=False)
    return loss


# ----------------------------------------------------------------------------
# binary_cross_entropy_with_logits
# ----------------------------------------------------------------------------

def _bce_arrays(input, target, weight, pos_weight, reduction, need_grad):
    """(loss, grad or None) as tensors, torch's semantics, computed by fastxent."""
    if target.shape != input.shape:
        raise ValueError(f"Target size ({tuple(target.shape)}) must be the same as input size "
                         f"({tuple(input.shape)})")
    if weight is not None and torch.broadcast_shapes(weight.shape, input.shape) != input.shape:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, which does not broadcast to the "
                         f"input's shape {tuple(input.shape)}")
    out_dtype = input.dtype
    numel = input.numel()
    with _on_stream_of(input):
        x = _as_array(input)
        z = _as_array(target)
        options = dict(pos_weight=_optional_array(pos_weight))
        if reduction == "mean" and numel == 0:
            fx.sigmoid_cross_entropy(x, z, **options)  # validation only
            return _nan(out_dtype, input.device), (torch.zeros_like(input) if need_grad else None)
        if weight is None:
            result = fx.sigmoid_cross_entropy(x, z, **options, reduction=reduction, return_grad=need_grad)
            if need_grad:
                loss, grad = result
                return _as_tensor(loss).to(out_dtype), _as_tensor(grad)
            return _as_tensor(result).to(out_dtype), None
        # The weight multiplies each element's loss: the fused pass gets it (and
        # the mean's 1/numel) as its grad_output, the loss is weighted here.
        weight = weight.detach()
        scale = weight.to(torch.float64) / numel if reduction == "mean" else weight
        result = fx.sigmoid_cross_entropy(x, z, **options, reduction="none", return_grad=need_grad,
                                               grad_output=_as_array(scale) if need_grad else None)
        loss, grad = result if need_grad else (result, None)
    weighted = _as_tensor(loss) * weight.to(device=input.device)
    if reduction == "sum":
        weighted = weighted.sum(dtype=torch.float64)
    elif reduction == "mean":
        weighted = weighted.sum(dtype=torch.float64) / numel
    return weighted.to(out_dtype), (None if grad is None else _as_tensor(grad))


class _BCEWithLogitsFunction(torch.autograd.Function):
    """Fused sigmoid cross-entropy: forward saves the gradient, backward scales it."""

    @staticmethod
    def forward(ctx, input, target, weight, pos_weight, reduction):
        loss, grad = _bce_arrays(input, target, weight, pos_weight, reduction, need_grad=True)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        _first_order_only("binary_cross_entropy_with_logits")
        (grad,) = ctx.saved_tensors
        return _scaled(grad, grad_output, None), None, None, None, None


@torch.compiler.disable
def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None, reduce=None,
                                     reduction="mean", pos_weight=None):
    r"""``torch.nn.functional.binary_cross_entropy_with_logits``, computed by fastxent.

    Elementwise, stable for any finite score, with ``pos_weight`` q (1 when None)::

        l = w * ((1 - z) x + (1 + (q - 1) z) (log1p(exp(-|x|)) + max(-x, 0)))

    ``target`` has ``input``'s shape; ``weight`` and ``pos_weight`` broadcast
    against it (``pos_weight`` typically one value per class on the last
    dimension). ``"mean"`` divides by the number of elements (the weights do
    not enter the denominator; an empty mean is NaN, as in torch).

    Parameters
    ----------
    input : Tensor
        Scores: float16, bfloat16, float32 or float64, CPU or CUDA.
    target : Tensor
        Targets in [0, 1] (float or bool), ``input``'s shape.
    weight : Tensor, optional
        Per-element rescaling, broadcast to ``input``'s shape.
    size_average, reduce : deprecated
        Mapped to ``reduction`` as torch maps them.
    reduction : {"mean", "sum", "none"}
    pos_weight : Tensor, optional
        Weight of the positive term, broadcast to ``input``'s shape.

    Notes
    -----
    Memory: the forward saves the gradient (``input``'s size and dtype), not
    the logits; backward is one multiply, none when the incoming gradient is 1.

    Examples
    --------
    >>> import torch, fastxent.torch as fxt
    >>> fxt.binary_cross_entropy_with_logits(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]))
    tensor(1.4100)
    """
    _check_tensor("input", input)
    _check_tensor("target", target)
    reduction = _reduction_of(size_average, reduce, reduction)
    if _any_requires_grad(target, weight, pos_weight):
        return F.binary_cross_entropy_with_logits(input, target, weight=weight, reduction=reduction,
                                                  pos_weight=pos_weight)
    if _needs_grad(input):
        return _BCEWithLogitsFunction.apply(input, target, weight, pos_weight, reduction)
    loss, _ = _bce_arrays(input, target, weight, pos_weight, reduction, need_grad=False)
    return loss


# ----------------------------------------------------------------------------
# nn.Module wrappers
# ----------------------------------------------------------------------------

class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` computed by :func:`cross_entropy`.

    A subclass of torch's module (same constructor, same ``weight`` buffer and
    state dict), plus the keyword-only fastxent extras ``z_loss`` and ``softcap``.

    Examples
    --------
    >>> import torch, fastxent.torch as fxt
    >>> criterion = fxt.CrossEntropyLoss(label_smoothing=0.1)
    >>> loss = criterion(torch.zeros(2, 3), torch.tensor([0, 1]))
    """

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                 label_smoothing=0.0, *, z_loss=0.0, softcap=None):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap

    def forward(self, input, target):
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing,
                             z_loss=self.z_loss, softcap=self.softcap)

    def extra_repr(self):
        return f"reduction={self.reduction!r}, z_loss={self.z_loss}, softcap={self.softcap}"


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    """``torch.nn.BCEWithLogitsLoss`` computed by :func:`binary_cross_entropy_with_logits`.

    A subclass of torch's module: same constructor, ``weight`` and
    ``pos_weight`` buffers and state dict.

    Examples
    --------
    >>> import torch, fastxent.torch as fxt
    >>> criterion = fxt.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0, 1.0]))
    >>> loss = criterion(torch.zeros(4, 2), torch.ones(4, 2))
    """

    def forward(self, input, target):
        return binary_cross_entropy_with_logits(input, target, weight=self.weight, reduction=self.reduction,
                                                pos_weight=self.pos_weight)


# ----------------------------------------------------------------------------
# linear_cross_entropy (PyTorch 2.13's torch.nn.functional.linear_cross_entropy)
# ----------------------------------------------------------------------------

def _linear_fallback_reason(input, linear_weight, target, weight):
    """Why a call goes to torch's own function (None: fastxent runs it)."""
    if input.dim() not in (1, 2) or linear_weight.dim() != 2:
        return "shapes"   # torch raises, or a K-dimensional loss
    if target.shape == (*input.shape[:-1], linear_weight.shape[0]) or target.is_floating_point():
        return "class probabilities"
    if _any_requires_grad(target, weight):
        return "gradient of target or weight"
    return None


def _linear_zero_denominator(input, linear_weight, linear_bias, target, ignore_index, need_grad):
    """torch's results for a mean over a zero denominator: loss NaN; the logits' gradient is
    0 on ignored rows and NaN on counted ones, so the products are NaN where those reach."""
    loss = _nan(input.dtype, input.device)
    if not need_grad:
        return loss, None
    counted = target != ignore_index
    grad_input = torch.zeros_like(input).masked_fill_(counted.unsqueeze(-1), math.nan)
    fill = math.nan if bool(counted.any()) else 0.0
    grads = (grad_input, torch.full_like(linear_weight, fill),
             None if linear_bias is None else torch.full_like(linear_bias, fill))
    return loss, grads


def _linear_arrays(input, linear_weight, linear_bias, target, weight, reduction, ignore_index, label_smoothing,
                   z_loss, softcap, memory, need_grad, grad_output=None):
    """``(loss, (grad_input, grad_weight, grad_bias) or None)`` as tensors, torch's semantics."""
    if target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target holds class indices and must be an integer tensor, got {target.dtype}")
    if reduction == "mean":
        denominator, _ = _counted_weight(target.reshape(-1), weight, ignore_index, linear_weight.shape[0])
        if denominator == 0.0:
            with _on_stream_of(input):  # validation only
                fx.linear_cross_entropy(_as_array(input), _as_array(linear_weight), _as_array(target),
                                        _optional_array(linear_bias), ignore_index=ignore_index,
                                        class_weight=_optional_array(weight), memory=memory)
            return _linear_zero_denominator(input, linear_weight, linear_bias, target, ignore_index, need_grad)
    with _on_stream_of(input):
        result = fx.linear_cross_entropy(
            _as_array(input), _as_array(linear_weight), _as_array(target), _optional_array(linear_bias),
            ignore_index=ignore_index, class_weight=_optional_array(weight), label_smoothing=label_smoothing,
            z_loss=z_loss, softcap=softcap, reduction=reduction, return_grad=need_grad,
            grad_output=_optional_array(grad_output), memory=memory)
    if not need_grad:
        return _as_tensor(result).to(input.dtype), None
    loss, grad = result
    return _as_tensor(loss).to(input.dtype), tuple(None if g is None else _as_tensor(g) for g in grad)


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Linear layer + cross-entropy in blocks. A reduced loss's forward computes the three
    gradients and backward scales them; ``reduction="none"`` needs the incoming gradient
    of every row, so its backward runs the blocks again with it (as torch's chunked path)."""

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, reduction, ignore_index, label_smoothing,
                z_loss, softcap, memory):
        ctx.options = (target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap, memory)
        if reduction == "none":
            ctx.save_for_backward(input, linear_weight, linear_bias)
            loss, _ = _linear_arrays(input, linear_weight, linear_bias, target, weight, reduction, ignore_index,
                                     label_smoothing, z_loss, softcap, memory, need_grad=False)
            return loss
        loss, grads = _linear_arrays(input, linear_weight, linear_bias, target, weight, reduction, ignore_index,
                                     label_smoothing, z_loss, softcap, memory, need_grad=True)
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        _first_order_only("linear_cross_entropy")
        target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap, memory = ctx.options
        if reduction == "none":
            input, linear_weight, linear_bias = ctx.saved_tensors
            _, grads = _linear_arrays(input, linear_weight, linear_bias, target, weight, "none", ignore_index,
                                      label_smoothing, z_loss, softcap, memory, need_grad=True,
                                      grad_output=grad_output.detach())
        else:
            grads = tuple(None if g is None else _scaled(g, grad_output, None) for g in ctx.saved_tensors)
        return (*grads, None, None, None, None, None, None, None, None)


@torch.compiler.disable
def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
                         ignore_index=None, label_smoothing=0.0, options=None, z_loss=0.0, softcap=None,
                         memory=None):
    r"""``torch.nn.functional.linear_cross_entropy`` (PyTorch 2.13), computed by fastxent in blocks.

    ``cross_entropy(linear(input, linear_weight, linear_bias), target, ...)`` with torch's
    signature and semantics, the logits never formed whole: fastxent's
    :func:`fastxent.linear_cross_entropy` runs blocks of rows sized to ``memory``, each
    block's logits from the BLAS (cuBLAS for CUDA tensors) turned into loss and gradient
    in place by the fused kernel. For a mean or a sum the forward computes the gradients
    of ``input``, ``linear_weight`` and ``linear_bias`` and backward hands them over (one
    multiply unless the incoming gradient is 1); with ``reduction="none"`` backward runs
    the blocks again with the incoming gradient of each row.

    As in torch: ``input`` is (H,) or (N, H); ``target`` class indices ((), (N,));
    ``ignore_index`` None means -100; ``weight`` rescales the classes; a mean over nothing
    is NaN. ``options`` (a ``torch.nn.LinearCrossEntropyOptions``) is accepted and not
    used: the blocks follow ``memory``. Calls fastxent does not run go to torch's own
    function: class-probability targets, K-dimensional ``linear_weight``, and a
    ``target`` or ``weight`` that requires grad.

    Parameters
    ----------
    input : Tensor (H,) or (N, H)
    linear_weight : Tensor (C, H)
    target : Tensor (), (N,) of class indices (any integer dtype)
    linear_bias : Tensor (C,), optional
    weight : Tensor (C,), optional
    reduction : {"mean", "sum", "none"}
    ignore_index : int or None
    label_smoothing : float in [0, 1]
    options : LinearCrossEntropyOptions or None
    z_loss, softcap : keyword-only fastxent extras, as in :func:`cross_entropy`
    memory : int, str or None, keyword-only
        The blocks' budget, e.g. ``"256M"`` (default: see :func:`fastxent.linear_cross_entropy`).

    Returns
    -------
    Tensor
        0-d for ``"mean"``/``"sum"``, else ``target``'s shape; ``input``'s dtype.

    Examples
    --------
    >>> import torch, fastxent.torch as fxt
    >>> hidden = torch.randn(4, 8, requires_grad=True)
    >>> head = torch.randn(10, 8, requires_grad=True)
    >>> fxt.linear_cross_entropy(hidden, head, torch.tensor([1, 2, 3, 4])).backward()
    """
    for name, value in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        _check_tensor(name, value)
    if options is not None and not isinstance(options, torch.nn.LinearCrossEntropyOptions):
        raise TypeError(f"options must be a torch.nn.LinearCrossEntropyOptions or None, got {type(options).__name__}")
    if _linear_fallback_reason(input, linear_weight, target, weight) is not None:
        if z_loss or softcap is not None:
            raise ValueError("z_loss and softcap apply to class-index targets of a 2-D linear_weight that, like "
                             "the weight, do not require grad")
        return F.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=weight,
                                      reduction=reduction, ignore_index=ignore_index,
                                      label_smoothing=label_smoothing, options=options)
    reduction = _reduction_of(None, None, reduction)
    ignore_index = -100 if ignore_index is None else ignore_index
    arguments = (target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap, memory)
    if _any_requires_grad(input, linear_weight, linear_bias):
        return _LinearCrossEntropyFunction.apply(input, linear_weight, linear_bias, *arguments)
    loss, _ = _linear_arrays(input, linear_weight, linear_bias, *arguments, need_grad=False)
    return loss


class LinearCrossEntropyLoss(torch.nn.LinearCrossEntropyLoss):
    """``torch.nn.LinearCrossEntropyLoss`` computed by :func:`linear_cross_entropy`.

    A subclass of torch's module (same constructor, the same ``linear`` layer and
    ``weight`` buffer, the same state dict), plus the keyword-only fastxent extras
    ``z_loss``, ``softcap`` and ``memory``.

    Examples
    --------
    >>> import torch, fastxent.torch as fxt
    >>> head = fxt.LinearCrossEntropyLoss(8, 10, bias=True, memory="64M")
    >>> loss = head(torch.randn(4, 8), torch.tensor([1, 2, 3, 4]))
    """

    def __init__(self, in_features, num_classes, *, out_features=(), bias=False, device=None, dtype=None,
                 reduction="mean", weight=None, ignore_index=None, label_smoothing=0.0, options=None, z_loss=0.0,
                 softcap=None, memory=None):
        super().__init__(in_features, num_classes, out_features=out_features, bias=bias, device=device,
                         dtype=dtype, reduction=reduction, weight=weight, ignore_index=ignore_index,
                         label_smoothing=label_smoothing, options=options)
        self.z_loss = z_loss
        self.softcap = softcap
        self.memory = memory

    def forward(self, input, target):
        shape = (self.num_classes, *self.out_features)
        linear_bias = None if self.linear.bias is None else self.linear.bias.reshape(shape)
        return linear_cross_entropy(input, self.linear.weight.reshape(*shape, self.linear.in_features), target,
                                    linear_bias=linear_bias, weight=self.weight, reduction=self.reduction,
                                    ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
                                    options=self.options, z_loss=self.z_loss, softcap=self.softcap,
                                    memory=self.memory)

    def extra_repr(self):
        return f"{super().extra_repr()}, z_loss={self.z_loss}, softcap={self.softcap}, memory={self.memory!r}"
