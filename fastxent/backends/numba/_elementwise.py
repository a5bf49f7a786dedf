"""Numba kernels of the sigmoid family: sigmoid cross-entropy and its Hessian diagonal.

The ``(R, K)`` arrays are C-contiguous, so the kernels run over the flat element
range in blocks of ``_config.NUMBA_CHUNK`` elements, one ``prange`` iteration
each, rather than over rows: a 1,000,000 x 10 input vectorises over 2048
elements instead of 10, and a 1-D input of any length still spreads over every
thread. An option that may vary per element (``pos_weight``, the gradient
scale) arrives as a flat array in the accumulation dtype with a period and is
read through :func:`fastxent.backends.numba._rows.window`.

``log1p(exp(-|x|))`` uses :func:`_log1p_unit`, a float32 polynomial for
arguments in ``[0, 1]``: 0.23 ns against 1.1 ns for the general
``nm.log1p_approx``; the sigmoid forward went from 3.3 to 2.0 ns per element
(PyTorch's ``binary_cross_entropy_with_logits``: 3.7 ns, before its extra
passes over memory).
"""

import numpy as np
from numba import prange, types
from numba.extending import overload

from . import _math as nm
from ._rows import gradient_slice, gradient_target, inline, kernel, smoothed, window

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

    Compiled on its own with ``fastmath={"contract"}`` like ``_math``'s
    helpers, so a kernel's ``reassoc`` cannot reorder the polynomial.
    """
    raise NotImplementedError("jitted code only")


@overload(_log1p_unit, jit_options={"fastmath": {"contract"}, "error_model": "numpy", "forceinline": True})
def _log1p_unit_typer(e):
    return {types.float32: _log1p_unit_f32, types.float64: _log1p_unit_f64}.get(e)


@inline
def _sigmoid_pair(x, acc):
    """``(exp(-|x|), sigmoid(x), sigmoid(-x))``: exp only of ``-|x|``, so nothing
    overflows for any ``x``, and both sigmoids keep their relative precision."""
    e = nm.exp_approx(-abs(x))
    d = acc(1.0) / (acc(1.0) + e)
    small = e * d
    return e, (d if x >= 0 else small), (small if x >= 0 else d)


@inline
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


@inline
def _sigmoid_grad(z, q, s_pos, s_neg, acc):
    """``d loss / dx = (1-z) - w sigmoid(-x)``, written ``(1-z) sigmoid(x) - q z sigmoid(-x)``
    (no cancellation where the gradient is small)."""
    return (acc(1.0) - z) * s_pos - q * z * s_neg


#: sigmoid_kernel's stand-in sum: losses times 2**-64, its total times 2**64 (exact powers of two).
_TINY = 2.0 ** -64
_HUGE = 2.0 ** 64


@kernel
def sigmoid_kernel(logits, labels, pos_weight, weight_period, keep, share, scale, scale_period, block,
                   loss, totals, grad, acc):
    """Sigmoid cross-entropy over flat elements; the gradient too when ``grad`` is not None.

    ``z' = keep z + share`` (label smoothing), ``w = 1 + (q-1) z'``:
    ``loss = (1-z') x + w softplus(-x)``, ``grad = g ((1-z') s(x) - q z' s(-x))``.
    ``loss`` None: ``totals[b]`` gets the loss summed over block ``b`` (a reduced
    loss without the ``(R, K)`` buffer); else the loss of every element goes to
    ``loss`` and ``totals`` is None. ``grad`` :data:`IN_PLACE` writes over ``logits``.
    """
    size = logits.shape[0]
    dest = gradient_target(logits, grad)
    tiny = acc(_TINY)   # typed: a float64 constant would pull the sum into float64
    for b in prange((size + block - 1) // block):
        lo = b * block
        hi = min(lo + block, size)
        x = logits[lo:hi]
        z = labels[lo:hi]
        q = window(pos_weight, weight_period, lo, hi)
        if loss is not None:
            out = loss[lo:hi]
        # A block of float32 losses each below 3.4e38 can sum past it (three scores at 3.4e38:
        # the mean is 2.3e38, a float32 sum is inf). A float64 sum would leave the loop
        # scalar (mixed widths), so a second float32 sum of the losses times 2**-64, one fma
        # more per element, stands in where the first overflows (it cannot below 2**64 elements).
        subtotal = acc(0.0)
        scaled = acc(0.0)
        if grad is None:
            for j in range(hi - lo):
                value = nm.load(x[j])
                element = _sigmoid_loss(value, smoothed(z[j], keep, share, acc), q[j], nm.exp_approx(-abs(value)),
                                        acc)
                if loss is not None:
                    out[j] = element
                else:
                    subtotal += element
                    scaled += element * tiny
        else:
            g = window(scale, scale_period, lo, hi)
            dx = gradient_slice(x, grad, lo, hi)
            for j in range(hi - lo):
                value = nm.load(x[j])
                target = smoothed(z[j], keep, share, acc)
                e, s_pos, s_neg = _sigmoid_pair(value, acc)
                element = _sigmoid_loss(value, target, q[j], e, acc)
                if loss is not None:
                    out[j] = element
                else:
                    subtotal += element
                    scaled += element * tiny
                dx[j] = nm.store(g[j] * _sigmoid_grad(target, q[j], s_pos, s_neg, acc), dest)
        if totals is not None:
            totals[b] = subtotal if subtotal - subtotal == 0 else np.float64(scaled) * _HUGE


@kernel
def sigmoid_hessian_kernel(logits, labels, pos_weight, weight_period, block, out, acc):
    """``(1 + (q-1) z) s(x) s(-x)`` over flat elements, in the logits' storage (no label smoothing)."""
    size = logits.shape[0]
    for b in prange((size + block - 1) // block):
        lo = b * block
        hi = min(lo + block, size)
        x = logits[lo:hi]
        z = labels[lo:hi]
        q = window(pos_weight, weight_period, lo, hi)
        dest = out[lo:hi]
        for j in range(hi - lo):
            _, s_pos, s_neg = _sigmoid_pair(nm.load(x[j]), acc)
            weight = acc(1.0) + (q[j] - acc(1.0)) * acc(nm.load(z[j]))
            dest[j] = nm.store(weight * s_pos * s_neg, out)
