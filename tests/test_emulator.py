"""The emulated CUDA device of tests/emu: its semantics, its error reports, and proof that
it fails the suite on broken kernels.

Small CUDA kernels written here pin down what the emulator promises (shuffle width
sections, barriers, seeded block and thread orders, the float16 conversions the PTX
rewrite stands for) and that each misuse becomes a ``KernelFault`` naming the kernel,
block, thread and the seed, not a crash or a silent result. The mutation tests apply
classic kernel bugs to a copy of ``kernels/`` (an off-by-one row loop, a missing barrier
before a shared buffer is reused, a wrong shuffle lane, and a missing barrier before an
inplace store) and check that the emulated suite's checks catch each one, and pass on
the unmutated copy.
"""

import shutil

import numpy as np
import pytest

from fastxent import _config  # noqa: E402  (the tunables the tests patch)
from fastxent.backends import cuda as cupy_cuda  # noqa: E402  (the backend under test)
from fastxent.backends.cuda import _build  # noqa: E402
from tests import emu
from tests.emu import device
from tests.support import assert_close, make_class_ids, make_logits

pytestmark = [
    pytest.mark.emulated,
    pytest.mark.skipif(emu.unavailable_reason() is not None, reason=str(emu.unavailable_reason())),
]

SOURCE = r"""
namespace t {

// out[i] = the shuffled value of lane i (lanes outside `mask` write -1 and leave).
__global__ void shuffle(const int* in, int* out, int xor_mode, unsigned mask, int arg, int width) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (!(mask >> (threadIdx.x & 31) & 1u)) { out[i] = -1; return; }
    out[i] = xor_mode ? __shfl_xor_sync(mask, in[i], arg, width) : __shfl_sync(mask, in[i], arg, width);
}

// Sum of each `width`-lane section by a butterfly, as fx::warp_reduce.
__global__ void section_sum(const int* in, int* out, int width) {
    int v = in[threadIdx.x];
    for (int offset = width / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset, width);
    out[threadIdx.x] = v;
}

// Sum of the block through shared memory, twice in a row (the second needs the first
// barrier: another thread may still read the partials).
__global__ void block_sum(const int* in, int* out, int skip_leading_barrier) {
    __shared__ int partial[1024];
    int total = 0;
    for (int round = 0; round < 2; ++round) {
        if (round == 0 || !skip_leading_barrier) __syncthreads();
        partial[threadIdx.x] = in[threadIdx.x] * (round + 1);
        __syncthreads();
        for (int k = 0; k < (int)blockDim.x; ++k) total += partial[k];
    }
    out[threadIdx.x] = total;
}

// Each thread records the thread that passed the checkpoint before it (atomicExch), once
// before and once after a barrier: the schedule, as seen from inside.
__global__ void schedule(int* last, int* before, int* after) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    before[t] = atomicExch(last, t);
    __syncthreads();
    after[t] = atomicExch(last, t);
}

// What each kind of bug looks like (selected by `bug`).
__global__ void misuse(const int* in, int* out, int n, int bug, const uint4* words) {
    __shared__ int shared[64];
    const int t = threadIdx.x;
    switch (bug) {
        case 0: out[t] = in[n + t]; break;                                  // past the end of `in`
        case 1: shared[t] = t; out[t] = shared[(t + 1) % blockDim.x]; break; // no barrier
        case 2: out[t] = shared[t]; break;                                   // never written
        case 3: if (t < 16) __syncthreads(); break;                          // barrier in divergent code
        case 4: out[t] = t < 16 ? __shfl_xor_sync(0xffffffffu, t, 1) : (__syncwarp(), 0); break;
        case 5: if (t == 5) __syncwarp(0x1u); break;                         // caller outside its mask
        case 6: if (t < 8) out[t] = __shfl_sync(0xffu, t, 9); break;         // source outside the mask
        case 7: out[t] = ((const int*)nullptr)[t]; break;
        case 8: { uint4 w = __ldcs(words); out[t] = (int)(w.x + w.w); } break; // `words` is misaligned
        case 9: out[0] = blockIdx.x; out[1] = out[0]; break;                 // two blocks, one word
        case 10: out[t] = *(volatile int*)(0xdead0000ull + t); break;         // a wild pointer
        case 11: if (t == 0) __syncthreads(); else out[t] = __shfl_sync(0xffffffffu, t, 0); break;
        case 12: out[t] = in[t]; ((int*)in)[t] = 0; break;                   // `in` is read-only
    }
}

__device__ __noinline__ int deep(int depth) {
    volatile char frame[1024];
    frame[0] = (char)depth;
    return depth > 0 ? deep(depth - 1) + frame[0] : 0;
}

__global__ void recurse(int* out, int depth) { out[threadIdx.x] = deep(depth); }

}  // namespace t
"""

