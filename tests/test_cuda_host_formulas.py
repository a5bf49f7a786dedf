"""The formulas of fx_formulas.cuh, compiled for the host, against the reference.

The device-function layer (online statistics and their merges, the losses, the
gradients, the bfloat16 rounding) is plain arithmetic: with a small shim
(tests/cuda_host/shim.h) it compiles as C++ for the CPU. The harness
(tests/cuda_host/formulas_harness.cpp) splits each row among lanes exactly as the
kernels do and calls the same device functions; the results are compared with
fastxent.reference on adversarial rows. The kernels' loops and launches run on the
emulated (or a real) device in test_cupy.py.
"""

import ctypes

import numpy as np
import pytest

from tests.support import BF16, build_host_library


@pytest.fixture(scope="module")
def formulas(tmp_path_factory):
    return build_host_library(tmp_path_factory, "formulas_harness.cpp")

def _dptr(array):
    if array is None:
        return None
    return np.ascontiguousarray(array, dtype=np.float64).ctypes.data_as(ctypes.POINTER(ctypes.c_double))


def _adversarial_rows(num_classes, rng):
    c = num_classes
    x = rng.standard_normal((9, c)) * 3
    x[1] = np.linspace(-1e4, 1e4, c)
    x[2, ::3] = -np.inf
    x[3, c // 2] = np.nan
    x[4] = -np.inf
    x[5, c - 1] = np.inf
    x[6] = 0.0
    x[7, 1] = -np.inf
    x[8] = 1e4 + rng.standard_normal(c)
    labels = np.array([0, c - 1, 1, 0, 0, 0, 2 % c, 1, 0])
    return x, labels


def _close(got, expected, what, rtol, atol):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    ok = np.isclose(got, expected, rtol=rtol, atol=atol, equal_nan=True) | (got == expected)
    where = np.argwhere(~ok)[:4]
    assert ok.all(), f"{what}: {np.count_nonzero(~ok)} differ, e.g. " + ", ".join(
        f"{tuple(int(k) for k in i)}: {got[tuple(i)]!r} vs {expected[tuple(i)]!r}" for i in where)


HOST_ACC = {"float": (np.float32, (3e-5, 3e-5)), "double": (np.float64, (1e-9, 1e-9))}


@pytest.mark.parametrize("acc", list(HOST_ACC))
@pytest.mark.parametrize("num_classes", [3, 5, 423, 4099])
def test_formulas_match_the_reference(formulas, acc, num_classes):
    from fastxent import reference as ref

    np_type, (rtol, atol) = HOST_ACC[acc]
    suffix = acc[0]
    rng = np.random.default_rng(num_classes)
    x, labels = _adversarial_rows(num_classes, rng)
    x = x.astype(np_type).astype(np.float64)
    scale = np.maximum(np.where(np.isfinite(x), np.abs(x), 0).max(axis=1), 1)
    weights = rng.uniform(0.0, 2.0, num_classes)
    weights[1] = 0.0
    y = rng.random(x.shape)
    y[2, ::3] = 0
    y[rng.random(y.shape) < 0.3] = 0
    y = y.astype(np_type).astype(np.float64)
    d = ctypes.c_double
    for width in (1, 8, 32, 256):
        for splits in (1, 3) if num_classes > 100 else (1,):
            for opt in ({}, {"eps": 0.1}, {"zl": 1e-3}, {"cap": 4.0}, {"w": weights, "eps": 0.2},
                        {"eps": 1.0, "w": weights, "zl": 1e-4, "cap": 30.0}):
                for i in range(x.shape[0]):
                    loss, grad = d(), np.zeros(num_classes)
                    getattr(formulas, f"sparse_row_{suffix}")(
                        _dptr(x[i]), num_classes, int(labels[i]), d(opt.get("eps", 0.0)), d(opt.get("zl", 0.0)),
                        d(opt.get("cap", 0.0)), _dptr(opt.get("w")), width, ctypes.byref(loss),
                        grad.ctypes.data_as(ctypes.POINTER(d)), splits)
                    want_loss, want_grad = ref.sparse_softmax_cross_entropy(
                        x[i:i + 1], labels[i:i + 1], class_weight=opt.get("w"), label_smoothing=opt.get("eps", 0.0),
                        z_loss=opt.get("zl", 0.0), softcap=opt.get("cap"), return_grad=True)
                    what = f"sparse {acc} C={num_classes} width={width} splits={splits} {sorted(opt)} row {i}"
                    _close(loss.value, want_loss[0], what, rtol, atol * scale[i])
                    _close(grad, want_grad[0], what + " grad", rtol, atol * scale[i])
        for opt in ({}, {"eps": 0.1}, {"cap": 5.0}):
            for i in range(x.shape[0]):
                loss, grad = d(), np.zeros(num_classes)
                getattr(formulas, f"soft_row_{suffix}")(
                    _dptr(x[i]), _dptr(y[i]), num_classes, d(opt.get("eps", 0.0)), d(opt.get("cap", 0.0)), width,
                    ctypes.byref(loss), grad.ctypes.data_as(ctypes.POINTER(d)))
                want_loss, want_grad = ref.softmax_cross_entropy(x[i:i + 1], y[i:i + 1], label_smoothing=opt.get(
                    "eps", 0.0), softcap=opt.get("cap"), return_grad=True)
                what = f"soft {acc} C={num_classes} width={width} {opt} row {i}"
                _close(loss.value, want_loss[0], what, rtol, atol * scale[i])
                _close(grad, want_grad[0], what + " grad", rtol, atol * scale[i])
        for i in range(x.shape[0]):
            lse_torch, lse_rows, log_sm = d(), d(), np.zeros(num_classes)
            getattr(formulas, f"lse_rows_{suffix}")(_dptr(x[i]), num_classes, width, ctypes.byref(lse_torch),
                                                    ctypes.byref(lse_rows), log_sm.ctypes.data_as(ctypes.POINTER(d)))
            what = f"{acc} C={num_classes} width={width} row {i}"
            _close(lse_torch.value, ref.logsumexp(x[i]), "logsumexp " + what, rtol, atol * scale[i])
            _close(log_sm, ref.log_softmax(x[i]), "log_softmax " + what, rtol, atol * scale[i])
            out = np.zeros(5)
            getattr(formulas, f"score_row_{suffix}")(_dptr(x[i]), num_classes, int(labels[i]), width,
                                                     out.ctypes.data_as(ctypes.POINTER(d)))
            want = ref.score(x[i:i + 1], labels[i:i + 1])
            _close(out[:4], [want.loss[0], want.lse[0], want.target_logprob[0], want.entropy[0]], "score " + what,
                   rtol, atol * scale[i])
            assert out[4] == want.argmax[0], f"argmax {what}: {out[4]} vs {want.argmax[0]}"
            v = rng.standard_normal(num_classes).astype(np_type).astype(np.float64)
            hv = np.zeros(num_classes)
            getattr(formulas, f"hvp_row_{suffix}")(_dptr(x[i]), _dptr(v), num_classes, width,
                                                   hv.ctypes.data_as(ctypes.POINTER(d)))
            _close(hv, ref.softmax_cross_entropy_hvp(x[i], v), "hvp " + what, rtol, atol * 3)
        p = rng.random((4, num_classes)) ** 3
        p[0, ::5] = 0
        p[1] = 0
        p[2, 0] = 1e3
        p = p.astype(np_type)
        target = rng.random((4, num_classes))
        target[rng.random(target.shape) < 0.3] = 0
        target = target.astype(np_type)
        prtol = 1e-4 if acc == "float" else 1e-9
        for epsilon in (1e-7, 1e-3):
            lo, hi = float(np.asarray(epsilon).astype(np_type)), float(np.asarray(1 - epsilon).astype(np_type))
            for smoothing in (0.0, 0.1):
                for i in range(4):
                    loss, grad = d(), np.zeros(num_classes)
                    getattr(formulas, f"categorical_row_{suffix}")(
                        _dptr(p[i]), _dptr(target[i]), num_classes, d(lo), d(hi), d(smoothing), width,
                        ctypes.byref(loss), grad.ctypes.data_as(ctypes.POINTER(d)))
                    want_loss, want_grad = ref.categorical_cross_entropy(
                        p[i:i + 1], target[i:i + 1], epsilon=epsilon, label_smoothing=smoothing, return_grad=True)
                    what = f"categorical {acc} C={num_classes} width={width} eps={epsilon} ls={smoothing} row {i}"
                    _close(loss.value, want_loss[0], what, prtol, prtol)
                    _close(grad, want_grad[0], what + " grad", prtol, prtol)


@pytest.mark.parametrize("acc", list(HOST_ACC))
def test_elementwise_formulas_match_the_reference(formulas, acc):
    from fastxent import reference as ref

    np_type, (rtol, atol) = HOST_ACC[acc]
    rng = np.random.default_rng(3)
    n = 64
    x = rng.standard_normal(n) * 5
    x[:6] = [np.inf, -np.inf, np.nan, 1e4, -1e4, 0]
    z = rng.random(n)
    z[:6] = [1, 0, 1, 0, 1, 0.5]
    z = z.astype(np_type)
    q = rng.uniform(0.5, 3, n).astype(np_type)
    p = rng.random(n)
    p[:4] = [0, 1, 1e-9, 1 - 1e-9]
    x, p = x.astype(np_type), p.astype(np_type)
    d = ctypes.c_double
    prtol = 1e-4 if acc == "float" else 1e-9
    for smoothing in (0.0, 0.1):
        for epsilon in (1e-7, 1e-3):
            lo, hi = float(np.asarray(epsilon).astype(np_type)), float(np.asarray(1 - epsilon).astype(np_type))
            out = np.zeros(5 * n)
            call = getattr(formulas, f"elementwise_{acc[0]}")
            call(_dptr(x), _dptr(z), _dptr(q), n, d(smoothing), d(lo), d(hi), out.ctypes.data_as(ctypes.POINTER(d)))
            want_loss, want_grad = ref.sigmoid_cross_entropy(x, z, pos_weight=q.astype(np.float64),
                                                             label_smoothing=smoothing, return_grad=True)
            _close(out[:n], want_loss, f"sigmoid {acc} ls={smoothing}", rtol, atol * 1e4)
            _close(out[n:2 * n], want_grad, f"sigmoid grad {acc} ls={smoothing}", rtol, atol)
            _close(out[2 * n:3 * n], ref.sigmoid_cross_entropy_hessian_diag(x, z, pos_weight=q.astype(np.float64)),
                   f"hessian {acc}", rtol, atol)
            call(_dptr(p), _dptr(z), _dptr(q), n, d(smoothing), d(lo), d(hi), out.ctypes.data_as(ctypes.POINTER(d)))
            want_loss, want_grad = ref.binary_cross_entropy(p, z, epsilon=epsilon, label_smoothing=smoothing,
                                                            return_grad=True)
            _close(out[3 * n:4 * n], want_loss, f"binary {acc} ls={smoothing} eps={epsilon}", rtol, atol)
            _close(out[4 * n:], want_grad, f"binary grad {acc} ls={smoothing} eps={epsilon}", prtol, prtol)


def test_bfloat16_rounding_matches_ml_dtypes(formulas):
    formulas.bf16_round.restype = ctypes.c_ushort
    formulas.bf16_round.argtypes = [ctypes.c_float]
    rng = np.random.default_rng(4)
    values = np.concatenate([rng.standard_normal(20000).astype(np.float32) * 10,
                             np.array([np.inf, -np.inf, 3.3895314e38, 3.4e38, -0.0, 1e-40, 1.00390625, 1.01171875],
                                      np.float32)])
    got = np.array([formulas.bf16_round(float(v)) for v in values], dtype=np.uint16)
    want = values.astype(BF16).view(np.uint16)
    assert (got == want).all(), values[got != want][:5]
    nan_bits = formulas.bf16_round(float("nan"))
    assert (nan_bits & 0x7F80) == 0x7F80 and (nan_bits & 0x7F) != 0


@pytest.mark.parametrize("acc", list(HOST_ACC))
@pytest.mark.parametrize("num_classes", [2, 5, 423])
def test_sparse_categorical_formulas_match_the_reference(formulas, acc, num_classes):
    """Including rows holding inf or NaN: the reference's sum_j g_j p_j meets 0 * inf on a
    class whose g_j is 0, so the whole gradient row is NaN (the dense kernel and the CPU
    backend agree); a kernel that forms only g_y p_y would give finite gradients there."""
    from fastxent import reference as ref

    np_type, _ = HOST_ACC[acc]
    rng = np.random.default_rng(num_classes + 40)
    c = num_classes
    p = rng.random((8, c)) ** 3
    p[1] = 0.0                       # 0 / 0: NaN
    p[2, c - 1] = np.inf             # inf elsewhere than the label: NaN gradient, finite loss
    p[3, 0] = np.inf                 # inf at the label
    p[4, 1] = np.nan
    p[5, 1] = 1e-30                  # clipped from below
    p[6] = 0.0
    p[6, 0] = 1.0                    # one-hot at the label: clipped from above
    p[7, 1] = -np.inf
    p = p.astype(np_type)
    labels = np.array([0, 0, 0, 0, 0, 1, 0, 0])
    d = ctypes.c_double
    prtol = 1e-4 if acc == "float" else 1e-9
    for epsilon in (1e-7, 1e-3):
        lo, hi = float(np.asarray(epsilon).astype(np_type)), float(np.asarray(1 - epsilon).astype(np_type))
        for width in (1, 8, 32):
            for i in range(p.shape[0]):
                loss, grad = d(), np.zeros(c)
                getattr(formulas, f"sparse_categorical_row_{acc[0]}")(
                    _dptr(p[i]), c, int(labels[i]), d(lo), d(hi), width, ctypes.byref(loss),
                    grad.ctypes.data_as(ctypes.POINTER(d)))
                want_loss, want_grad = ref.sparse_categorical_cross_entropy(p[i:i + 1], labels[i:i + 1],
                                                                            epsilon=epsilon, return_grad=True)
                what = f"sparse categorical {acc} C={c} width={width} eps={epsilon} row {i}"
                _close(loss.value, want_loss[0], what, prtol, prtol)
                _close(grad, want_grad[0], what + " grad", prtol, prtol)


def test_split_path_structs_match_the_host_buffers(formulas):
    """The split path keeps SparseStats and LogNorm in global memory, allocated on the host as
    SPARSE_STATS_WORDS and LOG_NORM_WORDS accumulation-type words: a struct that grows without
    them would be written past its buffer."""
    from fastxent.backends import cuda

    for suffix, size in (("f", 4), ("d", 8)):
        for name, words in (("sparse_stats", cuda.SPARSE_STATS_WORDS), ("log_norm", cuda.LOG_NORM_WORDS)):
            getattr(formulas, f"{name}_bytes_{suffix}").restype = ctypes.c_long
            assert getattr(formulas, f"{name}_bytes_{suffix}")() == words * size, f"{name} {suffix}"


def _far_rows(np_type):
    """Rows reaching the float range: a masking score far below the max in the first class (the
    -1e9 a model puts on a padding class, or -max), scores of both signs beyond half the maximum,
    ties at the maximum. float64 stays within ±max/2, where the reference's x - max is finite."""
    big = float(np.finfo(np_type).max) / (2.0 if np_type is np.float64 else 1.0)
    rows = [[-1e9, 5, 3, 1, 0], [-1e4, 5, 3, 1, 0], [-big, 5, 3, 1, 0], [-big, big, 3, 1, 0],
            [big, big, big, 0.5, -big], [big / 2, -big / 2, 0, big / 4, -big], [3e19] * 5, [-big] * 5]
    return np.array(rows, dtype=np_type).astype(np.float64)


@pytest.mark.parametrize("acc", list(HOST_ACC))
def test_formulas_on_scores_near_the_float_range(formulas, acc):
    """Against the reference of each row shifted by its max (tests.support.expected): the
    gaps are kept relative to the running max, halved, so a first class at -1e9 no longer
    cancels the loss (0 for 0.127 in float32), and -max next to +max gives no 0 * inf."""
    from tests.support import expected

    np_type, (rtol, atol) = HOST_ACC[acc]
    suffix = acc[0]
    x = _far_rows(np_type)
    c = x.shape[1]
    d = ctypes.c_double
    weights = np.array([0.0, 1.0, 0.25, 2.0, 1.0])
    y = np.array([0.0, 0.7, 0.0, 0.3, 0.0])
    typed = x.astype(np_type)
    for width in (1, 2, 4):
        for i in range(x.shape[0]):
            row = typed[i:i + 1]
            what = f"{acc} width={width} row {x[i].tolist()}"
            for label in range(c):
                for splits in (1, 2):
                    for opt in ({}, {"eps": 0.1}, {"eps": 1.0}, {"w": weights}, {"w": weights, "eps": 0.2},
                                {"zl": 1e-3}):
                        loss, grad = d(), np.zeros(c)
                        getattr(formulas, f"sparse_row_{suffix}")(
                            _dptr(x[i]), c, label, d(opt.get("eps", 0.0)), d(opt.get("zl", 0.0)), d(0.0),
                            _dptr(opt.get("w")), width, ctypes.byref(loss), grad.ctypes.data_as(ctypes.POINTER(d)),
                            splits)
                        want_loss, want_grad = expected(
                            "sparse_softmax_cross_entropy", row, np.array([label]), class_weight=opt.get("w"),
                            label_smoothing=opt.get("eps", 0.0), z_loss=opt.get("zl", 0.0), return_grad=True)
                        where = f"sparse {what} label {label} splits={splits} {sorted(opt)}"
                        _close(loss.value, want_loss[0], where, rtol, atol)
                        _close(grad, want_grad[0], where + " grad", rtol, atol)
            for eps in (0.0, 0.1):
                loss, grad = d(), np.zeros(c)
                getattr(formulas, f"soft_row_{suffix}")(_dptr(x[i]), _dptr(y), c, d(eps), d(0.0), width,
                                                        ctypes.byref(loss), grad.ctypes.data_as(ctypes.POINTER(d)))
                want_loss, want_grad = expected("softmax_cross_entropy", row, y[None].astype(np_type),
                                                label_smoothing=eps, return_grad=True)
                _close(loss.value, want_loss[0], f"soft {what} eps={eps}", rtol, atol)
                _close(grad, want_grad[0], f"soft {what} eps={eps} grad", rtol, atol)
            out = np.zeros(5)
            getattr(formulas, f"score_row_{suffix}")(_dptr(x[i]), c, 1, width, out.ctypes.data_as(ctypes.POINTER(d)))
            want = expected("score", row, np.array([1]))
            _close(out[:4], [want.loss[0], want.lse[0], want.target_logprob[0], want.entropy[0]], "score " + what,
                   rtol, atol)
            assert out[4] == want.argmax[0], f"argmax {what}"
            lse_torch, lse_rows, log_sm = d(), d(), np.zeros(c)
            getattr(formulas, f"lse_rows_{suffix}")(_dptr(x[i]), c, width, ctypes.byref(lse_torch),
                                                    ctypes.byref(lse_rows), log_sm.ctypes.data_as(ctypes.POINTER(d)))
            _close(lse_torch.value, expected("logsumexp", row)[0], "logsumexp " + what, rtol, atol)
            _close(log_sm, expected("log_softmax", row)[0], "log_softmax " + what, rtol, atol)
            v = np.linspace(-1.0, 1.0, c)
            hv = np.zeros(c)
            getattr(formulas, f"hvp_row_{suffix}")(_dptr(x[i]), _dptr(v), c, width, hv.ctypes.data_as(ctypes.POINTER(d)))
            _close(hv, expected("softmax_cross_entropy_hvp", row, v[None].astype(np_type))[0], "hvp " + what, rtol,
                   atol)


@pytest.mark.parametrize("acc", list(HOST_ACC))
def test_categorical_gradients_of_huge_and_tiny_probability_sums(formulas, acc):
    """(g - sum_j g_j q_j) / s, not g / s - sum_j g_j p_j / s**2: s**2 overflows float32 for a
    row sum beyond 1.8e19 (the second term was lost: half the gradient) and is subnormal below
    1e-19. Gradients scale as 1/s, so they are compared times s, relative to their size."""
    from fastxent import reference as ref

    np_type, _ = HOST_ACC[acc]
    rtol = 1e-5 if acc == "float" else 1e-12
    big = float(np.finfo(np_type).max)
    d = ctypes.c_double
    target = np.array([1.0, 0.0, 0.5, 0.25])
    for p in ([1e20, 1e20, 3e20, 1e19], [big / 8, big / 4, big / 16, big / 8], [1e-20, 3e-20, 2e-20, 1e-20],
              [2.0, 1.0, 1.0, 4.0]):
        p = np.array(p, np_type)
        s = float(p.astype(np.float64).sum())
        for width in (1, 2):
            loss, grad = d(), np.zeros(4)
            getattr(formulas, f"categorical_row_{acc[0]}")(
                _dptr(p), _dptr(target), 4, d(1e-7), d(float(np_type(1 - 1e-7))), d(0.1), width, ctypes.byref(loss),
                grad.ctypes.data_as(ctypes.POINTER(d)))
            want_loss, want_grad = ref.categorical_cross_entropy(p[None], target[None].astype(np_type),
                                                                 label_smoothing=0.1, return_grad=True)
            what = f"categorical {acc} p={p.tolist()} width={width}"
            _close(loss.value, want_loss[0], what, rtol, 0)
            _close(grad * s, want_grad[0].astype(np.float64) * s, what + " grad * s", rtol, 1e-6)
            label_loss, label_grad = d(), np.zeros(4)
            getattr(formulas, f"sparse_categorical_row_{acc[0]}")(
                _dptr(p), 4, 2, d(1e-7), d(float(np_type(1 - 1e-7))), width, ctypes.byref(label_loss),
                label_grad.ctypes.data_as(ctypes.POINTER(d)))
            want_loss, want_grad = ref.sparse_categorical_cross_entropy(p[None], np.array([2]), return_grad=True)
            _close(label_loss.value, want_loss[0], "sparse " + what, rtol, 0)
            _close(label_grad * s, want_grad[0].astype(np.float64) * s, "sparse " + what + " grad * s", rtol, 1e-6)
