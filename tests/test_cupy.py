"""The CuPy CUDA backend against the float64 reference: every function, option, dtype.

Function x dtype (float16, bfloat16, float32, float64) x shape x option, forward and
fused forward+backward, compared with ``fastxent.reference`` through the shared
tolerance table (``tests/support.py``). Shapes cover every launch path: N = 0 and 1,
C = 2 and 3 (8 threads per row), 423 (a warp per row), 50257 (a block per row, odd C;
the split-row path for the sparse loss, with fewer rows than SMs), 4 x 262144 (the
split-row path); the tunables are also patched down so small inputs take each path
(stumpy's habit), grid-stride loops included. Adversarial rows (-inf masks, +-1e4, NaN,
+inf, all -inf, ties), axis=1 on (N, C, d), non-contiguous and misaligned inputs, bad
labels, host/device mixing, torch CUDA tensors through DLPack and the inplace mode.

Where CuPy sees no GPU, the module runs on the emulated device of ``tests/emu`` (the
kernels of ``kernels/`` compiled for the host, every thread a fiber, every memory access
checked): the large shapes shrink with the split-row threshold (VOCAB, HUGE below), so
each case keeps its launch path, and the few cases that only make sense on a GPU skip
with the reason (``gpu_only``). Without a GPU and without g++, the module skips.
"""

import contextlib

import numpy as np
import pytest

from fastxent import _config  # noqa: E402  (the tunables the tests patch)
from fastxent.backends import cuda as cupy_cuda  # noqa: E402  (the backend under test)
from fastxent.backends.cuda import _plans  # noqa: E402
from tests import emu, support

#: No GPU here: CuPy is the stand-in of tests/emu and the kernels run on the emulated device.
EMULATED = emu.real_device_reason() is not None
if EMULATED:
    if emu.unavailable_reason() is not None:
        pytest.skip(f"{emu.real_device_reason()}, and the emulated device cannot run here either: "
                    f"{emu.unavailable_reason()}", allow_module_level=True)
    cupy = emu.fake_cupy.module
else:
    import cupy

import fastxent as fx  # noqa: E402
from fastxent import _dispatch, _validate  # noqa: E402
from fastxent import reference as ref  # noqa: E402
from tests.support import (  # noqa: E402
    BF16,
    SPARSE_OPTIONS,
    DTYPE_IDS,
    FLOAT_DTYPES,
    assert_close,
    assert_same_dtype,
    make_class_ids,
    make_distribution,
    make_logits,
    sparse_options,
    tolerance,
)

pytestmark = pytest.mark.emulated if EMULATED else pytest.mark.gpu


def gpu_only(reason):
    """Skips a case on the emulated device, with the reason."""
    return pytest.mark.skipif(EMULATED, reason=f"real GPU only: {reason}")


def _bfloat16_reason():
    try:
        cupy.asarray(np.zeros(4, dtype=BF16)).view(np.uint16)
    except Exception as exc:  # noqa: BLE001
        return f"CuPy {cupy.__version__} cannot hold ml_dtypes.bfloat16 arrays ({type(exc).__name__}: {exc})"
    return None


BF16_REASON = _bfloat16_reason()

# A shape is here for the launch path it takes. The emulated device (16 SMs,
# tests/emu/fake_cupy.py) runs about a million scores a second through a fused kernel
# (3 x 50257: 0.14 s), so there the large shapes shrink about twelvefold and the split-row
# threshold with them: few rows of VOCAB classes take the split path on both devices,
# and PATHS' shapes (C < 4096) never do.
#: Classes of a large vocabulary row: GPT-2's 50257 (odd) on a GPU, 4099 (odd) emulated.
VOCAB = 4099 if EMULATED else 50257
#: Classes of the split-row cases: 2**18 on a GPU, 2**14 emulated.
HUGE = 2**14 if EMULATED else 2**18
#: Split-row tunables scaled with the shapes (cupy_cuda: 16384 and 4096 on a GPU).
SCALED_TUNABLES = {"SPLIT_MIN_CLASSES": 4096, "SPLIT_MIN_CHUNK": 1024} if EMULATED else {}


@pytest.fixture(scope="module", autouse=True)
def device():
    """The emulated device stands in for CuPy while this module runs (nothing to do on a GPU)."""
    with emu.emulated_cupy() if EMULATED else contextlib.nullcontext():
        yield


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels(device):
    """Compile every instantiation once, in parallel, before the first test (the emulated
    device's RawModules compile when asked to, or at their first launch)."""
    cupy_cuda.precompile()
    if EMULATED:
        cupy.build_all()


@pytest.fixture(autouse=True)
def scaled_tunables(monkeypatch):
    for name, value in SCALED_TUNABLES.items():
        monkeypatch.setattr(_config, "CUDA_" + name, value)


@pytest.fixture(autouse=True)
def label_checks_on(monkeypatch):
    monkeypatch.delenv(_config.CUDA_SKIP_LABEL_CHECK_ENV, raising=False)
    monkeypatch.setattr(_config, "CUDA_CHECK_LABELS", True)


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

def dev(host):
    """A device copy of a host array (bfloat16 through ml_dtypes)."""
    host = np.asarray(host)
    if host.dtype == BF16 and BF16_REASON:
        pytest.skip(BF16_REASON)
    return cupy.asarray(host)


def to_host(value):
    if isinstance(value, tuple):
        return type(value)(*(to_host(v) for v in value)) if hasattr(value, "_fields") else tuple(
            to_host(v) for v in value)
    if isinstance(value, cupy.ndarray):
        return value.get()
    return value


def compare(got, expected, dtype, what, atol_scale=1.0, grad_atol_scale=None):
    """``tests.support.compare`` of a device result, brought to the host."""
    support.compare(to_host(got), expected, dtype, what, atol_scale, grad_atol_scale)


