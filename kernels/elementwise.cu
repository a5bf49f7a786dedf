// fastxent -- elementwise kernels: sigmoid cross-entropy (with pos_weight and label
// smoothing), its Hessian diagonal, binary cross-entropy on probabilities, and the
// dtype cast that brings an unusual label dtype to the accumulation type.
// The formulas are in fx_formulas.cuh; fastxent/reference.py is the oracle.
//
// Shapes: x / probs (R, K) C-contiguous, seen as n = R * K elements, in T; labels z the
// same shape in Y (the scores' type or the accumulation type); loss (n,) in acc_t<T>;
// grad / hessian (n,) in T. pos_weight q: pw_mode 0 none (q = 1), 1 one value
// (pw_value), 2 one value per last-axis position (pos_weight[i % K]), 3 one per element
// (pos_weight[i]); q and scale arrays are float64, as the backend contract passes them.
//
// Who owns what: a grid-stride loop over 128-bit packs of x (8 half/bfloat16, 4 float,
// 2 double) -- thread t of the grid takes packs t, t + gridDim.x * blockDim.x, ... --
// with a scalar head and tail (row_apply over the flat range): each element is read and
// written once, so the kernel is a stream at memory bandwidth; the block count is capped
// on the host (a few waves of 256-thread blocks per SM), the loop covers the rest.
// Everything here runs in the accumulation type with the accurate libm (expf, log1pf):
// these kernels are memory-bound and the formulas saturate, so speed costs nothing to
// accuracy.
#include "fx_formulas.cuh"

namespace fx {

enum PosWeightMode { PW_NONE = 0, PW_SCALAR = 1, PW_PER_COLUMN = 2, PW_FULL = 3 };

template <class A>
__device__ __forceinline__ A pos_weight_at(int mode, const double* pos_weight, double pw_value, i64 i, i64 K) {
    switch (mode) {
        case PW_SCALAR: return (A)pw_value;
        case PW_PER_COLUMN: return (A)pos_weight[i % K];
        case PW_FULL: return (A)pos_weight[i];
        default: return A(1);
    }
}

// ============================================================================
// Sigmoid cross-entropy: loss (n,), grad (n,) when grad != nullptr
// ============================================================================

template <class T, class Y>
__global__ void __launch_bounds__(ELEMENTWISE_BLOCK_THREADS) sigmoid_xent_elems(
        const T* x, const Y* z, i64 n, i64 K, int pw_mode, const double* pos_weight, double pw_value,
        double eps, const double* scale, double scale_value, acc_t<T>* loss, T* grad, int vec_ok) {
    using A = acc_t<T>;
    const i64 lane = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 width = (i64)gridDim.x * blockDim.x;
    const A e = (A)eps;
    auto element = [&](i64 i, A xv, A zv, A& l, A& gout) {
        const A q = pos_weight_at<A>(pw_mode, pos_weight, pw_value, i, K);
        l = sigmoid_xent(xv, zv, q, e, scale_at<A>(scale, scale_value, i), gout);
    };
    if (grad != nullptr) row_apply<A, true, false>(0, n, x, z, loss, grad, lane, width, vec_ok, element);
    else row_apply<A, true, false>(0, n, x, z, loss, (None*)nullptr, lane, width, vec_ok, element);
}

// ============================================================================
// Hessian diagonal of the sigmoid cross-entropy: out (n,) in T
// ============================================================================

template <class T, class Y>
__global__ void __launch_bounds__(ELEMENTWISE_BLOCK_THREADS) sigmoid_hess_elems(
        const T* x, const Y* z, i64 n, i64 K, int pw_mode, const double* pos_weight, double pw_value,
        T* out, int vec_ok) {
    using A = acc_t<T>;
    const i64 lane = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 width = (i64)gridDim.x * blockDim.x;
    row_apply<A, true, false>(0, n, x, z, out, (None*)nullptr, lane, width, vec_ok, [&](i64 i, A xv, A zv, A& h, A&) {
        h = sigmoid_hessian(xv, zv, pos_weight_at<A>(pw_mode, pos_weight, pw_value, i, K));
    });
}

// ============================================================================
// Binary cross-entropy on probabilities: loss (n,), grad (n,) when grad != nullptr
// ============================================================================

template <class T, class Y>
__global__ void __launch_bounds__(ELEMENTWISE_BLOCK_THREADS) binary_xent_elems(
        const T* p, const Y* z, i64 n, double lo, double hi, double eps,
        const double* scale, double scale_value, acc_t<T>* loss, T* grad, int vec_ok) {
    using A = acc_t<T>;
    const i64 lane = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 width = (i64)gridDim.x * blockDim.x;
    const A lo_a = (A)lo, hi_a = (A)hi, e = (A)eps;
    auto element = [&](i64 i, A pv, A zv, A& l, A& gout) {
        l = binary_xent(pv, zv, e, lo_a, hi_a, scale_at<A>(scale, scale_value, i), gout);
    };
    if (grad != nullptr) row_apply<A, true, false>(0, n, p, z, loss, grad, lane, width, vec_ok, element);
    else row_apply<A, true, false>(0, n, p, z, loss, (None*)nullptr, lane, width, vec_ok, element);
}

// ============================================================================
// Cast: out[i] = in[i] as D (D = float or double), for label / v dtypes the kernels do
// not take directly (bool, or a 16-bit type beside other scores). CuPy's own astype on
// float16/bfloat16 would need cuda_fp16.h / cuda_bf16.h at run time; this does not.
// ============================================================================

template <class S, class D>
__global__ void __launch_bounds__(ELEMENTWISE_BLOCK_THREADS) cast_elems(const S* in, D* out, i64 n) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = to_acc<D>(in[i]);
}

}  // namespace fx
