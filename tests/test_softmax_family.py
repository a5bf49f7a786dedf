"""The softmax family and building blocks on every host backend, against the reference.

backend x dtype x shape x option, forward and fused forward+backward, compared
with ``fastxent.reference`` (float64) through one tolerance table.
"""

import numpy as np
import pytest

import fastxent as fx
from fastxent import _config
from fastxent import reference as ref
from tests.support import (
    DTYPE_IDS,
    FLOAT_DTYPES,
    SPARSE_OPTIONS,
    assert_close,
    assert_same_dtype,
    compare,
    make_class_ids,
    make_distribution,
    make_logits,
    sparse_options,
)

BACKENDS = ["numba", "numpy"]
SHAPES = [(0, 5), (1, 2), (7, 3), (5, 423), (2, 50257)]
SHAPE_IDS = [f"{n}x{c}" for n, c in SHAPES]



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("option", list(SPARSE_OPTIONS))
def test_sparse_matches_reference(backend, dtype, shape, option):
    logits = make_logits(shape, dtype)
    options = sparse_options(option, shape[1])
    labels = make_class_ids(shape[:1], shape[1], ignore_index=options.get("ignore_index"),
                            ignore_fraction=0.3)
    for reduction in ("none", "sum", "mean"):
        expected = ref.sparse_softmax_cross_entropy(logits, labels, reduction=reduction,
                                                    return_grad=True, **options)
        got = fx.sparse_softmax_cross_entropy(logits, labels, reduction=reduction, return_grad=True,
                                              backend=backend, **options)
        compare(got, expected, dtype, f"{backend} {option} {reduction}")
        forward = fx.sparse_softmax_cross_entropy(logits, labels, reduction=reduction,
                                                  backend=backend, **options)
        compare(forward, expected[0], dtype, f"{backend} {option} {reduction} forward-only")


SOFT_OPTIONS = {"plain": {}, "smoothing": {"label_smoothing": 0.15}, "softcap": {"softcap": 3.0}}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("option", list(SOFT_OPTIONS))
def test_soft_matches_reference(backend, dtype, shape, option):
    logits = make_logits(shape, dtype)
    labels = make_distribution(shape, dtype=dtype)
    options = SOFT_OPTIONS[option]
    for reduction in ("none", "mean"):
        expected = ref.softmax_cross_entropy(logits, labels, reduction=reduction, return_grad=True,
                                             **options)
        got = fx.softmax_cross_entropy(logits, labels, reduction=reduction, return_grad=True,
                                       backend=backend, **options)
        compare(got, expected, dtype, f"{backend} {option} {reduction}")


@pytest.mark.parametrize("label_dtype", [np.bool_, np.float64, np.float16])
def test_soft_label_dtypes(label_dtype):
    logits = make_logits((6, 9), np.float32)
    labels = (make_distribution((6, 9), dtype=np.float64) > 0.1).astype(label_dtype)
    expected = ref.softmax_cross_entropy(logits, labels, return_grad=True)
    compare(fx.softmax_cross_entropy(logits, labels, return_grad=True), expected, np.float32,
             f"labels {np.dtype(label_dtype).name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(0, 4), (3, 1), (4, 2), (5, 423), (2, 50257)],
                         ids=["0x4", "3x1", "4x2", "5x423", "2x50257"])
