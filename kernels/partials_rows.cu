// fastxent -- a row split along the class axis (fastxent.dask with the class axis in several
// chunks): the partial statistics of a block of classes, and the block's gradient from the
// row's merged normaliser. The merge of the partials runs on the host (fastxent/_partials.py);
// the formulas are fx_formulas.cuh's; fastxent/reference.py (softmax_partials,
// softmax_block_grad) is the oracle.
//
// Shapes (fastxent/backends/__init__.py): x (N, C) C-contiguous, the block of classes
// [offset, offset + C) of each row, of type T (float / double / fx::f16 / fx::bf16); labels
// (N,) int64 (the host widens others: N ids beside N x C scores), class ids of the whole row, checked on the host to lie in the row
// or equal ignore_index (a label outside the block is never read); class_weight the whole
// row's (C_row,) doubles read at offset + c, or NULL; per-row outputs (N,) in acc_t<T>; per-row
// inputs (N,) doubles; grad (N, C) in T. Row r starts at x + r * C (64-bit).
//
// Who owns what: G threads per row (G = 8, 32) or a block per row (G = 0), chosen on the host
// by C as for the whole-row kernels (fastxent/backends/cuda/_plans.py, row_plan); rows are
// visited grid-stride. Each pass reads the block once: the partials with an online max/sum
// (Milakov & Gimelshein 2018, arXiv:1805.02867), the gradient with evict-first loads and
// streaming stores, as the last read of a row.
#include "fx_formulas.cuh"

