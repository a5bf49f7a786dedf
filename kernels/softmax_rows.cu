// fastxent -- softmax-family row kernels: sparse and soft-label softmax cross-entropy
// (forward, and forward+backward fused), the split-row path for few huge rows,
// logsumexp / log_softmax / softmax, the Hessian-vector product and the scoring bundle.
// The formulas are in fx_formulas.cuh; fastxent/reference.py is the oracle.
//
// Shapes (fastxent/backends/__init__.py): scores x (N, C) C-contiguous, any of
// float / double / fx::f16 / fx::bf16 (T); sparse labels (N,) int32 or int64 (L); soft
// labels and v (N, C) of the scores' type or of the accumulation type (Y); per-row
// outputs (N,) in acc_t<T> (the loss dtype); gradients and row outputs (N, C) in T. Row
// r starts at x + r * C (64-bit). The gradient may alias x (the backend's opt-in inplace
// mode): every kernel that writes a gradient reads x[r, y] and x[r, 0] before the group
// barrier that precedes its first gradient store, and each gradient element is written
// by the thread that read that element.
//
// Who owns what (template parameter G, chosen on the host by C):
//   G = 8 or 32   G threads per row, blockDim.x / G rows per block (C <= 64: 8 lanes, so
//                 1,000,000 x 10 runs 31,250 blocks of 32 rows instead of a million
//                 blocks that are 96% idle; C <= 1024: a warp, 32 lanes x 4 floats = one
//                 512-byte coalesced request per step). Reductions: warp shuffles.
//   G = 0         one block per row (large C), up to 1024 threads, each reading
//                 128-bit packs of the row; reduction: shuffles, then 32 partials in
//                 shared memory.
//   split path    few rows x huge C (4 x 262144: 4 blocks would keep 4 of 132 SMs busy):
//                 grid (splits, N), each block reduces one chunk of a row to partial
//                 statistics (sparse_xent_partial), one warp per row merges them and
//                 writes loss and lse (sparse_xent_merge), then grid (splits, N) blocks
//                 write the gradient of their chunk (sparse_xent_split_grad).
// Rows are visited grid-stride, so any N fits any grid.
//
// Passes. The forward reads each score once: an online max/sum (Milakov & Gimelshein
// 2018, arXiv:1805.02867) with float32 accumulation (double for double). The fused
// forward+backward reads the row twice (statistics, then gradient) and writes the
// gradient once: on an H200 (132 SMs, 50 MB L2) one 1024-thread block per SM keeps
// 132 x 256.5 KB = 33.9 MB of bfloat16 rows of 128256 classes in flight, which fits the
// L2, so the second read is an L2 hit and DRAM traffic is one read plus one write (the
// host caps residency to keep this true, see row_plan in fastxent/backends/cuda/_plans.py). The first read
// uses caching loads; the last read of a row (the gradient or output pass, the single pass
// of score) uses evict-first (.cs) loads, walks the row backwards (row_apply REVERSE) and
// streams its stores. One load flavour per pass keeps one copy of each pass's unrolled
// code per instantiation (compile time: ~2 s per instantiation under NVRTC).
//
// Labels are checked here, not on the host: a label outside [0, C) that is not
// ignore_index sets *bad_label (the host raises the CPU path's ValueError), gets loss NaN
// and a zero gradient, and its score is never read.
#include "fx_formulas.cuh"

