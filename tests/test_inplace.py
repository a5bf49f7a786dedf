"""``inplace=True``: the gradient written over the caller's first argument, on the host backends.

Each fused call that offers it (sparse and soft softmax, sigmoid, binary) is compared
with the float64 reference on a copy of the inputs: the returned gradient must be
the caller's own buffer (shared memory, same shape) holding what the out-of-place
call returns. The row kernels must read the target score and the smoothing sums
before they overwrite a row, so label smoothing, class weights, 16-bit rows (no
kept exponentials) and short rows (the transposed block kernel) each get a case.
Then the refusals (every one a ValueError naming the argument) and what the call
allocates: nothing of the logits' size (``tracemalloc`` sees numpy's allocations).
The CUDA side is in ``tests/test_cupy_inplace.py``.
"""

import tracemalloc

import numpy as np
import pytest

import fastxent as fx
from fastxent import reference as ref
from tests.support import BF16, compare, make_class_ids, make_distribution, make_logits

BACKENDS = ["numba", "numpy"]
DTYPES = [np.dtype(np.float32), BF16, np.dtype(np.float64)]
DTYPE_IDS = [d.name for d in DTYPES]


def _probs(shape, dtype):
    return np.random.default_rng(7).uniform(0.01, 0.99, shape).astype(dtype)


def _targets(shape):
    return (np.random.default_rng(8).random(shape) < 0.5).astype(np.float32)


#: name -> (function, make (first, labels, options) for a shape and dtype)
CASES = {
    "sparse": (fx.sparse_softmax_cross_entropy,
               lambda shape, dtype: (make_logits(shape, dtype), make_class_ids(shape[:1], shape[1]), {})),
    "sparse-smoothing-weights": (fx.sparse_softmax_cross_entropy, lambda shape, dtype: (
        make_logits(shape, dtype), make_class_ids(shape[:1], shape[1], ignore_index=-100, ignore_fraction=0.3),
        {"label_smoothing": 0.1, "class_weight": np.linspace(0.5, 2.0, shape[1]), "ignore_index": -100,
         "z_loss": 1e-4})),
    "sparse-softcap": (fx.sparse_softmax_cross_entropy, lambda shape, dtype: (
        make_logits(shape, dtype), make_class_ids(shape[:1], shape[1]), {"softcap": 5.0})),
    "soft": (fx.softmax_cross_entropy, lambda shape, dtype: (
        make_logits(shape, dtype), make_distribution(shape, dtype=np.float32), {"label_smoothing": 0.1})),
    "sigmoid": (fx.sigmoid_cross_entropy, lambda shape, dtype: (
        make_logits(shape, dtype), _targets(shape), {"pos_weight": np.linspace(0.5, 2.0, shape[1])})),
    "binary": (fx.binary_cross_entropy, lambda shape, dtype: (_probs(shape, dtype), _targets(shape), {})),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(300, 10), (5, 423), (2, 5000)], ids=["300x10", "5x423", "2x5000"])
@pytest.mark.parametrize("case", list(CASES))
def test_inplace_matches_reference(backend, dtype, shape, case):
    fn, make = CASES[case]
    first, labels, options = make(shape, dtype)
    reference = getattr(ref, fn.__name__)
    grad_output = np.linspace(0.5, 2.0, shape[0]) if case.startswith(("sparse", "soft")) else None
    for reduction in ("none", "mean"):
        go = grad_output if reduction == "none" else None
        expected = reference(first, labels, reduction=reduction, return_grad=True, grad_output=go, **options)
        buffer = first.copy()
        loss, grad = fn(buffer, labels, reduction=reduction, return_grad=True, grad_output=go, inplace=True,
                        backend=backend, **options)
        assert grad.shape == first.shape and np.shares_memory(grad, buffer), "grad must be the logits' buffer"
        compare((loss, grad), expected, dtype, f"{backend} {case} {reduction} inplace")


