"""Every launch the CUDA backend makes matches its kernel's C++ parameter list.

Through the public API, on each launch path, the arguments' count, kinds (pointer,
int64, double, int32) and pointer dtypes must match the kernel's parameters. CuPy does
not check this (a mismatch is a silent wrong result), so a fake CuPy module records the
launches here, on numpy memory, without running them (test_cupy.py runs them). Also
the launch plans: within the device limits for any N and C.
"""

import importlib.util
import sys
import types

import numpy as np
import pytest

import fastxent as fx
from fastxent import _config
from fastxent.backends import cuda
from fastxent.backends.cuda import _build, _plans
from tests.support import BF16, FakeDeviceArray, kernel_signatures


def _fake(value):
    if isinstance(value, np.ndarray) and not isinstance(value, FakeDeviceArray):
        return value.view(FakeDeviceArray)
    return value


class FakeCupy(types.ModuleType):
    """Enough of CuPy for fastxent's device path: numpy functions returning fake device arrays."""

    ndarray = FakeDeviceArray

    def __init__(self):
        super().__init__("cupy")
        self.__version__ = "fake"
        device = type("Device", (), {"__init__": lambda self, i=0: setattr(self, "id", i),
                                     "__enter__": lambda self: self, "__exit__": lambda self, *a: False,
                                     "synchronize": lambda self: None})
        self.cuda = types.SimpleNamespace(Device=device)

    def __getattr__(self, name):
        function = getattr(np, name)
        if not callable(function):
            return function

        def wrapped(*args, **kwargs):
            result = function(*args, **kwargs)
            if isinstance(result, tuple):
                return tuple(_fake(r) for r in result)
            return _fake(result)

        return wrapped


ACC = {"float16": "float32", "bfloat16": "float32", "float32": "float32", "float64": "float64"}


class Recorder:
    """Stands in for a compiled kernel: checks each launch against the C++ parameters."""

    def __init__(self, kernel, params, launches):
        self.kernel, self.params, self.launches = kernel, params, launches
        self.max_dynamic_shared_size_bytes = 0
        _, self.template_names, self.signature = kernel_signatures()[kernel]

    def dtype_of(self, ctype):
        """The numpy dtype name a pointer parameter of C++ type ``ctype`` must point to."""
        base = ctype.replace("const ", "").rstrip("*").strip()
        values = dict(zip(self.template_names, self.params))
        score = values.get("T")
        if base in ("acc_t<T>", "SparseStats<acc_t<T>>", "LogNorm<acc_t<T>>"):
            return ACC[score]
        if base in values:
            return values[base] if base != "D" else values["D"]
        return {"double": "float64", "int": "int32", "i64": "int64", "bool": "bool"}[base]

    def __call__(self, grid, block, args, shared_mem=0):
        self.launches.append((self.kernel, self.params, grid, block, shared_mem))
        where = f"{self.kernel}{self.params}"
        assert len(args) == len(self.signature), (
            f"{where}: {len(args)} arguments for {len(self.signature)} parameters {self.signature}")
        for arg, (ctype, pname) in zip(args, self.signature):
            if ctype.endswith("*"):
                if isinstance(arg, np.uint64):
                    assert int(arg) == 0, f"{where}: {pname} is a non-NULL integer"
                    assert pname in {"class_weight", "scale", "grad", "pos_weight", "lse_out", "out",
                                     "weight_coef"}, (
                        f"{where}: NULL passed for {pname}, which the kernel always uses")
                    continue
                assert isinstance(arg, FakeDeviceArray), f"{where}: {pname} ({ctype}) got {type(arg).__name__}"
                assert arg.dtype.name == self.dtype_of(ctype), (
                    f"{where}: {pname} ({ctype}) points to {arg.dtype.name}, expected {self.dtype_of(ctype)}")
                assert arg.flags.c_contiguous, f"{where}: {pname} is not C-contiguous"
            else:
                expected = {"i64": np.int64, "double": np.float64, "int": np.int32}[ctype]
                assert type(arg) is expected, f"{where}: {pname} ({ctype}) got {type(arg).__name__}"
        grid = tuple(grid)
        threads = int(block[0])
        assert all(int(g) >= 1 for g in grid), f"{where}: grid {grid}"
        group = dict(zip(self.template_names, self.params)).get("G")
        limit = _config.CUDA_ROW_BLOCK_MAX_THREADS if group in (None, 0) else _config.CUDA_GROUP_BLOCK_THREADS
        if self.kernel.endswith("_elems"):
            limit = _config.CUDA_ELEMENTWISE_BLOCK_THREADS
        if self.kernel == "sparse_xent_merge":
            limit = _config.CUDA_GROUP_BLOCK_THREADS
        assert threads % 32 == 0 and 32 <= threads <= limit, f"{where}: block {block}"
        if group:
            assert threads % group == 0, f"{where}: block {threads} not a multiple of G = {group}"
        if shared_mem:
            assert self.max_dynamic_shared_size_bytes >= shared_mem, f"{where}: smem attribute not raised"