def row_scale(logits, axis=-1):
    """Per-row magnitude of the finite scores (at least 1): atol scales with it, since an
    lse of 1e4 carries an absolute error of ~1e-3 in float32."""
    x = np.moveaxis(np.asarray(logits).astype(np.float64), axis, -1)
    finite = np.where(np.isfinite(x), np.abs(x), 0.0)
    return np.maximum(finite.max(axis=-1, initial=0.0), 1.0)


SHAPES = [(0, 5), (1, 2), (37, 3), (9, 423), (3, VOCAB)]
SHAPE_IDS = [f"{n}x{c}" for n, c in SHAPES]



def check_sparse(logits, labels, options, dtype, what, reductions=("none", "sum", "mean"), **call):
    d_logits, d_labels = dev(logits), dev(labels)
    for reduction in reductions:
        expected = ref.sparse_softmax_cross_entropy(logits, labels, reduction=reduction, return_grad=True,
                                                    **options, **call)
        got = fx.sparse_softmax_cross_entropy(d_logits, d_labels, reduction=reduction, return_grad=True,
                                              **options, **call)
        scale = row_scale(logits, call.get("axis", -1)) if reduction == "none" else row_scale(logits).max(initial=1)
        compare(got[0], expected[0], dtype, f"{what} {reduction} loss", scale)
        got_grad = to_host(got[1])
        assert_same_dtype(got_grad, expected[1], f"{what} {reduction} grad")
        rtol, atol = tolerance(dtype, "stored")
        assert_close(got_grad, expected[1], dtype, "stored", f"{what} {reduction} grad",
                     tol=(rtol, atol * row_scale(logits).max(initial=1)))
        forward = fx.sparse_softmax_cross_entropy(d_logits, d_labels, reduction=reduction, **options, **call)
        compare(forward, expected[0], dtype, f"{what} {reduction} forward-only", scale)


# ----------------------------------------------------------------------------
# softmax family
# ----------------------------------------------------------------------------

def test_cupy_backend_is_available():
    assert "cupy" in fx.available_backends()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("option", list(SPARSE_OPTIONS))
def test_sparse_matches_reference(dtype, shape, option):
    logits = make_logits(shape, dtype)
    options = sparse_options(option, shape[1])
    labels = make_class_ids(shape[:1], shape[1], ignore_index=options.get("ignore_index"), ignore_fraction=0.3)
    check_sparse(logits, labels, options, dtype, f"sparse {option} {shape}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("option", ["plain", "all"])
def test_sparse_split_path(dtype, option):
    shape = (4, HUGE)
    info = _plans.device_info(cupy.cuda.Device().id)
    assert cupy_cuda.split_plan(*shape, info) is not None, f"{shape} should take the split-row path"
    logits = make_logits(shape, dtype, seed=11)
    options = sparse_options(option, shape[1])
    labels = make_class_ids(shape[:1], shape[1], seed=12)
    if option == "all":
        labels[1] = -100
    check_sparse(logits, labels, options, dtype, f"split {option}", reductions=("none", "mean"))


PATHS = {
    # name: tunables that send (small) inputs down one launch path
    "block": {"WARP_MAX_CLASSES": 0},
    "warp": {"WARP_MAX_CLASSES": 10**9, "GROUP8_MAX_CLASSES": 0},
    "eight": {"WARP_MAX_CLASSES": 10**9, "GROUP8_MAX_CLASSES": 10**9},
    "split": {"SPLIT_MIN_CLASSES": 64, "SPLIT_MIN_CHUNK": 96, "SPLIT_CHUNK_ALIGN": 32},
    "tiny-blocks": {"WARP_MAX_CLASSES": 0, "ROW_BLOCK_MIN_THREADS": 32, "ROW_BLOCK_MAX_THREADS": 64},
    # grid-stride loops: one block (of one warp for the group kernels) takes every row,
    # so a block's shared buffer and a group's lanes serve several rows in turn
    "stride": {"MAX_GRID": 1, "GROUP_BLOCK_THREADS": 32},
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BF16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(5, 3), (6, 423), (3, 3001)], ids=["5x3", "6x423", "3x3001"])
def test_every_launch_path(monkeypatch, path, dtype, shape):
    for name, value in PATHS[path].items():
        monkeypatch.setattr(_config, "CUDA_" + name, value)
    logits = make_logits(shape, dtype, seed=21)
    labels = make_class_ids(shape[:1], shape[1], seed=22, ignore_index=-100, ignore_fraction=0.2)
    options = sparse_options("all", shape[1])
    check_sparse(logits, labels, options, dtype, f"{path} sparse", reductions=("none",))
    soft = make_distribution(shape, dtype=np.float32, seed=23)
    expected = ref.softmax_cross_entropy(logits, soft, label_smoothing=0.1, softcap=5.0, return_grad=True)
    got = fx.softmax_cross_entropy(dev(logits), dev(soft), label_smoothing=0.1, softcap=5.0, return_grad=True)
    compare(got, expected, dtype, f"{path} soft")
    for fn in ("logsumexp", "log_softmax", "softmax"):
        expected = getattr(ref, fn)(logits)
        got = to_host(getattr(fx, fn)(dev(logits)))
        kind = "value" if fn == "logsumexp" else "stored"
        assert_same_dtype(got, expected, f"{path} {fn}")
        assert_close(got, expected, dtype, kind, f"{path} {fn}")
    expected = ref.score(logits, labels, ignore_index=-100)
    got = to_host(fx.score(dev(logits), dev(labels), ignore_index=-100))
    compare_score(got, expected, dtype, f"{path} score")
    probs = np.abs(make_logits(shape, dtype, seed=24)) + np.asarray(0.01, dtype=dtype)
    expected = ref.categorical_cross_entropy(probs, soft, return_grad=True)
    got = fx.categorical_cross_entropy(dev(probs), dev(soft), return_grad=True)
    compare(got, expected, dtype, f"{path} categorical")


