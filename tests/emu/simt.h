// fastxent test support -- the CUDA subset of kernels/, for g++ on the host.
//
// tests/emu/device.py compiles each kernel source as: this header, then the text CuPy
// would hand to NVRTC (fastxent.backends.cuda._build.kernel_source(), includes inlined), then one generated
// entry per name expression (FX_EMU_ENTRY below). The kernel text is compiled unchanged
// but for ONE rewrite: each inline-PTX statement `asm("<ptx>" : "=c"(out) : "c"(in));`
// becomes a call of the emulated instruction, `fx_emu::ptx_<name>(out, in)` (g++ cannot
// compile GNU extended asm naming PTX registers, and no macro can capture its operands).
// device.py knows the two PTX statements kernels/ uses and refuses any other.
//
// What is here: the CUDA keywords, the built-in index variables, the intrinsics, the
// emulated PTX conversions and the entry that unpacks a launch's argument array. What is
// not here: the scheduler, barriers, shuffles and memory checks, which live in simt.cpp
// (built once, without instrumentation). The kernel TU is compiled with g++'s
// -fsanitize=thread, so every load and store of kernel code (but of locals that never
// escape) calls __tsan_{read,write}N(address) in simt.cpp, which checks it.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

namespace fx_emu {
struct Dim3 { unsigned int x, y, z; };
}

#ifndef FX_EMU_RUNTIME  // simt.cpp includes this file for the structs below only

// ---------------------------------------------------------------------------
// Keywords. __shared__ variables become static: simt.cpp runs one block at a time and
// finds them in this library's .bss (KernelInfo below), where it tracks every access:
// a read of a byte no thread of the block has written, and two threads touching the
// same byte (one of them writing) with no __syncthreads between, are reported.
// ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static

// The built-in variables: simt.cpp sets them before it resumes a fiber (one CUDA thread).
extern "C" fx_emu::Dim3 fx_emu_thread_idx, fx_emu_block_idx, fx_emu_block_dim, fx_emu_grid_dim;
#define threadIdx (static_cast<const fx_emu::Dim3&>(fx_emu_thread_idx))
#define blockIdx (static_cast<const fx_emu::Dim3&>(fx_emu_block_idx))
#define blockDim (static_cast<const fx_emu::Dim3&>(fx_emu_block_dim))
#define gridDim (static_cast<const fx_emu::Dim3&>(fx_emu_grid_dim))

// ---------------------------------------------------------------------------
// Intrinsics that synchronise (simt.cpp: they switch fibers)
// ---------------------------------------------------------------------------
extern "C" void __syncthreads(void);
extern "C" void __syncwarp(unsigned mask = 0xffffffffu);
int __shfl_sync(unsigned mask, int var, int src_lane, int width = 32);
int __shfl_xor_sync(unsigned mask, int var, int lane_mask, int width = 32);
extern "C" int atomicExch(int* address, int value);

// ---------------------------------------------------------------------------
// Plain intrinsics
// ---------------------------------------------------------------------------
// A misaligned 16-byte access faults on the device; g++ may split a uint4 copy into
// narrower accesses, so the copies themselves check their addresses.
extern "C" void fx_emu_vector_access(const void* address);
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
    uint4() = default;
    uint4(const uint4& o) : x(o.x), y(o.y), z(o.z), w(o.w) { check(&o); }
    uint4& operator=(const uint4& o) {
        check(this);
        check(&o);
        x = o.x, y = o.y, z = o.z, w = o.w;
        return *this;
    }
    static void check(const void* p) {
        if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fx_emu_vector_access(p);
    }
};

// ld.global.cs / st.global.cs: cache hints only, so plain (checked) loads and stores.
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }

inline float __int_as_float(int i) { float f; __builtin_memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; __builtin_memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; __builtin_memcpy(&i, &f, 4); return i; }
inline double __longlong_as_double(long long i) { double d; __builtin_memcpy(&d, &i, 8); return d; }

// __expf is ex2.approx(x * log2(e)) on the device: its error (2 + 1.16|x| ulp) comes from
// rounding the float product, which this keeps; exp2f itself is within 1 ulp.
inline float __expf(float x) { return exp2f(x * 1.44269504088896341f); }

// memcpy of kernel code is checked like a load and a store: g++ does not instrument calls.
extern "C" void __tsan_read_range(void* address, size_t size);
extern "C" void __tsan_write_range(void* address, size_t size);
namespace fx_emu {
inline void* checked_memcpy(void* dst, const void* src, size_t n) {
    __tsan_read_range(const_cast<void*>(src), n);
    __tsan_write_range(dst, n);
    return __builtin_memcpy(dst, src, n);
}
}  // namespace fx_emu
#define memcpy fx_emu::checked_memcpy

