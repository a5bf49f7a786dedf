"""The float64 numpy reference of every fastxent function: the oracle.

Every backend is tested against this module, forward and backward. Each
function computes in float64 with plain numpy, in the most direct form of the
formula docs/design.md states, then casts its outputs by the dtype rules (loss,
logsumexp and score floats: float32 for 16-bit inputs, else the input dtype;
gradients, hvp, Hessian diagonal, log_softmax, softmax: the first argument's
dtype). It is slow on purpose and trusts its inputs: the public layer
validates them before calling it. The arguments are those of the public API
minus ``backend``.

Internally the class axis is moved last, so every helper works on rows.

Decisions the contract leaves open (each backend must follow them; docs/design.md
repeats them):

* ``softcap`` is applied literally, before everything: ``c * tanh(-inf / c)``
  is ``-c``, so with a softcap a ``-inf`` score is a finite score, not a mask,
  and a ``+inf`` score is ``c`` (no NaN row).
* ``label_smoothing`` puts weight ``ε/C`` on every class, masked ones included,
  so with a ``-inf`` score anywhere in the row the smoothed loss is ``+inf``
  and that position's gradient is ``-ε w_c / C`` (what torch gives).
* An ignored row gives loss 0 and gradient 0 whatever its scores hold, NaN
  included (torch's autograd gives NaN there).
* Non-finite rows: the losses, ``score``, the hvp, ``log_softmax`` and
  ``softmax`` (as torch's) are NaN in a row holding NaN or ``+inf`` or entirely
  ``-inf``; ``logsumexp`` follows torch and scipy instead: ``-inf`` for an all
  ``-inf`` row, ``+inf`` for a row holding ``+inf`` and no NaN.
* Elementwise (sigmoid) losses evaluate their formula in IEEE arithmetic:
  ``x = +inf`` with ``z = 1`` or ``x = -inf`` with ``z = 0`` gives NaN.
"""

import numpy as np

from ._dtypes import loss_dtype, round_to
from ._score import LinearGrad, Score
from .backends import FUNCTIONS, Partials

__all__ = [*FUNCTIONS, "Score", "linear_cross_entropy", "linear_score"]

# --------------------------------------------------------------------------
# helpers: one per formula
# --------------------------------------------------------------------------


def _f64(a):
    return np.asarray(a).astype(np.float64)


def _rows(a, axis):
    """``a`` in float64 with the class axis moved last."""
    return np.moveaxis(_f64(a), axis, -1)


def _xy(a, b):
    """``a * b`` where ``a != 0``, else 0 (so ``0 * -inf`` contributes 0)."""
    return np.where(a != 0, a * b, 0.0)


def _xlogy(a, b):
    """``a * log(b)`` with the xlogy convention (0 where ``a == 0``)."""
    return _xy(a, np.log(b))


def _lse(z):
    """Row logsumexp over the last axis, ``m + log(sum(exp(z - m)))``, m the row max.

    NaN for a row holding NaN or ``+inf`` or entirely ``-inf`` (``inf - inf``),
    which is the loss's non-finite row rule.
    """
    m = np.max(z, axis=-1, keepdims=True)
    return (m + np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True)))[..., 0]


def _logsumexp(z):
    """``_lse`` with torch's convention for infinite rows: the row max when it is ±inf."""
    m = np.max(z, axis=-1)
    return np.where(np.isinf(m), m, _lse(z))


def _softcap(x, cap):
    """Scores ``c * tanh(x / c)`` and their derivative ``1 - tanh(x / c)**2``."""
    if cap is None:
        return x, 1.0
    t = np.tanh(x / cap)
    return cap * t, 1.0 - t * t


def _softmax_xent(z, a):
    """Soft-label softmax cross-entropy over the last axis.

    ``loss = sum(a) * lse(z) - sum_c a_c z_c`` (terms with ``a_c == 0``
    contribute 0), ``dloss/dz = softmax(z) * sum(a) - a``.
    Returns ``(loss, dloss/dz, lse, softmax(z))``.
    """
    lse = _lse(z)
    p = np.exp(z - lse[..., None])
    total = np.sum(a, axis=-1)
    loss = total * lse - np.sum(_xy(a, z), axis=-1)
    grad = p * total[..., None] - a
    return loss, grad, lse, p


