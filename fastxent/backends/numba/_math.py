"""Branch-free, vectorisable math for the Numba kernels: exp, log, log1p, tanh, 16-bit storage.

Why this module exists
----------------------
This llvmlite has no SVML, so ``math.exp``/``math.log`` in a loop are scalar libm
calls that also stop LLVM from vectorising the loop (docs/design.md, "The Numba backend": a
``math.exp`` softmax ran slower than numpy). Everything here is arithmetic,
integer bit manipulation and selects (``a if c else b`` becomes a blend), so a
loop calling these helpers compiles to packed AVX2 (``ymm``) or AVX-512 (``zmm``)
code. Numba has no float16 on the CPU and knows nothing of ``ml_dtypes.bfloat16``,
so 16-bit scores arrive as integer *views* -- float16 as ``int16``, bfloat16 as
``uint16`` -- and :func:`load` / :func:`store` widen and narrow them.

Fast-math contract (read this before choosing a kernel's ``fastmath``)
----------------------------------------------------------------------
Every helper is compiled once, on its own, with ``fastmath={"contract"}`` and
``error_model="numpy"`` (no zero-division branch), marked ``alwaysinline`` and
inlined by LLVM into the caller. Numba's fast-math pass only flags instructions
that carry no flags yet, so the caller's flags never reach the helpers' code:
``reassoc`` cannot fold the two-constant (Cody-Waite) ``ln 2`` of the range
reductions into one (measured: it did, when the same code was Numba-inlined),
and ``nnan``/``ninf`` cannot delete the NaN/inf selects. Kernels should still use
:data:`KERNEL_FASTMATH` (``{"nsz", "arcp", "contract", "afn", "reassoc"}``):
with ``nnan``/``ninf`` the *kernel's own* arithmetic (``x - max``) may turn a NaN
or ``-inf`` operand into poison before it reaches a helper.

Accuracy
--------
Errors are measured by ``tests/test_numba_math.py`` against numpy (float64
references for float32 results, 80-bit ``longdouble`` for float64 results), in
units in the last place (ulp) of the result's dtype, over the whole input range
(every 211th float32 bit pattern plus random samples; about 10^6 float64 samples
spread over all exponents). The float32 figures quoted in the docstrings were
also checked exhaustively, over all 2^32 inputs (a one-off run, too slow for
the test suite): they are the exhaustive maxima.

Public names
------------
Bit casts (jitted code only, LLVM ``bitcast``): ``f32_as_i32``, ``i32_as_f32``,
``f64_as_i64``, ``i64_as_f64``; ``opaque_index`` (a value LLVM cannot analyse).
Math (float32 -> float32 math, float64 -> float64 math): ``exp_approx``,
``log_approx``, ``log1p_approx``, ``tanh_approx``.
16-bit storage: ``f16_to_f32``, ``f32_to_f16``, ``bf16_to_f32``, ``f32_to_bf16``.
Kernel glue: ``load``, ``store``, ``acc_type_zero``, ``acc_cast``, ``order_key``,
``from_order_key``.
Tests' tools: ``simd_report``, ``asm_uses_simd``.

The jitted helpers are Numba dispatchers: callable from Python on scalars too
(compiled on first use, cached on disk). Nothing is compiled at import.

Vector width: LLVM picks it from the host CPU. Measured here (Zen 3, AVX2):
``ymm``. Cross-compiled for Zen 4 (AVX-512) the same loops use ``zmm``; for
Intel Sapphire Rapids LLVM keeps 256-bit vectors (its prefer-vector-width=256
tuning), so a test demanding ``zmm`` would be wrong there.

Caching caveat: a ``cache=True`` kernel's on-disk cache is keyed on its own
source file; Numba does not notice edits to this module. After changing a
helper, delete the kernels' ``*.nbi``/``*.nbc`` files.
"""

import re

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

__all__ = [
    "KERNEL_FASTMATH",
    "f32_as_i32", "i32_as_f32", "f64_as_i64", "i64_as_f64", "opaque_index",
    "exp_approx", "log_approx", "log1p_approx", "tanh_approx",
    "f16_to_f32", "f32_to_f16", "bf16_to_f32", "f32_to_bf16",
    "load", "store", "acc_type_zero", "acc_cast", "order_key", "from_order_key",
    "simd_report", "asm_uses_simd",
]

#: The ``fastmath`` flags kernels calling these helpers should use: everything
#: that lets reductions vectorise, without ``nnan``/``ninf`` (see module docstring).
KERNEL_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}   # a set: Numba rejects frozenset

# Compilation options of every helper: flags pinned to "contract" (an FMA is
# welcome, a reassociation is not), no ZeroDivisionError branch, always inlined.
_HELPER_OPTIONS = {"fastmath": {"contract"}, "error_model": "numpy", "forceinline": True}
_helper = njit(cache=True, **_HELPER_OPTIONS)

_F32 = np.float32
_F64 = np.float64


