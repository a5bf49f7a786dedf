"""Sigmoid and probability-input families, second order and ``score`` on every host backend.

backend x dtype x shape x option through the public API, compared with
``fastxent.reference`` (float64) called directly, through the tolerance table
of ``tests/support.py``; then the second-order identities, the adversarial
inputs (|x| up to 3e38, probabilities of exactly 0 and 1, -inf/NaN rows) and
what a reduced elementwise loss allocates. The vectorisation of every Numba
kernel, on AVX2 and AVX-512, is checked by ``tests/test_codegen.py``.

Compiled variants (1 to 3.5 s of CPU each on a cold cache): every kernel is
called with labels of the scores' dtype, so each compiles once per score dtype
and pass (forward-only, fused): 44; ``test_label_dtypes`` adds two and
``test_hvp_with_v_of_another_dtype`` one, 47 in all. Run
``python -m tests.test_families`` to count them after a run of this file.
"""

import tracemalloc

import numpy as np
import pytest
from numba import njit

import fastxent as fx
from fastxent import _dtypes
from fastxent import reference as ref
from fastxent.backends.numba import _elementwise, _moments, _probs, _softmax
from fastxent.backends.numba._rows import FASTMATH
from tests.support import (
    DTYPE_IDS,
    FLOAT_DTYPES,
    assert_close,
    assert_same_dtype,
    compare,
    compare_score,
    make_class_ids,
    make_distribution,
    make_logits,
)

BACKENDS = ["numba", "numpy"]
REDUCTIONS = ("none", "sum", "mean")
ELEMENT_SHAPES = [(), (1,), (9,), (0, 4), (1, 2), (7, 3), (5, 423), (3, 4, 5), (2, 50257)]
ELEMENT_IDS = ["x".join(map(str, s)) or "0d" for s in ELEMENT_SHAPES]
ROW_SHAPES = [(0, 5), (1, 2), (7, 3), (5, 423), (2, 50257)]
ROW_IDS = [f"{n}x{c}" for n, c in ROW_SHAPES]




def _check_all_reductions(fn, first, labels, options, dtype, backend, what):
    """Every reduction, fused and forward-only, against the reference."""
    for reduction in REDUCTIONS:
        expected = getattr(ref, fn)(first, labels, reduction=reduction, return_grad=True, **options)
        got = getattr(fx, fn)(first, labels, reduction=reduction, return_grad=True, backend=backend,
                              **options)
        compare(got, expected, dtype, f"{what} {reduction}")
        forward = getattr(fx, fn)(first, labels, reduction=reduction, backend=backend, **options)
        compare(forward, expected[0], dtype, f"{what} {reduction} forward-only")


def _binary_targets(shape, dtype, seed=3):
    """Hard 0/1 targets mixed with soft ones."""
    rng = np.random.default_rng(seed)
    hard = (rng.random(shape) < 0.5).astype(np.float64)
    return np.where(rng.random(shape) < 0.7, hard, rng.random(shape)).astype(dtype)


# ----------------------------------------------------------------------------
# Sigmoid family
# ----------------------------------------------------------------------------

def _pos_weight(kind, shape, seed=4):
    rng = np.random.default_rng(seed)
    if kind == "scalar":
        return 2.5
    if kind == "class":            # one per class on the last axis (0-d: a 0-d array)
        return rng.uniform(0.2, 3.0, shape[-1:])
    if kind == "full":
        return rng.uniform(0.2, 3.0, shape)
    if kind == "column":           # broadcasts along the last axis
        return rng.uniform(0.2, 3.0, shape[:-1] + (1,) if shape else ())
    return None


SIGMOID_OPTIONS = {
    "plain": {},
    "pw_scalar": {"pos_weight": "scalar"},
    "pw_class": {"pos_weight": "class"},
    "pw_full": {"pos_weight": "full"},
    "pw_column": {"pos_weight": "column"},
    "smoothing": {"label_smoothing": 0.1},
    "all": {"pos_weight": "class", "label_smoothing": 0.2},
}


