// A checking uint4 stands in for CUDA's: its copy constructor and assignment see the
// address of every 16-byte word the packed loads read, and __stcs that of every packed
// store, so each is checked against the row span the call may touch and the 16-byte grid.
#pragma once
#include <cstdio>
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