@pytest.fixture
def launches(monkeypatch):
    """Route the CUDA backend to fake CuPy and recorded kernels; yields the launch log."""
    log = []
    monkeypatch.setitem(sys.modules, "cupy", FakeCupy())

    def fake_get_kernel(kernel, *params):
        _build.name_expression(kernel, *params)  # the instantiation must exist in the table
        names = tuple(p if isinstance(p, int) and not isinstance(p, bool) else _build.dtype_name(p)
                      for p in params)
        return Recorder(kernel, names, log)

    monkeypatch.setattr(_build, "get_kernel", fake_get_kernel)
    monkeypatch.setattr(_plans, "device_info", lambda device_id: _plans.DeviceInfo(
        sms=132, l2_bytes=50 * 2**20, max_threads_per_sm=2048, smem_per_sm=233472,
        smem_per_block_optin=232448, smem_reserved_per_block=1024))
    return log


def dev(array):
    return np.ascontiguousarray(array).view(FakeDeviceArray)


FAKE_DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), BF16]


@pytest.mark.parametrize("dtype", FAKE_DTYPES, ids=[d.name for d in FAKE_DTYPES])
@pytest.mark.parametrize("shape", [(6, 3), (5, 423), (140, 5003), (4, 262144)],
                         ids=["g8", "warp", "block", "split"])
def test_every_launch_matches_its_kernel(launches, dtype, shape):
    rng = np.random.default_rng(0)
    n, c = shape
    x = dev(rng.standard_normal(shape).astype(dtype))
    labels = dev(rng.integers(0, c, n))
    labels32 = dev(rng.integers(0, c, n).astype(np.int32))
    soft = dev(rng.random(shape).astype(np.float32))
    weights = rng.uniform(0.5, 2.0, c)
    go = dev(rng.standard_normal(n).astype(np.float32))
    for kwargs in ({}, {"return_grad": True}, {"return_grad": True, "grad_output": go},
                   {"ignore_index": -100, "class_weight": weights, "label_smoothing": 0.1, "z_loss": 1e-4,
                    "softcap": 5.0, "reduction": "mean", "return_grad": True}):
        fx.sparse_softmax_cross_entropy(x, labels, **kwargs)
    fx.sparse_softmax_cross_entropy(x, labels32, return_grad=True)
    fx.softmax_cross_entropy(x, soft, label_smoothing=0.1, softcap=3.0, return_grad=True)
    fx.softmax_cross_entropy(x, dev(rng.random(shape) < 0.5), return_grad=True)  # bool labels: cast kernel
    fx.softmax_cross_entropy(x, soft)
    for fn in ("logsumexp", "log_softmax", "softmax"):
        getattr(fx, fn)(x)
    fx.softmax_cross_entropy_hvp(x, x)
    fx.softmax_cross_entropy_hvp(x, dev(rng.standard_normal(shape)))
    fx.score(x, labels, ignore_index=-100)
    fx.score(x, dev(rng.integers(0, c, n).astype(np.uint8)))
    probs = dev(rng.random(shape).astype(dtype))
    fx.categorical_cross_entropy(probs, soft, return_grad=True, label_smoothing=0.1)
    fx.categorical_cross_entropy(probs, soft)
    fx.sparse_categorical_cross_entropy(probs, labels, ignore_index=-100, return_grad=True)
    fx.sparse_categorical_cross_entropy(probs, labels)
    for pos_weight in (None, 2.0, rng.uniform(0.5, 2, c), rng.uniform(0.5, 2, shape)):
        fx.sigmoid_cross_entropy(x, soft, pos_weight=pos_weight, label_smoothing=0.1, return_grad=True)
        fx.sigmoid_cross_entropy(x, soft, pos_weight=pos_weight)
        fx.sigmoid_cross_entropy_hessian_diag(x, soft, pos_weight=pos_weight)
    fx.binary_cross_entropy(probs, soft, return_grad=True, label_smoothing=0.2)
    fx.binary_cross_entropy(probs, soft)
    kernels = {entry[0] for entry in launches}
    expected = {"softmax_rows", "hvp_rows", "score_rows", "soft_xent_rows", "categorical_rows",
                "sparse_categorical_rows", "sigmoid_xent_elems", "sigmoid_hess_elems", "binary_xent_elems",
                "cast_elems"}
    expected |= ({"sparse_xent_partial", "sparse_xent_merge", "sparse_xent_split_grad"} if shape == (4, 262144)
                 else {"sparse_xent_rows"})
    assert expected <= kernels, f"not launched: {expected - kernels}"
    groups = {entry[1][-1] for entry in launches if entry[0] == "softmax_rows"}
    assert groups == {8 if c <= 64 else 32 if c <= 1024 else 0}