def _sigmoid(x):
    """``1 / (1 + exp(-x))`` without overflow: ``exp`` only of ``-|x|``."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _clip_bounds(epsilon, dtype):
    """Keras's clip bounds ``[epsilon, 1 - epsilon]``, each rounded to the input dtype."""
    return round_to(epsilon, dtype), round_to(1.0 - epsilon, dtype)


def _clip(q, lo, hi):
    """``clip(q, lo, hi)`` and where it passes the gradient (``lo <= q <= hi``, torch.clamp)."""
    return np.clip(q, lo, hi), (q >= lo) & (q <= hi)


def _categorical(p, y, lo, hi):
    """Keras's categorical cross-entropy of probabilities over the last axis.

    ``q = p / s`` with ``s = sum(p)``, ``loss = -sum_c y_c log clip(q_c)``;
    with ``g = dloss/dq`` (0 where clipped),
    ``dloss/dp_k = g_k / s - sum_j g_j p_j / s**2 = (g_k - sum_j g_j q_j) / s``, evaluated
    in the last form: ``s**2`` leaves the float range for ``s`` beyond 1.3e154 (probabilities
    near the float64 maximum) or below 1e-154, where the gradient does not.
    Returns ``(loss, dloss/dp)``.
    """
    s = np.sum(p, axis=-1, keepdims=True)
    q = p / s
    qc, inside = _clip(q, lo, hi)
    loss = -np.sum(_xlogy(y, qc), axis=-1)
    g = np.where(inside, -_xy(y, 1.0 / qc), 0.0)
    grad = (g - np.sum(g * q, axis=-1, keepdims=True)) / s
    return loss, grad


def _targets(labels, ignore_index, num_classes):
    """``(kept, target, onehot)``: rows not ignored, labels with ignored rows set to 0, one-hot."""
    labels = np.asarray(labels).astype(np.int64)
    if ignore_index is None:
        kept = np.ones(labels.shape, dtype=bool)
    else:
        kept = labels != ignore_index
    target = np.where(kept, labels, 0)
    onehot = (target[..., None] == np.arange(num_classes)).astype(np.float64)
    return kept, target, onehot


def _reduce(loss, reduction, denominator):
    """``loss`` itself, its sum, or its sum over ``denominator`` (0.0 when that is 0)."""
    if reduction == "none":
        return loss
    total = np.sum(loss)
    if reduction == "sum":
        return total
    return total / denominator if denominator != 0 else 0.0


def _grad_scale(shape, reduction, denominator, grad_output):
    """``d sum(grad_output * reduced) / d loss_i`` in the unreduced loss's shape."""
    g = np.ones(()) if grad_output is None else _f64(grad_output)
    if reduction == "none":
        return np.broadcast_to(g, shape)
    g = g.reshape(())
    if reduction == "mean":
        g = g / denominator
    return np.broadcast_to(g, shape)


def _finish(loss, dloss, like, *, reduction, denominator, return_grad, grad_output, axis=None):
    """Reduce and cast the loss; with ``return_grad`` chain ``dloss`` (per-element
    gradient, class axis last when ``axis`` is given) through the reduction and
    ``grad_output``, move the class axis back to ``axis`` and cast to ``like``'s dtype."""
    dtype = np.asarray(like).dtype
    out = np.asarray(_reduce(loss, reduction, denominator), dtype=loss_dtype(dtype))
    if not return_grad:
        return out
    if reduction == "mean" and denominator == 0:
        grad = np.zeros_like(dloss)
    else:
        g = _grad_scale(loss.shape, reduction, denominator, grad_output)
        grad = dloss * (g if axis is None else g[..., None])
    if axis is not None:
        grad = np.moveaxis(grad, -1, axis)
    return out, grad.astype(dtype)


# --------------------------------------------------------------------------
# softmax family
# --------------------------------------------------------------------------


