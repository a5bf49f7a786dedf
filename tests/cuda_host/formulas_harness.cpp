// The formulas of fx_formulas.cuh on the host, exported to ctypes: each row is split among
// lanes exactly as the kernels do (c = lane, lane + width, ...; a butterfly merge; chunks
// for the split path) and the same device functions run (tests/test_cuda_host_formulas.py).
#include "shim.h"
#include "words.h"
#include "fx_formulas.cuh"
#include <vector>
using namespace fx;

// Reduce per-lane states like the kernels: lanes own c = lane, lane+width, ...; then a
// butterfly over lanes (pairs at distance width/2, ...), as warp_reduce does.
template <class S> S tree(std::vector<S> v) {
    size_t n = v.size();
    for (size_t off = n / 2; off > 0; off >>= 1)
        for (size_t i = 0; i < off; ++i) v[i] = S::merge(v[i], v[i + off]);
    return v[0];
}

template <class A>
void sparse_row(const double* xd, long C, long y, double eps, double zl, double cap, const double* w, int width,
                double* loss, double* grad, int splits) {
    std::vector<A> x(C); for (long c = 0; c < C; ++c) x[c] = (A)xd[c];
    SparseRow<A> r; r.y = y; r.eps = (A)eps; r.eps_c = (A)(eps / C); r.z_loss = (A)zl; r.cap = (A)cap;
    double Wd = 0; for (long c = 0; c < C; ++c) Wd += w ? w[c] : 1.0; r.W = (A)Wd;
    r.wy = w ? (A)w[y] : A(1);
    long chunk = (C + splits - 1) / splits;
    std::vector<SparseStats<A>> parts;
    for (int s = 0; s < splits; ++s) {
        long c0 = s * chunk, c1 = std::min(C, c0 + chunk);
        std::vector<SparseStats<A>> lanes(width);
        for (auto& l : lanes) l.init();
        for (int lane = 0; lane < width; ++lane)
            for (long c = c0 + lane; c < c1; c += width)
                lanes[lane].add(softcap(x[c], r.cap), r.eps_c * ((eps > 0 && w) ? (A)w[c] : A(1)), r.eps > 0);
        parts.push_back(tree(lanes));
    }
    SparseStats<A> st; st.init();
    for (auto& p : parts) st = SparseStats<A>::merge(st, p);
    LogNorm<A> n = st.sm.norm_rows();
    A zy = softcap(x[y], r.cap);
    *loss = sparse_xent_loss(r, n, zy, st.gaps);
    A pc = sparse_xent_p_coef(r, n.lse());
    for (long c = 0; c < C; ++c)
        grad[c] = sparse_xent_grad(r, c, x[c], (eps > 0 && w) ? (A)w[c] : A(1), n, pc, A(1));
}

template <class A>
void soft_row(const double* xd, const double* yd, long C, double eps, double cap, int width, double* loss, double* grad) {
    std::vector<A> x(C), yv(C); for (long c = 0; c < C; ++c) { x[c] = (A)xd[c]; yv[c] = (A)yd[c]; }
    A e = (A)eps, ec = (A)(eps / C), cp = (A)cap;
    std::vector<SoftStats<A>> lanes(width); for (auto& l : lanes) l.init();
    for (int lane = 0; lane < width; ++lane)
        for (long c = lane; c < C; c += width) lanes[lane].add(softcap(x[c], cp), smooth_label(yv[c], e, ec));
    SoftStats<A> st = tree(lanes);
    LogNorm<A> n = st.sm.norm_rows();
    *loss = soft_xent_loss(n, st.gaps);
    for (long c = 0; c < C; ++c) grad[c] = soft_xent_grad(x[c], smooth_label(yv[c], e, ec), cp, n, st.gaps.t, A(1));
}

