"""kernels/ ships in the wheel, compiles, and agrees with the loader that launches it.

None of these needs a GPU:

* the wheel holds every ``.cu``/``.cuh`` under ``fastxent/kernels/``, and the loader of a
  non-editable install finds them through ``importlib.resources``;
* ``ci/check_kernels.sh`` compiles every instantiation of the dtype table with nvcc for
  sm_80 and sm_90 (where nvcc is installed; so CI compiles every kernel);
* the dtype table names exactly the kernels the sources define;
* every launch the backend makes -- through the public API, on each launch path --
  passes arguments whose count, kinds (pointer, int64, double, int32) and pointer dtypes
  match the kernel's C++ parameter list. CuPy does not check this (a mismatch is a silent
  wrong result), so a fake CuPy module records the launches here, on numpy memory.
"""

import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest

import fastxent as fx
from fastxent.backends import cupy_cuda
from tests.support import BF16

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL_DIR = ROOT / "kernels"
KERNEL_FILES = sorted(p.name for p in KERNEL_DIR.iterdir() if p.suffix in (".cu", ".cuh"))


# ----------------------------------------------------------------------------
# Packaging
# ----------------------------------------------------------------------------

def _setuptools_is_recent():
    try:
        import setuptools
    except ImportError:
        return False
    major = int(setuptools.__version__.split(".")[0])
    return major >= 77  # PEP 639 license strings (pyproject's license = "MIT")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the project (the checkout stays free of build/)."""
    source = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, source / name)
    if not (source / "README.md").exists():
        (source / "README.md").write_text("fastxent\n")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "fastxent", source / "fastxent", ignore=ignore)
    shutil.copytree(KERNEL_DIR, source / "kernels", ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-w", str(out), "-q"]
    if _setuptools_is_recent():
        command.insert(-1, "--no-build-isolation")  # offline: build with this interpreter's setuptools
    result = subprocess.run(command, capture_output=True, text=True, cwd=source)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    wheels = sorted(out.glob("fastxent-*.whl"))
    assert wheels, f"no wheel in {out}: {list(out.iterdir())}"
    return wheels[-1]


def test_wheel_ships_every_kernel_source(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f"fastxent/kernels/{name}" for name in KERNEL_FILES if f"fastxent/kernels/{name}" not in names]
    assert not missing, f"{wheel.name} lacks {missing}"
    assert "fastxent/kernels/__init__.py" in names
    assert "fastxent/backends/cupy_cuda.py" in names


def test_installed_wheel_loader_finds_the_kernels(wheel, tmp_path):
    """A non-editable install: the loader reads the sources from the installed package."""
    target = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                             str(wheel)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    script = (
        "import sys; from fastxent.backends import cupy_cuda as m\n"
        "src = m.kernel_source('softmax_rows.cu')\n"
        "assert 'sparse_xent_rows' in src and 'struct Online' in src and '#include' not in src, src[:200]\n"
        "print(m.kernel_dir()); assert 'cupy' not in sys.modules\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert str(target) in result.stdout, f"loaded the kernels from {result.stdout.strip()}, not the install"


def test_source_tree_loader_inlines_includes_once():
    for filename in {f for f, _ in cupy_cuda.instantiations()}:
        source = cupy_cuda.kernel_source(filename)
        assert "#include" not in source
        assert source.count("namespace fx {") >= 2
        assert source.count("struct Online {") == 1, "fx_formulas.cuh inlined more than once"


def test_importing_the_backend_does_not_import_cupy():
    script = "import sys; import fastxent.backends.cupy_cuda; assert 'cupy' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------
# Compilation
# ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="nvcc is not installed: the CUDA compile check needs the CUDA toolkit")
def test_every_kernel_instantiation_compiles():
    """bash ci/check_kernels.sh: nvcc -ptx for sm_80 and sm_90, warnings as errors."""
    result = subprocess.run(["bash", "ci/check_kernels.sh", "--nvrtc-arch", "90"], capture_output=True,
                            text=True, cwd=ROOT, env=dict(os.environ, PYTHON=sys.executable))
    print(result.stdout[-4000:])
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
    assert "check_kernels: OK" in result.stdout


# ----------------------------------------------------------------------------
# The dtype table and the sources agree
# ----------------------------------------------------------------------------

KERNEL_DEF = re.compile(
    r"template\s*<([^>]*)>\s*__global__\s+void\s+(?:__launch_bounds__\((?:[^()]|\([^()]*\))*\)\s*)?(\w+)\s*\(([^)]*)\)",
    re.S)


def kernel_signatures():
    """kernel -> (template parameter names, [(C++ type, name), ...]) parsed from kernels/*.cu."""
    signatures = {}
    for path in sorted(KERNEL_DIR.glob("*.cu")):
        for template, name, params in KERNEL_DEF.findall(path.read_text()):
            names = [t.split()[-1] for t in template.split(",")]
            parsed = []
            for param in params.split(","):
                param = " ".join(param.split())
                ctype, pname = param.rsplit(" ", 1)
                while pname.startswith("*"):
                    ctype, pname = ctype + "*", pname[1:]
                parsed.append((ctype.replace(" *", "*"), pname))
            signatures[name] = (path.name, names, parsed)
    return signatures


def test_dtype_table_matches_the_sources():
    signatures = kernel_signatures()
    assert set(signatures) == set(cupy_cuda.KERNELS), "KERNELS and the __global__ templates in kernels/ differ"
    for kernel, (filename, kinds) in cupy_cuda.KERNELS.items():
        assert signatures[kernel][0] == filename, kernel
        assert len(signatures[kernel][1]) == len(kinds), (kernel, signatures[kernel][1], kinds)
    header = (KERNEL_DIR / "fx_common.cuh").read_text()
    bound = int(re.search(r"GROUP_BLOCK_THREADS\s*=\s*(\d+)", header).group(1))
    assert cupy_cuda.GROUP_BLOCK_THREADS <= bound
    assert len(cupy_cuda.instantiations()) == len(set(cupy_cuda.instantiations()))


# ----------------------------------------------------------------------------
# Every launch matches its kernel's parameter list (fake CuPy on numpy memory)
# ----------------------------------------------------------------------------

class FakeDeviceArray(np.ndarray):
    """numpy memory that looks like a CuPy array to fastxent (device 0)."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])

    @property
    def device(self):
        return types.SimpleNamespace(id=0)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.data.ptr, False), "version": 3}

    def get(self):
        return np.array(self)


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
                    assert pname in {"class_weight", "scale", "grad", "pos_weight", "lse_out", "out"}, (
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
        limit = 1024 if group in (None, 0) else cupy_cuda.GROUP_BLOCK_THREADS
        if self.kernel.endswith("_elems"):
            limit = 256
        if self.kernel == "sparse_xent_merge":
            limit = cupy_cuda.GROUP_BLOCK_THREADS
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
        cupy_cuda.name_expression(kernel, *params)  # the instantiation must exist in the table
        names = tuple(p if isinstance(p, int) and not isinstance(p, bool) else cupy_cuda._dtype_name(p)
                      for p in params)
        return Recorder(kernel, names, log)

    monkeypatch.setattr(cupy_cuda, "get_kernel", fake_get_kernel)
    monkeypatch.setattr(cupy_cuda, "device_info", lambda device_id: cupy_cuda.DeviceInfo(
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
    loss, grad = cupy_cuda.sparse_softmax_cross_entropy(x, labels, None, None, 0.0, 0.0, None, grad_scale,
                                                        inplace=True)
    assert grad is x
    assert cupy_cuda.vec_ok(4, x, grad) == 1
    assert cupy_cuda.vec_ok(4, x, dev(np.empty((5, 1000), np.float32))) == 0
    loss, grad = cupy_cuda.softmax_cross_entropy(x, dev(rng.random((5, 1000)).astype(np.float32)), 0.0, None, 1.0,
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
    info = cupy_cuda.DeviceInfo(sms=132, l2_bytes=50 * 2**20, max_threads_per_sm=2048, smem_per_sm=233472,
                                smem_per_block_optin=232448, smem_reserved_per_block=1024)
    assert cupy_cuda.split_plan(4, 262144, info) == cupy_cuda.SplitPlan(64, 4096)
    assert cupy_cuda.split_plan(8192, 128256, info) is None
    assert cupy_cuda.split_plan(4, 1000, info) is None
    assert cupy_cuda.row_plan(1_000_000, 10, 40, info, True).group == 8
    assert cupy_cuda.row_plan(65536, 1000, 4000, info, True).group == 32
    plan = cupy_cuda.row_plan(8192, 128256, 128256 * 2, info, True)
    assert plan.group == 0 and plan.threads == 1024
    # 132 SMs x 2 blocks x 256.5 KB > 0.75 x 50 MB: one block per SM, enforced with shared memory
    assert plan.smem > 0
    assert 1 * (plan.smem + 1024) <= info.smem_per_sm < 2 * (plan.smem + 1024)
    assert cupy_cuda.row_plan(8192, 128256, 128256 * 2, info, False).smem == 0
    assert cupy_cuda.row_plan(8192, 4096, 4096 * 4, info, True).smem == 0


def test_every_python_path_is_importable_without_cupy():
    assert importlib.util.find_spec("fastxent.backends.cupy_cuda") is not None
    for kernel in cupy_cuda.KERNELS:
        assert cupy_cuda.name_expression(kernel, *[
            {"score": "float32", "label": "int64", "dense": "float32", "group": 0, "source": "bool",
             "acc": "float32"}[k] for k in cupy_cuda.KERNELS[kernel][1]]).startswith(f"fx::{kernel}<")


# ----------------------------------------------------------------------------
# The formulas of fx_formulas.cuh, compiled for the host, against the reference
# ----------------------------------------------------------------------------
# The device-function layer (online statistics and their merges, the losses, the
# gradients, the bfloat16 rounding) is plain arithmetic: with a small shim it compiles
# as C++ for the CPU. The harness below splits each row among lanes exactly as the
# kernels do (c = lane, lane + width, ...; a butterfly merge; chunks for the split
# path) and calls the same device functions; the results are compared with
# fastxent.reference on adversarial rows. This checks the math without a GPU; the
# kernels' loops and launches are checked on a device by tests/test_cupy.py.

HOST_SHIM = r"""#include <cmath>
#include <cstring>
#include <cstdint>
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __shared__ static
#define asm(...)
struct uint4 { unsigned x, y, z, w; };
struct dim3s { unsigned x, y, z; };
static dim3s threadIdx, blockIdx, blockDim, gridDim;
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; memcpy(&i, &f, 4); return i; }
inline double __longlong_as_double(long long i) { double d; memcpy(&d, &i, 8); return d; }
inline float __expf(float x) { return expf(x); }
template <class T> T __ldcs(const T* p) { return *p; }
template <class T> void __stcs(T* p, T v) { *p = v; }
inline int __shfl_xor_sync(unsigned, int v, int, int) { return v; }
inline int __shfl_sync(unsigned, int v, int, int) { return v; }
inline void __syncthreads() {}
inline void __syncwarp(unsigned) {}
inline int atomicExch(int* p, int v) { int o = *p; *p = v; return o; }
"""

HOST_HARNESS = r"""#include "fx_formulas.cuh"
#include <vector>
using namespace fx;

// Reduce per-lane states like the kernels: lanes own c = lane, lane+width, ...; then a
// butterfly over lanes (pairs at distance width/2, ...), as warp_reduce does.
template <class S> S tree(std::vector<S> v) {
    size_t n = v.size();
    for (size_t off = n / 2; off > 0; off >>= 1)
        for (size_t i = 0; i < off; ++i) v[i] = S::merge(v[i], v[i + off]);
    return v[0];
}

template <class A>
void sparse_row(const double* xd, long C, long y, double eps, double zl, double cap, const double* w, int width,
                double* loss, double* grad, int splits) {
    std::vector<A> x(C); for (long c = 0; c < C; ++c) x[c] = (A)xd[c];
    SparseRow<A> r; r.y = y; r.eps = (A)eps; r.eps_c = (A)(eps / C); r.z_loss = (A)zl; r.cap = (A)cap;
    double Wd = 0; for (long c = 0; c < C; ++c) Wd += w ? w[c] : 1.0; r.W = (A)Wd;
    r.wy = w ? (A)w[y] : A(1);
    r.anchor = eps > 0 ? row_anchor(softcap(x[0], r.cap)) : A(0);
    long chunk = (C + splits - 1) / splits;
    std::vector<SparseStats<A>> parts;
    for (int s = 0; s < splits; ++s) {
        long c0 = s * chunk, c1 = std::min(C, c0 + chunk);
        std::vector<SparseStats<A>> lanes(width);
        for (auto& l : lanes) l.init();
        for (int lane = 0; lane < width; ++lane)
            for (long c = c0 + lane; c < c1; c += width)
                lanes[lane].add(softcap(x[c], r.cap), (eps > 0 && w) ? (A)w[c] : A(1), r.eps > 0, r.anchor);
        parts.push_back(tree(lanes));
    }
    SparseStats<A> st; st.init();
    for (auto& p : parts) st = SparseStats<A>::merge(st, p);
    LogNorm<A> n = st.sm.norm_rows();
    A zy = softcap(x[y], r.cap);
    *loss = sparse_xent_loss(r, n, zy, st.wz);
    A pc = sparse_xent_p_coef(r, n.lse());
    for (long c = 0; c < C; ++c)
        grad[c] = sparse_xent_grad(r, c, x[c], (eps > 0 && w) ? (A)w[c] : A(1), n, pc, A(1));
}

template <class A>
void soft_row(const double* xd, const double* yd, long C, double eps, double cap, int width, double* loss, double* grad) {
    std::vector<A> x(C), yv(C); for (long c = 0; c < C; ++c) { x[c] = (A)xd[c]; yv[c] = (A)yd[c]; }
    A e = (A)eps, ec = (A)(eps / C), cp = (A)cap;
    A anchor = row_anchor(softcap(x[0], cp));
    std::vector<SoftStats<A>> lanes(width); for (auto& l : lanes) l.init();
    for (int lane = 0; lane < width; ++lane)
        for (long c = lane; c < C; c += width) lanes[lane].add(softcap(x[c], cp), smooth_label(yv[c], e, ec), anchor);
    SoftStats<A> st = tree(lanes);
    LogNorm<A> n = st.sm.norm_rows();
    *loss = soft_xent_loss(n, st.t, st.yz, anchor);
    for (long c = 0; c < C; ++c) grad[c] = soft_xent_grad(x[c], smooth_label(yv[c], e, ec), cp, n, st.t, A(1));
}

template <class A>
void lse_rows(const double* xd, long C, int width, double* lse_t, double* lse_r, double* logsm) {
    std::vector<Online<A>> lanes(width); for (auto& l : lanes) l.init();
    for (int lane = 0; lane < width; ++lane) for (long c = lane; c < C; c += width) { A e; lanes[lane].push((A)xd[c], e); }
    Online<A> st = tree(lanes);
    *lse_t = st.lse_torch(); *lse_r = st.norm_rows().lse();
    LogNorm<A> n = st.norm_rows();
    for (long c = 0; c < C; ++c) logsm[c] = n.log_prob((A)xd[c]);
}

template <class A>
void score_row(const double* xd, long C, long y, int width, double* out /*loss,lse,tlp,ent,argmax*/) {
    std::vector<ScoreStats<A>> lanes(width); for (auto& l : lanes) l.init();
    for (int lane = 0; lane < width; ++lane) for (long c = lane; c < C; c += width) lanes[lane].add(c, (A)xd[c]);
    ScoreStats<A> st = tree(lanes);
    LogNorm<A> n = st.sm.norm_rows();
    A nll = -n.log_prob((A)xd[y]);
    out[0] = nll; out[1] = n.lse(); out[2] = -nll; out[3] = st.entropy(); out[4] = (double)st.arg;
}

template <class A>
void hvp_row(const double* xd, const double* vd, long C, int width, double* out) {
    std::vector<HvpStats<A>> lanes(width); for (auto& l : lanes) l.init();
    for (int lane = 0; lane < width; ++lane) for (long c = lane; c < C; c += width) lanes[lane].add((A)xd[c], (A)vd[c]);
    HvpStats<A> st = tree(lanes);
    LogNorm<A> n = st.sm.norm_rows(); A pdv = st.pv / st.sm.s;
    for (long c = 0; c < C; ++c) out[c] = hvp_value((A)xd[c], (A)vd[c], n, pdv);
}

template <class A>
void categorical_row(const double* pd, const double* yd, long C, double lo, double hi, double eps, int width, double* loss, double* grad) {
    std::vector<SumStats<A>> lanes(width); for (auto& l : lanes) l.init();
    for (int lane = 0; lane < width; ++lane) for (long c = lane; c < C; c += width) lanes[lane].s += (A)pd[c];
    A s = tree(lanes).s;
    std::vector<CategoricalStats<A>> cl(width); for (auto& l : cl) l.init();
    A e = (A)eps, ec = (A)(eps / C);
    for (int lane = 0; lane < width; ++lane) for (long c = lane; c < C; c += width) {
        A term; A g = categorical_dq((A)pd[c], smooth_label((A)yd[c], e, ec), s, (A)lo, (A)hi, term);
        cl[lane].nll += term; cl[lane].gp += g * (A)pd[c];
    }
    CategoricalStats<A> st = tree(cl);
    *loss = -st.nll;
    for (long c = 0; c < C; ++c) { A term; A g = categorical_dq((A)pd[c], smooth_label((A)yd[c], e, ec), s, (A)lo, (A)hi, term); grad[c] = categorical_grad(g, s, st.gp, A(1)); }
}

template <class A>
void elementwise(const double* xd, const double* zd, const double* qd, long n, double eps, double lo, double hi, double* out /*5n*/) {
    for (long i = 0; i < n; ++i) {
        A g; A l = sigmoid_xent((A)xd[i], (A)zd[i], (A)qd[i], (A)eps, A(1), g);
        out[i] = l; out[n + i] = g; out[2 * n + i] = sigmoid_hessian((A)xd[i], (A)zd[i], (A)qd[i]);
        A gb; A lb = binary_xent((A)xd[i], (A)zd[i], (A)eps, (A)lo, (A)hi, A(1), gb);
        out[3 * n + i] = lb; out[4 * n + i] = gb;
    }
}

extern "C" {
void sparse_row_f(const double* x, long C, long y, double eps, double zl, double cap, const double* w, int width, double* loss, double* grad, int splits) { sparse_row<float>(x, C, y, eps, zl, cap, w, width, loss, grad, splits); }
void sparse_row_d(const double* x, long C, long y, double eps, double zl, double cap, const double* w, int width, double* loss, double* grad, int splits) { sparse_row<double>(x, C, y, eps, zl, cap, w, width, loss, grad, splits); }
void soft_row_f(const double* x, const double* y, long C, double eps, double cap, int width, double* loss, double* grad) { soft_row<float>(x, y, C, eps, cap, width, loss, grad); }
void soft_row_d(const double* x, const double* y, long C, double eps, double cap, int width, double* loss, double* grad) { soft_row<double>(x, y, C, eps, cap, width, loss, grad); }
void lse_rows_f(const double* x, long C, int width, double* a, double* b, double* o) { lse_rows<float>(x, C, width, a, b, o); }
void lse_rows_d(const double* x, long C, int width, double* a, double* b, double* o) { lse_rows<double>(x, C, width, a, b, o); }
void score_row_f(const double* x, long C, long y, int width, double* o) { score_row<float>(x, C, y, width, o); }
void score_row_d(const double* x, long C, long y, int width, double* o) { score_row<double>(x, C, y, width, o); }
void hvp_row_f(const double* x, const double* v, long C, int width, double* o) { hvp_row<float>(x, v, C, width, o); }
void hvp_row_d(const double* x, const double* v, long C, int width, double* o) { hvp_row<double>(x, v, C, width, o); }
void categorical_row_f(const double* p, const double* y, long C, double lo, double hi, double eps, int width, double* l, double* g) { categorical_row<float>(p, y, C, lo, hi, eps, width, l, g); }
void categorical_row_d(const double* p, const double* y, long C, double lo, double hi, double eps, int width, double* l, double* g) { categorical_row<double>(p, y, C, lo, hi, eps, width, l, g); }
void elementwise_f(const double* x, const double* z, const double* q, long n, double eps, double lo, double hi, double* o) { elementwise<float>(x, z, q, n, eps, lo, hi, o); }
void elementwise_d(const double* x, const double* z, const double* q, long n, double eps, double lo, double hi, double* o) { elementwise<double>(x, z, q, n, eps, lo, hi, o); }
unsigned short bf16_round(float v) { return Narrow<bf16>::from(v).bits; }
}
"""


@pytest.fixture(scope="module")
def formulas(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler: the host build of fx_formulas.cuh needs g++ or clang++")
    import ctypes

    work = tmp_path_factory.mktemp("formulas")
    (work / "harness.cpp").write_text(HOST_SHIM + HOST_HARNESS)
    library = work / "libfx_formulas.so"
    result = subprocess.run([compiler, "-std=c++17", "-O1", "-shared", "-fPIC", "-I", str(KERNEL_DIR),
                             "-o", str(library), str(work / "harness.cpp")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return ctypes.CDLL(str(library))


def _dptr(array):
    import ctypes

    if array is None:
        return None
    return np.ascontiguousarray(array, dtype=np.float64).ctypes.data_as(ctypes.POINTER(ctypes.c_double))


def _adversarial_rows(num_classes, rng):
    c = num_classes
    x = rng.standard_normal((9, c)) * 3
    x[1] = np.linspace(-1e4, 1e4, c)
    x[2, ::3] = -np.inf
    x[3, c // 2] = np.nan
    x[4] = -np.inf
    x[5, c - 1] = np.inf
    x[6] = 0.0
    x[7, 1] = -np.inf
    x[8] = 1e4 + rng.standard_normal(c)
    labels = np.array([0, c - 1, 1, 0, 0, 0, 2 % c, 1, 0])
    return x, labels


def _close(got, expected, what, rtol, atol):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    ok = np.isclose(got, expected, rtol=rtol, atol=atol, equal_nan=True) | (got == expected)
    where = np.argwhere(~ok)[:4]
    assert ok.all(), f"{what}: {np.count_nonzero(~ok)} differ, e.g. " + ", ".join(
        f"{tuple(int(k) for k in i)}: {got[tuple(i)]!r} vs {expected[tuple(i)]!r}" for i in where)


HOST_ACC = {"float": (np.float32, (3e-5, 3e-5)), "double": (np.float64, (1e-9, 1e-9))}


@pytest.mark.parametrize("acc", list(HOST_ACC))
@pytest.mark.parametrize("num_classes", [3, 5, 423, 4099])
def test_formulas_match_the_reference(formulas, acc, num_classes):
    import ctypes

    from fastxent import reference as ref

    np_type, (rtol, atol) = HOST_ACC[acc]
    suffix = acc[0]
    rng = np.random.default_rng(num_classes)
    x, labels = _adversarial_rows(num_classes, rng)
    x = x.astype(np_type).astype(np.float64)
    scale = np.maximum(np.where(np.isfinite(x), np.abs(x), 0).max(axis=1), 1)
    weights = rng.uniform(0.0, 2.0, num_classes)
    weights[1] = 0.0
    y = rng.random(x.shape)
    y[2, ::3] = 0
    y[rng.random(y.shape) < 0.3] = 0
    y = y.astype(np_type).astype(np.float64)
    d = ctypes.c_double
    for width in (1, 8, 32, 256):
        for splits in (1, 3) if num_classes > 100 else (1,):
            for opt in ({}, {"eps": 0.1}, {"zl": 1e-3}, {"cap": 4.0}, {"w": weights, "eps": 0.2},
                        {"eps": 1.0, "w": weights, "zl": 1e-4, "cap": 30.0}):
                for i in range(x.shape[0]):
                    loss, grad = d(), np.zeros(num_classes)
                    getattr(formulas, f"sparse_row_{suffix}")(
                        _dptr(x[i]), num_classes, int(labels[i]), d(opt.get("eps", 0.0)), d(opt.get("zl", 0.0)),
                        d(opt.get("cap", 0.0)), _dptr(opt.get("w")), width, ctypes.byref(loss),
                        grad.ctypes.data_as(ctypes.POINTER(d)), splits)
                    want_loss, want_grad = ref.sparse_softmax_cross_entropy(
                        x[i:i + 1], labels[i:i + 1], class_weight=opt.get("w"), label_smoothing=opt.get("eps", 0.0),
                        z_loss=opt.get("zl", 0.0), softcap=opt.get("cap"), return_grad=True)
                    what = f"sparse {acc} C={num_classes} width={width} splits={splits} {sorted(opt)} row {i}"
                    _close(loss.value, want_loss[0], what, rtol, atol * scale[i])
                    _close(grad, want_grad[0], what + " grad", rtol, atol * scale[i])
        for opt in ({}, {"eps": 0.1}, {"cap": 5.0}):
            for i in range(x.shape[0]):
                loss, grad = d(), np.zeros(num_classes)
                getattr(formulas, f"soft_row_{suffix}")(
                    _dptr(x[i]), _dptr(y[i]), num_classes, d(opt.get("eps", 0.0)), d(opt.get("cap", 0.0)), width,
                    ctypes.byref(loss), grad.ctypes.data_as(ctypes.POINTER(d)))
                want_loss, want_grad = ref.softmax_cross_entropy(x[i:i + 1], y[i:i + 1], label_smoothing=opt.get(
                    "eps", 0.0), softcap=opt.get("cap"), return_grad=True)
                what = f"soft {acc} C={num_classes} width={width} {opt} row {i}"
                _close(loss.value, want_loss[0], what, rtol, atol * scale[i])
                _close(grad, want_grad[0], what + " grad", rtol, atol * scale[i])
        for i in range(x.shape[0]):
            lse_torch, lse_rows, log_sm = d(), d(), np.zeros(num_classes)
            getattr(formulas, f"lse_rows_{suffix}")(_dptr(x[i]), num_classes, width, ctypes.byref(lse_torch),
                                                    ctypes.byref(lse_rows), log_sm.ctypes.data_as(ctypes.POINTER(d)))
            what = f"{acc} C={num_classes} width={width} row {i}"
            _close(lse_torch.value, ref.logsumexp(x[i]), "logsumexp " + what, rtol, atol * scale[i])
            _close(log_sm, ref.log_softmax(x[i]), "log_softmax " + what, rtol, atol * scale[i])
            out = np.zeros(5)
            getattr(formulas, f"score_row_{suffix}")(_dptr(x[i]), num_classes, int(labels[i]), width,
                                                     out.ctypes.data_as(ctypes.POINTER(d)))
            want = ref.score(x[i:i + 1], labels[i:i + 1])
            _close(out[:4], [want.loss[0], want.lse[0], want.target_logprob[0], want.entropy[0]], "score " + what,
                   rtol, atol * scale[i])
            assert out[4] == want.argmax[0], f"argmax {what}: {out[4]} vs {want.argmax[0]}"
            v = rng.standard_normal(num_classes).astype(np_type).astype(np.float64)
            hv = np.zeros(num_classes)
            getattr(formulas, f"hvp_row_{suffix}")(_dptr(x[i]), _dptr(v), num_classes, width,
                                                   hv.ctypes.data_as(ctypes.POINTER(d)))
            _close(hv, ref.softmax_cross_entropy_hvp(x[i], v), "hvp " + what, rtol, atol * 3)
        p = rng.random((4, num_classes)) ** 3
        p[0, ::5] = 0
        p[1] = 0
        p[2, 0] = 1e3
        p = p.astype(np_type)
        target = rng.random((4, num_classes))
        target[rng.random(target.shape) < 0.3] = 0
        target = target.astype(np_type)
        prtol = 1e-4 if acc == "float" else 1e-9
        for epsilon in (1e-7, 1e-3):
            lo, hi = float(np.asarray(epsilon).astype(np_type)), float(np.asarray(1 - epsilon).astype(np_type))
            for smoothing in (0.0, 0.1):
                for i in range(4):
                    loss, grad = d(), np.zeros(num_classes)
                    getattr(formulas, f"categorical_row_{suffix}")(
                        _dptr(p[i]), _dptr(target[i]), num_classes, d(lo), d(hi), d(smoothing), width,
                        ctypes.byref(loss), grad.ctypes.data_as(ctypes.POINTER(d)))
                    want_loss, want_grad = ref.categorical_cross_entropy(
                        p[i:i + 1], target[i:i + 1], epsilon=epsilon, label_smoothing=smoothing, return_grad=True)
                    what = f"categorical {acc} C={num_classes} width={width} eps={epsilon} ls={smoothing} row {i}"
                    _close(loss.value, want_loss[0], what, prtol, prtol)
                    _close(grad, want_grad[0], what + " grad", prtol, prtol)


@pytest.mark.parametrize("acc", list(HOST_ACC))
def test_elementwise_formulas_match_the_reference(formulas, acc):
    import ctypes

    from fastxent import reference as ref

    np_type, (rtol, atol) = HOST_ACC[acc]
    rng = np.random.default_rng(3)
    n = 64
    x = rng.standard_normal(n) * 5
    x[:6] = [np.inf, -np.inf, np.nan, 1e4, -1e4, 0]
    z = rng.random(n)
    z[:6] = [1, 0, 1, 0, 1, 0.5]
    z = z.astype(np_type)
    q = rng.uniform(0.5, 3, n).astype(np_type)
    p = rng.random(n)
    p[:4] = [0, 1, 1e-9, 1 - 1e-9]
    x, p = x.astype(np_type), p.astype(np_type)
    d = ctypes.c_double
    prtol = 1e-4 if acc == "float" else 1e-9
    for smoothing in (0.0, 0.1):
        for epsilon in (1e-7, 1e-3):
            lo, hi = float(np.asarray(epsilon).astype(np_type)), float(np.asarray(1 - epsilon).astype(np_type))
            out = np.zeros(5 * n)
            call = getattr(formulas, f"elementwise_{acc[0]}")
            call(_dptr(x), _dptr(z), _dptr(q), n, d(smoothing), d(lo), d(hi), out.ctypes.data_as(ctypes.POINTER(d)))
            want_loss, want_grad = ref.sigmoid_cross_entropy(x, z, pos_weight=q.astype(np.float64),
                                                             label_smoothing=smoothing, return_grad=True)
            _close(out[:n], want_loss, f"sigmoid {acc} ls={smoothing}", rtol, atol * 1e4)
            _close(out[n:2 * n], want_grad, f"sigmoid grad {acc} ls={smoothing}", rtol, atol)
            _close(out[2 * n:3 * n], ref.sigmoid_cross_entropy_hessian_diag(x, z, pos_weight=q.astype(np.float64)),
                   f"hessian {acc}", rtol, atol)
            call(_dptr(p), _dptr(z), _dptr(q), n, d(smoothing), d(lo), d(hi), out.ctypes.data_as(ctypes.POINTER(d)))
            want_loss, want_grad = ref.binary_cross_entropy(p, z, epsilon=epsilon, label_smoothing=smoothing,
                                                            return_grad=True)
            _close(out[3 * n:4 * n], want_loss, f"binary {acc} ls={smoothing} eps={epsilon}", rtol, atol)
            _close(out[4 * n:], want_grad, f"binary grad {acc} ls={smoothing} eps={epsilon}", prtol, prtol)


def test_bfloat16_rounding_matches_ml_dtypes(formulas):
    import ctypes

    formulas.bf16_round.restype = ctypes.c_ushort
    formulas.bf16_round.argtypes = [ctypes.c_float]
    rng = np.random.default_rng(4)
    values = np.concatenate([rng.standard_normal(20000).astype(np.float32) * 10,
                             np.array([np.inf, -np.inf, 3.3895314e38, 3.4e38, -0.0, 1e-40, 1.00390625, 1.01171875],
                                      np.float32)])
    got = np.array([formulas.bf16_round(float(v)) for v in values], dtype=np.uint16)
    want = values.astype(BF16).view(np.uint16)
    assert (got == want).all(), values[got != want][:5]
    nan_bits = formulas.bf16_round(float("nan"))
    assert (nan_bits & 0x7F80) == 0x7F80 and (nan_bits & 0x7F) != 0
