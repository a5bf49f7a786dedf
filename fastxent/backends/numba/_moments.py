"""Numba kernels built on a row's one-read moments: the scoring bundle and the softmax hvp.

``score`` and the hvp read the row's moments (max, sum of exp, and the sum they
need) in one read, chunk by chunk (:func:`row_moments`): the entropy term and
``p . v`` are merged like the sum of exp, so ``score`` costs one exp per
element: 1.4x the sparse forward at C = 4096, where the log-sum-exp pass plus a
second exp pass cost 2.4x; the hvp needs one more pass, the one writing ``H v``.
Every quantity is kept relative to the row max ``m``, not to a rounded ``lse``:
at |x| ~ 1e5 in float32 ``lse`` is off by up to 0.004, which would put every
probability off by 0.4% and give an entropy of 0.004 to a row whose entropy is 1e-30.
"""

import numpy as np
from numba import prange

from . import _math as nm
from ._rows import CHUNK, chunk_max, inline, kernel, normal_exp, rebase, xlogy_term


@inline
def _argmax_key(x):
    """``nm.order_key(x)`` with ``-0`` keyed as ``+0`` (np.argmax treats them as equal)."""
    key = nm.order_key(x)
    return np.int32(0) if key == -1 else key   # int32 keys stay int32 (8 lanes)


@inline
def row_moments(row, vector, acc):
    """One read of a row, chunk by chunk: ``(m, s, w, argmax)``.

    ``m`` the row max, ``s = sum exp(x - m)`` and ``w``, which depends on what
    the caller needs (one helper, pruned at compile time by ``vector is None``):

    * ``vector`` None (score): ``w = t = sum exp(x - m) (x - m)`` (zero terms
      skipped, so ``-inf`` adds 0) and ``argmax``, the first index of the max
      (the first NaN, as ``np.argmax``);
    * ``vector`` an array (hvp): ``w = u = sum exp(x - m) v``; ``argmax`` 0.

    Each chunk's sums, relative to its own max, are merged into the running
    ones relative to the larger of the two maxima (:func:`rebase`): moving the
    reference from ``m`` to ``m' > m`` scales ``s`` and ``u`` by
    ``a = exp(m - m')`` and turns ``t`` into ``a (t + (m - m') s)``. The first
    chunk holding the largest key is remembered and scanned once at the end for
    the first index holding it (scanning each chunk that beat the row so far
    cost 0.2 ns per element more at C = 4096).

    An all ``-inf`` row gives ``s = 0``; a row holding NaN or ``+inf`` NaN sums.
    """
    count = row.shape[0]
    peak = acc(-np.inf)
    total = acc(0.0)
    weighted = acc(0.0)
    best_key = _argmax_key(acc(-np.inf))
    best_start = 0
    for start in range(0, count, CHUNK):
        chunk = row[start:start + CHUNK]
        shift = chunk_max(chunk, acc)
        if vector is None:
            key = _argmax_key(shift)
            if key > best_key:
                best_key = key
                best_start = start
        if shift == -np.inf:
            continue  # all -inf (masked) chunk: no mass
        chunk_total = acc(0.0)
        chunk_weighted = acc(0.0)
        if vector is not None:
            terms = vector[start:start + CHUNK]
        for j in range(chunk.shape[0]):
            shifted = nm.load(chunk[j]) - shift
            e = normal_exp(shifted, acc)
            chunk_total += e
            if vector is None:
                chunk_weighted += xlogy_term(e, shifted)
            else:
                chunk_weighted += e * acc(nm.load(terms[j]))
        if total == 0:
            peak, total, weighted = shift, chunk_total, chunk_weighted
            continue
        # a NaN chunk gives NaN factors: the NaN reaches the sums
        top, old, new = rebase(peak, shift)
        if vector is None:
            # a factor of 0 drops its side even where the move of its max overflowed
            # (peak - top = -3e38 - 3e38 = -inf in float32: 0 * -inf would be NaN)
            weighted = (xlogy_term(old, weighted + (peak - top) * total)
                        + xlogy_term(new, chunk_weighted + (shift - top) * chunk_total))
        else:
            weighted = old * weighted + new * chunk_weighted
        total = old * total + new * chunk_total
        peak = top
    best = 0
    if vector is None:
        best = best_start
        chunk = row[best_start:best_start + CHUNK]
        for j in range(chunk.shape[0]):
            if _argmax_key(nm.load(chunk[j])) == best_key:
                best = best_start + j
                break
    return peak, total, weighted, best


@kernel
def hvp_kernel(logits, v, out, acc):
    """``H v = p (v - p.v)`` per row, ``p = softmax(x)``, never forming ``H``:
    the one-read moments (max, ``sum e``, ``sum e v``), then one pass writing."""
    count = logits.shape[1]
    for i in prange(logits.shape[0]):
        row = logits[i]
        vector = v[i]
        peak, total, dot, _ = row_moments(row, vector, acc)
        inverse = acc(1.0) / total
        mean = dot * inverse
        out_row = out[i]
        for j in range(count):
            p = normal_exp(nm.load(row[j]) - peak, acc) * inverse
            out_row[j] = nm.store(p * (acc(nm.load(vector[j])) - mean), out)


@kernel
def score_kernel(logits, labels, ignore_index, loss, lse_out, target_out, entropy_out, argmax_out,
                 correct_out, acc):
    """Per row, from the one-read moments ``(m, s, t)``: ``lse = m + log s``,
    entropy ``log s - t / s`` (two non-negative terms), loss ``(m - x_y) + log s``."""
    for i in prange(logits.shape[0]):
        row = logits[i]
        peak, total, spread, best = row_moments(row, None, acc)
        log_total = nm.log_approx(total) if total > 0 else acc(np.nan)
        lse_out[i] = peak + log_total
        entropy_out[i] = log_total - spread / total
        argmax_out[i] = best
        label = labels[i]
        if label == ignore_index:
            loss[i] = 0
            target_out[i] = np.nan
            correct_out[i] = False
        else:
            value = (peak - nm.load(row[label])) + log_total
            loss[i] = value
            target_out[i] = -value
            correct_out[i] = best == label
