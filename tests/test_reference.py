"""Checks of the float64 reference (fastxent/reference.py), the oracle of every backend.

Gradients against central finite differences, second order against finite
differences of the gradient and the explicit Hessian, values against explicit
formulas and, when torch is installed, against torch as an independent oracle.
No expected value here is computed by the reference itself.
"""

import zlib

import ml_dtypes
import numpy as np
import pytest

from fastxent import reference as ref
from fastxent._score import Score

N, C = 5, 7
REDUCTIONS = ("none", "sum", "mean")
DTYPES = (np.float16, ml_dtypes.bfloat16, np.float32, np.float64)
INF = np.inf


def assert_close(actual, expected, rtol=1e-7, atol=1e-9, what=""):
    """allclose with NaN == NaN, printing the mismatch count, first indices and non-finite disagreements."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    ok = np.isclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True)
    ok |= (actual == expected)  # same infinities
    if not ok.all():
        bad = np.argwhere(~ok)
        nan_mismatch = np.count_nonzero(np.isnan(actual) != np.isnan(expected))
        inf_mismatch = np.count_nonzero(np.isinf(actual) != np.isinf(expected))
        lines = [f"{what}: {len(bad)} of {ok.size} mismatched (rtol={rtol}, atol={atol}); "
                 f"NaN disagreements {nan_mismatch}, inf disagreements {inf_mismatch}"]
        for idx in bad[:8]:
            idx = tuple(idx)
            lines.append(f"  at {idx}: actual {actual[idx]!r} expected {expected[idx]!r}")
        pytest.fail("\n".join(lines))


def fd_grad(f, x, h=1e-6):
    """Central finite differences of the scalar ``f`` at ``x`` (float64)."""
    x = np.asarray(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        grad[i] = (f(xp) - f(xm)) / (2 * h)
    return grad


def np_softmax(x, axis=-1):
    """Textbook softmax for moderate finite x (no max shift needed)."""
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


# --------------------------------------------------------------------------
# argument builders: each returns (first argument, rest of the positional arguments)
# --------------------------------------------------------------------------


def _class_shape(shape, axis):
    return tuple(s for i, s in enumerate(shape) if i != axis % len(shape))


def _sparse(rng, shape=(N, C), axis=-1, ignore=None):
    x = rng.normal(size=shape) * 2
    labels = rng.integers(0, shape[axis], _class_shape(shape, axis))
    if ignore is not None:
        labels.flat[[0, 3]] = ignore
    return x, (labels,)


def _soft(rng, shape=(N, C), axis=-1):
    y = rng.uniform(0, 1, shape) * (rng.uniform(size=shape) < 0.6)  # zeros, not normalised
    return rng.normal(size=shape) * 2, (y,)


def _elementwise(rng, shape=(N, C)):
    return rng.normal(size=shape) * 3, (rng.uniform(0, 1, shape),)


def _binary_probs(rng, shape=(N, C)):
    # values clear of the clip kinks at 0.1 / 0.9 (epsilon = 0.1) and 1e-7
    p = rng.choice([0.03, 0.08, 0.3, 0.5, 0.7, 0.95, 0.99], shape) + rng.uniform(-1e-3, 1e-3, shape)
    return p, (rng.uniform(0, 1, shape),)


def _probs(rng, shape, axis, epsilon):
    p = rng.uniform(0.05, 1.0, shape)
    rows = np.moveaxis(p, axis, -1)
    if epsilon >= 0.01:  # some entries clipped low and high; unclipped, 1e-4 would defeat the finite differences
        rows[..., 0] = 1e-4      # normalised ~3e-5
        rows[:2, 1] = 60.0       # normalised ~0.93
    q = rows / rows.sum(-1, keepdims=True)
    assert np.min(np.abs(q - epsilon)) > 1e-6 and np.min(np.abs(q - (1 - epsilon))) > 1e-6
    return p


def _categorical(rng, shape=(N, C), axis=-1, epsilon=1e-7):
    y = rng.uniform(0, 1, shape) * (rng.uniform(size=shape) < 0.6)
    return _probs(rng, shape, axis, epsilon), (y,)


def _sparse_categorical(rng, shape=(N, C), axis=-1, epsilon=1e-7, ignore=None):
    _, (labels,) = _sparse(rng, shape, axis, ignore)
    return _probs(rng, shape, axis, epsilon), (labels,)


W = np.array([0.5, 1.0, 2.0, 0.0, 1.5, 0.7, 1.2])
SPARSE_ALL = dict(ignore_index=-100, class_weight=W, label_smoothing=0.1, z_loss=0.01, softcap=2.5)

GRAD_CASES = {
    "sparse": (ref.sparse_softmax_cross_entropy, _sparse, {}),
    "sparse-ignore": (ref.sparse_softmax_cross_entropy,
                      lambda r: _sparse(r, ignore=-100), {"ignore_index": -100}),
    "sparse-ignore-class": (ref.sparse_softmax_cross_entropy,
                            lambda r: _sparse(r, ignore=2), {"ignore_index": 2}),
    "sparse-weight": (ref.sparse_softmax_cross_entropy, _sparse, {"class_weight": W}),
    "sparse-smooth": (ref.sparse_softmax_cross_entropy, _sparse, {"label_smoothing": 0.1}),
    "sparse-zloss": (ref.sparse_softmax_cross_entropy, _sparse, {"z_loss": 0.01}),
    "sparse-softcap": (ref.sparse_softmax_cross_entropy, _sparse, {"softcap": 2.5}),
    "sparse-all": (ref.sparse_softmax_cross_entropy,
                   lambda r: _sparse(r, ignore=-100), SPARSE_ALL),
    "sparse-all-axis1": (ref.sparse_softmax_cross_entropy,
                         lambda r: _sparse(r, (3, C, 4), 1, ignore=-100), dict(SPARSE_ALL, axis=1)),
    "soft": (ref.softmax_cross_entropy, _soft, {}),
    "soft-smooth": (ref.softmax_cross_entropy, _soft, {"label_smoothing": 0.2}),
    "soft-softcap": (ref.softmax_cross_entropy, _soft, {"softcap": 2.5}),
    "soft-all-axis1": (ref.softmax_cross_entropy, lambda r: _soft(r, (3, C, 4), 1),
                       {"axis": 1, "label_smoothing": 0.2, "softcap": 2.5}),
    "sigmoid": (ref.sigmoid_cross_entropy, _elementwise, {}),
    "sigmoid-posw-scalar": (ref.sigmoid_cross_entropy, _elementwise, {"pos_weight": 3.0}),
    "sigmoid-posw-class": (ref.sigmoid_cross_entropy, _elementwise, {"pos_weight": W + 0.1}),
    "sigmoid-smooth": (ref.sigmoid_cross_entropy, _elementwise,
                       {"label_smoothing": 0.2, "pos_weight": W + 0.1}),
    "binary": (ref.binary_cross_entropy, _binary_probs, {}),
    "binary-smooth": (ref.binary_cross_entropy, _binary_probs, {"label_smoothing": 0.2}),
    "binary-clip": (ref.binary_cross_entropy, _binary_probs, {"epsilon": 0.1}),
    "categorical": (ref.categorical_cross_entropy, _categorical, {}),
    "categorical-smooth": (ref.categorical_cross_entropy, _categorical, {"label_smoothing": 0.2}),
    "categorical-clip": (ref.categorical_cross_entropy,
                         lambda r: _categorical(r, epsilon=0.1), {"epsilon": 0.1}),
    "categorical-axis1": (ref.categorical_cross_entropy,
                          lambda r: _categorical(r, (3, C, 4), 1, 0.1),
                          {"axis": 1, "epsilon": 0.1, "label_smoothing": 0.1}),
    "sparse-categorical": (ref.sparse_categorical_cross_entropy, _sparse_categorical, {}),
    "sparse-categorical-ignore": (ref.sparse_categorical_cross_entropy,
                                  lambda r: _sparse_categorical(r, ignore=-1), {"ignore_index": -1}),
    "sparse-categorical-clip": (ref.sparse_categorical_cross_entropy,
                                lambda r: _sparse_categorical(r, epsilon=0.1), {"epsilon": 0.1}),
    "sparse-categorical-axis1": (ref.sparse_categorical_cross_entropy,
                                 lambda r: _sparse_categorical(r, (3, C, 4), 1, 0.1, ignore=-1),
                                 {"axis": 1, "epsilon": 0.1, "ignore_index": -1}),
}


@pytest.mark.parametrize("given_grad_output", [False, True], ids=["g=default", "g=given"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_grad_matches_finite_differences(case, reduction, given_grad_output):
    fn, make, kwargs = GRAD_CASES[case]
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    first, rest = make(rng)
    kwargs = dict(kwargs, reduction=reduction)
    loss = fn(first, *rest, **kwargs)
    grad_output = None
    if given_grad_output:
        # a reduced loss takes a 0-d grad_output; an unreduced one a broadcastable array
        grad_output = (np.asarray(0.7) if reduction != "none"
                       else rng.normal(size=loss.shape[1:] if loss.ndim > 1 else loss.shape))
    loss2, grad = fn(first, *rest, **kwargs, return_grad=True, grad_output=grad_output)
    assert_close(loss2, loss, what="loss with return_grad")
    weight = 1.0 if grad_output is None else grad_output

    def objective(a):
        return np.sum(weight * fn(a, *rest, **kwargs))

    assert grad.shape == first.shape
    assert_close(grad, fd_grad(objective, first), rtol=1e-6, atol=1e-6, what=case)
    assert np.isfinite(grad).all() and np.any(grad != 0)


# --------------------------------------------------------------------------
# values against explicit formulas
# --------------------------------------------------------------------------


def test_sparse_is_minus_log_softmax_at_label():
    rng = np.random.default_rng(1)
    x, (labels,) = _sparse(rng)
    expected = -np.log(np_softmax(x))[np.arange(N), labels]
    assert_close(ref.sparse_softmax_cross_entropy(x, labels), expected)
    assert_close(ref.sparse_softmax_cross_entropy(x, labels, reduction="sum"), expected.sum())
    assert_close(ref.sparse_softmax_cross_entropy(x, labels, reduction="mean"), expected.mean())
    # the same along axis 1 of (N, C, d)
    x3, (labels3,) = _sparse(rng, (3, C, 4), axis=1)
    logp = np.log(np_softmax(x3, axis=1))
    expected3 = -np.take_along_axis(logp, labels3[:, None, :], axis=1)[:, 0, :]
    assert_close(ref.sparse_softmax_cross_entropy(x3, labels3, axis=1), expected3)
    assert_close(ref.sparse_softmax_cross_entropy(np.moveaxis(x3, 1, -1), labels3), expected3)


def test_sparse_options_explicit():
    rng = np.random.default_rng(2)
    x, (labels,) = _sparse(rng, ignore=-100)
    kept = labels != -100
    t = np.where(kept, labels, 0)
    eps, lam, cap = 0.1, 0.01, 2.5
    z = cap * np.tanh(x / cap)
    nll = -np.log(np_softmax(z))
    lse = np.log(np.exp(z).sum(-1))
    rows = (1 - eps) * W[t] * nll[np.arange(N), t] + eps / C * (nll * W).sum(-1) + lam * lse**2
    rows = np.where(kept, rows, 0.0)
    assert_close(ref.sparse_softmax_cross_entropy(x, labels, **SPARSE_ALL), rows)
    assert_close(ref.sparse_softmax_cross_entropy(x, labels, **SPARSE_ALL, reduction="mean"),
                 rows.sum() / W[t][kept].sum())


def test_soft_explicit_and_equals_sparse_for_one_hot():
    rng = np.random.default_rng(3)
    x, (y,) = _soft(rng)
    logp = np.log(np_softmax(x))
    assert_close(ref.softmax_cross_entropy(x, y), -(y * logp).sum(-1))
    ys = 0.8 * y + 0.2 / C
    assert_close(ref.softmax_cross_entropy(x, y, label_smoothing=0.2), -(ys * logp).sum(-1))
    _, (labels,) = _sparse(rng)
    onehot = np.eye(C)[labels]
    for kw in ({}, {"label_smoothing": 0.3}, {"softcap": 2.0}):
        for r in REDUCTIONS:
            a = ref.softmax_cross_entropy(x, onehot, reduction=r, return_grad=True, **kw)
            b = ref.sparse_softmax_cross_entropy(x, labels, reduction=r, return_grad=True, **kw)
            assert_close(a[0], b[0])
            assert_close(a[1], b[1])


def test_sigmoid_explicit_and_extreme_magnitudes():
    rng = np.random.default_rng(4)
    x, (z,) = _elementwise(rng)
    s = 1 / (1 + np.exp(-x))
    assert_close(ref.sigmoid_cross_entropy(x, z), -(z * np.log(s) + (1 - z) * np.log(1 - s)))
    q = W + 0.1
    assert_close(ref.sigmoid_cross_entropy(x, z, pos_weight=q),
                 -(q * z * np.log(s) + (1 - z) * np.log(1 - s)))
    # |x| up to 3e38: the loss is |x| or 0, the gradient sigmoid(x) - z
    big = np.array([3e38, 3e38, -3e38, -3e38, 40.0, -40.0])
    lab = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    loss, grad = ref.sigmoid_cross_entropy(big, lab, return_grad=True)
    assert_close(loss, [3e38, 0.0, 3e38, 0.0, np.log1p(np.exp(-40.0)), 40.0 + np.log1p(np.exp(-40.0))],
                 rtol=1e-15, atol=0)
    assert_close(grad, [1.0, 0.0, -1.0, 0.0, -np.exp(-40.0) / (1 + np.exp(-40.0)), -1 / (1 + np.exp(-40.0))],
                 rtol=1e-15, atol=0)
    loss32 = ref.sigmoid_cross_entropy(big.astype(np.float32), lab, pos_weight=0.5)
    assert np.isfinite(loss32).all()
    assert_close(loss32[:4], [3e38, 0.0, 1.5e38, 0.0], rtol=1e-7, atol=0)


def test_binary_keras_clip_bounds_rounded_to_dtype():
    # float32: hi = 1 - 1e-7 rounded to float32; p = 1 is clipped there (gradient 0),
    # p == hi is inside (torch.clamp's inclusive convention, gradient passes)
    hi32 = float(np.float32(1 - 1e-7))
    p = np.array([1.0, hi32, 0.0, 0.5], dtype=np.float32)
    z = np.array([0.0, 0.0, 1.0, 1.0], dtype=np.float32)
    lo32 = float(np.float32(1e-7))
    loss, grad = ref.binary_cross_entropy(p, z, return_grad=True)
    assert_close(loss, [-np.log(1 - hi32), -np.log(1 - hi32), -np.log(lo32), np.log(2)], rtol=1e-6)
    assert grad[0] == 0 and grad[2] == 0
    assert_close(grad[1], 1 / (1 - hi32), rtol=1e-6)
    assert_close(grad[3], -2.0, rtol=1e-6)
    # float16: 1 - 1e-7 rounds to 1.0, so p = 1 with z = 0 gives +inf (Keras in float16)
    loss16 = ref.binary_cross_entropy(np.array([1.0, 0.0], np.float16), np.array([0.0, 1.0]))
    assert loss16[0] == INF
    assert_close(loss16[1], -np.log(float(np.float16(1e-7))), rtol=1e-6)
    # zero-weight terms contribute 0 even at log(0)
    assert ref.binary_cross_entropy(np.array([1.0], np.float16), np.array([1.0]))[0] == 0


def test_categorical_explicit():
    rng = np.random.default_rng(5)
    p, (y,) = _categorical(rng, epsilon=0.1)
    q = np.clip(p / p.sum(-1, keepdims=True), 0.1, 0.9)
    ys = 0.9 * y + 0.1 / C
    logq = np.log(q)
    assert_close(ref.categorical_cross_entropy(p, y, epsilon=0.1, label_smoothing=0.1),
                 -(ys * logq).sum(-1))
    _, (labels,) = _sparse(rng, ignore=-1)
    kept = labels != -1
    expected = np.where(kept, -logq[np.arange(N), np.where(kept, labels, 0)], 0.0)
    assert_close(ref.sparse_categorical_cross_entropy(p, labels, epsilon=0.1, ignore_index=-1), expected)
    assert_close(ref.sparse_categorical_cross_entropy(p, labels, epsilon=0.1, ignore_index=-1,
                                                      reduction="mean"), expected.sum() / kept.sum())


def test_building_blocks_explicit():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3, C, 4))
    for axis in (1, -2):
        assert_close(ref.softmax(x, axis=axis), np_softmax(x, axis=1))
        assert_close(ref.log_softmax(x, axis=axis), np.log(np_softmax(x, axis=1)))
        assert_close(ref.logsumexp(x, axis=axis), np.log(np.exp(x).sum(1)))
    big = np.array([[1000.0, 1000.0], [-1000.0, -1001.0]])
    assert_close(ref.logsumexp(big), [1000 + np.log(2), -1000 + np.log1p(np.exp(-1.0))], rtol=1e-15)
    # C == 1 is allowed for the building blocks
    assert_close(ref.log_softmax(np.array([[3.0]])), [[0.0]])
    assert_close(ref.softmax(np.array([[3.0]])), [[1.0]])


def test_score_explicit():
    rng = np.random.default_rng(7)
    x, (labels,) = _sparse(rng, ignore=-100)
    x[1, 2] = x[1, 5] = x[1].max() + 1  # a tie: argmax is the first index
    labels[1] = 5
    kept = labels != -100
    p = np_softmax(x)
    lse = np.log(np.exp(x).sum(-1))
    t = np.where(kept, labels, 0)
    s = ref.score(x, labels, ignore_index=-100)
    assert isinstance(s, Score)
    assert_close(s.loss, np.where(kept, lse - x[np.arange(N), t], 0.0))
    assert_close(s.loss, ref.sparse_softmax_cross_entropy(x, labels, ignore_index=-100))
    assert_close(s.lse, lse)
    assert_close(s.target_logprob, np.where(kept, np.log(p[np.arange(N), t]), np.nan))
    assert_close(s.entropy, -(p * np.log(p)).sum(-1))
    assert s.argmax.dtype == np.int64 and s.argmax[1] == 2
    np.testing.assert_array_equal(s.argmax, np.argmax(x, -1))
    np.testing.assert_array_equal(s.correct, kept & (np.argmax(x, -1) == labels))
    assert s.correct.dtype == bool and not s.correct[1]
    # axis=1 of (N, C, d) equals the moved-axis result
    x3, (l3,) = _sparse(rng, (3, C, 4), 1)
    s1, s2 = ref.score(x3, l3, axis=1), ref.score(np.moveaxis(x3, 1, -1), l3)
    for f in Score._fields:
        assert_close(getattr(s1, f), getattr(s2, f), what=f)
    # entropy with a masked class: p = 0 contributes 0
    xm = np.array([[0.0, 0.0, -INF]])
    assert_close(ref.score(xm, np.array([0])).entropy, [np.log(2)])


# --------------------------------------------------------------------------
# second order
# --------------------------------------------------------------------------


def test_hvp():
    rng = np.random.default_rng(8)
    x3 = rng.normal(size=(3, C, 4)) * 2
    v3 = rng.normal(size=x3.shape)
    y3 = np_softmax(rng.normal(size=x3.shape), axis=1)  # labels summing to 1
    hv = ref.softmax_cross_entropy_hvp(x3, v3, axis=1)
    assert hv.shape == x3.shape
    h = 1e-5

    def grad(a):
        return ref.softmax_cross_entropy(a, y3, axis=1, return_grad=True)[1]

    assert_close(hv, (grad(x3 + h * v3) - grad(x3 - h * v3)) / (2 * h), rtol=1e-6, atol=1e-8)
    # explicit Hessian diag(p) - p p^T, per row
    p = np.moveaxis(np_softmax(x3, axis=1), 1, -1)
    hess = np.einsum("...i,ij->...ij", p, np.eye(C)) - p[..., :, None] * p[..., None, :]
    assert_close(np.moveaxis(hv, 1, -1), np.einsum("...ij,...j->...i", hess, np.moveaxis(v3, 1, -1)))
    # positive semi-definite and H 1 = 0
    assert np.all(np.sum(v3 * hv, axis=1) >= -1e-15)
    assert_close(ref.softmax_cross_entropy_hvp(x3, np.ones_like(x3), axis=1), np.zeros_like(x3), atol=1e-15)


def test_hvp_matches_torch_double_backward():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    x, v = rng.normal(size=(N, C)) * 2, rng.normal(size=(N, C))
    y = np_softmax(rng.normal(size=(N, C)))
    xt = torch.tensor(x, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(xt, torch.tensor(y), reduction="sum")
    (g,) = torch.autograd.grad(loss, xt, create_graph=True)
    (hv,) = torch.autograd.grad((g * torch.tensor(v)).sum(), xt)
    assert_close(ref.softmax_cross_entropy_hvp(x, v), hv.numpy())


@pytest.mark.parametrize("pos_weight", [None, 3.0, W + 0.1], ids=["none", "scalar", "per-class"])
def test_hessian_diag_matches_finite_differences(pos_weight):
    rng = np.random.default_rng(10)
    x, (z,) = _elementwise(rng)
    hd = ref.sigmoid_cross_entropy_hessian_diag(x, z, pos_weight=pos_weight)
    h = 1e-5

    def grad(a):  # elementwise, so one simultaneous step per element is exact per element
        return ref.sigmoid_cross_entropy(a, z, pos_weight=pos_weight, return_grad=True)[1]

    assert_close(hd, (grad(x + h) - grad(x - h)) / (2 * h), rtol=1e-6, atol=1e-9)
    assert np.all(hd > 0)


# --------------------------------------------------------------------------
# non-finite scores
# --------------------------------------------------------------------------


def test_nonfinite_rows_sparse():
    x = np.array([
        [1.0, -INF, 2.0, 0.5],    # 0: masked non-target -> finite
        [1.0, -INF, 2.0, 0.5],    # 1: -inf at the target -> +inf
        [-INF, -INF, -INF, -INF],  # 2: entirely -inf -> NaN
        [1.0, np.nan, 2.0, 0.5],  # 3: NaN -> NaN
        [1.0, INF, 2.0, 0.5],     # 4: +inf (not target) -> NaN
        [1.0, INF, 2.0, 0.5],     # 5: +inf at the target -> NaN
        [0.3, -0.2, 1.0, 0.5],    # 6: clean
        [np.nan, 1.0, 2.0, 0.5],  # 7: ignored -> 0, gradient 0
    ])
    labels = np.array([0, 1, 0, 0, 0, 1, 3, -100])
    loss, grad = ref.sparse_softmax_cross_entropy(x, labels, ignore_index=-100, return_grad=True)
    masked_row = np.array([1.0, 2.0, 0.5])
    assert_close(loss[0], -np.log(np_softmax(masked_row))[0])
    assert grad[0, 1] == 0
    assert_close(grad[0, [0, 2, 3]], np_softmax(masked_row) - [1, 0, 0])
    assert loss[1] == INF and np.isfinite(grad[1]).all()
    assert np.isnan(loss[2:6]).all() and np.isnan(grad[2:6]).all()
    assert_close(loss[6], -np.log(np_softmax(x[6]))[3])
    assert_close(grad[6], np_softmax(x[6]) - np.eye(4)[3])
    assert loss[7] == 0 and (grad[7] == 0).all()
    # reduced: NaN propagates into the total, the clean rows' gradient is unaffected
    total, g = ref.sparse_softmax_cross_entropy(x, labels, ignore_index=-100, reduction="mean",
                                                return_grad=True)
    assert np.isnan(total)
    assert_close(g[6], (np_softmax(x[6]) - np.eye(4)[3]) / 7)
    assert_close(g[0, [0, 2, 3]], (np_softmax(masked_row) - [1, 0, 0]) / 7)


def test_nonfinite_soft_and_score_and_hvp():
    x = np.array([[1.0, -INF, 2.0], [1.0, -INF, 2.0], [np.nan, 0.0, 0.0], [INF, 0.0, 0.0], [0.1, 0.2, 0.3]])
    y = np.array([[0.5, 0.0, 0.5], [0.2, 0.3, 0.5], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    loss, grad = ref.softmax_cross_entropy(x, y, return_grad=True)
    r = np.array([1.0, 2.0])
    assert_close(loss[0], -(0.5 * np.log(np_softmax(r))).sum())
    assert grad[0, 1] == 0
    assert loss[1] == INF
    assert np.isnan(loss[2]) and np.isnan(loss[3]) and np.isnan(grad[2:4]).all()
    assert_close(loss[4], -(y[4] * np.log(np_softmax(x[4]))).sum())
    s = ref.score(x, np.array([0, 1, 0, 1, 2]))
    assert np.isfinite(s.entropy[:2]).all() and s.loss[1] == INF and s.target_logprob[1] == -INF
    for f in ("loss", "lse", "target_logprob", "entropy"):
        assert np.isnan(getattr(s, f)[2:4]).all(), f
    hv = ref.softmax_cross_entropy_hvp(x, np.ones_like(x))
    assert np.isnan(hv[2:4]).all() and np.isfinite(hv[[0, 1, 4]]).all() and hv[0, 1] == 0


def test_nonfinite_building_blocks_follow_torch_convention():
    x = np.array([[-INF, -INF], [INF, 1.0], [np.nan, 1.0], [-INF, 0.0]])
    assert_close(ref.logsumexp(x), [-INF, INF, np.nan, 0.0])
    assert_close(ref.log_softmax(x), [[np.nan, np.nan], [np.nan, np.nan], [np.nan, np.nan], [-INF, 0.0]])
    assert_close(ref.softmax(x), [[np.nan, np.nan], [np.nan, np.nan], [np.nan, np.nan], [0.0, 1.0]])
    torch = pytest.importorskip("torch")
    xt = torch.tensor(x)
    assert_close(ref.logsumexp(x), torch.logsumexp(xt, -1).numpy())
    assert_close(ref.log_softmax(x), torch.log_softmax(xt, -1).numpy())
    assert_close(ref.softmax(x), torch.softmax(xt, -1).numpy())


def test_softcap_makes_infinities_finite():
    # documented decision: softcap applies literally, c * tanh(-inf / c) = -c
    x = np.array([[0.0, -INF, INF]])
    loss, grad = ref.sparse_softmax_cross_entropy(x, np.array([0]), softcap=2.0, return_grad=True)
    z = np.array([0.0, -2.0, 2.0])
    assert_close(loss, [-np.log(np_softmax(z))[0]])
    assert_close(grad, [[np_softmax(z)[0] - 1, 0.0, 0.0]])


def test_smoothing_with_masked_class_is_inf():
    # documented decision (torch's value): smoothing puts ε/C on the masked class
    x = np.array([[1.0, -INF, 2.0]])
    loss, grad = ref.sparse_softmax_cross_entropy(x, np.array([0]), label_smoothing=0.3, return_grad=True)
    assert loss[0] == INF
    assert_close(grad[0, 1], -0.1)


# --------------------------------------------------------------------------
# empty batches, zero denominators
# --------------------------------------------------------------------------


def _all_losses(rng, shape):
    rows = _class_shape(shape, -1)
    labels = rng.integers(0, shape[-1], rows)
    probs = rng.uniform(0.1, 1, shape)
    soft = rng.uniform(0, 1, shape)
    x = rng.normal(size=shape)
    return {
        "sparse": (ref.sparse_softmax_cross_entropy, x, labels, SPARSE_ALL),
        "soft": (ref.softmax_cross_entropy, x, soft, {"label_smoothing": 0.1, "softcap": 2.0}),
        "sigmoid": (ref.sigmoid_cross_entropy, x, soft, {"pos_weight": 2.0, "label_smoothing": 0.1}),
        "binary": (ref.binary_cross_entropy, probs, soft, {"label_smoothing": 0.1}),
        "categorical": (ref.categorical_cross_entropy, probs, soft, {"label_smoothing": 0.1}),
        "sparse_categorical": (ref.sparse_categorical_cross_entropy, probs, labels, {"ignore_index": -1}),
    }


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(reduction):
    rng = np.random.default_rng(11)
    for name, (fn, first, second, kw) in _all_losses(rng, (0, C)).items():
        loss, grad = fn(first, second, **kw, reduction=reduction, return_grad=True)
        assert grad.shape == (0, C), name
        if reduction == "none":
            assert loss.shape == ((0,) if fn is not ref.sigmoid_cross_entropy
                                  and fn is not ref.binary_cross_entropy else (0, C)), name
        else:
            assert isinstance(loss, np.ndarray) and loss.shape == () and loss == 0.0, name
    x = np.zeros((0, C))
    assert ref.log_softmax(x).shape == ref.softmax(x).shape == (0, C)
    assert ref.logsumexp(x).shape == (0,)
    assert ref.softmax_cross_entropy_hvp(x, x).shape == (0, C)
    assert ref.sigmoid_cross_entropy_hessian_diag(x, x).shape == (0, C)
    s = ref.score(x, np.zeros(0, np.int64))
    assert all(f.shape == (0,) for f in s)


def test_zero_denominator_mean_is_zero_with_zero_grad():
    rng = np.random.default_rng(12)
    x, _ = _sparse(rng)
    ignored = np.full(N, -100)
    for fn, first in ((ref.sparse_softmax_cross_entropy, x),
                      (ref.sparse_categorical_cross_entropy, rng.uniform(0.1, 1, (N, C)))):
        loss, grad = fn(first, ignored, ignore_index=-100, reduction="mean", return_grad=True)
        assert loss == 0.0 and not np.isnan(loss) and (grad == 0).all()
    # class weights summing to 0 over the counted rows, smoothing making the numerator nonzero
    labels = np.full(N, 3)  # W[3] == 0
    loss, grad = ref.sparse_softmax_cross_entropy(x, labels, class_weight=W, label_smoothing=0.2,
                                                  reduction="mean", return_grad=True)
    assert loss == 0.0 and (grad == 0).all()
    assert ref.sparse_softmax_cross_entropy(x, labels, class_weight=W, label_smoothing=0.2,
                                            reduction="sum") > 0


# --------------------------------------------------------------------------
# dtype rules
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_dtype_rules(dtype):
    rng = np.random.default_rng(13)
    dtype = np.dtype(dtype)
    loss_dtype = np.dtype(np.float32) if dtype.itemsize == 2 else dtype
    for name, (fn, first, second, kw) in _all_losses(rng, (N, C)).items():
        first = first.astype(dtype)
        if fn is not ref.sparse_softmax_cross_entropy and fn is not ref.sparse_categorical_cross_entropy:
            second = second.astype(dtype)  # 16-bit labels too
        for reduction in REDUCTIONS:
            loss, grad = fn(first, second, **kw, reduction=reduction, return_grad=True)
            assert isinstance(loss, np.ndarray) and loss.dtype == loss_dtype, (name, reduction)
            assert grad.dtype == dtype and grad.shape == first.shape, (name, reduction)
            assert np.isfinite(loss).all() and np.isfinite(grad.astype(np.float64)).all(), name
            if reduction != "none":
                assert loss.shape == ()
        # computed in float64 from the rounded inputs, then cast (no clip bound is hit here)
        exact = fn(first.astype(np.float64), second, **kw)
        assert_close(fn(first, second, **kw), exact.astype(loss_dtype), rtol=0, atol=0, what=name)
    x = rng.normal(size=(N, C)).astype(dtype)
    assert ref.log_softmax(x).dtype == ref.softmax(x).dtype == dtype
    assert ref.logsumexp(x).dtype == loss_dtype
    assert ref.softmax_cross_entropy_hvp(x, x).dtype == dtype
    assert ref.sigmoid_cross_entropy_hessian_diag(x, x, pos_weight=np.float16(2)).dtype == dtype
    s = ref.score(x, rng.integers(0, C, N))
    assert s.loss.dtype == s.lse.dtype == s.target_logprob.dtype == s.entropy.dtype == loss_dtype
    assert s.argmax.dtype == np.int64 and s.correct.dtype == bool


def test_bool_labels():
    x = np.array([[0.0, 0.0]])
    assert_close(ref.softmax_cross_entropy(x, np.array([[True, False]])), [np.log(2)])
    assert_close(ref.sigmoid_cross_entropy(x, np.array([[True, False]])), [[np.log(2)] * 2])


# --------------------------------------------------------------------------
# torch as an independent oracle
# --------------------------------------------------------------------------


def _torch_loss_and_grad(torch, fn_of_tensor, x, grad_output):
    xt = torch.tensor(x, requires_grad=True)
    loss = fn_of_tensor(xt)
    loss.backward(torch.ones_like(loss) if grad_output is None
                  else torch.tensor(np.broadcast_to(grad_output, loss.shape).copy()))
    return loss.detach().numpy(), xt.grad.numpy()


def _go(rng, reduction, shape):
    return np.asarray(0.7) if reduction != "none" else rng.normal(size=shape)


TORCH_SPARSE_OPTS = {
    "plain": {},
    "weight": {"class_weight": W},
    "ignore": {"ignore_index": -100},
    "smooth": {"label_smoothing": 0.15},
    "all": {"class_weight": W, "ignore_index": -100, "label_smoothing": 0.15},
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", list(TORCH_SPARSE_OPTS))
@pytest.mark.parametrize("shape", [(N, C), (3, C, 4)], ids=["2d", "axis1"])
def test_sparse_matches_torch(shape, opts, reduction):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(14)
    kw = TORCH_SPARSE_OPTS[opts]
    x, (labels,) = _sparse(rng, shape, 1, ignore=kw.get("ignore_index"))
    go = _go(rng, reduction, labels.shape)
    tkw = dict(weight=None if "class_weight" not in kw else torch.tensor(W),
               ignore_index=kw.get("ignore_index", -100),
               label_smoothing=kw.get("label_smoothing", 0.0), reduction=reduction)
    want = _torch_loss_and_grad(torch, lambda t: F.cross_entropy(t, torch.tensor(labels), **tkw), x, go)
    got = ref.sparse_softmax_cross_entropy(x, labels, axis=1, **kw, reduction=reduction,
                                           return_grad=True, grad_output=go)
    assert_close(got[0], want[0], what="loss")
    assert_close(got[1], want[1], what="grad")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sparse_zloss_softcap_matches_torch(reduction):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(15)
    x, (labels,) = _sparse(rng, ignore=-100)
    lab = torch.tensor(labels)
    kept = lab != -100
    w = torch.tensor(W)
    eps, lam, cap = 0.1, 0.01, 2.5

    def loss_fn(t):
        z = cap * torch.tanh(t / cap)
        rows = torch.nn.functional.cross_entropy(z, lab, weight=w, ignore_index=-100,
                                                 label_smoothing=eps, reduction="none")
        rows = rows + lam * torch.logsumexp(z, -1) ** 2 * kept
        if reduction == "none":
            return rows
        return rows.sum() if reduction == "sum" else rows.sum() / w[lab[kept]].sum()

    go = _go(rng, reduction, (N,))
    want = _torch_loss_and_grad(torch, loss_fn, x, go)
    got = ref.sparse_softmax_cross_entropy(x, labels, **SPARSE_ALL, reduction=reduction,
                                           return_grad=True, grad_output=go)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("shape", [(N, C), (3, C, 4)], ids=["2d", "axis1"])
def test_soft_matches_torch(shape, smoothing, reduction):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(16)
    x, (y,) = _soft(rng, shape)
    go = _go(rng, reduction, _class_shape(shape, 1))
    want = _torch_loss_and_grad(torch, lambda t: torch.nn.functional.cross_entropy(
        t, torch.tensor(y), label_smoothing=smoothing, reduction=reduction), x, go)
    got = ref.softmax_cross_entropy(x, y, axis=1, label_smoothing=smoothing, reduction=reduction,
                                    return_grad=True, grad_output=go)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("pos_weight", [None, 3.0, W + 0.1], ids=["none", "scalar", "per-class"])
def test_sigmoid_matches_torch(pos_weight, reduction):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(17)
    x, (z,) = _elementwise(rng)
    eps = 0.1
    zs = torch.tensor((1 - eps) * z + eps / 2)
    pw = None if pos_weight is None else torch.tensor(np.asarray(pos_weight, dtype=np.float64))
    go = _go(rng, reduction, (N, C))
    want = _torch_loss_and_grad(torch, lambda t: torch.nn.functional.binary_cross_entropy_with_logits(
        t, zs, pos_weight=pw, reduction=reduction), x, go)
    got = ref.sigmoid_cross_entropy(x, z, pos_weight=pos_weight, label_smoothing=eps,
                                    reduction=reduction, return_grad=True, grad_output=go)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_probability_families_match_torch_autograd(reduction):
    """torch autograd of Keras's clipped formulas (torch.clamp, inclusive bounds)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(18)
    lo, hi = 0.1, 0.9
    # binary, probabilities exactly on the bounds included
    p, (z,) = _binary_probs(rng)
    p.flat[:2] = [lo, hi]
    go = _go(rng, reduction, (N, C))
    zs = 0.8 * z + 0.1
    want = _torch_loss_and_grad(torch, lambda t: F.binary_cross_entropy(
        torch.clamp(t, lo, hi), torch.tensor(zs), reduction=reduction), p, go)
    got = ref.binary_cross_entropy(p, z, epsilon=0.1, label_smoothing=0.2, reduction=reduction,
                                   return_grad=True, grad_output=go)
    assert_close(got[0], want[0], what="binary loss")
    assert_close(got[1], want[1], what="binary grad")
    # categorical, along axis 1
    p3, (y3,) = _categorical(rng, (3, C, 4), 1, 0.1)
    ys = 0.9 * y3 + 0.1 / C
    go = _go(rng, reduction, (3, 4))

    def categorical(t):
        q = torch.clamp(t / t.sum(1, keepdim=True), lo, hi)
        rows = -(torch.tensor(ys) * torch.log(q)).sum(1)
        return rows if reduction == "none" else rows.sum() if reduction == "sum" else rows.mean()

    want = _torch_loss_and_grad(torch, categorical, p3, go)
    got = ref.categorical_cross_entropy(p3, y3, axis=1, epsilon=0.1, label_smoothing=0.1,
                                        reduction=reduction, return_grad=True, grad_output=go)
    assert_close(got[0], want[0], what="categorical loss")
    assert_close(got[1], want[1], what="categorical grad")
    # sparse categorical with ignored rows: nll_loss of the clipped log-probabilities
    p2, (labels,) = _sparse_categorical(rng, epsilon=0.1, ignore=-1)
    go = _go(rng, reduction, (N,))
    want = _torch_loss_and_grad(torch, lambda t: F.nll_loss(
        torch.log(torch.clamp(t / t.sum(1, keepdim=True), lo, hi)), torch.tensor(labels),
        ignore_index=-1, reduction=reduction), p2, go)
    got = ref.sparse_categorical_cross_entropy(p2, labels, epsilon=0.1, ignore_index=-1,
                                               reduction=reduction, return_grad=True, grad_output=go)
    assert_close(got[0], want[0], what="sparse categorical loss")
    assert_close(got[1], want[1], what="sparse categorical grad")


