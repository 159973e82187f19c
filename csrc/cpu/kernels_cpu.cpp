// CPU kernels: one pass over memory, split across threads with at::parallel_for; the inner
// loops are simple strided-free loops over restrict pointers that the compiler vectorises.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "../ops.h"

namespace amaml {
namespace {

constexpr int64_t kGrain = 32768;  // elements per task; at::internal::GRAIN_SIZE

template <typename T, int S>
void combine_loop(const T* y, const StageRefs<T>& st, T h, T* out,
                  int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
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
    const auto sol = detail::make_refs<T>(k, dopri5::b, 6);
    const auto est = detail::make_refs<T>(k, dopri5::e, 7);
    const T* y0p = y0.data_ptr<T>();
    T* y1p = y1.data_ptr<T>();
    T* errp = err.data_ptr<T>();
    const T ht = static_cast<T>(h), rt = static_cast<T>(rtol), at_ = static_cast<T>(atol);
    at::parallel_for(0, rows * chunks_per_row, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t row = c / chunks_per_row;
        const int64_t begin = row * d + (c % chunks_per_row) * kGrain;
        const int64_t end = std::min(begin + kGrain, (row + 1) * d);
        T acc = T(0);
        for (int64_t i = begin; i < end; ++i)
          acc += dopri5_finish_element<T>(y0p, sol, est, ht, rt, at_, y1p, errp, i);
        partial[static_cast<size_t>(c)] = static_cast<double>(acc);
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
    const auto dense = detail::make_refs<T>(k, dopri5::d, 7);
    const T* y0p = y0.data_ptr<T>();
    const T* y1p = y1.data_ptr<T>();
    const T* k1 = k[0].data_ptr<T>();
    const T* k7 = k[6].data_ptr<T>();
    T* out = rows.data_ptr<T>();
    std::vector<T> th(thetas.begin(), thetas.end());
    const T ht = static_cast<T>(h);
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const auto p = dopri5_dense_coeffs<T>(y0p, y1p, dense, k1, k7, ht, i);
        for (size_t r = 0; r < th.size(); ++r) out[static_cast<int64_t>(r) * n + i] = dopri5_dense_eval<T>(p, th[r]);
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
        for (int64_t i = begin; i < end; ++i) op[i] = heun_element<T>(lp[i], ap[i], bp[i], half_h);
      });
    } else {
      const T ht = static_cast<T>(h);
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) op[i] = heun_element<T>(lp[i], ap[i], ht);
      });
    }
  });
}

}  // namespace amaml
