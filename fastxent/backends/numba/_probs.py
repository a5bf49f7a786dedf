"""Numba kernels of the probability-input family (Keras ``from_logits=False``):
binary cross-entropy (elementwise) and categorical / sparse categorical
cross-entropy (rows).

Probabilities are clipped to ``[lo, hi]`` (``epsilon`` and ``1 - epsilon``
rounded to the input dtype by the caller); the gradient is that of the clipped
formula, zero where the clip is active.
"""

import numpy as np
from numba import prange

from . import _math as nm
from ._rows import gradient_slice, gradient_target, inline, kernel, smoothed, window, xlogy_term, zero_row


@inline
def _clip(q, lo, hi):
    """``np.clip(q, lo, hi)``: NaN stays NaN."""
    return lo if q < lo else (hi if q > hi else q)


@inline
def _passes(q, lo, hi):
    """Where the clip passes the gradient: ``lo <= q <= hi`` (torch.clamp; False for NaN)."""
    return (q >= lo) & (q <= hi)


@inline
def _neg_log_slope(weight, q, clipped, lo, hi, acc):
    """``d/dq -weight * log(clip(q))``: ``-weight / clip(q)`` where the clip passes
    it, else 0; 0 where ``weight == 0`` (the xlogy convention: a 16-bit upper bound
    ``1 - epsilon`` rounds to 1, so ``1 - clip(q)`` can be 0).

    One select on both conditions after an unconditional division: the xlogy
    helper's select around the division kept LLVM from vectorising the
    categorical gradient loop (the division sank into a branch).
    """
    slope = -weight / clipped
    keep = _passes(q, lo, hi) & (weight != 0)
    return slope if keep else acc(0.0)


@kernel
def binary_kernel(probs, labels, lo_clip, hi_clip, keep, share, scale, scale_period, block, loss, totals, grad,
                  acc):
    """Keras binary cross-entropy over flat elements; the gradient too when ``grad`` is not None.

    ``p' = clip(p)``, ``z' = keep z + share``: ``loss = -(z' log p' + (1-z') log(1-p'))``
    (xlogy terms), ``grad = g (-z'/p' + (1-z')/(1-p'))`` where the clip passes, else 0.
    ``totals`` and ``grad`` :data:`IN_PLACE` as in the sigmoid kernel.
    """
    size = probs.shape[0]
    dest = gradient_target(probs, grad)
    for b in prange((size + block - 1) // block):
        lo = b * block
        hi = min(lo + block, size)
        p = probs[lo:hi]
        z = labels[lo:hi]
        if loss is not None:
            out = loss[lo:hi]
        if grad is not None:
            dx = gradient_slice(p, grad, lo, hi)
        g = window(scale, scale_period, lo, hi)
        subtotal = acc(0.0)
        for j in range(hi - lo):
            value = nm.load(p[j])
            target = smoothed(z[j], keep, share, acc)
            rest = acc(1.0) - target
            clipped = _clip(value, lo_clip, hi_clip)
            element = -(xlogy_term(target, nm.log_approx(clipped)) + xlogy_term(rest, nm.log1p_approx(-clipped)))
            if loss is not None:
                out[j] = element
            else:
                subtotal += element
            if grad is not None:
                slope = (_neg_log_slope(target, value, clipped, lo_clip, hi_clip, acc)
                         - _neg_log_slope(rest, value, acc(1.0) - clipped, lo_clip, hi_clip, acc))
                dx[j] = nm.store(g[j] * slope, dest)
        if totals is not None:
            totals[b] = subtotal


@kernel
def categorical_kernel(probs, labels, lo, hi, keep, share, scale, step, loss, grad, acc):
    """Keras categorical cross-entropy rows (and gradient when ``grad`` is not None).

    ``s = sum p``, ``q = p / s``, ``l = -sum_c y'_c log clip(q_c)``, ``y' = keep y + share``;
    with ``g_c = dl/dq_c`` (0 where clipped), ``dl/dp_k = (g_k - sum_j g_j q_j) / s``.
    Three passes over a row: its sum, the loss (and ``sum g q``), the gradient.
    """
    count = probs.shape[1]
    for i in prange(probs.shape[0]):
        row = probs[i]
        targets = labels[i]
        total = acc(0.0)
        for j in range(count):
            total += nm.load(row[j])
        inverse = acc(1.0) / total
        value = acc(0.0)
        dot = acc(0.0)
        for j in range(count):
            q = nm.load(row[j]) * inverse
            clipped = _clip(q, lo, hi)
            y = smoothed(targets[j], keep, share, acc)
            value -= xlogy_term(y, nm.log_approx(clipped))
            if grad is not None:
                dot += _neg_log_slope(y, q, clipped, lo, hi, acc) * q
        loss[i] = value
        if grad is not None:
            g = acc(scale[i * step]) * inverse
            grad_row = grad[i]
            for j in range(count):
                q = nm.load(row[j]) * inverse
                slope = _neg_log_slope(smoothed(targets[j], keep, share, acc), q, _clip(q, lo, hi), lo, hi, acc)
                grad_row[j] = nm.store(g * (slope - dot), grad)


@kernel
def sparse_categorical_kernel(probs, labels, ignore_index, lo, hi, scale, step, loss, grad, acc):
    """Keras sparse categorical cross-entropy rows: ``l = -log clip(p_y / s)``.

    ``dl/dp_k = g ([k == y] - q_y) / s`` with ``g = -1 / clip(q_y)`` (0 where clipped).
    Ignored rows give loss 0 and gradient 0 whatever they hold.
    """
    count = probs.shape[1]
    for i in prange(probs.shape[0]):
        label = labels[i]
        if label == ignore_index:
            loss[i] = 0
            if grad is not None:
                zero_row(grad, i, acc)
            continue
        row = probs[i]
        total = acc(0.0)
        zeros = acc(0.0)   # sum_j 0 * p_j: 0, or NaN once a p_j is infinite or NaN
        for j in range(count):
            value = nm.load(row[j])
            total += value
            zeros += acc(0.0) * value
        inverse = acc(1.0) / total
        q = nm.load(row[label]) * inverse
        clipped = _clip(q, lo, hi)
        loss[i] = -nm.log_approx(clipped)
        if grad is not None:
            g = acc(scale[i * step]) * inverse
            if zeros != zeros:
                # as categorical rows and the reference: sum_j g_j p_j meets 0 * inf. Not for
                # a sum that overflows with every p_j finite (each g_j p_j is then 0).
                g = acc(np.nan)
            slope = _neg_log_slope(acc(1.0), q, clipped, lo, hi, acc)
            other = -g * (slope * q)
            grad_row = grad[i]
            for j in range(count):
                grad_row[j] = nm.store(other, grad)
            grad_row[label] = nm.store(g * (slope - slope * q), grad)
