"""Compile options and the per-row machinery every Numba kernel is built from.

One definition per formula: the kernels of ``_softmax``, ``_probs``, ``_moments``
and ``_elementwise`` call these helpers, which Numba inlines (``inline="always"``)
so they vectorise inside the caller's loop. The design rules they follow, with
their measurements, are in ``docs/design.md`` ("The Numba backend").
"""

import math

import numpy as np
from numba import njit, types
from numba.extending import overload

from ... import _config
from . import _math as nm

#: Fast-math flags of every kernel: the reassociation-type flags that let sums
#: vectorise, without ``nnan``/``ninf``: ``-inf`` is masking and NaN must reach
#: the loss, so LLVM may not assume them away (``_math``'s docstring).
FASTMATH = nm.KERNEL_FASTMATH

#: Every kernel: parallel over rows (or blocks of elements), cached on disk,
#: ``error_model="numpy"`` (a division by zero gives IEEE inf/NaN, as the
#: reference does, and adds no zero-check branch to a vector loop), and
#: ``nogil``: a kernel releases the GIL, so Python threads (Dask's threaded
#: scheduler, ``fastxent.dask``) run kernels on different blocks at once.
kernel = njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)

#: Every helper: inlined into the calling kernel by Numba, same flags.
inline = njit(inline="always", fastmath=FASTMATH, error_model="numpy")

#: Classes per chunk of a row, frozen into the kernels at compile time.
CHUNK = _config.NUMBA_CHUNK


@njit(cache=True, fastmath={"contract"}, error_model="numpy", forceinline=True)
def log_prob(value, shift, log_sum):
    """``(value - shift) - log_sum``: a log-probability, in this order.

    Compiled on its own without ``reassoc`` (LLVM keeps each instruction's
    flags when it inlines), since the kernels' ``reassoc`` may rewrite it as
    ``value - (shift + log_sum)``, which at |x| = 1e4 in float32 loses 3e-4
    of log 2 (found by tests/test_properties.py).
    """
    return (value - shift) - log_sum


@njit(cache=True, fastmath={"contract"}, error_model="numpy", forceinline=True)
def half_gap(shift, value, half):
    """``(shift - value) / 2``, formed as ``shift * half - value * half`` (``half`` = 0.5 in
    the accumulation type): the same rounding, and no overflow where ``shift - value``
    overflows but the loss term it enters does not (a weight of 0.3 on a class scored
    -3e38 in a float32 row whose max is 3e38: the term is 1.8e38, the difference 6e38).
    Callers weight it twice. Compiled on its own like :func:`log_prob`: the kernels'
    ``reassoc`` may factor it back into ``(shift - value) * half``.
    """
    return shift * half - value * half


@inline
def capped(value, softcap):
    """Gemma 2 soft-capping ``c * tanh(x / c)``; the identity when ``softcap`` is None."""
    if softcap is None:
        return value
    return softcap * nm.tanh_approx(value / softcap)


@inline
def capped_slope(value, softcap, acc):
    """``d/dx c tanh(x/c) = 1 - (t/c)**2`` written with the capped value ``t``."""
    if softcap is None:
        return acc(1.0)
    ratio = value / softcap
    return acc(1.0) - ratio * ratio


@inline
def smoothed(label, keep, share, acc):
    """A label after label smoothing: ``keep * y + share`` (``keep = 1 - eps``,
    ``share = eps / C`` for a softmax row, ``eps / 2`` for a binary element)."""
    return keep * acc(nm.load(label)) + share


@inline
def xlogy_term(weight, value):
    """``weight * value`` with 0 where ``weight == 0`` (even for value = -inf)."""
    return weight * value if weight != 0 else weight - weight