@np.errstate(all="ignore")
def sparse_softmax_cross_entropy(logits, labels, *, axis=-1, ignore_index=None,
                                 class_weight=None, label_smoothing=0.0, z_loss=0.0,
                                 softcap=None, reduction="none", return_grad=False,
                                 grad_output=None):
    """Softmax cross-entropy with integer class ids (torch's ``cross_entropy``).

    With ``z = softcap * tanh(x / softcap)`` (``z = x`` when None), ``lse = logsumexp(z)``,
    ``w`` = ``class_weight`` (ones when None), ``ε`` = ``label_smoothing``, ``C`` classes,
    per row that is not ignored::

        l_i = (1-ε) w[y_i] (lse - z_{y_i}) + (ε/C) Σ_c w_c (lse - z_c) + z_loss * lse**2

    that is the soft-label loss with ``a = (1-ε) w[y_i] onehot(y_i) + (ε/C) w``,
    gradient ``(softmax(z) Σ_c a_c - a + 2 z_loss lse softmax(z)) * dz/dx``.
    Rows with ``labels == ignore_index`` give loss 0 and gradient 0. ``"mean"``
    divides by ``Σ w[y_i]`` over the rows not ignored (0.0 when that is 0).

    Parameters
    ----------
    logits : ndarray, float16/bfloat16/float32/float64, class axis ``axis``.
    labels : ndarray of int, the logits' shape minus the class axis.
    axis, ignore_index, class_weight, label_smoothing, z_loss, softcap, reduction,
    return_grad, grad_output : as in ``fastxent.sparse_softmax_cross_entropy``.

    Returns
    -------
    loss : ndarray, loss dtype; the logits' shape minus the class axis, or 0-d when reduced.
    grad : ndarray, logits' dtype and shape; only with ``return_grad``.

    Examples
    --------
    >>> sparse_softmax_cross_entropy(np.zeros((1, 2)), np.array([0]))  # log 2
    array([0.69314718])
    """
    x = _rows(logits, axis)
    num_classes = x.shape[-1]
    kept, target, onehot = _targets(labels, ignore_index, num_classes)
    w = np.ones(num_classes) if class_weight is None else _f64(class_weight)
    eps = float(label_smoothing)
    a = (1.0 - eps) * w[target][..., None] * onehot + (eps / num_classes) * w
    z, dz = _softcap(x, softcap)
    loss, grad, lse, p = _softmax_xent(z, a)
    if z_loss:  # off adds exactly 0 (lse**2 overflows float64 from |lse| = 1.3e154: 0 * inf = NaN)
        loss = loss + z_loss * lse * lse  # (z_loss lse) lse: finite wherever the term is
        grad = grad + 2.0 * z_loss * lse[..., None] * p
    grad = grad * dz
    loss = np.where(kept, loss, 0.0)
    grad = np.where(kept[..., None], grad, 0.0)
    denominator = np.sum(w[target][kept])
    return _finish(loss, grad, logits, reduction=reduction, denominator=denominator,
                   return_grad=return_grad, grad_output=grad_output, axis=axis)


@np.errstate(all="ignore")
def softmax_cross_entropy(logits, labels, *, axis=-1, label_smoothing=0.0, softcap=None,
                          reduction="none", return_grad=False, grad_output=None):
    """Softmax cross-entropy with soft labels (TensorFlow's value, torch's gradient).

    With ``z = softcap * tanh(x / softcap)`` (``z = x`` when None) and
    ``y' = (1-ε) y + ε/C``, per row::

        loss = Σ_c y'_c * lse(z) - Σ_c y'_c z_c     (terms with y'_c == 0 contribute 0)
        grad = (softmax(z) Σ_c y'_c - y') * dz/dx

    Labels need not sum to 1. ``"mean"`` divides by the number of rows.

    Parameters
    ----------
    logits : ndarray, float16/bfloat16/float32/float64, class axis ``axis``.
    labels : ndarray, float or bool, the logits' shape.
    axis, label_smoothing, softcap, reduction, return_grad, grad_output :
        as in ``fastxent.softmax_cross_entropy``.

    Returns
    -------
    loss : ndarray, loss dtype; the logits' shape minus the class axis, or 0-d when reduced.
    grad : ndarray, logits' dtype and shape; only with ``return_grad``.

    Examples
    --------
    >>> softmax_cross_entropy(np.zeros((1, 2)), np.array([[0.5, 0.5]]))  # log 2
    array([0.69314718])
    """
    x = _rows(logits, axis)
    y = _rows(labels, axis)
    eps = float(label_smoothing)
    a = (1.0 - eps) * y + eps / x.shape[-1]
    z, dz = _softcap(x, softcap)
    loss, grad, _, _ = _softmax_xent(z, a)
    return _finish(loss, grad * dz, logits, reduction=reduction, denominator=loss.size,
                   return_grad=return_grad, grad_output=grad_output, axis=axis)


# --------------------------------------------------------------------------
# sigmoid family
# --------------------------------------------------------------------------


