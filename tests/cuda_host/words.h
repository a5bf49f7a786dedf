// 128-bit words and the streaming load/store intrinsics, plain (the formulas harness).
#pragma once
struct uint4 { unsigned x, y, z, w; };
template <class T> T __ldcs(const T* p) { return *p; }
template <class T> void __stcs(T* p, T v) { *p = v; }