@inline
def chunk_max(chunk, acc):
    """Largest element of the 1-D contiguous ``chunk`` via integer keys (vectorises;
    NaN-positive chunks give NaN).

    LLVM does not vectorise a float max reduction without ``nnan`` (10.5 us for
    32000 floats, scalar ``vmaxss``); the float's bits mapped to a monotonic
    integer key reduce with ``vpmaxsd`` in 2.2 us, the speed of a vectorised sum.
    A positive NaN maps above +inf, so a NaN chunk gets a NaN max.
    """
    key = nm.order_key(acc(-np.inf))
    for j in range(chunk.shape[0]):
        candidate = nm.order_key(nm.load(chunk[j]))
        key = candidate if candidate > key else key
    return nm.from_order_key(key)


@inline
def normal_exp(shifted, acc):
    """``exp(shifted)`` for a score minus its row's max (``shifted <= 0``), flushed to 0
    where the result would be subnormal (``shifted < -87`` in float32, ``< -708`` in float64).

    A softmax term that small is below the rounding of the row's sum (>= 1, the max's own
    term) and of every probability's gradient, so dropping it changes nothing but speed:
    subnormal operands take a microcode assist per instruction on x86. Spiky float32
    rows (7.7% of the terms of ``fastxent bench``'s 4096 x 32000 between e^-104 and
    e^-87) ran the fused pass in 344 ms against 146 ms for scores without them. The
    input is clamped first so ``exp_approx`` builds no subnormal either; NaN stays NaN.
    """
    low = acc(-708.0) if acc(1e-300) != 0 else acc(-87.0)
    value = nm.exp_approx(shifted if not shifted < low else low)
    return value if not shifted < low else acc(0.0)


@inline
def normal_floor(factor, acc):
    """The smallest ``e >= 0`` whose ``e * factor`` is a normal number: products of
    smaller kept exponentials are flushed to 0 by :func:`scaled_exp`. NaN for a NaN
    ``factor``, +inf for 0."""
    tiny = acc(2.2250738585072014e-308) if acc(1e-300) != 0 else acc(1.1754943508222875e-38)
    return tiny / abs(factor)


@inline
def scaled_exp(kept, factor, floor, acc):
    """``kept * factor`` (a kept exponential times a row's gradient coefficient), 0 where
    the product would be subnormal (``kept < floor``, :func:`normal_floor`). With
    ``reduction="mean"`` the coefficient is ``1 / N``, so products far below the float32
    grid are common (e^-80 / 4096) and each costs an x86 microcode assist: the fused
    pass on ``fastxent bench``'s spiky 4096 x 32000 took 259 ms for ``"mean"`` against
    140 ms for ``"none"``. NaN passes through."""
    return kept * factor if not kept < floor else acc(0.0)


@inline
def rebase(peak, shift):
    """Merge two log-sum-exp references: ``(m, a, b)`` with ``m`` the larger of
    ``peak`` and ``shift`` and ``a = exp(peak - m)``, ``b = exp(shift - m)`` the
    factors that move sums kept relative to each onto ``m`` (the online softmax of
    Milakov & Gimelshein 2018, applied per chunk). A NaN ``shift`` gives NaN factors."""
    top = shift if shift > peak else peak
    return top, nm.exp_approx(peak - top), nm.exp_approx(shift - top)


@inline
def row_lse(row, softcap, acc):
    """``log(sum(exp(t)))`` of one row (t = capped scores) in one read, chunk by chunk,
    as the pair ``(shift, log_sum)`` with ``lse = shift + log_sum``.

    Each chunk of ``CHUNK`` classes contributes ``(its max, sum exp(t - max))``
    while it is in L1, merged into the running pair by :func:`rebase`. A chunk
    that is all ``-inf`` adds nothing; a row that is all ``-inf`` or holds
    NaN/+inf gives a NaN ``log_sum``. Callers keep the pair apart:
    ``(t - shift) - log_sum`` is exact where ``t - lse`` is not (at |x| = 1e4
    float32 rounds lse to 1e-3, a 3e-4 relative error on log 2).
    """
    running_max = acc(-np.inf)
    running_sum = acc(0.0)
    for start in range(0, row.shape[0], CHUNK):
        chunk = row[start:start + CHUNK]
        shift = capped(chunk_max(chunk, acc), softcap)
        if shift == -np.inf:
            shift = acc(0.0)  # all -inf (masked) chunk: exp(-inf - 0) = 0, NaN still propagates
        chunk_sum = acc(0.0)
        for j in range(chunk.shape[0]):
            chunk_sum += normal_exp(capped(nm.load(chunk[j]), softcap) - shift, acc)
        if chunk_sum != 0:
            running_max, old, new = rebase(running_max, shift)
            running_sum = running_sum * old + chunk_sum * new
    if running_sum > 0:
        return running_max, acc(math.log(running_sum))
    return running_max, acc(np.nan)


