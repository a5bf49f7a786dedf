// fastxent -- CUDA plumbing shared by every kernel file: storage types, conversions,
// 128-bit packed loads/stores, thread groups and reductions, and the row visitor.
//
// Nothing here knows a loss formula (those live in fx_formulas.cuh). The file needs no
// CUDA header: it is compiled at run time by NVRTC through CuPy (which inlines it into
// each .cu, see fastxent/backends/cuda/_build.py) and by `nvcc -ptx` in ci/check_kernels.py.
//
// Storage types
//   float, double          as themselves;
//   fx::f16, fx::bf16      raw 16-bit words (IEEE half, bfloat16), converted explicitly by
//                          widen()/narrow() below: PTX cvt for half, bit shifts with
//                          round-to-nearest-even for bfloat16. No cuda_fp16.h/cuda_bf16.h,
//                          so a plain `pip install cupy-cuda12x` (no CUDA headers) works.
// Accumulation type acc_t<T>: double for double, float otherwise (docs/design.md: at least
//   float32; a bf16 running sum has an 8-bit significand and stops growing after ~256 terms).
//   It is also the loss dtype (float32 for 16-bit scores, else the scores' dtype).
// Offsets are 64-bit (fx::i64): 65536 x 50257 scores = 3.3e9 elements overflow int32.
#pragma once

namespace fx {

typedef long long i64;
typedef unsigned long long u64;

// ----------------------------------------------------------------------------
// Storage types and type traits
// ----------------------------------------------------------------------------

struct f16 { unsigned short bits; };
struct bf16 { unsigned short bits; };

// Marks an absent input or output stream of row_apply (no load, no store).
struct None {};

template <class T> struct AccOf { typedef float type; };
template <> struct AccOf<double> { typedef double type; };
template <class T> using acc_t = typename AccOf<T>::type;

template <class A, class B> struct IsSame { static constexpr bool value = false; };
template <class A> struct IsSame<A, A> { static constexpr bool value = true; };
template <class T> constexpr bool is_none = IsSame<T, None>::value;

// ----------------------------------------------------------------------------
// Special values (no <limits> under NVRTC)
// ----------------------------------------------------------------------------

__device__ __forceinline__ float inf_like(float) { return __int_as_float(0x7f800000); }
__device__ __forceinline__ double inf_like(double) { return __longlong_as_double(0x7ff0000000000000LL); }
__device__ __forceinline__ float nan_like(float) { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ double nan_like(double) { return __longlong_as_double(0x7ff8000000000000LL); }
template <class A> __device__ __forceinline__ A inf() { return inf_like(A(0)); }
template <class A> __device__ __forceinline__ A nan() { return nan_like(A(0)); }

// ----------------------------------------------------------------------------
// Conversions: widen (storage -> float/double) and narrow (float/double -> storage)
// ----------------------------------------------------------------------------

__device__ __forceinline__ float widen(f16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.bits));
    return f;
}
// bfloat16 is the top half of a float32: widening is exact.
__device__ __forceinline__ float widen(bf16 b) { return __uint_as_float(((unsigned)b.bits) << 16); }
__device__ __forceinline__ float widen(float f) { return f; }
__device__ __forceinline__ double widen(double d) { return d; }
__device__ __forceinline__ float widen(bool b) { return b ? 1.0f : 0.0f; }

template <class A, class T> __device__ __forceinline__ A to_acc(T v) { return (A)widen(v); }

template <class T> struct Narrow;
template <> struct Narrow<float> {
    __device__ static float from(float v) { return v; }
    __device__ static float from(double v) { return (float)v; }
};
template <> struct Narrow<double> {
    __device__ static double from(float v) { return (double)v; }
    __device__ static double from(double v) { return v; }
};
template <> struct Narrow<f16> {
    // cvt.rn: round to nearest even; overflow gives +-inf, NaN stays NaN.
    __device__ static f16 from(float v) {
        f16 r;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
        return r;
    }
};
template <> struct Narrow<bf16> {
    // Round to nearest even on the 16 dropped bits (as ml_dtypes and torch); NaN stays a
    // quiet NaN with its sign; overflow rounds to +-inf through the carry into the exponent.
    __device__ static bf16 from(float v) {
        unsigned u = __float_as_uint(v);
        bf16 r;
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            r.bits = (unsigned short)((u >> 16) | 0x0040u);
            return r;
        }
        u += 0x7fffu + ((u >> 16) & 1u);
        r.bits = (unsigned short)(u >> 16);
        return r;
    }
};
template <class T, class A> __device__ __forceinline__ T narrow(A v) { return Narrow<T>::from(v); }