@pytest.mark.parametrize("dtype", FAKE_DTYPES, ids=[d.name for d in FAKE_DTYPES])
@pytest.mark.parametrize("count", [3, 423, 5003], ids=["g8", "warp", "block"])
def test_split_row_launches_match_their_kernels(launches, dtype, count):
    """The block functions of a split row (a block of ``count`` classes from ``offset = count``)."""
    rng = np.random.default_rng(3)
    x = dev(rng.standard_normal((6, count)).astype(dtype))
    labels = rng.integers(0, 2 * count, 6)
    weights = rng.uniform(0.5, 2.0, 2 * count)
    for ids in (dev(labels), dev(labels.astype(np.int32)), None):
        for class_weight, softcap in ((None, None), (weights, 4.0)):
            cuda.softmax_partials(x, ids, count, -100, class_weight, softcap, False)
        cuda.softmax_partials(x, ids, count, None, None, None, True)
    rows = [dev(rng.standard_normal(6)) for _ in range(5)]
    cuda.softmax_block_grad(x, dev(labels), count, -100, weights, 4.0, *rows)
    cuda.softmax_block_grad(x, dev(labels), count, None, None, None, *rows[:4], None)
    assert {entry[0] for entry in launches} == {"sparse_partials_rows", "score_partials_rows",
                                               "softmax_block_grad_rows"}
    with pytest.raises(ValueError, match=r"the block of classes \[%d, %d\) needs at least" % (count, 2 * count)):
        cuda.softmax_partials(x, dev(labels), count, None, weights[:count], None, False)


def test_fused_launch_beyond_the_l2_budget_caps_residency(launches):
    """200 rows x 50257 float32 (201 KB a row): 2 blocks per SM would hold 53 MB of rows."""
    rng = np.random.default_rng(2)
    x = dev(rng.standard_normal((200, 50257)).astype(np.float32))
    labels = dev(rng.integers(0, 50257, 200))
    fx.sparse_softmax_cross_entropy(x, labels)
    fx.sparse_softmax_cross_entropy(x, labels, return_grad=True)
    smem = [entry[4] for entry in launches if entry[0] == "sparse_xent_rows"]
    assert smem[0] == 0, "a forward reads each row once: no cap"
    assert smem[1] > 0, "the fused kernel re-reads its rows: residency capped to fit the L2"


def test_inplace_and_misaligned_backend_calls(launches):
    rng = np.random.default_rng(1)
    base = dev(rng.standard_normal(5 * 1000 + 1).astype(np.float32))
    x = base[1:].reshape(5, 1000)
    labels = dev(rng.integers(0, 1000, 5))
    grad_scale = dev(np.ones(5))
    loss, grad = cuda.sparse_softmax_cross_entropy(x, labels, None, None, 0.0, 0.0, None, grad_scale,
                                                        inplace=True)
    assert grad is x
    assert _plans.vec_ok(4, x, grad) == 1
    assert _plans.vec_ok(4, x, dev(np.empty((5, 1000), np.float32))) == 0
    loss, grad = cuda.softmax_cross_entropy(x, dev(rng.random((5, 1000)).astype(np.float32)), 0.0, None, 1.0,
                                                 inplace=True)
    assert grad is x


def test_empty_inputs_launch_nothing(launches):
    x = dev(np.zeros((0, 7), np.float32))
    labels = dev(np.zeros(0, np.int64))
    loss, grad = fx.sparse_softmax_cross_entropy(x, labels, return_grad=True)
    assert loss.shape == (0,) and grad.shape == (0, 7)
    fx.sigmoid_cross_entropy(dev(np.zeros((0,), np.float32)), dev(np.zeros((0,), np.float32)), return_grad=True)
    assert launches == []


