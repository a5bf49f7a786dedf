"""Numba kernels of a block of classes: the partial statistics of a row split across blocks,
and the gradient of a block from the row's merged log-normaliser.

A vocabulary split (``fastxent.dask`` with the class axis in several chunks) never
holds a whole row: each block ``[offset, offset + Cb)`` of a row reduces to a few
numbers (:class:`fastxent.backends.Partials`), the blocks' numbers merge with the
log-sum-exp combine (``fastxent/_partials.py``), and a second pass over each block
writes its share of the gradient. The row machinery is ``_rows``'s and
``_moments``'s: :func:`~._rows.chunk_max` and the exp of ``_math`` for the losses
(:func:`_block_sum_exp`), :func:`~._moments.row_moments` (with the entropy term
and the argmax) for ``score``; the gradient element is ``_softmax``'s.
"""

import numpy as np
from numba import prange

from . import _math as nm
from ._moments import row_moments
from ._rows import capped, chunk_max, inline, kernel, normal_exp, xlogy_term, zero_row
from ._softmax import _softmax_grad


@inline
def _block_sum_exp(row, softcap, acc):
    """``(m, s)`` of a block row: its (capped) max ``m``, then ``s = sum exp(t - m)`` in a
    second pass over the row.

    Two passes, not ``_rows.row_lse``'s chunked one-read loop: a block row of a split
    is short (8192 float32 = 32 KB at 131072 classes in 16 blocks) and read again from
    L1/L2, and the chunked loop compiles to gathers for an AVX-512 target
    (shared/PERF-NOTES.md): 24 ms against 56 ms for 1024 x 8192 float32 on this
    2-core Xeon (AVX-512). An all ``-inf`` row gives ``(-inf, 0)``, a row holding NaN
    or ``+inf`` a NaN ``s``.
    """
    peak = capped(chunk_max(row, acc), softcap)
    shift = peak if peak != -np.inf else acc(0.0)   # all -inf: exp(-inf - 0) = 0
    total = acc(0.0)
    for j in range(row.shape[0]):
        total += normal_exp(capped(nm.load(row[j]), softcap) - shift, acc)
    return peak, total


@inline
def _local_label(labels, i, ignore_index, offset, count):
    """The label of row ``i`` as a position in the block, or -1 when the row is
    ignored or its class lies in another block."""
    label = labels[i]
    if label == ignore_index:
        return -1
    local = label - offset
    return local if 0 <= local < count else -1


@kernel
def partials_kernel(logits, labels, ignore_index, offset, class_weight, softcap, peak_out, total_out,
                    target_out, anchor_out, gap_out, spread_out, best_out, best_value_out, acc):
    """Per row of a block: ``peak`` m, ``total`` ``sum exp(t - m)``, ``target`` ``t_y`` (0 when
    the label is elsewhere or ignored), and, pruned at compile time:

    * ``class_weight`` given (label smoothing): ``gap = sum_c w_c (anchor - t_c)``
      (a zero weight adds 0, as the reference's ``xy``), ``anchor = m`` when
      finite, else 0; the weights are indexed ``offset + c`` (the full vector);
    * ``spread_out`` given (``score``, no softcap): the entropy term
      ``sum exp(x - m) (x - m)``, ``best``, the first index of the block's max
      as a class id of the whole row, and the score there.
    """
    count = logits.shape[1]
    for i in prange(logits.shape[0]):
        row = logits[i]
        if spread_out is not None:
            peak, total, spread, best = row_moments(row, None, acc)
            spread_out[i] = spread
            best_out[i] = best + offset
            best_value_out[i] = nm.load(row[best])
        else:
            peak, total = _block_sum_exp(row, softcap, acc)
        peak_out[i] = peak
        total_out[i] = total
        local = _local_label(labels, i, ignore_index, offset, count)
        target_out[i] = capped(nm.load(row[local]), softcap) if local >= 0 else acc(0.0)
        if class_weight is not None:
            anchor = peak if peak - peak == 0 else acc(0.0)
            gap = acc(0.0)
            for j in range(count):
                gap += xlogy_term(class_weight[offset + j], anchor - capped(nm.load(row[j]), softcap))
            anchor_out[i] = anchor
            gap_out[i] = gap


@kernel
def block_grad_kernel(logits, labels, ignore_index, offset, class_weight, softcap, shift, log_sum, p_coef,
                      target_coef, weight_coef, grad, acc):
    """``grad[i, c] = (P_i p_ic - V_i w_{offset+c} - [offset + c == y_i] Y_i) dt/dx`` with
    ``p_ic = exp((t_ic - shift_i) - log_sum_i)``, the row's merged normaliser;
    ``P, Y, V`` = ``p_coef``, ``target_coef``, ``weight_coef`` (the weight term
    pruned when ``class_weight`` is None). An ignored row's block is zeros."""
    count = logits.shape[1]
    for i in prange(logits.shape[0]):
        if labels[i] == ignore_index:
            zero_row(grad, i, acc)
            continue
        row = logits[i]
        grad_row = grad[i]
        coef = acc(p_coef[i])
        row_shift = acc(shift[i])
        row_log_sum = acc(log_sum[i])
        weight_scale = acc(0.0)
        if class_weight is not None:
            weight_scale = acc(weight_coef[i])
        for j in range(count):
            offset_j = acc(0.0)
            if class_weight is not None:
                offset_j = weight_scale * class_weight[offset + j]
            grad_row[j] = nm.store(_softmax_grad(row[j], coef, offset_j, row_shift, row_log_sum, softcap, acc), grad)
        local = _local_label(labels, i, ignore_index, offset, count)
        if local >= 0:
            # The target's own term, the element recomputed whole (a 16-bit value
            # rounded before the subtraction would lose the cancellation's digits).
            offset_y = acc(target_coef[i])
            if class_weight is not None:
                offset_y += weight_scale * class_weight[offset + local]
            grad_row[local] = nm.store(
                _softmax_grad(row[local], coef, offset_y, row_shift, row_log_sum, softcap, acc), grad)