def test_fused_kernel_with_capped_residency(monkeypatch):
    """Force the L2 residency cap (dynamic shared memory per block) and check the result.
    The split-row path is off: 16 rows are fewer than a GPU's SMs, and the split kernels
    take no residency cap."""
    shape = (16, VOCAB)
    info = _plans.device_info(cupy.cuda.Device().id)
    row_bytes = shape[1] * 4
    monkeypatch.setattr(_config, "CUDA_FUSED_L2_FRACTION", 1.5 * info.sms * row_bytes / info.l2_bytes)
    monkeypatch.setattr(_config, "CUDA_SPLIT_MIN_CLASSES", 2**62)
    assert cupy_cuda.split_plan(*shape, info) is None
    plan = cupy_cuda.row_plan(shape[0], shape[1], row_bytes, info, True)
    assert plan.group == 0 and plan.smem > 0, plan
    logits = make_logits(shape, np.float32, seed=31)
    labels = make_class_ids(shape[:1], shape[1], seed=32)
    check_sparse(logits, labels, {}, np.dtype(np.float32), "capped residency", reductions=("none",))


SOFT_OPTIONS = {"plain": {}, "smoothing": {"label_smoothing": 0.15}, "softcap": {"softcap": 3.0},
                "both": {"label_smoothing": 0.05, "softcap": 8.0}}