EXPRESSIONS = ["t::shuffle", "t::section_sum", "t::block_sum", "t::schedule", "t::misuse", "t::recurse"]


@pytest.fixture(scope="module")
def kernels():
    return device.build([(SOURCE, ("-std=c++17",), EXPRESSIONS)])[0]


def i32(v):
    return np.int32(v)


def run_shuffle(kernels, xor_mode, mask, arg, width):
    values = np.arange(100, 132, dtype=np.int32)
    out = np.zeros(32, np.int32)
    kernels["t::shuffle"].launch(1, 32, (values, out, i32(xor_mode), np.uint32(mask), i32(arg), i32(width)))
    return out - 100


def test_shuffles_follow_ptx_sections(kernels):
    lanes = np.arange(32)
    np.testing.assert_array_equal(run_shuffle(kernels, 0, 0xFFFFFFFF, 5, 32), np.full(32, 5))
    np.testing.assert_array_equal(run_shuffle(kernels, 0, 0xFFFFFFFF, 3, 8), (lanes & ~7) + 3)
    np.testing.assert_array_equal(run_shuffle(kernels, 0, 0xFFFFFFFF, 11, 8), (lanes & ~7) + 3)  # 11 mod 8
    np.testing.assert_array_equal(run_shuffle(kernels, 1, 0xFFFFFFFF, 1, 32), lanes ^ 1)
    # xor past a section: later sections are out of reach (own value), earlier ones are not
    np.testing.assert_array_equal(run_shuffle(kernels, 1, 0xFFFFFFFF, 16, 8), np.where(lanes < 16, lanes, lanes - 16))
    got = run_shuffle(kernels, 1, 0x0000FF00, 1, 8)
    np.testing.assert_array_equal(got, np.where((lanes >= 8) & (lanes < 16), lanes ^ 1, -101))


@pytest.mark.parametrize("width", [1, 2, 4, 8, 16, 32])
def test_butterfly_sums_each_section(kernels, width):
    values = np.random.default_rng(width).integers(0, 1000, 64).astype(np.int32)
    out = np.zeros(64, np.int32)
    kernels["t::section_sum"].launch(1, 64, (values, out, i32(width)))
    np.testing.assert_array_equal(out, np.repeat(values.reshape(-1, width).sum(axis=1), width))


def test_barriers_order_shared_memory(kernels):
    values = np.arange(256, dtype=np.int32)
    out = np.zeros(256, np.int32)
    kernels["t::block_sum"].launch(1, 256, (values, out, i32(0)))
    np.testing.assert_array_equal(out, np.full(256, 3 * values.sum()))


def schedule_of(kernels, seed):
    last = np.full(1, -1, np.int32)
    before, after = np.zeros(4 * 64, np.int32), np.zeros(4 * 64, np.int32)
    kernels["t::schedule"].launch(4, 64, (last, before, after), seed=seed)
    return before, after