@np.errstate(all="ignore")
def sigmoid_cross_entropy(logits, labels, *, pos_weight=None, label_smoothing=0.0,
                          reduction="none", return_grad=False, grad_output=None):
    """Elementwise sigmoid cross-entropy (TensorFlow's ``weighted_cross_entropy_with_logits``).

    With ``z' = (1-ε) z + ε/2`` and ``q`` = ``pos_weight`` (1 when None)::

        loss = (1-z') x + (1 + (q-1) z') (log1p(exp(-|x|)) + max(-x, 0))
        grad = (1-z') - (1 + (q-1) z') sigmoid(-x)

    which is ``max(x,0) - x z' + log1p(exp(-|x|))`` for ``q = 1``. For ``x < 0`` the two
    linear terms are added first, ``(1-z') x + (1 + (q-1) z') (-x) = -q z' x``: each of
    them alone overflows float64 at |x| ~ 1.8e308 / (1 + (q-1) z') where the loss need not
    (x = -1.7e308, z' = 0.3, q = 3: 0.9 |x|). ``x = -inf`` gives NaN, the literal
    formula's ``-inf + inf``. ``"mean"`` divides by the number of elements.

    Parameters
    ----------
    logits : ndarray, float16/bfloat16/float32/float64.
    labels : ndarray, float or bool, the logits' shape.
    pos_weight : None, scalar or ndarray broadcastable to the logits.
    label_smoothing, reduction, return_grad, grad_output :
        as in ``fastxent.sigmoid_cross_entropy``.

    Returns
    -------
    loss : ndarray, loss dtype; the logits' shape, or 0-d when reduced.
    grad : ndarray, logits' dtype and shape; only with ``return_grad``.

    Examples
    --------
    >>> sigmoid_cross_entropy(np.zeros(1), np.ones(1))  # log 2
    array([0.69314718])
    """
    x = _f64(logits)
    eps = float(label_smoothing)
    z = (1.0 - eps) * _f64(labels) + eps / 2.0
    q = 1.0 if pos_weight is None else _f64(pos_weight)
    log_weight = 1.0 + (q - 1.0) * z
    linear = np.where(x >= 0, (1.0 - z) * x, -(q * z) * x)
    loss = np.where(x == -np.inf, np.nan, linear + log_weight * np.log1p(np.exp(-np.abs(x))))
    grad = (1.0 - z) - log_weight * _sigmoid(-x)
    return _finish(loss, grad, logits, reduction=reduction, denominator=loss.size,
                   return_grad=return_grad, grad_output=grad_output)


# --------------------------------------------------------------------------
# probability inputs (Keras 3, from_logits=False)
# --------------------------------------------------------------------------


@np.errstate(all="ignore")
def binary_cross_entropy(probs, labels, *, epsilon=1e-7, label_smoothing=0.0,
                         reduction="none", return_grad=False, grad_output=None):
    """Elementwise binary cross-entropy of probabilities (Keras 3).

    With ``p' = clip(p, lo, hi)``, ``lo = epsilon`` and ``hi = 1 - epsilon`` each
    rounded to the probs' dtype (``hi`` is 1.0 for 16-bit), ``z' = (1-ε) z + ε/2``::

        loss = -(z' log p' + (1-z') log(1-p'))      (zero-weight terms contribute 0)
        grad = -(z'/p' - (1-z')/(1-p'))  where lo <= p <= hi, else 0

    ``"mean"`` divides by the number of elements.

    Parameters
    ----------
    probs : ndarray, float16/bfloat16/float32/float64.
    labels : ndarray, float or bool, the probs' shape.
    epsilon, label_smoothing, reduction, return_grad, grad_output :
        as in ``fastxent.binary_cross_entropy``.

    Returns
    -------
    loss : ndarray, loss dtype; the probs' shape, or 0-d when reduced.
    grad : ndarray, probs' dtype and shape (w.r.t. the unclipped probs); only with ``return_grad``.

    Examples
    --------
    >>> binary_cross_entropy(np.array([0.5]), np.ones(1))  # log 2
    array([0.69314718])
    """
    p = _f64(probs)
    eps = float(label_smoothing)
    z = (1.0 - eps) * _f64(labels) + eps / 2.0
    pc, inside = _clip(p, *_clip_bounds(epsilon, np.asarray(probs).dtype))
    loss = -(_xlogy(z, pc) + _xlogy(1.0 - z, 1.0 - pc))
    grad = np.where(inside, -(_xy(z, 1.0 / pc) - _xy(1.0 - z, 1.0 / (1.0 - pc))), 0.0)
    return _finish(loss, grad, probs, reduction=reduction, denominator=loss.size,
                   return_grad=return_grad, grad_output=grad_output)