# ----------------------------------------------------------------------------
# Bit casts and small integer intrinsics (LLVM IR written directly)
# ----------------------------------------------------------------------------
# Numba types every integer operation as int64. LLVM narrows add/sub/and/or/shl
# back to 32 bits inside a vector loop, but not an arithmetic right shift of a
# sign-extended value, nor an int64 -> float conversion (no AVX2 instruction):
# the few places that need those go through the 32-bit intrinsics below.

@intrinsic
def f32_as_i32(typingctx, x):
    """The bits of a float32 as an int32 (LLVM ``bitcast``; jitted code only)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def i32_as_f32(typingctx, bits):
    """The float32 whose bits are the low 32 bits of an integer (``bitcast``; jitted code only)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.trunc(args[0], ir.IntType(32)), ir.FloatType())

    return types.float32(types.int64), codegen


@intrinsic
def f64_as_i64(typingctx, x):
    """The bits of a float64 as an int64 (LLVM ``bitcast``; jitted code only)."""
    if x != types.float64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


@intrinsic
def i64_as_f64(typingctx, bits):
    """The float64 whose bits are an int64 (``bitcast``; jitted code only)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


def _shift32(kind):
    """Intrinsic ``int32(value) >> shift`` in 32 bits, arithmetic or logical."""
    def typer(typingctx, value, shift):
        if not (isinstance(value, types.Integer) and isinstance(shift, types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            i32 = ir.IntType(32)
            operation = builder.ashr if kind == "arithmetic" else builder.lshr
            return operation(builder.trunc(args[0], i32), builder.trunc(args[1], i32))

        return types.int32(types.int64, types.int64), codegen

    typer.__name__ = "_ashr32" if kind == "arithmetic" else "_lshr32"
    return intrinsic(typer)


_ashr32 = _shift32("arithmetic")
_lshr32 = _shift32("logical")


@intrinsic
def _high32(typingctx, value):
    """The high 32 bits of an int64, as an int32."""
    if not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        shifted = builder.lshr(args[0], ir.Constant(ir.IntType(64), 32))
        return builder.trunc(shifted, ir.IntType(32))

    return types.int32(types.int64), codegen


@intrinsic
def _int32_to_float(typingctx, value, like):
    """``float(int32(value))`` in ``like``'s float type (``cvtdq2ps``/``cvtdq2pd``, vectorisable)."""
    if not (isinstance(value, types.Integer) and isinstance(like, types.Float)):
        return None

    def codegen(context, builder, signature, args):
        narrow = builder.trunc(args[0], ir.IntType(32))
        return builder.sitofp(narrow, context.get_value_type(signature.return_type))

    return like(types.int64, like), codegen


@intrinsic
def opaque_index(typingctx, value):
    """The integer ``value``, unchanged, passed through an empty inline-assembly
    statement LLVM cannot see into (jitted code only).

    A loop whose addresses depend on it is left scalar: LLVM does not vectorise
    a loop with inline assembly, and cannot prove the access pattern of one
    either. For the transposing copies of the short-row kernels, which LLVM
    would otherwise vectorise for AVX-512 with a scatter or a gather per vector
    (one element at a time, and slower than the scalar copy).
    """
    if not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        wide = context.cast(builder, args[0], signature.args[0], types.int64)
        return builder.asm(ir.FunctionType(i64, [i64]), "", "=r,0", [wide], False)

    return types.int64(value), codegen


def _scale_by_power_of_two(builder, value, n32, bias, mantissa_bits, int_type):
    """IR for ``value * 2**h * 2**(n - h)``, ``h = n >> 1``: each factor a normal number."""
    i32 = ir.IntType(32)
    half = builder.ashr(n32, ir.Constant(i32, 1))
    rest = builder.sub(n32, half)
    result = value
    for exponent in (half, rest):
        wide = builder.sext(exponent, int_type) if int_type.width != 32 else exponent
        biased = builder.add(wide, ir.Constant(int_type, bias))
        factor = builder.bitcast(builder.shl(biased, ir.Constant(int_type, mantissa_bits)),
                                 value.type)
        result = builder.fmul(result, factor)
    return result


