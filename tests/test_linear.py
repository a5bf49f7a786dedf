"""fastxent.linear_cross_entropy and linear_score against the float64 reference composition.

The expected values are ``fastxent.reference``'s ``cross_entropy(hidden @ weight.T + bias)``
in float64 (its gradients checked against finite differences in test_reference.py):
the loss and all three gradients, every option, the four dtypes, blocks that split the
rows unevenly, one-row blocks, N = 0, all rows ignored, leading axes, ``grad_output``;
the BLAS and the scratch routes of the weight gradient; the memory a call takes,
measured in a subprocess; the errors. Shapes are small (N <= 40, H <= 24, V <= 203):
the block loop, not the BLAS, is under test.
"""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastxent as fx
from fastxent import _gemm, linear
from fastxent import reference as ref
from fastxent.backends import numba as numba_backend
from tests.support import (
    DTYPE_IDS,
    FLOAT_DTYPES,
    SPARSE_OPTIONS,
    assert_close,
    assert_same_dtype,
    make_class_ids,
    sparse_options,
    tolerance,
)

N, H, V = 37, 24, 203


def make_inputs(dtype, n=N, features=H, classes=V, seed=0, bias=True, batch=None):
    """hidden, weight, bias (or None) in ``dtype``, scaled so the logits spread over a few units."""
    rng = np.random.default_rng(seed)
    shape = (n, features) if batch is None else tuple(batch) + (features,)
    hidden = rng.standard_normal(shape).astype(dtype)
    weight = (rng.standard_normal((classes, features)) * 2 / np.sqrt(features)).astype(dtype)
    return hidden, weight, (rng.standard_normal(classes).astype(dtype) if bias else None)


def check_against_reference(got, expected, dtype, what):
    """The loss with the "value" tolerance; each gradient with the "stored" relative
    tolerance, and an absolute one of that times its largest element (a gradient summed
    over rows carries its rounding relative to the terms it adds, not to the sum)."""
    loss, grad = got
    expected_loss, expected_grad = expected
    assert_same_dtype(loss, expected_loss, f"{what} loss")
    assert_close(loss, expected_loss, dtype, "value", f"{what} loss")
    assert isinstance(grad, fx.LinearGrad), f"{what}: {type(grad).__name__} is not LinearGrad"
    for name in ("hidden", "weight", "bias"):
        actual, wanted = getattr(grad, name), getattr(expected_grad, name)
        if wanted is None:
            assert actual is None, f"{what}: grad.{name} should be None without a bias"
            continue
        assert_same_dtype(actual, wanted, f"{what} grad.{name}")
        rtol = tolerance(dtype, "stored")[0]
        peak = float(np.abs(np.asarray(wanted, dtype=np.float64)).max(initial=0.0))
        assert_close(actual, wanted, dtype, "stored", f"{what} grad.{name}", tol=(rtol, rtol * peak + 1e-12))


def both(hidden, weight, labels, bias=None, **options):
    """fastxent's result and the reference's, with the same arguments."""
    got = fx.linear_cross_entropy(hidden, weight, labels, bias, return_grad=True, **options)
    options.pop("memory", None)
    expected = ref.linear_cross_entropy(hidden, weight, labels, bias, return_grad=True, **options)
    return got, expected