@np.errstate(all="ignore")
def categorical_cross_entropy(probs, labels, *, axis=-1, epsilon=1e-7, label_smoothing=0.0,
                              reduction="none", return_grad=False, grad_output=None):
    """Categorical cross-entropy of probabilities (Keras 3).

    With ``s = Σ_c p_c``, ``q = clip(p / s, lo, hi)`` (bounds as in
    ``binary_cross_entropy``) and ``y' = (1-ε) y + ε/C``, per row::

        loss = -Σ_c y'_c log q_c                     (terms with y'_c == 0 contribute 0)
        g_k  = -y'_k / q_k where lo <= p_k/s <= hi, else 0
        grad_k = (g_k - Σ_j g_j p_j / s) / s          (through the normalisation)

    ``"mean"`` divides by the number of rows.

    Parameters
    ----------
    probs : ndarray, float16/bfloat16/float32/float64, class axis ``axis``.
    labels : ndarray, float or bool, the probs' shape.
    axis, epsilon, label_smoothing, reduction, return_grad, grad_output :
        as in ``fastxent.categorical_cross_entropy``.

    Returns
    -------
    loss : ndarray, loss dtype; the probs' shape minus the class axis, or 0-d when reduced.
    grad : ndarray, probs' dtype and shape; only with ``return_grad``.

    Examples
    --------
    >>> categorical_cross_entropy(np.array([[1.0, 1.0]]), np.array([[1.0, 0.0]]))  # log 2
    array([0.69314718])
    """
    p = _rows(probs, axis)
    eps = float(label_smoothing)
    y = (1.0 - eps) * _rows(labels, axis) + eps / p.shape[-1]
    loss, grad = _categorical(p, y, *_clip_bounds(epsilon, np.asarray(probs).dtype))
    return _finish(loss, grad, probs, reduction=reduction, denominator=loss.size,
                   return_grad=return_grad, grad_output=grad_output, axis=axis)


@np.errstate(all="ignore")
def sparse_categorical_cross_entropy(probs, labels, *, axis=-1, epsilon=1e-7, ignore_index=None,
                                     reduction="none", return_grad=False, grad_output=None):
    """Sparse categorical cross-entropy of probabilities (Keras 3, ``ignore_class``).

    ``categorical_cross_entropy`` with ``y = onehot(labels)``: per row
    ``loss = -log clip(p_y / Σ_c p_c, lo, hi)``. Rows with
    ``labels == ignore_index`` give loss 0 and gradient 0; ``"mean"`` divides
    by the number of rows not ignored (0.0 when there is none).

    Parameters
    ----------
    probs : ndarray, float16/bfloat16/float32/float64, class axis ``axis``.
    labels : ndarray of int, the probs' shape minus the class axis.
    axis, epsilon, ignore_index, reduction, return_grad, grad_output :
        as in ``fastxent.sparse_categorical_cross_entropy``.

    Returns
    -------
    loss : ndarray, loss dtype; the probs' shape minus the class axis, or 0-d when reduced.
    grad : ndarray, probs' dtype and shape; only with ``return_grad``.

    Examples
    --------
    >>> sparse_categorical_cross_entropy(np.array([[1.0, 1.0]]), np.array([0]))  # log 2
    array([0.69314718])
    """
    p = _rows(probs, axis)
    kept, _, onehot = _targets(labels, ignore_index, p.shape[-1])
    loss, grad = _categorical(p, onehot, *_clip_bounds(epsilon, np.asarray(probs).dtype))
    loss = np.where(kept, loss, 0.0)
    grad = np.where(kept[..., None], grad, 0.0)
    return _finish(loss, grad, probs, reduction=reduction, denominator=np.count_nonzero(kept),
                   return_grad=return_grad, grad_output=grad_output, axis=axis)


# --------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------


@np.errstate(all="ignore")
def log_softmax(x, *, axis=-1):
    """``x - lse(x)`` along ``axis``, in ``x``'s dtype.

    As torch, a row holding NaN or ``+inf`` or entirely ``-inf`` is all NaN;
    a ``-inf`` entry of another row gives ``-inf``.

    Examples
    --------
    >>> log_softmax(np.zeros(2))  # -log 2
    array([-0.69314718, -0.69314718])
    """
    rows = _rows(x, axis)
    out = rows - _lse(rows)[..., None]
    return np.moveaxis(out, -1, axis).astype(np.asarray(x).dtype)


