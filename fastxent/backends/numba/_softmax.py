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
    gradient_target,
    half_gap,
    inline,
    kernel,
    log_prob,
    normal_exp,
    normal_floor,
    row_exp_into,
    row_lse,
    scaled_exp,
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
    return (coef * normal_exp(log_prob(value, shift, log_sum), acc) - offset) * capped_slope(value, softcap, acc)


@inline
def _row_stats(row, kept, grad, keep_exp, softcap, acc):
    """``(shift, log_sum, 1/sum)``; the last only when the fused pass keeps the
    exponentials in ``kept`` (a scratch row of the accumulation type)."""
    if grad is not None and keep_exp:
        return row_exp_into(row, kept, acc)
    shift, log_sum = row_lse(row, softcap, acc)
    return shift, log_sum, acc(0.0)


@inline
def _finish_grad_row(row, grad, grad_row, kept, keep_exp, coef, inv_sum, shift, log_sum, offsets, offset_scale,
                     softcap, acc):
    """``grad_row[j] = (coef * p_j - offset_scale * offsets[j]) * dt/dx`` for the whole row.

    With ``keep_exp``, ``kept`` holds ``exp(x - m)`` and ``p_j`` is one multiply
    away; otherwise (softcap) ``p_j`` is recomputed from the scores. ``offsets`` is
    None for a zero offset (no weights read). Each score is read before its
    gradient is written, so ``grad_row`` may be ``row`` itself (in place).
    """
    if keep_exp:
        factor = coef * inv_sum
        floor = normal_floor(factor, acc)
        for j in range(row.shape[0]):
            value = scaled_exp(kept[j], factor, floor, acc)
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
                  softcap, scale, step, keep_exp, rows_per_task, loss, grad, acc):
    """Sparse softmax cross-entropy rows; the gradient too when ``grad`` is not None.

    ``l = (1-e) w_y (lse - t_y) + (e/C) (W lse - sum_c w_c t_c) + z lse^2``;
    ``dl/dt_c = ((1-e) w_y + (e/C) W + 2 z lse) p_c - (1-e) w_y [c == y] - (e/C) w_c``.
    Tasks of ``rows_per_task`` rows, each with one scratch row for the kept
    exponentials (``keep_exp``: no softcap), so 16-bit scores keep them unrounded
    too (one exp per element instead of two: the bfloat16 fused pass was 1.5x the
    float32 one in place). ``grad`` :data:`IN_PLACE` writes the gradient over
    ``logits``: a row is only overwritten by its last pass, the target score read first.
    """
    count = logits.shape[1]
    # Typed constants: Numba makes ``1 - float32`` a float64, which would pull
    # the per-element loops into float64.
    share = smoothing / acc(count)
    twice_share = share + share
    keep = acc(1.0) - smoothing
    half = acc(0.5)
    dest = gradient_target(logits, grad)
    rows = logits.shape[0]
    for task in prange((rows + rows_per_task - 1) // rows_per_task):
        kept = np.empty(count if grad is not None and keep_exp else 0, dtype=acc)
        for i in range(task * rows_per_task, min(rows, (task + 1) * rows_per_task)):
            label = labels[i]
            if label == ignore_index:
                loss[i] = 0
                if grad is not None:
                    zero_row(dest, i, acc)
                continue
            row = logits[i]
            raw_target = row[label]
            shift, log_sum, inv_sum = _row_stats(row, kept, grad, keep_exp, softcap, acc)
            lse = shift + log_sum
            target = capped(nm.load(raw_target), softcap)
            weight = class_weight[label]
            # -log p_y = (shift - t_y) + log_sum, halved (half_gap) and weighted twice: no
            # overflow where the weighted term is finite (w = 0.3, t_y = -3e38, shift = 3e38
            # in float32: 6e38 overflows, 0.3 of it does not); a zero weight (class_weight,
            # or label_smoothing = 1) times an infinite -log p_y adds 0 (xlogy), not NaN.
            own = keep * weight
            value = xlogy_term(own + own, half_gap(shift, target, half) + log_sum * half) + _z_term(z_loss, lse)
            if smoothing != 0:
                # (e/C) sum_c w_c (shift - t_c): the smoothing term without W lse's
                # cancellation, e/C inside the sum so that it overflows only where the loss does
                gap = acc(0.0)
                for j in range(count):
                    gap += xlogy_term(twice_share * class_weight[j],
                                      half_gap(shift, capped(nm.load(row[j]), softcap), half))
                value += share * weight_total * log_sum + gap
            loss[i] = value if log_sum == log_sum else log_sum   # a NaN row is NaN whatever its weights
            if grad is not None:
                g = acc(scale[i * step])
                z_slope = acc(2.0) * z_loss * lse if z_loss != 0 else z_loss
                coef = g * (keep * weight + share * weight_total + z_slope)
                grad_row = dest[i]
                # Reading the C class weights halves the loop's speed (measured 0.74
                # vs 1.5 elements/ns): the unsmoothed loop does not touch them.
                # (Two calls, not one with an Optional argument: a literal None prunes the offset at compile time.)
                if smoothing == 0:
                    _finish_grad_row(row, dest, grad_row, kept, keep_exp, coef, inv_sum, shift, log_sum, None,
                                     acc(0.0), softcap, acc)
                else:
                    _finish_grad_row(row, dest, grad_row, kept, keep_exp, coef, inv_sum, shift, log_sum,
                                     class_weight, g * share, softcap, acc)
                # The target's own term -g (1-e) w_y, subtracted before the one rounding
                # to the gradient's dtype (a 16-bit value rounded first would lose the
                # cancellation's digits).
                own = g * keep * weight
                offset = own + g * share * class_weight[label]
                if keep_exp:
                    grad_row[label] = nm.store(kept[label] * (coef * inv_sum) - offset, dest)
                else:
                    grad_row[label] = nm.store(
                        _softmax_grad(raw_target, coef, offset, shift, log_sum, softcap, acc), dest)


@inline
def _block_in(rows, ids, ignore_index, class_weight, columns, classes, targets, weights, acc):
    """The block's rows transposed, ``columns[c * ROW_BLOCK + r] = rows[r, c]``, and per
    row its class id as a float (-1 when ignored), target score and class weight.

    The one loop of the short-row kernels that cannot be unit-stride on both
    sides, left scalar on purpose (``nm.opaque_index``): for AVX-512 LLVM
    vectorised it with a scatter per vector. About 0.7 ns per element here, a
    fraction of the exp that now runs across rows; the per-row picks ride along,
    where an indexed load per row costs nothing (across rows it would be a gather).
    """
    for r in range(rows.shape[0]):
        row = rows[r]
        for c in range(row.shape[0]):
            columns[nm.opaque_index(c * _ROW_BLOCK + r)] = nm.load(row[c])
        label = ids[r]
        counted = label != ignore_index
        classes[r] = acc(label) if counted else acc(-1.0)
        targets[r] = nm.load(row[label]) if counted else acc(0.0)
        weights[r] = class_weight[label] if counted else acc(0.0)


@inline
def _per_row(scratch, k, size):
    """Slot ``k`` of a block's scratch: one value per row of the block."""
    return scratch[k * _ROW_BLOCK:k * _ROW_BLOCK + size]


@inline
def _block_out(columns, rows):
    """``rows[r, c] = columns[c * ROW_BLOCK + r]`` in the rows' dtype: the inverse copy, scalar too."""
    for r in range(rows.shape[0]):
        row = rows[r]
        for c in range(row.shape[0]):
            row[c] = nm.store(columns[nm.opaque_index(c * _ROW_BLOCK + r)], rows)


@kernel
def sparse_short_kernel(logits, labels, ignore_index, class_weight, z_loss, scale, step, loss, grad, acc):
    """Sparse cross-entropy of short rows (C < ``NUMBA_SHORT_ROW``), ``ROW_BLOCK`` rows at a time;
    the gradient too when ``grad`` is not None (:data:`IN_PLACE`: over ``logits``).

    With C = 10 a row-at-a-time loop leaves the vector units idle (16 lanes, a
    10-element loop). Each block is copied once, transposed, into a scratch of
    ``C x ROW_BLOCK`` values (:func:`_block_in`), so every pass after it runs
    across the block's rows with unit stride: the row max, ``e = exp(x - max)``
    with the row sums, the loss, and in the fused pass
    ``g ((w_y + 2 z lse) e / sum - w_y [c == y])``, copied back into the gradient.
    No label smoothing or softcap here (the row kernel has them). Each loop
    touches few arrays: every array written beside another costs LLVM a runtime
    overlap check, and past 8 checks it leaves the loop scalar (one loop doing the
    target picks and the exp ran at 5.6 ns per element instead of 1.4).
    """
    rows, count = logits.shape
    block = _ROW_BLOCK
    half = acc(0.5)
    dest = gradient_target(logits, grad)
    for b in prange((rows + block - 1) // block):
        first = b * block
        size = min(block, rows - first)
        scratch = np.empty((count + 7) * block, dtype=acc)
        columns = scratch[:count * block]
        peaks = _per_row(scratch, count, size)
        totals = _per_row(scratch, count + 1, size)
        targets = _per_row(scratch, count + 2, size)
        weights = _per_row(scratch, count + 3, size)
        classes = _per_row(scratch, count + 4, size)
        slopes = _per_row(scratch, count + 5, size)
        owns = _per_row(scratch, count + 6, size)
        _block_in(logits[first:first + size], labels[first:first + size], ignore_index, class_weight, columns,
                  classes, targets, weights, acc)
        for r in range(size):
            peaks[r] = acc(-np.inf)
            totals[r] = acc(0.0)
        for c in range(count):
            column = columns[c * block:c * block + size]
            for r in range(size):
                # a float max: a NaN it skips still reaches the sum through exp(NaN - peak)
                peaks[r] = column[r] if column[r] > peaks[r] else peaks[r]
        for r in range(size):
            peaks[r] = peaks[r] if peaks[r] != -np.inf else acc(0.0)
        for c in range(count):
            column = columns[c * block:c * block + size]
            for r in range(size):
                e = normal_exp(column[r] - peaks[r], acc)
                column[r] = e
                totals[r] += e
        out = loss[first:first + size]
        for r in range(size):
            log_sum = nm.log_approx(totals[r]) if totals[r] > 0 else acc(np.nan)
            # the row kernel's target term: halved, weighted twice, 0 for a zero weight
            gap = half_gap(peaks[r], targets[r], half) + log_sum * half
            value = xlogy_term(weights[r] + weights[r], gap) + _z_term(z_loss, peaks[r] + log_sum)
            value = value if log_sum == log_sum else log_sum   # a NaN row is NaN whatever its weight
            out[r] = value if classes[r] >= 0 else acc(0.0)
        if grad is not None:
            if step == 0:   # the gradient scale of each row, read with unit stride
                for r in range(size):
                    slopes[r] = acc(scale[0])
            else:
                row_scales = scale[first:first + size]
                for r in range(size):
                    slopes[r] = acc(row_scales[r])
            for r in range(size):
                owns[r] = slopes[r] * weights[r]   # g w_y, the target's own term
            for r in range(size):
                lse = peaks[r] + nm.log_approx(totals[r])
                z_slope = acc(2.0) * z_loss * lse if z_loss != 0 else z_loss
                slopes[r] = slopes[r] * (weights[r] + z_slope) / totals[r]   # the coefficient of e
            for c in range(count):
                column = columns[c * block:c * block + size]
                for r in range(size):
                    value = slopes[r] * column[r] - (owns[r] if classes[r] == acc(c) else acc(0.0))
                    column[r] = value if classes[r] >= 0 else acc(0.0)   # whatever an ignored row holds
            _block_out(columns, dest[first:first + size])


@kernel
def soft_kernel(logits, labels, smoothing, softcap, scale, step, keep_exp, rows_per_task, loss, grad, acc):
    """Soft-label softmax cross-entropy rows (and gradient when ``grad`` is not None).

    ``y' = (1-e) y + e/C``; ``l = sum(y') lse - sum_c y'_c t_c`` (xlogy);
    ``dl/dt_c = p_c sum(y') - y'_c``. Tasks, kept exponentials and ``grad``
    :data:`IN_PLACE` as in :func:`sparse_kernel`.
    """
    count = logits.shape[1]
    share = smoothing / acc(count)
    keep = acc(1.0) - smoothing
    half = acc(0.5)
    dest = gradient_target(logits, grad)
    rows = logits.shape[0]
    for task in prange((rows + rows_per_task - 1) // rows_per_task):
        kept = np.empty(count if grad is not None and keep_exp else 0, dtype=acc)
        for i in range(task * rows_per_task, min(rows, (task + 1) * rows_per_task)):
            row = logits[i]
            targets = labels[i]
            shift, log_sum, inv_sum = _row_stats(row, kept, grad, keep_exp, softcap, acc)
            label_total = acc(0.0)
            gap = acc(0.0)
            for j in range(count):
                y = smoothed(targets[j], keep, share, acc)
                label_total += y
                # halved and weighted twice (sparse_kernel): no overflow where y' (shift - t) is finite
                gap += xlogy_term(y + y, half_gap(shift, capped(nm.load(row[j]), softcap), half))
            loss[i] = label_total * log_sum + gap
            if grad is not None:
                g = acc(scale[i * step])
                grad_row = dest[i]
                if keep_exp:
                    factor = g * label_total * inv_sum
                    floor = normal_floor(factor, acc)
                    for j in range(count):
                        own = g * smoothed(targets[j], keep, share, acc)
                        grad_row[j] = nm.store(scaled_exp(kept[j], factor, floor, acc) - own, dest)
                else:
                    coef = g * label_total
                    for j in range(count):
                        offset = g * smoothed(targets[j], keep, share, acc)
                        grad_row[j] = nm.store(_softmax_grad(row[j], coef, offset, shift, log_sum, softcap, acc),
                                               dest)


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
                out[i, j] = nm.store(normal_exp(log_prob(nm.load(row[j]), shift, log_sum), acc), out)
        else:
            for j in range(row.shape[0]):
                out[i, j] = nm.store(log_prob(nm.load(row[j]), shift, log_sum), out)