def soft_terms(logits, labels, label_smoothing=0.0, softcap=None):
    """|p_c t| + |y_c| per element (at least 1), t = sum_c y_c: the size of the terms the
    soft gradient p_c t - y_c subtracts. Multi-hot (bool) labels sum to t ~ C/2, and where
    p_c t ~ y_c ~ 1 the float32 gradient keeps the few ulp of |z| that log p_c carries:
    up to 2.2e-6 at C = 50257, softcap 8 (atol 2e-6), in the fused kernel as in any
    float32 evaluation. The grad's atol scales with these terms, not with the result."""
    x = np.asarray(logits, dtype=np.float64)
    z = softcap * np.tanh(x / softcap) if softcap else x
    y = np.asarray(labels, dtype=np.float64)
    y = (1 - label_smoothing) * y + label_smoothing / max(y.shape[-1], 1)
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.exp(z - ref.logsumexp(z)[..., None]) if z.size else z
    terms = np.abs(p * y.sum(axis=-1, keepdims=True)) + np.abs(y)
    return np.maximum(np.nan_to_num(terms, nan=1.0, posinf=1.0), 1.0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("option", list(SOFT_OPTIONS))
@pytest.mark.parametrize("label_dtype", ["same", "float32", "float64", "bool"])
def test_soft_matches_reference(dtype, shape, option, label_dtype):
    logits = make_logits(shape, dtype)
    if label_dtype == "bool":
        labels = make_class_ids(shape, 2, seed=4).astype(bool)
    else:
        labels = make_distribution(shape, dtype=dtype if label_dtype == "same" else np.dtype(label_dtype))
    options = SOFT_OPTIONS[option]
    d_logits, d_labels = dev(logits), dev(labels)
    terms = soft_terms(logits, labels, **options)
    for reduction in ("none", "mean"):
        expected = ref.softmax_cross_entropy(logits, labels, reduction=reduction, return_grad=True, **options)
        got = fx.softmax_cross_entropy(d_logits, d_labels, reduction=reduction, return_grad=True, **options)
        compare(got, expected, dtype, f"soft {option} {label_dtype} {reduction}", grad_atol_scale=terms)
        forward = fx.softmax_cross_entropy(d_logits, d_labels, reduction=reduction, **options)
        compare(forward, expected[0], dtype, f"soft {option} {label_dtype} {reduction} forward-only")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("fn", ["logsumexp", "log_softmax", "softmax"])
def test_building_blocks_match_reference(dtype, shape, fn):
    x = make_logits(shape, dtype)
    expected = getattr(ref, fn)(x)
    got = to_host(getattr(fx, fn)(dev(x)))
    assert_same_dtype(got, expected, fn)
    assert_close(got, expected, dtype, "value" if fn == "logsumexp" else "stored", fn)


def test_building_blocks_accept_one_class():
    x = make_logits((4, 1), np.float32)
    for fn in ("logsumexp", "log_softmax", "softmax"):
        assert_close(to_host(getattr(fx, fn)(dev(x))), getattr(ref, fn)(x), np.float32, "value", fn)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("v_dtype", ["same", "float32", "float64"])
def test_hvp_matches_reference(dtype, shape, v_dtype):
    x = make_logits(shape, dtype)
    v = make_logits(shape, dtype if v_dtype == "same" else np.dtype(v_dtype), seed=7)
    expected = ref.softmax_cross_entropy_hvp(x, v)
    got = to_host(fx.softmax_cross_entropy_hvp(dev(x), dev(v)))
    assert_same_dtype(got, expected, "hvp")
    assert_close(got, expected, dtype, "stored", f"hvp v={v_dtype}")


def compare_score(got, expected, dtype, what, atol_scale=1.0):
    """``tests.support.compare_score`` of a device result, brought to the host."""
    support.compare_score(to_host(got), expected, dtype, what, atol_scale)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("ignore_index, label_dtype", [
    (None, "int64"), (None, "int32"), (None, "uint8"), (-100, "int64"), (-100, "int32")])  # -100 is no uint8
def test_score_matches_reference(dtype, shape, ignore_index, label_dtype):
    x = make_logits(shape, dtype)
    labels = make_class_ids(shape[:1], min(shape[1], 200), ignore_index=ignore_index, ignore_fraction=0.3)
    labels = labels.astype(label_dtype)
    expected = ref.score(x, labels, ignore_index=ignore_index)
    got = to_host(fx.score(dev(x), dev(labels), ignore_index=ignore_index))
    compare_score(got, expected, dtype, f"score {label_dtype}")


def adversarial(num_classes, dtype):
    """Rows: spiky, +-1e4, -inf masks (targets not masked), NaN, all -inf, +inf, ties,
    target at -inf. Labels avoid masked positions except in the last row."""
    c = num_classes
    x = make_logits((8, c), np.float64, seed=9)
    x[1] = np.linspace(-1e4, 1e4, c)
    x[2, ::3] = -np.inf
    x[3, c // 2] = np.nan
    x[4] = -np.inf
    x[5, c - 1] = np.inf
    x[6] = 0.0
    x[7, 1] = -np.inf
    labels = np.array([0, c - 1, 1, 0, 0, 0, 2 % c, 1], dtype=np.int64)
    return x.astype(dtype), labels


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_classes", [3, 423, VOCAB])
def test_adversarial_rows(dtype, num_classes):
    x, labels = adversarial(num_classes, dtype)
    scale = row_scale(x)
    d_x, d_labels = dev(x), dev(labels)
    for option in ("plain", "smoothing", "z_loss", "softcap", "weights"):
        options = sparse_options(option, num_classes)
        expected = ref.sparse_softmax_cross_entropy(x, labels, return_grad=True, **options)
        loss, grad = to_host(fx.sparse_softmax_cross_entropy(d_x, d_labels, return_grad=True, **options))
        rtol, atol = tolerance(dtype, "value")
        assert_close(loss, expected[0], dtype, "value", f"adversarial sparse {option} loss", tol=(rtol, atol * scale))
        rtol, atol = tolerance(dtype, "stored")
        assert_close(grad, expected[1], dtype, "stored", f"adversarial sparse {option} grad",
                     tol=(rtol, atol * scale[:, None]))
    soft = make_distribution(x.shape, dtype=np.float32)
    soft[2, ::3] = 0.0  # zero weight where the score is -inf: the xlogy convention
    for options in ({}, {"label_smoothing": 0.1}, {"softcap": 5.0}):
        expected = ref.softmax_cross_entropy(x, soft, return_grad=True, **options)
        loss, grad = to_host(fx.softmax_cross_entropy(d_x, dev(soft), return_grad=True, **options))
        rtol, atol = tolerance(dtype, "value")
        assert_close(loss, expected[0], dtype, "value", f"adversarial soft {options} loss", tol=(rtol, atol * scale))
        rtol, atol = tolerance(dtype, "stored")
        assert_close(grad, expected[1], dtype, "stored", f"adversarial soft {options} grad",
                     tol=(rtol, atol * scale[:, None]))
    for fn in ("logsumexp", "log_softmax", "softmax"):
        expected = getattr(ref, fn)(x)
        got = to_host(getattr(fx, fn)(d_x))
        kind = "value" if fn == "logsumexp" else "stored"
        rtol, atol = tolerance(dtype, kind)
        s = scale if fn == "logsumexp" else scale[:, None]
        assert_close(got, expected, dtype, kind, f"adversarial {fn}", tol=(rtol, atol * s))
    compare_score(to_host(fx.score(d_x, d_labels)), ref.score(x, labels), dtype, "adversarial score", scale)
    v = make_logits(x.shape, dtype, seed=10)
    rtol, atol = tolerance(dtype, "stored")
    assert_close(to_host(fx.softmax_cross_entropy_hvp(d_x, dev(v))), ref.softmax_cross_entropy_hvp(x, v), dtype,
                 "stored", "adversarial hvp", tol=(rtol, atol * scale[:, None]))


def test_class_axis_and_non_contiguous_inputs():
    rng = np.random.default_rng(13)
    x = make_logits((6, 423, 5), np.float32)  # (N, C, d), classes on axis 1
    labels = rng.integers(0, 423, size=(6, 5))
    for reduction in ("none", "mean"):
        expected = ref.sparse_softmax_cross_entropy(x, labels, axis=1, reduction=reduction, return_grad=True)
        got = fx.sparse_softmax_cross_entropy(dev(x), dev(labels), axis=1, reduction=reduction, return_grad=True)
        compare(got, expected, np.float32, f"axis=1 {reduction}")
    wide = make_logits((423, 12), np.float32)  # transposed view: classes along a strided axis
    view = dev(wide).T
    assert not view.flags.c_contiguous
    labels = rng.integers(0, 423, size=12)
    expected = ref.sparse_softmax_cross_entropy(wide.T, labels, return_grad=True)
    compare(fx.sparse_softmax_cross_entropy(view, dev(labels), return_grad=True), expected, np.float32, "transposed")
    sliced = dev(make_logits((9, 846), np.float32))[:, ::2]
    expected = ref.log_softmax(sliced.get())
    assert_close(to_host(fx.log_softmax(sliced)), expected, np.float32, "stored", "sliced log_softmax")


def test_misaligned_rows_take_the_scalar_path_and_inplace_head():
    """A row start off the 16-byte grid: vec_ok = 0 (scalar loads) for the fresh gradient,
    and a scalar head before the packs when the gradient aliases the logits."""
    n, c = 5, 1000
    host = make_logits((n, c), np.float32, seed=14)
    labels = make_class_ids((n,), c, seed=15)
    expected = ref.sparse_softmax_cross_entropy(host, labels, return_grad=True)
    base = cupy.empty(n * c + 1, dtype=np.float32)
    x = base[1:].reshape(n, c)
    x[...] = dev(host)
    d_labels = dev(labels)
    assert cupy_cuda.vec_ok(4, x, cupy.empty_like(x)) == 0
    loss, grad = cupy_cuda.sparse_softmax_cross_entropy(x, d_labels, None, None, 0.0, 0.0, None, 1.0)
    compare((loss, grad), expected, np.float32, "misaligned")
    loss, grad = cupy_cuda.sparse_softmax_cross_entropy(x, d_labels, None, None, 0.0, 0.0, None, 1.0, inplace=True)
    assert grad.data.ptr == x.data.ptr
    compare((loss, grad), expected, np.float32, "misaligned inplace")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(7, 3), (9, 423), (3, 3001), (3, VOCAB), (4, HUGE)],
                         ids=["7x3", "9x423", "3x3001", f"3x{VOCAB}", "split"])
