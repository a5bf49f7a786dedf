"""Numba kernels of the softmax family: sparse and soft-label cross-entropy, logsumexp,
log_softmax and softmax (forward, and forward+backward fused when ``grad`` is given).

Rows are processed one per ``prange`` iteration with the one-read log-sum-exp of
``_rows``; short rows (C < ``_config.NUMBA_SHORT_ROW``) a block of rows at a time.
"""

import numpy as np
from numba import prange

from ... import _config
from . import _math as nm
from ._rows import (
    capped,
    capped_slope,
    half_gap,
    inline,
    kernel,
    log_prob,
    row_exp_into,
    row_lse,
    smoothed,
    xlogy_term,
    zero_row,
)

_ROW_BLOCK = _config.NUMBA_ROW_BLOCK


@inline
def _softmax_grad(raw, coef, offset, shift, log_sum, softcap, acc):
    """``(coef * p - offset) * dt/dx`` for one score: every softmax-family gradient element.

    ``p = exp((t - shift) - log_sum)`` with ``t`` the (capped) score; sparse rows use
    ``coef = g (sum of label weights) and offset = g (e/C) w_c`` (the target's
    own term is added afterwards), soft rows ``coef = g sum(y')``, ``offset = g y'_c``.
    """
    value = capped(nm.load(raw), softcap)
    return (coef * nm.exp_approx(log_prob(value, shift, log_sum)) - offset) * capped_slope(value, softcap, acc)


@inline
def _row_stats(row, grad, i, keep_exp, softcap, acc):
    """``(shift, log_sum, 1/sum)``; the last only when the exponentials were kept in ``grad[i]``."""
    if grad is not None and keep_exp:
        return row_exp_into(row, grad[i], acc)
    shift, log_sum = row_lse(row, softcap, acc)
    return shift, log_sum, acc(0.0)


@inline
def _finish_grad_row(row, grad, grad_row, keep_exp, coef, inv_sum, shift, log_sum, offsets, offset_scale,
                     softcap, acc):
    """``grad_row[j] = (coef * p_j - offset_scale * offsets[j]) * dt/dx`` for the whole row.

    With ``keep_exp`` the row already holds ``exp(x - m)`` and ``p_j`` is one
    multiply away; otherwise ``p_j`` is recomputed from the scores (softcap,
    16-bit gradients). ``offsets`` is None for a zero offset (no weights read).
    """
    if keep_exp:
        factor = coef * inv_sum
        for j in range(row.shape[0]):
            value = nm.load(grad_row[j]) * factor
            if offsets is not None:
                value -= offset_scale * nm.load(offsets[j])
            grad_row[j] = nm.store(value, grad)
    else:
        for j in range(row.shape[0]):
            offset = acc(0.0)
            if offsets is not None:
                offset = offset_scale * nm.load(offsets[j])
            grad_row[j] = nm.store(_softmax_grad(row[j], coef, offset, shift, log_sum, softcap, acc), grad)


@inline
def _z_term(z_loss, lse):
    """PaLM's ``z_loss * lse**2``, exactly 0 when ``z_loss`` is 0 (``lse**2`` overflows
    float32 from |lse| = 1.8e19, and ``0 * inf`` would make the row NaN)."""
    return z_loss * lse * lse if z_loss != 0 else z_loss