namespace fx {

// ============================================================================
// Sparse softmax cross-entropy: shared pieces
// ============================================================================

// Fills the row constants; returns the label status.
template <class A, class L>
__device__ __forceinline__ int sparse_row_setup(SparseRow<A>& r, L label, i64 C,
                                                const double* class_weight, double weight_sum,
                                                double eps, double z_loss, double cap,
                                                i64 ignore_index, int has_ignore) {
    r.y = (i64)label;
    const int status = label_status(r.y, C, ignore_index, has_ignore);
    r.eps = (A)eps;
    r.eps_c = (A)(eps / (double)C);
    r.W = (A)weight_sum;
    r.z_loss = (A)z_loss;
    r.cap = (A)cap;
    r.wy = A(1);
    if (status == LABEL_KEPT && class_weight != nullptr) r.wy = (A)class_weight[r.y];
    return status;
}

// This thread's share of the row statistics over classes [c0, c1) (caching loads: the
// gradient pass, if any, reads the same classes again).
template <class A, class T>
__device__ __forceinline__ void sparse_accumulate(SparseStats<A>& st, const SparseRow<A>& r, const T* xr,
                                                  i64 c0, i64 c1, const double* class_weight,
                                                  i64 lane, i64 width, bool vec_ok) {
    const bool smoothing = r.eps > A(0);
    const bool weighted = smoothing && class_weight != nullptr;
    row_apply<A, false, false>(c0, c1, xr, (const None*)nullptr, (None*)nullptr, (None*)nullptr,
                                lane, width, vec_ok, [&](i64 c, A xv, A, A&, A&) {
        st.add(softcap(xv, r.cap), r.eps_c * (weighted ? (A)class_weight[c] : A(1)), smoothing);
    });
}

// This thread's share of the gradient over classes [c0, c1) of a kept row.
template <class A, class T>
__device__ __forceinline__ void sparse_gradient(const SparseRow<A>& r, const T* xr, T* gr, i64 c0, i64 c1,
                                                const double* class_weight, LogNorm<A> n, A scale,
                                                i64 lane, i64 width, bool vec_ok) {
    const A p_coef = sparse_xent_p_coef(r, n.lse());
    const bool weighted = r.eps > A(0) && class_weight != nullptr;
    row_apply<A, true, true>(c0, c1, xr, (const None*)nullptr, gr, (None*)nullptr,
                             lane, width, vec_ok, [&](i64 c, A xv, A, A& out, A&) {
        out = sparse_xent_grad(r, c, xv, weighted ? (A)class_weight[c] : A(1), n, p_coef, scale);
    });
}

// ============================================================================
// Sparse softmax cross-entropy: one row per group (G = 8, 32) or per block (G = 0)
// ============================================================================
// loss (N,) always; grad (N, C) when grad != nullptr (may equal x: inplace).

template <class T, class L, int G>
__global__ void __launch_bounds__(row_launch_bound<G>()) sparse_xent_rows(
        const T* x, const L* labels, i64 N, i64 C, const double* class_weight, double weight_sum,
        double eps, double z_loss, double cap, i64 ignore_index, int has_ignore,
        const double* scale, double scale_value, acc_t<T>* loss, T* grad, int vec_ok, int* bad_label) {
    using A = acc_t<T>;
    const Group<G> g;
    for (i64 row = g.first_row; row < N; row += g.row_stride) {
        const T* xr = x + row * C;
        T* gr = grad != nullptr ? grad + row * C : nullptr;
        SparseRow<A> r;
        const int status = sparse_row_setup(r, labels[row], C, class_weight, weight_sum, eps, z_loss,
                                            cap, ignore_index, has_ignore);
        if (status != LABEL_KEPT) {
            if (g.leader()) {
                if (status == LABEL_BAD) raise_flag(bad_label);
                loss[row] = status == LABEL_IGNORED ? A(0) : nan<A>();
            }
            if (gr != nullptr) fill_range(gr, 0, C, A(0) * scale_at<A>(scale, scale_value, row), g.lane, g.width);
            continue;
        }
        SparseStats<A> st;
        st.init();
        sparse_accumulate(st, r, xr, 0, C, class_weight, g.lane, g.width, vec_ok);
        st = g.reduce(st);
        const LogNorm<A> n = st.sm.norm_rows();
        const A zy = softcap(to_acc<A>(xr[r.y]), r.cap);
        if (g.leader()) loss[row] = sparse_xent_loss(r, n, zy, st.gaps);
        if (gr != nullptr) {
            g.sync();  // inplace: x[row, y] is read by every thread before any gradient store
            sparse_gradient(r, xr, gr, 0, C, class_weight, n, scale_at<A>(scale, scale_value, row),
                            g.lane, g.width, vec_ok);
        }
    }
}

// ============================================================================
// Sparse softmax cross-entropy: split-row path (grid (splits, N), chunk classes a block)
// ============================================================================

// Partial statistics of chunk blockIdx.x of row blockIdx.y -> partial[row * splits + split].
// Rows that are not kept are skipped (the merge kernel handles them).
template <class T, class L>
__global__ void __launch_bounds__(ROW_BLOCK_MAX_THREADS) sparse_xent_partial(
        const T* x, const L* labels, i64 C, i64 chunk, const double* class_weight, double eps, double cap,
        i64 ignore_index, int has_ignore, SparseStats<acc_t<T>>* partial, int vec_ok) {
    using A = acc_t<T>;
    const i64 row = blockIdx.y, split = blockIdx.x, splits = gridDim.x;
    const T* xr = x + row * C;
    SparseRow<A> r;
    if (sparse_row_setup(r, labels[row], C, class_weight, 0.0, eps, 0.0, cap, ignore_index,
                         has_ignore) != LABEL_KEPT)
        return;
    const i64 c0 = split * chunk;
    const i64 c1 = c0 + chunk < C ? c0 + chunk : C;
    SparseStats<A> st;
    st.init();
    sparse_accumulate(st, r, xr, c0, c1, class_weight, threadIdx.x, blockDim.x, vec_ok);
    st = block_reduce(st);
    if (threadIdx.x == 0) partial[row * splits + split] = st;
}

// One warp per row (blockDim.x / 32 rows a block): merges the row's partials, writes
// loss[row] and row_norm[row] (read by sparse_xent_split_grad), raises the label flag.
template <class T, class L>
__global__ void __launch_bounds__(GROUP_BLOCK_THREADS) sparse_xent_merge(
        const T* x, const L* labels, i64 N, i64 C, i64 splits, const double* class_weight, double weight_sum,
        double eps, double z_loss, double cap, i64 ignore_index, int has_ignore,
        const SparseStats<acc_t<T>>* partial, LogNorm<acc_t<T>>* row_norm, acc_t<T>* loss, int* bad_label) {
    using A = acc_t<T>;
    const Group<32> g;
    for (i64 row = g.first_row; row < N; row += g.row_stride) {
        const T* xr = x + row * C;
        SparseRow<A> r;
        const int status = sparse_row_setup(r, labels[row], C, class_weight, weight_sum, eps, z_loss,
                                            cap, ignore_index, has_ignore);
        if (status != LABEL_KEPT) {
            if (g.leader()) {
                if (status == LABEL_BAD) raise_flag(bad_label);
                loss[row] = status == LABEL_IGNORED ? A(0) : nan<A>();
                row_norm[row] = LogNorm<A>{nan<A>(), nan<A>()};
            }
            continue;
        }
        SparseStats<A> st;
        st.init();
        for (i64 j = g.lane; j < splits; j += g.width) st = SparseStats<A>::merge(st, partial[row * splits + j]);
        st = g.reduce(st);
        const LogNorm<A> n = st.sm.norm_rows();
        const A zy = softcap(to_acc<A>(xr[r.y]), r.cap);
        if (g.leader()) {
            loss[row] = sparse_xent_loss(r, n, zy, st.gaps);
            row_norm[row] = n;
        }
    }
}

// Gradient of chunk blockIdx.x of row blockIdx.y, from the merged normaliser.
template <class T, class L>
__global__ void __launch_bounds__(ROW_BLOCK_MAX_THREADS) sparse_xent_split_grad(
        const T* x, const L* labels, i64 C, i64 chunk, const double* class_weight, double weight_sum,
        double eps, double z_loss, double cap, i64 ignore_index, int has_ignore,
        const LogNorm<acc_t<T>>* row_norm, const double* scale, double scale_value, T* grad, int vec_ok) {
    using A = acc_t<T>;
    const i64 row = blockIdx.y, split = blockIdx.x;
    const T* xr = x + row * C;
    T* gr = grad + row * C;
    const i64 c0 = split * chunk;
    const i64 c1 = c0 + chunk < C ? c0 + chunk : C;
    const A scale_row = scale_at<A>(scale, scale_value, row);
    SparseRow<A> r;
    if (sparse_row_setup(r, labels[row], C, class_weight, weight_sum, eps, z_loss, cap, ignore_index,
                         has_ignore) != LABEL_KEPT) {
        fill_range(gr, c0, c1, A(0) * scale_row, (i64)threadIdx.x, (i64)blockDim.x);
        return;
    }
    sparse_gradient(r, xr, gr, c0, c1, class_weight, row_norm[row], scale_row, (i64)threadIdx.x,
                    (i64)blockDim.x, vec_ok);
}

// ============================================================================
// Soft-label softmax cross-entropy (labels (N, C) of type Y)
// ============================================================================

template <class T, class Y, int G>
__global__ void __launch_bounds__(row_launch_bound<G>()) soft_xent_rows(
        const T* x, const Y* labels, i64 N, i64 C, double eps, double cap,
        const double* scale, double scale_value, acc_t<T>* loss, T* grad, int vec_ok) {
    using A = acc_t<T>;
    const Group<G> g;
    const A e = (A)eps, e_c = (A)(eps / (double)C), cp = (A)cap;
    for (i64 row = g.first_row; row < N; row += g.row_stride) {
        const T* xr = x + row * C;
        const Y* yr = labels + row * C;
        T* gr = grad != nullptr ? grad + row * C : nullptr;
        SoftStats<A> st;
        st.init();
        row_apply<A, false, false>(0, C, xr, yr, (None*)nullptr, (None*)nullptr, g.lane, g.width, vec_ok,
                                   [&](i64, A xv, A yv, A&, A&) {
            st.add(softcap(xv, cp), smooth_label(yv, e, e_c));
        });
        st = g.reduce(st);
        const LogNorm<A> n = st.sm.norm_rows();
        if (g.leader()) loss[row] = soft_xent_loss(n, st.gaps);
        if (gr != nullptr) {
            // inplace needs no sync: after g.reduce each thread reads only the classes it writes
            const A sc = scale_at<A>(scale, scale_value, row);
            const A t = st.gaps.t;
            row_apply<A, true, true>(0, C, xr, yr, gr, (None*)nullptr, g.lane, g.width, vec_ok,
                                     [&](i64, A xv, A yv, A& out, A&) {
                out = soft_xent_grad(xv, smooth_label(yv, e, e_c), cp, n, t, sc);
            });
        }
    }
}

// ============================================================================
// logsumexp (mode 0) / log_softmax (mode 1) / softmax (mode 2). Non-finite rows as the
// reference: logsumexp follows torch (-inf all -inf, +inf with +inf); log_softmax and
// softmax are NaN in a row holding NaN or +inf or entirely -inf (the row rule)
// ============================================================================
// mode 0 writes lse_out (N,) in acc_t<T>; modes 1 and 2 write out (N, C) in T.

enum SoftmaxMode { MODE_LOGSUMEXP = 0, MODE_LOG_SOFTMAX = 1, MODE_SOFTMAX = 2 };

template <class T, int G>
__global__ void __launch_bounds__(row_launch_bound<G>()) softmax_rows(
        const T* x, i64 N, i64 C, int mode, acc_t<T>* lse_out, T* out, int vec_ok) {
    using A = acc_t<T>;
    const Group<G> g;
    for (i64 row = g.first_row; row < N; row += g.row_stride) {
        const T* xr = x + row * C;
        Online<A> st;
        st.init();
        row_apply<A, false, false>(0, C, xr, (const None*)nullptr, (None*)nullptr, (None*)nullptr, g.lane, g.width,
                                   vec_ok, [&](i64, A xv, A, A&, A&) {
            A e;
            st.push(xv, e);
        });
        st = g.reduce(st);
        if (mode == MODE_LOGSUMEXP) {
            if (g.leader()) lse_out[row] = st.lse_torch();
            continue;
        }
        const LogNorm<A> n = st.norm_rows();
        T* orow = out + row * C;
        const bool log_space = mode == MODE_LOG_SOFTMAX;
        row_apply<A, true, true>(0, C, xr, (const None*)nullptr, orow, (None*)nullptr, g.lane, g.width, vec_ok,
                                 [&](i64, A xv, A, A& o, A&) {
            o = log_space ? n.log_prob(xv) : fast_exp(n.log_prob(xv));
        });
    }
}

// ============================================================================
// Hessian-vector product of the softmax cross-entropy: out = p v - p (p . v)
// ============================================================================

template <class T, class Y, int G>
__global__ void __launch_bounds__(row_launch_bound<G>()) hvp_rows(const T* x, const Y* v, i64 N, i64 C, T* out, int vec_ok) {
    using A = acc_t<T>;
    const Group<G> g;
    for (i64 row = g.first_row; row < N; row += g.row_stride) {
        const T* xr = x + row * C;
        const Y* vr = v + row * C;
        HvpStats<A> st;
        st.init();
        row_apply<A, false, false>(0, C, xr, vr, (None*)nullptr, (None*)nullptr, g.lane, g.width, vec_ok,
                                   [&](i64, A xv, A vv, A&, A&) { st.add(xv, vv); });
        st = g.reduce(st);
        const LogNorm<A> n = st.sm.norm_rows();
        const A pdotv = st.pv / st.sm.s;
        row_apply<A, true, true>(0, C, xr, vr, out + row * C, (None*)nullptr, g.lane, g.width, vec_ok,
                                 [&](i64, A xv, A vv, A& o, A&) { o = hvp_value(xv, vv, n, pdotv); });
    }
}

// ============================================================================
// Scoring bundle: loss, lse, target_logprob, entropy, argmax, correct (one read)
// ============================================================================
// An ignored row: loss 0, target_logprob NaN, correct false, the rest as usual. A bad
// label: the flag, and NaN / false in the label-dependent fields.

template <class T, class L, int G>
__global__ void __launch_bounds__(row_launch_bound<G>()) score_rows(
        const T* x, const L* labels, i64 N, i64 C, i64 ignore_index, int has_ignore,
        acc_t<T>* loss, acc_t<T>* lse, acc_t<T>* target_logprob, acc_t<T>* entropy,
        i64* argmax, bool* correct, int vec_ok, int* bad_label) {
    using A = acc_t<T>;
    const Group<G> g;
    for (i64 row = g.first_row; row < N; row += g.row_stride) {
        const T* xr = x + row * C;
        const i64 y = (i64)labels[row];
        const int status = label_status(y, C, ignore_index, has_ignore);
        ScoreStats<A> st;
        st.init();
        row_apply<A, true, false>(0, C, xr, (const None*)nullptr, (None*)nullptr, (None*)nullptr, g.lane, g.width,
                                  vec_ok, [&](i64 c, A xv, A, A&, A&) { st.add(c, xv); });
        st = g.reduce(st);
        if (!g.leader()) continue;
        const LogNorm<A> n = st.sm.norm_rows();
        lse[row] = n.lse();
        entropy[row] = st.entropy();
        argmax[row] = st.arg;
        if (status == LABEL_KEPT) {
            const A nll = -n.log_prob(to_acc<A>(xr[y]));  // reference: 1 * lse - sum_c xy(onehot_c, x_c)
            loss[row] = nll;
            target_logprob[row] = -nll;
            correct[row] = st.arg == y;
        } else {
            if (status == LABEL_BAD) raise_flag(bad_label);
            loss[row] = status == LABEL_IGNORED ? A(0) : nan<A>();
            target_logprob[row] = nan<A>();
            correct[row] = false;
        }
    }
}

}  // namespace fx
