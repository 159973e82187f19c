// CPU kernels: one pass over memory, split across threads with at::parallel_for (the
// extension is compiled with -fopenmp, see setup.py); the element loops are `omp simd` loops
// over pointers copied into locals, so the compiler vectorises them (SSE2/AVX as compiled)
// without runtime alias checks. Outputs may alias inputs only element for element
// (out == y), which vectorised loops handle: each lane reads its element before writing it.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "../ops.h"

namespace amaml {
namespace {

constexpr int64_t kGrain = 32768;  // elements per task; at::internal::GRAIN_SIZE

template <typename T, int S>
void combine_loop(const T* y, const StageRefs<T>& refs, T h, T* out, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    const StageRefs<T> st = refs;  // local copy: its pointers stay in registers
_Pragma("omp simd")
    for (int64_t i = begin; i < end; ++i) out[i] = y[i] + h * weighted_stage_sum<T, S>(st, i);
  });
}

template <typename T>
void combine_dispatch(const T* y, const StageRefs<T>& st, T h, T* out, int64_t n) {
  switch (st.count) {
    case 1: return combine_loop<T, 1>(y, st, h, out, n);
    case 2: return combine_loop<T, 2>(y, st, h, out, n);
    case 3: return combine_loop<T, 3>(y, st, h, out, n);
    case 4: return combine_loop<T, 4>(y, st, h, out, n);
    case 5: return combine_loop<T, 5>(y, st, h, out, n);
    case 6: return combine_loop<T, 6>(y, st, h, out, n);
    case 7: return combine_loop<T, 7>(y, st, h, out, n);
    default: TORCH_CHECK(false, "amaml_ext: unsupported stage count ", st.count);
  }
}

// Sum over [begin, end) of the squared scaled errors, writing y1 and err on the way.
// The element loop is vectorised in blocks whose squared errors go to a small buffer; the
// buffer is then added in double (d can be 1e7 and more) in a fixed order, so the sum does
// not depend on the vector width or the thread count.
template <typename T>
double finish_chunk(const T* y0, const StageRefs<T>& sol_refs, const StageRefs<T>& est_refs,
                    T h, T rtol, T atol, T* y1, T* err, int64_t begin, int64_t end) {
  const StageRefs<T> sol = sol_refs, est = est_refs;
  constexpr int64_t kBlock = 256;
  T sq[kBlock];
  double acc = 0.0;
  for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
    const int64_t m = std::min(kBlock, end - b0);
#pragma omp simd
    for (int64_t j = 0; j < m; ++j)
      sq[j] = dopri5_finish_element<T>(y0, sol, est, h, rtol, atol, y1, err, b0 + j);
    for (int64_t j = 0; j < m; ++j) acc += static_cast<double>(sq[j]);
  }
  return acc;
}

}  // namespace

void CpuBackend::stage_combine(const at::Tensor& y, const std::vector<at::Tensor>& k,
                               c10::ArrayRef<double> coeffs, double h, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "amaml_stage_combine_cpu", [&] {
    const auto st = detail::make_refs<scalar_t>(k, coeffs.data(), k.size());
    combine_dispatch<scalar_t>(y.data_ptr<scalar_t>(), st, static_cast<scalar_t>(h),
                               out.data_ptr<scalar_t>(), y.numel());
  });
}

void CpuBackend::dopri5_finish(const at::Tensor& y0, const std::vector<at::Tensor>& k, double h,
                               double rtol, double atol, at::Tensor& y1, at::Tensor& err,
                               at::Tensor& err_norm) {
  const int64_t rows = y0.dim() == 2 ? y0.size(0) : 1;
  const int64_t d = y0.numel() / rows;
  // Each row is cut into fixed chunks; every chunk's partial sum lands in its own slot and
  // the slots are added in order, so the norm does not depend on the thread count.
  const int64_t chunks_per_row = (d + kGrain - 1) / kGrain;
  std::vector<double> partial(static_cast<size_t>(rows * chunks_per_row), 0.0);
  AT_DISPATCH_FLOATING_TYPES(y0.scalar_type(), "amaml_dopri5_finish_cpu", [&] {
    using T = scalar_t;
    const auto sol_refs = detail::make_dopri5_refs<T>(k, dopri5::b_nz, dopri5::kSolStages);
    const auto est_refs = detail::make_dopri5_refs<T>(k, dopri5::e_nz, dopri5::kErrStages);
    const T* y0p = y0.data_ptr<T>();
    T* y1p = y1.data_ptr<T>();
    T* errp = err.data_ptr<T>();
    const T ht = static_cast<T>(h), rt = static_cast<T>(rtol), at_ = static_cast<T>(atol);
    at::parallel_for(0, rows * chunks_per_row, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t row = c / chunks_per_row;
        const int64_t begin = row * d + (c % chunks_per_row) * kGrain;
        const int64_t end = std::min(begin + kGrain, (row + 1) * d);
        partial[static_cast<size_t>(c)] =
            finish_chunk<T>(y0p, sol_refs, est_refs, ht, rt, at_, y1p, errp, begin, end);
      }
    });
    T* normp = err_norm.data_ptr<T>();
    for (int64_t row = 0; row < rows; ++row) {
      double s = 0.0;
      for (int64_t c = 0; c < chunks_per_row; ++c)
        s += partial[static_cast<size_t>(row * chunks_per_row + c)];
      normp[row] = static_cast<T>(std::sqrt(s / static_cast<double>(d)));
    }
  });
}

