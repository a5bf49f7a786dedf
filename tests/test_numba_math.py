"""Accuracy, special values, 16-bit conversions and vectorisation of ``fastxent.backends.numba._math``.

Errors are in units in the last place (ulp) of the result's dtype: float32
results against numpy float64, float64 results against numpy ``longdouble``
(80-bit on x86-64). float32 inputs are a dense sweep of bit patterns (every
``_STRIDE``-th pattern of the domain) plus random samples; float64 inputs are
random samples spread over all exponents. Run with ``-s`` to see the table of
measured maxima (the figures quoted in the module's docstrings).
"""

import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from numba import njit, prange

from fastxent.backends.numba import _math as nm

FASTMATH = nm.KERNEL_FASTMATH
RNG_SEED = 20240611
_STRIDE = 211                       # odd prime: every low mantissa bit pattern occurs
_MEASURED = {}                      # (function, dtype) -> max ulp, printed at the end


def _unary_kernel(fn, fastmath):
    @njit(fastmath=fastmath)
    def kernel(x, out):
        for i in range(x.shape[0]):
            out[i] = fn(x[i])
    return kernel


FUNCTIONS = {
    "exp": (nm.exp_approx, np.exp),
    "log": (nm.log_approx, np.log),
    "log1p": (nm.log1p_approx, np.log1p),
    "tanh": (nm.tanh_approx, np.tanh),
}
_FASTMATH_SETS = {"kernel": FASTMATH, "all": True}
KERNELS = {(name, fm): _unary_kernel(fn, _FASTMATH_SETS[fm])
           for name, (fn, _) in FUNCTIONS.items() for fm in _FASTMATH_SETS}


def _apply(name, x, fastmath="kernel"):
    out = np.empty_like(x)
    KERNELS[name, fastmath](x, out)
    return out


# ----------------------------------------------------------------------------
# ulp measurement
# ----------------------------------------------------------------------------

def _ulp_errors(result, reference, dtype):
    """|result - reference| in ulps of ``dtype`` at the reference, and the mask of those elements.

    ``reference`` is float64 (float32 results) or longdouble (float64 results).
    A reference that rounds to inf in ``dtype`` demands inf; NaN demands NaN.
    """
    info = np.finfo(dtype)
    work = np.float64 if dtype == np.float32 else np.longdouble
    with np.errstate(all="ignore"):
        rounded = reference.astype(dtype)
    special = ~np.isfinite(rounded)
    same = (result[special] == rounded[special]) | (np.isnan(result[special]) & np.isnan(rounded[special]))
    if not same.all():
        bad = np.flatnonzero(special)[~same][:5]
        pytest.fail(f"special results differ at {bad}: got {result[bad]}, expected {rounded[bad]}")
    ref = reference[~special].astype(work)
    res = result[~special].astype(work)
    _, exponent = np.frexp(ref)
    exponent = np.where(ref == 0, info.minexp, np.maximum(exponent - 1, info.minexp))
    ulp = np.ldexp(work(1), (exponent - info.nmant).astype(np.int32))
    return np.abs(res - ref) / ulp, ~special


def _check(name, x, dtype, bound, reference=None):
    x = np.ascontiguousarray(x, dtype=dtype)
    result = _apply(name, x)
    ref_fn = FUNCTIONS[name][1]
    with np.errstate(all="ignore"):
        if reference is None:
            reference = ref_fn(x.astype(np.float64 if dtype == np.float32 else np.longdouble))
    errors, measured = _ulp_errors(result, reference, dtype)
    worst = int(np.argmax(errors))
    key = (name, np.dtype(dtype).name)
    _MEASURED[key] = max(_MEASURED.get(key, 0.0), float(errors[worst]))
    assert errors[worst] <= bound, (
        f"{name}({np.dtype(dtype).name}): {errors[worst]:.3f} ulp at x = {x[measured][worst]!r}")
    return float(errors[worst])


