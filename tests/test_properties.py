"""Bounded property tests (hypothesis): the Numba backend agrees with the reference
on arbitrary small shapes, magnitudes, -inf masks and options."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastxent as fx
from fastxent import reference as ref
from fastxent._score import Score
from tests.support import FLOAT_DTYPES, assert_close, assert_same_dtype, expected, tolerance

BOUNDED = settings(max_examples=60, deadline=None, derandomize=True)

DTYPES = st.sampled_from([np.dtype(np.float32), np.dtype(np.float64)])


@st.composite
def logits_and_labels(draw, min_classes=2):
    dtype = draw(DTYPES)
    rows = draw(st.integers(0, 6))
    classes = draw(st.integers(min_classes, 40))
    scale = draw(st.sampled_from([1.0, 30.0, 1e4]))
    values = draw(hnp.arrays(np.float64, (rows, classes),
                             elements=st.floats(-1.0, 1.0, allow_nan=False, allow_infinity=False)))
    logits = (values * scale).astype(dtype)
    labels = draw(hnp.arrays(np.int64, (rows,), elements=st.integers(0, classes - 1)))
    mask = draw(hnp.arrays(np.bool_, (rows, classes), elements=st.booleans()))
    if draw(st.booleans()) and rows:
        # -inf masks anywhere but at the target: the loss must stay finite
        mask[np.arange(rows), labels] = False
        logits = np.where(mask, -np.inf, logits).astype(dtype)
    return logits, labels


@BOUNDED
@given(logits_and_labels(), st.sampled_from(["none", "sum", "mean"]),
       st.sampled_from([0.0, 0.1]), st.sampled_from([None, 5.0]), st.sampled_from([0.0, 1e-3]))
def test_sparse_agrees_with_reference(case, reduction, smoothing, softcap, z_loss):
    logits, labels = case
    options = dict(reduction=reduction, label_smoothing=smoothing, softcap=softcap, z_loss=z_loss,
                   return_grad=True)
    loss, grad = fx.sparse_softmax_cross_entropy(logits, labels, **options)
    expected_loss, expected_grad = ref.sparse_softmax_cross_entropy(logits, labels, **options)
    assert_close(loss, expected_loss, logits.dtype, "value", "loss")
    assert_close(grad, expected_grad, logits.dtype, "stored", "grad")
    if smoothing == 0 and softcap is None:
        assert np.all(np.isfinite(loss)), "masking -inf away from the target keeps the loss finite"


@BOUNDED
@given(logits_and_labels(min_classes=1))
def test_building_blocks_agree_with_reference(case):
    logits, _ = case
    assert_close(fx.logsumexp(logits), ref.logsumexp(logits), logits.dtype, "value", "logsumexp")
    assert_close(fx.log_softmax(logits), ref.log_softmax(logits), logits.dtype, "stored", "log_softmax")
    assert_close(fx.softmax(logits), ref.softmax(logits), logits.dtype, "stored", "softmax")


@BOUNDED
@given(logits_and_labels(), st.floats(0.0, 1.0))
def test_soft_labels_agree_and_gradient_rows_sum_to_zero(case, smoothing):
    logits, labels = case
    rows, classes = logits.shape
    targets = np.zeros((rows, classes), logits.dtype)
    targets[np.arange(rows), labels] = 1
    loss, grad = fx.softmax_cross_entropy(logits, targets, label_smoothing=smoothing, return_grad=True)
    expected_loss, expected_grad = ref.softmax_cross_entropy(logits, targets, label_smoothing=smoothing,
                                                             return_grad=True)
    assert_close(loss, expected_loss, logits.dtype, "value", "loss")
    assert_close(grad, expected_grad, logits.dtype, "stored", "grad")
    finite = np.all(np.isfinite(grad), axis=1)
    # labels summing to 1: softmax - y sums to 0 on every finite row
    assert_close(grad[finite].sum(axis=1), np.zeros(int(finite.sum())), logits.dtype, "stored",
                 "row sums", tol=(0, 1e-5))


@BOUNDED
@given(logits_and_labels())
def test_score_agrees_with_reference(case):
    logits, labels = case
    got = fx.score(logits, labels)
    expected = ref.score(logits, labels)
    for field in ("loss", "lse", "target_logprob", "entropy"):
        assert_close(getattr(got, field), getattr(expected, field), logits.dtype, "value", field)
    np.testing.assert_array_equal(got.argmax, expected.argmax)
    np.testing.assert_array_equal(got.correct, expected.correct)


# ----------------------------------------------------------------------------
# Edge inputs (issue 10): byte order, every dtype, scores near the float range, options
# ----------------------------------------------------------------------------
#
# Every public function, on a grid of score dtype (float16, bfloat16, float32, float64) x
# byte order of the scores (native, swapped: GRID), and within each cell drawn: the
# function of the family, the shape, label dtypes (every integer width for class ids; bool,
# the scores' dtype or float32 for dense labels), the byte order of the labels and of every
# parameter array (class_weight, pos_weight, grad_output, v), scores of every magnitude up
# to the float maximum (±max, ±max/2, ±max/4, alone or mixed with ordinary values and -inf
# masks) and each option off and on. bfloat16 is swapped too (ml_dtypes' ``newbyteorder``
# keeps the name bfloat16, prints as ``>V2`` and stores the bytes swapped). Expected
# values: the float64 reference, the softmax family on each row shifted by its maximum
# (``tests.support.expected``). Each check takes the backend and a function that puts an
# array where that backend runs, so tests/test_cupy_edges.py draws the same cases for the
# CUDA backend.
#
# Inputs tried: 5 families x 8 cells x EDGE's 8 examples = 320 calls (derandomized: the
# same 320 on every run). Compiled variants: byte order and parameter arrays add none
# (inputs are brought to the native order, parameters to the accumulation dtype, before
# any kernel); dense labels of bool or float32 add one per kernel, score dtype and pass.

EDGE = settings(max_examples=8, deadline=None, derandomize=True)

SCORE_DTYPES = st.sampled_from(FLOAT_DTYPES)
BYTE_ORDERS = st.sampled_from(["native", "swapped"])
CLASS_ID_DTYPES = st.sampled_from([np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64, np.uint8,
                                                         np.uint16, np.uint32, np.uint64)])
PARAMETER_DTYPES = st.sampled_from([np.dtype(np.float32), np.dtype(np.float64)])


def in_byte_order(array, order):
    """``array`` itself, or the same values stored in the other byte order (``>f4`` on a
    little-endian machine); one-byte items have no byte order: themselves."""
    array = np.asarray(array)
    if order == "native" or array.dtype.itemsize == 1:
        return array
    swapped = array.astype(array.dtype.newbyteorder("S"))
    assert not swapped.dtype.isnative
    wide = np.float64 if array.dtype.kind in "fV" else array.dtype.newbyteorder("=")
    assert np.array_equal(swapped.astype(wide), array.astype(wide), equal_nan=array.dtype.kind in "fV")
    return swapped


def float_max(dtype):
    return float(ml_dtypes.finfo(dtype).max)


def saturated(values, dtype, rtol):
    """float64 copy of ``values`` with every magnitude within ``rtol`` of the largest finite
    ``dtype`` (or beyond) as ±inf: a value the float64 reference puts just below the maximum
    may round to inf in the backend's own arithmetic, and the other way round."""
    values = np.asarray(values).astype(np.float64)
    limit = float_max(dtype) * (1.0 - 4.0 * rtol)
    with np.errstate(invalid="ignore"):
        return np.where(np.abs(values) >= limit, np.sign(values) * np.inf, values)


