// dopri5_finish: from y0 and the seven DOPRI5 stages of a step of size h, y1 (5th order), err (the
// embedded error estimate) and err_norm (per-task RMS of err / (atol + rtol max(|y0|, |y1|)),
// shape [] for a [d] state, [B] for [B, d]), in one pass over memory. stages[1] (k2) is checked
// but not read: its weights are zero. Schema, checks, CPU kernel and registration; the CUDA kernel
// is in dopri5_finish_cuda.cu.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/op.h"

namespace amaml {

// dopri5_finish_cuda.cu (CUDA builds): the kernel for contiguous, checked arguments.
void dopri5_finish_cuda(const at::Tensor& y0, const std::vector<at::Tensor>& k, double h,
                        double rtol, double atol, at::Tensor& y1, at::Tensor& err,
                        at::Tensor& err_norm);

namespace {

using Kernel = decltype(&dopri5_finish_cuda);

// ---- CPU kernel ----------------------------------------------------------------------------

// finish_element: kernel_math.h (shared with the CUDA kernel).

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
      sq[j] = finish_element<T>(y0, sol, est, h, rtol, atol, y1, err, b0 + j);
    for (int64_t j = 0; j < m; ++j) acc += static_cast<double>(sq[j]);
  }
  return acc;
}

void dopri5_finish_cpu(const at::Tensor& y0, const std::vector<at::Tensor>& k, double h,
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

// ---- the op: checks, then the device's kernel ------------------------------------------------

template <Kernel kernel>
void dopri5_finish_op(const at::Tensor& y0, at::TensorList stages, double h, double rtol,
                      double atol, const at::Tensor& y1, const at::Tensor& err,
                      const at::Tensor& err_norm) {
  const char* op = "dopri5_finish";
  detail::check_state(op, "y0", y0);
  auto k = detail::checked_stages(op, stages, dopri5::kStages, dopri5::kStages, y0);
  detail::check_like(op, "y1", y1, "y0", y0);
  detail::check_like(op, "err", err, "y0", y0);
  detail::check_finite_scalar(op, "h", h);
  TORCH_CHECK(rtol >= 0 && atol >= 0 && rtol + atol > 0 && std::isfinite(rtol) &&
                  std::isfinite(atol), cat("amaml_ext.dopri5_finish: arguments 'rtol' and 'atol' must be finite, >= 0 and not ",
              "both 0, got rtol=", rtol, ", atol=", atol));
  TORCH_CHECK(err_norm.defined() && err_norm.device() == y0.device() &&
                  err_norm.scalar_type() == y0.scalar_type(), cat("amaml_ext.dopri5_finish: argument 'err_norm' must be a ", y0.scalar_type(),
              " tensor on ", y0.device()));
  const bool norm_ok = y0.dim() == 1 ? err_norm.numel() == 1 && err_norm.dim() <= 1
                                     : err_norm.dim() == 1 && err_norm.size(0) == y0.size(0);
  TORCH_CHECK(norm_ok, cat("amaml_ext.dopri5_finish: argument 'err_norm' must have shape ",
              y0.dim() == 1 ? "[] (one task)" : "[B] = [" + std::to_string(y0.size(0)) + "]",
              ", got ", detail::shape_str(err_norm)));
  detail::check_output(op, "y1", y1, {{"y0", y0}}, stages, {{"err", err}, {"err_norm", err_norm}});
  detail::check_output(op, "err", err, {{"y0", y0}}, stages, {{"err_norm", err_norm}});
  // err_norm is a reduction over each row: it may not be (part of) an input either
  detail::check_output(op, "err_norm", err_norm, {{"y0", y0}}, stages, {}, false);
  const at::Tensor y0c = y0.contiguous();
  detail::with_contiguous_out(y1, [&](at::Tensor& y1o) {
    detail::with_contiguous_out(err, [&](at::Tensor& erro) {
      detail::with_contiguous_out(err_norm, [&](at::Tensor& no) {
        kernel(y0c, k, h, rtol, atol, y1o, erro, no);
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(amaml_ext, m) {
  m.def(
      "dopri5_finish(Tensor y0, Tensor[] stages, float h, float rtol, float atol, "
      "Tensor(a!) y1, Tensor(b!) err, Tensor(c!) err_norm) -> ()");
}

TORCH_LIBRARY_IMPL(amaml_ext, CPU, m) { m.impl("dopri5_finish", &dopri5_finish_op<dopri5_finish_cpu>); }

#ifdef AMAML_WITH_CUDA
TORCH_LIBRARY_IMPL(amaml_ext, CUDA, m) { m.impl("dopri5_finish", &dopri5_finish_op<dopri5_finish_cuda>); }
#endif

}  // namespace amaml