def _f32_sweep(lo_bits, hi_bits, rng, count=200_000, lo=None, hi=None):
    """Every ``_STRIDE``-th float32 bit pattern in ``[lo_bits, hi_bits)`` plus random values."""
    bits = np.arange(lo_bits, hi_bits, _STRIDE, dtype=np.int64).astype(np.uint32)
    values = [bits.view(np.float32)]
    if lo is not None:
        values.append(rng.uniform(lo, hi, count).astype(np.float32))
    return np.concatenate(values)


def _signed_sweep(limit_neg, limit_pos, rng):
    """float32 values in ``[-limit_neg, limit_pos]``: positive and negative bit patterns."""
    pos = np.float32(limit_pos).view(np.uint32)
    neg = np.float32(limit_neg).view(np.uint32)
    return np.concatenate([_f32_sweep(0, int(pos) + 1, rng, lo=-limit_neg, hi=limit_pos),
                           -_f32_sweep(0, int(neg) + 1, rng)])


def _f64_random_bits(lo_bits, hi_bits, count, rng):
    return rng.integers(lo_bits, hi_bits, count, dtype=np.int64).view(np.float64)


def _log_uniform(lo_exp, hi_exp, count, rng, negative=False):
    values = np.exp2(rng.uniform(lo_exp, hi_exp, count))
    return -values if negative else values


# ----------------------------------------------------------------------------
# Accuracy over the whole range
# ----------------------------------------------------------------------------

F64_POSITIVE_FINITE = (1, 0x7FF0000000000000)


def test_exp_float32_accuracy():
    rng = np.random.default_rng(RNG_SEED)
    x = _signed_sweep(104.0, 89.0, rng)
    _check("exp", x, np.float32, bound=1.1)


def test_exp_float64_accuracy():
    rng = np.random.default_rng(RNG_SEED)
    x = np.concatenate([rng.uniform(-746.0, 710.0, 400_000),
                        _log_uniform(-60, 9.5, 150_000, rng),
                        _log_uniform(-60, 9.5, 150_000, rng, negative=True),
                        rng.uniform(-745.2, -708.0, 50_000)])    # subnormal results
    _check("exp", x, np.float64, bound=1.1)


def test_log_float32_accuracy():
    rng = np.random.default_rng(RNG_SEED)
    x = np.concatenate([_f32_sweep(1, 0x7F800000, rng),
                        rng.uniform(0.5, 2.0, 300_000).astype(np.float32)])
    _check("log", x, np.float32, bound=1.0)


def test_log_float64_accuracy():
    rng = np.random.default_rng(RNG_SEED)
    x = np.concatenate([_f64_random_bits(*F64_POSITIVE_FINITE, 400_000, rng),
                        rng.uniform(0.5, 2.0, 200_000),
                        1.0 + _log_uniform(-52, -1, 100_000, rng),
                        1.0 - _log_uniform(-53, -2, 100_000, rng)])
    _check("log", x, np.float64, bound=1.0)


def test_log1p_float32_accuracy():
    rng = np.random.default_rng(RNG_SEED)
    minus_one = int(np.float32(-1.0).view(np.uint32))
    x = np.concatenate([_f32_sweep(0, 0x7F800000, rng, lo=-1.0, hi=4.0),
                        _f32_sweep(0x80000000, minus_one, rng)])
    _check("log1p", x, np.float32, bound=1.5)
    # The sigmoid loss' range: log1p(exp(-|x|)), arguments in [0, 1].
    unit = _f32_sweep(0, int(np.float32(1.0).view(np.uint32)) + 1, rng, lo=0.0, hi=1.0)
    _check("log1p", unit, np.float32, bound=1.5)


def test_log1p_float64_accuracy():
    rng = np.random.default_rng(RNG_SEED)
    x = np.concatenate([_f64_random_bits(*F64_POSITIVE_FINITE, 250_000, rng),
                        -_f64_random_bits(1, 0x3FF0000000000000, 250_000, rng),
                        rng.uniform(-1.0, 4.0, 200_000),
                        _log_uniform(-60, 0, 100_000, rng),
                        _log_uniform(-60, 0, 100_000, rng, negative=True)])
    _check("log1p", x, np.float64, bound=1.5)


