// The arithmetic every fused kernel shares, CPU (ops/<op>.cpp) and CUDA (ops/<op>_cuda.cu): the
// stage vectors of a Runge-Kutta combination as raw pointers with their coefficients, and their
// weighted sum, accumulated left to right in the same order everywhere. That one definition is
// what makes `dopri5_finish` reproduce the 7th stage point of `stage_combine` bit for bit on the
// same device.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "solvers/tableaus.h"

#if defined(__CUDACC__)
#define AMAML_HD __host__ __device__ __forceinline__
#define AMAML_UNROLL _Pragma("unroll")
#else
#define AMAML_HD inline
#define AMAML_UNROLL _Pragma("GCC unroll 8")
#endif

namespace amaml {

constexpr int kMaxStages = dopri5::kStages;

// Raw pointers and coefficients of up to kMaxStages stage vectors, passed by value to kernels.
template <typename T>
struct StageRefs {
  const T* k[kMaxStages];
  T coeff[kMaxStages];
  int count;
};

// sum_j coeff[j] * k[j][i], accumulated left to right (the same order everywhere).
template <typename T, int S>
AMAML_HD T weighted_stage_sum(const StageRefs<T>& st, int64_t i) {
  T acc = st.coeff[0] * st.k[0][i];
  AMAML_UNROLL
  for (int j = 1; j < S; ++j) acc += st.coeff[j] * st.k[j][i];
  return acc;
}

// ---- per-element formulas of the DOPRI5 ops, one definition for the CPU and CUDA kernels ----

// dopri5_finish: y1 and the error of one element, returning its squared scaled error
// (err / (atol + rtol * max|y0|,|y1|))^2. `sol` holds k1, k3..k6 with the b weights, `est` k1,
// k3..k7 with the e weights (k2 has weight 0 in both). y1 is the sum of stage_combine: the 7th
// stage point bit for bit. Plain comparisons rather than fabs/fmax: they vectorise without
// -ffast-math; the states are finite or the step is rejected anyway.
template <typename T>
AMAML_HD T finish_element(const T* y0, const StageRefs<T>& sol, const StageRefs<T>& est, T h, T rtol,
                          T atol, T* y1, T* err, int64_t i) {
  const T y0i = y0[i];
  const T y1i = y0i + h * weighted_stage_sum<T, dopri5::kSolStages>(sol, i);
  const T erri = h * weighted_stage_sum<T, dopri5::kErrStages>(est, i);
  y1[i] = y1i;
  err[i] = erri;
  const T a0 = y0i < T(0) ? -y0i : y0i;
  const T a1 = y1i < T(0) ? -y1i : y1i;
  const T scale = atol + rtol * (a0 > a1 ? a0 : a1);
  const T r = erri / scale;
  return r * r;
}

// dopri5_dense: the polynomial pieces of one element; `dense` holds k1, k3..k7 with the d weights.
template <typename T>
struct DenseCoeffs {
  T y0, ydiff, bspl, r4, r5, y1;
};

template <typename T>
AMAML_HD DenseCoeffs<T> dense_coeffs(const T* y0, const T* y1, const StageRefs<T>& dense, const T* k1,
                                     const T* k7, T h, int64_t i) {
  DenseCoeffs<T> out;
  out.y0 = y0[i];
  out.y1 = y1[i];
  out.ydiff = out.y1 - out.y0;
  out.bspl = h * k1[i] - out.ydiff;
  out.r4 = out.ydiff - h * k7[i] - out.bspl;
  out.r5 = h * weighted_stage_sum<T, dopri5::kErrStages>(dense, i);
  return out;
}

// y0 + theta (ydiff + (1-theta) (bspl + theta (r4 + (1-theta) r5))), one_m = 1 - theta.
template <typename T>
AMAML_HD T dense_poly(T y0, T ydiff, T bspl, T r4, T r5, T theta, T one_m) {
  return y0 + theta * (ydiff + one_m * (bspl + theta * (r4 + one_m * r5)));
}

namespace detail {

// The refs of the (contiguous, checked) stages k with the given coefficients.
template <typename T>
StageRefs<T> make_refs(const std::vector<at::Tensor>& k, const double* coeff, size_t n) {
  StageRefs<T> r{};
  r.count = static_cast<int>(n);
  for (size_t j = 0; j < n; ++j) {
    r.k[j] = k[j].data_ptr<T>();
    r.coeff[j] = static_cast<T>(coeff[j]);
  }
  return r;
}

// The DOPRI5 stages without k2 (whose weights are all zero): k1, k3, k4, k5, k6 (, k7).
template <typename T>
StageRefs<T> make_dopri5_refs(const std::vector<at::Tensor>& k, const double* coeff, size_t n) {
  StageRefs<T> r{};
  r.count = static_cast<int>(n);
  for (size_t j = 0; j < n; ++j) {
    r.k[j] = k[j == 0 ? 0 : j + 1].data_ptr<T>();
    r.coeff[j] = static_cast<T>(coeff[j]);
  }
  return r;
}

}  // namespace detail
}  // namespace amaml