@intrinsic
def _scale2(typingctx, value, n):
    """``value * 2**n`` for ``|n| <= 2*emax`` (two normal factors, so one rounding at most).

    Splitting ``2**n`` in two keeps both factors normal: float32 results from
    ``2**-149`` (gradual underflow, rounded once) to overflow, float64 alike.
    """
    if not (isinstance(value, types.Float) and isinstance(n, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        n32 = builder.trunc(args[1], ir.IntType(32))
        if signature.args[0] == types.float32:
            return _scale_by_power_of_two(builder, args[0], n32, 127, 23, ir.IntType(32))
        return _scale_by_power_of_two(builder, args[0], n32, 1023, 52, ir.IntType(64))

    return value(value, types.int64), codegen


# ----------------------------------------------------------------------------
# Type dispatch: one stub, an implementation per argument type
# ----------------------------------------------------------------------------

def _dispatch(implementations):
    """A stub whose jitted calls resolve, by argument type, to ``implementations[type]``.

    The implementations are compiled with the helpers' pinned options, so the
    caller's fast-math flags never reach them.
    """
    def stub(x):
        raise NotImplementedError("jitted code only")

    def typer(x):
        return implementations.get(x)

    overload(stub, jit_options=_HELPER_OPTIONS)(typer)
    return stub


# ----------------------------------------------------------------------------
# exp
# ----------------------------------------------------------------------------
# exp(x) = 2**n * exp(r), n = round(x / ln 2), r = x - n ln2_hi - n ln2_lo, |r| <= ln2/2.
# round() is the shifter trick: x*log2e + 1.5*2**23 lands on an integer ulp, so
# the low bits of the sum are n in two's complement and sum - shifter is n as a
# float. No float->int conversion happens, so no input (NaN, inf, 1e30) can
# produce LLVM poison; out-of-range inputs are replaced by the final selects.

_F32_LOG2E = _F32(1.44269504088896341)
_F32_SHIFTER = _F32(12582912.0)          # 1.5 * 2**23
_F32_SHIFTER_BITS = 0x4B400000
_F32_LN2_HI = _F32(0.693359375)          # Cephes C1: 9 significant bits, n*C1 exact
_F32_LN2_LO = _F32(-2.12194440e-4)
# Cephes expf polynomial: exp(r) ~ 1 + r + r**2 * P(r) on |r| <= ln2/2.
_F32_EXP_P = tuple(_F32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                     4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))
_F32_EXP_LOW = _F32(-104.0)   # exp(-103.973) = 2**-150 already rounds to 0
_F32_EXP_HIGH = _F32(89.0)    # exp(88.7229) > FLT_MAX already rounds to inf
_F32_ZERO = _F32(0.0)
_F32_ONE = _F32(1.0)
_F32_TWO = _F32(2.0)
_F32_HALF = _F32(0.5)
_F32_INF = _F32(np.inf)
_F32_NAN = _F32(np.nan)

_F64_LOG2E = 1.4426950408889634
_F64_SHIFTER = 6755399441055744.0        # 1.5 * 2**52
_F64_SHIFTER_BITS = 0x4338000000000000
_F64_LN2_HI = 6.93147180369123816490e-01  # fdlibm: 21 trailing zero bits, n*hi exact
_F64_LN2_LO = 1.90821492927058770002e-10
# Taylor coefficients 1/k!, k = 13 .. 2: truncation error r**14/14! < 4e-18 for |r| <= ln2/2.
_F64_EXP_P = (1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
              1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0,
              1.0 / 24.0, 1.0 / 6.0, 0.5)
_F64_EXP_LOW = -746.0         # exp(-745.134) = 2**-1075 already rounds to 0
_F64_EXP_HIGH = 710.0         # exp(709.783) > DBL_MAX already rounds to inf


def _exp_f32(x):
    t = x * _F32_LOG2E + _F32_SHIFTER
    n = t - _F32_SHIFTER
    ni = np.int64(f32_as_i32(t)) - _F32_SHIFTER_BITS
    r = x - n * _F32_LN2_HI
    r = r - n * _F32_LN2_LO
    c0, c1, c2, c3, c4, c5 = _F32_EXP_P
    p = ((((c0 * r + c1) * r + c2) * r + c3) * r + c4) * r + c5
    y = (p * (r * r) + r) + _F32_ONE
    result = _scale2(y, ni)
    result = _F32_ZERO if x < _F32_EXP_LOW else result
    return _F32_INF if x > _F32_EXP_HIGH else result


def _exp_f64(x):
    t = x * _F64_LOG2E + _F64_SHIFTER
    n = t - _F64_SHIFTER
    ni = f64_as_i64(t) - _F64_SHIFTER_BITS
    r = x - n * _F64_LN2_HI
    r = r - n * _F64_LN2_LO
    c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11 = _F64_EXP_P
    p = ((((((((((c0 * r + c1) * r + c2) * r + c3) * r + c4) * r + c5) * r + c6) * r + c7)
              * r + c8) * r + c9) * r + c10) * r + c11
    y = (p * (r * r) + r) + 1.0
    result = _scale2(y, ni)
    result = 0.0 if x < _F64_EXP_LOW else result
    return np.inf if x > _F64_EXP_HIGH else result


_exp = _dispatch({types.float32: _exp_f32, types.float64: _exp_f64})


@_helper
def exp_approx(x):
    """``exp(x)`` without libm, vectorisable; float32 math for float32, float64 for float64.

    Formula: ``n = round(x log2 e)`` (shifter trick, no float->int conversion),
    ``r = x - n ln2_hi - n ln2_lo`` (Cody-Waite, FMA where available),
    ``exp(r) = 1 + r + r^2 P(r)`` -- Cephes' degree-5 ``P`` for float32, the
    Taylor series to ``r^13`` for float64 -- and ``2^n`` applied as two normal
    powers of two built from exponent bits, so results are correct down to the
    smallest subnormal (gradual underflow, no flush) and up to overflow.

    Special values: ``x < -104`` (float32) / ``x < -746`` (float64), ``-inf``
    -> exactly ``0``; ``x > 89`` / ``x > 710``, ``+inf`` -> ``+inf``; NaN -> NaN.
    Results below the smallest subnormal (``x < -103.972`` float32,
    ``x < -745.133`` float64) round to 0, as IEEE does.

    Measured maximum error: float32 1.01 ulp (all 2^32 inputs; 22 of them
    above 1 ulp), float64 0.99 ulp (sampled). Subnormal results are rounded once,
    from the full-precision ``exp(r)``, so they are as accurate on the subnormal grid.
    """
    return _exp(x)


# ----------------------------------------------------------------------------
# log, log1p
# ----------------------------------------------------------------------------
# log(x) = k ln2 + log(m), m = x / 2**k in [sqrt(2)/2, sqrt(2)): subtracting the
# bits of sqrt(2)/2 moves the cut of the exponent field there, so k and m come
# from two integer operations and f = m - 1 is exact (Sterbenz).

_F32_SQRTHALF_BITS = 0x3F3504F3
_F32_MIN_NORMAL = _F32(2.0 ** -126)
_F32_SUBNORMAL_SCALE = _F32(2.0 ** 23)
# Cephes logf: log(1+f) ~ f - f^2/2 + f^3 Q(f) on f in [sqrt(1/2)-1, sqrt(2)-1].
_F32_LOG_Q = tuple(_F32(c) for c in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1,
                                     -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1,
                                     2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1))