def test_tanh_float32_accuracy():
    rng = np.random.default_rng(RNG_SEED)
    x = _signed_sweep(12.0, 12.0, rng)
    _check("tanh", x, np.float32, bound=1.5)


def test_tanh_float64_accuracy():
    rng = np.random.default_rng(RNG_SEED)
    x = np.concatenate([_f64_random_bits(*F64_POSITIVE_FINITE, 150_000, rng),
                        rng.uniform(-20.0, 20.0, 300_000),
                        rng.uniform(-0.7, 0.7, 200_000),
                        _log_uniform(-60, 0, 100_000, rng, negative=True)])
    _check("tanh", x, np.float64, bound=1.5)


# ----------------------------------------------------------------------------
# Special values, under every fast-math setting a kernel might use
# ----------------------------------------------------------------------------

def _specials(dtype):
    info = np.finfo(dtype)
    values = [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1.0, -1.0, 0.5, 2.0,
              info.tiny, info.smallest_subnormal, -info.smallest_subnormal,
              info.smallest_subnormal * 3, info.tiny / 2, info.max, -info.max, info.eps,
              0.625, -0.625, 1e-30, -1e-30]
    if dtype == np.float32:
        values += [88.72283, 88.72284, 88.7228394, 89.0, 89.5, -87.3, -103.9, -103.97, -103.98,
                   -104.0, -104.5, 1e30, -1e30]
    else:
        values += [709.78, 709.7827128933840, 709.79, 710.0, 710.5, -708.4, -745.1, -745.13,
                   -745.14, -746.0, -746.5, 1e300, -1e300]
    return np.array(values, dtype=dtype)


def _assert_same(result, expected, what):
    same = (result == expected) | (np.isnan(result) & np.isnan(expected))
    zero = expected == 0
    same &= ~zero | (np.signbit(result) == np.signbit(expected))
    assert same.all(), f"{what}: got {result[~same]}, expected {expected[~same]}"


