"""Bad input: a ValueError/TypeError naming the argument and the value, before any kernel runs."""

import numpy as np
import pytest

import fastxent as fx
from tests.support import make_class_ids, make_logits

LOGITS = make_logits((4, 5), np.float32)
LABELS = make_class_ids((4,), 5)
SOFT = np.full((4, 5), 0.2, np.float32)
BACKENDS = ["numba", "numpy"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def sparse(**kwargs):
    args = {"logits": LOGITS, "labels": LABELS}
    args.update(kwargs)
    return fx.sparse_softmax_cross_entropy(args.pop("logits"), args.pop("labels"), **args)


@pytest.mark.parametrize("bad, position", [(5, "labels[2] = 5"), (-1, "labels[2] = -1"),
                                           (2**40, "labels[2] = 1099511627776")])
def test_label_out_of_range_names_position_and_value(backend, bad, position):
    labels = LABELS.copy()
    labels[2] = bad
    with pytest.raises(ValueError, match=r"labels\[2\] = .* is outside \[0, 5\)") as info:
        sparse(labels=labels, backend=backend)
    assert position in str(info.value)
    with pytest.raises(ValueError, match="outside"):
        fx.score(LOGITS, labels, backend=backend)
    with pytest.raises(ValueError, match="outside"):
        fx.sparse_categorical_cross_entropy(np.abs(LOGITS), labels, backend=backend)


def test_label_error_on_multi_dim_position(backend):
    logits = make_logits((2, 3, 5), np.float32)
    labels = make_class_ids((2, 3), 5)
    labels[1, 2] = 7
    with pytest.raises(ValueError, match=r"labels\[1, 2\] = 7 is outside \[0, 5\)"):
        fx.sparse_softmax_cross_entropy(logits, labels, backend=backend)


def test_ignore_index_is_exempt_but_other_negatives_are_not(backend):
    labels = LABELS.copy()
    labels[0] = -100
    sparse(labels=labels, ignore_index=-100, backend=backend)
    labels[1] = -5
    with pytest.raises(ValueError, match=r"labels\[1\] = -5 .*ignore_index=-100"):
        sparse(labels=labels, ignore_index=-100, backend=backend)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex64, object])
def test_non_float_scores_are_type_errors(backend, dtype):
    with pytest.raises(TypeError, match="logits must be float16, bfloat16, float32 or float64"):
        sparse(logits=LOGITS.astype(dtype), backend=backend)
    with pytest.raises(TypeError, match="x must be"):
        fx.logsumexp(LOGITS.astype(dtype), backend=backend)


def test_single_class_points_to_the_binary_losses(backend):
    one = make_logits((4, 1), np.float32)
    with pytest.raises(ValueError, match="single class.*sigmoid_cross_entropy"):
        sparse(logits=one, labels=np.zeros(4, np.int64), backend=backend)
    with pytest.raises(ValueError, match="single class.*sigmoid_cross_entropy"):
        fx.softmax_cross_entropy(one, np.ones((4, 1), np.float32), backend=backend)
    with pytest.raises(ValueError, match="single class.*binary_cross_entropy"):
        fx.categorical_cross_entropy(np.ones((4, 1)), np.ones((4, 1)), backend=backend)
    with pytest.raises(ValueError, match="single class.*binary_cross_entropy"):
        fx.sparse_categorical_cross_entropy(np.ones((4, 1)), np.zeros(4, np.int64), backend=backend)
    # the building blocks accept C == 1
    assert np.all(fx.log_softmax(one, backend=backend) == 0)
    np.testing.assert_allclose(fx.logsumexp(one, backend=backend), one[:, 0])


def test_zero_classes(backend):
    with pytest.raises(ValueError, match="0 classes"):
        sparse(logits=np.zeros((4, 0), np.float32), labels=np.zeros(4, np.int64), backend=backend)
    with pytest.raises(ValueError, match="0 classes"):
        fx.logsumexp(np.zeros((3, 0)), backend=backend)


def test_shape_mismatches(backend):
    with pytest.raises(ValueError, match=r"labels has shape \(3,\), expected \(4,\)"):
        sparse(labels=LABELS[:3], backend=backend)
    with pytest.raises(ValueError, match="squeeze the trailing 1"):
        sparse(labels=LABELS[:, None], backend=backend)
    with pytest.raises(ValueError, match="one-hot or soft labels: use softmax_cross_entropy"):
        sparse(labels=np.zeros((4, 5), np.int64), backend=backend)
    with pytest.raises(TypeError, match="distribution over classes use softmax_cross_entropy"):
        sparse(labels=SOFT, backend=backend)
    with pytest.raises(ValueError, match=r"labels has shape \(4,\), expected the logits' shape.*sparse_softmax"):
        fx.softmax_cross_entropy(LOGITS, np.zeros(4, np.float32), backend=backend)
    with pytest.raises(TypeError, match="for class ids use sparse_softmax_cross_entropy"):
        fx.softmax_cross_entropy(LOGITS, np.zeros((4, 5), np.int64), backend=backend)
    with pytest.raises(ValueError, match="v has shape"):
        fx.softmax_cross_entropy_hvp(LOGITS, LOGITS[:2], backend=backend)