@np.errstate(all="ignore")
def softmax(x, *, axis=-1):
    """``exp(x - lse(x))`` along ``axis``, in ``x``'s dtype (non-finite rows as ``log_softmax``).

    Examples
    --------
    >>> softmax(np.zeros(2))
    array([0.5, 0.5])
    """
    rows = _rows(x, axis)
    out = np.exp(rows - _lse(rows)[..., None])
    return np.moveaxis(out, -1, axis).astype(np.asarray(x).dtype)


@np.errstate(all="ignore")
def logsumexp(x, *, axis=-1):
    """``m + log(Σ exp(x - m))`` along ``axis``, ``m`` the row max; loss dtype.

    As torch and scipy: ``-inf`` for an all ``-inf`` row, ``+inf`` for a row
    holding ``+inf`` and no NaN, NaN for a row holding NaN.

    Examples
    --------
    >>> logsumexp(np.zeros(2))  # log 2
    array(0.69314718)
    """
    return np.asarray(_logsumexp(_rows(x, axis)), dtype=loss_dtype(np.asarray(x).dtype))


# --------------------------------------------------------------------------
# second order
# --------------------------------------------------------------------------


@np.errstate(all="ignore")
def softmax_cross_entropy_hvp(logits, v, *, axis=-1):
    """Hessian-vector product of the softmax cross-entropy w.r.t. the logits.

    Per row, with ``p = softmax(x)`` and ``H = diag(p) - p p^T`` (labels summing to 1)::

        H v = p * v - p * (p · v)

    Returns ``H v`` with the logits' shape and dtype; NaN for a row holding NaN
    or ``+inf`` or entirely ``-inf``.

    Examples
    --------
    >>> softmax_cross_entropy_hvp(np.zeros(2), np.array([1.0, 0.0]))
    array([ 0.25, -0.25])
    """
    x = _rows(logits, axis)
    u = _rows(v, axis)
    p = np.exp(x - _lse(x)[..., None])
    hv = p * u - p * np.sum(p * u, axis=-1, keepdims=True)
    return np.moveaxis(hv, -1, axis).astype(np.asarray(logits).dtype)


@np.errstate(all="ignore")
def sigmoid_cross_entropy_hessian_diag(logits, labels, *, pos_weight=None):
    """Elementwise second derivative of ``sigmoid_cross_entropy`` w.r.t. the logits.

    ``(1 + (q-1) z) s (1-s)`` with ``s = sigmoid(x)``, ``q`` = ``pos_weight`` (1 when
    None); the logits' shape and dtype.

    Examples
    --------
    >>> sigmoid_cross_entropy_hessian_diag(np.zeros(1), np.ones(1))
    array([0.25])
    """
    x = _f64(logits)
    z = _f64(labels)
    q = 1.0 if pos_weight is None else _f64(pos_weight)
    h = (1.0 + (q - 1.0) * z) * _sigmoid(x) * _sigmoid(-x)
    return np.broadcast_to(h, x.shape).astype(np.asarray(logits).dtype)


# --------------------------------------------------------------------------
# scoring bundle
# --------------------------------------------------------------------------


@np.errstate(all="ignore")
def score(logits, labels, *, axis=-1, ignore_index=None):
    """One-pass scoring bundle per row: loss, lse, target_logprob, entropy, argmax, correct.

    With ``lse = logsumexp(x)`` and ``p = softmax(x)``::

        loss = lse - x_y               (the unreduced sparse softmax cross-entropy)
        target_logprob = x_y - lse
        entropy = -Σ_c p_c log p_c = Σ_c p_c (lse - x_c)   (p_c == 0 terms contribute 0)
        argmax = first index of the row max (np.argmax; the first NaN if any)
        correct = argmax == y

    An ignored row has loss 0, target_logprob NaN and correct False (its lse,
    entropy and argmax are computed as usual). A row holding NaN or ``+inf`` or
    entirely ``-inf`` has NaN in every float field (loss 0 if ignored).

    Parameters
    ----------
    logits : ndarray, float16/bfloat16/float32/float64, class axis ``axis``.
    labels : ndarray of int, the logits' shape minus the class axis.
    axis, ignore_index : as in ``fastxent.score``.

    Returns
    -------
    Score
        Float fields in the loss dtype, ``argmax`` int64, ``correct`` bool; each
        with the logits' shape minus the class axis.

    Examples
    --------
    >>> score(np.array([[0.0, 1.0]]), np.array([1])).correct
    array([ True])
    """
    x = _rows(logits, axis)
    kept, target, onehot = _targets(labels, ignore_index, x.shape[-1])
    loss, _, lse, p = _softmax_xent(x, onehot)
    # sum p (lse - x), not lse - sum p x: the latter cancels at |x| ~ 1e4 (2e-9 off log 2).
    entropy = np.sum(_xy(p, lse[..., None] - x), axis=-1)
    argmax = np.asarray(np.argmax(x, axis=-1), dtype=np.int64)
    dtype = loss_dtype(np.asarray(logits).dtype)
    return Score(
        loss=np.asarray(np.where(kept, loss, 0.0), dtype=dtype),
        lse=np.asarray(lse, dtype=dtype),
        target_logprob=np.asarray(np.where(kept, -loss, np.nan), dtype=dtype),
        entropy=np.asarray(entropy, dtype=dtype),
        argmax=argmax,
        correct=np.asarray(kept & (argmax == target)),
    )