@pytest.mark.parametrize("fastmath", ["kernel", "all"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_special_values(name, dtype, fastmath):
    """Exact results where IEEE prescribes them, whatever the caller's fast-math flags."""
    x = _specials(dtype)
    result = _apply(name, x, fastmath)
    with np.errstate(all="ignore"):
        exact = FUNCTIONS[name][1](x.astype(np.float64)).astype(dtype)
    # Exact where the answer is not rounded: infinities, NaN, zeros, +-1 saturation.
    exact_mask = ~np.isfinite(exact) | (exact == 0) | (np.abs(exact) == 1) | ~np.isfinite(x)
    _assert_same(result[exact_mask], exact[exact_mask], f"{name} {np.dtype(dtype).name} {fastmath}")
    # Elsewhere within the measured bound.
    close = np.isclose(result, exact, rtol=4 * np.finfo(dtype).eps, atol=0) | exact_mask
    assert close.all(), f"{name}: x = {x[~close]}, got {result[~close]}, expected {exact[~close]}"


@njit(fastmath=FASTMATH)
def _shifted_exp(x, m, out):
    for i in range(x.shape[0]):
        out[i] = nm.exp_approx(x[i] - m)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_masking_through_kernel_arithmetic(dtype):
    """``exp(-inf - m) == 0`` and NaN propagates when the kernel itself does the subtraction."""
    x = np.array([-np.inf, np.nan, 0.0, 3.0, np.inf], dtype=dtype)
    out = np.empty_like(x)
    _shifted_exp(x, dtype(3.0), out)
    _assert_same(out[[0, 1, 3, 4]], np.array([0.0, np.nan, 1.0, np.inf], dtype=dtype), "exp(x - m)")


def test_subnormal_inputs_float32():
    """Subnormal inputs to log and tanh use every bit (no flush to zero)."""
    x = np.arange(1, 1 << 23, 4099, dtype=np.uint32).view(np.float32)
    _check("log", x, np.float32, bound=1.0)
    _check("tanh", np.concatenate([x, -x]), np.float32, bound=1.0)
    _check("log1p", x, np.float32, bound=1.0)


# ----------------------------------------------------------------------------
# 16-bit storage
# ----------------------------------------------------------------------------

@njit
def _decode_f16(bits, out):
    for i in range(bits.shape[0]):
        out[i] = nm.f16_to_f32(bits[i])


@njit
def _decode_bf16(bits, out):
    for i in range(bits.shape[0]):
        out[i] = nm.bf16_to_f32(bits[i])


@njit(fastmath=FASTMATH)
def _encode(x, out):
    for i in range(x.shape[0]):
        out[i] = nm.store(x[i], out)


def _assert_float_bits_equal(result, expected, what):
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(result), nan), f"{what}: NaN positions differ"
    r = result[~nan].view(np.uint32) if result.dtype == np.float32 else result[~nan]
    e = expected[~nan].view(np.uint32) if expected.dtype == np.float32 else expected[~nan]
    bad = np.flatnonzero(r != e)
    assert bad.size == 0, f"{what}: {bad.size} differ, first at {bad[:5]}: {r[bad[:5]]} vs {e[bad[:5]]}"


def test_f16_decode_all_patterns():
    bits = np.arange(-32768, 32768, dtype=np.int64).astype(np.int16)
    out = np.empty(bits.size, np.float32)
    _decode_f16(bits, out)
    _assert_float_bits_equal(out, bits.view(np.float16).astype(np.float32), "f16_to_f32")


def test_bf16_decode_all_patterns():
    bits = np.arange(65536, dtype=np.int64).astype(np.uint16)
    out = np.empty(bits.size, np.float32)
    _decode_bf16(bits, out)
    _assert_float_bits_equal(out, bits.view(ml_dtypes.bfloat16).astype(np.float32), "bf16_to_f32")


def _encode_inputs(storage_bits, kind):
    """float32 values: a bit-pattern sweep, every 16-bit value, the ties between them, +-1 f32 ulp."""
    sweep = np.arange(0, 1 << 32, 4099, dtype=np.int64).astype(np.uint32)
    grid = storage_bits.astype(np.int64)
    if kind == "bfloat16":                           # values are the top half of a float32
        exact = grid << 16
        ties = exact | 0x8000
    else:                                            # float16: the f32 patterns of each value
        values = storage_bits.astype(np.uint16).view(np.float16).astype(np.float32)
        values = values[np.isfinite(values)]
        with np.errstate(over="ignore"):
            nxt = np.nextafter(values.astype(np.float16), np.float16(np.inf)).astype(np.float32)
        exact = values.view(np.uint32).astype(np.int64)
        ties = ((values.astype(np.float64) + nxt.astype(np.float64)) / 2).astype(
            np.float32).view(np.uint32).astype(np.int64)
    near = np.concatenate([exact, ties, ties - 1, ties + 1]) & 0xFFFFFFFF
    out = np.concatenate([sweep, near.astype(np.uint32)]).view(np.float32)
    specials = np.array([np.inf, -np.inf, np.nan, -np.nan, 65504, 65519.99, 65520, 65536, 1e30,
                         3.4e38, -3.4e38, 2.0 ** -24, 2.0 ** -25, 2.0 ** -25 * 1.0000001,
                         2.0 ** -26, 1e-45, 0.0, -0.0], dtype=np.float32)
    return np.concatenate([out, specials])


def test_f32_to_f16_matches_numpy():
    bits = np.arange(-32768, 32768, dtype=np.int64).astype(np.int16)
    x = _encode_inputs(bits, "float16")
    out = np.empty(x.size, np.int16)
    _encode(x, out)
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16)
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(out.view(np.float16)), nan)
    bad = np.flatnonzero(out[~nan] != expected[~nan].view(np.int16))
    assert bad.size == 0, f"{bad.size} differ: x = {x[~nan][bad[:5]]!r}"