def assert_edge_close(got, want, dtype, kind, what, scale=None):
    """``assert_close`` with the tolerance of the scores' dtype, the output's dtype checked
    and magnitudes at the top of the output's range compared as infinities. ``scale``
    multiplies both sides first (and the absolute tolerance, plus two subnormal steps of
    ``dtype``), for values whose size is ``1 / scale``."""
    got, want = np.asarray(got), np.asarray(want)
    assert_same_dtype(got, want, what)
    rtol, atol = tolerance(dtype, kind)
    got, want = saturated(got, want.dtype, rtol), saturated(want, want.dtype, rtol)
    if scale is not None:
        with np.errstate(invalid="ignore", over="ignore"):
            got, want = got * scale, want * scale
            atol = atol + 2.0 * scale * float(ml_dtypes.finfo(dtype).smallest_subnormal)
    assert_close(got, want, dtype, kind, what, tol=(rtol, atol))


def assert_edge_result(got, want, dtype, what, grad_scale=None):
    """A function's result (array, ``(loss, grad)`` or a Score) against the expected one;
    ``grad_scale`` as ``assert_edge_close``'s ``scale`` for the gradient."""
    if isinstance(want, Score):
        for field in ("loss", "lse", "target_logprob", "entropy"):
            assert_edge_close(getattr(got, field), getattr(want, field), dtype, "value", f"{what} {field}")
        for field in ("argmax", "correct"):
            np.testing.assert_array_equal(np.asarray(getattr(got, field)), getattr(want, field), f"{what} {field}")
    elif isinstance(want, tuple):
        assert_edge_close(got[0], want[0], dtype, "value", f"{what} loss")
        assert_edge_close(got[1], want[1], dtype, "stored", f"{what} grad", grad_scale)
    else:
        assert_edge_close(got, want, dtype, "value", what)


