"""Bounded property tests (hypothesis): the Numba backend agrees with the reference
on arbitrary small shapes, magnitudes, -inf masks and options."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastxent as fx
from fastxent import reference as ref
from tests.support import assert_close

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
