"""Numba kernels of the softmax family: sparse and soft-label cross-entropy, logsumexp,
log_softmax and softmax (forward, and forward+backward fused when ``grad`` is given).

Rows are processed one per ``prange`` iteration with the one-read log-sum-exp of
``_rows``; short rows (C < ``_config.NUMBA_SHORT_ROW``) a block of rows at a time.
"""

import numpy as np
from numba import prange, types
from numba.extending import overload

from ... import _config
from . import _math as nm
from ._rows import (
    capped,
    capped_slope,
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


def _gradient_row(row, grad, i, inplace):
    """Row ``i`` of the gradient; the score row itself when ``inplace`` is True, and ``row``
    as a placeholder, never written, when ``grad`` is None (forward only).

    ``inplace`` is None or True: two types, so the choice is made at compile time (each
    its own compiled kernel; a literal bool through ``numba.literally`` re-typed the kernel
    at every call, 0.9 s) and the inplace kernel holds one array: through
    ``grad[i]``, a loop that reads a score and writes its gradient gets a runtime alias
    check, which fails when the two rows are one, and runs its scalar copy (fused pass at
    1024 x 32000 float32, AVX-512: 590 ms instead of 156 ms).
    """
    raise NotImplementedError("jitted code only")


@overload(_gradient_row, inline="always")
def _gradient_row_typer(row, grad, i, inplace):
    if isinstance(grad, types.NoneType) or isinstance(inplace, types.Boolean):
        return lambda row, grad, i, inplace: row
    return lambda row, grad, i, inplace: grad[i]


@inline
def _row_stats(row, grad, grad_row, keep_exp, softcap, acc):
    """``(shift, log_sum, 1/sum)``; the last only when the exponentials were kept in ``grad_row``."""
    if grad is not None and keep_exp:
        return row_exp_into(row, grad_row, acc)
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
                  softcap, scale, step, keep_exp, inplace, loss, grad, acc):
    """Sparse softmax cross-entropy rows; the gradient too when ``grad`` is not None.

    ``grad`` may be ``logits`` itself (inplace): each row's scores are read before
    its gradient is written, except with ``keep_exp`` and label smoothing (the
    smoothing term re-reads the scores after the exponentials are stored), which
    the caller does not combine with inplace.

    ``l = (1-e) w_y (lse - t_y) + (e/C) (W lse - sum_c w_c t_c) + z lse^2``;
    ``dl/dt_c = ((1-e) w_y + (e/C) W + 2 z lse) p_c - (1-e) w_y [c == y] - (e/C) w_c``.
    """
    count = logits.shape[1]
    # Typed constants: Numba makes ``1 - float32`` a float64, which would pull
    # the per-element loops into float64.
    share = smoothing / acc(count)
    keep = acc(1.0) - smoothing
    for i in prange(logits.shape[0]):
        label = labels[i]
        if label == ignore_index:
            loss[i] = 0
            if grad is not None:
                zero_row(grad, i, acc)
            continue
        row = logits[i]
        # The target's stored score, read before the gradient pass may overwrite the
        # row (``grad`` may be ``logits`` itself: the backend's inplace mode).
        target_raw = row[label]
        grad_row = _gradient_row(row, grad, i, inplace)
        shift, log_sum, inv_sum = _row_stats(row, grad, grad_row, keep_exp, softcap, acc)
        lse = shift + log_sum
        target = capped(nm.load(target_raw), softcap)
        weight = class_weight[label]
        value = keep * weight * -log_prob(target, shift, log_sum) + _z_term(z_loss, lse)
        if smoothing != 0:
            gap = acc(0.0)   # sum_c w_c (shift - t_c): the smoothing term without W lse's cancellation
            for j in range(count):
                gap += class_weight[j] * (shift - capped(nm.load(row[j]), softcap))
            value += share * (weight_total * log_sum + gap)
        loss[i] = value
        if grad is not None:
            g = acc(scale[i * step])
            z_slope = acc(2.0) * z_loss * lse if z_loss != 0 else z_loss
            coef = g * (keep * weight + share * weight_total + z_slope)
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
                    _softmax_grad(target_raw, coef, offset, shift, log_sum, softcap, acc), grad)


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
                gap = -log_prob(nm.load(flat[r * count + label]), peaks[r], totals[r])
                lse = peaks[r] + totals[r]
                loss[first + r] = class_weight[label] * gap + _z_term(z_loss, lse)


@kernel
def soft_kernel(logits, labels, smoothing, softcap, scale, step, keep_exp, loss, grad, acc):
    """Soft-label softmax cross-entropy rows (and gradient when ``grad`` is not None).

    ``y' = (1-e) y + e/C``; ``l = sum(y') lse - sum_c y'_c t_c`` (xlogy);
    ``dl/dt_c = p_c sum(y') - y'_c``.
    """
    count = logits.shape[1]
    share = smoothing / acc(count)
    keep = acc(1.0) - smoothing
    for i in prange(logits.shape[0]):
        row = logits[i]
        targets = labels[i]
        grad_row = _gradient_row(row, grad, i, None)
        shift, log_sum, inv_sum = _row_stats(row, grad, grad_row, keep_exp, softcap, acc)
        label_total = acc(0.0)
        gap = acc(0.0)
        for j in range(count):
            y = smoothed(targets[j], keep, share, acc)
            label_total += y
            gap += xlogy_term(y, shift - capped(nm.load(row[j]), softcap))
        loss[i] = label_total * log_sum + gap
        if grad is not None:
            g = acc(scale[i * step])
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
