"""Numba CPU kernels: sigmoid and probability-input families, second order, one-pass scoring.

The rest of the Numba backend beside the softmax family of ``numba_cpu``,
which re-exports the public functions here. Same contract (argument order,
shapes, return values: ``fastxent/backends/__init__.py``) and same discipline
(``numba_cpu``'s docstring): no libm in per-element loops, fast-math without
``nnan``/``ninf``, 16-bit data through integer views, nothing of the inputs'
size allocated except the outputs, few compiled variants. The machinery
(flags, views, outputs, gradient scale, chunked integer-key max) is imported
from ``numba_cpu``, not copied. Timings are per element, one thread, cache-hot,
on the 2-core EPYC of ``shared/PERF-NOTES.md`` (shared, so ratios only).

Elementwise kernels (sigmoid, binary, Hessian diagonal)
-------------------------------------------------------
The ``(R, K)`` arrays are C-contiguous, so the kernels run over the flat
element range in blocks of ``_config.NUMBA_CHUNK`` elements, one ``prange``
iteration each, rather than over rows: a 1,000,000 x 10 input vectorises over
2048 elements instead of 10, and a 1-D input of any length still spreads over
every thread. An option that may vary per element (``pos_weight``, the gradient
scale) arrives as a flat array in the accumulation dtype with a ``period`` and
is read through a window lined up with the block, so the inner loop has unit
stride whatever the option's shape, and one compiled loop serves all shapes:

* ``period == 0``: the full ``(R, K)`` array, window ``[lo, hi)``;
* ``period == K``: a per-class vector tiled to ``block + K`` values, the window
  starting at ``lo % K``; a uniform value is the case ``K = 1`` (one block of
  copies, 8 KiB in L1: no measurable difference from a hoisted scalar here).

``log1p(exp(-|x|))`` uses :func:`_log1p_unit`, a float32 polynomial for
arguments in ``[0, 1]``: 0.23 ns against 1.1 ns for the general
``nm.log1p_approx``; the sigmoid forward went from 3.3 to 2.0 ns per element
(PyTorch's ``binary_cross_entropy_with_logits``: 3.7 ns, before its extra
passes over memory).

Row kernels (categorical, sparse categorical, hvp, score)
---------------------------------------------------------
One row per ``prange`` iteration. ``score`` and the hvp read the row's moments
(max, sum of exp, and the sums they need) in one read, chunk by chunk
(:func:`_row_moments`): the entropy term and ``p . v`` are merged like the
sum of exp, so ``score`` costs one exp per element: 1.4x the sparse forward
at C = 4096, where the log-sum-exp pass plus a second exp pass cost 2.4x; the
hvp needs one more pass, the one writing ``H v``. Every quantity is kept relative to the row
max ``m``, not to a rounded ``lse``: at |x| ~ 1e5 in float32 ``lse`` is off by
up to 0.004, which would put every probability off by 0.4% and give an
entropy of 0.004 to a row whose entropy is 1e-30.

Compiled variants
-----------------
One per (score dtype, label dtype, forward-only or fused): labels are read in
their own dtype (converting them would allocate an input-sized copy), so keep
them in one dtype (the scores', or bool) to keep compilations few.
``pos_weight``, the gradient scale, the clip bounds, ``label_smoothing`` and
``ignore_index`` always arrive with the same types and never add one.
"""

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .. import _config, _dtypes
from .._score import Score
from . import _numba_math as nm
from .numba_cpu import (
    _CHUNK,
    FASTMATH,
    _acc_type,
    _chunk_max,
    _class_ids,
    _ignore_value,
    _kernel_view,
    _loss_out,
    _new_like,
    _scale_and_step,
    _xlogy_term,
)

# Every kernel and helper uses error_model="numpy": a division by zero gives
# inf/NaN as IEEE (an all-zero row of probabilities: NaN, as in the reference)
# instead of raising, and adds no zero-check branch to a vector loop.
_kernel = njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True)
_inline = njit(inline="always", fastmath=FASTMATH, error_model="numpy")

__all__ = [
    "sigmoid_cross_entropy",
    "binary_cross_entropy",
    "categorical_cross_entropy",
    "sparse_categorical_cross_entropy",
    "softmax_cross_entropy_hvp",
    "sigmoid_cross_entropy_hessian_diag",
    "score",
]


# ----------------------------------------------------------------------------
# Python-side helpers: flat views, per-element options
# ----------------------------------------------------------------------------