@inline
def row_exp_into(row, out_row, acc):
    """``out_row = exp(x - m)`` (m = row max) and the row's lse: the fused kernels' first half.

    Keeping the exponentials (in a scratch row of the accumulation type) lets
    the gradient pass be a multiply-subtract instead of a second exp per element
    (measured: fused pass 1.6x faster at 4096 x 32000). Returns
    ``(shift, log_sum, 1 / sum)`` (see :func:`row_lse`); NaN for the rows
    ``row_lse`` makes NaN.
    """
    peak = chunk_max(row, acc)
    shift = peak if peak != -np.inf else acc(0.0)
    total = acc(0.0)
    for j in range(row.shape[0]):
        value = normal_exp(nm.load(row[j]) - shift, acc)
        out_row[j] = value
        total += value
    if total > 0:
        return shift, acc(math.log(total)), acc(1.0) / total
    return shift, acc(np.nan), acc(np.nan)


@inline
def window(values, period, lo, hi):
    """The slice of a flat per-element option lined up with elements ``[lo, hi)``.

    ``period == 0``: ``values`` is the full flat array, window ``[lo, hi)``;
    ``period == K``: a per-class vector tiled to ``block + K`` values, the window
    starting at ``lo % K`` (a uniform value is the case ``K = 1``). The inner
    loop reads it with unit stride whatever the option's shape.
    """
    start = lo if period == 0 else lo % period
    return values[start:start + hi - lo]


@inline
def zero_row(grad, i, acc):
    """Row ``i`` of a gradient set to zeros (an ignored row's gradient)."""
    row = grad[i]
    for j in range(row.shape[0]):
        row[j] = nm.store(acc(0.0), grad)


#: The ``grad`` argument of a fused kernel that writes the gradient over the
#: scores (``inplace=True``). A bool, not an array: the kernel compiles a variant
#: of its own in which the scores and the gradient are one array, so LLVM sees one
#: pointer and vectorises ``out[j] = f(x[j])`` without a runtime alias check (two
#: arrays over the same memory would fail that check and take the scalar loop).
IN_PLACE = True


def gradient_target(scores, grad):
    """The array a fused kernel writes its gradient to: ``grad``, or ``scores``
    itself when ``grad`` is :data:`IN_PLACE` (resolved at compile time)."""
    raise NotImplementedError("jitted code only")


@overload(gradient_target, inline="always")
def _gradient_target_typer(scores, grad):
    if isinstance(grad, types.Boolean):
        return lambda scores, grad: scores
    return lambda scores, grad: grad


def gradient_slice(scores_slice, grad, lo, hi):
    """``grad[lo:hi]``, or ``scores_slice`` itself (the same array object) when ``grad`` is
    :data:`IN_PLACE`: a loop that reads ``scores_slice[j]`` and writes through a second
    slice of the same buffer gets LLVM's runtime alias check, which fails when the two
    are one and runs the scalar loop (sigmoid in place 16384 x 1000: 157 ms vs 25 ms)."""
    raise NotImplementedError("jitted code only")


@overload(gradient_slice, inline="always")
def _gradient_slice_typer(scores_slice, grad, lo, hi):
    if isinstance(grad, types.Boolean):
        return lambda scores_slice, grad, lo, hi: scores_slice
    return lambda scores_slice, grad, lo, hi: grad[lo:hi]