// ----------------------------------------------------------------------------
// Math in the accumulation type
// ----------------------------------------------------------------------------
// fast_exp is the hot-loop exponential: ex2.approx for float (__expf: 2 + 1.16|x| ulp, and
// its arguments here are x - max <= 0, where the terms that lose accuracy are the ones
// that no longer matter to the sum), the correctly rounded exp for double. Everything
// evaluated once per row or per element of an elementwise loss uses the accurate libm.

__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
__device__ __forceinline__ float acc_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double acc_log1p(double x) { return log1p(x); }
// Not inlined: the softcap calls it once per element inside loops unrolled V x UNROLL
// times, and an inlined tanhf there tripled the kernels' code and compile time.
__device__ __noinline__ float acc_tanh(float x) { return tanhf(x); }
__device__ __noinline__ double acc_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float absval(float x) { return fabsf(x); }
__device__ __forceinline__ double absval(double x) { return fabs(x); }

// ----------------------------------------------------------------------------
// 128-bit packed loads and stores
// ----------------------------------------------------------------------------
// A Pack is V consecutive elements, V = 16 / sizeof(score type): 8 half/bfloat16, 4 float,
// 2 double, so every score load is one 128-bit LDG (NVIDIA, "CUDA Pro Tip: Increase
// Performance with Vectorized Memory Access", Luitjens 2013: fewer instructions per byte,
// the same bandwidth with fewer warps in flight). A second operand of a wider type is
// loaded as 2 x 128 bits for the same V elements. STREAM selects ld.global.cs (evict
// first: the last read of the data) over the default caching load.

template <class T, int V> struct alignas(sizeof(T) * V) Pack { T v[V]; };

template <class T, int V> __host__ __device__ constexpr int words16() { return (int)(sizeof(Pack<T, V>) / 16); }

template <bool STREAM, class T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
    static_assert(sizeof(Pack<T, V>) % 16 == 0, "a pack is a whole number of 16-byte words");
    constexpr int W = words16<T, V>();
    const uint4* q = reinterpret_cast<const uint4*>(p);
    uint4 raw[W];
#pragma unroll
    for (int k = 0; k < W; ++k) {
        if constexpr (STREAM) raw[k] = __ldcs(q + k);
        else raw[k] = q[k];
    }
    Pack<T, V> out;
    memcpy(&out, raw, sizeof(out));
    return out;
}

// Stores are streaming (st.global.cs): the gradient is not read again by this kernel, and
// evict-first keeps the L2 for the rows still waiting for their second pass.
template <class T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& pack) {
    constexpr int W = words16<T, V>();
    uint4 raw[W];
    memcpy(raw, &pack, sizeof(pack));
    uint4* q = reinterpret_cast<uint4*>(p);
#pragma unroll
    for (int k = 0; k < W; ++k) __stcs(q + k, raw[k]);
}

// Input and output streams of row_apply; the None specialisations do nothing, so a
// visitor without a second operand or without outputs pays for neither.
template <class T, int V> struct InStream {
    Pack<T, V> pack;
    template <bool STREAM> __device__ __forceinline__ void load(const T* base, i64 at) {
        pack = load_pack<STREAM, T, V>(base + at);
    }
    template <class A> __device__ __forceinline__ A get(int k) const { return to_acc<A>(pack.v[k]); }
    template <class A> __device__ __forceinline__ static A scalar(const T* base, i64 at) {
        return to_acc<A>(base[at]);
    }
};
template <int V> struct InStream<None, V> {
    template <bool STREAM> __device__ __forceinline__ void load(const None*, i64) {}
    template <class A> __device__ __forceinline__ A get(int) const { return A(0); }
    template <class A> __device__ __forceinline__ static A scalar(const None*, i64) { return A(0); }
};