@st.composite
def edge_values(draw, dtype, shape, low=None, reach=1.0):
    """Scores of ``dtype`` and ``shape``: ordinary (|x| <= 8), extreme (±big, ±big/2, ±big/4,
    big = ``reach`` times the largest finite ``dtype``) or a mixture of both. ``low=0`` keeps
    them non-negative and 0 or at least 1e-3 (probabilities: a row summing to a subnormal
    number is left out, see ``probability_cases``)."""
    big = float_max(dtype) * reach
    extremes = [big, big / 2, big / 4] + ([] if low == 0 else [-big, -big / 2, -big / 4])
    ordinary = st.floats(-8.0, 8.0) if low is None else st.one_of(st.just(0.0), st.floats(1e-3, 8.0))
    kind = draw(st.sampled_from(["ordinary", "mixed", "extreme"]))
    elements = {"ordinary": ordinary, "mixed": st.one_of(ordinary, st.sampled_from(extremes)),
                "extreme": st.sampled_from(extremes)}[kind]
    return draw(hnp.arrays(np.float64, shape, elements=elements)).astype(dtype)


@st.composite
def masked(draw, scores):
    """``scores`` with -inf (masking) drawn anywhere, or unchanged."""
    if not draw(st.booleans()) or not scores.size:
        return scores
    mask = draw(hnp.arrays(np.bool_, scores.shape, elements=st.booleans()))
    return np.where(mask, -np.inf, scores).astype(scores.dtype)


@st.composite
def parameter_array(draw, values):
    """``values`` as a float32 or float64 parameter array in a drawn byte order."""
    return in_byte_order(np.asarray(values, dtype=draw(PARAMETER_DTYPES)), draw(BYTE_ORDERS))


@st.composite
def grad_outputs(draw, loss_shape, reduction):
    """None, a number, or (unreduced) an array of the loss's shape holding zeros."""
    kind = draw(st.sampled_from(["none", "number", "array"] if reduction == "none" else ["none", "number"]))
    if kind == "none":
        return None
    if kind == "number":
        return draw(st.sampled_from([0.0, 0.5, 3.0]))
    values = draw(hnp.arrays(np.float64, loss_shape, elements=st.sampled_from([0.0, 1.0, -2.5])))
    return draw(parameter_array(values))


@st.composite
def dense_labels(draw, shape, score_dtype, one_hot=False):
    """Labels of ``shape``: bool, or the scores' dtype or float32 (drawn), in a drawn byte
    order; distributions with zeros (or one-hot when ``one_hot``)."""
    dtype = draw(st.sampled_from([np.dtype(np.bool_), np.dtype(score_dtype), np.dtype(np.float32)]))
    if dtype == np.bool_ or one_hot:
        values = draw(hnp.arrays(np.bool_, shape, elements=st.booleans()))
    else:
        values = draw(hnp.arrays(np.float64, shape, elements=st.sampled_from([0.0, 0.25, 0.5, 1.0])))
    return in_byte_order(values.astype(dtype), draw(BYTE_ORDERS))


@st.composite
def class_ids(draw, rows, classes):
    """``(labels, ignore_index)``: class ids of a drawn integer width and byte order, some
    rows ignored (-100, or 200 for unsigned widths) when ``ignore_index`` is drawn."""
    dtype = draw(CLASS_ID_DTYPES)
    labels = draw(hnp.arrays(np.int64, (rows,), elements=st.integers(0, classes - 1)))
    ignore_index = None
    if draw(st.booleans()):
        ignore_index = 200 if dtype.kind == "u" else -100
        labels = np.where(draw(hnp.arrays(np.bool_, (rows,), elements=st.booleans())), ignore_index, labels)
    return in_byte_order(labels.astype(dtype), draw(BYTE_ORDERS)), ignore_index


def _shape(draw, min_classes=2):
    return draw(st.integers(0, 4)), draw(st.integers(min_classes, 9))