@kernel
def sparse_kernel(logits, labels, ignore_index, class_weight, weight_total, smoothing, z_loss,
                  softcap, scale, step, keep_exp, loss, grad, acc):
    """Sparse softmax cross-entropy rows; the gradient too when ``grad`` is not None.

    ``l = (1-e) w_y (lse - t_y) + (e/C) (W lse - sum_c w_c t_c) + z lse^2``;
    ``dl/dt_c = ((1-e) w_y + (e/C) W + 2 z lse) p_c - (1-e) w_y [c == y] - (e/C) w_c``.
    """
    count = logits.shape[1]
    # Typed constants: Numba makes ``1 - float32`` a float64, which would pull
    # the per-element loops into float64.
    share = smoothing / acc(count)
    twice_share = share + share
    keep = acc(1.0) - smoothing
    half = acc(0.5)
    for i in prange(logits.shape[0]):
        label = labels[i]
        if label == ignore_index:
            loss[i] = 0
            if grad is not None:
                zero_row(grad, i, acc)
            continue
        row = logits[i]
        shift, log_sum, inv_sum = _row_stats(row, grad, i, keep_exp, softcap, acc)
        lse = shift + log_sum
        target = capped(nm.load(row[label]), softcap)
        weight = class_weight[label]
        # -log p_y = (shift - t_y) + log_sum, halved (half_gap) and weighted twice; a zero
        # weight (class_weight, or label_smoothing = 1) times an infinite -log p_y adds 0
        # (the reference's xlogy), not NaN.
        own = keep * weight
        value = xlogy_term(own + own, half_gap(shift, target, half) + log_sum * half) + _z_term(z_loss, lse)
        if smoothing != 0:
            # (e/C) sum_c w_c (shift - t_c): the smoothing term without W lse's cancellation,
            # e/C inside the sum so that it overflows only where the loss does.
            gap = acc(0.0)
            for j in range(count):
                gap += xlogy_term(twice_share * class_weight[j], half_gap(shift, capped(nm.load(row[j]), softcap), half))
            value += share * weight_total * log_sum + gap
        loss[i] = value if log_sum == log_sum else log_sum   # a NaN row is NaN whatever its weights
        if grad is not None:
            g = acc(scale[i * step])
            z_slope = acc(2.0) * z_loss * lse if z_loss != 0 else z_loss
            coef = g * (keep * weight + share * weight_total + z_slope)
            grad_row = grad[i]
            # Reading the C class weights halves the loop's speed (measured 0.74
            # vs 1.5 elements/ns): the unsmoothed loop does not touch them.
            # (Two calls, not one with an Optional argument: a literal None prunes the offset at compile time.)
            if smoothing == 0:
                _finish_grad_row(row, grad, grad_row, keep_exp, coef, inv_sum, shift, log_sum, None, acc(0.0),
                                 softcap, acc)
            else:
                _finish_grad_row(row, grad, grad_row, keep_exp, coef, inv_sum, shift, log_sum, class_weight,
                                 g * share, softcap, acc)
            # The target's own term -g (1-e) w_y: added to the kept float32/64
            # value, or the element recomputed whole (a 16-bit value rounded
            # before the subtraction would lose the cancellation's digits).
            own = g * keep * weight
            if keep_exp:
                grad_row[label] = nm.store(nm.load(grad_row[label]) - own, grad)
            else:
                offset = own + g * share * class_weight[label]
                grad_row[label] = nm.store(
                    _softmax_grad(row[label], coef, offset, shift, log_sum, softcap, acc), grad)


