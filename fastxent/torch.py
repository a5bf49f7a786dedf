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
Each loss is one ``torch.autograd.Function`` (``forward`` + ``setup_context``,
so ``torch.func`` can transform it). Its forward runs fastxent's fused pass
(``return_grad=True``): one read of the logits yields the loss and ``G``, the
gradient of the (reduced) loss. The Function returns both; the public function
hands out the loss, and ``G`` is saved for backward as an *output* (no copy).
The logits are not saved. Backward returns ``G`` as is when the incoming
gradient is exactly 1 (``loss.backward()`` on a mean or sum: a read of a CPU
scalar, only on plain CPU tensors outside ``torch.func`` transforms and
``create_graph``, so never a device sync and never under ``vmap``), and
otherwise ``G`` times the incoming gradient (one elementwise pass, which
``vmap`` batches like any torch op).

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

(``bench/bench_train_step.py`` measures both.) When no derivative is needed
(``torch.no_grad()``, logits that do not require grad, no forward-mode
tangent, no ``torch.func`` transform) the forward-only kernel runs and nothing
is saved.

Forward mode and second order
-----------------------------
* **Forward mode** (``torch.autograd.forward_ad``, ``torch.func.jvp``,
  ``jacfwd``): the loss's tangent is ``G`` dotted with the input's tangent,
  per row (the fused gradient, no second pass over the logits).
* **Second order** (``create_graph=True``, ``gradgradcheck``,
  ``torch.autograd.functional.hessian``, ``torch.func.hessian``): because ``G``
  is an output of the Function, the graph of a ``create_graph`` backward
  (``G`` times the incoming gradient) leads back to the Function, whose
  backward then receives the incoming gradient ``v`` of ``G`` and returns the
  Hessian-vector product ``H v``, the formula of
  ``fastxent.softmax_cross_entropy_hvp`` (``p*v - p*(p.v)`` per row, scaled)
  and of ``fastxent.sigmoid_cross_entropy_hessian_diag``. ``H v`` is computed
  from ``G`` itself with torch ops, as torch's own ``log_softmax`` backward is
  computed from its saved output: per row ``G = s (k p - b)`` with ``s`` the
  reduction's scale and ``b`` the label weights (from ``target``, ``weight``
  and the smoothing), so ``U = G + s b = s k p`` and::

      H v = U*v - (K - 2 z_loss s) / K**2 * U (U.v),   K = sum_c U

  (sigmoid: ``U = G + s w q z = s w k sigmoid(x)``, ``H = U - U**2 / K``,
  ``K = s w (1 + (q - 1) z)``). Since these are differentiable torch ops on
  an output of the Function, third and higher derivatives follow the same way,
  and the first-order path is unchanged: no logits kept, no extra pass. The
  fused HVP kernels themselves need the logits, which this adapter does not
  keep; the tests hold these Hessians to ``fastxent.softmax_cross_entropy_hvp``
  and ``fastxent.sigmoid_cross_entropy_hessian_diag``. Where ``K`` is 0 the
  row's Hessian is taken as 0 (exact unless ``z_loss`` > 0 meets a row whose
  coefficient ``k + 2 z_loss lse`` is exactly 0). 16-bit inputs get a Hessian
  as precise as their 16-bit ``G``.
  With ``softcap`` the gradient no longer determines the capped scores, so the
  logits are saved as well (N*C*b more between forward and backward, softcap
  only) and ``H v`` is computed from them with torch ops (chain rule through
  ``c tanh(x/c)``).
* **vmap** (``torch.func.vmap`` of the loss): one fused call per batch entry
  (the Function's ``vmap`` rule), stacked; the backward, forward-mode and
  second-order formulas are torch ops and batch natively, so ``gradcheck``'s
  batched-gradient check, ``jacrev`` and ``jacfwd`` work.

Derivatives with respect to ``target`` (which torch provides) are not
computed by the fused kernel: when ``target`` (or ``weight``/``pos_weight``)
requires grad or carries a forward-mode tangent, the call is delegated to
torch's own function, so results stay exact (and torch raises its own error
where it has no such derivative); under ``torch.func.jvp`` with a tangent on
``target`` the forward-mode rule raises a ``RuntimeError`` instead of
dropping it. Under ``torch.compile`` the functions here are a graph break
(``torch.compiler.disable``): the model around them is compiled, the loss runs
eagerly.