namespace fx {

// The position of a row's label in the block [offset, offset + C), or -1 when the row is
// ignored or its class lies in another block.
__device__ __forceinline__ i64 block_label(i64 y, i64 offset, i64 C, i64 ignore_index, int has_ignore) {
    if (has_ignore && y == ignore_index) return -1;
    const i64 local = y - offset;
    return (local >= 0 && local < C) ? local : -1;
}

// The statistics S of one row of the block over the group g (every thread returns them):
// add(st, c, x_c) for each of this thread's classes, read once with evict-first loads.
template <class S, class A, int G, class T, class F>
__device__ __forceinline__ S block_row_stats(const Group<G>& g, const T* xr, i64 C, int vec_ok, F&& add) {
    S st;
    st.init();
    row_apply<A, true, false>(0, C, xr, (const None*)nullptr, (None*)nullptr, (None*)nullptr, g.lane, g.width,
                              vec_ok, [&](i64 c, A xv, A, A&, A&) { add(st, c, xv); });
    return g.reduce(st);
}

// ============================================================================
// Partial statistics of the losses: peak m, total sum exp(z - m), the target score when the
// label is in the block; with class_weight (label smoothing) gap = sum_c xy(w, anchor - z_c)
// about anchor = the block's max (finite, else 0), summed as GapSum's halved gaps. z = softcap(x).
// ============================================================================

template <class T, int G>
__global__ void __launch_bounds__(row_launch_bound<G>()) sparse_partials_rows(
        const T* x, const i64* labels, i64 N, i64 C, i64 offset, i64 ignore_index, int has_ignore,
        const double* class_weight, double cap, acc_t<T>* peak, acc_t<T>* total, acc_t<T>* target,
        acc_t<T>* anchor, acc_t<T>* gap, int vec_ok) {
    using A = acc_t<T>;
    const Group<G> g;
    const A cp = (A)cap;
    const bool smoothing = class_weight != nullptr;
    for (i64 row = g.first_row; row < N; row += g.row_stride) {
        const T* xr = x + row * C;
        const SparseStats<A> st = block_row_stats<SparseStats<A>, A>(g, xr, C, vec_ok,
                                                                    [&](SparseStats<A>& s, i64 c, A xv) {
            s.add(softcap(xv, cp), smoothing ? (A)class_weight[offset + c] : A(0), smoothing);
        });
        if (!g.leader()) continue;
        const i64 local = block_label(labels[row], offset, C, ignore_index, has_ignore);
        const A m = st.sm.m;
        peak[row] = m;
        total[row] = st.sm.s;
        target[row] = local >= 0 ? softcap(to_acc<A>(xr[local]), cp) : A(0);
        // GapSum keeps h = sum_c xy(w_c, (m - z_c) / 2) about the block's max m: gap = 2 h with
        // anchor = m (reference.softmax_partials' anchor). A block with no finite max (all
        // masked: m = -inf) gets anchor 0 and the same gap, inf or 0 (xy(w, 0 - (-inf))).
        anchor[row] = (m - m == A(0)) ? m : A(0);
        gap[row] = st.gaps.h + st.gaps.h;
    }
}

// ============================================================================
// Partial statistics of score: peak, total, spread u = sum_c exp(x_c - m) (x_c - m) (the
// entropy term), best = the first class id (in the whole row) of the block's max, best_value
// the score there (NaN once a NaN is seen, as np.argmax), and the target score.
// ============================================================================

template <class T, int G>
__global__ void __launch_bounds__(row_launch_bound<G>()) score_partials_rows(
        const T* x, const i64* labels, i64 N, i64 C, i64 offset, i64 ignore_index, int has_ignore,
        acc_t<T>* peak, acc_t<T>* total, acc_t<T>* target, acc_t<T>* spread, i64* best, acc_t<T>* best_value,
        int vec_ok) {
    using A = acc_t<T>;
    const Group<G> g;
    for (i64 row = g.first_row; row < N; row += g.row_stride) {
        const T* xr = x + row * C;
        const ScoreStats<A> st = block_row_stats<ScoreStats<A>, A>(g, xr, C, vec_ok,
                                                                  [](ScoreStats<A>& s, i64 c, A xv) { s.add(c, xv); });
        if (!g.leader()) continue;
        const i64 local = block_label(labels[row], offset, C, ignore_index, has_ignore);
        peak[row] = st.sm.m;
        total[row] = st.sm.s;
        target[row] = local >= 0 ? to_acc<A>(xr[local]) : A(0);
        spread[row] = st.u;
        best[row] = st.arg + offset;
        best_value[row] = st.best;
    }
}

// ============================================================================
// The gradient of a block: grad_c = (P p_c - V w_{offset+c} - [c == y] Y) dz_c/dx_c with
// p_c = exp((z_c - shift) - log_sum), the row's merged normaliser, and the per-row P, Y, V =
// p_coef, target_coef, weight_coef (the V term only with class_weight); zeros for an
// ignored row.
// ============================================================================

template <class T, int G>
__global__ void __launch_bounds__(row_launch_bound<G>()) softmax_block_grad_rows(
        const T* x, const i64* labels, i64 N, i64 C, i64 offset, i64 ignore_index, int has_ignore,
        const double* class_weight, double cap, const double* shift, const double* log_sum, const double* p_coef,
        const double* target_coef, const double* weight_coef, T* grad, int vec_ok) {
    using A = acc_t<T>;
    const Group<G> g;
    const A cp = (A)cap;
    for (i64 row = g.first_row; row < N; row += g.row_stride) {
        const T* xr = x + row * C;
        T* gr = grad + row * C;
        const i64 y = labels[row];
        if (has_ignore && y == ignore_index) {
            fill_range(gr, 0, C, A(0), g.lane, g.width);
            continue;
        }
        const i64 local = block_label(y, offset, C, ignore_index, has_ignore);
        const LogNorm<A> n{(A)shift[row], (A)log_sum[row]};
        const A pc = (A)p_coef[row];
        const A yc = (A)target_coef[row];
        const A wc = class_weight != nullptr ? (A)weight_coef[row] : A(0);
        row_apply<A, true, true>(0, C, xr, (const None*)nullptr, gr, (None*)nullptr, g.lane, g.width, vec_ok,
                                 [&](i64 c, A xv, A, A& out, A&) {
            const A a = (class_weight != nullptr ? wc * (A)class_weight[offset + c] : A(0)) + (c == local ? yc : A(0));
            out = softmax_grad(xv, cp, n, pc, a);
        });
    }
}

}  // namespace fx