def test_inplace_gradient(dtype, shape):
    logits = make_logits(shape, dtype, seed=16)
    labels = make_class_ids(shape[:1], shape[1], seed=17)
    labels[0] = -100
    options = {"ignore_index": -100, "label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 7.0}
    x = dev(logits)
    scale = cupy.asarray(np.linspace(0.5, 2.0, shape[0]))
    expected_scaled = ref.sparse_softmax_cross_entropy(logits, labels, return_grad=True,
                                                       grad_output=np.linspace(0.5, 2.0, shape[0]), **options)
    loss, grad = cupy_cuda.sparse_softmax_cross_entropy(x, dev(labels), -100, None, 0.1, 1e-4, 7.0, scale,
                                                        inplace=True)
    assert grad.data.ptr == x.data.ptr, "inplace must write the gradient into the logits buffer"
    compare((loss, grad), expected_scaled, dtype, f"inplace sparse {shape}")
    soft = make_distribution(shape, dtype=np.float32, seed=18)
    expected = ref.softmax_cross_entropy(logits, soft, return_grad=True, label_smoothing=0.1)
    x = dev(logits)
    loss, grad = cupy_cuda.softmax_cross_entropy(x, dev(soft), 0.1, None, 1.0, inplace=True)
    assert grad.data.ptr == x.data.ptr
    compare((loss, grad), expected, dtype, f"inplace soft {shape}")


def test_grad_output_array():
    logits = make_logits((11, 423), np.float32)
    labels = make_class_ids((11,), 423)
    go = np.random.default_rng(19).standard_normal(11).astype(np.float32)
    expected = ref.sparse_softmax_cross_entropy(logits, labels, return_grad=True, grad_output=go)
    got = fx.sparse_softmax_cross_entropy(dev(logits), dev(labels), return_grad=True, grad_output=dev(go))
    compare(got, expected, np.float32, "grad_output")


# ----------------------------------------------------------------------------
# probability inputs and elementwise families
# ----------------------------------------------------------------------------

def make_probs(shape, dtype, seed=25):
    rng = np.random.default_rng(seed)
    p = rng.random(shape) ** 3  # many small values, some below epsilon after normalising
    if p.size:
        p.flat[:: max(1, p.size // 7)] = 0.0
    return p.astype(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("options", [{}, {"epsilon": 1e-3, "label_smoothing": 0.1}], ids=["default", "eps-smooth"])
def test_categorical_matches_reference(dtype, shape, options):
    probs = make_probs(shape, dtype)
    labels = make_distribution(shape, dtype=np.float32, seed=26)
    for reduction in ("none", "mean"):
        expected = ref.categorical_cross_entropy(probs, labels, reduction=reduction, return_grad=True, **options)
        got = fx.categorical_cross_entropy(dev(probs), dev(labels), reduction=reduction, return_grad=True, **options)
        compare(got, expected, dtype, f"categorical {options} {reduction}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("ignore_index", [None, -100], ids=["no-ignore", "ignore"])
def test_sparse_categorical_matches_reference(dtype, shape, ignore_index):
    probs = make_probs(shape, dtype)
    labels = make_class_ids(shape[:1], shape[1], ignore_index=ignore_index, ignore_fraction=0.3)
    for reduction in ("none", "mean"):
        expected = ref.sparse_categorical_cross_entropy(probs, labels, ignore_index=ignore_index,
                                                        reduction=reduction, return_grad=True)
        got = fx.sparse_categorical_cross_entropy(dev(probs), dev(labels), ignore_index=ignore_index,
                                                  reduction=reduction, return_grad=True)
        compare(got, expected, dtype, f"sparse categorical {reduction}")
        forward = fx.sparse_categorical_cross_entropy(dev(probs), dev(labels), ignore_index=ignore_index,
                                                      reduction=reduction)
        compare(forward, expected[0], dtype, f"sparse categorical {reduction} forward-only")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_classes", [4, 423, 5003])
def test_probability_edge_rows(dtype, num_classes):
    """All-zero, NaN and +-inf probabilities and one-hot rows, for both categorical losses
    (tests/test_families.py holds the CPU backend to the same rows). An inf off the label
    gives a finite sparse loss and a NaN gradient row: the reference's sum_j g_j p_j meets
    0 * inf there."""
    c = num_classes
    probs = np.random.default_rng(33).random((7, c)) ** 3
    probs[0] = 0.0
    probs[1, 0] = np.nan
    probs[2, c - 1] = np.inf
    probs[3, 1] = np.inf
    probs[4] = 0.0
    probs[4, 2] = 1.0
    probs[5, c // 2] = -np.inf
    probs = probs.astype(dtype)
    ids = np.array([0, 1, 1, 1, 2, 0, -100])
    soft = np.eye(c)[np.clip(ids, 0, c - 1)].astype(np.float32)
    expected = ref.categorical_cross_entropy(probs, soft, return_grad=True)
    compare(fx.categorical_cross_entropy(dev(probs), dev(soft), return_grad=True), expected, dtype,
            "categorical edge rows")
    expected = ref.sparse_categorical_cross_entropy(probs, ids, ignore_index=-100, return_grad=True)
    compare(fx.sparse_categorical_cross_entropy(dev(probs), dev(ids), ignore_index=-100, return_grad=True),
            expected, dtype, "sparse categorical edge rows")


@gpu_only("a size test: 1,000,000 rows take 2 minutes emulated (the 8-lane path runs in every other test)")
def test_a_million_short_rows():
    """1,000,000 x 10: eight lanes per row, 31,250 blocks of 32 rows."""
    shape = (1_000_000, 10)
    logits = make_logits(shape, np.float32, seed=35)
    labels = make_class_ids(shape[:1], shape[1], seed=36, ignore_index=-100, ignore_fraction=0.1)
    expected = ref.sparse_softmax_cross_entropy(logits, labels, ignore_index=-100, return_grad=True)
    got = fx.sparse_softmax_cross_entropy(dev(logits), dev(labels), ignore_index=-100, return_grad=True)
    scale = row_scale(logits).max()  # a scalar: atol scales both the loss (N,) and the grad (N, C)
    compare(got, expected, np.float32, "1e6 x 10", atol_scale=scale)
    compare_score(to_host(fx.score(dev(logits), dev(labels), ignore_index=-100)),
                  ref.score(logits, labels, ignore_index=-100), np.float32, "1e6 x 10 score", scale)


def test_split_path_odd_classes_misaligned_inplace():
    """The split-row path on rows of odd C starting off the 16-byte grid, gradient inplace:
    every chunk of every row has its own scalar head and tail."""
    n, c = 3, 100003 if not EMULATED else 6007
    info = _plans.device_info(cupy.cuda.Device().id)
    assert cupy_cuda.split_plan(n, c, info) is not None
    host = make_logits((n, c), np.float32, seed=37)
    labels = make_class_ids((n,), c, seed=38)
    expected = ref.sparse_softmax_cross_entropy(host, labels, label_smoothing=0.1, return_grad=True)
    base = cupy.empty(n * c + 1, dtype=np.float32)
    x = base[1:].reshape(n, c)
    x[...] = dev(host)
    loss, grad = cupy_cuda.sparse_softmax_cross_entropy(x, dev(labels), None, None, 0.1, 0.0, None, 1.0,
                                                        inplace=True)
    assert grad.data.ptr == x.data.ptr
    compare((loss, grad), expected, np.float32, "split, odd C, misaligned, inplace", atol_scale=row_scale(host).max())


@pytest.mark.slow
@gpu_only("4.3 GB of logits")
def test_more_than_two_to_the_31_elements():
    """N * C > 2**31: bfloat16 rows of 50257 classes (4.3 GB of logits, as much gradient).
    Rows differ (low mantissa bits flipped by row), so a wrapped 32-bit offset would read
    another row; rows at both ends are compared with the reference, every loss must be
    finite, and the elementwise path (n > 2**31 elements) is checked at its last elements."""
    if BF16_REASON:
        pytest.skip(BF16_REASON)
    c = 50257
    n = 2**31 // c + 8
    free, _ = cupy.cuda.runtime.memGetInfo()
    if free < 10 * n * c:  # peak: logits (2 B an element) + the float32 sigmoid loss (4 B), with margin
        pytest.skip(f"needs ~{10 * n * c / 2**30:.0f} GiB of free device memory, {free / 2**30:.0f} GiB free")
    rng = np.random.default_rng(34)
    base = cupy.asarray((rng.standard_normal(c) * 3).astype(BF16).view(np.uint16))
    bits = base[None, :] ^ (cupy.arange(n, dtype=cupy.uint16) % 8)[:, None]
    logits = bits.view(BF16)
    host_labels = rng.integers(0, c, n)
    host_labels[[1, n - 2]] = -100
    rows = np.array([0, 1, n // 2, n - 2, n - 1])
    host_rows = bits[cupy.asarray(rows)].get().view(BF16)
    expected = ref.sparse_softmax_cross_entropy(host_rows, host_labels[rows], ignore_index=-100, return_grad=True)
    loss, grad = fx.sparse_softmax_cross_entropy(logits, dev(host_labels), ignore_index=-100, return_grad=True)
    assert bool(cupy.isfinite(loss).all()), "every row's loss is finite"
    got_grad = grad.view(np.uint16)[cupy.asarray(rows)].get().view(BF16)
    compare((loss[cupy.asarray(rows)], got_grad), expected, BF16, "N * C > 2**31 sparse", atol_scale=8.0)
    del grad, loss
    lse = fx.logsumexp(logits)
    assert_close(to_host(lse[cupy.asarray(rows)]), ref.logsumexp(host_rows), BF16, "value", "N * C > 2**31 lse",
                 tol=(tolerance(BF16)[0], tolerance(BF16)[1] * 8))
    del lse
    flat = logits.reshape(-1)
    loss = fx.sigmoid_cross_entropy(flat, flat)
    tail = bits.reshape(-1)[-7:].get().view(BF16)
    assert_close(to_host(loss[-7:]), ref.sigmoid_cross_entropy(tail, tail), BF16, "value",
                 "n > 2**31 sigmoid, last elements", tol=(tolerance(BF16)[0], tolerance(BF16)[1] * 8))


ELEMENT_SHAPES = [(), (0,), (5,), (7, 3), (33, 129)]
ELEMENT_IDS = ["0d", "empty", "5", "7x3", "33x129"]


def pos_weights(kind, shape):
    rng = np.random.default_rng(27)
    if kind == "none":
        return None
    if kind == "scalar":
        return 2.5
    if kind == "per-class":
        return rng.uniform(0.5, 3.0, shape[-1:] if shape else ())
    return rng.uniform(0.5, 3.0, shape)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", ELEMENT_SHAPES, ids=ELEMENT_IDS)
@pytest.mark.parametrize("pos_weight", ["none", "scalar", "per-class", "full"])
@pytest.mark.parametrize("label_dtype", ["same", "float32", "bool"])
def test_sigmoid_matches_reference(dtype, shape, pos_weight, label_dtype):
    x = make_logits(shape, dtype, seed=28)
    if label_dtype == "bool":
        z = make_class_ids(shape, 2, seed=29).astype(bool)
    else:
        z = np.random.default_rng(29).random(shape).astype(dtype if label_dtype == "same" else np.float32)
    q = pos_weights(pos_weight, shape)
    for options in ({}, {"label_smoothing": 0.1}):
        for reduction in ("none", "mean"):
            expected = ref.sigmoid_cross_entropy(x, z, pos_weight=q, reduction=reduction, return_grad=True, **options)
            got = fx.sigmoid_cross_entropy(dev(x), dev(z), pos_weight=q, reduction=reduction, return_grad=True,
                                           **options)
            compare(got, expected, dtype, f"sigmoid {pos_weight} {options} {reduction}")
    expected = ref.sigmoid_cross_entropy_hessian_diag(x, z, pos_weight=q)
    got = to_host(fx.sigmoid_cross_entropy_hessian_diag(dev(x), dev(z), pos_weight=q))
    assert_same_dtype(got, expected, "hessian diag")
    assert_close(got, expected, dtype, "stored", f"hessian diag {pos_weight}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_elementwise_grid_stride(monkeypatch, dtype):
    """A grid of one 32-thread block per SM: each thread takes several tiles of packs, and
    a misaligned view (vec_ok = 0) several scalars, in every elementwise kernel."""
    monkeypatch.setattr(_config, "CUDA_ELEMENTWISE_BLOCK_THREADS", 32)
    monkeypatch.setattr(_config, "CUDA_ELEMENTWISE_BLOCKS_PER_SM", 1)
    rng = np.random.default_rng(42)
    x = make_logits((37, 257), dtype, seed=43)
    z = rng.random(x.shape)
    p = rng.random(x.shape).astype(dtype)
    q = pos_weights("per-class", x.shape)
    for what, start in (("aligned", 0), ("misaligned", 1)):  # a device view one element in
        def both(host):
            return host.reshape(-1)[start:], dev(host.reshape(-1))[start:]

        (xs, d_xs), (ps, d_ps), (zs, d_zs) = both(x), both(p), both(z.astype(np.float32))
        for labels, d_labels in ((zs, d_zs), both(z > 0.5)):
            expected = ref.sigmoid_cross_entropy(xs, labels, return_grad=True, label_smoothing=0.1)
            got = fx.sigmoid_cross_entropy(d_xs, d_labels, return_grad=True, label_smoothing=0.1)
            compare(got, expected, dtype, f"grid-stride sigmoid {what} {labels.dtype}")
        expected = ref.binary_cross_entropy(ps, zs, return_grad=True)
        compare(fx.binary_cross_entropy(d_ps, d_zs, return_grad=True), expected, dtype, f"grid-stride binary {what}")
    expected = ref.sigmoid_cross_entropy_hessian_diag(x, z.astype(np.float32), pos_weight=q)
    got = to_host(fx.sigmoid_cross_entropy_hessian_diag(dev(x), dev(z.astype(np.float32)), pos_weight=q))
    assert_close(got, expected, dtype, "stored", "grid-stride hessian diag")


def test_sigmoid_non_finite_scores_follow_ieee():
    x = np.array([np.inf, -np.inf, np.nan, 1e4, -1e4, 0.0], dtype=np.float32)
    z = np.array([1.0, 0.0, 1.0, 0.0, 1.0, 0.5], dtype=np.float32)
    expected = ref.sigmoid_cross_entropy(x, z, return_grad=True)
    compare(fx.sigmoid_cross_entropy(dev(x), dev(z), return_grad=True), expected, np.float32, "sigmoid IEEE",
            atol_scale=1e4)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", ELEMENT_SHAPES, ids=ELEMENT_IDS)
@pytest.mark.parametrize("options", [{}, {"epsilon": 1e-3, "label_smoothing": 0.2}], ids=["default", "eps-smooth"])
def test_binary_matches_reference(dtype, shape, options):
    rng = np.random.default_rng(30)
    p = rng.random(shape)
    if p.size:
        p.flat[:: max(1, p.size // 5)] = 0.0
        p.flat[1:: max(1, p.size // 5)] = 1.0
    p = p.astype(dtype)
    z = rng.random(shape).astype(np.float32)
    for reduction in ("none", "sum"):
        expected = ref.binary_cross_entropy(p, z, reduction=reduction, return_grad=True, **options)
        got = fx.binary_cross_entropy(dev(p), dev(z), reduction=reduction, return_grad=True, **options)
        compare(got, expected, dtype, f"binary {options} {reduction}")


# ----------------------------------------------------------------------------
# bad input, dispatch, interop
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("fn", ["sparse_softmax_cross_entropy", "sparse_categorical_cross_entropy", "score"])
@pytest.mark.parametrize("num_classes", [3, 423, VOCAB])
def test_bad_label_raises_the_cpu_error(fn, num_classes):
    x = np.abs(make_logits((6, num_classes), np.float32)) + 0.01
    for bad, ignore_index in ((num_classes, None), (-1, None), (-5, -100), (num_classes + 7, -100)):
        labels = make_class_ids((6,), num_classes)
        labels[4] = bad
        with pytest.raises(ValueError) as host_error:
            getattr(fx, fn)(x, labels, ignore_index=ignore_index, backend="numpy")
        with pytest.raises(ValueError) as device_error:
            result = getattr(fx, fn)(dev(x), dev(labels), ignore_index=ignore_index)
            cupy.cuda.Device().synchronize()
            del result
        assert str(device_error.value) == str(host_error.value)
        assert str(device_error.value) == _validate.bad_label_message(labels, num_classes, ignore_index)


def test_bad_label_check_can_be_skipped(monkeypatch):
    x = make_logits((4, 423), np.float32)
    labels = make_class_ids((4,), 423)
    labels[2] = 9999
    monkeypatch.setenv(_config.CUDA_SKIP_LABEL_CHECK_ENV, "1")
    loss, grad = to_host(fx.sparse_softmax_cross_entropy(dev(x), dev(labels), return_grad=True))
    assert np.isnan(loss[2]) and np.isfinite(np.delete(loss, 2)).all()
    assert (grad[2] == 0).all()
    monkeypatch.delenv(_config.CUDA_SKIP_LABEL_CHECK_ENV)
    monkeypatch.setattr(_config, "CUDA_CHECK_LABELS", False)
    loss = to_host(fx.sparse_softmax_cross_entropy(dev(x), dev(labels)))
    assert np.isnan(loss[2])


def test_mixing_host_and_device_names_both_arguments():
    x = dev(make_logits((3, 5), np.float32))
    labels = np.array([0, 1, 2])
    with pytest.raises(TypeError, match="logits.*labels|labels.*logits"):
        fx.sparse_softmax_cross_entropy(x, labels)
    with pytest.raises(TypeError, match="logits.*labels|labels.*logits"):
        fx.sparse_softmax_cross_entropy(x.get(), dev(labels))
    with pytest.raises(TypeError, match="logits.*v|v.*logits"):
        fx.softmax_cross_entropy_hvp(x, np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="numba"):
        fx.sparse_softmax_cross_entropy(x, dev(labels), backend="numba")


def test_results_live_on_the_device():
    x = dev(make_logits((4, 423), np.float32))
    labels = dev(make_class_ids((4,), 423))
    loss, grad = fx.sparse_softmax_cross_entropy(x, labels, return_grad=True)
    assert isinstance(loss, cupy.ndarray) and isinstance(grad, cupy.ndarray)
    assert loss.device.id == x.device.id
    fields = fx.score(x, labels)
    assert all(isinstance(f, cupy.ndarray) for f in fields)
    assert fields.argmax.dtype == np.int64 and fields.correct.dtype == np.bool_


@pytest.mark.parametrize("torch_dtype", ["float32", "float16", "bfloat16"])
@gpu_only("torch CUDA tensors need a CUDA device")
def test_torch_cuda_tensors_through_dlpack(torch_dtype):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device here")
    if torch_dtype == "bfloat16" and BF16_REASON:
        pytest.skip(BF16_REASON)
    dtype = getattr(torch, torch_dtype)
    logits = (torch.randn(16, 1000, device="cuda") * 3).to(dtype)
    labels = torch.randint(0, 1000, (16,), device="cuda")
    assert _dispatch.is_cuda_array(logits)
    view = _dispatch.as_device_array(logits)
    assert view.data.ptr == logits.data_ptr(), "the tensor must be viewed, not copied"
    loss, grad = fx.sparse_softmax_cross_entropy(logits, labels, return_grad=True, reduction="mean")
    assert isinstance(grad, cupy.ndarray) and grad.dtype.name == torch_dtype
    host_dtype = BF16 if torch_dtype == "bfloat16" else np.dtype(torch_dtype)
    host_logits = logits.float().cpu().numpy().astype(host_dtype)
    expected = ref.sparse_softmax_cross_entropy(host_logits, labels.cpu().numpy(), reduction="mean",
                                                return_grad=True)
    compare((loss, grad), expected, host_dtype, f"torch {torch_dtype}")
    expected_torch = torch.nn.functional.cross_entropy(logits.float(), labels)
    assert abs(float(loss.get()) - float(expected_torch)) < 1e-4 * max(1.0, abs(float(expected_torch)))


def test_everything_runs_on_the_current_stream():
    """On a non-blocking stream (no implicit sync with the legacy default stream), results
    read after that stream's synchronize match the reference: every allocation, copy (class
    weights, label casts), launch and the bad-label flag read follow CuPy's current stream."""
    logits = make_logits((64, 5003), np.float32, seed=39)
    labels = make_class_ids((64,), 5003, seed=40, ignore_index=-100, ignore_fraction=0.2)
    weights = np.random.default_rng(41).uniform(0.5, 2.0, 5003)
    options = {"ignore_index": -100, "class_weight": weights, "label_smoothing": 0.1}
    expected = ref.sparse_softmax_cross_entropy(logits, labels, reduction="mean", return_grad=True, **options)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        d_logits, d_labels = dev(logits), dev(labels.astype(np.int16))
        got = fx.sparse_softmax_cross_entropy(d_logits, d_labels, reduction="mean", return_grad=True, **options)
        fields = fx.score(d_logits, d_labels, ignore_index=-100)
        bad = labels.copy()
        bad[3] = 5003
        with pytest.raises(ValueError):
            fx.sparse_softmax_cross_entropy(d_logits, dev(bad), ignore_index=-100)
        stream.synchronize()
    compare(got, expected, np.float32, "non-blocking stream", atol_scale=row_scale(logits).max())
    compare_score(to_host(fields), ref.score(logits, labels, ignore_index=-100), np.float32,
                  "non-blocking stream score", row_scale(logits))


def test_table_instantiations_all_load():
    """Every instantiation of the dtype table compiles and loads (cached by the fixture)."""
    assert cupy_cuda.precompile() == len(cupy_cuda.instantiations())


def test_sigmoid_tiny_losses_keep_their_relative_precision():
    """As tests/test_families.py on the host: the CUDA formula has no cancellation either."""
    x = np.concatenate([-np.linspace(20, 80, 13), np.linspace(20, 80, 13)]).astype(np.float32)
    z = (x > 0).astype(np.float32)
    expected = np.log1p(np.exp(-np.abs(x.astype(np.float64))))
    got = to_host(fx.sigmoid_cross_entropy(dev(x), dev(z))).astype(np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=0)
