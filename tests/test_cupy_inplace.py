"""``inplace=True`` and reduced losses (``total=True``) on the CUDA backend, against the reference.

The public calls with ``inplace=True`` on CuPy arrays (sparse and soft softmax,
sigmoid, binary; every dtype; the launch paths of C = 3, 423 and 50257): the
gradient must land in the caller's device buffer (same pointer) and equal the
reference's. The contract's ``total=True`` on every loss: a float64 0-d device
array, the sum of the unreduced loss. In ``tests/test_cupy.py``'s style; the
whole module skips, with the reason, where CuPy or a CUDA device is missing.
"""

import numpy as np
import pytest

cupy = pytest.importorskip(
    "cupy", reason="CuPy is not installed (pip install 'fastxent[cuda12]' or '[cuda13]'); "
                   "the CUDA backend tests need it")


def _no_device_reason():
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 -- no driver, or a driver too old for this CuPy
        return f"CuPy sees no usable CUDA driver ({type(exc).__name__}: {exc})"
    return None if count > 0 else "CuPy sees no CUDA device"


if _no_device_reason() is not None:
    pytest.skip(f"{_no_device_reason()}: the CUDA backend tests need a GPU", allow_module_level=True)

import fastxent as fx  # noqa: E402
from fastxent import reference as ref  # noqa: E402
from fastxent.backends import cuda as cuda_backend  # noqa: E402
from tests.support import (  # noqa: E402
    BF16,
    DTYPE_IDS,
    FLOAT_DTYPES,
    assert_close,
    compare,
    make_class_ids,
    make_distribution,
    make_logits,
)

pytestmark = pytest.mark.gpu


def _device(host):
    """A device copy of a host array; skips where CuPy cannot hold bfloat16."""
    host = np.asarray(host)
    try:
        return cupy.asarray(host)
    except Exception as exc:  # noqa: BLE001
        if host.dtype == BF16:
            pytest.skip(f"CuPy {cupy.__version__} cannot hold ml_dtypes.bfloat16 arrays: {exc}")
        raise


def _host(value):
    return value.get() if isinstance(value, cupy.ndarray) else np.asarray(value)


def _targets(shape):
    return (np.random.default_rng(8).random(shape) < 0.5).astype(np.float32)


#: name -> (function, make (first, labels, options) for a shape and dtype)
CASES = {
    "sparse": (fx.sparse_softmax_cross_entropy, lambda shape, dtype: (
        make_logits(shape, dtype), make_class_ids(shape[:1], shape[1], ignore_index=-100, ignore_fraction=0.2),
        {"ignore_index": -100, "label_smoothing": 0.1, "z_loss": 1e-4})),
    "soft": (fx.softmax_cross_entropy, lambda shape, dtype: (
        make_logits(shape, dtype), make_distribution(shape, dtype=np.float32), {"label_smoothing": 0.1})),
    "sigmoid": (fx.sigmoid_cross_entropy, lambda shape, dtype: (
        make_logits(shape, dtype), _targets(shape), {"pos_weight": np.linspace(0.5, 2.0, shape[1])})),
    "binary": (fx.binary_cross_entropy, lambda shape, dtype: (
        np.random.default_rng(7).uniform(0.01, 0.99, shape).astype(dtype), _targets(shape), {})),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(7, 3), (9, 423), (3, 50257)], ids=["7x3", "9x423", "3x50257"])
@pytest.mark.parametrize("case", list(CASES))
def test_inplace_writes_the_gradient_into_the_device_buffer(dtype, shape, case):
    fn, make = CASES[case]
    first, labels, options = make(shape, dtype)
    for reduction in ("none", "mean"):
        expected = getattr(ref, fn.__name__)(first, labels, reduction=reduction, return_grad=True, **options)
        buffer = _device(first)
        loss, grad = fn(buffer, _device(labels), reduction=reduction, return_grad=True, inplace=True, **options)
        assert grad.data.ptr == buffer.data.ptr and grad.shape == buffer.shape, "grad must be the logits' buffer"
        compare((_host(loss), _host(grad)), expected, dtype, f"cupy {case} {reduction} inplace")


def test_inplace_refuses_a_non_contiguous_device_array():
    x = _device(make_logits((6, 20), np.float32))[:, ::2]
    with pytest.raises(ValueError, match="C-contiguous along its class axis"):
        fx.sparse_softmax_cross_entropy(x, _device(make_class_ids((6,), 10)), return_grad=True, inplace=True)


@pytest.mark.parametrize("name", ["sparse_softmax_cross_entropy", "softmax_cross_entropy", "sigmoid_cross_entropy",
                                  "binary_cross_entropy", "categorical_cross_entropy",
                                  "sparse_categorical_cross_entropy"])
def test_total_is_the_float64_sum_of_the_loss(name):
    shape = (9, 423)
    probs = np.random.default_rng(3).uniform(0.01, 0.99, shape).astype(np.float32)
    scores = make_logits(shape, np.float32)
    ids = make_class_ids(shape[:1], shape[1])
    arguments = {
        "sparse_softmax_cross_entropy": (scores, ids, None, None, 0.0, 0.0, None),
        "softmax_cross_entropy": (scores, make_distribution(shape, dtype=np.float32), 0.0, None),
        "sigmoid_cross_entropy": (scores, _targets(shape), None, 0.0),
        "binary_cross_entropy": (probs, _targets(shape), 1e-7, 0.0),
        "categorical_cross_entropy": (probs, make_distribution(shape, dtype=np.float32), 1e-7, 0.0),
        "sparse_categorical_cross_entropy": (probs, ids, 1e-7, None),
    }[name]
    first, labels, *options = arguments
    function = getattr(cuda_backend, name)
    unreduced, _ = function(_device(first), _device(labels), *options, None)
    total, _ = function(_device(first), _device(labels), *options, None, total=True)
    assert isinstance(total, cupy.ndarray) and total.shape == () and total.dtype == np.float64
    assert_close(_host(total), _host(unreduced).astype(np.float64).sum(), np.float32, "value", f"{name} total")