_F32_FOUR = _F32(4.0)

_F64_SQRTHALF_BITS = 0x3FE6A09E667F3BCD
_F64_EXPONENT_FIELD = -(1 << 52)          # 0xfff0000000000000: sign and exponent bits
_F64_MIN_NORMAL = 2.0 ** -1022
_F64_SUBNORMAL_SCALE = 2.0 ** 54
# fdlibm e_log.c: log(1+f) = 2 atanh(s), s = f/(2+f), R(z) = Lg1 z + ... + Lg7 z^7.
_F64_LG = (6.666666666666735130e-01, 3.999999999940941908e-01, 2.857142874366239149e-01,
           2.222219843214978396e-01, 1.818357216161805012e-01, 1.531383769920937332e-01,
           1.479819860511658591e-01)


@_helper
def _log_reduce_f32(x):
    """``(f, k)`` with ``x = 2^k (1 + f)``, ``1 + f`` in ``[sqrt(2)/2, sqrt(2))``, for ``x > 0``."""
    tiny = x < _F32_MIN_NORMAL
    scaled = x * _F32_SUBNORMAL_SCALE if tiny else x
    k_adjust = -23 if tiny else 0
    bits = np.int64(f32_as_i32(scaled))
    offset = bits - _F32_SQRTHALF_BITS
    k = _ashr32(offset, 23) + k_adjust
    f = i32_as_f32(bits - (offset & -0x800000)) - _F32_ONE
    return f, _int32_to_float(k, x)


@_helper
def _log_poly_f32(f, fk):
    """``log(1 + f) + fk ln2`` for ``f`` in ``[sqrt(1/2) - 1, sqrt(2) - 1]`` (Cephes logf)."""
    z = f * f
    q0, q1, q2, q3, q4, q5, q6, q7, q8 = _F32_LOG_Q
    q = (((((((q0 * f + q1) * f + q2) * f + q3) * f + q4) * f + q5) * f + q6) * f + q7) * f + q8
    y = q * f * z + fk * _F32_LN2_LO
    y = y - _F32_HALF * z
    return (f + y) + fk * _F32_LN2_HI


def _log_f32(x):
    f, fk = _log_reduce_f32(x)
    result = _log_poly_f32(f, fk)
    result = -_F32_INF if x == _F32_ZERO else result
    result = _F32_INF if x == _F32_INF else result
    return result if x >= _F32_ZERO else _F32_NAN


@_helper
def _log_reduce_f64(x):
    """``(f, k)`` with ``x = 2^k (1 + f)``, ``1 + f`` in ``[sqrt(2)/2, sqrt(2))``, for ``x > 0``."""
    tiny = x < _F64_MIN_NORMAL
    scaled = x * _F64_SUBNORMAL_SCALE if tiny else x
    k_adjust = -54 if tiny else 0
    bits = f64_as_i64(scaled)
    offset = bits - _F64_SQRTHALF_BITS
    k = _ashr32(_high32(offset), 20) + k_adjust
    f = i64_as_f64(bits - (offset & _F64_EXPONENT_FIELD)) - 1.0
    return f, _int32_to_float(k, x)


@_helper
def _log_poly_f64(f, fk):
    """``log(1 + f) + fk ln2`` for ``f`` in ``[sqrt(1/2) - 1, sqrt(2) - 1]`` (fdlibm e_log.c)."""
    half_f2 = 0.5 * f * f
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    lg1, lg2, lg3, lg4, lg5, lg6, lg7 = _F64_LG
    t1 = w * (lg2 + w * (lg4 + w * lg6))
    t2 = z * (lg1 + w * (lg3 + w * (lg5 + w * lg7)))
    return fk * _F64_LN2_HI - ((half_f2 - (s * (half_f2 + (t1 + t2)) + fk * _F64_LN2_LO)) - f)


