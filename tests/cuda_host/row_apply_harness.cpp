// row_apply, fill_range and Group<G> of fx_common.cuh on the host, exported to ctypes:
// every element visited once, with the value stored at it, every packed access aligned
// and inside its row, nothing outside the visited spans touched
// (tests/test_cuda_host_indexing.py).
#include "shim.h"
#include "checked_words.h"
#include "fx_common.cuh"
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
