"""Numba CPU kernels: plain loops over rows, parallel with ``prange``.

The contract (argument order, shapes, return values) is in
``fastxent/backends/__init__.py``; arguments arrive validated and normalised
(rows C-contiguous, class axis last), so nothing here re-checks them.

Design, measured on the 2-core AMD EPYC (Zen 3, AVX2) of ``shared/PERF-NOTES.md``:

* **No libm in hot loops.** exp/log/tanh are the arithmetic versions of
  ``_numba_math`` (range reduction + polynomial), which LLVM vectorises; a
  ``math.exp`` loop is scalar and ran slower than numpy.
* **Row max on integer keys.** LLVM does not vectorise a floating-point max
  reduction without ``nnan`` (measured: 10.5 us for 32000 floats, scalar
  ``vmaxss``), and ``nnan`` would license it to drop our NaN handling. The
  float's bits mapped to a monotonic integer key (``b ^ ((b >> 31) & 0x7fff..)``)
  reduce with ``vpmaxsd``: 2.2 us, the speed of a vectorised sum. A positive NaN
  maps above +inf, so a NaN row gets a NaN max and a NaN loss, as DESIGN.md asks.
* **One read of each row.** The row is processed in chunks of
  ``_config.NUMBA_CHUNK`` classes: the chunk's max, then its sum of exp while
  it is still in L1, merged into a running (max, sum) pair (the online softmax
  of Milakov & Gimelshein 2018, per chunk rather than per element).
* **16-bit scores** arrive as integer views (float16 as int16, bfloat16 as
  uint16: Numba has no float16 on the CPU) and are widened to float32 element
  by element; nothing of the logits' size is allocated except the gradient.
* **Fast-math without nnan/ninf**: ``-inf`` is masking and NaN must reach the
  loss, so only reassociation-type flags are on (they let the sums vectorise).
* **Few compiled variants**: every distinct argument type is one more
  compilation (seconds each, cached on disk afterwards), so options that cost
  nothing when neutral are always passed (class weights of ones, ``ignore_index``
  -1, a 1-element gradient scale read with step 0); only ``softcap`` (a tanh
  per element) and the gradient are pruned at compile time when ``None``
  (Numba removes ``is None`` branches on ``none``-typed arguments).
"""

import math

import numpy as np
from numba import njit, prange

from .. import _config, _dtypes
from . import _numba_math as nm

#: Fast-math flags for every kernel: no ``nnan``/``ninf`` (see module docstring).
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

_CHUNK = _config.NUMBA_CHUNK
_ROW_BLOCK = _config.NUMBA_ROW_BLOCK


# ----------------------------------------------------------------------------
# Python-side helpers: views, dtypes, outputs
# ----------------------------------------------------------------------------

def _kernel_view(array):
    """The array as Numba sees it: float16 as int16 bits, bfloat16 as uint16 bits."""
    if array.dtype == np.float16:
        return array.view(np.int16)
    if _dtypes.is_bfloat16(array.dtype):
        return array.view(np.uint16)
    return array