def _sigmoid_options(option, shape):
    options = dict(SIGMOID_OPTIONS[option])
    if "pos_weight" in options:
        options["pos_weight"] = _pos_weight(options["pos_weight"], shape)
    return options


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", ELEMENT_SHAPES, ids=ELEMENT_IDS)
@pytest.mark.parametrize("option", list(SIGMOID_OPTIONS))
def test_sigmoid_matches_reference(backend, dtype, shape, option):
    logits = make_logits(shape, dtype)
    labels = _binary_targets(shape, dtype)
    _check_all_reductions("sigmoid_cross_entropy", logits, labels, _sigmoid_options(option, shape), dtype,
                          backend, f"{backend} {option}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", ELEMENT_SHAPES, ids=ELEMENT_IDS)
@pytest.mark.parametrize("pos_weight", ["none", "scalar", "class", "full"])
def test_sigmoid_hessian_diag_matches_reference(dtype, shape, pos_weight):
    logits = make_logits(shape, dtype)
    labels = _binary_targets(shape, dtype)
    weight = _pos_weight(pos_weight, shape)
    got = fx.sigmoid_cross_entropy_hessian_diag(logits, labels, pos_weight=weight, backend="numba")
    expected = ref.sigmoid_cross_entropy_hessian_diag(logits, labels, pos_weight=weight)
    assert_same_dtype(got, expected, "hessian diag")
    assert_close(got, expected, dtype, "stored", f"hessian diag {pos_weight}")