template <class A>
void lse_rows(const double* xd, long C, int width, double* lse_t, double* lse_r, double* logsm) {
    std::vector<Online<A>> lanes(width); for (auto& l : lanes) l.init();
    for (int lane = 0; lane < width; ++lane) for (long c = lane; c < C; c += width) { A e; lanes[lane].push((A)xd[c], e); }
    Online<A> st = tree(lanes);
    *lse_t = st.lse_torch(); *lse_r = st.norm_rows().lse();
    LogNorm<A> n = st.norm_rows();
    for (long c = 0; c < C; ++c) logsm[c] = n.log_prob((A)xd[c]);
}

template <class A>
void score_row(const double* xd, long C, long y, int width, double* out /*loss,lse,tlp,ent,argmax*/) {
    std::vector<ScoreStats<A>> lanes(width); for (auto& l : lanes) l.init();
    for (int lane = 0; lane < width; ++lane) for (long c = lane; c < C; c += width) lanes[lane].add(c, (A)xd[c]);
    ScoreStats<A> st = tree(lanes);
    LogNorm<A> n = st.sm.norm_rows();
    A nll = -n.log_prob((A)xd[y]);
    out[0] = nll; out[1] = n.lse(); out[2] = -nll; out[3] = st.entropy(); out[4] = (double)st.arg;
}

template <class A>
void hvp_row(const double* xd, const double* vd, long C, int width, double* out) {
    std::vector<HvpStats<A>> lanes(width); for (auto& l : lanes) l.init();
    for (int lane = 0; lane < width; ++lane) for (long c = lane; c < C; c += width) lanes[lane].add((A)xd[c], (A)vd[c]);
    HvpStats<A> st = tree(lanes);
    LogNorm<A> n = st.sm.norm_rows(); A pdv = st.pv / st.sm.s;
    for (long c = 0; c < C; ++c) out[c] = hvp_value((A)xd[c], (A)vd[c], n, pdv);
}

template <class A>
void categorical_row(const double* pd, const double* yd, long C, double lo, double hi, double eps, int width, double* loss, double* grad) {
    std::vector<SumStats<A>> lanes(width); for (auto& l : lanes) l.init();
    for (int lane = 0; lane < width; ++lane) for (long c = lane; c < C; c += width) lanes[lane].s += (A)pd[c];
    A s = tree(lanes).s;
    std::vector<CategoricalStats<A>> cl(width); for (auto& l : cl) l.init();
    A e = (A)eps, ec = (A)(eps / C);
    for (int lane = 0; lane < width; ++lane) for (long c = lane; c < C; c += width) {
        A term; A g = categorical_dq((A)pd[c], smooth_label((A)yd[c], e, ec), s, (A)lo, (A)hi, term);
        cl[lane].nll += term; cl[lane].gq += g * ((A)pd[c] / s);
    }
    CategoricalStats<A> st = tree(cl);
    *loss = -st.nll;
    for (long c = 0; c < C; ++c) { A term; A g = categorical_dq((A)pd[c], smooth_label((A)yd[c], e, ec), s, (A)lo, (A)hi, term); grad[c] = categorical_grad(g, s, st.gq, A(1)); }
}

template <class A>
void sparse_categorical_row(const double* pd, long C, long y, double lo, double hi, int width, double* loss, double* grad) {
    std::vector<ProbSumStats<A>> lanes(width); for (auto& l : lanes) l.init();
    for (int lane = 0; lane < width; ++lane) for (long c = lane; c < C; c += width) lanes[lane].add((A)pd[c]);
    ProbSumStats<A> t = tree(lanes);
    A gy, gq;
    *loss = sparse_categorical_loss((A)pd[y], t, (A)lo, (A)hi, gy, gq);
    for (long c = 0; c < C; ++c) grad[c] = categorical_grad(c == y ? gy : A(0), t.s, gq, A(1));
}

