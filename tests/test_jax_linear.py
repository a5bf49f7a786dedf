"""fastxent.jax.linear_cross_entropy against the float64 reference composition.

Values and the gradients of hidden, weight and bias under ``jax.grad`` and ``jit``, for
each reduction (``"none"`` takes its gradients in backward, with each row's cotangent),
with and without a bias; ``vmap`` over a batch of hidden states with a shared head;
bfloat16; the errors. Small shapes (N = 9, H = 5, V = 13), float32 (JAX's default).
"""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402

import fastxent.jax as fxj  # noqa: E402
from fastxent import reference as ref  # noqa: E402
from tests.support import assert_close  # noqa: E402

N, H, V = 9, 5, 13


def make(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((N, H)).astype(dtype)
    weight = rng.standard_normal((V, H)).astype(dtype)
    bias = rng.standard_normal(V).astype(dtype)
    labels = rng.integers(0, V, N)
    labels[2] = -100
    return hidden, weight, bias, labels


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_value_and_grad_match_the_reference(reduction, with_bias):
    hidden, weight, bias, labels = make()
    bias = bias if with_bias else None
    options = dict(reduction=reduction, ignore_index=-100, label_smoothing=0.1, z_loss=1e-3,
                   class_weight=np.linspace(0.5, 1.5, V), memory=2 * V * 4)
    cotangent = np.arange(1.0, N + 1) if reduction == "none" else np.float64(0.7)

    def objective(h, w, b):
        return jnp.sum(fxj.linear_cross_entropy(h, w, labels, b, **options) * cotangent.astype(np.float32))

    argnums = (0, 1, 2) if with_bias else (0, 1)
    value, grads = jax.jit(jax.value_and_grad(objective, argnums=argnums))(hidden, weight, bias)
    options.pop("memory")
    loss, expected = ref.linear_cross_entropy(hidden, weight, labels, bias, return_grad=True,
                                              grad_output=cotangent, **options)
    assert_close(value, np.sum(loss * cotangent), np.float32, "value", "loss")
    for got, wanted, name in zip(grads, expected, ("hidden", "weight", "bias")):
        assert_close(got, wanted, np.float32, "stored", f"grad {name}", tol=(1e-4, 1e-5))


def test_vmap_over_hidden_with_a_shared_head():
    hidden, weight, bias, labels = make()
    batch = np.stack([hidden, 2 * hidden, -hidden])
    got = jax.vmap(lambda h: fxj.linear_cross_entropy(h, weight, labels, bias, ignore_index=-100))(batch)
    expected = [ref.linear_cross_entropy(h, weight, labels, bias, ignore_index=-100, reduction="mean")
                for h in batch]
    assert_close(got, np.array(expected), np.float32, "value", "vmapped losses")


def test_bfloat16():
    hidden, weight, bias, labels = make(ml_dtypes.bfloat16)
    loss, grad = jax.value_and_grad(fxj.linear_cross_entropy)(hidden, weight, labels, bias, ignore_index=-100)
    expected_loss, expected = ref.linear_cross_entropy(hidden, weight, labels, bias, ignore_index=-100,
                                                       reduction="mean", return_grad=True)
    assert loss.dtype == jnp.bfloat16 and grad.dtype == jnp.bfloat16
    assert_close(loss, expected_loss, ml_dtypes.bfloat16, "stored", "loss")
    assert_close(grad, expected.hidden, ml_dtypes.bfloat16, "stored", "grad hidden", tol=(1.6e-2, 1e-3))


def test_errors():
    hidden, weight, bias, labels = make()
    with pytest.raises(TypeError, match="labels must be integer class ids"):
        fxj.linear_cross_entropy(hidden, weight, labels.astype(np.float32))
    with pytest.raises(ValueError, match=r"labels has shape \(8,\), expected \(9,\)"):
        fxj.linear_cross_entropy(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="reduction='avg'"):
        fxj.linear_cross_entropy(hidden, weight, labels, reduction="avg")
    with pytest.raises(TypeError, match="hidden must be a floating point array"):
        fxj.linear_cross_entropy(hidden.astype(np.int32), weight, labels)