def test_f32_to_bf16_matches_ml_dtypes():
    bits = np.arange(65536, dtype=np.int64).astype(np.uint16)
    x = _encode_inputs(bits, "bfloat16")
    out = np.empty(x.size, np.uint16)
    _encode(x, out)
    with np.errstate(invalid="ignore"):
        expected = x.astype(ml_dtypes.bfloat16)
    nan = np.isnan(expected.astype(np.float32))
    assert np.array_equal(np.isnan(out.view(ml_dtypes.bfloat16).astype(np.float32)), nan)
    bad = np.flatnonzero(out[~nan] != expected[~nan].view(np.uint16))
    assert bad.size == 0, f"{bad.size} differ: x = {x[~nan][bad[:5]]!r}"


@njit(fastmath=FASTMATH)
def _load_store_row(x, out):
    acc = nm.acc_type_zero(x)
    for i in range(x.shape[0]):
        acc += nm.load(x[i])
        out[i] = nm.store(nm.load(x[i]) * nm.acc_cast(2.0, x), out)
    return acc


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_load_store_round_trip(dtype):
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    view = {"float16": np.int16, "bfloat16": np.uint16}.get(dtype)
    x = np.array([0.5, -1.25, 3.0, 0.0, np.inf, np.nan], dtype=np_dtype)
    out = np.empty_like(x)
    kx = x.view(view) if view else x
    kout = out.view(view) if view else out
    total = _load_store_row(kx, kout)
    assert isinstance(total, float)
    _assert_same(out.astype(np.float64), x.astype(np.float64) * 2, f"store {dtype}")


@njit
def _load_labels(labels):
    total = np.float32(0.0)
    for i in range(labels.shape[0]):
        total += nm.load(labels[i])
    return total


@pytest.mark.parametrize("dtype", [np.bool_, np.int8, np.uint8])
def test_load_labels(dtype):
    labels = np.array([1, 0, 1, 1], dtype=dtype)
    assert _load_labels(labels) == 3.0