template <class A>
void elementwise(const double* xd, const double* zd, const double* qd, long n, double eps, double lo, double hi, double* out /*5n*/) {
    for (long i = 0; i < n; ++i) {
        A g; A l = sigmoid_xent((A)xd[i], (A)zd[i], (A)qd[i], (A)eps, A(1), g);
        out[i] = l; out[n + i] = g; out[2 * n + i] = sigmoid_hessian((A)xd[i], (A)zd[i], (A)qd[i]);
        A gb; A lb = binary_xent((A)xd[i], (A)zd[i], (A)eps, (A)lo, (A)hi, A(1), gb);
        out[3 * n + i] = lb; out[4 * n + i] = gb;
    }
}

extern "C" {
void sparse_row_f(const double* x, long C, long y, double eps, double zl, double cap, const double* w, int width, double* loss, double* grad, int splits) { sparse_row<float>(x, C, y, eps, zl, cap, w, width, loss, grad, splits); }
void sparse_row_d(const double* x, long C, long y, double eps, double zl, double cap, const double* w, int width, double* loss, double* grad, int splits) { sparse_row<double>(x, C, y, eps, zl, cap, w, width, loss, grad, splits); }
void soft_row_f(const double* x, const double* y, long C, double eps, double cap, int width, double* loss, double* grad) { soft_row<float>(x, y, C, eps, cap, width, loss, grad); }
void soft_row_d(const double* x, const double* y, long C, double eps, double cap, int width, double* loss, double* grad) { soft_row<double>(x, y, C, eps, cap, width, loss, grad); }
void lse_rows_f(const double* x, long C, int width, double* a, double* b, double* o) { lse_rows<float>(x, C, width, a, b, o); }
void lse_rows_d(const double* x, long C, int width, double* a, double* b, double* o) { lse_rows<double>(x, C, width, a, b, o); }
void score_row_f(const double* x, long C, long y, int width, double* o) { score_row<float>(x, C, y, width, o); }
void score_row_d(const double* x, long C, long y, int width, double* o) { score_row<double>(x, C, y, width, o); }
void hvp_row_f(const double* x, const double* v, long C, int width, double* o) { hvp_row<float>(x, v, C, width, o); }
void hvp_row_d(const double* x, const double* v, long C, int width, double* o) { hvp_row<double>(x, v, C, width, o); }
void categorical_row_f(const double* p, const double* y, long C, double lo, double hi, double eps, int width, double* l, double* g) { categorical_row<float>(p, y, C, lo, hi, eps, width, l, g); }
void categorical_row_d(const double* p, const double* y, long C, double lo, double hi, double eps, int width, double* l, double* g) { categorical_row<double>(p, y, C, lo, hi, eps, width, l, g); }
void sparse_categorical_row_f(const double* p, long C, long y, double lo, double hi, int width, double* l, double* g) { sparse_categorical_row<float>(p, C, y, lo, hi, width, l, g); }
void sparse_categorical_row_d(const double* p, long C, long y, double lo, double hi, int width, double* l, double* g) { sparse_categorical_row<double>(p, C, y, lo, hi, width, l, g); }
void elementwise_f(const double* x, const double* z, const double* q, long n, double eps, double lo, double hi, double* o) { elementwise<float>(x, z, q, n, eps, lo, hi, o); }
void elementwise_d(const double* x, const double* z, const double* q, long n, double eps, double lo, double hi, double* o) { elementwise<double>(x, z, q, n, eps, lo, hi, o); }
unsigned short bf16_round(float v) { return Narrow<bf16>::from(v).bits; }
// Sizes of the structs the split path keeps in global memory (fastxent/backends/cuda SPARSE_STATS_WORDS).
long sparse_stats_bytes_f() { return sizeof(SparseStats<float>); }
long sparse_stats_bytes_d() { return sizeof(SparseStats<double>); }
long log_norm_bytes_f() { return sizeof(LogNorm<float>); }
long log_norm_bytes_d() { return sizeof(LogNorm<double>); }
}