def test_block_and_thread_orders_are_seeded_shuffles(kernels):
    first = schedule_of(kernels, 1)
    np.testing.assert_array_equal(first[0], schedule_of(kernels, 1)[0])
    np.testing.assert_array_equal(first[1], schedule_of(kernels, 1)[1])
    orders = [schedule_of(kernels, seed) for seed in range(2, 6)]
    assert any((o[0] != first[0]).any() for o in orders), "block or thread order ignores the seed"
    sequential = np.arange(-1, 4 * 64 - 1)
    assert (first[0] != sequential).any(), "threads ran in index order"
    assert (first[1] != first[0]).any(), "the barrier released threads in the order they arrived"


BUGS = {
    0: ("out-of-bounds load of 4 bytes", "argument #0 `in` (int32[32])", "thread ("),
    1: ("reads __shared__ byte",),  # not yet written, or written with no __syncthreads() between
    2: ("which no thread of this block has written",),
    3: ("has exited while", "waits at __syncthreads()"),
    4: ("divergent warp sync", "__shfl_xor_sync", "__syncwarp"),
    5: ("by lane 5, which its mask does not name",),
    6: ("reads lane 9, which the mask does not name",),
    7: ("a null pointer",),
    8: ("misaligned 16-byte access", "argument #4 `words`"),
    9: ("blocks cannot synchronise",),
    10: ("signal 11",),
    11: ("__syncthreads()", "__shfl_sync"),
    12: ("a read-only array", "argument #0 `in`"),
}


@pytest.mark.parametrize("bug", list(BUGS))
def test_each_misuse_is_a_kernel_fault_with_its_place(kernels, bug):
    n = 32
    values = np.arange(n, dtype=np.int32)
    if bug == 12:
        values.flags.writeable = False
    out = np.zeros(n, np.int32)
    raw = np.zeros(96, np.uint8)
    start = -raw.__array_interface__["data"][0] % 16 + 4
    words = raw[start:start + 64]  # four uint4 words, 4 bytes past the 16-byte grid
    grid = 2 if bug == 9 else 1
    with pytest.raises(device.KernelFault) as fault:
        kernels["t::misuse"].launch(grid, n, (values, out, i32(n), i32(bug), words))
    message = str(fault.value)
    for part in BUGS[bug] + ("t::misuse block (", f"seed {device.SEED}", f"FASTXENT_EMU_SEED={device.SEED}"):
        assert part in message, message


def test_a_fiber_stack_overflow_is_a_kernel_fault(kernels):
    with pytest.raises(device.KernelFault, match="fiber stack overflowed"):
        kernels["t::recurse"].launch(1, 2, (np.zeros(2, np.int32), i32(1000)))
    out = np.zeros(2, np.int32)
    kernels["t::recurse"].launch(1, 2, (out, i32(3)))  # the process, and the emulator, go on
    np.testing.assert_array_equal(out, [6, 6])


def test_arguments_are_checked_against_the_parameters(kernels):
    kernel = kernels["t::section_sum"]
    values, out = np.zeros(32, np.int32), np.zeros(32, np.int32)
    with pytest.raises(TypeError, match="takes 3 arguments, got 2"):
        kernel.launch(1, 32, (values, out))
    with pytest.raises(TypeError, match="takes a 4-byte integer, got int64"):
        kernel.launch(1, 32, (values, out, np.int64(8)))
    with pytest.raises(TypeError, match="numpy scalar"):
        kernel.launch(1, 32, (values, out, 8))
    with pytest.raises(TypeError, match="pointer"):
        kernel.launch(1, 32, (values, np.uint64(1), np.int32(8)))
    with pytest.raises(TypeError, match="not C-contiguous"):
        kernel.launch(1, 32, (np.zeros(64, np.int32)[::2], out, np.int32(8)))


def test_only_known_inline_ptx_is_rewritten():
    assert device.rewrite_asm('asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.bits));') == \
        "fx_emu::ptx_cvt_f32_f16(f, h.bits);"
    with pytest.raises(device.BuildError, match="does not know"):
        device.rewrite_asm('asm("cvt.rz.f16.f32 %0, %1;" : "=h"(r) : "f"(v));')
    with pytest.raises(device.BuildError, match="cannot rewrite"):
        device.rewrite_asm('asm volatile("membar.gl;");')