template <class T, int V> struct OutStream {
    Pack<T, V> pack;
    template <class A> __device__ __forceinline__ void set(int k, A v) { pack.v[k] = narrow<T>(v); }
    __device__ __forceinline__ void store(T* base, i64 at) const { store_pack<T, V>(base + at, pack); }
    template <class A> __device__ __forceinline__ static void scalar(T* base, i64 at, A v) {
        base[at] = narrow<T>(v);
    }
};
template <int V> struct OutStream<None, V> {
    template <class A> __device__ __forceinline__ void set(int, A) {}
    __device__ __forceinline__ void store(None*, i64) const {}
    template <class A> __device__ __forceinline__ static void scalar(None*, i64, A) {}
};

// ----------------------------------------------------------------------------
// The row visitor
// ----------------------------------------------------------------------------
// row_apply visits the positions [c0, c1) of one row that belong to thread `lane` of the
// `width` threads sharing the row, calling f(c, x_c, y_c, out1, out2) with x and y widened
// to A; out1/out2 (A&, preset to 0) are narrowed and stored to o1[c]/o2[c] when those
// streams exist. All pointers point at the row's position 0.
//
// Layout: a scalar head up to the first 16-byte boundary of x + c0, then 128-bit packs,
// then a scalar tail, so any C (50257 included) and any row start gets packed loads.
// Packs are claimed in tiles of UNROLL packs per thread, all loads of a tile issued before
// any use: 4 x 16 B in flight per thread x 1024 threads = 64 KB per SM, above the ~22 KB
// Little's law asks for at 4.8 TB/s x ~0.6 us latency over 132 SMs (H200), even when the
// fused kernel runs a single block per SM. REVERSE walks the tiles from the end of the
// row: the second pass of a fused kernel then re-reads first what the first pass read
// last, the part most likely still in L2.
//
// vec_ok = 0 (set by the host when the arrays' element offsets disagree modulo V, e.g. an
// odd view) makes the whole range the scalar head.

// Packs in flight per thread: 4 for a 16-byte score pack alone, fewer when a second
// operand widens the step (bfloat16 scores + float32 labels: 48 B a pack, 1 in flight), so
// a tile stays within 64 B of registers: under __launch_bounds__(1024) a thread has 64
// registers in all.
template <class T, class Y> __host__ __device__ constexpr int unroll_for() {
    constexpr int bytes = 16 + (is_none<Y> ? 0 : (int)(16 / sizeof(T)) * (int)sizeof(Y));
    return bytes >= 64 ? 1 : 64 / bytes;
}