def _log_f64(x):
    f, fk = _log_reduce_f64(x)
    result = _log_poly_f64(f, fk)
    result = -np.inf if x == 0.0 else result
    result = np.inf if x == np.inf else result
    return result if x >= 0.0 else np.nan


_log = _dispatch({types.float32: _log_f32, types.float64: _log_f64})


@_helper
def log_approx(x):
    """Natural ``log(x)`` without libm, vectorisable; float32 or float64 math by argument type.

    Formula: ``x = 2^k m``, ``m`` in ``[sqrt(2)/2, sqrt(2))`` by integer
    arithmetic on the bits (subnormal inputs are first scaled by ``2^23`` /
    ``2^54``), ``f = m - 1`` exact; float32: Cephes ``logf``,
    ``log(1+f) = f - f^2/2 + f^3 Q(f)`` (degree 8); float64: fdlibm,
    ``log(1+f) = f - (f^2/2 - s (f^2/2 + R(s^2)))``, ``s = f / (2 + f)``; then
    ``+ k ln2_hi + k ln2_lo``.

    Special values: ``+-0 -> -inf``, ``+inf -> +inf``, ``x < 0`` or NaN -> NaN.

    Measured maximum error over all positive inputs, subnormals included:
    float32 0.83 ulp (all 2^32 inputs), float64 0.81 ulp (sampled).
    """
    return _log(x)


# Where |log1p(x)| is small (x within the polynomial's range of f), f = x is
# used as is: rounding 1 + x first would cost up to 1.44 ulp (measured).
_LOG1P_DIRECT_LO = -0.2928932188134524     # sqrt(1/2) - 1
_LOG1P_DIRECT_HI = 0.41421356237309503     # sqrt(2) - 1
_F32_LOG1P_DIRECT_LO = _F32(-0.29289320)   # rounded inwards
_F32_LOG1P_DIRECT_HI = _F32(0.41421354)
_F32_MINUS_ONE = _F32(-1.0)


def _log1p_f32(x):
    u = x + _F32_ONE
    # c = (1 + x) - u exactly (Sterbenz in both branches); log1p(x) = log(u) + c/u.
    c = (_F32_ONE - (u - x)) if u >= _F32_FOUR else (x - (u - _F32_ONE))
    f, fk = _log_reduce_f32(u)
    direct = (x >= _F32_LOG1P_DIRECT_LO) & (x < _F32_LOG1P_DIRECT_HI)
    f = x if direct else f
    fk = _F32_ZERO if direct else fk
    correction = _F32_ZERO if direct else c / u
    result = _log_poly_f32(f, fk) + correction
    result = -_F32_INF if x == _F32_MINUS_ONE else result
    result = _F32_INF if x == _F32_INF else result
    result = result if x >= _F32_MINUS_ONE else _F32_NAN
    return x if x == _F32_ZERO else result   # keeps -0


def _log1p_f64(x):
    u = x + 1.0
    c = (1.0 - (u - x)) if u >= 4.0 else (x - (u - 1.0))
    f, fk = _log_reduce_f64(u)
    direct = (x >= _LOG1P_DIRECT_LO) & (x < _LOG1P_DIRECT_HI)
    f = x if direct else f
    fk = 0.0 if direct else fk
    correction = 0.0 if direct else c / u
    result = _log_poly_f64(f, fk) + correction
    result = -np.inf if x == -1.0 else result
    result = np.inf if x == np.inf else result
    result = result if x >= -1.0 else np.nan
    return x if x == 0.0 else result


_log1p = _dispatch({types.float32: _log1p_f32, types.float64: _log1p_f64})


@_helper
def log1p_approx(x):
    """``log(1 + x)``, accurate for tiny ``x``, without libm; float32 or float64 math by type.

    Formula: for ``x`` in ``[sqrt(1/2) - 1, sqrt(2) - 1)`` the ``log(1 + f)``
    polynomial of :func:`log_approx` is evaluated at ``f = x`` itself (no rounding
    of ``1 + x``, full relative accuracy down to subnormal ``x``); elsewhere
    ``u = 1 + x`` rounded, ``c = (1 + x) - u`` recovered exactly (``x - (u - 1)``,
    or ``1 - (u - x)`` once ``u >= 4``) and ``log1p(x) = log(u) + c / u``.
    Used for ``log1p(exp(-|x|))`` in the sigmoid loss.

    Special values: ``-1 -> -inf``, ``+inf -> +inf``, ``x < -1`` or NaN -> NaN,
    ``+-0 -> +-0``.

    Measured maximum error over ``(-1, +inf)``: float32 1.23 ulp (all 2^32
    inputs), float64 1.11 ulp (sampled); float32 0.80 ulp within the direct
    range (which holds ``exp(-|x|)`` for ``|x| > 0.88``), 1.07 ulp on ``[0, 1]``.
    """
    return _log1p(x)


# ----------------------------------------------------------------------------
# tanh
# ----------------------------------------------------------------------------

