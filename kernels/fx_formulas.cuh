// fastxent -- every loss formula of docs/design.md, once, as device functions and the running
// statistics the kernels reduce. Read this file beside fastxent/reference.py: each block
// below names the reference helper it mirrors. A is the accumulation type (float, or
// double for double scores); every function here is per element or per row and knows
// nothing about threads.
//
// Non-finite scores (docs/design.md, reference.py's module docstring):
//   * -inf at a class is masking: probability 0, gradient 0, and a term weighted by 0 adds
//     nothing (the xlogy convention, xy() below);
//   * the losses, score and hvp use the row rule: a row holding NaN or +inf, or entirely
//     -inf, has lse = NaN (reference._lse);
//   * logsumexp/log_softmax/softmax follow torch: lse = -inf for an all -inf row, +inf for
//     a row holding +inf and no NaN, NaN with a NaN (reference._logsumexp).
#pragma once

#include "fx_common.cuh"

namespace fx {

// ----------------------------------------------------------------------------
// Small helpers
// ----------------------------------------------------------------------------

// a * b where a != 0, else 0: a zero weight times an infinite score contributes 0
// (reference._xy).
template <class A> __device__ __forceinline__ A xy(A a, A b) { return a != A(0) ? a * b : A(0); }

// a * log(b) with the same convention (reference._xlogy).
template <class A> __device__ __forceinline__ A xlogy(A a, A b) { return a != A(0) ? a * acc_log(b) : A(0); }

// The larger of a and b, NaN if either is NaN.
template <class A> __device__ __forceinline__ A nanmax(A a, A b) { return (a > b || a != a) ? a : b; }

// Keras/torch.clamp clip: clip(q, lo, hi), NaN stays NaN; `inside` is lo <= q <= hi, where
// the clip passes the gradient (reference._clip).
template <class A> __device__ __forceinline__ A clip(A q, A lo, A hi, bool& inside) {
    inside = (q >= lo) && (q <= hi);
    return q < lo ? lo : (q > hi ? hi : q);
}

// ----------------------------------------------------------------------------
// Softcap (Gemma 2): z = c tanh(x / c), dz/dx = 1 - tanh(x / c)^2 (reference._softcap).
// cap <= 0 means no softcap: z = x, dz/dx = 1. tanh(-inf) = -1, so a -inf score becomes
// -c, a finite score (reference.py: "with a softcap a -inf score is a finite score").
// ----------------------------------------------------------------------------

template <class A> __device__ __forceinline__ A softcap(A x, A cap) {
    return cap > A(0) ? cap * acc_tanh(x / cap) : x;
}

template <class A> __device__ __forceinline__ A softcap(A x, A cap, A& slope) {
    if (cap > A(0)) {
        const A t = acc_tanh(x / cap);
        slope = A(1) - t * t;
        return cap * t;
    }
    slope = A(1);
    return x;
}

// Half the gap from the row max m down to a score z, (m - z) / 2, formed as m/2 - z/2: the same
// rounding, and no overflow where m - z overflows but the loss term it enters does not (a weight
// of 0.3 on a class scored -3e38 in a float32 row whose max is 3e38: the term is 1.8e38, the
// difference 6e38). +inf for z = -inf (a masked class), whatever m is, -inf included.
// (fastxent/backends/numba/_rows.py half_gap.)
template <class A> __device__ __forceinline__ A half_gap(A m, A z) {
    return z == -inf<A>() ? inf<A>() : m * A(0.5) - z * A(0.5);
}

// ----------------------------------------------------------------------------
// The row's log-normaliser, kept split as lse = m + log_s: z - lse is evaluated as
// (z - m) - log_s, whose first difference is exact for nearby values (Sterbenz), so rows of
// large scores keep their accuracy (|z| ~ 1e4: ulp(1e4) in float32 is 1e-3, which
// z - (m + log s) would put into every probability and every loss term).
// ----------------------------------------------------------------------------

template <class A> struct LogNorm {
    A m, log_s;
    __device__ A lse() const { return m + log_s; }
    __device__ A log_prob(A z) const { return (z - m) - log_s; }
};

// ----------------------------------------------------------------------------
// Online softmax statistics (Milakov & Gimelshein 2018, "Online normalizer calculation
// for softmax", arXiv:1805.02867): a running max m and s = sum exp(z - m), updated one
// score at a time and merged pairwise, so the forward reads each score once.
//   * m moves up to z when z is larger, or NaN (NaN then sticks in m and s);
//   * z = -inf adds nothing (never exp(-inf - -inf) = NaN);
//   * z = +inf makes s NaN (exp(inf - inf)), which the row rule wants.
// Invariant: m == -inf implies s == 0 and every other running sum is 0.
// ----------------------------------------------------------------------------

template <class A> struct Online {
    A m, s;

    __device__ void init() { m = -inf<A>(); s = A(0); }

    // Adds exp(z - m) to s. Returns r, the factor every other exp(. - m)-weighted running
    // sum must be multiplied by (1 when m did not move), and the new term e = exp(z - m),
    // 0 for z = -inf.
    __device__ __forceinline__ A push(A z, A& e) {
        A r = A(1);
        if (z > m || z != z) {
            r = fast_exp(m - z);
            m = z;
        }
        e = (z == -inf<A>()) ? A(0) : fast_exp(z - m);
        s = s * r + e;
        return r;
    }

    // exp(mi - M), exactly 1 when mi == M (so -inf == -inf and +inf == +inf give 1, not NaN).
    __device__ static A rescale(A mi, A M) { return mi == M ? A(1) : fast_exp(mi - M); }

    __device__ static Online merge(Online a, Online b) {
        Online o;
        o.m = nanmax(a.m, b.m);
        o.s = a.s * rescale(a.m, o.m) + b.s * rescale(b.m, o.m);
        return o;
    }

    // The losses' normaliser (reference._lse, the row rule): log_s is NaN for a NaN or +inf
    // row (s is NaN) and for an all -inf row, so lse and every log-probability are NaN there.
    // log_softmax and softmax use it too (reference: NaN rows as torch's).
    __device__ LogNorm<A> norm_rows() const {
        LogNorm<A> n;
        n.m = m;
        n.log_s = m == -inf<A>() ? nan<A>() : acc_log(s);
        return n;
    }

    // torch's logsumexp (reference._logsumexp, fastxent.logsumexp only): the row max when
    // it is +-inf (-inf for an all -inf row, +inf for +inf without NaN).
    __device__ A lse_torch() const { return (m == inf<A>() || m == -inf<A>()) ? m : m + acc_log(s); }
};

// Weighted gaps of a row's scores below its running max m (the m of Online above):
// t = sum_c a_c and h = sum_c xy(a_c, half_gap(m, z_c)), so that
//   sum_c a_c (lse - z_c) = t log_s + 2 h,
// a sum of non-negative terms for a_c >= 0: no cancellation whatever the scores' magnitude,
// and no overflow where the loss has none. (A fixed reference score instead of m, such as
// z_0 in sum(a) (lse - z_0) - sum_c a_c (z_c - z_0), cancels every digit when z_0 is far
// below the max: z_0 = -1e9, a masked first class, gave a loss of 0 for 0.127 in float32.)
// The reference reads m: every push of the online max, and every merge, moves h to the new m.
template <class A> struct GapSum {
    A t, h;
    __device__ void init() { t = A(0); h = A(0); }
    // The max moved from m0 up to m1: every earlier gap grows by (m1 - m0) / 2.
    __device__ __forceinline__ void rebase(A m0, A m1) {
        if (!(m0 == m1)) h += xy(t, half_gap(m1, m0));
    }
    __device__ __forceinline__ void add(A a, A m, A z) {
        t += a;
        h += xy(a, half_gap(m, z));
    }
    // h of a side whose max is mi, moved to the merged max M.
    __device__ A h_at(A mi, A M) const { return mi == M ? h : h + xy(t, half_gap(M, mi)); }
    __device__ static GapSum merge(GapSum a, A ma, GapSum b, A mb, A M) {
        GapSum o;
        o.t = a.t + b.t;
        o.h = a.h_at(ma, M) + b.h_at(mb, M);
        return o;
    }
    // sum_c a_c (lse - z_c), from log_s = log sum_c exp(z_c - m).
    __device__ A loss(A log_s) const { return t * log_s + (h + h); }
};

// ----------------------------------------------------------------------------
// Sparse softmax cross-entropy (reference.sparse_softmax_cross_entropy; torch's
// cross_entropy with class weights w, smoothing eps, PaLM's z_loss and the softcap):
//   per kept row with label y, z = softcap(x), lse = logsumexp(z), a_c = (1-eps) w_y [c==y]
//   + (eps/C) w_c, T = sum_c a_c = (1-eps) w_y + (eps/C) W, W = sum_c w_c:
//     loss   = sum_c a_c (lse - z_c) + z_loss lse^2
//            = xy(2 (1-eps) w_y, half_gap(m, z_y) + log_s / 2) + gaps.loss(log_s) + z_loss lse^2
//     grad_c = (p_c (T + 2 z_loss lse) - a_c) dz_c/dx_c * scale,   p_c = exp(z_c - lse)
//   with lse = m + log_s (LogNorm) and gaps the GapSum of a_c = (eps/C) w_c.
// ----------------------------------------------------------------------------

// Running statistics of a row: the online softmax and, when eps > 0, the gaps of the
// smoothing weights a_c = (eps/C) w_c.
template <class A> struct SparseStats {
    Online<A> sm;
    GapSum<A> gaps;
    __device__ void init() { sm.init(); gaps.init(); }
    __device__ __forceinline__ void add(A z, A a, bool smoothing) {
        const A m0 = sm.m;
        A e;
        sm.push(z, e);
        if (smoothing) {
            gaps.rebase(m0, sm.m);
            gaps.add(a, sm.m, z);
        }
    }
    __device__ static SparseStats merge(SparseStats a, SparseStats b) {
        SparseStats o;
        o.sm = Online<A>::merge(a.sm, b.sm);
        o.gaps = GapSum<A>::merge(a.gaps, a.sm.m, b.gaps, b.sm.m, o.sm.m);
        return o;
    }
};

// Everything a kept row's loss and gradient need besides the running statistics.
template <class A> struct SparseRow {
    i64 y;        // the label
    A wy;         // w_y (1 without class weights)
    A eps;        // label smoothing
    A eps_c;      // eps / C
    A W;          // sum_c w_c (C without class weights)
    A z_loss;     // PaLM's z_loss coefficient
    A cap;        // softcap, <= 0 for none
};

template <class A>
__device__ __forceinline__ A sparse_xent_loss(const SparseRow<A>& r, LogNorm<A> n, A zy, GapSum<A> gaps) {
    // The reference forms T * lse - sum_c xy(a_c, z_c): NaN whenever lse is, even when T = 0.
    const A lse = n.lse();
    if (lse != lse) return lse;
    // (1-eps) w_y (lse - z_y), halved like the gaps and weighted twice; 0 for a zero weight
    const A own = (A(1) - r.eps) * r.wy;
    A loss = xy(own + own, half_gap(n.m, zy) + n.log_s * A(0.5));
    if (r.eps > A(0)) loss += gaps.loss(n.log_s);
    // z_loss off adds exactly 0: lse * lse overflows float32 from |lse| = 1.8e19 (0 * inf = NaN).
    return r.z_loss > A(0) ? loss + r.z_loss * lse * lse : loss;
}

// The coefficient of p_c in the gradient: T + 2 z_loss lse.
template <class A> __device__ __forceinline__ A sparse_xent_p_coef(const SparseRow<A>& r, A lse) {
    const A base = (A(1) - r.eps) * r.wy + r.eps_c * r.W;
    return r.z_loss > A(0) ? base + A(2) * r.z_loss * lse : base;
}

// (p_c P - a_c) dz_c/dx_c: the gradient element of every sparse-family row, given the row's
// normaliser n, the coefficient P of p_c and the label weight a_c of class c (a split row's
// blocks take P and a_c's parts from the host: softmax_block_grad_rows).
template <class A> __device__ __forceinline__ A softmax_grad(A x, A cap, LogNorm<A> n, A p_coef, A a) {
    A dz;
    const A z = softcap(x, cap, dz);
    return (fast_exp(n.log_prob(z)) * p_coef - a) * dz;
}

// d loss / d x_c for a kept row; w_c is the class weight of c (1 without weights).
template <class A>
__device__ __forceinline__ A sparse_xent_grad(const SparseRow<A>& r, i64 c, A x, A w_c, LogNorm<A> n, A p_coef,
                                              A scale) {
    const A a = r.eps_c * w_c + (c == r.y ? (A(1) - r.eps) * r.wy : A(0));
    return softmax_grad(x, r.cap, n, p_coef, a) * scale;
}

// ----------------------------------------------------------------------------
// Soft-label softmax cross-entropy (reference.softmax_cross_entropy, reference._softmax_xent):
//   y'_c = (1-eps) y_c + eps/C, T = sum_c y'_c, z = softcap(x):
//     loss   = T lse - sum_c xy(y'_c, z_c) = gaps.loss(log_s)   (the GapSum of a_c = y'_c)
//     grad_c = (p_c T - y'_c) dz_c/dx_c * scale
// ----------------------------------------------------------------------------

template <class A> __device__ __forceinline__ A smooth_label(A y, A eps, A eps_c) { return (A(1) - eps) * y + eps_c; }

template <class A> struct SoftStats {
    Online<A> sm;
    GapSum<A> gaps;   // of y'_c; gaps.t = T
    __device__ void init() { sm.init(); gaps.init(); }
    __device__ __forceinline__ void add(A z, A ys) {
        const A m0 = sm.m;
        A e;
        sm.push(z, e);
        gaps.rebase(m0, sm.m);
        gaps.add(ys, sm.m, z);
    }
    __device__ static SoftStats merge(SoftStats a, SoftStats b) {
        SoftStats o;
        o.sm = Online<A>::merge(a.sm, b.sm);
        o.gaps = GapSum<A>::merge(a.gaps, a.sm.m, b.gaps, b.sm.m, o.sm.m);
        return o;
    }
};

template <class A> __device__ __forceinline__ A soft_xent_loss(LogNorm<A> n, GapSum<A> gaps) {
    const A lse = n.lse();
    if (lse != lse) return lse;  // T * NaN in the reference, whatever T is
    return gaps.loss(n.log_s);
}

template <class A>
__device__ __forceinline__ A soft_xent_grad(A x, A ys, A cap, LogNorm<A> n, A t, A scale) {
    A dz;
    const A z = softcap(x, cap, dz);
    return (fast_exp(n.log_prob(z)) * t - ys) * dz * scale;
}

// ----------------------------------------------------------------------------
// Scoring bundle (reference.score): lse, entropy -sum_c p_c log p_c and the first argmax.
// Entropy runs online beside the softmax: u = sum_c exp(z_c - m) (z_c - m), so
// entropy = log(s) - u / s; when m moves by d = m_old - m_new, u becomes r (u + s d).
// ----------------------------------------------------------------------------

template <class A> struct ScoreStats {
    Online<A> sm;
    A u;
    A best;    // the largest score so far (NaN once a NaN is seen: np.argmax's first NaN)
    i64 arg;   // its index, -1 before any score
    __device__ void init() { sm.init(); u = A(0); best = A(0); arg = -1; }

    // True when (v, i) should replace (bv, bi) as the first position of the maximum.
    __device__ static bool better(A v, i64 i, A bv, i64 bi) {
        if (bi < 0) return true;
        if (v != v) return !(bv != bv) || i < bi;
        if (bv != bv) return false;
        return v > bv || (v == bv && i < bi);
    }

    __device__ __forceinline__ void add(i64 c, A z) {
        const A m0 = sm.m, s0 = sm.s;
        A e;
        const A r = sm.push(z, e);
        // xy: a factor r of 0 drops the old terms even where m0 - m overflowed (-3e38 - 3e38)
        if (!(sm.m == m0)) u = (m0 == -inf<A>()) ? A(0) : xy(r, u + s0 * (m0 - sm.m));
        if (e != A(0)) u += e * (z - sm.m);
        if (better(z, c, best, arg)) { best = z; arg = c; }
    }

    // u of one side moved to the merged max M (0 for an empty side: m == -inf, s == u == 0).
    __device__ static A u_at(A mi, A si, A ui, A M) {
        if (mi == M) return ui;
        if (mi == -inf<A>()) return A(0);
        const A d = mi - M;
        return xy(fast_exp(d), ui + si * d);  // 0, not 0 * -inf, where d overflowed
    }

    __device__ static ScoreStats merge(ScoreStats a, ScoreStats b) {
        ScoreStats o;
        o.sm = Online<A>::merge(a.sm, b.sm);
        o.u = u_at(a.sm.m, a.sm.s, a.u, o.sm.m) + u_at(b.sm.m, b.sm.s, b.u, o.sm.m);
        const bool take_b = better(b.best, b.arg, a.best, a.arg) && b.arg >= 0;
        o.best = take_b ? b.best : a.best;
        o.arg = take_b ? b.arg : a.arg;
        return o;
    }

    // reference.score's entropy = lse - sum_c xy(p_c, z_c): NaN with the row rule.
    __device__ A entropy() const {
        if (sm.m == -inf<A>()) return nan<A>();
        return acc_log(sm.s) - u / sm.s;
    }
};

// ----------------------------------------------------------------------------
// Hessian-vector product (reference.softmax_cross_entropy_hvp): H v = p v - p (p . v),
// p = exp(z - lse) with the row rule; p . v runs online as pv = sum_c exp(z_c - m) v_c,
// so p . v = pv / s. A masked class (z = -inf) adds 0 * v_c, as p * v does in the reference.
// ----------------------------------------------------------------------------

template <class A> struct HvpStats {
    Online<A> sm;
    A pv;
    __device__ void init() { sm.init(); pv = A(0); }
    __device__ __forceinline__ void add(A z, A v) {
        A e;
        const A r = sm.push(z, e);
        pv = pv * r + e * v;
    }
    __device__ static HvpStats merge(HvpStats a, HvpStats b) {
        HvpStats o;
        o.sm = Online<A>::merge(a.sm, b.sm);
        o.pv = a.pv * Online<A>::rescale(a.sm.m, o.sm.m) + b.pv * Online<A>::rescale(b.sm.m, o.sm.m);
        return o;
    }
};

template <class A> __device__ __forceinline__ A hvp_value(A z, A v, LogNorm<A> n, A pdotv) {
    const A p = fast_exp(n.log_prob(z));
    return p * v - p * pdotv;
}

// ----------------------------------------------------------------------------
// Probability inputs (Keras 3; reference._categorical, binary_cross_entropy):
//   categorical: s = sum_c p_c, q = clip(p / s, lo, hi), y'_c = (1-eps) y_c + eps/C,
//     loss = -sum_c xlogy(y'_c, q_c),  g_c = inside_c ? -xy(y'_c, 1/q_c) : 0,
//     grad_c = (g_c - sum_j g_j q_j) / s * scale,   q_j = p_j / s (unclipped)
//   binary: z' = (1-eps) z + eps/2, q = clip(p, lo, hi),
//     loss = -(xlogy(z', q) + xlogy(1-z', 1-q)),
//     grad = (inside ? -(xy(z', 1/q) - xy(1-z', 1/(1-q))) : 0) * scale
//   lo = epsilon and hi = 1 - epsilon are rounded to the probs' dtype by the host.
// ----------------------------------------------------------------------------

template <class A> struct SumStats {
    A s;
    __device__ void init() { s = A(0); }
    __device__ static SumStats merge(SumStats a, SumStats b) { SumStats o; o.s = a.s + b.s; return o; }
};

template <class A> struct CategoricalStats {
    A nll;   // sum_c xlogy(y'_c, q_c)  (the loss is its negative)
    A gq;    // sum_c g_c q_c
    __device__ void init() { nll = A(0); gq = A(0); }
    __device__ static CategoricalStats merge(CategoricalStats a, CategoricalStats b) {
        CategoricalStats o;
        o.nll = a.nll + b.nll;
        o.gq = a.gq + b.gq;
        return o;
    }
};

// d loss / d q_c of the clipped categorical loss for one class (0 where clipped); also
// returns xlogy(y', q_c) for the loss.
template <class A>
__device__ __forceinline__ A categorical_dq(A p, A ys, A s, A lo, A hi, A& term) {
    bool inside;
    const A q = clip(p / s, lo, hi, inside);
    term = xlogy(ys, q);
    return inside ? -xy(ys, A(1) / q) : A(0);
}

// (g - gq) / s, not g / s - (sum_j g_j p_j) / s^2: s * s overflows float32 for s beyond
// 1.8e19 (and g_j p_j = -y_j s overflows with s near the maximum), where the gradient does not.
template <class A> __device__ __forceinline__ A categorical_grad(A g, A s, A gq, A scale) {
    return (g - gq) / s * scale;
}

// Sparse categorical (one-hot y): pass 1 sums s = sum_c p_c and zp = sum_c 0 * p_c, which
// is 0, or NaN once some p_c is +-inf or NaN. g_c = 0 for c != y, yet the reference's
// sum_j g_j q_j meets 0 * NaN there (q_j = inf / inf), so such a row's gradient is NaN
// everywhere (as the dense kernel, which forms every g_c q_c, and the CPU backend give).
template <class A> struct ProbSumStats {
    A s, zp;
    __device__ void init() { s = A(0); zp = A(0); }
    __device__ __forceinline__ void add(A p) { s += p; zp += A(0) * p; }
    __device__ static ProbSumStats merge(ProbSumStats a, ProbSumStats b) {
        ProbSumStats o;
        o.s = a.s + b.s;
        o.zp = a.zp + b.zp;
        return o;
    }
};

// Loss of a sparse categorical row with label probability py; sets g_y (d loss / d q_y,
// 0 where clipped) and gq = sum_j g_j q_j, from which categorical_grad gives every class.
template <class A>
__device__ __forceinline__ A sparse_categorical_loss(A py, ProbSumStats<A> t, A lo, A hi, A& gy, A& gq) {
    A term;
    gy = categorical_dq(py, A(1), t.s, lo, hi, term);
    gq = gy * (py / t.s) + t.zp;
    return -term;
}

template <class A>
__device__ __forceinline__ A binary_xent(A p, A z, A eps, A lo, A hi, A scale, A& grad) {
    const A zs = (A(1) - eps) * z + eps / A(2);
    bool inside;
    const A q = clip(p, lo, hi, inside);
    grad = (inside ? -(xy(zs, A(1) / q) - xy(A(1) - zs, A(1) / (A(1) - q))) : A(0)) * scale;
    return -(xlogy(zs, q) + xlogy(A(1) - zs, A(1) - q));
}

// ----------------------------------------------------------------------------
// Sigmoid family (reference.sigmoid_cross_entropy, sigmoid_cross_entropy_hessian_diag;
// TensorFlow's weighted_cross_entropy_with_logits), q = pos_weight, z' = (1-eps) z + eps/2,
// w = 1 + (q-1) z', L = log1p(exp(-|x|)):
//   loss = (1-z') x + w L        for x >= 0
//        = -q z' x + w L         for x < 0     ((1-z') x + w max(-x, 0) = -q z' x there)
//   grad = ((1-z') sigmoid(x) - q z' sigmoid(-x)) * scale
//   hess = (1 + (q-1) z) sigmoid(x) sigmoid(-x)
// No term cancels another, so a tiny loss keeps its relative precision (x = -20, z = 0:
// 2.06e-9 in float32, where (1-z) x + w softplus(-x) gives 0), and exp only of -|x|
// overflows for no x. The same form as the Numba kernels (fastxent/backends/numba/
// _elementwise.py). x = -inf gives NaN, x = +inf gives (1-z') * inf: the reference's IEEE
// evaluation of the literal formula (-inf + inf, 0 * inf).
// ----------------------------------------------------------------------------

template <class A> __device__ __forceinline__ A sigmoid(A x) {
    const A e = acc_exp(-absval(x));
    return x >= A(0) ? A(1) / (A(1) + e) : e / (A(1) + e);
}

template <class A>
__device__ __forceinline__ A sigmoid_xent(A x, A z, A q, A eps, A scale, A& grad) {
    const A zs = (A(1) - eps) * z + eps / A(2);
    const A weight = A(1) + (q - A(1)) * zs;
    grad = ((A(1) - zs) * sigmoid(x) - q * zs * sigmoid(-x)) * scale;
    const A linear = x >= A(0) ? (A(1) - zs) * x : -(q * zs) * x;
    const A value = linear + weight * acc_log1p(acc_exp(-absval(x)));
    return x == -inf<A>() ? nan<A>() : value;
}

template <class A> __device__ __forceinline__ A sigmoid_hessian(A x, A z, A q) {
    return (A(1) + (q - A(1)) * z) * sigmoid(x) * sigmoid(-x);
}

}  // namespace fx