def test_sigmoid_hessian_diag_is_the_derivative_of_the_gradient():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(4, 6)) * 3
    z = rng.random((4, 6))
    q = rng.uniform(0.5, 2.0, 6)
    h = 1e-6
    _, up = ref.sigmoid_cross_entropy(x + h, z, pos_weight=q, return_grad=True)
    _, down = ref.sigmoid_cross_entropy(x - h, z, pos_weight=q, return_grad=True)
    got = fx.sigmoid_cross_entropy_hessian_diag(x, z, pos_weight=q)
    assert_close(got, (up - down) / (2 * h), tol=(1e-6, 1e-8), what="finite differences")
    assert np.all(got >= 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_sigmoid_extreme_scores(dtype):
    """|x| up to 3e38 (and 1e300 in float64), ±inf, NaN, ±0: stable, as the reference."""
    big = [3e38, 1e30, 88.0, 20.0, 1e-30, 0.0, -0.0]
    if dtype == np.float64:
        big += [1e300, 710.0]
    values = np.array(big + [-v for v in big] + [np.inf, -np.inf, np.nan], dtype=dtype)
    for z in (0.0, 1.0, 0.3):
        labels = np.full(values.shape, z, dtype=dtype)
        for pos_weight in (None, 2.0):
            expected = ref.sigmoid_cross_entropy(values, labels, pos_weight=pos_weight, return_grad=True)
            got = fx.sigmoid_cross_entropy(values, labels, pos_weight=pos_weight, return_grad=True)
            compare(got, expected, dtype, f"z={z} pos_weight={pos_weight}")
            finite = np.isfinite(values)
            assert np.all(np.isfinite(got[1][finite]))
            if pos_weight is None:   # 2 * 3e38 overflows float32, as in the reference
                assert np.all(np.isfinite(got[0][finite]))
        hessian = fx.sigmoid_cross_entropy_hessian_diag(values, labels)
        assert_close(hessian, ref.sigmoid_cross_entropy_hessian_diag(values, labels), dtype, "stored", "hessian")


def test_sigmoid_tiny_loss_keeps_relative_precision():
    """x = -20, z = 0: loss log1p(e^-20) = 2.06e-9, where ``(1-z)x + softplus(-x)`` gives 0 in
    float32 (and loses digits in float64: the reference is 1.3% off at x = -30)."""
    x = np.array([-20.0, -30.0, 25.0, -15.0, -80.0], dtype=np.float32)
    z = np.array([0.0, 0.0, 1.0, 0.0, 0.0], dtype=np.float32)
    exact = np.logaddexp(0.0, np.where(z == 1, -1.0, 1.0) * x.astype(np.float64))
    np.testing.assert_allclose(fx.sigmoid_cross_entropy(x, z), exact, rtol=1e-6)
    np.testing.assert_allclose(fx.sigmoid_cross_entropy(x.astype(np.float64), z.astype(np.float64)), exact,
                               rtol=1e-14)


def test_label_dtypes():
    logits = make_logits((6, 9), np.float32)
    for labels in (_binary_targets((6, 9), np.float64) > 0.5, _binary_targets((6, 9), np.float64)):
        compare(fx.sigmoid_cross_entropy(logits, labels, return_grad=True),
                 ref.sigmoid_cross_entropy(logits, labels, return_grad=True), np.float32,
                 f"labels {labels.dtype}")


# ----------------------------------------------------------------------------
# Probability inputs
# ----------------------------------------------------------------------------

def _probabilities(shape, dtype, epsilon=1e-7, seed=5):
    """Values in [0, 1] with exact 0s and 1s and the exact (rounded) clip bounds."""
    rng = np.random.default_rng(seed)
    p = rng.random(shape)
    pick = rng.random(shape)
    p = np.where(pick < 0.05, 0.0, p)
    p = np.where((pick >= 0.05) & (pick < 0.1), 1.0, p)
    p = np.where((pick >= 0.1) & (pick < 0.12), _dtypes.round_to(epsilon, dtype), p)
    p = np.where((pick >= 0.12) & (pick < 0.14), _dtypes.round_to(1 - epsilon, dtype), p)
    return p.astype(dtype)


BINARY_OPTIONS = {
    "plain": {},
    "epsilon": {"epsilon": 1e-3},
    "smoothing": {"label_smoothing": 0.1},
    "wide_clip": {"epsilon": 0.2, "label_smoothing": 0.05},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", ELEMENT_SHAPES, ids=ELEMENT_IDS)
@pytest.mark.parametrize("option", list(BINARY_OPTIONS))
def test_binary_matches_reference(backend, dtype, shape, option):
    options = BINARY_OPTIONS[option]
    probs = _probabilities(shape, dtype, options.get("epsilon", 1e-7))
    labels = _binary_targets(shape, dtype)
    _check_all_reductions("binary_cross_entropy", probs, labels, options, dtype, backend,
                          f"{backend} {option}")


def _row_probabilities(shape, dtype, seed=6):
    """Unnormalised positive rows with exact zeros; row 0 one-hot (exact 0 and 1)."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.0, 2.0, shape) * (rng.random(shape) > 0.1)
    if p.size:
        p[0] = 0.0
        p[0, -1] = 1.0
    return p.astype(dtype)


CATEGORICAL_OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "epsilon": {"epsilon": 1e-2},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=ROW_IDS)
@pytest.mark.parametrize("option", list(CATEGORICAL_OPTIONS))
def test_categorical_matches_reference(backend, dtype, shape, option):
    probs = _row_probabilities(shape, dtype)
    labels = make_distribution(shape, dtype=dtype)
    _check_all_reductions("categorical_cross_entropy", probs, labels, CATEGORICAL_OPTIONS[option], dtype,
                          backend, f"{backend} {option}")


SPARSE_OPTIONS = {"plain": {}, "ignore": {"ignore_index": -100}, "epsilon": {"epsilon": 1e-2}}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=ROW_IDS)
@pytest.mark.parametrize("option", list(SPARSE_OPTIONS))
def test_sparse_categorical_matches_reference(backend, dtype, shape, option):
    probs = _row_probabilities(shape, dtype)
    options = SPARSE_OPTIONS[option]
    labels = make_class_ids(shape[:1], shape[1], ignore_index=options.get("ignore_index"),
                            ignore_fraction=0.3)
    if labels.size:
        labels[0] = shape[1] - 1      # the one-hot row's own class: q = 1, clipped
    _check_all_reductions("sparse_categorical_cross_entropy", probs, labels, options, dtype, backend,
                          f"{backend} {option}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_probability_edge_rows(dtype):
    """All-zero rows (NaN), rows holding NaN or inf, one-hot rows, for both categorical losses."""
    probs = np.array([[0.0, 0.0, 0.0, 0.0],
                      [np.nan, 0.2, 0.3, 0.5],
                      [np.inf, 1.0, 0.0, 0.0],
                      [0.0, 1.0, 0.0, 0.0],
                      [0.0, 0.0, 1.0, 0.0],
                      [0.25, 0.25, 0.25, 0.25]]).astype(dtype)
    ids = np.array([0, 1, 1, 1, 0, -100])
    soft = np.eye(4)[np.clip(ids, 0, 3)].astype(dtype)
    compare(fx.categorical_cross_entropy(probs, soft, return_grad=True),
             ref.categorical_cross_entropy(probs, soft, return_grad=True), dtype, "categorical")
    compare(fx.sparse_categorical_cross_entropy(probs, ids, ignore_index=-100, return_grad=True),
             ref.sparse_categorical_cross_entropy(probs, ids, ignore_index=-100, return_grad=True),
             dtype, "sparse categorical")
    flat = probs.reshape(-1)
    targets = np.tile(np.array([0.0, 1.0, 0.5], dtype=dtype), 8)
    compare(fx.binary_cross_entropy(flat, targets, return_grad=True),
             ref.binary_cross_entropy(flat, targets, return_grad=True), dtype, "binary")


# ----------------------------------------------------------------------------
# Axes, grad_output, inputs left alone
# ----------------------------------------------------------------------------

def test_class_axis_one_on_3d():
    probs = _row_probabilities((6, 3, 5), np.float32).transpose(0, 2, 1).copy()   # (6, 5, 3), classes on axis 1
    soft = make_distribution((6, 5, 3), axis=1)
    ids = make_class_ids((6, 3), 5)
    compare(fx.categorical_cross_entropy(probs, soft, axis=1, return_grad=True, reduction="mean"),
             ref.categorical_cross_entropy(probs, soft, axis=1, return_grad=True, reduction="mean"),
             np.float32, "categorical axis=1")
    compare(fx.sparse_categorical_cross_entropy(probs, ids, axis=1, return_grad=True),
             ref.sparse_categorical_cross_entropy(probs, ids, axis=1, return_grad=True),
             np.float32, "sparse categorical axis=1")
    logits = make_logits((6, 5, 3), np.float32)
    v = make_logits((6, 5, 3), np.float32, seed=8)
    assert_close(fx.softmax_cross_entropy_hvp(logits, v, axis=1),
                 ref.softmax_cross_entropy_hvp(logits, v, axis=1), np.float32, "stored", "hvp axis=1")
    got = fx.score(logits, ids, axis=1)
    expected = ref.score(logits, ids, axis=1)
    compare_score(got, expected, np.float32, "score axis=1")


def test_non_contiguous_inputs():
    base = make_logits((12, 40), np.float32)
    targets = _binary_targets((12, 40), np.float32)
    for logits, labels in ((base[::2, ::3], targets[1::2, ::3]), (base.T, targets.T), (base[:, ::-1], targets)):
        compare(fx.sigmoid_cross_entropy(logits, labels, pos_weight=np.linspace(1, 2, logits.shape[-1]),
                                          return_grad=True),
                 ref.sigmoid_cross_entropy(logits, labels, pos_weight=np.linspace(1, 2, logits.shape[-1]),
                                           return_grad=True),
                 np.float32, f"strides {logits.strides}")


@pytest.mark.parametrize("grad_output", ["scalar", "per_element", "broadcast"])
def test_grad_output(grad_output):
    rng = np.random.default_rng(9)
    shape = (4, 3, 10)
    upstream = {"scalar": np.float32(2.5), "per_element": rng.standard_normal(shape),
                "broadcast": rng.standard_normal((4, 1, 10))}[grad_output]
    row_upstream = {"scalar": 2.5, "per_element": rng.standard_normal(shape[:2]),
                    "broadcast": rng.standard_normal((4, 1))}[grad_output]
    logits = make_logits(shape, np.float32)
    targets = _binary_targets(shape, np.float32)
    probs = _probabilities(shape, np.float32)
    rows = _row_probabilities(shape, np.float32)
    soft = make_distribution(shape)
    ids = make_class_ids(shape[:2], shape[2])
    cases = [
        ("sigmoid_cross_entropy", logits, targets, {"pos_weight": np.linspace(0.5, 2, 10)}, upstream),
        ("sigmoid_cross_entropy", logits, targets, {"pos_weight": 3.0}, upstream),
        ("binary_cross_entropy", probs, targets, {}, upstream),
        ("categorical_cross_entropy", rows, soft, {}, row_upstream),
        ("sparse_categorical_cross_entropy", rows, ids, {}, row_upstream),
    ]
    for fn, first, labels, options, g in cases:
        compare(getattr(fx, fn)(first, labels, return_grad=True, grad_output=g, **options),
                 getattr(ref, fn)(first, labels, return_grad=True, grad_output=g, **options),
                 np.float32, f"{fn} {grad_output}")
        for reduction in ("sum", "mean"):
            compare(getattr(fx, fn)(first, labels, return_grad=True, reduction=reduction, grad_output=0.5,
                                     **options),
                     getattr(ref, fn)(first, labels, return_grad=True, reduction=reduction, grad_output=0.5,
                                      **options),
                     np.float32, f"{fn} {reduction}")


def test_mean_over_nothing_is_zero():
    probs = _row_probabilities((3, 4), np.float32)
    loss, grad = fx.sparse_categorical_cross_entropy(probs, np.full(3, -1), ignore_index=-1, reduction="mean",
                                                     return_grad=True)
    assert loss.shape == () and loss.dtype == np.float32 and float(loss) == 0.0 and not grad.any()
    empty = np.zeros((0, 4), np.float32)
    loss, grad = fx.sigmoid_cross_entropy(empty, empty, reduction="mean", return_grad=True)
    assert float(loss) == 0.0 and grad.shape == (0, 4)


def test_inputs_are_not_modified():
    logits = make_logits((6, 33), np.float32)
    targets = _binary_targets((6, 33), np.float32)
    probs = _row_probabilities((6, 33), np.float32)
    soft = make_distribution((6, 33))
    ids = make_class_ids((6,), 33)
    weights = np.linspace(0.5, 1.5, 33)
    full_weights = np.linspace(0.5, 1.5, 6 * 33).reshape(6, 33)
    upstream = np.linspace(-1, 1, 6 * 33).reshape(6, 33).astype(np.float32)
    row_upstream = np.arange(6, dtype=np.float32)
    arrays = (logits, targets, probs, soft, ids, weights, full_weights, upstream, row_upstream)
    saved = [a.copy() for a in arrays]
    fx.sigmoid_cross_entropy(logits, targets, pos_weight=weights, label_smoothing=0.1, return_grad=True,
                             grad_output=upstream)
    fx.sigmoid_cross_entropy(logits, targets, pos_weight=full_weights)
    fx.binary_cross_entropy(probs, targets, label_smoothing=0.1, return_grad=True, grad_output=upstream)
    fx.categorical_cross_entropy(probs, soft, label_smoothing=0.1, return_grad=True, grad_output=row_upstream)
    fx.sparse_categorical_cross_entropy(probs, ids, return_grad=True, grad_output=row_upstream)
    fx.softmax_cross_entropy_hvp(logits, probs)
    fx.sigmoid_cross_entropy_hessian_diag(logits, targets, pos_weight=full_weights)
    fx.score(logits, ids)
    for before, after in zip(saved, arrays):
        np.testing.assert_array_equal(before, after)


# ----------------------------------------------------------------------------
# Second order: Hessian-vector product of the softmax cross-entropy
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=ROW_IDS)
def test_hvp_matches_reference(dtype, shape):
    logits = make_logits(shape, dtype)
    v = make_logits(shape, dtype, seed=7, spiky=False)
    got = fx.softmax_cross_entropy_hvp(logits, v, backend="numba")
    expected = ref.softmax_cross_entropy_hvp(logits, v)
    assert_same_dtype(got, expected, "hvp")
    assert_close(got, expected, dtype, "stored", "hvp")


def test_hvp_is_the_explicit_hessian_and_psd():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(6, 5)) * 2
    v = rng.normal(size=(6, 5))
    got = fx.softmax_cross_entropy_hvp(x, v)
    p = np.exp(x - x.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    for i in range(x.shape[0]):
        hessian = np.diag(p[i]) - np.outer(p[i], p[i])
        assert_close(got[i], hessian @ v[i], tol=(1e-12, 1e-14), what=f"row {i}")
    assert np.all(np.einsum("ij,ij->i", v, got) >= -1e-15), "v.Hv < 0"
    ones = fx.softmax_cross_entropy_hvp(x, np.ones_like(x))
    assert_close(ones, np.zeros_like(x), tol=(0.0, 1e-15), what="H 1 = 0")
    x32 = make_logits((64, 300), np.float32)
    v32 = make_logits((64, 300), np.float32, seed=3)
    hv = fx.softmax_cross_entropy_hvp(x32, v32).astype(np.float64)
    assert np.all(np.einsum("ij,ij->i", v32.astype(np.float64), hv) >= -1e-5)
    assert np.abs(fx.softmax_cross_entropy_hvp(x32, np.ones_like(x32))).max() < 1e-6


def test_hvp_matches_finite_differences_of_the_gradient():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(4, 7)) * 2
    v = rng.normal(size=(4, 7))
    labels = make_distribution((4, 7), dtype=np.float64)
    h = 1e-6
    _, up = ref.softmax_cross_entropy(x + h * v, labels, return_grad=True)
    _, down = ref.softmax_cross_entropy(x - h * v, labels, return_grad=True)
    assert_close(fx.softmax_cross_entropy_hvp(x, v), (up - down) / (2 * h), tol=(1e-6, 1e-8),
                 what="finite differences")


def test_hvp_non_finite_rows_and_large_scores():
    x = make_logits((5, 3000), np.float32)
    x[0, 10:2500] = -np.inf          # masking: 0 there
    x[1] = -np.inf                   # NaN row
    x[2, 7] = np.nan
    x[3, 2999] = np.inf
    x[4] *= 3000                     # |x| ~ 1e5: lse off by 0.004 in float32
    v = make_logits((5, 3000), np.float32, seed=4)
    got = fx.softmax_cross_entropy_hvp(x, v)
    assert np.all(got[0, 10:2500] == 0)
    assert np.isnan(got[1:4]).all()
    assert_close(got, ref.softmax_cross_entropy_hvp(x, v), np.float32, "stored", "non-finite")


def test_hvp_with_v_of_another_dtype():
    logits = make_logits((5, 30), np.float32)
    v = make_logits((5, 30), np.float64, seed=2)
    got = fx.softmax_cross_entropy_hvp(logits, v)
    assert got.dtype == np.float32
    assert_close(got, ref.softmax_cross_entropy_hvp(logits, v), np.float32, "stored", "v float64")


# ----------------------------------------------------------------------------
# score
# ----------------------------------------------------------------------------



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=ROW_IDS)
@pytest.mark.parametrize("ignore_index", [None, -100])
def test_score_matches_reference(backend, dtype, shape, ignore_index):
    logits = make_logits(shape, dtype)
    labels = make_class_ids(shape[:1], shape[1], ignore_index=ignore_index, ignore_fraction=0.3)
    if labels.size:
        labels[0] = np.argmax(logits[0].astype(np.float64))       # one correct row at least
    got = fx.score(logits, labels, ignore_index=ignore_index, backend=backend)
    compare_score(got, ref.score(logits, labels, ignore_index=ignore_index), dtype, f"{backend}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_score_ties_and_non_finite_rows(dtype):
    count = 5000                         # > NUMBA_CHUNK: ties across chunks
    x = make_logits((12, count), dtype)
    x[0] = 0.0                           # uniform row: argmax 0
    x[1, [100, 3000]] = 1e3              # tie across chunks: the first
    x[2, [3000, 4500]] = 1e3             # tie in later chunks: the first of them
    x[3] = 0.0
    x[3, :5] = -0.0                      # -0 == +0: np.argmax gives 0
    x[4, 10:4000] = -np.inf              # masking: finite loss and entropy
    x[5] = -np.inf                       # all -inf: NaN floats, argmax 0
    x[6, [17, 4000]] = np.nan            # NaN: NaN floats, argmax = first NaN
    x[7, 2500] = np.inf                  # +inf: NaN floats, argmax at the inf
    x[8, 3] = -np.inf                    # -inf at the target: loss +inf
    x[9, [20, 2100]] = np.nan            # ignored NaN row: loss 0
    x[10] *= 3000                        # |x| ~ 1e5: entropy accurate despite lse rounding
    x[11, 4999] = 1e4                    # max in the last element
    labels = np.array([0, 100, 3000, 1, 5, 0, 17, 2500, 3, -1, 0, 4999])
    got = fx.score(x, labels, ignore_index=-1)
    expected = ref.score(x, labels, ignore_index=-1)
    compare_score(got, expected, dtype, "edge rows")
    assert got.argmax.tolist()[:8] == [0, 100, 3000, 0, got.argmax[4], 0, 17, 2500]
    assert got.loss[8] == np.inf and got.loss[9] == 0 and np.isnan(got.target_logprob[9])
    assert np.isfinite(got.loss[4]) and np.isfinite(got.entropy[4])


def test_score_agrees_with_the_sparse_loss():
    logits = make_logits((16, 423), np.float32)
    labels = make_class_ids((16,), 423)
    got = fx.score(logits, labels)
    assert_close(got.loss, fx.sparse_softmax_cross_entropy(logits, labels), np.float32, "value", "loss")
    assert_close(got.lse, fx.logsumexp(logits), np.float32, "value", "lse")


@pytest.mark.parametrize("fn, first", [
    ("sigmoid_cross_entropy", make_logits((256, 1000), np.float32)),
    ("binary_cross_entropy", np.random.default_rng(2).uniform(0.01, 0.99, (256, 1000)).astype(np.float32)),
], ids=["sigmoid", "binary"])
def test_reduced_elementwise_loss_has_no_unreduced_buffer(fn, first):
    """A reduced elementwise loss is summed per block inside the kernel: the call
    allocates a few KiB (per-block sums, option windows), not the ``(R, K)`` loss."""
    labels = _binary_targets(first.shape, np.float32)
    expected = getattr(ref, fn)(first, labels, reduction="mean")
    compare(getattr(fx, fn)(first, labels, reduction="mean"), expected, np.float32, f"{fn} mean")
    tracemalloc.start()
    try:
        getattr(fx, fn)(first, labels, reduction="sum")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < first.nbytes / 16, f"{fn}: peak {peak} bytes for {first.nbytes} bytes of scores"


# ----------------------------------------------------------------------------
# The sigmoid's log1p polynomial
# ----------------------------------------------------------------------------

@njit(fastmath=FASTMATH, error_model="numpy")
def _log1p_unit_loop(x, out):
    for i in range(x.shape[0]):
        out[i] = _elementwise._log1p_unit(x[i])


def test_log1p_unit_accuracy():
    """The float32 polynomial behind the sigmoid loss: 1.3 ulp at most on every 97th float32 of [0, 1]."""
    x = np.arange(0, 0x3F800001, 97, dtype=np.int64).astype(np.int32).view(np.float32)
    out = np.empty_like(x)
    _log1p_unit_loop(x, out)
    exact = np.log1p(x.astype(np.float64))
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    error = np.abs(out - exact) / ulp
    assert error.max() <= 1.35, f"{error.max():.3f} ulp at {x[error.argmax()]!r}"
    tiny = x < 2.0 ** -24
    np.testing.assert_array_equal(out[tiny], x[tiny])
    assert np.isnan(_log1p_unit_loop_value(np.nan))


def _log1p_unit_loop_value(value):
    out = np.empty(1, np.float32)
    _log1p_unit_loop(np.array([value], np.float32), out)
    return out[0]


if __name__ == "__main__":   # count the compiled variants a run of this file triggers
    import sys

    code = pytest.main([__file__, "-q"] + sys.argv[1:])
    counts = {name: len(kernel.signatures) for module in (_elementwise, _moments, _probs, _softmax)
              for name, kernel in vars(module).items()
              if name.endswith("_kernel") and hasattr(kernel, "signatures")}
    print(counts, "total", sum(counts.values()))
    sys.exit(code)


@pytest.mark.parametrize("backend", ["numba"])
def test_sigmoid_tiny_losses_keep_their_relative_precision(backend):
    """x = -20..-80 with z = 0 (and the mirror x > 0, z = 1): losses of 2e-9..2e-35, where
    the literal ``(1-z) x + w softplus(-x)`` loses every digit in float32."""
    x = np.concatenate([-np.linspace(20, 80, 13), np.linspace(20, 80, 13)]).astype(np.float32)
    z = (x > 0).astype(np.float32)
    expected = np.log1p(np.exp(-np.abs(x.astype(np.float64))))
    got = fx.sigmoid_cross_entropy(x, z, backend=backend).astype(np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=0)
