"""kernels/ ships in the wheel, compiles, and agrees with the loader that launches it.

None of these needs a GPU:

* the wheel holds every ``.cu``/``.cuh`` under ``fastxent/kernels/``, and the loader of a
  non-editable install finds them through ``importlib.resources``;
* ``ci/check_kernels.sh`` compiles every instantiation of the dtype table for sm_80 and
  sm_90 (nvcc front end for both; code generation by nvcc for sm_80 and by the loader's
  NVRTC path for sm_90) where nvcc is installed, so CI compiles every kernel;
* the dtype table names exactly the kernels the sources define;
* every launch the backend makes -- through the public API, on each launch path --
  passes arguments whose count, kinds (pointer, int64, double, int32) and pointer dtypes
  match the kernel's C++ parameter list. CuPy does not check this (a mismatch is a silent
  wrong result), so a fake CuPy module records the launches here, on numpy memory;
* the launch plans stay within the device limits for any N and C;
* the device functions of fx_formulas.cuh and the index arithmetic of fx_common.cuh
  (row_apply's head / packs / tail, fill_range, Group<G>), compiled for the host, agree
  with the reference and visit every element once with aligned, in-row 128-bit accesses.
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
    """bash ci/check_kernels.sh: sm_80 and sm_90 (nvcc and the loader's NVRTC path), warnings as errors."""
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
struct dim3s { unsigned x, y, z; };
static dim3s threadIdx, blockIdx, blockDim, gridDim;
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; memcpy(&i, &f, 4); return i; }
inline double __longlong_as_double(long long i) { double d; memcpy(&d, &i, 8); return d; }
inline float __expf(float x) { return expf(x); }
inline int __shfl_xor_sync(unsigned, int v, int, int) { return v; }
inline int __shfl_sync(unsigned, int v, int, int) { return v; }
inline void __syncthreads() {}
inline void __syncwarp(unsigned) {}
inline int atomicExch(int* p, int v) { int o = *p; *p = v; return o; }
"""

# 128-bit words and the streaming load/store intrinsics, plain (the formulas harness).
HOST_WORDS = r"""struct uint4 { unsigned x, y, z, w; };
template <class T> T __ldcs(const T* p) { return *p; }
template <class T> void __stcs(T* p, T v) { *p = v; }
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
void sparse_categorical_row(const double* pd, long C, long y, double lo, double hi, int width, double* loss, double* grad) {
    std::vector<ProbSumStats<A>> lanes(width); for (auto& l : lanes) l.init();
    for (int lane = 0; lane < width; ++lane) for (long c = lane; c < C; c += width) lanes[lane].add((A)pd[c]);
    ProbSumStats<A> t = tree(lanes);
    A gy, gp;
    *loss = sparse_categorical_loss((A)pd[y], t, (A)lo, (A)hi, gy, gp);
    for (long c = 0; c < C; ++c) grad[c] = categorical_grad(c == y ? gy : A(0), t.s, gp, A(1));
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
void sparse_categorical_row_f(const double* p, long C, long y, double lo, double hi, int width, double* l, double* g) { sparse_categorical_row<float>(p, C, y, lo, hi, width, l, g); }
void sparse_categorical_row_d(const double* p, long C, long y, double lo, double hi, int width, double* l, double* g) { sparse_categorical_row<double>(p, C, y, lo, hi, width, l, g); }
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
    (work / "harness.cpp").write_text(HOST_SHIM + HOST_WORDS + HOST_HARNESS)
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


@pytest.mark.parametrize("acc", list(HOST_ACC))
@pytest.mark.parametrize("num_classes", [2, 5, 423])
def test_sparse_categorical_formulas_match_the_reference(formulas, acc, num_classes):
    """Including rows holding inf or NaN: the reference's sum_j g_j p_j meets 0 * inf on a
    class whose g_j is 0, so the whole gradient row is NaN (the dense kernel and the CPU
    backend agree); a kernel that forms only g_y p_y would give finite gradients there."""
    import ctypes

    from fastxent import reference as ref

    np_type, _ = HOST_ACC[acc]
    rng = np.random.default_rng(num_classes + 40)
    c = num_classes
    p = rng.random((8, c)) ** 3
    p[1] = 0.0                       # 0 / 0: NaN
    p[2, c - 1] = np.inf             # inf elsewhere than the label: NaN gradient, finite loss
    p[3, 0] = np.inf                 # inf at the label
    p[4, 1] = np.nan
    p[5, 1] = 1e-30                  # clipped from below
    p[6] = 0.0
    p[6, 0] = 1.0                    # one-hot at the label: clipped from above
    p[7, 1] = -np.inf
    p = p.astype(np_type)
    labels = np.array([0, 0, 0, 0, 0, 1, 0, 0])
    d = ctypes.c_double
    prtol = 1e-4 if acc == "float" else 1e-9
    for epsilon in (1e-7, 1e-3):
        lo, hi = float(np.asarray(epsilon).astype(np_type)), float(np.asarray(1 - epsilon).astype(np_type))
        for width in (1, 8, 32):
            for i in range(p.shape[0]):
                loss, grad = d(), np.zeros(c)
                getattr(formulas, f"sparse_categorical_row_{acc[0]}")(
                    _dptr(p[i]), c, int(labels[i]), d(lo), d(hi), width, ctypes.byref(loss),
                    grad.ctypes.data_as(ctypes.POINTER(d)))
                want_loss, want_grad = ref.sparse_categorical_cross_entropy(p[i:i + 1], labels[i:i + 1],
                                                                            epsilon=epsilon, return_grad=True)
                what = f"sparse categorical {acc} C={c} width={width} eps={epsilon} row {i}"
                _close(loss.value, want_loss[0], what, prtol, prtol)
                _close(grad, want_grad[0], what + " grad", prtol, prtol)


# ----------------------------------------------------------------------------
# The kernels' index arithmetic, compiled for the host: every element once, every packed
# access aligned and inside its row
# ----------------------------------------------------------------------------
# row_apply (head / 128-bit packs / tail, tiles of UNROLL packs, REVERSE), fill_range and
# Group<G> come from fx_common.cuh unchanged. A checking uint4 stands in for CUDA's: its
# copy constructor and assignment see the address of every 16-byte word the packed loads
# read, and __stcs that of every packed store, so each is checked against the row span the
# call may touch and the 16-byte grid. The visitor checks that every position is visited
# once and receives the value stored at it; the outputs are checked element by element,
# and every byte outside the visited spans must be unchanged. Buffers are laid out as
# CuPy's (256-byte aligned base, optional element offset) and vec_ok is computed by the
# backend's own cupy_cuda.vec_ok, so the host decision and the kernel arithmetic are
# tested together, on every row phase of odd C (50257 float32 rows start on 4 phases).

HOST_CHECKED_WORDS = r"""#include <cstdio>
namespace hostcheck {
struct Span { const char* lo; const char* hi; };
static Span tracked[8]; static int ntracked = 0;  // whole buffers: accesses there are checked
static Span allowed[8]; static int nallowed = 0;  // what the current call may touch
static long packed = 0, misaligned = 0, outside = 0;
inline void access(const void* p, size_t n) {
    const char* c = (const char*)p;
    bool mine = false;
    for (int i = 0; i < ntracked; ++i) mine |= (c >= tracked[i].lo && c < tracked[i].hi);
    if (!mine) return;  // a register copy
    ++packed;
    if ((uintptr_t)c % 16) ++misaligned;
    for (int i = 0; i < nallowed; ++i) if (c >= allowed[i].lo && c + n <= allowed[i].hi) return;
    ++outside;
}
}
struct uint4 {
    unsigned x, y, z, w;
    uint4() = default;
    uint4(const uint4& o) : x(o.x), y(o.y), z(o.z), w(o.w) { hostcheck::access(&o, 16); }
    uint4& operator=(const uint4& o) { hostcheck::access(&o, 16); x = o.x; y = o.y; z = o.z; w = o.w; return *this; }
};
template <class T> T __ldcs(const T* p) { return *p; }
template <class T> void __stcs(T* p, T v) { hostcheck::access(p, sizeof(T)); memcpy((void*)p, (const void*)&v, sizeof(T)); }
"""

ROW_APPLY_HARNESS = r"""#include "fx_common.cuh"
#include <vector>
using namespace fx;

enum { E_PACKED, E_MISALIGNED, E_OUTSIDE, E_VISIT_RANGE, E_VISIT_COUNT, E_X, E_Y, E_OUT, E_UNTOUCHED, E_N };

template <class T> const char* bytes(const T* p) { return (const char*)p; }
template <class A> bool same(A a, A b) { return memcmp(&a, &b, sizeof(A)) == 0; }
template <class T> bool same_storage(const T& a, const T& b) { return memcmp(&a, &b, sizeof(T)) == 0; }
template <class A> A tag(long c, int k) { return A((c * 7 + k) % 200 + 1); }

void track(const void* lo, long nbytes) {
    hostcheck::tracked[hostcheck::ntracked++] = {(const char*)lo, (const char*)lo + nbytes};
}
void allow(const void* lo, const void* hi) { hostcheck::allowed[hostcheck::nallowed++] = {(const char*)lo, (const char*)hi}; }

// One call of row_apply per lane on each of R rows of C elements ([c0, c1) of each row).
template <class A, bool STREAM, bool REVERSE, class T, class Y, class O1, class O2>
void run(const T* x, const Y* y, O1* o1, O2* o2, const char* lo, long nbytes, long R, long C, long c0, long c1,
         int width, int vec_ok, long* err) {
    std::vector<char> before(lo, lo + nbytes);  // the outputs' bytes (and inputs') before the call
    hostcheck::ntracked = 0;
    track(lo, nbytes);
    hostcheck::packed = hostcheck::misaligned = hostcheck::outside = 0;
    std::vector<T> x0((size_t)(R * C));
    memcpy(x0.data(), x, sizeof(T) * R * C);
    std::vector<int> count((size_t)C);
    for (long r = 0; r < R; ++r) {
        const T* xr = x + r * C;
        const Y* yr = is_none<Y> ? nullptr : y + r * C;
        O1* o1r = is_none<O1> ? nullptr : o1 + r * C;
        O2* o2r = is_none<O2> ? nullptr : o2 + r * C;
        hostcheck::nallowed = 0;
        allow(xr + c0, xr + c1);
        if (!is_none<Y>) allow(yr + c0, yr + c1);
        if (!is_none<O1>) allow(o1r + c0, o1r + c1);
        if (!is_none<O2>) allow(o2r + c0, o2r + c1);
        std::fill(count.begin(), count.end(), 0);
        const T* x0r = x0.data() + r * C;
        for (int lane = 0; lane < width; ++lane) {
            row_apply<A, STREAM, REVERSE>(c0, c1, xr, yr, o1r, o2r, lane, width, vec_ok != 0,
                                          [&](i64 c, A xv, A yv, A& r1, A& r2) {
                if (c < c0 || c >= c1) { ++err[E_VISIT_RANGE]; return; }
                ++count[c];
                if (!same(xv, to_acc<A>(x0r[c]))) ++err[E_X];
                if constexpr (!is_none<Y>) { if (!same(yv, to_acc<A>(yr[c]))) ++err[E_Y]; }
                r1 = tag<A>(c, 1);
                r2 = tag<A>(c, 2);
            });
        }
        for (long c = c0; c < c1; ++c) if (count[c] != 1) ++err[E_VISIT_COUNT];
        for (long c = c0; c < c1; ++c) {
            if constexpr (!is_none<O1>) { if (!same_storage(o1r[c], narrow<O1>(tag<A>(c, 1)))) ++err[E_OUT]; }
            if constexpr (!is_none<O2>) { if (!same_storage(o2r[c], narrow<O2>(tag<A>(c, 2)))) ++err[E_OUT]; }
        }
    }
    // Every byte outside the visited output spans is as it was.
    std::vector<char> touched((size_t)nbytes, 0);
    auto mark = [&](const void* p, long n) {
        const char* b = (const char*)p;
        for (long i = 0; i < n; ++i) touched[(size_t)(b - lo + i)] = 1;
    };
    for (long r = 0; r < R; ++r) {
        if (!is_none<O1>) mark(o1 + r * C + c0, (long)sizeof(O1) * (c1 - c0));
        if (!is_none<O2>) mark(o2 + r * C + c0, (long)sizeof(O2) * (c1 - c0));
    }
    for (long i = 0; i < nbytes; ++i) if (!touched[(size_t)i] && lo[i] != before[(size_t)i]) ++err[E_UNTOUCHED];
    err[E_PACKED] += hostcheck::packed;
    err[E_MISALIGNED] += hostcheck::misaligned;
    err[E_OUTSIDE] += hostcheck::outside;
}

template <class T, class Y>
void run_mode(int mode, void* x, void* y, void* o1, void* o2, const char* lo, long nbytes, long R, long C, long c0,
              long c1, int width, int vec_ok, long* err) {
    using A = acc_t<T>;
    const T* xt = (const T*)x;
    const Y* yt = (const Y*)y;
    switch (mode) {
        case 0: run<A, false, false>(xt, yt, (None*)nullptr, (None*)nullptr, lo, nbytes, R, C, c0, c1, width, vec_ok, err); break;  // statistics pass
        case 1: run<A, true, true>(xt, yt, (T*)o1, (None*)nullptr, lo, nbytes, R, C, c0, c1, width, vec_ok, err); break;  // gradient pass (o1 may be x)
        case 2: run<A, true, false>(xt, yt, (A*)o1, (T*)o2, lo, nbytes, R, C, c0, c1, width, vec_ok, err); break;  // elementwise loss + grad
        case 3: run<A, true, false>(xt, yt, (None*)nullptr, (None*)nullptr, lo, nbytes, R, C, c0, c1, width, vec_ok, err); break;  // score
    }
}

// tcode: 0 float, 1 double, 2 bf16; ycode: 0 none, 1 the score type, 2 the accumulation type.
template <class T>
void dispatch_y(int ycode, int mode, void* x, void* y, void* o1, void* o2, const char* lo, long nbytes, long R,
                long C, long c0, long c1, int width, int vec_ok, long* err) {
    if (ycode == 0) run_mode<T, None>(mode, x, y, o1, o2, lo, nbytes, R, C, c0, c1, width, vec_ok, err);
    else if (ycode == 1) run_mode<T, T>(mode, x, y, o1, o2, lo, nbytes, R, C, c0, c1, width, vec_ok, err);
    else run_mode<T, acc_t<T>>(mode, x, y, o1, o2, lo, nbytes, R, C, c0, c1, width, vec_ok, err);
}

template <class T>
void fill_check(T* out, const char* lo, long nbytes, long R, long C, long c0, long c1, int width, long* err) {
    std::vector<char> before(lo, lo + nbytes);
    hostcheck::ntracked = 0;
    track(lo, nbytes);
    hostcheck::packed = hostcheck::misaligned = hostcheck::outside = 0;
    using A = acc_t<T>;
    for (long r = 0; r < R; ++r) {
        T* orow = out + r * C;
        hostcheck::nallowed = 0;
        allow(orow + c0, orow + c1);
        for (int lane = 0; lane < width; ++lane) fill_range(orow, c0, c1, A(3), lane, width);
        for (long c = c0; c < c1; ++c) if (!same_storage(orow[c], narrow<T>(A(3)))) ++err[E_OUT];
    }
    std::vector<char> touched((size_t)nbytes, 0);
    for (long r = 0; r < R; ++r) {
        const char* b = (const char*)(out + r * C + c0);
        for (long i = 0; i < (long)sizeof(T) * (c1 - c0); ++i) touched[(size_t)(b - lo + i)] = 1;
    }
    for (long i = 0; i < nbytes; ++i) if (!touched[(size_t)i] && lo[i] != before[(size_t)i]) ++err[E_UNTOUCHED];
    err[E_PACKED] += hostcheck::packed;
    err[E_MISALIGNED] += hostcheck::misaligned;
    err[E_OUTSIDE] += hostcheck::outside;
}

// Group<G> on every thread of `grid` blocks of `block` threads: lanes, rows and shuffle masks,
// and the grid-stride loop visiting each of N rows with exactly one group.
template <int G>
long group_check(int block, int grid, long N, long* visits) {
    long bad = 0;
    blockDim.x = block; gridDim.x = grid;
    for (int b = 0; b < grid; ++b) {
        blockIdx.x = b;
        for (int t = 0; t < block; ++t) {
            threadIdx.x = t;
            const Group<G> g;
            const int rows_per_block = block / G;
            if (g.lane != t % G || g.width != G) ++bad;
            if (g.first_row != (long)b * rows_per_block + t / G || g.row_stride != (long)grid * rows_per_block) ++bad;
            unsigned want = 0;
            for (int u = t / 32 * 32; u < t / 32 * 32 + 32 && u < block; ++u) if (u / G == t / G) want |= 1u << (u % 32);
            if (g.mask != want) ++bad;
            if (g.leader()) for (long row = g.first_row; row < N; row += g.row_stride) ++visits[row];
        }
    }
    return bad;
}

extern "C" {
void check_row_apply(int tcode, int ycode, int mode, void* x, void* y, void* o1, void* o2, const char* lo, long nbytes,
                     long R, long C, long c0, long c1, int width, int vec_ok, long* err) {
    if (tcode == 0) dispatch_y<float>(ycode, mode, x, y, o1, o2, lo, nbytes, R, C, c0, c1, width, vec_ok, err);
    else if (tcode == 1) dispatch_y<double>(ycode, mode, x, y, o1, o2, lo, nbytes, R, C, c0, c1, width, vec_ok, err);
    else dispatch_y<bf16>(ycode, mode, x, y, o1, o2, lo, nbytes, R, C, c0, c1, width, vec_ok, err);
}
void check_fill(int tcode, void* out, const char* lo, long nbytes, long R, long C, long c0, long c1, int width, long* err) {
    if (tcode == 0) fill_check<float>((float*)out, lo, nbytes, R, C, c0, c1, width, err);
    else if (tcode == 1) fill_check<double>((double*)out, lo, nbytes, R, C, c0, c1, width, err);
    else fill_check<bf16>((bf16*)out, lo, nbytes, R, C, c0, c1, width, err);
}
long check_group(int G, int block, int grid, long N, long* visits) {
    switch (G) {
        case 4: return group_check<4>(block, grid, N, visits);
        case 8: return group_check<8>(block, grid, N, visits);
        case 16: return group_check<16>(block, grid, N, visits);
        default: return group_check<32>(block, grid, N, visits);
    }
}
}
"""

ERROR_NAMES = ["packed", "misaligned", "outside", "visit_range", "visit_count", "x", "y", "out", "untouched"]


@pytest.fixture(scope="module")
def row_apply_lib(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler: the host build of fx_common.cuh needs g++ or clang++")
    import ctypes

    work = tmp_path_factory.mktemp("row_apply")
    (work / "row_apply.cpp").write_text(HOST_SHIM + HOST_CHECKED_WORDS + ROW_APPLY_HARNESS)
    library = work / "librow_apply.so"
    result = subprocess.run([compiler, "-std=c++17", "-O1", "-shared", "-fPIC", "-I", str(KERNEL_DIR),
                             "-o", str(library), str(work / "row_apply.cpp")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    lib = ctypes.CDLL(str(library))
    vp, lp = ctypes.c_void_p, ctypes.c_long
    lib.check_row_apply.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, vp, vp, vp, vp, vp, lp, lp, lp, lp, lp,
                                    ctypes.c_int, ctypes.c_int, vp]
    lib.check_fill.argtypes = [ctypes.c_int, vp, vp, lp, lp, lp, lp, lp, ctypes.c_int, vp]
    lib.check_group.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, lp, vp]
    lib.check_group.restype = ctypes.c_long
    return lib


ARENA_ALIGN = 256  # CuPy's allocations


class Arena:
    """One host buffer holding several (R, C) arrays, each at a 256-byte aligned base plus
    an element offset, as CuPy views of fresh allocations are laid out."""

    def __init__(self, specs, rng):
        # specs: [(dtype, shape, element offset)]
        sizes = [ARENA_ALIGN * (-(-(np.dtype(d).itemsize * (int(np.prod(s)) + off) + 64) // ARENA_ALIGN))
                 for d, s, off in specs]
        self.raw = np.empty(sum(sizes) + ARENA_ALIGN, np.uint8)
        base = (-self.raw.ctypes.data) % ARENA_ALIGN
        self.buffer = self.raw[base:base + sum(sizes)]
        self.buffer[:] = rng.integers(0, 256, self.buffer.size, dtype=np.uint8)  # garbage, as cupy.empty
        self.arrays, start = [], 0
        for (dtype, shape, off), size in zip(specs, sizes):
            dtype = np.dtype(dtype)
            count = int(np.prod(shape))
            view = self.buffer[start + off * dtype.itemsize:start + (off + count) * dtype.itemsize].view(dtype)
            self.arrays.append(view.reshape(shape).view(FakeDeviceArray))
            start += size

    @property
    def lo(self):
        return self.buffer.ctypes.data

    @property
    def nbytes(self):
        return self.buffer.size


def _distinct(shape, dtype, rng):
    """Finite, mostly distinct values (bfloat16 as raw bits of moderate exponents)."""
    dtype = np.dtype(dtype)
    if dtype == BF16:
        bits = rng.integers(0x3C00, 0x4800, int(np.prod(shape)), dtype=np.uint16)
        return bits.view(BF16).reshape(shape)
    return (rng.standard_normal(shape) * 100).astype(dtype)


TCODES = {"float32": 0, "float64": 1, "bfloat16": 2}
ROW_CLASSES = [1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 127, 129, 257, 1023, 1025, 4099, 50257]


def _check_errors(err, what, packed_expected):
    errors = dict(zip(ERROR_NAMES, (int(e) for e in err)))
    bad = {k: v for k, v in errors.items() if k != "packed" and v}
    assert not bad, f"{what}: {bad}"
    if packed_expected:
        assert errors["packed"] > 0, f"{what}: no 128-bit access although vec_ok and the row is long"
    return errors


@pytest.mark.parametrize("tname", list(TCODES))
def test_row_apply_visits_every_element_once_with_aligned_packs(row_apply_lib, tname):
    import ctypes

    dtype = np.dtype(BF16 if tname == "bfloat16" else tname)
    acc = np.dtype(np.float64 if tname == "float64" else np.float32)
    vec = cupy_cuda._vector_width(dtype)
    rng = np.random.default_rng(TCODES[tname])
    ycodes = {0: None, 1: dtype} if acc == dtype else {0: None, 1: dtype, 2: acc}
    checked = 0
    for num_classes in ROW_CLASSES:
        rows = 9 if num_classes < 5000 else 3   # odd C: every row phase modulo the pack
        shape = (rows, num_classes)
        ranges = [(0, num_classes)]
        if num_classes > 600:   # chunks as the split path cuts them (c0 a multiple of the aligned chunk)
            chunk = 256
            ranges += [(c0, min(c0 + chunk, num_classes)) for c0 in range(0, num_classes, chunk)][:3]
            ranges += [(num_classes // chunk * chunk, num_classes)]
        if num_classes > 2:     # any [c0, c1): heads and tails at both ends
            ranges += [(1, num_classes - 1), (num_classes // 3, 2 * num_classes // 3 + 1)]
        for x_off in sorted({0, 1, vec - 1}):
            for other_off in sorted({x_off, (x_off + 1) % vec}):
                for ycode, ytype in ycodes.items():
                    for mode in (0, 1, 2, 3):
                        for inplace in ((False, True) if mode == 1 else (False,)):
                            if inplace and other_off != x_off:
                                continue
                            specs = [(dtype, shape, x_off), (ytype or dtype, shape, other_off),
                                     (acc if mode == 2 else dtype, shape, other_off), (dtype, shape, other_off)]
                            arena = Arena(specs, rng)
                            x, y, o1, o2 = arena.arrays
                            x[...] = _distinct(shape, dtype, rng)
                            if ytype is not None:
                                y[...] = _distinct(shape, ytype, rng)
                            if inplace:
                                o1 = x
                            streams = [x] + ([y] if ytype is not None else []) + \
                                      ([o1] if mode in (1, 2) else []) + ([o2] if mode == 2 else [])
                            vec_ok = cupy_cuda.vec_ok(vec, *streams)
                            assert vec_ok == int(other_off == x_off or (len(streams) == 1))
                            for width in (1, 5, 8, 32, 256):
                                if num_classes > 5000 and width in (5, 8):
                                    continue
                                for c0, c1 in ranges:
                                    err = np.zeros(len(ERROR_NAMES), np.int64)
                                    row_apply_lib.check_row_apply(
                                        TCODES[tname], ycode, mode, x.data.ptr,
                                        y.data.ptr if ytype is not None else None, o1.data.ptr, o2.data.ptr,
                                        arena.lo, arena.nbytes, rows, num_classes, c0, c1, width, vec_ok,
                                        err.ctypes.data_as(ctypes.c_void_p))
                                    what = (f"{tname} C={num_classes} x_off={x_off} other_off={other_off} "
                                            f"y={ycode} mode={mode} inplace={inplace} width={width} [{c0}, {c1})")
                                    _check_errors(err, what, vec_ok and c1 - c0 >= 4 * vec)
                                    checked += 1
    assert checked > 1000


@pytest.mark.parametrize("tname", list(TCODES))
def test_fill_range_writes_exactly_its_span(row_apply_lib, tname):
    import ctypes

    dtype = np.dtype(BF16 if tname == "bfloat16" else tname)
    rng = np.random.default_rng(7)
    for num_classes in ROW_CLASSES:
        shape = (9 if num_classes < 5000 else 3, num_classes)
        for off in range(cupy_cuda._vector_width(dtype)):
            arena = Arena([(dtype, shape, off)], rng)
            out = arena.arrays[0]
            spans = [(0, num_classes)] + ([(256, min(512, num_classes))] if num_classes > 600 else [])
            spans += [(1, num_classes - 1), (num_classes // 3, 2 * num_classes // 3 + 1)] if num_classes > 2 else []
            for width in (1, 8, 32, 256):
                for c0, c1 in spans:
                    err = np.zeros(len(ERROR_NAMES), np.int64)
                    row_apply_lib.check_fill(TCODES[tname], out.data.ptr, arena.lo, arena.nbytes, shape[0],
                                             num_classes, c0, c1, width, err.ctypes.data_as(ctypes.c_void_p))
                    _check_errors(err, f"fill_range {tname} C={num_classes} off={off} width={width} [{c0}, {c1})",
                                  c1 - c0 >= 4 * cupy_cuda._vector_width(dtype))


def test_groups_lanes_masks_and_grid_stride_rows(row_apply_lib):
    """Group<G>: lane, first row, row stride and the shuffle mask of every thread (only the
    lanes of its own row, so a group smaller than a warp never waits on another group);
    the grid-stride loop gives each row to exactly one group, whether the grid covers the
    rows or not (row_plan caps the grid at MAX_GRID)."""
    import ctypes

    for group in (4, 8, 16, 32):
        for block in (32, 64, 256):
            for grid, rows in ((1, 1), (3, 7), (4, 1000), (5, 5 * block // group), (2, 12345)):
                visits = np.zeros(rows, np.int64)
                bad = row_apply_lib.check_group(group, block, grid, rows, visits.ctypes.data_as(ctypes.c_void_p))
                assert bad == 0, f"G={group} block={block} grid={grid}: {bad} bad lanes/rows/masks"
                assert (visits == 1).all(), f"G={group} block={block} grid={grid} N={rows}: rows visited {visits}"


def test_launch_plans_stay_within_device_limits():
    """Every plan: block size a multiple of 32 within the kernel's launch bound; the grid
    within CUDA's limits for any N (grid-stride loops cover the rest); the split path
    covers each row exactly with non-empty chunks and a grid.y within 65535; the L2
    residency cap leaves k blocks per SM and not k + 1, within the opt-in shared memory
    (static partials of block_reduce included)."""
    infos = [cupy_cuda.DeviceInfo(sms=132, l2_bytes=50 * 2**20, max_threads_per_sm=2048, smem_per_sm=233472,
                                  smem_per_block_optin=232448, smem_reserved_per_block=1024),
             cupy_cuda.DeviceInfo(sms=108, l2_bytes=40 * 2**20, max_threads_per_sm=2048, smem_per_sm=167936,
                                  smem_per_block_optin=166912, smem_reserved_per_block=1024),
             cupy_cuda.DeviceInfo(sms=46, l2_bytes=6 * 2**20, max_threads_per_sm=1536, smem_per_sm=102400,
                                  smem_per_block_optin=101376, smem_reserved_per_block=1024)]
    static_smem = 32 * 40  # block_reduce's partials of the largest statistics (ScoreStats<double>)
    for info in infos:
        for n in (1, 2, 7, 131, 132, 1000, 65535, 65536, 1_000_000, 3_000_000_000):
            for c in (1, 2, 10, 64, 65, 1000, 1024, 1025, 5003, 16384, 50257, 128256, 262144, 2**22):
                for itemsize in (2, 4, 8):
                    for fused in (False, True):
                        plan = cupy_cuda.row_plan(n, c, c * itemsize, info, fused)
                        limit = 1024 if plan.group == 0 else cupy_cuda.GROUP_BLOCK_THREADS
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
                split = cupy_cuda.split_plan(n, c, info)
                if split is not None:
                    assert 2 <= split.splits and n <= 65535, split
                    assert (split.splits - 1) * split.chunk < c <= split.splits * split.chunk, (n, c, split)
                    assert split.chunk % cupy_cuda.SPLIT_CHUNK_ALIGN == 0
