// Host shim: just enough of CUDA for g++ to compile the device-function layer of
// kernels/ (fx_formulas.cuh) and its index arithmetic (fx_common.cuh) as plain C++.
// One thread: threadIdx/blockIdx are plain globals the harness sets, shuffles return
// the caller's own value, barriers do nothing, inline PTX is dropped (the harnesses use
// no float16 conversion). The kernels' loops and launches are executed with real
// barriers and shuffles by the emulated device (tests/emu/).
#pragma once
#include <cmath>
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