def test_float_class_ids_are_type_errors(backend):
    with pytest.raises(TypeError, match="labels must be integer class ids, got dtype float32"):
        sparse(labels=LABELS.astype(np.float32), backend=backend)


@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"reduction": "avg"}, ValueError, "reduction='avg'"),
    ({"reduction": None}, ValueError, "reduction=None"),
    ({"axis": 2}, ValueError, "axis=2 is out of range"),
    ({"axis": 1.0}, TypeError, "axis must be an int"),
    ({"label_smoothing": 1.5}, ValueError, r"label_smoothing=1.5 must lie in \[0, 1\]"),
    ({"label_smoothing": -0.1}, ValueError, "label_smoothing=-0.1"),
    ({"label_smoothing": float("nan")}, ValueError, "label_smoothing must not be NaN"),
    ({"label_smoothing": "0.1"}, TypeError, "label_smoothing must be a real number"),
    ({"z_loss": -1.0}, ValueError, "z_loss=-1.0 must be finite and >= 0"),
    ({"z_loss": float("inf")}, ValueError, "z_loss=inf"),
    ({"softcap": 0.0}, ValueError, "softcap=0.0 must be None or finite and > 0"),
    ({"softcap": -3.0}, ValueError, "softcap=-3.0"),
    ({"ignore_index": 1.5}, TypeError, "ignore_index must be None or an int"),
    ({"ignore_index": True}, TypeError, "ignore_index must be None or an int"),
    ({"class_weight": np.ones(4)}, ValueError, r"class_weight has shape \(4,\), expected \(5,\)"),
    ({"class_weight": np.array([1, 1, np.inf, 1, 1.0])}, ValueError, r"class_weight\[2\] = inf must be finite"),
    ({"class_weight": np.array([1, 1, 1, np.nan, 1])}, ValueError, r"class_weight\[3\] = nan"),
    ({"return_grad": "yes"}, TypeError, "return_grad must be True or False"),
    ({"grad_output": np.ones(5)}, ValueError, "grad_output has shape"),
    ({"grad_output": np.ones((2, 4))}, ValueError, "without enlarging"),
    ({"backend": "torch"}, ValueError, "backend='torch' is not a fastxent backend"),
    ({"backend": "cupy"}, ValueError, "backend='cupy' runs on CUDA arrays"),
    ({"bogus": 1}, TypeError, "bogus"),
])
def test_bad_options(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        sparse(**kwargs)


def test_reduced_grad_output_must_be_scalar():
    with pytest.raises(ValueError, match="grad_output has shape"):
        sparse(reduction="mean", return_grad=True, grad_output=np.ones(4))


@pytest.mark.parametrize("function, kwargs", [
    (fx.binary_cross_entropy, {"epsilon": 0.0}),
    (fx.binary_cross_entropy, {"epsilon": 0.5}),
    (fx.categorical_cross_entropy, {"epsilon": -1e-7}),
])
def test_epsilon_range(function, kwargs):
    probs = np.full((4, 5), 0.2)
    with pytest.raises(ValueError, match=r"epsilon=.* must lie in \(0, 0.5\)"):
        function(probs, probs, **kwargs)


def test_positional_options_are_rejected():
    with pytest.raises(TypeError):
        fx.sparse_softmax_cross_entropy(LOGITS, LABELS, -1)


def test_pos_weight_must_not_enlarge():
    logits = make_logits((4, 5), np.float32)
    labels = np.ones((4, 5), np.float32)
    with pytest.raises(ValueError, match="pos_weight has shape"):
        fx.sigmoid_cross_entropy(logits, labels, pos_weight=np.ones((2, 4, 5)))
    with pytest.raises(ValueError, match="pos_weight has shape"):
        fx.sigmoid_cross_entropy(logits, labels, pos_weight=np.ones(3))


def test_elementwise_label_shape_and_dtype():
    logits = make_logits((4, 5), np.float32)
    with pytest.raises(ValueError, match="labels has shape"):
        fx.sigmoid_cross_entropy(logits, np.ones((4, 1), np.float32))
    with pytest.raises(TypeError, match="cast 0/1 integers"):
        fx.sigmoid_cross_entropy(logits, np.ones((4, 5), np.int64))


class _FakeCudaArray:
    """Claims to live on a CUDA device (``__cuda_array_interface__``) without being usable."""

    __cuda_array_interface__ = {"shape": (4,), "typestr": "<i8", "data": (0, False), "version": 3}


def test_mixing_host_and_device_arrays_names_both():
    with pytest.raises(TypeError, match="labels is a CUDA array but logits is a host ndarray"):
        fx.sparse_softmax_cross_entropy(LOGITS, _FakeCudaArray())