_LABEL_STORAGE = ("float16", "bfloat16", "float32", "float64", "bool")


def _label_view(labels, acc):
    """Dense labels (or ``v``) as the kernels read them: their own dtype when
    ``nm.load`` knows it (a copy would be input-sized), else cast to ``acc``."""
    if labels.dtype.name in _LABEL_STORAGE:
        return _kernel_view(labels)
    return labels.astype(acc)


def _flat(array):
    """A C-contiguous array as a 1-D view."""
    return array.reshape(array.size)


def _block(size):
    """Elements per block of an elementwise kernel (read at each call: tests may patch the tunable)."""
    return max(1, min(_config.NUMBA_CHUNK, size))


def _readonly(array):
    """A read-only view: option arrays always reach a kernel read-only.

    Numba compiles read-only and writeable arrays separately, and an option may
    arrive either way (``np.broadcast_to`` results are read-only, copies are
    not); the caller's own array is left writeable.
    """
    view = array.view()
    view.flags.writeable = False
    return view


def _window_values(option, size, block, acc):
    """A per-element option as ``(flat read-only values in acc, period)`` (see the module docstring).

    ``option``: a float (uniform), a ``(K,)`` vector along the last axis, or
    the full ``(R, K)`` array.
    """
    if np.ndim(option) == 0:
        return _readonly(np.full(block, option, dtype=acc)), 1
    if option.ndim == 1:
        count = option.shape[0]
        repeats = -(-(block + count) // count) if count else 1
        return _readonly(np.tile(option.astype(acc), repeats)), max(count, 1)
    return _readonly(np.ascontiguousarray(option, dtype=acc).reshape(size)), 0


# ----------------------------------------------------------------------------
# Shared per-element math (one definition per formula)
# ----------------------------------------------------------------------------

# log1p(e) = e + e^2 Q(e) on [0, 1], Q of degree 8: weighted least squares
# towards minimax on Chebyshev nodes (fit error 6e-9 relative, 0.1 ulp); in
# float32 with FMA: 1.3 ulp at most over every float32 in [0, 1]
# (tests/test_families.py); exactly e for e < 2^-24, where e^2 Q is below half an ulp of e.
_F32_LOG1P_UNIT_Q = tuple(np.float32(c) for c in (
    -0.4999992251396179, 0.3333021402359009, -0.2495546191930771, 0.19679339230060577,
    -0.1530929058790207, 0.10602930188179016, -0.05690290033817291, 0.019801560789346695,
    -0.0032295554410666227))


def _log1p_unit_f32(e):
    q0, q1, q2, q3, q4, q5, q6, q7, q8 = _F32_LOG1P_UNIT_Q
    q = (((((((q8 * e + q7) * e + q6) * e + q5) * e + q4) * e + q3) * e + q2) * e + q1) * e + q0
    return e + (e * e) * q


def _log1p_unit_f64(e):
    return nm.log1p_approx(e)


def _log1p_unit(e):
    """``log1p(e)`` for ``e`` in ``[0, 1]`` (NaN in, NaN out): float32 polynomial, float64 ``nm.log1p_approx``.

    Compiled on its own with ``fastmath={"contract"}`` like ``_numba_math``'s
    helpers, so a kernel's ``reassoc`` cannot reorder the polynomial.
    """
    raise NotImplementedError("jitted code only")


@overload(_log1p_unit, jit_options={"fastmath": {"contract"}, "error_model": "numpy", "forceinline": True})
def _log1p_unit_typer(e):
    return {types.float32: _log1p_unit_f32, types.float64: _log1p_unit_f64}.get(e)


@_inline
def _window(values, period, lo, hi):
    """The slice of a flat option array lined up with elements ``[lo, hi)``."""
    start = lo if period == 0 else lo % period
    return values[start:start + hi - lo]


@_inline
def _sigmoid_pair(x, acc):
    """``(exp(-|x|), sigmoid(x), sigmoid(-x))``: exp only of ``-|x|``, so nothing
    overflows for any ``x``, and both sigmoids keep their relative precision."""
    e = nm.exp_approx(-abs(x))
    d = acc(1.0) / (acc(1.0) + e)
    small = e * d
    return e, (d if x >= 0 else small), (small if x >= 0 else d)


@_inline
def _sigmoid_loss(x, z, q, e, acc):
    """TensorFlow's ``(1-z) x + w (log1p(exp(-|x|)) + max(-x, 0))``, ``w = 1 + (q-1) z``,
    written ``(1-z) x + w L`` for x >= 0 and ``-q z x + w L`` for x < 0
    (``(1-z) x - w x = -q z x``): no term cancels another, so a tiny loss keeps
    its relative precision (x = -20, z = 0: 2.06e-9, where the literal formula
    gives 0 in float32 and the float64 reference is 1.3% off at x = -30), and
    nothing overflows up to |x| = 3e38.

    ``x = -inf`` gives NaN and ``x = +inf`` gives ``(1-z) * inf``: the
    reference's IEEE evaluation of the literal formula (``-inf + inf``, ``0 * inf``).
    """
    weight = acc(1.0) + (q - acc(1.0)) * z
    linear = (acc(1.0) - z) * x if x >= 0 else -(q * z) * x
    value = linear + weight * _log1p_unit(e)
    return acc(np.nan) if x == -np.inf else value


@_inline
def _sigmoid_grad(z, q, s_pos, s_neg, acc):
    """``d loss / dx = (1-z) - w sigmoid(-x)``, written ``(1-z) sigmoid(x) - q z sigmoid(-x)``
    (no cancellation where the gradient is small)."""
    return (acc(1.0) - z) * s_pos - q * z * s_neg


@_inline
def _clip(q, lo, hi):
    """``np.clip(q, lo, hi)``: NaN stays NaN."""
    return lo if q < lo else (hi if q > hi else q)


@_inline
def _passes(q, lo, hi):
    """Where the clip passes the gradient: ``lo <= q <= hi`` (torch.clamp; False for NaN)."""
    return (q >= lo) & (q <= hi)


@_inline
def _neg_log_slope(weight, q, clipped, lo, hi, acc):
    """``d/dq -weight * log(clip(q))``: ``-weight / clip(q)`` where the clip passes
    it, else 0; 0 where ``weight == 0`` (the xlogy convention)."""
    slope = -_xlogy_term(weight, acc(1.0) / clipped)
    return slope if _passes(q, lo, hi) else acc(0.0)


@_inline
def _argmax_key(x):
    """``nm.order_key(x)`` with ``-0`` keyed as ``+0`` (np.argmax treats them as equal)."""
    key = nm.order_key(x)
    return np.int32(0) if key == -1 else key   # int32 keys stay int32 (8 lanes)


@_inline
def _row_moments(row, vector, acc):
    """One read of a row, chunk by chunk: ``(m, s, w, argmax)``.

    ``m`` the row max, ``s = sum exp(x - m)`` and ``w``, which depends on what
    the caller needs (one helper, pruned at compile time by ``vector is None``):

    * ``vector`` None (score): ``w = t = sum exp(x - m) (x - m)`` (zero terms
      skipped, so ``-inf`` adds 0) and ``argmax``, the first index of the max
      (the first NaN, as ``np.argmax``);
    * ``vector`` an array (hvp): ``w = u = sum exp(x - m) v``; ``argmax`` 0.

    Each chunk's sums, relative to its own max, are merged into the running
    ones relative to the larger of the two maxima: moving the reference from
    ``m`` to ``m' > m`` scales ``s`` and ``u`` by ``a = exp(m - m')`` and turns
    ``t`` into ``a (t + (m - m') s)``. The first chunk holding the largest key
    is remembered and scanned once at the end for the first index holding it
    (scanning each chunk that beat the row so far cost 0.2 ns per element more
    at C = 4096).

    An all ``-inf`` row gives ``s = 0``; a row holding NaN or ``+inf`` NaN sums.
    """
    count = row.shape[0]
    peak = acc(-np.inf)
    total = acc(0.0)
    weighted = acc(0.0)
    best_key = _argmax_key(acc(-np.inf))
    best_start = 0
    for start in range(0, count, _CHUNK):
        stop = min(start + _CHUNK, count)
        shift = _chunk_max(row, start, stop, acc)
        if vector is None:
            key = _argmax_key(shift)
            if key > best_key:
                best_key = key
                best_start = start
        if shift == -np.inf:
            continue  # all -inf (masked) chunk: no mass
        chunk_total = acc(0.0)
        chunk_weighted = acc(0.0)
        for j in range(start, stop):
            shifted = nm.load(row[j]) - shift
            e = nm.exp_approx(shifted)
            chunk_total += e
            if vector is None:
                chunk_weighted += _xlogy_term(e, shifted)
            else:
                chunk_weighted += e * acc(nm.load(vector[j]))
        if total == 0:
            peak, total, weighted = shift, chunk_total, chunk_weighted
            continue
        # a NaN chunk takes the else branch: the NaN reaches the sums
        gap = peak - shift if shift > peak else shift - peak
        factor = nm.exp_approx(gap)
        if shift > peak:
            if vector is None:
                weighted = factor * (weighted + gap * total) + chunk_weighted
            else:
                weighted = factor * weighted + chunk_weighted
            total = factor * total + chunk_total
            peak = shift
        else:
            if vector is None:
                weighted += factor * (chunk_weighted + gap * chunk_total)
            else:
                weighted += factor * chunk_weighted
            total += factor * chunk_total
    best = 0
    if vector is None:
        best = best_start
        for j in range(best_start, min(best_start + _CHUNK, count)):
            if _argmax_key(nm.load(row[j])) == best_key:
                best = j
                break
    return peak, total, weighted, best


# ----------------------------------------------------------------------------
# Elementwise kernels
# ----------------------------------------------------------------------------

@_kernel
def _sigmoid_kernel(logits, labels, pos_weight, weight_period, keep, share, scale, scale_period, block,
                    loss, grad, acc):
    """Sigmoid cross-entropy over flat elements; the gradient too when ``grad`` is not None.

    ``z' = keep z + share`` (label smoothing), ``w = 1 + (q-1) z'``:
    ``loss = (1-z') x + w softplus(-x)``, ``grad = g ((1-z') s(x) - q z' s(-x))``.
    """
    size = logits.shape[0]
    for b in prange((size + block - 1) // block):
        lo = b * block
        hi = min(lo + block, size)
        x = logits[lo:hi]
        z = labels[lo:hi]
        q = _window(pos_weight, weight_period, lo, hi)
        out = loss[lo:hi]
        if grad is None:
            for j in range(hi - lo):
                value = nm.load(x[j])
                target = keep * acc(nm.load(z[j])) + share
                out[j] = _sigmoid_loss(value, target, q[j], nm.exp_approx(-abs(value)), acc)
        else:
            g = _window(scale, scale_period, lo, hi)
            dx = grad[lo:hi]
            for j in range(hi - lo):
                value = nm.load(x[j])
                target = keep * acc(nm.load(z[j])) + share
                e, s_pos, s_neg = _sigmoid_pair(value, acc)
                out[j] = _sigmoid_loss(value, target, q[j], e, acc)
                dx[j] = nm.store(g[j] * _sigmoid_grad(target, q[j], s_pos, s_neg, acc), grad)


@_kernel
def _sigmoid_hessian_kernel(logits, labels, pos_weight, weight_period, block, out, acc):
    """``(1 + (q-1) z) s(x) s(-x)`` over flat elements, in the logits' storage (no label smoothing)."""
    size = logits.shape[0]
    for b in prange((size + block - 1) // block):
        lo = b * block
        hi = min(lo + block, size)
        x = logits[lo:hi]
        z = labels[lo:hi]
        q = _window(pos_weight, weight_period, lo, hi)
        dest = out[lo:hi]
        for j in range(hi - lo):
            _, s_pos, s_neg = _sigmoid_pair(nm.load(x[j]), acc)
            weight = acc(1.0) + (q[j] - acc(1.0)) * acc(nm.load(z[j]))
            dest[j] = nm.store(weight * s_pos * s_neg, out)


@_kernel
def _binary_kernel(probs, labels, lo_clip, hi_clip, keep, share, scale, scale_period, block, loss, grad, acc):
    """Keras binary cross-entropy over flat elements; the gradient too when ``grad`` is not None.

    ``p' = clip(p)``, ``z' = keep z + share``: ``loss = -(z' log p' + (1-z') log(1-p'))``
    (xlogy terms), ``grad = g (-z'/p' + (1-z')/(1-p'))`` where the clip passes, else 0.
    """
    size = probs.shape[0]
    for b in prange((size + block - 1) // block):
        lo = b * block
        hi = min(lo + block, size)
        p = probs[lo:hi]
        z = labels[lo:hi]
        out = loss[lo:hi]
        g = _window(scale, scale_period, lo, hi)
        for j in range(hi - lo):
            value = nm.load(p[j])
            target = keep * acc(nm.load(z[j])) + share
            rest = acc(1.0) - target
            clipped = _clip(value, lo_clip, hi_clip)
            out[j] = -(_xlogy_term(target, nm.log_approx(clipped))
                       + _xlogy_term(rest, nm.log1p_approx(-clipped)))
            if grad is not None:
                slope = (_neg_log_slope(target, value, clipped, lo_clip, hi_clip, acc)
                         - _neg_log_slope(rest, value, acc(1.0) - clipped, lo_clip, hi_clip, acc))
                grad[lo + j] = nm.store(g[j] * slope, grad)


# ----------------------------------------------------------------------------
# Row kernels: probabilities
# ----------------------------------------------------------------------------

@_kernel
def _categorical_kernel(probs, labels, lo, hi, keep, share, scale, step, loss, grad, acc):
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
            y = keep * acc(nm.load(targets[j])) + share
            value -= _xlogy_term(y, nm.log_approx(clipped))
            if grad is not None:
                dot += _neg_log_slope(y, q, clipped, lo, hi, acc) * q
        loss[i] = value
        if grad is not None:
            g = acc(scale[i * step]) * inverse
            grad_row = grad[i]
            for j in range(count):
                q = nm.load(row[j]) * inverse
                y = keep * acc(nm.load(targets[j])) + share
                slope = _neg_log_slope(y, q, _clip(q, lo, hi), lo, hi, acc)
                grad_row[j] = nm.store(g * (slope - dot), grad)


@_kernel
def _sparse_categorical_kernel(probs, labels, ignore_index, lo, hi, scale, step, loss, grad, acc):
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
                for j in range(count):
                    grad[i, j] = nm.store(acc(0.0), grad)
            continue
        row = probs[i]
        total = acc(0.0)
        for j in range(count):
            total += nm.load(row[j])
        inverse = acc(1.0) / total
        q = nm.load(row[label]) * inverse
        clipped = _clip(q, lo, hi)
        loss[i] = -nm.log_approx(clipped)
        if grad is not None:
            g = acc(scale[i * step]) * inverse
            if total == np.inf or total == -np.inf:
                g = acc(np.nan)   # as categorical rows and the reference: sum_j g_j p_j meets 0 * inf
            slope = _neg_log_slope(acc(1.0), q, clipped, lo, hi, acc)
            other = -g * (slope * q)
            grad_row = grad[i]
            for j in range(count):
                grad_row[j] = nm.store(other, grad)
            grad_row[label] = nm.store(g * (slope - slope * q), grad)


# ----------------------------------------------------------------------------
# Row kernels: second order and scoring
# ----------------------------------------------------------------------------

@_kernel
def _hvp_kernel(logits, v, out, acc):
    """``H v = p (v - p.v)`` per row, ``p = softmax(x)``, never forming ``H``:
    the one-read moments (max, ``sum e``, ``sum e v``), then one pass writing."""
    count = logits.shape[1]
    for i in prange(logits.shape[0]):
        row = logits[i]
        vector = v[i]
        peak, total, dot, _ = _row_moments(row, vector, acc)
        inverse = acc(1.0) / total
        mean = dot * inverse
        out_row = out[i]
        for j in range(count):
            p = nm.exp_approx(nm.load(row[j]) - peak) * inverse
            out_row[j] = nm.store(p * (acc(nm.load(vector[j])) - mean), out)


@_kernel
def _score_kernel(logits, labels, ignore_index, loss, lse_out, target_out, entropy_out, argmax_out,
                  correct_out, acc):
    """Per row, from the one-read moments ``(m, s, t)``: ``lse = m + log s``,
    entropy ``log s - t / s`` (two non-negative terms), loss ``(m - x_y) + log s``."""
    for i in prange(logits.shape[0]):
        row = logits[i]
        peak, total, spread, best = _row_moments(row, None, acc)
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


# ----------------------------------------------------------------------------
# Backend contract
# ----------------------------------------------------------------------------

def _elementwise_outputs(first, grad_scale, block):
    """``(loss, grad, flat grad view, scale values, scale period)``; grad ``None`` forward-only."""
    acc = _acc_type(first.dtype)
    loss = _loss_out(first.size, first.dtype)
    if grad_scale is None:
        return loss, None, None, _readonly(np.zeros(1, dtype=acc)), 1
    grad, view = _new_like(first)
    scale, period = _window_values(grad_scale, first.size, block, acc)
    return loss, grad, _flat(view), scale, period


def sigmoid_cross_entropy(logits, labels, pos_weight, label_smoothing, grad_scale):
    acc = _acc_type(logits.dtype)
    block = _block(logits.size)
    weights, period = _window_values(1.0 if pos_weight is None else pos_weight, logits.size, block, acc)
    loss, grad, grad_view, scale, scale_period = _elementwise_outputs(logits, grad_scale, block)
    _sigmoid_kernel(_flat(_kernel_view(logits)), _flat(_label_view(labels, acc)), weights, period,
                    acc(1.0 - label_smoothing), acc(label_smoothing / 2.0), scale, scale_period, block,
                    loss, grad_view, acc)
    return loss.reshape(logits.shape), grad


def sigmoid_cross_entropy_hessian_diag(logits, labels, pos_weight):
    acc = _acc_type(logits.dtype)
    block = _block(logits.size)
    weights, period = _window_values(1.0 if pos_weight is None else pos_weight, logits.size, block, acc)
    out, view = _new_like(logits)
    _sigmoid_hessian_kernel(_flat(_kernel_view(logits)), _flat(_label_view(labels, acc)), weights, period,
                            block, _flat(view), acc)
    return out


def _clip_bounds(epsilon, dtype, acc):
    """Keras's ``[epsilon, 1 - epsilon]``, each rounded to the probabilities' dtype."""
    return acc(_dtypes.round_to(epsilon, dtype)), acc(_dtypes.round_to(1.0 - epsilon, dtype))


def binary_cross_entropy(probs, labels, epsilon, label_smoothing, grad_scale):
    acc = _acc_type(probs.dtype)
    block = _block(probs.size)
    lo, hi = _clip_bounds(epsilon, probs.dtype, acc)
    loss, grad, grad_view, scale, scale_period = _elementwise_outputs(probs, grad_scale, block)
    _binary_kernel(_flat(_kernel_view(probs)), _flat(_label_view(labels, acc)), lo, hi,
                   acc(1.0 - label_smoothing), acc(label_smoothing / 2.0), scale, scale_period, block,
                   loss, grad_view, acc)
    return loss.reshape(probs.shape), grad


def _row_outputs(probs, grad_scale):
    """``(loss, grad, grad view, scale, step)`` of a row kernel; grad ``None`` forward-only."""
    rows = probs.shape[0]
    loss = _loss_out(rows, probs.dtype)
    if grad_scale is None:
        return loss, None, None, None, 0
    grad, view = _new_like(probs)
    scale, step = _scale_and_step(grad_scale, rows)
    return loss, grad, view, _readonly(scale), step


def categorical_cross_entropy(probs, labels, epsilon, label_smoothing, grad_scale):
    acc = _acc_type(probs.dtype)
    lo, hi = _clip_bounds(epsilon, probs.dtype, acc)
    loss, grad, grad_view, scale, step = _row_outputs(probs, grad_scale)
    _categorical_kernel(_kernel_view(probs), _label_view(labels, acc), lo, hi, acc(1.0 - label_smoothing),
                        acc(label_smoothing / probs.shape[1]), scale, step, loss, grad_view, acc)
    return loss, grad


def sparse_categorical_cross_entropy(probs, labels, epsilon, ignore_index, grad_scale):
    acc = _acc_type(probs.dtype)
    lo, hi = _clip_bounds(epsilon, probs.dtype, acc)
    loss, grad, grad_view, scale, step = _row_outputs(probs, grad_scale)
    _sparse_categorical_kernel(_kernel_view(probs), _class_ids(labels), _ignore_value(ignore_index), lo, hi,
                               scale, step, loss, grad_view, acc)
    return loss, grad


def softmax_cross_entropy_hvp(logits, v):
    acc = _acc_type(logits.dtype)
    out, view = _new_like(logits)
    _hvp_kernel(_kernel_view(logits), _label_view(v, acc), view, acc)
    return out


def score(logits, labels, ignore_index):
    rows = logits.shape[0]
    loss, lse, target, entropy = (_loss_out(rows, logits.dtype) for _ in range(4))
    argmax = np.empty(rows, dtype=np.int64)
    correct = np.empty(rows, dtype=np.bool_)
    _score_kernel(_kernel_view(logits), _class_ids(labels), _ignore_value(ignore_index), loss, lse, target,
                  entropy, argmax, correct, _acc_type(logits.dtype))
    return Score(loss, lse, target, entropy, argmax, correct)