def _row_reach(dtype):
    """How far the softmax family's scores reach: the float maximum, but half of it in float64,
    where the reference's ``x - max(x)`` overflows beyond (its float32 rows are float64 inside;
    test_softmax_family.py::test_float64_rows_beyond_half_the_maximum covers the rest)."""
    return 0.5 if dtype == np.float64 else 1.0


@st.composite
def sparse_softmax_cases(draw, dtype=None):
    dtype = draw(SCORE_DTYPES) if dtype is None else dtype
    rows, classes = _shape(draw)
    logits = draw(masked(draw(edge_values(dtype, (rows, classes), reach=_row_reach(dtype)))))
    labels, ignore_index = draw(class_ids(rows, classes))
    reduction = draw(st.sampled_from(["none", "sum", "mean"]))
    options = {"ignore_index": ignore_index, "reduction": reduction,
               "label_smoothing": draw(st.sampled_from([0.0, 0.1, 1.0])),
               "z_loss": draw(st.sampled_from([0.0, 1e-3])), "softcap": draw(st.sampled_from([None, 5.0])),
               "return_grad": draw(st.booleans())}
    if draw(st.booleans()):
        options["class_weight"] = draw(parameter_array(
            draw(hnp.arrays(np.float64, (classes,), elements=st.sampled_from([0.0, 0.5, 1.0, 2.0])))))
    if options["return_grad"]:
        options["grad_output"] = draw(grad_outputs((rows,), reduction))
    return "sparse_softmax_cross_entropy", logits, labels, options


@st.composite
def soft_softmax_cases(draw, dtype=None):
    dtype = draw(SCORE_DTYPES) if dtype is None else dtype
    rows, classes = _shape(draw)
    logits = draw(masked(draw(edge_values(dtype, (rows, classes), reach=_row_reach(dtype)))))
    reduction = draw(st.sampled_from(["none", "sum", "mean"]))
    options = {"reduction": reduction, "label_smoothing": draw(st.sampled_from([0.0, 0.1, 1.0])),
               "softcap": draw(st.sampled_from([None, 5.0])), "return_grad": draw(st.booleans())}
    if options["return_grad"]:
        options["grad_output"] = draw(grad_outputs((rows,), reduction))
    return "softmax_cross_entropy", logits, draw(dense_labels((rows, classes), dtype)), options


@st.composite
def row_function_cases(draw, dtype=None):
    """The building blocks, the hvp and score (no options but the labels or ``v``)."""
    fn = draw(st.sampled_from(["logsumexp", "log_softmax", "softmax", "softmax_cross_entropy_hvp", "score"]))
    dtype = draw(SCORE_DTYPES) if dtype is None else dtype
    rows, classes = _shape(draw, min_classes=1 if fn in ("logsumexp", "log_softmax", "softmax") else 2)
    logits = draw(masked(draw(edge_values(dtype, (rows, classes), reach=_row_reach(dtype)))))
    if fn == "score":
        labels, ignore_index = draw(class_ids(rows, classes))
        return fn, logits, labels, {"ignore_index": ignore_index}
    if fn == "softmax_cross_entropy_hvp":
        v_dtype = draw(st.sampled_from([np.dtype(dtype), np.dtype(np.float32)]))
        v = draw(hnp.arrays(np.float64, (rows, classes), elements=st.floats(-4.0, 4.0))).astype(v_dtype)
        return fn, logits, in_byte_order(v, draw(BYTE_ORDERS)), {}
    return fn, logits, None, {}


@st.composite
def sigmoid_cases(draw, dtype=None):
    dtype = draw(SCORE_DTYPES) if dtype is None else dtype
    shape = _shape(draw, min_classes=1)
    logits = draw(edge_values(dtype, shape))
    labels = draw(dense_labels(shape, dtype))
    options = {}
    pos_weight = draw(st.sampled_from(["none", "number", "per class", "full"]))
    if pos_weight == "number":
        options["pos_weight"] = draw(st.sampled_from([0.0, 0.5, 3.0]))
    elif pos_weight != "none":
        weight_shape = shape[-1:] if pos_weight == "per class" else shape
        options["pos_weight"] = draw(parameter_array(
            draw(hnp.arrays(np.float64, weight_shape, elements=st.sampled_from([0.0, 0.5, 1.0, 3.0])))))
    if draw(st.booleans()):
        return "sigmoid_cross_entropy_hessian_diag", logits, labels, options
    reduction = draw(st.sampled_from(["none", "sum", "mean"]))
    options.update(reduction=reduction, label_smoothing=draw(st.sampled_from([0.0, 0.1, 1.0])),
                   return_grad=draw(st.booleans()))
    if options["return_grad"]:
        options["grad_output"] = draw(grad_outputs(shape, reduction))
    return "sigmoid_cross_entropy", logits, labels, options


