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