@njit
def _keys(x, out):
    for i in range(x.shape[0]):
        out[i] = nm.from_order_key(nm.order_key(x[i]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_order_key(dtype):
    x = _specials(dtype)
    x = x[~np.isnan(x)]
    out = np.empty_like(x)
    _keys(x, out)
    _assert_same(out, x, "from_order_key(order_key(x))")
    keys = [nm.order_key(v) for v in np.sort(x)]
    assert keys == sorted(keys)
    top = nm.order_key(dtype(np.inf))
    assert nm.order_key(dtype(np.nan)) > top and nm.order_key(-dtype(np.nan)) > top


# ----------------------------------------------------------------------------
# Vectorisation: the point of the module
# ----------------------------------------------------------------------------

@njit(fastmath=FASTMATH)
def _sum_exp(x, m):
    total = nm.acc_type_zero(x)
    for i in range(x.shape[0]):
        total += nm.exp_approx(x[i] - m)
    return total


@njit(fastmath=FASTMATH)
def _softmax_16bit(x, m, out):
    for i in range(x.shape[0]):
        out[i] = nm.store(nm.exp_approx(nm.load(x[i]) - m), out)


@njit(fastmath=FASTMATH)
def _sigmoid_loss(x, z, out):
    for i in range(x.shape[0]):
        v = x[i]
        out[i] = max(v, 0) - v * z[i] + nm.log1p_approx(nm.exp_approx(-abs(v)))


@njit(fastmath=FASTMATH)
def _softcap(x, cap, out):
    for i in range(x.shape[0]):
        out[i] = cap * nm.tanh_approx(x[i] / cap)


@njit(fastmath=FASTMATH)
def _log_loop(x, out):
    for i in range(x.shape[0]):
        out[i] = nm.log_approx(x[i])


@njit(parallel=True, fastmath=FASTMATH)
def _parallel_sum_exp(x, m):
    total = nm.acc_type_zero(x)
    for i in prange(x.shape[0]):
        total += nm.exp_approx(x[i] - m)
    return total


def _assert_vectorised(dispatcher, what):
    report = nm.simd_report(dispatcher)
    print(f"\n{what}: {report}")
    assert nm.asm_uses_simd(dispatcher), f"{what} did not vectorise: {report}"
    assert not report["libm"], f"{what} calls libm: {report['libm']}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_loops_vectorise(dtype):
    x = np.linspace(-50, 5, 1003).astype(dtype)
    total = _sum_exp(x, dtype(1.0))
    np.testing.assert_allclose(total, np.exp(x.astype(np.float64) - 1).sum(), rtol=1e-6)
    _assert_vectorised(_sum_exp, f"sum exp {np.dtype(dtype).name}")
    np.testing.assert_allclose(_parallel_sum_exp(x, dtype(1.0)), total, rtol=1e-5)
    _assert_vectorised(_parallel_sum_exp, f"parallel sum exp {np.dtype(dtype).name}")


@pytest.mark.parametrize("view", [np.int16, np.uint16])
def test_16bit_loops_vectorise(view):
    dtype = np.float16 if view is np.int16 else ml_dtypes.bfloat16
    x = np.linspace(-8, 2, 1001).astype(dtype)
    out = np.empty_like(x)
    _softmax_16bit(x.view(view), np.float32(1.0), out.view(view))
    expected = np.exp(x.astype(np.float64) - 1).astype(dtype).astype(np.float64)
    np.testing.assert_allclose(out.astype(np.float64), expected, rtol=1e-2)
    _assert_vectorised(_softmax_16bit, f"16-bit load/exp/store ({np.dtype(view).name} view)")


def test_other_loops_vectorise():
    x = np.linspace(-30, 30, 1001).astype(np.float32)
    out = np.empty_like(x)
    _sigmoid_loss(x, np.ones_like(x), out)
    expected = np.maximum(x, 0) - x + np.log1p(np.exp(-np.abs(x.astype(np.float64))))
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=1e-30)
    _assert_vectorised(_sigmoid_loss, "sigmoid loss (log1p(exp))")
    _softcap(x, np.float32(10.0), out)
    np.testing.assert_allclose(out, 10 * np.tanh(x.astype(np.float64) / 10), rtol=1e-6)
    _assert_vectorised(_softcap, "softcap tanh")
    _log_loop(np.abs(x) + 1, out)
    _assert_vectorised(_log_loop, "log")


# ----------------------------------------------------------------------------
# On-disk cache of a kernel using the helpers
# ----------------------------------------------------------------------------

_CACHED_KERNEL = textwrap.dedent("""
    import numpy as np
    from numba import njit
    from fastxent.backends.numba import _math as nm

    @njit(cache=True, fastmath=nm.KERNEL_FASTMATH)
    def kernel(x, out):
        for i in range(x.shape[0]):
            out[i] = nm.store(nm.exp_approx(nm.load(x[i])), out)

    x = np.linspace(-3, 3, 64).astype(np.float16)
    out = np.empty_like(x)
    kernel(x.view(np.int16), out.view(np.int16))
    assert np.allclose(out, np.exp(x.astype(np.float64)), rtol=1e-3)
    print(kernel.stats.cache_hits.most_common(1))
""")


def test_kernel_using_helpers_is_cached(tmp_path):
    """A ``cache=True`` kernel calling the helpers loads from disk in a second process."""
    script = tmp_path / "cached_kernel.py"
    script.write_text(_CACHED_KERNEL)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runs = [subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                           text=True, timeout=120) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert runs[0].stdout.strip() == "[]", runs[0].stdout
    assert ", 1)]" in runs[1].stdout, runs[1].stdout


def test_zz_report_measured_errors():
    """Prints the table of measured maxima (``pytest -s``); the bounds are asserted above."""
    for (name, dtype), worst in sorted(_MEASURED.items()):
        print(f"{name:6s} {dtype:8s} max error {worst:.3f} ulp")
