// fastxent -- probability-input row kernels (Keras 3, from_logits=False): categorical
// cross-entropy (soft labels) and sparse categorical cross-entropy (class ids).
// The formulas are in fx_formulas.cuh (reference._categorical); fastxent/reference.py is
// the oracle.
//
// Shapes: probs p (N, C) C-contiguous in T (float / double / fx::f16 / fx::bf16); labels
// (N, C) in Y (the probs' type or the accumulation type) or (N,) int32/int64 (L); loss (N,)
// in acc_t<T>; grad (N, C) in T when grad != nullptr. lo = epsilon and hi = 1 - epsilon are
// already rounded to the probs' dtype by the host (Keras computes them in that dtype).
//
// Who owns what: as softmax_rows.cu -- G = 8 or 32 threads per row for small C (several
// rows a block, warp-shuffle reductions), G = 0 one block per row for large C. Probability
// rows are normalised first (q = p / sum p), so a row needs its sum before its loss: pass 1
// sums p, pass 2 computes the loss and sum_c g_c p_c, pass 3 writes the gradient. Passes 2
// and 3 re-read a row the block has just read; these inputs are rarer than scores, so no
// split path and no inplace mode here. The sparse variant needs no third read: its
// gradient is one value on every class but the label's.
//
// Sparse labels are checked on the device, as in softmax_rows.cu: an out-of-range label
// that is not ignore_index sets *bad_label, gets loss NaN and a zero gradient.
#include "fx_formulas.cuh"

namespace fx {

// ============================================================================
// Categorical cross-entropy: labels y (N, C)
// ============================================================================

template <class T, class Y, int G>
__global__ void __launch_bounds__(row_launch_bound<G>()) categorical_rows(
        const T* p, const Y* labels, i64 N, i64 C, double lo, double hi, double eps,
        const double* scale, double scale_value, acc_t<T>* loss, T* grad, int vec_ok) {
    using A = acc_t<T>;
    const Group<G> g;
    const A lo_a = (A)lo, hi_a = (A)hi, e = (A)eps, e_c = (A)(eps / (double)C);
    for (i64 row = g.first_row; row < N; row += g.row_stride) {
        const T* pr = p + row * C;
        const Y* yr = labels + row * C;
        SumStats<A> total;
        total.init();
        row_apply<A, false, false>(0, C, pr, (const None*)nullptr, (None*)nullptr, (None*)nullptr, g.lane, g.width,
                                   vec_ok, [&](i64, A pv, A, A&, A&) { total.s += pv; });
        const A s = g.reduce(total).s;
        CategoricalStats<A> st;
        st.init();
        auto accumulate = [&](i64, A pv, A yv, A&, A&) {
            A term;
            const A gq = categorical_dq(pv, smooth_label(yv, e, e_c), s, lo_a, hi_a, term);
            st.nll += term;
            st.gq += gq * (pv / s);
        };
        row_apply<A, false, false>(0, C, pr, yr, (None*)nullptr, (None*)nullptr, g.lane, g.width, vec_ok, accumulate);
        st = g.reduce(st);
        if (g.leader()) loss[row] = -st.nll;
        if (grad == nullptr) continue;
        const A sc = scale_at<A>(scale, scale_value, row);
        const A gq_sum = st.gq;
        row_apply<A, true, true>(0, C, pr, yr, grad + row * C, (None*)nullptr, g.lane, g.width, vec_ok,
                                 [&](i64, A pv, A yv, A& out, A&) {
            A term;
            const A gq = categorical_dq(pv, smooth_label(yv, e, e_c), s, lo_a, hi_a, term);
            out = categorical_grad(gq, s, gq_sum, sc);
        });
    }
}

// ============================================================================
// Sparse categorical cross-entropy: labels (N,) class ids
// ============================================================================
// The one-hot row of reference._categorical: only class y has a nonzero label, so
// loss = -log q_y and g is zero except g_y; grad_c = ([c == y] g_y - gq) / s with
// gq = g_y q_y, NaN when some p_c is not finite (ProbSumStats).

template <class T, class L, int G>
__global__ void __launch_bounds__(row_launch_bound<G>()) sparse_categorical_rows(
        const T* p, const L* labels, i64 N, i64 C, double lo, double hi, i64 ignore_index, int has_ignore,
        const double* scale, double scale_value, acc_t<T>* loss, T* grad, int vec_ok, int* bad_label) {
    using A = acc_t<T>;
    const Group<G> g;
    const A lo_a = (A)lo, hi_a = (A)hi;
    for (i64 row = g.first_row; row < N; row += g.row_stride) {
        const T* pr = p + row * C;
        const i64 y = (i64)labels[row];
        const int status = label_status(y, C, ignore_index, has_ignore);
        if (status != LABEL_KEPT) {
            if (g.leader()) {
                if (status == LABEL_BAD) raise_flag(bad_label);
                loss[row] = status == LABEL_IGNORED ? A(0) : nan<A>();
            }
            if (grad != nullptr)
                fill_range(grad + row * C, 0, C, A(0) * scale_at<A>(scale, scale_value, row), g.lane, g.width);
            continue;
        }
        ProbSumStats<A> total;
        total.init();
        row_apply<A, false, false>(0, C, pr, (const None*)nullptr, (None*)nullptr, (None*)nullptr, g.lane, g.width,
                                   vec_ok, [&](i64, A pv, A, A&, A&) { total.add(pv); });
        total = g.reduce(total);
        const A s = total.s;
        A gy, gq;
        const A row_loss = sparse_categorical_loss(to_acc<A>(pr[y]), total, lo_a, hi_a, gy, gq);
        if (g.leader()) loss[row] = row_loss;
        if (grad == nullptr) continue;
        // Every class but y has the same gradient: fill the row without re-reading it,
        // then the leader overwrites class y after the group barrier.
        const A sc = scale_at<A>(scale, scale_value, row);
        T* gr = grad + row * C;
        fill_range(gr, 0, C, categorical_grad(A(0), s, gq, sc), g.lane, g.width);
        g.sync();
        if (g.leader()) gr[y] = narrow<T>(categorical_grad(gy, s, gq, sc));
    }
}

}  // namespace fx