HALF_SOURCE = r"""
namespace t {
__global__ void widen_half(const fx::f16* in, float* out, long long n) {
    for (long long i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        out[i] = fx::widen(in[i]);
}
__global__ void narrow_half(const float* in, fx::f16* out, long long n) {
    for (long long i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        out[i] = fx::narrow<fx::f16>(in[i]);
}
}  // namespace t
"""


def test_float16_conversions_are_bit_exact():
    """fx_common.cuh's PTX cvt, as emulated: every half, and floats around every rounding
    boundary (ties, subnormals, overflow to inf), as numpy's float16."""
    source = _build.kernel_source("fx_common.cuh") + HALF_SOURCE
    built = device.build([(source, _build.compile_options(), ["t::widen_half", "t::narrow_half"])])[0]
    halves = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    widened = np.zeros(halves.size, np.float32)
    built["t::widen_half"].launch(64, 256, (halves, widened, np.int64(halves.size)))
    np.testing.assert_array_equal(widened.view(np.uint32), halves.view(np.float16).astype(np.float32).view(np.uint32))
    rng = np.random.default_rng(0)
    exact = halves.view(np.float16).astype(np.float32).view(np.uint32).astype(np.int64)
    near = (exact[:, None] + np.arange(-2, 3) * 2**12 + rng.integers(-3, 4, (exact.size, 5))).ravel()
    floats = np.concatenate([near % 2**32, rng.integers(0, 2**32, 2**18)]).astype(np.uint32).view(np.float32)
    narrowed = np.zeros(floats.size, np.uint16)
    built["t::narrow_half"].launch(64, 256, (floats, narrowed, np.int64(floats.size)))
    with np.errstate(over="ignore"):
        expected = floats.astype(np.float16).view(np.uint16)
    assert (narrowed == expected).all(), (
        f"{np.count_nonzero(narrowed != expected)} floats narrow differently, first "
        f"{floats[narrowed != expected][:4].view(np.uint32)}")


# ----------------------------------------------------------------------------
# Mutations: the emulated suite fails on broken kernels
# ----------------------------------------------------------------------------

def check_sparse_rows(monkeypatch, shape, tunables):
    """The sparse loss (fused and forward) and log_softmax of ``shape`` on the emulated
    device against the reference, with ``tunables`` patched in the backend."""
    import fastxent as fx
    from fastxent import reference as ref

    for name, value in tunables.items():
        monkeypatch.setattr(_config, "CUDA_" + name, value)
    logits = make_logits(shape, np.float32, seed=3)
    labels = make_class_ids(shape[:1], shape[1], seed=4)
    d_logits, d_labels = emu.fake_cupy.asarray(logits), emu.fake_cupy.asarray(labels)
    expected = ref.sparse_softmax_cross_entropy(logits, labels, label_smoothing=0.1, return_grad=True)
    loss, grad = fx.sparse_softmax_cross_entropy(d_logits, d_labels, label_smoothing=0.1, return_grad=True)
    assert_close(loss.get(), expected[0], np.float32, "value", f"{shape} loss")
    assert_close(grad.get(), expected[1], np.float32, "stored", f"{shape} grad")
    loss = fx.sparse_softmax_cross_entropy(d_logits, d_labels, label_smoothing=0.1)
    assert_close(loss.get(), expected[0], np.float32, "value", f"{shape} forward-only loss")
    assert_close(fx.log_softmax(d_logits).get(), ref.log_softmax(logits), np.float32, "stored",
                 f"{shape} log_softmax")