template <class A, bool STREAM, bool REVERSE, class T, class Y, class O1, class O2, class F>
__device__ __forceinline__ void row_apply(i64 c0, i64 c1, const T* x, const Y* y, O1* o1, O2* o2,
                                          i64 lane, i64 width, bool vec_ok, F&& f) {
    constexpr int V = 16 / (int)sizeof(T);
    constexpr int UNROLL = unroll_for<T, Y>();
    const i64 n = c1 - c0;
    i64 head = n;
    if (vec_ok) {
        const u64 addr = (u64)(x + c0);
        head = (i64)(((16u - (addr & 15u)) & 15u) / sizeof(T));
        if (head > n) head = n;
    }
    const i64 nvec = (n - head) / V;
    const i64 body = c0 + head;
    const i64 tail = body + nvec * V;

    auto visit_scalar = [&](i64 begin, i64 end) {
        for (i64 c = begin + lane; c < end; c += width) {
            A r1 = A(0), r2 = A(0);
            f(c, InStream<T, V>::template scalar<A>(x, c), InStream<Y, V>::template scalar<A>(y, c), r1, r2);
            OutStream<O1, V>::scalar(o1, c, r1);
            OutStream<O2, V>::scalar(o2, c, r2);
        }
    };

    if constexpr (REVERSE) visit_scalar(tail, c1);
    else visit_scalar(c0, body);

    const i64 step = width * UNROLL;
    const i64 tiles = (nvec + step - 1) / step;
    for (i64 t = 0; t < tiles; ++t) {
        const i64 v0 = (REVERSE ? tiles - 1 - t : t) * step + lane;
        InStream<T, V> xs[UNROLL];
        InStream<Y, V> ys[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const i64 v = v0 + u * width;
            if (v < nvec) {
                xs[u].template load<STREAM>(x, body + v * V);
                ys[u].template load<STREAM>(y, body + v * V);
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const i64 v = v0 + u * width;
            if (v < nvec) {
                OutStream<O1, V> p1;
                OutStream<O2, V> p2;
#pragma unroll
                for (int k = 0; k < V; ++k) {
                    A r1 = A(0), r2 = A(0);
                    f(body + v * V + k, xs[u].template get<A>(k), ys[u].template get<A>(k), r1, r2);
                    p1.set(k, r1);
                    p2.set(k, r2);
                }
                p1.store(o1, body + v * V);
                p2.store(o2, body + v * V);
            }
        }
    }

    if constexpr (REVERSE) visit_scalar(c0, body);
    else visit_scalar(tail, c1);
}

// Writes `value` to out[c0, c1) (the gradient of an ignored row) with the same head /
// 128-bit body / tail split, taken from out's own address, without reading any input.
template <class T, class A>
__device__ __forceinline__ void fill_range(T* out, i64 c0, i64 c1, A value, i64 lane, i64 width) {
    constexpr int V = 16 / (int)sizeof(T);
    const T v = narrow<T>(value);
    const i64 n = c1 - c0;
    i64 head = (i64)(((16u - ((u64)(out + c0) & 15u)) & 15u) / sizeof(T));
    if (head > n) head = n;
    const i64 nvec = (n - head) / V;
    const i64 body = c0 + head;
    const i64 tail = body + nvec * V;
    Pack<T, V> pack;
#pragma unroll
    for (int k = 0; k < V; ++k) pack.v[k] = v;
    for (i64 c = c0 + lane; c < body; c += width) out[c] = v;
    for (i64 i = lane; i < nvec; i += width) store_pack<T, V>(out + body + i * V, pack);
    for (i64 c = tail + lane; c < c1; c += width) out[c] = v;
}

// ----------------------------------------------------------------------------
// Thread groups: who owns a row, and reductions over the group
// ----------------------------------------------------------------------------
// A statistics struct S is plain data (a whole number of 32-bit words) with a static
// S::merge(S, S) that is commutative bit for bit (sums and maxima of the two sides, each
// side's term computed the same way whichever side it is on), so every lane of a
// butterfly ends with the same bits; Group::reduce still broadcasts lane 0's result.

template <class S>
__device__ __forceinline__ S shfl_xor_struct(const S& v, int lane_mask, unsigned mask, int width) {
    static_assert(sizeof(S) % 4 == 0, "shuffled structs are whole 32-bit words");
    constexpr int W = (int)(sizeof(S) / 4);
    int w[W];
    memcpy(w, &v, sizeof(S));
#pragma unroll
    for (int k = 0; k < W; ++k) w[k] = __shfl_xor_sync(mask, w[k], lane_mask, width);
    S r;
    memcpy(&r, w, sizeof(S));
    return r;
}

template <class S>
__device__ __forceinline__ S shfl_struct(const S& v, int src_lane, unsigned mask, int width) {
    constexpr int W = (int)(sizeof(S) / 4);
    int w[W];
    memcpy(w, &v, sizeof(S));
#pragma unroll
    for (int k = 0; k < W; ++k) w[k] = __shfl_sync(mask, w[k], src_lane, width);
    S r;
    memcpy(&r, w, sizeof(S));
    return r;
}

template <int G, class S>
__device__ __forceinline__ S warp_reduce(S v, unsigned mask) {
#pragma unroll
    for (int offset = G / 2; offset > 0; offset >>= 1) v = S::merge(v, shfl_xor_struct(v, offset, mask, G));
    return v;
}

// Whole-block reduction; every thread returns the same value. The leading barrier lets
// the same shared buffer serve several reductions in a row (a second reduction of the
// same S must not overwrite partials another warp is still reading).
template <class S>
__device__ __forceinline__ S block_reduce(S v) {
    __shared__ S partial[32];
    v = warp_reduce<32>(v, 0xffffffffu);
    const int warp = (int)(threadIdx.x >> 5);
    const int warps = (int)(blockDim.x >> 5);
    __syncthreads();
    if ((threadIdx.x & 31u) == 0) partial[warp] = v;
    __syncthreads();
    S r = partial[0];
    for (int k = 1; k < warps; ++k) r = S::merge(r, partial[k]);
    return r;
}

// Launch bounds. The host's tunables (fastxent/_config.py: CUDA_GROUP_BLOCK_THREADS,
// CUDA_ROW_BLOCK_MAX_THREADS, CUDA_ELEMENTWISE_BLOCK_THREADS) arrive as -D options
// (fastxent/backends/cuda/_build.py, compile_options), so the block sizes the host
// launches and the bounds compiled here are one value each. A block-per-row kernel
// (G == 0) may run ROW_BLOCK_MAX_THREADS = 1024 threads (64 registers each); a group kernel
// runs GROUP_BLOCK_THREADS = 256, which leaves it up to 255 registers (at 64 the double
// and 8-lane variants spill).
#if !defined(FX_GROUP_BLOCK_THREADS) || !defined(FX_ROW_BLOCK_MAX_THREADS) || !defined(FX_ELEMENTWISE_BLOCK_THREADS)
#error "compile with the -D options of fastxent/backends/cuda/_build.py compile_options()"
#endif
enum {
    GROUP_BLOCK_THREADS = FX_GROUP_BLOCK_THREADS,
    ROW_BLOCK_MAX_THREADS = FX_ROW_BLOCK_MAX_THREADS,
    ELEMENTWISE_BLOCK_THREADS = FX_ELEMENTWISE_BLOCK_THREADS
};
template <int G> __host__ __device__ constexpr int row_launch_bound() {
    return G == 0 ? ROW_BLOCK_MAX_THREADS : GROUP_BLOCK_THREADS;
}

// G threads per row: G in {4, 8, 16, 32} packs blockDim.x / G rows into a block (several
// rows per warp for small C); G == 0 gives the whole block to one row (large C). Rows
// are visited grid-stride; a group's threads always share their row, so a whole group
// takes the same branches and reaches the same reductions.
template <int G> struct Group {
    static_assert(G == 4 || G == 8 || G == 16 || G == 32, "G threads per row: 4, 8, 16, 32 or 0 (block)");
    i64 lane, width, first_row, row_stride;
    unsigned mask;
    __device__ Group() {
        const int rows_per_block = (int)(blockDim.x / G);
        lane = threadIdx.x % G;
        width = G;
        first_row = (i64)blockIdx.x * rows_per_block + threadIdx.x / G;
        row_stride = (i64)gridDim.x * rows_per_block;
        mask = (G == 32) ? 0xffffffffu : (((1u << G) - 1u) << ((threadIdx.x & 31u) / G * G));
    }
    __device__ bool leader() const { return lane == 0; }
    __device__ void sync() const { __syncwarp(mask); }
    template <class S> __device__ S reduce(S v) const {
        return shfl_struct(warp_reduce<G>(v, mask), 0, mask, G);
    }
};

template <> struct Group<0> {
    i64 lane, width, first_row, row_stride;
    __device__ Group() {
        lane = threadIdx.x;
        width = blockDim.x;
        first_row = blockIdx.x;
        row_stride = gridDim.x;
    }
    __device__ bool leader() const { return lane == 0; }
    __device__ void sync() const { __syncthreads(); }
    template <class S> __device__ S reduce(S v) const { return block_reduce(v); }
};

// ----------------------------------------------------------------------------
// Per-row parameters handed over by the host
// ----------------------------------------------------------------------------

// The gradient multiplier of row (or element) i: grad_output times the reduction factor,
// an array when it varies, else one value (fastxent/backends/__init__.py).
template <class A>
__device__ __forceinline__ A scale_at(const double* scale, double scale_value, i64 i) {
    return (A)(scale != nullptr ? scale[i] : scale_value);
}

// Sparse label status: a class id in [0, C), the ignore_index, or out of range (which the
// host turns into the CPU path's ValueError; the kernel never reads out of bounds).
enum LabelStatus { LABEL_KEPT = 0, LABEL_IGNORED = 1, LABEL_BAD = 2 };

__device__ __forceinline__ int label_status(i64 y, i64 C, i64 ignore_index, int has_ignore) {
    if (has_ignore && y == ignore_index) return LABEL_IGNORED;
    return (y >= 0 && y < C) ? LABEL_KEPT : LABEL_BAD;
}

__device__ __forceinline__ void raise_flag(int* flag) { atomicExch(flag, 1); }

}  // namespace fx