_TANH_SMALL = 0.625
# Cephes tanhf: tanh(x) ~ x + x^3 P(x^2) for |x| < 0.625.
_F32_TANH_P = tuple(_F32(c) for c in (-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2,
                                      1.33314422036e-1, -3.33332819422e-1))
_F32_TANH_SMALL = _F32(_TANH_SMALL)
# Cephes tanh (double): tanh(x) ~ x + x^3 P(x^2) / Q(x^2) for |x| < 0.625.
_F64_TANH_P = (-9.64399179425052238628e-1, -9.92877231001918586564e1, -1.61468768441708447952e3)
_F64_TANH_Q = (1.12811678491632931402e2, 2.23548839060100448583e3, 4.84406305325125486048e3)


def _tanh_f32(x):
    ax = abs(x)
    z = x * x
    p0, p1, p2, p3, p4 = _F32_TANH_P
    small = ((((p0 * z + p1) * z + p2) * z + p3) * z + p4) * z * x + x
    small = x if x == _F32_ZERO else small    # -0 + (+0) would lose the sign of -0
    large = _F32_ONE - _F32_TWO / (_exp(ax + ax) + _F32_ONE)
    large = -large if x < _F32_ZERO else large
    return small if ax < _F32_TANH_SMALL else large


def _tanh_f64(x):
    ax = abs(x)
    s = x * x
    p0, p1, p2 = _F64_TANH_P
    q0, q1, q2 = _F64_TANH_Q
    small = x + x * s * (((p0 * s + p1) * s + p2) / (((s + q0) * s + q1) * s + q2))
    small = x if x == 0.0 else small
    large = 1.0 - 2.0 / (_exp(ax + ax) + 1.0)
    large = -large if x < 0.0 else large
    return small if ax < _TANH_SMALL else large


_tanh = _dispatch({types.float32: _tanh_f32, types.float64: _tanh_f64})


@_helper
def tanh_approx(x):
    """``tanh(x)`` without libm, relative accuracy for all ``x``; float32 or float64 math by type.

    Formula: ``|x| < 0.625``: odd expansion ``x + x^3 P(x^2)`` (Cephes ``tanhf``
    polynomial for float32, Cephes' rational ``P/Q`` for float64), exact for
    tiny and subnormal ``x``; otherwise ``sign(x) (1 - 2 / (exp_approx(2|x|) + 1))``,
    which saturates to exactly ``+-1`` (``exp`` overflows to inf).

    Special values: ``+-0 -> +-0``, ``+-inf -> +-1``, NaN -> NaN.

    Measured maximum error: float32 1.33 ulp (all 2^32 inputs; the largest
    just above 0.625, on the ``exp`` branch), float64 1.32 ulp (sampled).
    """
    return _tanh(x)


# ----------------------------------------------------------------------------
# 16-bit storage: float16 (int16 view) and bfloat16 (uint16 view)
# ----------------------------------------------------------------------------
# Numba computes on int64; the values fit in 32 bits, kept as int32 between
# steps and shifted right by the 32-bit intrinsics, so LLVM narrows every
# operation back to 32-bit (or 16-bit) vector lanes.

