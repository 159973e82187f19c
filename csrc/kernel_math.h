// Per-element arithmetic of every fused kernel, written once for the CPU loops and the CUDA
// kernels. Keeping one definition is what makes `dopri5_finish` reproduce the 7th stage point
// of `stage_combine` bit for bit on the same device, and keeps CPU and CUDA results within
// rounding of each other.
#pragma once

#include <cmath>
#include <cstdint>

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

// DOPRI5 finish for one element: writes y1 (5th order) and err (embedded estimate) and returns
// the squared scaled error (err / (atol + rtol * max|y0|,|y1|))^2 that enters the RMS norm.
// `sol` holds k1, k3..k6 with the b weights, `est` k1, k3..k7 with the e weights (k2 has
// weight 0 in both).
template <typename T>
AMAML_HD T dopri5_finish_element(const T* y0, const StageRefs<T>& sol, const StageRefs<T>& est,
                                 T h, T rtol, T atol, T* y1, T* err, int64_t i) {
  const T y0i = y0[i];
  const T y1i = y0i + h * weighted_stage_sum<T, dopri5::kSolStages>(sol, i);
  const T erri = h * weighted_stage_sum<T, dopri5::kErrStages>(est, i);
  y1[i] = y1i;
  err[i] = erri;
  // Plain comparisons rather than fabs/fmax: these vectorise (maxps/andps) on the CPU
  // without -ffast-math; the states here are finite or the step is rejected anyway.
  const T a0 = y0i < T(0) ? -y0i : y0i;
  const T a1 = y1i < T(0) ? -y1i : y1i;
  const T scale = atol + rtol * (a0 > a1 ? a0 : a1);
  const T r = erri / scale;
  return r * r;
}

// Hairer's contd5 polynomial pieces for one element (see solvers/tableaus.h).
template <typename T>
struct DenseCoeffs {
  T y0, ydiff, bspl, r4, r5, y1;
};

// `dense` holds k1, k3..k7 with the d weights; k1 = dense.k[0], k7 = dense.k[5].
template <typename T>
AMAML_HD DenseCoeffs<T> dopri5_dense_coeffs(const T* y0, const T* y1, const StageRefs<T>& dense,
                                            const T* k1, const T* k7, T h, int64_t i) {
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
AMAML_HD T dopri5_dense_poly(T y0, T ydiff, T bspl, T r4, T r5, T theta, T one_m) {
  return y0 + theta * (ydiff + one_m * (bspl + theta * (r4 + one_m * r5)));
}

template <typename T>
AMAML_HD T dopri5_dense_eval(const DenseCoeffs<T>& p, T theta) {
  // theta == 1 is the step's end point: return y1 itself, not a rounded reconstruction.
  if (theta == T(1)) return p.y1;
  return dopri5_dense_poly<T>(p.y0, p.ydiff, p.bspl, p.r4, p.r5, theta, T(1) - theta);
}

// Heun (trapezoidal) adjoint update: with b, lam + h/2 (a + b); without b, lam + h a.
template <typename T>
AMAML_HD T heun_element(T lam, T a, T h) {
  return lam + h * a;
}
template <typename T>
AMAML_HD T heun_element(T lam, T a, T b, T half_h) {
  return lam + half_h * (a + b);
}

}  // namespace amaml
