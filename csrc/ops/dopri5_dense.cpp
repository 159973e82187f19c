// dopri5_dense: dense output of one accepted DOPRI5 step [t0, t0 + h]: for each theta_i in [0, 1],
// trajectory[first_row + i] = y(t0 + theta_i h) from Hairer's continuous extension (contd5, the
// d weights of solvers/tableaus.h). Schema, checks, CPU kernel and registration; the CUDA kernel
// is in dopri5_dense_cuda.cu.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ops/op.h"

namespace amaml {

// dopri5_dense_cuda.cu (CUDA builds): the kernel for contiguous, checked arguments; `rows` are
// the trajectory rows to write, one per theta.
void dopri5_dense_cuda(const at::Tensor& y0, const at::Tensor& y1, const std::vector<at::Tensor>& k,
                       double h, c10::ArrayRef<double> thetas, at::Tensor& rows);

namespace {

using Kernel = decltype(&dopri5_dense_cuda);

// ---- CPU kernel ----------------------------------------------------------------------------

// dense_coeffs / dense_poly: kernel_math.h (shared with the CUDA kernel).

void dopri5_dense_cpu(const at::Tensor& y0, const at::Tensor& y1, const std::vector<at::Tensor>& k,
                      double h, c10::ArrayRef<double> thetas, at::Tensor& rows) {
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
          const auto p = dense_coeffs<T>(y0p, y1p, dense, k1, k7, ht, b0 + j);
          y0b[j] = p.y0; ydiff[j] = p.ydiff; bspl[j] = p.bspl; r4[j] = p.r4; r5[j] = p.r5; y1b[j] = p.y1;
        }
        for (size_t r = 0; r < th.size(); ++r) {
          T* dst = out + static_cast<int64_t>(r) * n + b0;
          const T theta = th[r];
          if (theta == T(1)) {  // the step's end point: y1 itself, not a rounded reconstruction
_Pragma("omp simd")
            for (int64_t j = 0; j < m; ++j) dst[j] = y1b[j];
            continue;
          }
          const T one_m = T(1) - theta;
_Pragma("omp simd")
          for (int64_t j = 0; j < m; ++j)
            dst[j] = dense_poly<T>(y0b[j], ydiff[j], bspl[j], r4[j], r5[j], theta, one_m);
        }
      }
    });
  });
}

// ---- the op: checks, then the device's kernel ------------------------------------------------

template <Kernel kernel>
void dopri5_dense_op(const at::Tensor& y0, const at::Tensor& y1, at::TensorList stages,
                     double h, c10::ArrayRef<double> thetas, int64_t first_row,
                     const at::Tensor& trajectory) {
  const char* op = "dopri5_dense";
  detail::check_state(op, "y0", y0);
  detail::check_like(op, "y1", y1, "y0", y0);
  auto k = detail::checked_stages(op, stages, dopri5::kStages, dopri5::kStages, y0);
  detail::check_finite_scalar(op, "h", h);
  TORCH_CHECK(trajectory.defined() && trajectory.device() == y0.device() &&
                  trajectory.scalar_type() == y0.scalar_type(), cat("amaml_ext.dopri5_dense: argument 'trajectory' must be a ", y0.scalar_type(),
              " tensor on ", y0.device()));
  TORCH_CHECK(trajectory.dim() == y0.dim() + 1 && trajectory.sizes().slice(1) == y0.sizes(), cat("amaml_ext.dopri5_dense: argument 'trajectory' must have shape [N+1, ",
              detail::shape_str(y0).substr(1), ", got ", detail::shape_str(trajectory)));
  const int64_t n = static_cast<int64_t>(thetas.size());
  TORCH_CHECK(first_row >= 0 && first_row + n <= trajectory.size(0), cat("amaml_ext.dopri5_dense: rows [", first_row, ", ", first_row + n,
              ") do not fit in 'trajectory' with ", trajectory.size(0), " rows"));
  for (double th : thetas) {
    TORCH_CHECK(th >= 0.0 && th <= 1.0, cat("amaml_ext.dopri5_dense: every entry of 'thetas' must ",
                "lie in [0, 1], got ", th));
  }
  if (n == 0) return;
  // several rows are written from each element of the inputs: no sharing at all
  detail::check_output(op, "trajectory", trajectory.narrow(0, first_row, n), {{"y0", y0}, {"y1", y1}},
                       stages, {}, false);
  const at::Tensor y0c = y0.contiguous();
  const at::Tensor y1c = y1.contiguous();
  detail::with_contiguous_out(trajectory.narrow(0, first_row, n), [&](at::Tensor& rows) {
    kernel(y0c, y1c, k, h, thetas, rows);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(amaml_ext, m) {
  m.def(
      "dopri5_dense(Tensor y0, Tensor y1, Tensor[] stages, float h, float[] thetas, "
      "int first_row, Tensor(a!) trajectory) -> ()");
}

TORCH_LIBRARY_IMPL(amaml_ext, CPU, m) { m.impl("dopri5_dense", &dopri5_dense_op<dopri5_dense_cpu>); }

#ifdef AMAML_WITH_CUDA
TORCH_LIBRARY_IMPL(amaml_ext, CUDA, m) { m.impl("dopri5_dense", &dopri5_dense_op<dopri5_dense_cuda>); }
#endif

}  // namespace amaml