def _acc_type(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _new_like(array, shape=None):
    """An uninitialised output of ``array``'s dtype, and its kernel view."""
    out = np.empty(array.shape if shape is None else shape, dtype=array.dtype)
    return out, _kernel_view(out)


def _loss_out(rows, dtype):
    return np.empty(rows, dtype=_dtypes.loss_dtype(dtype))


def _scale_and_step(grad_scale, count):
    """``grad_scale`` as a contiguous float64 array and the index step of the kernel.

    A uniform scale is a 1-element array read with step 0, so one compiled
    kernel serves both cases without an N-sized array of copies.
    """
    if isinstance(grad_scale, float):
        return np.full(1, grad_scale, dtype=np.float64), 0
    return np.ascontiguousarray(grad_scale, dtype=np.float64).reshape(count), 1


def _keeps_exp(logits, softcap):
    """Whether the fused kernels keep ``exp(x - m)`` in the gradient row between passes.

    Only for float32/float64 gradients (a 16-bit row would round the
    intermediate) and without softcap (whose slope needs the scores again).
    """
    return softcap is None and logits.dtype.itemsize >= 4


def _class_ids(labels):
    """Labels as int32 or int64 (one compiled kernel each); other integer widths are widened."""
    if labels.dtype in (np.int32, np.int64):
        return labels
    return labels.astype(np.int64)


def _ignore_value(ignore_index):
    """``ignore_index`` as an int64 the kernel compares with; -1 (never a valid label) for None."""
    if ignore_index is None or not -2**63 <= ignore_index < 2**63:
        return -1
    return ignore_index


# ----------------------------------------------------------------------------
# Shared per-element math (one definition per formula)
# ----------------------------------------------------------------------------

@njit(cache=True, fastmath={"contract"}, error_model="numpy", forceinline=True)
def _log_prob(value, shift, log_sum):
    """``(value - shift) - log_sum``: a log-probability, in this order.

    Compiled on its own without ``reassoc`` (LLVM keeps each instruction's
    flags when it inlines), since the kernels' ``reassoc`` may rewrite it as
    ``value - (shift + log_sum)``, which at |x| = 1e4 in float32 loses 3e-4
    of log 2 (found by tests/test_properties.py).
    """
    return (value - shift) - log_sum


@njit(inline="always", fastmath=FASTMATH)
def _capped(value, softcap):
    """Gemma 2 soft-capping ``c * tanh(x / c)``; the identity when ``softcap`` is None."""
    if softcap is None:
        return value
    return softcap * nm.tanh_approx(value / softcap)


@njit(inline="always", fastmath=FASTMATH)
def _capped_slope(capped, softcap, acc):
    """``d/dx c tanh(x/c) = 1 - (t/c)**2`` written with the capped value ``t``."""
    if softcap is None:
        return acc(1.0)
    ratio = capped / softcap
    return acc(1.0) - ratio * ratio


@njit(inline="always", fastmath=FASTMATH)
def _chunk_max(row, start, stop, acc):
    """Largest ``row[start:stop]`` via integer keys (vectorises; NaN-positive rows give NaN)."""
    key = nm.order_key(acc(-np.inf))
    for j in range(start, stop):
        candidate = nm.order_key(nm.load(row[j]))
        key = candidate if candidate > key else key
    return nm.from_order_key(key)


@njit(inline="always", fastmath=FASTMATH)
def _row_lse(row, softcap, acc):
    """``log(sum(exp(t)))`` of one row (t = capped scores) in one read, chunk by chunk,
    as the pair ``(shift, log_sum)`` with ``lse = shift + log_sum``.

    Each chunk contributes ``(shift, sum exp(t - shift))``, merged into the
    running pair. A chunk that is all ``-inf`` adds nothing; a row that is all
    ``-inf`` or holds NaN/+inf gives a NaN ``log_sum``. Callers keep the pair
    apart: ``(t - shift) - log_sum`` is exact where ``t - lse`` is not (at
    |x| = 1e4 float32 rounds lse to 1e-3, a 3e-4 relative error on log 2).
    """
    count = row.shape[0]
    running_max = acc(-np.inf)
    running_sum = acc(0.0)
    for start in range(0, count, _CHUNK):
        stop = min(start + _CHUNK, count)
        shift = _capped(_chunk_max(row, start, stop, acc), softcap)
        if shift == -np.inf:
            shift = acc(0.0)  # all -inf (masked) chunk: exp(-inf - 0) = 0, NaN still propagates
        chunk_sum = acc(0.0)
        for j in range(start, stop):
            chunk_sum += nm.exp_approx(_capped(nm.load(row[j]), softcap) - shift)
        if chunk_sum != 0:
            if shift > running_max:
                running_sum = running_sum * nm.exp_approx(running_max - shift) + chunk_sum
                running_max = shift
            else:
                running_sum += chunk_sum * nm.exp_approx(shift - running_max)
    if running_sum > 0:
        return running_max, acc(math.log(running_sum))
    return running_max, acc(np.nan)


@njit(inline="always", fastmath=FASTMATH)
def _row_exp_into(row, out_row, acc):
    """``out_row = exp(x - m)`` (m = row max) and the row's lse: the fused kernels' first half.

    Keeping the exponentials in the (float32/float64) gradient row lets the
    gradient pass be a multiply-subtract instead of a second exp per element
    (measured: fused pass 1.6x faster at 4096 x 32000). The row is read from
    memory once by the max and again from L2 (a 32000-float row is 128 KB).
    Returns ``(shift, log_sum, 1 / sum)`` (see ``_row_lse``); NaN for the rows ``_row_lse`` makes NaN.
    """
    peak = _chunk_max(row, 0, row.shape[0], acc)
    shift = peak if peak != -np.inf else acc(0.0)
    total = acc(0.0)
    for j in range(row.shape[0]):
        value = nm.exp_approx(nm.load(row[j]) - shift)
        out_row[j] = value
        total += value
    if total > 0:
        return shift, acc(math.log(total)), acc(1.0) / total
    return shift, acc(np.nan), acc(np.nan)


@njit(inline="always", fastmath=FASTMATH)
def _row_weighted_gap(row, weights, shift, softcap, acc):
    """``sum_c w_c (shift - t_c)``: the label-smoothing term without ``W lse``'s cancellation."""
    total = acc(0.0)
    for j in range(row.shape[0]):
        total += weights[j] * (shift - _capped(nm.load(row[j]), softcap))
    return total


@njit(inline="always", fastmath=FASTMATH)
def _xlogy_term(weight, value):
    """``weight * value`` with 0 where ``weight == 0`` (even for value = -inf)."""
    return weight * value if weight != 0 else weight - weight


# ----------------------------------------------------------------------------
# Softmax family
# ----------------------------------------------------------------------------

@njit(inline="always", fastmath=FASTMATH)
def _softmax_grad(raw, coef, offset, shift, log_sum, softcap, acc):
    """``(coef * p - offset) * dt/dx`` for one score: every softmax-family gradient element.

    ``p = exp((t - shift) - log_sum)`` with ``t`` the (capped) score; sparse rows use
    ``coef = g (sum of label weights) and offset = g (e/C) w_c`` (the target's
    own term is added afterwards), soft rows ``coef = g sum(y')``, ``offset = g y'_c``.
    """
    capped = _capped(nm.load(raw), softcap)
    return (coef * nm.exp_approx(_log_prob(capped, shift, log_sum)) - offset) * _capped_slope(capped, softcap, acc)


@njit(inline="always", fastmath=FASTMATH)
def _row_lse_for(row, grad, i, keep_exp, softcap, acc):
    """``(shift, log_sum, 1/sum)``; the last only when the exponentials were kept in ``grad[i]``."""
    if grad is None:
        shift, log_sum = _row_lse(row, softcap, acc)
        return shift, log_sum, acc(0.0)
    if keep_exp:
        return _row_exp_into(row, grad[i], acc)
    shift, log_sum = _row_lse(row, softcap, acc)
    return shift, log_sum, acc(0.0)


@njit(inline="always", fastmath=FASTMATH)
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


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _sparse_kernel(logits, labels, ignore_index, class_weight, weight_total, smoothing, z_loss,
                   softcap, scale, step, keep_exp, loss, grad, acc):
    """Sparse softmax cross-entropy rows; the gradient too when ``grad`` is not None.

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
                for j in range(count):
                    grad[i, j] = nm.store(acc(0.0), grad)
            continue
        row = logits[i]
        shift, log_sum, inv_sum = _row_lse_for(row, grad, i, keep_exp, softcap, acc)
        lse = shift + log_sum
        target = _capped(nm.load(row[label]), softcap)
        weight = class_weight[label]
        value = keep * weight * -_log_prob(target, shift, log_sum) + z_loss * lse * lse
        if smoothing != 0:
            value += share * (weight_total * log_sum + _row_weighted_gap(row, class_weight, shift, softcap, acc))
        loss[i] = value
        if grad is not None:
            g = acc(scale[i * step])
            coef = g * (keep * weight + share * weight_total + acc(2.0) * z_loss * lse)
            grad_row = grad[i]
            # Reading the C class weights halves the loop's speed (measured 0.74
            # vs 1.5 elements/ns): the unsmoothed loop does not touch them.
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


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _sparse_short_kernel(logits, labels, ignore_index, class_weight, z_loss, loss, acc):
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
                gap = -_log_prob(nm.load(flat[r * count + label]), peaks[r], totals[r])
                lse = peaks[r] + totals[r]
                loss[first + r] = class_weight[label] * gap + z_loss * lse * lse


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _soft_kernel(logits, labels, smoothing, softcap, scale, step, keep_exp, loss, grad, acc):
    """Soft-label softmax cross-entropy rows (and gradient when ``grad`` is not None).

    ``y' = (1-e) y + e/C``; ``l = sum(y') lse - sum_c y'_c t_c`` (xlogy);
    ``dl/dt_c = p_c sum(y') - y'_c``.
    """
    count = logits.shape[1]
    # Typed constants: Numba makes ``1 - float32`` a float64, which would pull
    # the per-element loops into float64.
    share = smoothing / acc(count)
    keep = acc(1.0) - smoothing
    for i in prange(logits.shape[0]):
        row = logits[i]
        targets = labels[i]
        shift, log_sum, inv_sum = _row_lse_for(row, grad, i, keep_exp, softcap, acc)
        label_total = acc(0.0)
        gap = acc(0.0)
        for j in range(count):
            y = keep * acc(nm.load(targets[j])) + share
            label_total += y
            gap += _xlogy_term(y, shift - _capped(nm.load(row[j]), softcap))
        loss[i] = label_total * log_sum + gap
        if grad is not None:
            g = acc(scale[i * step])
            grad_row = grad[i]
            if keep_exp:
                factor = g * label_total * inv_sum
                for j in range(count):
                    y = keep * acc(nm.load(targets[j])) + share
                    grad_row[j] = nm.store(nm.load(grad_row[j]) * factor - g * y, grad)
            else:
                coef = g * label_total
                for j in range(count):
                    offset = g * (keep * acc(nm.load(targets[j])) + share)
                    grad_row[j] = nm.store(_softmax_grad(row[j], coef, offset, shift, log_sum, softcap, acc), grad)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _lse_kernel(x, out, acc):
    """``logsumexp`` per row with torch/scipy's non-finite values: an all ``-inf``
    row gives ``-inf``, a row with ``+inf`` (and no NaN) ``+inf`` (the losses turn
    both into NaN, so ``_row_lse`` does; the rare NaN rows are rescanned here)."""
    for i in prange(x.shape[0]):
        row = x[i]
        shift, log_sum = _row_lse(row, None, acc)
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


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _log_softmax_kernel(x, out, exponentiate, acc):
    """``(x - shift) - log_sum`` per row, or its exp when ``exponentiate``."""
    for i in prange(x.shape[0]):
        row = x[i]
        shift, log_sum = _row_lse(row, None, acc)
        if exponentiate:
            for j in range(row.shape[0]):
                out[i, j] = nm.store(nm.exp_approx(_log_prob(nm.load(row[j]), shift, log_sum)), out)
        else:
            for j in range(row.shape[0]):
                out[i, j] = nm.store(_log_prob(nm.load(row[j]), shift, log_sum), out)


# ----------------------------------------------------------------------------
# Backend contract: softmax family and building blocks
# ----------------------------------------------------------------------------

def sparse_softmax_cross_entropy(logits, labels, ignore_index, class_weight, label_smoothing, z_loss,
                                 softcap, grad_scale):
    acc = _acc_type(logits.dtype)
    rows, count = logits.shape
    loss = _loss_out(rows, logits.dtype)
    grad, grad_view, scale, step = None, None, None, 0
    if grad_scale is not None:
        grad, grad_view = _new_like(logits)
        scale, step = _scale_and_step(grad_scale, rows)
    # Ones when unweighted: one compiled kernel for both (C reads per smoothed row);
    # in the accumulation type, as a float64 -> float32 conversion in the
    # gradient loop halves its speed.
    weights = np.ones(count, dtype=acc) if class_weight is None else class_weight.astype(acc)
    if grad is None and softcap is None and label_smoothing == 0 and count < _config.NUMBA_SHORT_ROW:
        _sparse_short_kernel(_kernel_view(logits), _class_ids(labels), _ignore_value(ignore_index), weights,
                             acc(z_loss), loss, acc)
        return loss, None
    _sparse_kernel(_kernel_view(logits), _class_ids(labels), _ignore_value(ignore_index), weights,
                   acc(weights.sum()), acc(label_smoothing), acc(z_loss),
                   None if softcap is None else acc(softcap), scale, step,
                   _keeps_exp(logits, softcap), loss, grad_view, acc)
    return loss, grad


def softmax_cross_entropy(logits, labels, label_smoothing, softcap, grad_scale):
    acc = _acc_type(logits.dtype)
    rows = logits.shape[0]
    loss = _loss_out(rows, logits.dtype)
    grad, grad_view, scale, step = None, None, None, 0
    if grad_scale is not None:
        grad, grad_view = _new_like(logits)
        scale, step = _scale_and_step(grad_scale, rows)
    _soft_kernel(_kernel_view(logits), _kernel_view(labels), acc(label_smoothing),
                 None if softcap is None else acc(softcap), scale, step, _keeps_exp(logits, softcap),
                 loss, grad_view, acc)
    return loss, grad


def logsumexp(x):
    out = _loss_out(x.shape[0], x.dtype)
    _lse_kernel(_kernel_view(x), out, _acc_type(x.dtype))
    return out


def log_softmax(x):
    out, view = _new_like(x)
    _log_softmax_kernel(_kernel_view(x), view, False, _acc_type(x.dtype))
    return out


def softmax(x):
    out, view = _new_like(x)
    _log_softmax_kernel(_kernel_view(x), view, True, _acc_type(x.dtype))
    return out


# The sigmoid and probability families, second order and score live in their
# own module (built on the helpers above) and complete this backend's contract.
# Imported on first use: numba_families imports this module, so an eager
# import here would be circular when numba_families is imported first.
_FAMILIES = ("binary_cross_entropy", "categorical_cross_entropy", "score", "sigmoid_cross_entropy",
             "sigmoid_cross_entropy_hessian_diag", "softmax_cross_entropy_hvp",
             "sparse_categorical_cross_entropy")


def __getattr__(name):
    if name in _FAMILIES:
        from . import numba_families

        return getattr(numba_families, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