def check_inplace_rows(monkeypatch, shape, tunables):
    """The sparse loss with the gradient written over the logits (inplace), under four
    seeds: a missing ordering of global memory within a block shows only in some
    schedules."""
    from fastxent import reference as ref

    for name, value in tunables.items():
        monkeypatch.setattr(_config, "CUDA_" + name, value)
    logits = make_logits(shape, np.float32, seed=5)
    labels = make_class_ids(shape[:1], shape[1], seed=6)
    expected = ref.sparse_softmax_cross_entropy(logits, labels, return_grad=True)
    for seed in range(4):
        monkeypatch.setattr(device, "SEED", seed)
        loss, grad = cupy_cuda.sparse_softmax_cross_entropy(
            emu.fake_cupy.asarray(logits), emu.fake_cupy.asarray(labels), None, None, 0.0, 0.0, None, 1.0,
            inplace=True)
        assert_close(loss.get(), expected[0], np.float32, "value", f"{shape} inplace loss, seed {seed}")
        assert_close(grad.get(), expected[1], np.float32, "stored", f"{shape} inplace grad, seed {seed}")


#: name: (file in kernels/, text, mutated text, check, (shape, tunables) of the cases that must fail)
MUTATIONS = {
    "row loop off by one": (
        "softmax_rows.cu",
        "for (i64 row = g.first_row; row < N; row += g.row_stride) {\n        const T* xr = x + row * C;\n"
        "        T* gr = grad != nullptr",
        "for (i64 row = g.first_row; row <= N; row += g.row_stride) {\n        const T* xr = x + row * C;\n"
        "        T* gr = grad != nullptr",
        check_sparse_rows, [((37, 3), {})],
    ),
    "no barrier before the shared buffer is reused": (
        "fx_common.cuh",
        "    const int warps = (int)(blockDim.x >> 5);\n    __syncthreads();\n",
        "    const int warps = (int)(blockDim.x >> 5);\n",
        check_sparse_rows, [((3, 301), {"WARP_MAX_CLASSES": 0, "MAX_GRID": 1})],
    ),
    "wrong shuffle lane": (
        "fx_common.cuh",
        "v = S::merge(v, shfl_xor_struct(v, offset, mask, G));",
        "v = S::merge(v, shfl_xor_struct(v, offset << 1, mask, G));",
        check_sparse_rows, [((37, 3), {}), ((6, 423), {})],
    ),
    # not one of the three: the shuffled schedule, not a check, has to catch it
    "no barrier before the inplace gradient overwrites the label's score": (
        "softmax_rows.cu",
        "            g.sync();  // inplace: x[row, y] is read by every thread before any gradient store\n",
        "",
        check_inplace_rows, [((16, 423), {}), ((4, 3001), {})],
    ),
}


@pytest.fixture
def kernels_copy(tmp_path, monkeypatch):
    """A copy of kernels/ the backend loads from, on the emulated device; yields a function
    that applies one mutation to it."""
    copy = tmp_path / "kernels"
    shutil.copytree(_build.kernel_dir(), copy)
    monkeypatch.setattr(_build, "kernel_dir", lambda: copy)
    _build.kernel_source.cache_clear()

    def mutate(filename, text, mutated):
        path = copy / filename
        source = path.read_text()
        assert source.count(text) >= 1, f"the mutation no longer applies to {filename}: {text!r}"
        path.write_text(source.replace(text, mutated, 1))
        _build.kernel_source.cache_clear()
        _build._module.cache_clear()

    with emu.emulated_cupy():
        yield mutate
    _build.kernel_source.cache_clear()


def test_unmutated_kernels_pass_the_mutation_checks(kernels_copy, monkeypatch):
    for _, _, _, check, cases in MUTATIONS.values():
        for shape, tunables in cases:
            with monkeypatch.context() as patch:
                check(patch, shape, tunables)


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_the_emulated_suite_fails_on_a_mutated_kernel(kernels_copy, monkeypatch, mutation):
    filename, text, mutated, check, cases = MUTATIONS[mutation]
    kernels_copy(filename, text, mutated)
    for shape, tunables in cases:
        with monkeypatch.context() as patch, pytest.raises((device.KernelFault, pytest.fail.Exception,
                                                            AssertionError)) as failure:
            check(patch, shape, tunables)
        print(f"{mutation} {shape}: {type(failure.value).__name__}: {str(failure.value)[:300]}")
