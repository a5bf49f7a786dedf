"""The edge sweep of tests/test_properties.py (issue 10) on the CuPy CUDA backend.

The same drawn cases: every public function, every score dtype, scores at ±(float max),
±max/2, ±max/4 alone or mixed with ordinary values and -inf masks, each option off and
on, against the float64 reference shifted per row (``tests.support.expected``). The main
arrays go to the device in the machine's byte order (a device array has no other one);
the parameter arrays (class_weight, pos_weight, grad_output) stay on the host in their
drawn byte order, as a caller may pass them. Fewer examples than on the CPU: the emulated
device runs each launch through g++-compiled kernels; the sweep's five tests draw
``EDGE_DEVICE.max_examples`` cases each, score dtype and byte order drawn too.

Where CuPy sees no GPU, the kernels run on the emulated device of ``tests/emu``; without
a GPU and without g++ the module skips.
"""

import contextlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from fastxent.backends import cuda as cupy_cuda
from tests import emu
from tests.support import BF16

EMULATED = emu.real_device_reason() is not None
if EMULATED:
    if emu.unavailable_reason() is not None:
        pytest.skip(f"{emu.real_device_reason()}, and the emulated device cannot run here either: "
                    f"{emu.unavailable_reason()}", allow_module_level=True)
    cupy = emu.fake_cupy.module
else:
    import cupy

from tests.test_properties import (  # noqa: E402
    BYTE_ORDERS,
    check_edge_case,
    native,
    probability_cases,
    row_function_cases,
    sigmoid_cases,
    soft_softmax_cases,
    sparse_softmax_cases,
)

pytestmark = pytest.mark.emulated if EMULATED else pytest.mark.gpu

#: 24 cases per test, 120 in all (the CPU sweep's grid: 320): each test took under 4 s on the
#: emulated device with 12 (two busy cores), the kernels already built.
EDGE_DEVICE = settings(max_examples=24, deadline=None, derandomize=True,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.fixture(scope="module", autouse=True)
def device():
    """The emulated device stands in for CuPy while this module runs (nothing to do on a GPU)."""
    with emu.emulated_cupy() if EMULATED else contextlib.nullcontext():
        cupy_cuda.precompile()
        if EMULATED:
            cupy.build_all()
        yield


def put(array):
    """A device copy in the machine's byte order; a case CuPy cannot hold (bfloat16 on an
    old CuPy) is skipped, not failed."""
    host = native(np.asarray(array))
    if host.dtype == BF16:
        try:
            return cupy.asarray(host)
        except Exception as exc:  # noqa: BLE001
            pytest.skip(f"CuPy cannot hold ml_dtypes.bfloat16 arrays ({type(exc).__name__}: {exc})")
    return cupy.asarray(host)


def fetch(value):
    """A device result (array, tuple or Score) on the host."""
    if isinstance(value, tuple):
        parts = [fetch(v) for v in value]
        return type(value)(*parts) if hasattr(value, "_fields") else tuple(parts)
    return value.get() if isinstance(value, cupy.ndarray) else value


def check(case, order):
    check_edge_case(case, order, backend="cupy", put=put, fetch=fetch)


@EDGE_DEVICE
@given(sparse_softmax_cases(), BYTE_ORDERS)
def test_edge_sparse_softmax(case, order):
    check(case, order)


@EDGE_DEVICE
@given(soft_softmax_cases(), BYTE_ORDERS)
def test_edge_soft_softmax(case, order):
    check(case, order)


@EDGE_DEVICE
@given(row_function_cases(), BYTE_ORDERS)
def test_edge_building_blocks_hvp_and_score(case, order):
    check(case, order)


@EDGE_DEVICE
@given(sigmoid_cases(), BYTE_ORDERS)
def test_edge_sigmoid_and_hessian_diag(case, order):
    check(case, order)


@EDGE_DEVICE
@given(probability_cases(), BYTE_ORDERS)
def test_edge_probability_families(case, order):
    check(case, order)