def test_split_and_row_plans():
    info = _plans.DeviceInfo(sms=132, l2_bytes=50 * 2**20, max_threads_per_sm=2048, smem_per_sm=233472,
                                smem_per_block_optin=232448, smem_reserved_per_block=1024)
    assert _plans.split_plan(4, 262144, info) == _plans.SplitPlan(64, 4096)
    assert _plans.split_plan(8192, 128256, info) is None
    assert _plans.split_plan(4, 1000, info) is None
    assert _plans.row_plan(1_000_000, 10, 40, info, True).group == 8
    assert _plans.row_plan(65536, 1000, 4000, info, True).group == 32
    plan = _plans.row_plan(8192, 128256, 128256 * 2, info, True)
    assert plan.group == 0 and plan.threads == 1024
    # 132 SMs x 2 blocks x 256.5 KB > 0.75 x 50 MB: one block per SM, enforced with shared memory
    assert plan.smem > 0
    assert 1 * (plan.smem + 1024) <= info.smem_per_sm < 2 * (plan.smem + 1024)
    assert _plans.row_plan(8192, 128256, 128256 * 2, info, False).smem == 0
    assert _plans.row_plan(8192, 4096, 4096 * 4, info, True).smem == 0


def test_every_python_path_is_importable_without_cupy():
    assert importlib.util.find_spec("fastxent.backends.cuda") is not None
    for kernel in _build.KERNELS:
        assert _build.name_expression(kernel, *[
            {"score": "float32", "label": "int64", "dense": "float32", "group": 0, "source": "bool",
             "acc": "float32"}[k] for k in _build.KERNELS[kernel][1]]).startswith(f"fx::{kernel}<")



def test_launch_plans_stay_within_device_limits():
    """Every plan: block size a multiple of 32 within the kernel's launch bound; the grid
    within CUDA's limits for any N (grid-stride loops cover the rest); the split path
    covers each row exactly with non-empty chunks and a grid.y within 65535; the L2
    residency cap leaves k blocks per SM and not k + 1, within the opt-in shared memory
    (static partials of block_reduce included)."""
    infos = [_plans.DeviceInfo(sms=132, l2_bytes=50 * 2**20, max_threads_per_sm=2048, smem_per_sm=233472,
                                  smem_per_block_optin=232448, smem_reserved_per_block=1024),
             _plans.DeviceInfo(sms=108, l2_bytes=40 * 2**20, max_threads_per_sm=2048, smem_per_sm=167936,
                                  smem_per_block_optin=166912, smem_reserved_per_block=1024),
             _plans.DeviceInfo(sms=46, l2_bytes=6 * 2**20, max_threads_per_sm=1536, smem_per_sm=102400,
                                  smem_per_block_optin=101376, smem_reserved_per_block=1024)]
    static_smem = 32 * 40  # block_reduce's partials of the largest statistics (ScoreStats<double>)
    for info in infos:
        for n in (1, 2, 7, 131, 132, 1000, 65535, 65536, 1_000_000, 3_000_000_000):
            for c in (1, 2, 10, 64, 65, 1000, 1024, 1025, 5003, 16384, 50257, 128256, 262144, 2**22):
                for itemsize in (2, 4, 8):
                    for fused in (False, True):
                        plan = _plans.row_plan(n, c, c * itemsize, info, fused)
                        limit = 1024 if plan.group == 0 else _config.CUDA_GROUP_BLOCK_THREADS
                        assert plan.threads % 32 == 0 and 32 <= plan.threads <= limit, plan
                        assert 1 <= plan.grid <= 2**31 - 1, plan
                        if plan.group:
                            assert plan.threads % plan.group == 0
                        if plan.smem:
                            assert fused and plan.group == 0
                            assert plan.smem + static_smem <= info.smem_per_block_optin, plan
                            per_block = plan.smem + info.smem_reserved_per_block
                            k = info.smem_per_sm // per_block
                            assert k >= 1 and (k + 1) * per_block > info.smem_per_sm
                            assert k * (per_block + static_smem) <= info.smem_per_sm, plan
                split = _plans.split_plan(n, c, info)
                if split is not None:
                    assert 2 <= split.splits and n <= 65535, split
                    assert (split.splits - 1) * split.chunk < c <= split.splits * split.chunk, (n, c, split)
                    assert split.chunk % _config.CUDA_SPLIT_CHUNK_ALIGN == 0