def test_nonfinite_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.array([[1.0, -INF, 2.0], [1.0, -INF, 2.0], [-INF, -INF, -INF], [np.nan, 0.0, 1.0]])
    labels = np.array([0, 1, 0, 0])
    for eps in (0.0, 0.3):
        want = _torch_loss_and_grad(torch, lambda t: torch.nn.functional.cross_entropy(
            t, torch.tensor(labels), label_smoothing=eps, reduction="none"), x, None)
        got = ref.sparse_softmax_cross_entropy(x, labels, label_smoothing=eps, return_grad=True)
        assert_close(got[0], want[0], what=f"loss eps={eps}")
        assert_close(got[1][:2], want[1][:2], what=f"grad eps={eps}")


def test_score_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(19)
    x, (labels,) = _sparse(rng)
    xt = torch.tensor(x)
    s = ref.score(x, labels)
    assert_close(s.lse, torch.logsumexp(xt, -1).numpy())
    assert_close(s.entropy, torch.distributions.Categorical(logits=xt).entropy().numpy())
    assert_close(s.loss, torch.nn.functional.cross_entropy(xt, torch.tensor(labels), reduction="none").numpy())


# --------------------------------------------------------------------------
# the linear composition (fastxent.linear's oracle)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_grads_match_finite_differences(reduction):
    """d/d hidden, weight, bias of sum(grad_output * loss), every option on, by central differences."""
    rng = np.random.default_rng(11)
    hidden, weight, bias = rng.standard_normal((4, 3)), rng.standard_normal((C, 3)), rng.standard_normal(C)
    labels = np.array([2, -100, 0, 6])
    options = dict(ignore_index=-100, class_weight=rng.uniform(0.5, 2.0, C), label_smoothing=0.1, z_loss=0.01,
                   softcap=3.0, reduction=reduction)
    go = rng.standard_normal(4) if reduction == "none" else np.float64(0.7)

    def objective(h, w, b):
        return float(np.sum(go * ref.linear_cross_entropy(h, w, labels, b, **options)))

    _, grad = ref.linear_cross_entropy(hidden, weight, labels, bias, return_grad=True, grad_output=go, **options)
    assert_close(grad.hidden, fd_grad(lambda h: objective(h, weight, bias), hidden), rtol=1e-6, atol=1e-8,
                 what="d/d hidden")
    assert_close(grad.weight, fd_grad(lambda w: objective(hidden, w, bias), weight), rtol=1e-6, atol=1e-8,
                 what="d/d weight")
    assert_close(grad.bias, fd_grad(lambda b: objective(hidden, weight, b), bias), rtol=1e-6, atol=1e-8,
                 what="d/d bias")
    assert np.all(grad.hidden[1] == 0) and np.any(grad.weight != 0)