void CpuBackend::dopri5_dense(const at::Tensor& y0, const at::Tensor& y1,
                              const std::vector<at::Tensor>& k, double h,
                              c10::ArrayRef<double> thetas, at::Tensor& rows) {
  const int64_t n = y0.numel();
  AT_DISPATCH_FLOATING_TYPES(y0.scalar_type(), "amaml_dopri5_dense_cpu", [&] {
    using T = scalar_t;
    const auto dense_refs = detail::make_dopri5_refs<T>(k, dopri5::d_nz, dopri5::kErrStages);
    const T* y0p = y0.data_ptr<T>();
    const T* y1p = y1.data_ptr<T>();
    const T* k1 = k[0].data_ptr<T>();
    const T* k7 = k[6].data_ptr<T>();
    T* out = rows.data_ptr<T>();
    const std::vector<T> th(thetas.begin(), thetas.end());
    const T ht = static_cast<T>(h);
    constexpr int64_t kBlock = 512;  // the polynomial pieces of a block stay in L1
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      const StageRefs<T> dense = dense_refs;
      T y0b[kBlock], ydiff[kBlock], bspl[kBlock], r4[kBlock], r5[kBlock], y1b[kBlock];
      for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
        const int64_t m = std::min(kBlock, end - b0);
_Pragma("omp simd")
        for (int64_t j = 0; j < m; ++j) {
          const auto p = dopri5_dense_coeffs<T>(y0p, y1p, dense, k1, k7, ht, b0 + j);
          y0b[j] = p.y0; ydiff[j] = p.ydiff; bspl[j] = p.bspl; r4[j] = p.r4; r5[j] = p.r5; y1b[j] = p.y1;
        }
        for (size_t r = 0; r < th.size(); ++r) {
          T* dst = out + static_cast<int64_t>(r) * n + b0;
          const T theta = th[r];
          if (theta == T(1)) {  // the step's end point: y1 itself
_Pragma("omp simd")
            for (int64_t j = 0; j < m; ++j) dst[j] = y1b[j];
            continue;
          }
          const T one_m = T(1) - theta;
_Pragma("omp simd")
          for (int64_t j = 0; j < m; ++j)
            dst[j] = dopri5_dense_poly<T>(y0b[j], ydiff[j], bspl[j], r4[j], r5[j], theta, one_m);
        }
      }
    });
  });
}

void CpuBackend::heun_update(const at::Tensor& lam, const at::Tensor& a, const at::Tensor* b,
                             double h, at::Tensor& out) {
  const int64_t n = lam.numel();
  AT_DISPATCH_FLOATING_TYPES(lam.scalar_type(), "amaml_heun_update_cpu", [&] {
    using T = scalar_t;
    const T* lp = lam.data_ptr<T>();
    const T* ap = a.data_ptr<T>();
    T* op = out.data_ptr<T>();
    if (b != nullptr) {
      const T* bp = b->data_ptr<T>();
      const T half_h = static_cast<T>(0.5 * h);
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
_Pragma("omp simd")
        for (int64_t i = begin; i < end; ++i) op[i] = heun_element<T>(lp[i], ap[i], bp[i], half_h);
      });
    } else {
      const T ht = static_cast<T>(h);
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
_Pragma("omp simd")
        for (int64_t i = begin; i < end; ++i) op[i] = heun_element<T>(lp[i], ap[i], ht);
      });
    }
  });
}

}  // namespace amaml