# ----------------------------------------------------------------------------
# Values and gradients
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("option", list(SPARSE_OPTIONS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_every_option_and_dtype(dtype, option):
    hidden, weight, bias = make_inputs(dtype)
    options = sparse_options(option, V)
    labels = make_class_ids(N, V, ignore_index=options.get("ignore_index"), ignore_fraction=0.2)
    # 4 KiB: blocks of a few rows (V = 203 floats a row), the last one shorter.
    got, expected = both(hidden, weight, labels, bias, reduction="mean", memory=4096, **options)
    check_against_reference(got, expected, dtype, f"{option} {np.dtype(dtype).name}")


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_reductions_grad_output_and_bias(reduction, with_bias):
    hidden, weight, bias = make_inputs(np.float32, bias=with_bias)
    labels = make_class_ids(N, V)
    rng = np.random.default_rng(3)
    grad_output = rng.standard_normal(N) if reduction == "none" else 0.7
    got, expected = both(hidden, weight, labels, bias, reduction=reduction, grad_output=grad_output,
                         memory=5000)
    check_against_reference(got, expected, np.float32, f"{reduction} bias={with_bias}")


def test_forward_only_matches_the_fused_loss():
    hidden, weight, bias = make_inputs(np.float32)
    labels = make_class_ids(N, V)
    loss = fx.linear_cross_entropy(hidden, weight, labels, bias, memory=3000)
    fused, _ = fx.linear_cross_entropy(hidden, weight, labels, bias, memory=3000, return_grad=True)
    assert_close(loss, ref.linear_cross_entropy(hidden, weight, labels, bias), np.float32, "value", "forward")
    assert_close(loss, fused, np.float32, "value", "forward vs fused")


def test_blocks_split_the_rows_unevenly_and_down_to_one_row(monkeypatch):
    """The fused kernel sees blocks of 3, 3, 3, 1 rows for a budget of three rows; one row
    for a budget smaller than a row; results equal in every case."""
    hidden, weight, _ = make_inputs(np.float32, n=10)
    labels = make_class_ids(10, V)
    seen = []
    kernel = numba_backend.sparse_softmax_cross_entropy

    def spy(logits, *args, **kwargs):
        seen.append(logits.shape[0])
        return kernel(logits, *args, **kwargs)

    monkeypatch.setattr(numba_backend, "sparse_softmax_cross_entropy", spy)
    expected = ref.linear_cross_entropy(hidden, weight, labels, reduction="sum", return_grad=True)
    three_rows = 3 * V * 4 + _gemm.scratch_rows(V, np) * H * 4
    for memory, blocks in ((three_rows, [3, 3, 3, 1]), (1, [1] * 10), ("1G", [10])):
        seen.clear()
        got = fx.linear_cross_entropy(hidden, weight, labels, reduction="sum", return_grad=True, memory=memory)
        assert seen == blocks, f"memory={memory}: blocks {seen}, expected {blocks}"
        check_against_reference(got, expected, np.float32, f"memory={memory}")


def test_leading_axes_and_non_contiguous_hidden():
    hidden, weight, bias = make_inputs(np.float64, batch=(3, 5))
    labels = make_class_ids((3, 5), V)
    got, expected = both(hidden, weight, labels, bias, memory=2000)
    assert got[0].shape == (3, 5) and got[1].hidden.shape == (3, 5, H)
    check_against_reference(got, expected, np.float64, "batch (3, 5)")
    strided = np.asfortranarray(hidden.reshape(15, H))[::2]
    got, expected = both(strided, weight, labels.reshape(15)[::2], bias, memory=2000)
    check_against_reference(got, expected, np.float64, "strided hidden")


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_empty_batch_and_all_rows_ignored(reduction):
    hidden, weight, bias = make_inputs(np.float32)
    for what, h, labels in (("N = 0", hidden[:0], np.zeros(0, np.int64)),
                            ("all ignored", hidden, np.full(N, -100))):
        loss, grad = fx.linear_cross_entropy(h, weight, labels, bias, ignore_index=-100, reduction=reduction,
                                             return_grad=True)
        assert loss.shape == (() if reduction != "none" else labels.shape), what
        assert not np.any(loss) and np.isfinite(loss).all(), f"{what}: loss {loss}"
        for name, array, like in (("hidden", grad.hidden, h), ("weight", grad.weight, weight),
                                  ("bias", grad.bias, bias)):
            assert array.shape == like.shape and array.dtype == like.dtype, f"{what} grad.{name}"
            assert not np.any(array), f"{what}: grad.{name} is not zero"


def test_inputs_are_not_modified():
    hidden, weight, bias = make_inputs(np.float32)
    labels = make_class_ids(N, V)
    copies = [a.copy() for a in (hidden, weight, bias, labels)]
    fx.linear_cross_entropy(hidden, weight, labels, bias, label_smoothing=0.1, return_grad=True, memory=3000)
    fx.linear_score(hidden, weight, labels, bias, memory=3000)
    for array, copy in zip((hidden, weight, bias, labels), copies):
        np.testing.assert_array_equal(array, copy)


def test_backend_numpy_is_the_reference():
    hidden, weight, bias = make_inputs(np.float32)
    labels = make_class_ids(N, V)
    got = fx.linear_cross_entropy(hidden, weight, labels, bias, z_loss=0.01, return_grad=True, backend="numpy")
    check_against_reference(got, fx.linear_cross_entropy(hidden, weight, labels, bias, z_loss=0.01,
                                                         return_grad=True), np.float32, "numpy vs numba")


@pytest.mark.parametrize("option", list(SPARSE_OPTIONS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_numba_inplace_gradient_over_the_logits(dtype, option):
    """The backend's inplace mode writes the gradient over the scores: the same loss and
    gradient as a separate buffer."""
    options = sparse_options(option, V)
    logits = (np.random.default_rng(6).standard_normal((N, V)) * 4).astype(dtype)
    labels = make_class_ids(N, V, ignore_index=options.get("ignore_index"), ignore_fraction=0.2)
    arguments = (options.get("ignore_index"), options.get("class_weight"), options.get("label_smoothing", 0.0),
                 options.get("z_loss", 0.0), options.get("softcap"), 0.5)
    loss, grad = numba_backend.sparse_softmax_cross_entropy(logits, labels, *arguments)
    buffer = logits.copy()
    loss_inplace, grad_inplace = numba_backend.sparse_softmax_cross_entropy(buffer, labels, *arguments,
                                                                            inplace=True)
    assert grad_inplace is buffer
    # Within the dtype's tolerance, not bit for bit: the two calls are separately compiled
    # kernels, and LLVM may contract or vectorise a sum differently (1 ulp of a float32 loss seen).
    assert_close(loss_inplace, loss, dtype, "value", "inplace loss")
    assert_close(grad_inplace, grad, dtype, "stored", "inplace grad")


# ----------------------------------------------------------------------------
# The weight gradient's two routes
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_product_sum_routes_agree_with_numpy(dtype, monkeypatch):
    """Each route (numpy's own BLAS through ctypes, SciPy's, the scratch) adds the same
    products, contiguous rows or strided ones."""
    rng = np.random.default_rng(4)
    start = rng.standard_normal((V, H)).astype(dtype)
    blocks = [(rng.standard_normal((n, V)).astype(dtype), rng.standard_normal((n, 2 * H)).astype(dtype)[:, ::2])
              for n in (5, 1, 7)]
    expected = start.astype(np.float64) + sum(a.astype(np.float64).T @ b for a, b in blocks)
    monkeypatch.setattr(_gemm._config, "LINEAR_ACCUMULATE_ROWS", 64)  # four slices of 203 rows
    for preferred in _gemm.ROUTES:
        out = start.copy()
        sums = _gemm.ProductSum(out, np, preferred)
        assert sums.route == _gemm.route(np, preferred)
        for a, b in blocks:
            sums.add(a, b)
            sums.add(a, np.ascontiguousarray(b))
        twice = 2 * expected - start
        assert_close(out, twice, dtype, "value", f"route {sums.route}", tol=(1e-5, 1e-4))


def test_the_numpy_route_is_there_with_numpy_wheels():
    """numpy's wheels bundle scipy-openblas64; where they do, the ctypes route is taken."""
    if not any(name.startswith("libscipy_openblas64_") for name in _bundled_libraries()):
        pytest.skip("this numpy bundles no scipy-openblas64 (a conda or distribution build)")
    assert _gemm.route(np) == "numpy"


def _bundled_libraries():
    import os

    folders = [os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs"),
               os.path.join(os.path.dirname(np.__file__), ".dylibs")]
    return [name for folder in folders if os.path.isdir(folder) for name in os.listdir(folder)]


@pytest.mark.parametrize("preferred", ["scipy", "scratch"])
def test_the_other_routes_give_the_same_gradients(preferred, monkeypatch):
    hidden, weight, bias = make_inputs(np.float32)
    labels = make_class_ids(N, V)
    monkeypatch.setattr(_gemm, "route", lambda xp, wanted=None, _route=_gemm.route: _route(xp, preferred))
    monkeypatch.setattr(_gemm._config, "LINEAR_ACCUMULATE_ROWS", 50)
    got, expected = both(hidden, weight, labels, bias, reduction="mean", memory=20000)
    check_against_reference(got, expected, np.float32, f"{preferred} route")


# ----------------------------------------------------------------------------
# linear_score
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_linear_score_matches_the_reference(dtype):
    hidden, weight, bias = make_inputs(dtype)
    labels = make_class_ids(N, V, ignore_index=-1, ignore_fraction=0.2)
    got = fx.linear_score(hidden, weight, labels, bias, ignore_index=-1, memory=3000)
    expected = ref.linear_score(hidden, weight, labels, bias, ignore_index=-1)
    assert type(got) is fx.Score
    for field in ("loss", "lse", "target_logprob", "entropy"):
        assert_same_dtype(getattr(got, field), getattr(expected, field), field)
        assert_close(getattr(got, field), getattr(expected, field), dtype, "value", field)
    np.testing.assert_array_equal(got.argmax, expected.argmax)
    np.testing.assert_array_equal(got.correct, expected.correct)


# ----------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------

_MEMORY_PROBE = textwrap.dedent("""
    import sys, tracemalloc
    import numpy as np
    import fastxent as fx
    n, h, v, budget = (int(a) for a in sys.argv[1:5])
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((n, h)).astype(np.float32)
    weight = rng.standard_normal((v, h)).astype(np.float32) * 0.1
    bias = rng.standard_normal(v).astype(np.float32)
    labels = rng.integers(0, v, n)
    fx.linear_cross_entropy(hidden[:2], weight, labels[:2], bias, return_grad=True)  # compile first
    tracemalloc.start()
    loss, grad = fx.linear_cross_entropy(hidden, weight, labels, bias, reduction="mean", return_grad=True,
                                         memory=budget)
    peak = tracemalloc.get_traced_memory()[1]
    outputs = loss.nbytes + grad.hidden.nbytes + grad.weight.nbytes + grad.bias.nbytes
    print(peak - outputs)
""")


def test_peak_memory_is_the_budget_plus_order_n():
    """numpy allocations (tracemalloc) during a call, beyond its outputs, stay within the
    budget plus per-row values and a few V-sized option arrays of the kernel call; the
    (N, V) logits would be 16 times the budget."""
    n, h, v, budget = 512, 16, 2000, 512 * 2000 * 4 // 16
    result = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(n), str(h), str(v), str(budget)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    extra = int(result.stdout.split()[-1])
    allowance = budget + 64 * n + 4 * v * 8 + 16384
    assert extra <= allowance, f"{extra:,} bytes beyond the outputs; budget {budget:,}, allowance {allowance:,}"
    assert extra >= budget // 2, f"{extra:,} bytes: the blocks did not use the budget ({budget:,})"


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------

def test_errors_name_the_argument_and_the_value():
    hidden, weight, bias = make_inputs(np.float32)
    labels = make_class_ids(N, V)
    call = fx.linear_cross_entropy
    with pytest.raises(TypeError, match="weight has dtype float64 but hidden has dtype float32"):
        call(hidden, weight.astype(np.float64), labels)
    with pytest.raises(TypeError, match="bias has dtype float16"):
        call(hidden, weight, labels, bias.astype(np.float16))
    with pytest.raises(ValueError, match=r"weight has shape \(203, 23\), expected \(V, 24\)"):
        call(hidden, weight[:, :-1], labels)
    with pytest.raises(ValueError, match=r"bias has shape \(202,\), expected \(203,\)"):
        call(hidden, weight, labels, bias[:-1])
    with pytest.raises(ValueError, match=r"labels has shape \(36,\), expected \(37,\)"):
        call(hidden, weight, labels[:-1])
    bad = labels.copy()
    bad[4] = V
    with pytest.raises(ValueError, match=r"labels\[4\] = 203 is outside \[0, 203\)"):
        call(hidden, weight, bad)
    with pytest.raises(ValueError, match="single class"):
        call(hidden, weight[:1], np.zeros(N, np.int64))
    with pytest.raises(ValueError, match="feature axis"):
        call(hidden[0, 0], weight, labels[0])
    with pytest.raises(TypeError, match="hidden must be float16, bfloat16, float32 or float64"):
        call(hidden.astype(np.int32), weight, labels)
    with pytest.raises(ValueError, match=r"memory='lots' is not a size"):
        call(hidden, weight, labels, memory="lots")
    with pytest.raises(ValueError, match=r"memory=0 must be a positive size"):
        fx.linear_score(hidden, weight, labels, memory=0)
    with pytest.raises(ValueError, match=r"class_weight has shape \(3,\)"):
        call(hidden, weight, labels, class_weight=np.ones(3))
    with pytest.raises(ValueError, match="reduction='avg'"):
        call(hidden, weight, labels, reduction="avg")
    with pytest.raises(TypeError):
        call(hidden, weight, labels, bias, None)  # options are keyword-only


@pytest.mark.parametrize("text, size", [("256M", 256 << 20), ("1.5G", 3 << 29), ("64k", 65536), (" 2 GiB", 2 << 30),
                                        ("1000", 1000), (4096, 4096), (1e6, 1000000)])
def test_memory_sizes(text, size):
    call = linear._prepare("f", np.zeros((1, 3)), np.zeros((4, 3)), np.zeros(1, np.int64), None, None, text, None)
    assert call.budget == size


def test_default_memory_follows_the_machine(monkeypatch):
    monkeypatch.setattr(linear._config, "physical_memory", lambda: 16 << 30)
    call = linear._prepare("f", np.zeros((1, 3)), np.zeros((4, 3)), np.zeros(1, np.int64), None, None, None, None)
    assert call.budget == (16 << 30) // 32
    monkeypatch.setattr(linear._config, "physical_memory", lambda: None)
    call = linear._prepare("f", np.zeros((1, 3)), np.zeros((4, 3)), np.zeros(1, np.int64), None, None, None, None)
    assert call.budget == linear._config.LINEAR_MEMORY_MIN