Torch's result where fastxent's own rule differs: a ``"mean"`` whose
denominator ``sum_i w[y_i]`` is zero (all rows ignored, an empty batch,
weights summing to 0; any real weights are accepted) is torch's division by
zero (NaN or +-inf, with torch's gradient), and a class dimension of size 0 is
torch's own computation. Deliberate differences from torch: a cross-entropy
over a single class (C == 1, always 0 in torch) is a ``ValueError`` pointing
to ``binary_cross_entropy_with_logits``, as everywhere in fastxent; bad
targets are ``ValueError``/``TypeError`` naming the offending value;
class-index targets may be any integer dtype (torch wants int64 or uint8).
"""

import contextlib
import math
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn import _reduction

import fastxent as fx
from fastxent import _dispatch, _reductions
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

#: torch's own functions, captured at import: the delegations call these even
#: where a test (or a user) has put fastxent's functions in their place.
_torch_cross_entropy = F.cross_entropy
_torch_bce_with_logits = F.binary_cross_entropy_with_logits
_torch_linear_cross_entropy = F.linear_cross_entropy


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


def _is_wrapped(tensor):
    """A ``torch.func`` wrapper (vmap's BatchedTensor, grad's or jvp's level wrapper), or the
    legacy BatchedTensor of ``autograd.grad(..., is_grads_batched=True)`` (gradcheck's batched check)."""
    if tensor is None:
        return False
    functorch = torch._C._functorch
    return functorch.is_functorch_wrapped_tensor(tensor) or functorch.is_legacy_batchedtensor(tensor)


def _has_tangent(tensor):
    """A forward-mode dual tensor of ``torch.autograd.forward_ad`` (no tangent outside a dual level)."""
    return tensor is not None and torch.autograd.forward_ad.unpack_dual(tensor).tangent is not None


def _derivative_asked(input, *others):
    """True when the call must go through the autograd Function.

    Reverse mode (``input`` requires grad), a forward-mode tangent, or any
    ``torch.func`` transform (whose wrapped tensors hold no data the
    forward-only path could read; the Function's rules unwrap them).
    """
    if torch.is_grad_enabled() and input.requires_grad:
        return True
    return any(_is_wrapped(t) or _has_tangent(t) for t in (input, *others))


def _torch_derivatives(*tensors):
    """Derivatives asked of ``target``/``weight``/``pos_weight``: torch's own function computes them."""
    return any(t is not None and ((torch.is_grad_enabled() and t.requires_grad) or _has_tangent(t))
               for t in tensors)


def _nan(dtype, device):
    return torch.full((), math.nan, dtype=dtype, device=device)


def _accumulate(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scale_tensor(value, device):
    """The reduction's scale ``s`` as a 0-d float64 tensor: an output, so ``vmap`` batches it."""
    return torch.tensor(value, dtype=torch.float64, device=device)


def _is_exactly_one(grad_output):
    """The incoming gradient of ``loss.backward()``, read without a device sync.

    Only plain 0-d CPU tensors outside ``create_graph``, ``torch.func``
    transforms and forward mode are read: elsewhere the answer is "no" and
    backward multiplies (a ``BatchedTensor`` cannot be read, a CUDA read would
    be a sync).
    """
    return (not torch.is_grad_enabled() and grad_output.dim() == 0 and grad_output.device.type == "cpu"
            and not _is_wrapped(grad_output) and not _has_tangent(grad_output)
            and grad_output.item() == 1.0)


def _scaled(grad, grad_output, class_dim):
    """``grad`` times the incoming gradient; the saved tensor itself when that is exactly 1.

    ``class_dim`` is where the incoming per-row gradient is broadcast along the
    classes (``None`` for elementwise losses, whose gradient has the input's shape).
    """
    if grad_output.dim() == 0:
        return grad if _is_exactly_one(grad_output) else grad * grad_output
    if class_dim is not None:
        grad_output = grad_output.unsqueeze(class_dim)
    return grad * grad_output


def _tangent_of_loss(grad, tangent, class_dim, reduced, dtype):
    """``sum(G * t)``: per row (along ``class_dim``), per element (``None``) or in all (reduced)."""
    acc = _accumulate(grad.dtype)
    product = grad.to(acc) * tangent.to(acc)
    if reduced:
        return product.sum().to(dtype)
    return (product if class_dim is None else product.sum(class_dim)).to(dtype)


def _safe_inverse_where(nonzero, value):
    """``value`` where ``nonzero``, else 1: keeps a masked division's gradient finite."""
    return torch.where(nonzero, value, torch.ones_like(value))


def _stacked(function, info, in_dims, tensors, options):
    """``vmap`` rule: ``function.apply`` once per batch entry, outputs stacked on dim 0."""
    outputs = []
    for b in range(info.batch_size):
        picked = [t if d is None else t.select(d, b) for t, d in zip(tensors, in_dims)]
        outputs.append(function.apply(*picked, *options))
    stacked = tuple(torch.stack(parts) for parts in zip(*outputs))
    return stacked, (0,) * len(stacked)


# ----------------------------------------------------------------------------
# cross_entropy
# ----------------------------------------------------------------------------

class _Spec(NamedTuple):
    """The non-tensor options of one ``cross_entropy`` call."""

    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss: float
    softcap: Optional[float]


def _class_dim(input):
    if input.dim() == 0:
        raise ValueError("input must have a class dimension, got a 0-d tensor")
    return 1 if input.dim() >= 2 else 0


def _counted_weight(labels, weight, ignore_index):
    """``sum_i w[y_i]`` over the rows not ignored (the denominator of torch's mean), by
    fastxent's one rule (``_reductions.mean_denominator``), in float64."""
    xp = _dispatch.array_module(_dispatch.is_cuda_array(labels))
    weights = None if weight is None else xp.asarray(_as_array(weight.detach()), dtype=np.float64)
    return float(_reductions.mean_denominator(labels.reshape(-1), ignore_index, weights, xp))


def _torch_cross_entropy_value(input, target, weight, spec, need_grad):
    """torch's own loss (and gradient) where its rule is a division by zero."""
    with torch.enable_grad():
        x = input.detach().requires_grad_(need_grad)
        loss = _torch_cross_entropy(x, target, weight=weight, ignore_index=spec.ignore_index,
                                    reduction=spec.reduction, label_smoothing=spec.label_smoothing)
        grad = torch.autograd.grad(loss, x)[0] if need_grad else None
    return loss.detach(), grad, math.inf


def _cross_entropy_arrays(input, target, weight, spec, need_grad):
    """``(loss, grad or None, s)`` as tensors with torch's semantics, computed by fastxent.

    ``s`` is the reduction's scale (1/denominator for "mean", else 1): the
    second-order formulas need it.
    """
    class_dim = _class_dim(input)
    count = input.shape[class_dim]
    probabilities = target.shape == input.shape
    out_dtype = input.dtype
    label_smoothing, reduction = spec.label_smoothing, spec.reduction
    scale = 1.0
    with _on_stream_of(input):
        x = _as_array(input)
        if probabilities:
            if not (target.is_floating_point()):
                raise TypeError(
                    f"target has the input's shape {tuple(input.shape)}, so it holds class "
                    f"probabilities and must be floating point, got {target.dtype}")
            if spec.z_loss:
                raise ValueError(f"z_loss={spec.z_loss} applies to class-index targets only, "
                                 "not to class probabilities")
            if spec.ignore_index >= 0:  # torch's rule: negative values (the default -100) pass
                raise ValueError(f"ignore_index={spec.ignore_index}: ignore_index is not supported for "
                                 "floating point target (class probabilities)")
            if weight is not None:
                # torch: -sum_c w_c y'_c log p_c with y' the smoothed target. Folding
                # w into the labels keeps it one fused pass (fastxent's soft labels
                # need not sum to 1): the loss and the gradient are torch's.
                target = _soft_label_weights(target, weight, label_smoothing, class_dim, count)
                label_smoothing = 0.0
            y = _as_array(target)
            rows = input.numel() // max(count, 1)
            options = dict(axis=class_dim, label_smoothing=label_smoothing, softcap=spec.softcap)
            if reduction == "mean" and rows == 0:
                fx.softmax_cross_entropy(x, y, **options)  # validation only
                return _nan(out_dtype, input.device), (torch.zeros_like(input) if need_grad else None), math.inf
            if reduction == "mean":
                scale = 1.0 / rows
            result = fx.softmax_cross_entropy(x, y, **options, reduction=reduction, return_grad=need_grad)
        else:
            if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
                raise TypeError(
                    f"target of shape {tuple(target.shape)} holds class indices and must be an "
                    f"integer tensor, got {target.dtype} (class probabilities have the input's "
                    f"shape {tuple(input.shape)})")
            y = _as_array(target)
            options = dict(axis=class_dim, ignore_index=spec.ignore_index, class_weight=_optional_array(weight),
                           label_smoothing=label_smoothing, z_loss=spec.z_loss, softcap=spec.softcap)
            if reduction == "mean":
                denominator = _counted_weight(y, weight, spec.ignore_index)
                if denominator == 0.0:
                    # torch divides by zero here (NaN or +-inf); fastxent's own rule would
                    # give 0. torch's function computes it; for fastxent's extras, which
                    # torch lacks, the sum is divided by zero the same way.
                    fx.sparse_softmax_cross_entropy(x, y, **options)  # validation only
                    if not spec.z_loss and spec.softcap is None:
                        return _torch_cross_entropy_value(input, target, weight, spec, need_grad)
                    reduction = "sum"
                    scale = math.inf
                else:
                    scale = 1.0 / denominator
            result = fx.sparse_softmax_cross_entropy(x, y, **options, reduction=reduction,
                                                          return_grad=need_grad)
    loss, grad = result if need_grad else (result, None)
    loss = _as_tensor(loss).to(out_dtype)
    grad = None if grad is None else _as_tensor(grad)
    if scale == math.inf:
        loss = loss / 0.0
        grad = None if grad is None else grad / 0.0
    return loss, grad, scale


def _soft_label_weights(target, weight, label_smoothing, class_dim, count):
    """``w_c * y'_c``, ``y' = (1 - eps) y + eps / C``: torch's weighted soft labels, in float32/64."""
    acc = _accumulate(target.dtype)
    folded = target.detach().to(acc)
    if label_smoothing:
        folded = folded * (1.0 - label_smoothing) + label_smoothing / count
    if weight is None:
        return folded
    shape = [1] * target.dim()
    shape[class_dim] = count
    return folded * weight.detach().to(device=folded.device, dtype=acc).reshape(shape)


def _label_weights(input, target, weight, spec):
    """``(b, counted)`` with ``G = s (k p - b)`` per row: the labels' weights, in float32/64.

    Class indices: ``b_c = (1 - eps) w_y [c == y] + (eps / C) w_c`` on counted
    rows, 0 on ignored ones (``counted`` is the row mask, ``None`` for
    probabilities, whose ``b`` is torch's weighted smoothed target).
    Comparisons and broadcasts only, so ``vmap`` batches it.
    """
    class_dim = _class_dim(input)
    count = input.shape[class_dim]
    acc = _accumulate(input.dtype)
    if target.shape == input.shape:
        return _soft_label_weights(target, weight, spec.label_smoothing, class_dim, count), None
    shape = [1] * input.dim()
    shape[class_dim] = count
    classes = torch.arange(count, device=input.device).reshape(shape)
    counted = (target != spec.ignore_index).unsqueeze(class_dim)
    onehot = (classes == target.unsqueeze(class_dim)).to(acc) * counted
    w = (torch.ones(shape, dtype=acc, device=input.device) if weight is None
         else weight.detach().to(dtype=acc, device=input.device).reshape(shape))
    eps = spec.label_smoothing
    b = (1.0 - eps) * (onehot * w).sum(class_dim, keepdim=True) * onehot
    if eps:
        b = b + (eps / count) * w * counted
    return b, counted


def _cross_entropy_hvp(saved, spec, v):
    """``H v``, H the Hessian of the reduced loss (of each row's loss for "none"), as torch ops.

    From the saved gradient ``G`` (module docstring); with ``softcap`` from
    the saved logits. Differentiable in ``G`` (or the logits) and ``v``, so any
    order of derivative follows.
    """
    grad, scale, target, weight, logits = saved
    class_dim = _class_dim(grad)
    acc = _accumulate(grad.dtype)
    b, counted = _label_weights(grad, target, weight, spec)
    s = scale.to(acc)
    z_loss = spec.z_loss
    va = v.to(acc)
    if spec.softcap is None:
        u = grad.to(acc) + s * b
        k = u.sum(class_dim, keepdim=True)
        nonzero = k != 0
        k_safe = _safe_inverse_where(nonzero, k)
        coef = torch.where(nonzero, (k_safe - 2.0 * z_loss * s) / (k_safe * k_safe), torch.zeros_like(k))
        return (u * va - coef * u * (u * va).sum(class_dim, keepdim=True)).to(v.dtype)
    # Softcap: z = c tanh(x / c), dz/dx = d = 1 - t^2, d2z/dx2 = -2 t d / c; the
    # loss's Hessian in x is  d H_z d + diag(G_z * d2z/dx2).
    cap = spec.softcap
    t = torch.tanh(logits.to(acc) / cap)
    z = cap * t
    d = 1.0 - t * t
    dd = -2.0 * t * d / cap
    p = torch.softmax(z, class_dim)
    lse = torch.logsumexp(z, class_dim, keepdim=True)
    mask = torch.ones_like(lse) if counted is None else counted.to(acc)
    zl = z_loss * mask
    k = b.sum(class_dim, keepdim=True) + 2.0 * zl * lse
    grad_z = s * (k * p - b)
    dv = d * va
    pdv = (p * dv).sum(class_dim, keepdim=True)
    hz = s * (k * (p * dv - p * pdv) + 2.0 * zl * p * pdv)
    return (d * hz + grad_z * dd * va).to(v.dtype)


class _CrossEntropyFunction(torch.autograd.Function):
    """Fused softmax cross-entropy. Outputs ``(loss, G, s)``; module docstring for the rules."""

    @staticmethod
    def forward(input, target, weight, spec):
        loss, grad, scale = _cross_entropy_arrays(input, target, weight, spec, need_grad=True)
        return loss, grad, _scale_tensor(scale, input.device)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, spec = inputs
        _, grad, scale = output
        ctx.mark_non_differentiable(scale)
        ctx.set_materialize_grads(False)
        ctx.spec = spec
        ctx.class_dim = _class_dim(input) if spec.reduction == "none" else None
        # The logits only with softcap (module docstring); G is an output, not a copy.
        saved = (grad, scale, target, weight, input if spec.softcap is not None else None)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def backward(ctx, grad_loss, grad_grad, _grad_scale):
        saved = ctx.saved_tensors
        result = None
        if grad_loss is not None:
            result = _scaled(saved[0], grad_loss, ctx.class_dim)
        if grad_grad is not None:  # second order: the incoming gradient of G
            hvp = _cross_entropy_hvp(saved, ctx.spec, grad_grad)
            result = hvp if result is None else result + hvp
        return result, None, None, None

    @staticmethod
    def jvp(ctx, input_tangent, target_tangent, weight_tangent, _spec_tangent):
        if target_tangent is not None or weight_tangent is not None:
            raise RuntimeError(
                "fastxent.torch.cross_entropy: forward-mode derivatives with respect to target or "
                "weight are not computed by fastxent; use torch.nn.functional.cross_entropy for them")
        saved = ctx.saved_tensors
        grad = saved[0]
        reduced = ctx.spec.reduction != "none"
        loss_tangent = _tangent_of_loss(grad, input_tangent, _class_dim(grad), reduced, grad.dtype)
        return loss_tangent, _cross_entropy_hvp(saved, ctx.spec, input_tangent), None

    @staticmethod
    def vmap(info, in_dims, input, target, weight, spec):
        return _stacked(_CrossEntropyFunction, info, in_dims[:3], (input, target, weight), (spec,))


@torch.compiler.disable
def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0, *, z_loss=0.0, softcap=None):
    r"""``torch.nn.functional.cross_entropy``, computed by fastxent's fused kernel.

    Same signature and semantics as torch's: the class dimension is 1 (0 for
    a 1-D ``input``, one unbatched sample); ``target`` holds class indices
    (shape of ``input`` without the class dimension) or, when it has
    ``input``'s shape, class probabilities (floating point). Per row, with
    class weights ``w`` (ones when None; any real values) and smoothing ``eps``::

        l_i = (1-eps) * w[y_i] * (-log p_{i,y_i}) + (eps/C) * sum_c w_c (-log p_ic)

    for class indices (rows whose target is ``ignore_index`` give 0 and are not
    counted), and ``-sum_c w_c y'_ic log p_ic`` with ``y' = (1-eps) y + eps/C``
    for probabilities. ``"mean"`` divides by ``sum_i w[y_i]`` over the counted
    rows (by the number of rows for probabilities); like torch, a mean over
    nothing (all rows ignored, an empty batch) or over weights summing to 0 is
    that division by zero (NaN or +-inf), and a class dimension of size 0 is
    torch's result. The loss has ``input``'s dtype and the gradient too
    (fastxent accumulates 16-bit inputs in float32).

    Derivatives: reverse and forward mode, vmap, and any order (second order
    through the Hessian-vector product computed from the saved gradient; see
    the module docstring).

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
    and not the logits (but with ``softcap``); backward is one multiply (none
    when the incoming gradient is 1). See the module docstring for the numbers
    beside torch's.

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
    if input.shape[_class_dim(input)] == 0 or _torch_derivatives(target, weight):
        if z_loss or softcap is not None:
            raise ValueError("z_loss and softcap need at least one class, and a target and weight that "
                             "do not require grad")
        return _torch_cross_entropy(input, target, weight=weight, ignore_index=ignore_index,
                                    reduction=reduction, label_smoothing=label_smoothing)
    spec = _Spec(ignore_index, reduction, float(label_smoothing), float(z_loss),
                 None if softcap is None else float(softcap))
    if _derivative_asked(input, target, weight):
        return _CrossEntropyFunction.apply(input, target, weight, spec)[0]
    loss, _, _ = _cross_entropy_arrays(input, target, weight, spec, need_grad=False)
    return loss


# ----------------------------------------------------------------------------
# binary_cross_entropy_with_logits
# ----------------------------------------------------------------------------

def _bce_arrays(input, target, weight, pos_weight, reduction, need_grad):
    """``(loss, grad or None, s)`` as tensors, torch's semantics, computed by fastxent."""
    if target.shape != input.shape:
        raise ValueError(f"Target size ({tuple(target.shape)}) must be the same as input size "
                         f"({tuple(input.shape)})")
    if weight is not None and torch.broadcast_shapes(weight.shape, input.shape) != input.shape:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, which does not broadcast to the "
                         f"input's shape {tuple(input.shape)}")
    out_dtype = input.dtype
    numel = input.numel()
    scale = 1.0 / numel if reduction == "mean" and numel else 1.0
    with _on_stream_of(input):
        x = _as_array(input)
        z = _as_array(target)
        options = dict(pos_weight=_optional_array(pos_weight))
        if reduction == "mean" and numel == 0:
            fx.sigmoid_cross_entropy(x, z, **options)  # validation only
            return _nan(out_dtype, input.device), (torch.zeros_like(input) if need_grad else None), math.inf
        if weight is None:
            result = fx.sigmoid_cross_entropy(x, z, **options, reduction=reduction, return_grad=need_grad)
            if need_grad:
                loss, grad = result
                return _as_tensor(loss).to(out_dtype), _as_tensor(grad), scale
            return _as_tensor(result).to(out_dtype), None, scale
        # The weight multiplies each element's loss: the fused pass gets it (and
        # the mean's 1/numel) as its grad_output, the loss is weighted here.
        weight = weight.detach()
        weight_scale = weight.to(torch.float64) * scale if reduction == "mean" else weight
        result = fx.sigmoid_cross_entropy(x, z, **options, reduction="none", return_grad=need_grad,
                                               grad_output=_as_array(weight_scale) if need_grad else None)
        loss, grad = result if need_grad else (result, None)
    weighted = _as_tensor(loss) * weight.to(device=input.device)
    if reduction == "sum":
        weighted = weighted.sum(dtype=torch.float64)
    elif reduction == "mean":
        weighted = weighted.sum(dtype=torch.float64) / numel
    return weighted.to(out_dtype), (None if grad is None else _as_tensor(grad)), scale


def _bce_hvp(saved, v):
    """``H v`` (H diagonal) of the reduced loss from the saved gradient, as torch ops.

    ``U = G + s w q z = s w k sigmoid(x)``, ``K = s w k``, ``k = 1 + (q - 1) z``:
    ``H = U - U**2 / K`` (0 where K is 0, where the element's loss is flat).
    """
    grad, scale, target, weight, pos_weight = saved
    acc = _accumulate(grad.dtype)
    z = target.to(acc)
    q = 1.0 if pos_weight is None else pos_weight.to(acc)
    sw = scale.to(acc) * (1.0 if weight is None else weight.to(acc))
    u = grad.to(acc) + sw * q * z
    k = sw * (1.0 + (q - 1.0) * z)
    k = torch.broadcast_to(k, u.shape) if isinstance(k, torch.Tensor) else torch.full_like(u, k)
    nonzero = k != 0
    hessian = torch.where(nonzero, u - u * u / _safe_inverse_where(nonzero, k), torch.zeros_like(u))
    return (hessian * v.to(acc)).to(v.dtype)


class _BCEWithLogitsFunction(torch.autograd.Function):
    """Fused sigmoid cross-entropy. Outputs ``(loss, G, s)``; module docstring for the rules."""

    @staticmethod
    def forward(input, target, weight, pos_weight, reduction):
        loss, grad, scale = _bce_arrays(input, target, weight, pos_weight, reduction, need_grad=True)
        return loss, grad, _scale_tensor(scale, input.device)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, target, weight, pos_weight, reduction = inputs
        _, grad, scale = output
        ctx.mark_non_differentiable(scale)
        ctx.set_materialize_grads(False)
        ctx.reduced = reduction != "none"
        saved = (grad, scale, target, weight, pos_weight)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def backward(ctx, grad_loss, grad_grad, _grad_scale):
        saved = ctx.saved_tensors
        result = None
        if grad_loss is not None:
            result = _scaled(saved[0], grad_loss, None)
        if grad_grad is not None:  # second order: the incoming gradient of G
            hvp = _bce_hvp(saved, grad_grad)
            result = hvp if result is None else result + hvp
        return result, None, None, None, None

    @staticmethod
    def jvp(ctx, input_tangent, target_tangent, weight_tangent, pos_weight_tangent, _reduction_tangent):
        if target_tangent is not None or weight_tangent is not None or pos_weight_tangent is not None:
            raise RuntimeError(
                "fastxent.torch.binary_cross_entropy_with_logits: forward-mode derivatives with respect "
                "to target, weight or pos_weight are not computed by fastxent; use "
                "torch.nn.functional.binary_cross_entropy_with_logits for them")
        saved = ctx.saved_tensors
        grad = saved[0]
        loss_tangent = _tangent_of_loss(grad, input_tangent, None, ctx.reduced, grad.dtype)
        return loss_tangent, _bce_hvp(saved, input_tangent), None

    @staticmethod
    def vmap(info, in_dims, input, target, weight, pos_weight, reduction):
        return _stacked(_BCEWithLogitsFunction, info, in_dims[:4], (input, target, weight, pos_weight),
                        (reduction,))


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
    Derivatives: reverse and forward mode, vmap, and any order (the Hessian is
    diagonal, computed from the saved gradient; see the module docstring).

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
    if _torch_derivatives(target, weight, pos_weight):
        return _torch_bce_with_logits(input, target, weight=weight, reduction=reduction,
                                      pos_weight=pos_weight)
    if _derivative_asked(input, target, weight, pos_weight):
        return _BCEWithLogitsFunction.apply(input, target, weight, pos_weight, reduction)[0]
    loss, _, _ = _bce_arrays(input, target, weight, pos_weight, reduction, need_grad=False)
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

def _linear_fallback_reason(input, linear_weight, linear_bias, target, weight):
    """Why a call goes to torch's own function (None: fastxent runs it)."""
    if input.dim() not in (1, 2) or linear_weight.dim() != 2:
        return "shapes"   # torch raises, or a K-dimensional loss
    if target.shape == (*input.shape[:-1], linear_weight.shape[0]) or target.is_floating_point():
        return "class probabilities"
    if _torch_derivatives(target, weight):
        return "derivatives of target or weight"
    if any(_is_wrapped(t) or _has_tangent(t) for t in (input, linear_weight, linear_bias)):
        return "torch.func transforms and forward mode"
    return None


def _linear_arrays(input, linear_weight, linear_bias, target, weight, spec, memory, need_grad, grad_output=None):
    """``(loss, (grad_input, grad_weight, grad_bias) or None)`` as tensors, torch's semantics.

    A ``"mean"`` whose denominator is zero is a division by zero, as in torch (the
    public function hands such a call to torch's own function unless it has
    fastxent's extras)."""
    if target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target holds class indices and must be an integer tensor, got {target.dtype}")
    reduction = spec.reduction
    if reduction == "mean" and _counted_weight(_as_array(target), weight, spec.ignore_index) == 0.0:
        reduction = "sum"
    with _on_stream_of(input):
        result = fx.linear_cross_entropy(
            _as_array(input), _as_array(linear_weight), _as_array(target), _optional_array(linear_bias),
            ignore_index=spec.ignore_index, class_weight=_optional_array(weight),
            label_smoothing=spec.label_smoothing, z_loss=spec.z_loss, softcap=spec.softcap, reduction=reduction,
            return_grad=need_grad, grad_output=_optional_array(grad_output), memory=memory)
    loss, grads = result if need_grad else (result, None)
    loss = _as_tensor(loss).to(input.dtype)
    grads = None if grads is None else tuple(None if g is None else _as_tensor(g) for g in grads)
    if reduction != spec.reduction:
        loss = loss / 0.0
        grads = None if grads is None else tuple(None if g is None else g / 0.0 for g in grads)
    return loss, grads


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Linear layer + cross-entropy in blocks, reverse mode (as torch's chunked path). A
    reduced loss's forward computes the three gradients and backward scales them;
    ``reduction="none"`` needs each row's incoming gradient, so its backward runs the
    blocks again with it."""

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, spec, memory):
        ctx.arguments = (target, weight, spec, memory)
        if spec.reduction == "none":
            ctx.save_for_backward(input, linear_weight, linear_bias)
            return _linear_arrays(input, linear_weight, linear_bias, target, weight, spec, memory, False)[0]
        loss, grads = _linear_arrays(input, linear_weight, linear_bias, target, weight, spec, memory, True)
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "fastxent.torch.linear_cross_entropy does not support double backward (create_graph=True): "
                "its backward hands over gradients computed by the blocks, constants in the inputs; use "
                "torch.nn.functional.linear_cross_entropy with options=None where second derivatives are needed")
        target, weight, spec, memory = ctx.arguments
        if spec.reduction == "none":
            input, linear_weight, linear_bias = ctx.saved_tensors
            _, grads = _linear_arrays(input, linear_weight, linear_bias, target, weight, spec, memory, True,
                                      grad_output=grad_output)
        else:
            grads = tuple(None if g is None else _scaled(g, grad_output, None) for g in ctx.saved_tensors)
        return (*grads, None, None, None, None)


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
    ``ignore_index`` None means -100; ``weight`` rescales the classes (any sign); a mean
    over a zero denominator is torch's division by zero. ``options`` (a
    ``torch.nn.LinearCrossEntropyOptions``) is accepted and not used: the blocks follow
    ``memory``. Reverse mode only, like torch's chunked path: double backward raises.
    Calls fastxent does not run go to torch's own function: class-probability targets,
    a K-dimensional ``linear_weight``, a ``target`` or ``weight`` that requires grad, a
    mean over a zero denominator, and ``torch.func`` transforms or forward-mode tangents
    (to its reference path, ``options=None``, which supports them).

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
    reason = _linear_fallback_reason(input, linear_weight, linear_bias, target, weight)
    spec = _Spec(-100 if ignore_index is None else ignore_index, _reduction_of(None, None, reduction),
                 label_smoothing, z_loss, softcap)
    if reason is None and spec.reduction == "mean" and not z_loss and softcap is None and _counted_weight(
            _as_array(target), weight, spec.ignore_index) == 0.0:
        reason = "a mean over a zero denominator"  # torch's division by zero, its gradients
    if reason is not None:
        if z_loss or softcap is not None:
            raise ValueError(f"z_loss and softcap are fastxent extras, and this call goes to torch's own "
                             f"function ({reason})")
        return _torch_linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight, reduction=reduction,
            ignore_index=ignore_index, label_smoothing=label_smoothing,
            options=None if reason == "torch.func transforms and forward mode" else options)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, linear_weight, linear_bias)):
        return _LinearCrossEntropyFunction.apply(input, linear_weight, linear_bias, target, weight, spec, memory)
    return _linear_arrays(input, linear_weight, linear_bias, target, weight, spec, memory, False)[0]


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