def test_inplace_on_a_class_axis_that_is_not_last():
    """axis=0 of a (C, 1, 1) array is C-contiguous along its class axis: written in place."""
    logits = make_logits((1, 7), np.float32).reshape(7, 1, 1)
    labels = np.array([[3]])
    expected = ref.sparse_softmax_cross_entropy(logits, labels, axis=0, return_grad=True)
    buffer = logits.copy()
    got = fx.sparse_softmax_cross_entropy(buffer, labels, axis=0, return_grad=True, inplace=True)
    assert np.shares_memory(got[1], buffer) and got[1].shape == (7, 1, 1)
    compare(got, expected, np.float32, "axis 0 inplace")


def test_inplace_mean_over_nothing_zeroes_the_buffer():
    logits = make_logits((4, 10), np.float32)
    loss, grad = fx.sparse_softmax_cross_entropy(logits, np.full(4, -100), ignore_index=-100, reduction="mean",
                                                 return_grad=True, inplace=True)
    assert float(loss) == 0.0 and np.shares_memory(grad, logits) and not grad.any()


def test_default_leaves_inputs_alone():
    logits = make_logits((6, 10), np.float32)
    kept = logits.copy()
    fx.sparse_softmax_cross_entropy(logits, make_class_ids((6,), 10), return_grad=True)
    np.testing.assert_array_equal(logits, kept)


@pytest.mark.parametrize("make, message", [
    (lambda x: (x, {"return_grad": False}), "needs return_grad=True"),
    (lambda x: (_read_only(x), {}), "writable"),
    (lambda x: (np.asfortranarray(x), {}), "C-contiguous along its class axis"),
    (lambda x: (x[:, ::2], {}), "C-contiguous along its class axis"),
    (lambda x: (x.tolist(), {}), "a list, not an array"),
    (lambda x: (x.astype(">f4"), {}), "byte-swapped"),
], ids=["no-grad", "read-only", "fortran", "strided", "list", "byte-swapped"])
def test_inplace_refusals_name_the_argument(make, message):
    first, options = make(make_logits((6, 10), np.float32))
    labels = make_class_ids((6,), 5)
    with pytest.raises(ValueError, match=message) as error:
        fx.sparse_softmax_cross_entropy(first, labels, inplace=True, **{"return_grad": True, **options})
    assert "logits" in str(error.value) or "return_grad" in str(error.value)


def test_inplace_refuses_labels_in_the_same_memory():
    both = np.random.default_rng(1).random((2, 6, 10)).astype(np.float32)
    with pytest.raises(ValueError, match="overwrite labels"):
        fx.sigmoid_cross_entropy(both[0], both[0], return_grad=True, inplace=True)


def test_inplace_must_be_a_bool():
    with pytest.raises(TypeError, match="inplace"):
        fx.binary_cross_entropy(_probs((3, 4), np.float32), _targets((3, 4)), return_grad=True, inplace="yes")


def _read_only(array):
    array.flags.writeable = False
    return array


@pytest.mark.parametrize("shape", [(512, 3000), (40000, 16)], ids=["512x3000", "40000x16"])
@pytest.mark.parametrize("case", ["sparse", "sparse-smoothing-weights", "sigmoid"])
def test_inplace_allocates_nothing_of_the_logits_size(shape, case):
    """Peak of numpy's allocations during the call: at most 32 bytes a row (the loss,
    label checks, the mean's denominator) and 64 KiB, where one array of the logits'
    size would be 64 bytes a row at 40000 x 16 (the Numba kernels' own scratch is
    per block of rows and not seen here: a few KiB per thread).

    ``reduction="mean"``: the sigmoid's reduced loss is summed per block in the
    kernel, so no ``(R, K)`` loss either.
    """
    fn, make = CASES[case]
    first, labels, options = make(shape, np.float32)
    fn(first.copy(), labels, reduction="mean", return_grad=True, inplace=True, **options)   # compiled
    tracemalloc.start()
    try:
        fn(first, labels, reduction="mean", return_grad=True, inplace=True, **options)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 32 * shape[0] + 65536, f"peak {peak} bytes for logits of {first.nbytes} bytes"
