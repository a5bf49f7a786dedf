"""fastxent.linear_cross_entropy and linear_score on CUDA arrays against the float64 reference.

The device path of ``fastxent.linear``: CuPy's matmul (cuBLAS) into the block buffer, the
CUDA backend's fused kernel in place, the weight gradient through the scratch route, the
labels checked by the kernels. On a GPU it runs there; elsewhere on the emulated device
of ``tests/emu`` (whose matmul is numpy's), and without either the module skips with the
reason. Small shapes (N = 12, H = 8, V = 300: a warp per row).
"""

import contextlib

import numpy as np
import pytest

from tests import emu
from tests.support import BF16, DTYPE_IDS, FLOAT_DTYPES, assert_close, make_class_ids, sparse_options

EMULATED = emu.real_device_reason() is not None
if EMULATED and emu.unavailable_reason() is not None:
    pytest.skip(f"{emu.real_device_reason()}, and no emulated device either: {emu.unavailable_reason()}",
                allow_module_level=True)
cupy = emu.fake_cupy.module if EMULATED else pytest.importorskip("cupy")

import fastxent as fx  # noqa: E402
from fastxent import reference as ref  # noqa: E402
from tests.test_linear import check_against_reference, make_inputs  # noqa: E402

pytestmark = pytest.mark.emulated if EMULATED else pytest.mark.gpu
N, H, V = 12, 8, 300


@pytest.fixture(scope="module", autouse=True)
def device():
    with emu.emulated_cupy() if EMULATED else contextlib.nullcontext():
        yield


def on_device(*arrays):
    if any(a is not None and a.dtype == BF16 for a in arrays):
        try:
            cupy.asarray(np.zeros(2, BF16)).view(np.uint16)
        except Exception as exc:  # noqa: BLE001
            pytest.skip(f"CuPy {cupy.__version__} cannot hold bfloat16 arrays: {exc}")
    return [None if a is None else cupy.asarray(a) for a in arrays]


def host(result):
    if isinstance(result, tuple):
        return type(result)(*(host(r) for r in result)) if hasattr(result, "_fields") else tuple(
            host(r) for r in result)
    return None if result is None else result.get()


@pytest.mark.parametrize("option", ["plain", "all"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_loss_and_gradients(dtype, option):
    hidden, weight, bias = make_inputs(dtype, n=N, features=H, classes=V)
    options = sparse_options(option, V)
    labels = make_class_ids(N, V, ignore_index=options.get("ignore_index"), ignore_fraction=0.2)
    got = fx.linear_cross_entropy(*on_device(hidden, weight, labels, bias), reduction="mean", return_grad=True,
                                  memory=5 * V * 4, **options)
    assert isinstance(got[0], cupy.ndarray) and isinstance(got[1].weight, cupy.ndarray)
    expected = ref.linear_cross_entropy(hidden, weight, labels, bias, reduction="mean", return_grad=True,
                                        **options)
    check_against_reference(host(got), expected, dtype, f"device {option} {np.dtype(dtype).name}")


def test_score_and_bad_labels():
    hidden, weight, bias = make_inputs(np.float32, n=N, features=H, classes=V)
    labels = make_class_ids(N, V)
    got = host(fx.linear_score(*on_device(hidden, weight, labels, bias), memory=4 * V * 4))
    expected = ref.linear_score(hidden, weight, labels, bias)
    for field in ("loss", "lse", "target_logprob", "entropy"):
        assert_close(getattr(got, field), getattr(expected, field), np.float32, "value", field)
    np.testing.assert_array_equal(got.argmax, expected.argmax)
    labels[7] = V + 4
    with pytest.raises(ValueError, match=r"labels\[7\] = 304 is outside \[0, 300\)"):
        fx.linear_cross_entropy(*on_device(hidden, weight, labels), memory=4 * V * 4)