@intrinsic
def _f16_bits_to_f32(typingctx, bits):
    """IR of :func:`f16_to_f32`, all in 32-bit integers (Numba's int64 steps were not narrowed)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        f32 = ir.FloatType()

        def const(value):
            return ir.Constant(i32, value)

        h = builder.and_(builder.trunc(args[0], i32), const(0xFFFF))
        magnitude = builder.shl(builder.and_(h, const(0x7FFF)), const(13))
        exponent = builder.and_(magnitude, const(0x0F800000))
        normal = builder.add(magnitude, const(112 << 23))
        inf_nan = builder.add(magnitude, const(224 << 23))
        biased = builder.bitcast(builder.add(magnitude, const(113 << 23)), f32)
        renormalised = builder.fsub(biased, ir.Constant(f32, 2.0 ** -14), flags=("contract",))
        out = builder.select(builder.icmp_unsigned("==", exponent, const(0x0F800000)),
                             inf_nan, normal)
        out = builder.select(builder.icmp_unsigned("==", exponent, const(0)),
                             builder.bitcast(renormalised, i32), out)
        sign = builder.shl(builder.and_(h, const(0x8000)), const(16))
        return builder.bitcast(builder.or_(out, sign), f32)

    return types.float32(types.int64), codegen


@_helper
def f16_to_f32(bits):
    """Widen float16 bits (an ``int16`` view, or any integer) to float32, exactly.

    Formula: move exponent and mantissa up by 13 bits and rebias the exponent
    (``+112``; ``+224`` for inf/NaN so the exponent field is all ones); for zero
    and subnormals (exponent field 0) build ``2^-14 (1 + mant/2^10)`` and subtract
    ``2^-14``, which leaves ``mant * 2^-24`` exactly; then OR in the sign.
    NaN payloads are kept (shifted up), so NaN stays NaN.

    Exact for all 65536 inputs (equal to ``numpy.astype(float32)``).
    """
    return _f16_bits_to_f32(bits)


@_helper
def f32_to_f16(value):
    """Round a float32 to float16 bits (``int16``), round to nearest even.

    Formula (the branch-free scheme of F. Giesen's ``float_to_half_fast3_rtne``):
    on ``a = |x|`` bits, normal range: rebias the exponent (``-112 << 23``) and
    add ``0xfff + (bit 13 of a)`` before dropping 13 bits, which rounds to
    nearest even and lets a carry run into the exponent (65520 and up -> inf);
    results below ``2^-14``: add ``0.5`` in float32, whose ulp ``2^-24`` is the
    float16 subnormal step, so the FPU's own rounding places the mantissa in the
    low bits; ``a >= 2^16`` -> ``0x7c00`` (inf); NaN -> ``0x7e00`` (quiet NaN).
    The sign is ORed back. float64 values are first rounded to float32.

    Bit-for-bit equal to ``numpy.astype(float16)`` for all 2^32 float32 inputs
    (one-off exhaustive run; NaN compared as NaN). The tests check a sweep plus
    every tie, subnormal and overflow case.
    """
    bits = f32_as_i32(_F32(value))
    sign = _lshr32(bits, 16) & 0x8000
    a = np.int32(bits & 0x7FFFFFFF)
    normal = _lshr32(a - (112 << 23) + 0xFFF + (_lshr32(a, 13) & 1), 13)
    subnormal = np.int64(f32_as_i32(i32_as_f32(a) + _F32_HALF)) - 0x3F000000
    out = normal if a >= 0x38800000 else subnormal
    out = 0x7C00 if a >= 0x47800000 else out
    out = 0x7E00 if a > 0x7F800000 else out
    return np.int16(out | sign)


@_helper
def bf16_to_f32(bits):
    """Widen bfloat16 bits (a ``uint16`` view, or any integer) to float32: ``bits << 16``. Exact."""
    return i32_as_f32((np.int64(bits) & 0xFFFF) << 16)


@_helper
def f32_to_bf16(value):
    """Round a float32 to bfloat16 bits (``uint16``), round to nearest even.

    Formula: ``(a + 0x7fff + bit16(a)) >> 16`` on ``a = |x|`` bits (a carry
    into the exponent gives inf on overflow, as RNE should); NaN ->
    ``(a >> 16) | 0x40`` (quiet NaN, top payload kept); sign ORed back.
    float64 values are first rounded to float32.

    Bit-for-bit equal to ``astype(ml_dtypes.bfloat16)`` for all 2^32 float32
    inputs (one-off exhaustive run; NaN compared as NaN).
    """
    bits = f32_as_i32(_F32(value))
    sign = _lshr32(bits, 16) & 0x8000
    a = np.int32(bits & 0x7FFFFFFF)
    out = _lshr32(a + 0x7FFF + (_lshr32(a, 16) & 1), 16)   # a sum above 2**31 wraps; lshr reads it unsigned
    out = (_lshr32(a, 16) | 0x40) if a > 0x7F800000 else out
    return np.uint16(out | sign)


# ----------------------------------------------------------------------------
# Kernel glue: load, store, accumulation type, ordered keys
# ----------------------------------------------------------------------------

def _identity(x):
    return x


def _widen_f16(x):
    return f16_to_f32(x)


def _widen_bf16(x):
    return bf16_to_f32(x)


def _to_f32(x):
    return _F32(x)


_load = _dispatch({types.int16: _widen_f16, types.uint16: _widen_bf16,
                   types.float32: _identity, types.float64: _identity,
                   types.boolean: _to_f32, types.int8: _to_f32, types.uint8: _to_f32})


@_helper
def load(v):
    """One stored element -> its accumulation value.

    ``int16`` (float16 bits) -> float32, ``uint16`` (bfloat16 bits) -> float32,
    float32 -> float32, float64 -> float64, bool/int8/uint8 (labels) -> float32.
    Other 16-bit integer arrays must be cast by the caller: int16/uint16 mean
    float16/bfloat16 storage here.
    """
    return _load(v)


def _narrow_f16(value, like):
    return f32_to_f16(value)


def _narrow_bf16(value, like):
    return f32_to_bf16(value)


def _cast_f32(value, like):
    return _F32(value)


def _cast_f64(value, like):
    return _F64(value)


_STORE_BY_DTYPE = {types.int16: _narrow_f16, types.uint16: _narrow_bf16,
                   types.float32: _cast_f32, types.float64: _cast_f64}


def _store_stub(value, like):
    raise NotImplementedError("jitted code only")


@overload(_store_stub, jit_options=_HELPER_OPTIONS)
def _store_typer(value, like):
    if isinstance(like, types.Array) and isinstance(value, (types.Float, types.Integer)):
        return _STORE_BY_DTYPE.get(like.dtype)
    return None


@_helper
def store(value, like):
    """The element to write into an array of ``like``'s dtype: ``out[i] = store(v, out)``.

    ``int16`` (float16 storage) -> :func:`f32_to_f16`, ``uint16`` (bfloat16
    storage) -> :func:`f32_to_bf16` (both round to nearest even), float32 /
    float64 -> a cast.
    """
    return _store_stub(value, like)


def _zero_f32(like):
    return _F32_ZERO


def _zero_f64(like):
    return 0.0


def _acc_zero_stub(like):
    raise NotImplementedError("jitted code only")


def _element_type(like):
    return like.dtype if isinstance(like, types.Array) else like


@overload(_acc_zero_stub, jit_options=_HELPER_OPTIONS)
def _acc_zero_typer(like):
    return _zero_f64 if _element_type(like) == types.float64 else _zero_f32


@_helper
def acc_type_zero(like):
    """0 in the accumulation type of an array (or scalar): float64 for float64, else float32.

    ``acc = acc_type_zero(logits)`` at the top of a generic kernel; ``acc + v``
    stays in that type.
    """
    return _acc_zero_stub(like)


def _cast_acc_stub(value, like):
    raise NotImplementedError("jitted code only")


def _acc_f32(value, like):
    return _F32(value)


def _acc_f64(value, like):
    return _F64(value)


@overload(_cast_acc_stub, jit_options=_HELPER_OPTIONS)
def _cast_acc_typer(value, like):
    return _acc_f64 if _element_type(like) == types.float64 else _acc_f32


@_helper
def acc_cast(value, like):
    """``value`` cast to the accumulation type of ``like`` (see :func:`acc_type_zero`).

    Numba types ``float32 + 1`` as float64; ``acc_cast(1.0, logits)`` keeps constants in type.
    """
    return _cast_acc_stub(value, like)


def _key_f32(x):
    bits = np.int64(f32_as_i32(x))
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = 0x7FFFFFFF if (bits & 0x7FFFFFFF) > 0x7F800000 else key
    return np.int32(key)


def _key_f64(x):
    bits = f64_as_i64(x)
    key = bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF)
    return 0x7FFFFFFFFFFFFFFF if (bits & 0x7FFFFFFFFFFFFFFF) > 0x7FF0000000000000 else key


_order_key = _dispatch({types.float32: _key_f32, types.float64: _key_f64})


@_helper
def order_key(x):
    """A signed integer key ordered like the float ``x``; every NaN maps to the largest key.

    Formula: bits ``b`` (int32 for float32, int64 for float64);
    ``b ^ ((b >> (w-1)) & INT_MAX)`` flips the magnitude bits of negatives, so
    integer order is float order (``-0`` just below ``+0``); NaN of either sign
    -> ``INT_MAX``, above ``+inf``. An integer max reduction vectorises
    (``vpmaxsd``) where a float max without ``nnan`` does not.
    """
    return _order_key(x)


def _unkey_i32(x):
    k = np.int64(x)
    return i32_as_f32(k ^ ((k >> 31) & 0x7FFFFFFF))


def _unkey_i64(x):
    return i64_as_f64(x ^ ((x >> 63) & 0x7FFFFFFFFFFFFFFF))


_from_order_key = _dispatch({types.int32: _unkey_i32, types.int64: _unkey_i64})


@_helper
def from_order_key(key):
    """Inverse of :func:`order_key`: int32 key -> float32, int64 key -> float64 (NaN key -> NaN)."""
    return _from_order_key(key)


# ----------------------------------------------------------------------------
# Assembly inspection, for tests that assert a kernel vectorised
# ----------------------------------------------------------------------------

_VECTOR_OP = re.compile(
    r"^\s*(v(?!mov|broadcast|zeroupper|extract|insert|perm|shuf|unpck|pbroadcast|pextr|pinsr)"
    r"[a-z0-9]+)\s+([^\n]*)$", re.M)
_LIBM_CALL = re.compile(
    r"(?:call\w*\s+|\$)(exp|expf|exp2|exp2f|expm1|expm1f|log|logf|log1p|log1pf|log2|log2f|"
    r"tanh|tanhf|pow|powf)(?:@PLT)?\b")


def simd_report(dispatcher):
    """Counts of vector arithmetic instructions per register width in a compiled dispatcher.

    Returns a dict ``{"zmm": int, "ymm": int, "xmm": int, "libm": sorted list}``
    over the assembly of every compiled signature; moves, broadcasts and
    shuffles are not counted (struct copies use ``ymm`` moves without any
    vectorised loop); ``libm`` names the libm functions it calls.
    """
    counts = {"zmm": 0, "ymm": 0, "xmm": 0}
    libm = set()
    for asm in dispatcher.inspect_asm().values():
        for _, operands in _VECTOR_OP.findall(asm):
            for width in ("zmm", "ymm", "xmm"):
                if "%" + width in operands:
                    counts[width] += 1
                    break
        libm.update(_LIBM_CALL.findall(asm))
    return {**counts, "libm": sorted(libm)}


def asm_uses_simd(dispatcher, min_bits=256):
    """True when ``dispatcher``'s compiled code does vector arithmetic on registers of ``min_bits`` or more.

    256 accepts AVX2 (``ymm``) or AVX-512 (``zmm``); 512 demands ``zmm``. Compile
    the dispatcher first (call it once).
    """
    report = simd_report(dispatcher)
    if min_bits > 256:
        return report["zmm"] > 0
    return report["zmm"] + report["ymm"] > 0