# --------------------------------------------------------------------------
# a row split along the class axis (the backend contract's block functions)
# --------------------------------------------------------------------------


@np.errstate(all="ignore")
def softmax_partials(logits, labels, offset, ignore_index, class_weight, softcap, moments):
    """Partial statistics of a block of classes ``[offset, offset + Cb)`` of each row.

    The backend contract's ``softmax_partials`` (``fastxent/backends/__init__.py``):
    ``logits`` is ``(N, Cb)``, ``labels`` None or ``(N,)`` class ids of the whole row,
    ``class_weight`` None or the full ``(C,)`` vector. With ``z`` the (soft-capped)
    scores, per row::

        peak = max_c z_c,  total = Σ_c exp(z_c - peak)   (0 for an all -inf block)
        target = z_y if offset <= y < offset + Cb and y != ignore_index, else 0
        gap = Σ_c xy(w_{offset+c}, anchor - z_c),  anchor = peak if finite, else 0
        spread = Σ_c xy(exp(z_c - peak), z_c - peak),  best = offset + argmax_c z_c

    and ``best_value`` the score at ``best`` (``gap`` only with ``class_weight``; ``spread``,
    ``best`` and ``best_value`` only with ``moments``).
    Floats in the loss dtype, ``best`` int64.

    Examples
    --------
    >>> softmax_partials(np.zeros((1, 2)), None, 0, None, None, None, False).total
    array([2.])
    """
    x = _f64(logits)
    z, _ = _softcap(x, softcap)
    rows, count = z.shape
    peak = np.max(z, axis=-1) if count else np.full(rows, -np.inf)
    shifted = z - np.where(peak == -np.inf, 0.0, peak)[..., None]
    total = np.sum(np.exp(shifted), axis=-1)
    target = np.zeros(rows)
    if labels is not None:
        local = np.asarray(labels).astype(np.int64) - offset
        inside = (local >= 0) & (local < count)
        if ignore_index is not None:
            inside &= np.asarray(labels) != ignore_index
        picked = z[np.arange(rows), np.where(inside, local, 0)] if count else target
        target = np.where(inside, picked, 0.0)
    anchor = np.zeros(rows)
    gap = np.zeros(rows)
    if class_weight is not None:
        anchor = np.where(np.isfinite(peak), peak, 0.0)
        gap = np.sum(_xy(_f64(class_weight)[offset:offset + count], anchor[..., None] - z), axis=-1)
    spread = best = best_value = None
    dtype = loss_dtype(np.asarray(logits).dtype)
    if moments:
        spread = np.asarray(np.sum(_xy(np.exp(shifted), shifted), axis=-1), dtype=dtype)
        best = np.asarray(np.argmax(x, axis=-1), dtype=np.int64)
        best_value = np.asarray(x[np.arange(rows), best], dtype=dtype)
        best = best + offset
    return Partials(*(np.asarray(v, dtype=dtype) for v in (peak, total, target, anchor, gap)), spread, best,
                    best_value)