def test_building_blocks_match_reference(backend, dtype, shape):
    x = make_logits(shape, dtype)
    for name, kind in (("logsumexp", "value"), ("log_softmax", "stored"), ("softmax", "stored")):
        got = getattr(fx, name)(x, backend=backend)
        expected = getattr(ref, name)(x)
        assert_same_dtype(got, expected, name)
        assert_close(got, expected, dtype, kind, f"{backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_axis_one_on_3d(backend):
    logits = make_logits((3, 11, 4), np.float32)
    labels = make_class_ids((3, 4), 11)
    expected = ref.sparse_softmax_cross_entropy(logits, labels, axis=1, return_grad=True, reduction="mean")
    got = fx.sparse_softmax_cross_entropy(logits, labels, axis=1, return_grad=True, reduction="mean",
                                          backend=backend)
    compare(got, expected, np.float32, "axis=1")
    soft = make_distribution((3, 11, 4), axis=1)
    expected = ref.softmax_cross_entropy(logits, soft, axis=1, return_grad=True)
    got = fx.softmax_cross_entropy(logits, soft, axis=1, return_grad=True, backend=backend)
    compare(got, expected, np.float32, "soft axis=1")
    for name in ("log_softmax", "softmax", "logsumexp"):
        assert_close(getattr(fx, name)(logits, axis=1, backend=backend), getattr(ref, name)(logits, axis=1),
                     np.float32, "stored", name)
    assert_close(fx.logsumexp(logits, axis=-3, backend=backend), ref.logsumexp(logits, axis=0),
                 np.float32, "value", "axis=-3")


def test_non_contiguous_and_negative_strides():
    base = make_logits((12, 40), np.float32)
    labels = make_class_ids((6,), 20)
    for logits in (base[::2, ::2], base[::-2, 10:30], base[:6, ::-2], np.asfortranarray(base[:6, :20])):
        expected = ref.sparse_softmax_cross_entropy(logits, labels, return_grad=True)
        got = fx.sparse_softmax_cross_entropy(logits, labels, return_grad=True)
        compare(got, expected, np.float32, f"strides {logits.strides}")
    labels_strided = make_class_ids((12,), 20)[::-2]
    logits = base[::2, :20]
    compare(fx.sparse_softmax_cross_entropy(logits, labels_strided),
             ref.sparse_softmax_cross_entropy(logits, labels_strided), np.float32, "strided labels")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_non_finite_rows_stay_in_their_row(dtype):
    logits = make_logits((6, 5000), dtype)
    logits[0, :] = 1e4
    logits[0, 3] = -1e4
    logits[1, 100:4000] = -np.inf        # masking: loss stays finite
    logits[2, :] = -np.inf               # all -inf: NaN
    logits[3, 17] = np.nan               # NaN: NaN
    logits[4, 2500] = np.inf             # +inf: NaN
    labels = np.array([3, 5, 0, 1, 0, 7])
    logits[5, 7] = -np.inf               # -inf at the target: +inf
    expected = ref.sparse_softmax_cross_entropy(logits, labels, return_grad=True)
    loss, grad = fx.sparse_softmax_cross_entropy(logits, labels, return_grad=True)
    assert np.isfinite(loss[0]) and np.isfinite(loss[1])
    assert np.isnan(loss[2]) and np.isnan(loss[3]) and np.isnan(loss[4])
    assert loss[5] == np.inf
    assert np.all(grad[1, 100:4000] == 0)
    compare((loss, grad), expected, dtype, "non-finite")
    for name in ("logsumexp", "log_softmax", "softmax"):
        assert_close(getattr(fx, name)(logits), getattr(ref, name)(logits), dtype, "stored", name)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("option", ["plain", "ignore", "weights", "z_loss"])
def test_short_rows_across_blocks(dtype, option):
    """The short-row kernel (C < NUMBA_SHORT_ROW, blocks of NUMBA_ROW_BLOCK rows, transposed):
    several blocks and a partial one, a grad_output per row, and non-finite rows that
    must stay in their row (an ignored NaN row gets loss 0 and gradient 0)."""
    count = 13
    rows = 2 * _config.NUMBA_ROW_BLOCK + 37
    logits = make_logits((rows, count), dtype, seed=21)
    options = sparse_options(option, count)
    labels = make_class_ids((rows,), count, ignore_index=options.get("ignore_index"), ignore_fraction=0.3, seed=22)
    logits[5] = -np.inf                      # all -inf: NaN
    logits[300, 4] = np.nan                  # NaN: NaN
    logits[301, 2] = np.inf                  # +inf: NaN
    logits[302, :12] = -np.inf               # masking: finite
    labels[302] = 12
    logits[303] = 1e4                        # large and uniform
    if "ignore_index" in options:
        logits[304, 3] = np.nan
        labels[304] = -100                   # ignored NaN row: 0 and 0
    grad_output = np.linspace(0.5, 2.0, rows)
    expected = ref.sparse_softmax_cross_entropy(logits, labels, return_grad=True, grad_output=grad_output,
                                                **options)
    got = fx.sparse_softmax_cross_entropy(logits, labels, return_grad=True, grad_output=grad_output, **options)
    compare(got, expected, dtype, f"short rows {option}", scale=np.where(np.arange(rows) == 303, 1e4, 1.0)[:, None])
    compare(fx.sparse_softmax_cross_entropy(logits, labels, **options), expected[0], dtype,
            f"short rows {option} forward", scale=np.where(np.arange(rows) == 303, 1e4, 1.0))
    if "ignore_index" in options:
        assert got[0][304] == 0 and not got[1][304].any()


def test_soft_labels_zero_where_masked():
    logits = make_logits((3, 6), np.float64)
    logits[:, 2] = -np.inf
    labels = make_distribution((3, 6), dtype=np.float64)
    labels[:, 2] = 0.0
    loss, grad = fx.softmax_cross_entropy(logits, labels, return_grad=True)
    assert np.all(np.isfinite(loss)) and np.all(grad[:, 2] == 0)
    compare((loss, grad), ref.softmax_cross_entropy(logits, labels, return_grad=True), np.float64, "xlogy")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("labels_kind", ["ids", "distribution"])
def test_smoothing_below_the_accumulation_range_keeps_masked_classes_infinite(dtype, labels_kind):
    """A smoothing whose share eps / C is below the smallest float32 (4.4e-72 / 2, found by
    the property suite) still puts a positive weight on every class: a masked class makes
    the loss infinite, as in the float64 reference, not 0."""
    logits = np.array([[0.0, -np.inf], [1.0, 2.0]], dtype=dtype)
    eps = 4.3533350011471477e-72
    if labels_kind == "ids":
        labels = np.array([0, 1])
        got = fx.sparse_softmax_cross_entropy(logits, labels, label_smoothing=eps, return_grad=True)
        want = ref.sparse_softmax_cross_entropy(logits, labels, label_smoothing=eps, return_grad=True)
    else:
        labels = np.eye(2, dtype=dtype)[[0, 1]]
        got = fx.softmax_cross_entropy(logits, labels, label_smoothing=eps, return_grad=True)
        want = ref.softmax_cross_entropy(logits, labels, label_smoothing=eps, return_grad=True)
    assert got[0][0] == np.inf and np.isfinite(got[0][1])
    compare(got, want, dtype, "tiny smoothing")


def test_large_magnitudes():
    logits = make_logits((5, 300), np.float32) * 3000
    labels = make_class_ids((5,), 300)
    compare(fx.sparse_softmax_cross_entropy(logits, labels, return_grad=True),
             ref.sparse_softmax_cross_entropy(logits, labels, return_grad=True), np.float32, "±1e4")


def test_ties_and_uniform_rows():
    logits = np.zeros((4, 1000), np.float32)
    labels = np.array([0, 999, 500, 3])
    compare(fx.sparse_softmax_cross_entropy(logits, labels, return_grad=True),
             ref.sparse_softmax_cross_entropy(logits, labels, return_grad=True), np.float32, "uniform")
    assert_close(fx.sparse_softmax_cross_entropy(logits, labels), np.full(4, np.log(1000.0)),
                 np.float32, "value", "log(C)")


@pytest.mark.parametrize("grad_output", ["scalar", "per_row", "broadcast_column"])
def test_grad_output(grad_output):
    logits = make_logits((4, 3, 10), np.float32)
    labels = make_class_ids((4, 3), 10)
    rng = np.random.default_rng(9)
    upstream = {"scalar": np.float32(2.5), "per_row": rng.standard_normal((4, 3)),
                "broadcast_column": rng.standard_normal((4, 1))}[grad_output]
    compare(fx.sparse_softmax_cross_entropy(logits, labels, return_grad=True, grad_output=upstream),
             ref.sparse_softmax_cross_entropy(logits, labels, return_grad=True, grad_output=upstream),
             np.float32, grad_output)
    for reduction in ("sum", "mean"):
        compare(
            fx.sparse_softmax_cross_entropy(logits, labels, return_grad=True, reduction=reduction,
                                            grad_output=0.5),
            ref.sparse_softmax_cross_entropy(logits, labels, return_grad=True, reduction=reduction,
                                             grad_output=0.5),
            np.float32, reduction)


def test_mean_over_nothing_is_zero():
    logits = make_logits((3, 4), np.float32)
    labels = np.full(3, -100)
    loss, grad = fx.sparse_softmax_cross_entropy(logits, labels, ignore_index=-100, reduction="mean",
                                                 return_grad=True)
    assert loss.shape == () and loss.dtype == np.float32 and float(loss) == 0.0
    assert not grad.any()
    weights = np.array([0.0, 0.0, 1.0, 1.0])
    loss, grad = fx.sparse_softmax_cross_entropy(logits, np.array([0, 1, 0]), class_weight=weights,
                                                 label_smoothing=0.1, reduction="mean", return_grad=True)
    assert float(loss) == 0.0 and not grad.any()
    empty = np.zeros((0, 4), np.float32)
    loss, grad = fx.sparse_softmax_cross_entropy(empty, np.zeros(0, np.int64), reduction="mean",
                                                 return_grad=True)
    assert float(loss) == 0.0 and grad.shape == (0, 4)


def test_reduced_loss_is_zero_d_array_of_loss_dtype():
    for dtype in FLOAT_DTYPES:
        logits = make_logits((3, 4), dtype)
        loss = fx.sparse_softmax_cross_entropy(logits, np.array([0, 1, 2]), reduction="sum")
        assert isinstance(loss, np.ndarray) and loss.shape == ()
        assert loss.dtype == (np.float32 if dtype.itemsize == 2 else dtype)


def test_label_dtypes_int8_uint16_int32():
    logits = make_logits((5, 7), np.float32)
    for label_dtype in (np.int8, np.uint16, np.int32, np.int64):
        labels = make_class_ids((5,), 7).astype(label_dtype)
        compare(fx.sparse_softmax_cross_entropy(logits, labels, return_grad=True),
                 ref.sparse_softmax_cross_entropy(logits, labels, return_grad=True), np.float32,
                 np.dtype(label_dtype).name)


def test_inputs_are_not_modified():
    logits = make_logits((6, 33), np.float32)
    labels = make_class_ids((6,), 33)
    soft = make_distribution((6, 33))
    weights = np.linspace(0.5, 1.5, 33)
    upstream = np.arange(6, dtype=np.float32)
    saved = [a.copy() for a in (logits, labels, soft, weights, upstream)]
    fx.sparse_softmax_cross_entropy(logits, labels, class_weight=weights, label_smoothing=0.1,
                                    softcap=5.0, z_loss=1e-3, return_grad=True, grad_output=upstream)
    fx.softmax_cross_entropy(logits, soft, return_grad=True, grad_output=upstream)
    fx.log_softmax(logits), fx.softmax(logits), fx.logsumexp(logits)
    for before, after in zip(saved, (logits, labels, soft, weights, upstream)):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_class_weights_are_linear_like_torch(backend):
    # PyTorch accepts any real class weights (its own module tests draw them
    # from [-9, 9]); the loss is linear in them, so the kernels need no sign rule.
    logits = make_logits((9, 5), np.float64)
    labels = make_class_ids((9,), 5, ignore_index=-100, ignore_fraction=0.3)
    weights = np.array([1.5, -2.0, 0.25, -0.5, 3.0])
    options = dict(ignore_index=-100, class_weight=weights, label_smoothing=0.1, z_loss=1e-3)
    for reduction in ("none", "sum", "mean"):
        expected = ref.sparse_softmax_cross_entropy(logits, labels, reduction=reduction, return_grad=True,
                                                    **options)
        got = fx.sparse_softmax_cross_entropy(logits, labels, reduction=reduction, return_grad=True,
                                              backend=backend, **options)
        compare(got, expected, np.float64, f"{backend} negative weights {reduction}")

    def unreduced(w):
        return fx.sparse_softmax_cross_entropy(logits, labels, ignore_index=-100, class_weight=w,
                                               backend=backend)

    assert_close(unreduced(np.maximum(weights, 0)) + unreduced(np.minimum(weights, 0)), unreduced(weights),
                 np.float64, "value", "linear in the weights")
    # Weights summing to zero over the counted rows: the mean is still 0.0.
    loss, grad = fx.sparse_softmax_cross_entropy(logits[:2], np.array([0, 1]), class_weight=[2.0, -2.0, 1, 1, 1],
                                                 reduction="mean", return_grad=True, backend=backend)
    assert float(loss) == 0.0 and not grad.any()


def test_float64_rows_beyond_half_the_maximum():
    """float64 scores past half the maximum, where the reference's ``x - max(x)`` itself
    overflows (tests/test_properties.py sweeps float64 up to max/2 only). A log-probability
    of ``-max - max`` is beyond float64: fastxent returns it rounded, ``-inf`` (loss
    ``+inf``, probability 0, gradient 0 there); everything representable is exact."""
    big = float(np.finfo(np.float64).max)
    x = np.array([[big, -big, 0.0]] * 3)
    y = np.array([0, 1, 2])
    loss, grad = fx.sparse_softmax_cross_entropy(x, y, return_grad=True)
    np.testing.assert_array_equal(loss, [0.0, np.inf, big])
    np.testing.assert_array_equal(grad, [[0.0, 0.0, 0.0], [1.0, -1.0, 0.0], [1.0, 0.0, -1.0]])
    np.testing.assert_array_equal(fx.softmax_cross_entropy(x, np.eye(3)), [0.0, np.inf, big])
    np.testing.assert_array_equal(fx.logsumexp(x), [big] * 3)
    np.testing.assert_array_equal(fx.log_softmax(x), [[0.0, -np.inf, -big]] * 3)
    got = fx.score(x, y)
    np.testing.assert_array_equal(got.target_logprob, [0.0, -np.inf, -big])
    np.testing.assert_array_equal(got.entropy, [0.0] * 3)