@st.composite
def probability_cases(draw, dtype=None):
    """Probabilities of every magnitude up to the float maximum (non-negative: Keras
    normalises each row by its sum), zeros included. Rows summing to a subnormal number are
    not drawn: their ``1 / sum`` overflows float32, and the Numba kernels multiply by it."""
    fn = draw(st.sampled_from(["binary_cross_entropy", "categorical_cross_entropy",
                               "sparse_categorical_cross_entropy"]))
    dtype = draw(SCORE_DTYPES) if dtype is None else dtype
    rows, classes = _shape(draw)
    probs = draw(edge_values(dtype, (rows, classes), low=0.0))
    reduction = draw(st.sampled_from(["none", "sum", "mean"]))
    options = {"reduction": reduction, "epsilon": draw(st.sampled_from([1e-7, 1e-3])),
               "return_grad": draw(st.booleans())}
    loss_shape = (rows, classes) if fn == "binary_cross_entropy" else (rows,)
    if options["return_grad"]:
        options["grad_output"] = draw(grad_outputs(loss_shape, reduction))
    if fn == "sparse_categorical_cross_entropy":
        labels, options["ignore_index"] = draw(class_ids(rows, classes))
    else:
        options["label_smoothing"] = draw(st.sampled_from([0.0, 0.1, 1.0]))
        labels = draw(dense_labels((rows, classes), dtype))
    return fn, probs, labels, options


def native(value):
    """The same values in the machine's byte order (what the oracle is given)."""
    if isinstance(value, np.ndarray) and not value.dtype.isnative:
        return value.astype(value.dtype.newbyteorder("="))
    return value


def check_edge_case(case, order, backend="numba", put=None, fetch=None):
    """Run one drawn case through fastxent on ``backend`` with the scores in byte ``order``
    against ``expected``; ``put`` places each main array where the backend runs (the
    host when None) and ``fetch`` brings the result back."""
    fn, first, second, options = case
    want = expected(fn, first, native(second), **{name: native(value) for name, value in options.items()})
    arrays = [in_byte_order(first, order)] + ([] if second is None else [second])
    got = getattr(fx, fn)(*(arrays if put is None else map(put, arrays)), backend=backend, **options)
    grad_scale = None
    if fn in ("categorical_cross_entropy", "sparse_categorical_cross_entropy"):
        # the gradient scales as 1 / (row sum): compared times the sum, relative to its size
        with np.errstate(over="ignore"):
            total = first.astype(np.float64).sum(axis=-1, keepdims=True)
        grad_scale = np.where(np.isfinite(total) & (total > 0), total, 1.0)
    assert_edge_result(got if fetch is None else fetch(got), want, first.dtype,
                       f"{fn} {first.dtype} {order} {options}", grad_scale)


#: The grid every family is swept on: each score dtype in each byte order, EDGE's examples
#: drawn per cell (functions, shapes, values, label and parameter dtypes, options).
GRID = pytest.mark.parametrize("dtype, order", [(d, o) for d in FLOAT_DTYPES for o in ("native", "swapped")],
                               ids=[f"{d.name}-{o}" for d in FLOAT_DTYPES for o in ("native", "swapped")])


@GRID
@EDGE
@given(data=st.data())
def test_edge_sparse_softmax(dtype, order, data):
    check_edge_case(data.draw(sparse_softmax_cases(dtype)), order)


@GRID
@EDGE
@given(data=st.data())
def test_edge_soft_softmax(dtype, order, data):
    check_edge_case(data.draw(soft_softmax_cases(dtype)), order)


@GRID
@EDGE
@given(data=st.data())
def test_edge_building_blocks_hvp_and_score(dtype, order, data):
    check_edge_case(data.draw(row_function_cases(dtype)), order)


@GRID
@EDGE
@given(data=st.data())
def test_edge_sigmoid_and_hessian_diag(dtype, order, data):
    check_edge_case(data.draw(sigmoid_cases(dtype)), order)


@GRID
@EDGE
@given(data=st.data())
def test_edge_probability_families(dtype, order, data):
    check_edge_case(data.draw(probability_cases(dtype)), order)