#endif  // FX_EMU_RUNTIME

// ---------------------------------------------------------------------------
// The emulated PTX instructions (the one rewrite, see the header comment). Bit-exact
// with numpy's float16 conversions (tests/test_emulator.py checks all 65536 halves and
// a sample of floats): round to nearest even, subnormals, infinities; NaN payloads as
// numpy keeps them (the device may canonicalise them; no test looks at NaN bits).
// ---------------------------------------------------------------------------
namespace fx_emu {

// cvt.f32.f16 d, a: widen a half (exact).
inline void ptx_cvt_f32_f16(float& out, unsigned short h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    uint32_t bits;
    if (exponent == 0x1fu) {
        bits = sign | 0x7f800000u | (mantissa << 13);  // inf, NaN (payload kept)
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);  // rebias 15 -> 127
    } else {
        float magnitude = (float)mantissa * 5.9604644775390625e-8f;  // subnormal: m * 2^-24, exact
        __builtin_memcpy(&bits, &magnitude, 4);
        bits |= sign;
    }
    __builtin_memcpy(&out, &bits, 4);
}

// cvt.rn.f16.f32 d, a: narrow a float, round to nearest even; overflow gives inf.
inline void ptx_cvt_rn_f16_f32(unsigned short& out, float v) {
    uint32_t x;
    __builtin_memcpy(&x, &v, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    uint32_t h;
    if (x > 0x7f800000u) {
        h = 0x7c00u | ((x & 0x7fffffu) >> 13);  // NaN, numpy's bits: top payload, never inf
        if (h == 0x7c00u) h = 0x7c01u;
    } else if (x >= 0x47800000u) {
        h = 0x7c00u;  // >= 2^16 (and inf): inf; [65520, 65536) carries into inf below
    } else if (x < 0x38800000u) {
        // < 2^-14: subnormal or zero. Adding 0.5f puts the float's unit in the last place
        // at 2^-24, the half subnormal step, so the float adder rounds to nearest even.
        float f;
        __builtin_memcpy(&f, &x, 4);
        f += 0.5f;
        uint32_t fb;
        __builtin_memcpy(&fb, &f, 4);
        h = fb - 0x3f000000u;
    } else {
        const uint32_t odd = (x >> 13) & 1u;  // ties to even on the 13 dropped bits
        h = (x + 0xc8000fffu + odd) >> 13;    // rebias 127 -> 15 (-112 << 23) and round
    }
    out = (unsigned short)(h | sign);
}

// ---------------------------------------------------------------------------
// Entries: FX_EMU_ENTRY(i, expression) defines extern "C" fx_emu_kernel_<i>(), which
// describes the kernel to simt.cpp (and device.py): its parameters' sizes and kinds,
// deduced from the function pointer, and a thunk that calls it with an argument array
// unpacked as cudaLaunchKernel does (args[k] points to parameter k's value).
// ---------------------------------------------------------------------------

struct KernelInfo {
    const char* name;
    int nparams;
    const int* sizes;
    const char* kinds;  // per parameter: 'p' pointer, 'i' integer, 'f' floating
    void (*thunk)(void** args);
    const char* bss_lo;  // this library's static storage, where __shared__ lives
    const char* bss_hi;
};

template <class P> constexpr char kind_of() {
    return std::is_pointer<P>::value ? 'p' : std::is_floating_point<P>::value ? 'f' : 'i';
}

template <auto Kernel> struct Entry;
template <class... P, void (*Kernel)(P...)> struct Entry<Kernel> {
    template <size_t... I> static void call(void** args, std::index_sequence<I...>) {
        Kernel(*static_cast<std::remove_cv_t<P>*>(args[I])...);
    }
    static void thunk(void** args) { call(args, std::index_sequence_for<P...>{}); }
    static constexpr int sizes[sizeof...(P) + 1] = {(int)sizeof(P)..., 0};
    static constexpr char kinds[sizeof...(P) + 1] = {kind_of<P>()..., 0};
};

}  // namespace fx_emu

extern char __bss_start[] __attribute__((visibility("hidden")));
extern char _end[] __attribute__((visibility("hidden")));

#define FX_EMU_ENTRY(index, ...)                                                                  \
    extern "C" __attribute__((visibility("default"))) const fx_emu::KernelInfo*                  \
    fx_emu_kernel_##index() {                                                                     \
        using E = fx_emu::Entry<&__VA_ARGS__>;                                                    \
        static const fx_emu::KernelInfo info = {#__VA_ARGS__, (int)sizeof(E::kinds) - 1, E::sizes, \
                                                E::kinds, &E::thunk, __bss_start, _end};          \
        return &info;                                                                             \
    }