@kernel
def sparse_short_kernel(logits, labels, ignore_index, class_weight, z_loss, loss, acc):
    """Forward sparse cross-entropy for short rows (C < ``NUMBA_SHORT_ROW``), a block of rows at a time.

    With C = 10 a row-at-a-time loop leaves the vector units idle (8 lanes, a
    10-element loop) and pays a libm ``log`` per row: 60 ms at 1,000,000 x 10,
    slower than torch. Here each block of ``NUMBA_ROW_BLOCK`` consecutive rows
    is one flat array: the exp runs over the whole block and the log over the
    block's rows, both vectorised.
    """
    rows, count = logits.shape
    block = _ROW_BLOCK
    half = acc(0.5)
    for b in prange((rows + block - 1) // block):
        first = b * block
        size = min(block, rows - first)
        flat = logits[first:first + size].reshape(size * count)
        shifts = np.empty(size * count, dtype=acc)
        peaks = np.empty(size, dtype=acc)
        totals = np.empty(size, dtype=acc)
        for r in range(size):
            # A float max is 3x faster than integer keys on 10-element rows; a
            # NaN it skips still reaches the sum through exp(NaN - peak).
            peak = nm.load(flat[r * count])
            for c in range(1, count):
                value = nm.load(flat[r * count + c])
                peak = value if value > peak else peak
            peak = peak if peak != -np.inf else acc(0.0)
            peaks[r] = peak
            for c in range(count):
                shifts[r * count + c] = peak
        for k in range(size * count):
            shifts[k] = nm.exp_approx(nm.load(flat[k]) - shifts[k])
        for r in range(size):
            total = acc(0.0)
            for c in range(count):
                total += shifts[r * count + c]
            totals[r] = nm.log_approx(total) if total > 0 else acc(np.nan)
        for r in range(size):
            label = labels[first + r]
            if label == ignore_index:
                loss[first + r] = 0
            else:
                # the sparse kernel's target term: halved, weighted twice, 0 for a zero weight
                weight = class_weight[label]
                gap = half_gap(peaks[r], nm.load(flat[r * count + label]), half) + totals[r] * half
                lse = peaks[r] + totals[r]
                value = xlogy_term(weight + weight, gap) + _z_term(z_loss, lse)
                loss[first + r] = value if totals[r] == totals[r] else totals[r]


@kernel
def soft_kernel(logits, labels, smoothing, softcap, scale, step, keep_exp, loss, grad, acc):
    """Soft-label softmax cross-entropy rows (and gradient when ``grad`` is not None).

    ``y' = (1-e) y + e/C``; ``l = sum(y') lse - sum_c y'_c t_c`` (xlogy);
    ``dl/dt_c = p_c sum(y') - y'_c``.
    """
    count = logits.shape[1]
    share = smoothing / acc(count)
    keep = acc(1.0) - smoothing
    half = acc(0.5)
    for i in prange(logits.shape[0]):
        row = logits[i]
        targets = labels[i]
        shift, log_sum, inv_sum = _row_stats(row, grad, i, keep_exp, softcap, acc)
        label_total = acc(0.0)
        gap = acc(0.0)
        for j in range(count):
            y = smoothed(targets[j], keep, share, acc)
            label_total += y
            gap += xlogy_term(y + y, half_gap(shift, capped(nm.load(row[j]), softcap), half))
        loss[i] = label_total * log_sum + gap
        if grad is not None:
            g = acc(scale[i * step])
            grad_row = grad[i]
            if keep_exp:
                factor = g * label_total * inv_sum
                for j in range(count):
                    grad_row[j] = nm.store(nm.load(grad_row[j]) * factor - g * smoothed(targets[j], keep, share, acc),
                                           grad)
            else:
                coef = g * label_total
                for j in range(count):
                    offset = g * smoothed(targets[j], keep, share, acc)
                    grad_row[j] = nm.store(_softmax_grad(row[j], coef, offset, shift, log_sum, softcap, acc), grad)


@kernel
def lse_kernel(x, out, acc):
    """``logsumexp`` per row with torch/scipy's non-finite values: an all ``-inf``
    row gives ``-inf``, a row with ``+inf`` (and no NaN) ``+inf`` (the losses turn
    both into NaN, so ``row_lse`` does; the rare NaN rows are rescanned here)."""
    for i in prange(x.shape[0]):
        row = x[i]
        shift, log_sum = row_lse(row, None, acc)
        lse = shift + log_sum
        if lse != lse:
            has_nan = False
            has_inf = False
            for j in range(row.shape[0]):
                value = nm.load(row[j])
                has_nan |= value != value
                has_inf |= value == np.inf
            lse = acc(np.nan) if has_nan else (acc(np.inf) if has_inf else acc(-np.inf))
        out[i] = lse


@kernel
def log_softmax_kernel(x, out, exponentiate, acc):
    """``(x - shift) - log_sum`` per row, or its exp when ``exponentiate``."""
    for i in prange(x.shape[0]):
        row = x[i]
        shift, log_sum = row_lse(row, None, acc)
        if exponentiate:
            for j in range(row.shape[0]):
                out[i, j] = nm.store(nm.exp_approx(log_prob(nm.load(row[j]), shift, log_sum)), out)
        else:
            for j in range(row.shape[0]):
                out[i, j] = nm.store(log_prob(nm.load(row[j]), shift, log_sum), out)