@np.errstate(all="ignore")
def softmax_block_grad(logits, labels, offset, ignore_index, class_weight, softcap, shift, log_sum, p_coef,
                       target_coef, weight_coef):
    """The gradient of a block of classes ``[offset, offset + Cb)`` from each row's merged
    normaliser (the backend contract's ``softmax_block_grad``)::

        grad_ic = (P_i p_ic - V_i w_{offset+c} - [offset + c == y_i] Y_i) dz_ic/dx_ic,
        p_ic = exp(z_ic - shift_i - log_sum_i)

    with ``P, Y, V`` = ``p_coef, target_coef, weight_coef`` (no ``V`` term when
    ``class_weight`` is None); 0 in an ignored row. In the logits' dtype.

    Examples
    --------
    >>> softmax_block_grad(np.zeros((1, 2)), np.array([0]), 0, None, None, None,
    ...                    np.zeros(1), np.log([2.0]), np.ones(1), np.ones(1), None)
    array([[-0.5,  0.5]])
    """
    x = _f64(logits)
    z, dz = _softcap(x, softcap)
    rows, count = z.shape
    p = np.exp(z - (_f64(shift) + _f64(log_sum))[..., None])
    labels = np.asarray(labels).astype(np.int64)
    onehot = (labels - offset)[..., None] == np.arange(count)
    grad = _f64(p_coef)[..., None] * p - _f64(target_coef)[..., None] * onehot
    if class_weight is not None:
        grad = grad - _f64(weight_coef)[..., None] * _f64(class_weight)[offset:offset + count]
    grad = grad * dz
    if ignore_index is not None:
        grad = np.where((labels == ignore_index)[..., None], 0.0, grad)
    return grad.astype(np.asarray(logits).dtype)


# --------------------------------------------------------------------------
# hidden states: the linear layer, then the loss (a composition, on purpose)
# --------------------------------------------------------------------------


def _linear_logits(hidden, weight, bias):
    """``hidden @ weight.T + bias`` in float64, whole."""
    logits = _f64(hidden) @ _f64(weight).T
    return logits if bias is None else logits + _f64(bias)


def linear_cross_entropy(hidden, weight, labels, bias=None, *, ignore_index=None, class_weight=None,
                         label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="none",
                         return_grad=False, grad_output=None):
    """:func:`sparse_softmax_cross_entropy` of the logits ``hidden @ weight.T + bias``.

    The logits are formed whole in float64; with ``G`` their gradient (of
    ``sum(grad_output * loss)``), the chain rule gives::

        d/d hidden = G @ weight,   d/d weight = G.T @ hidden,   d/d bias = G.sum(0)

    (sums over every leading axis of ``hidden``).

    Parameters
    ----------
    hidden : ndarray (..., H); weight : ndarray (V, H); labels : int ndarray (...);
    bias : ndarray (V,) or None; the options as in ``fastxent.linear_cross_entropy``.

    Returns
    -------
    loss : ndarray, the loss dtype of ``hidden``; ``labels``' shape, or 0-d when reduced.
    grad : :class:`LinearGrad`, each gradient in its argument's dtype; only with ``return_grad``.

    Examples
    --------
    >>> linear_cross_entropy(np.ones((1, 2)), np.zeros((2, 2)), np.array([0]))  # log 2
    array([0.69314718])
    """
    logits = _linear_logits(hidden, weight, bias)
    out_dtype = loss_dtype(np.asarray(hidden).dtype)
    result = sparse_softmax_cross_entropy(
        logits, labels, ignore_index=ignore_index, class_weight=class_weight, label_smoothing=label_smoothing,
        z_loss=z_loss, softcap=softcap, reduction=reduction, return_grad=return_grad, grad_output=grad_output)
    if not return_grad:
        return np.asarray(result, dtype=out_dtype)
    loss, dlogits = result
    rows = dlogits.reshape(-1, logits.shape[-1])
    grad = LinearGrad(
        hidden=(dlogits @ _f64(weight)).astype(np.asarray(hidden).dtype),
        weight=(rows.T @ _f64(hidden).reshape(rows.shape[0], -1)).astype(np.asarray(weight).dtype),
        bias=None if bias is None else rows.sum(axis=0).astype(np.asarray(bias).dtype))
    return np.asarray(loss, dtype=out_dtype), grad


def linear_score(hidden, weight, labels, bias=None, *, ignore_index=None):
    """:func:`score` of the logits ``hidden @ weight.T + bias``; float fields in the loss dtype of ``hidden``.

    Examples
    --------
    >>> linear_score(np.ones((1, 2)), np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([0])).correct
    array([ True])
    """
    fields = score(_linear_logits(hidden, weight, bias), labels, ignore_index=ignore_index)
    out_dtype = loss_dtype(np.asarray(hidden).dtype)
    return Score(*(field.astype(out_dtype) if field.dtype.kind == "f" else field for field in fields))
