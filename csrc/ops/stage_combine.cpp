// stage_combine: out = y + h * sum_j coeffs[j] * stages[j], 1 to kMaxStages stages, in one pass
// over memory (every stage point and step of the Runge-Kutta solvers). Schema, checks, CPU kernel
// and registration; the CUDA kernel is in stage_combine_cuda.cu.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/op.h"

namespace amaml {

// stage_combine_cuda.cu (CUDA builds): the kernel for contiguous, checked arguments.
void stage_combine_cuda(const at::Tensor& y, const std::vector<at::Tensor>& k,
                        c10::ArrayRef<double> coeffs, double h, at::Tensor& out);

namespace {

using Kernel = decltype(&stage_combine_cuda);

// ---- CPU kernel ----------------------------------------------------------------------------

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

void stage_combine_cpu(const at::Tensor& y, const std::vector<at::Tensor>& k,
                       c10::ArrayRef<double> coeffs, double h, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "amaml_stage_combine_cpu", [&] {
    const auto st = detail::make_refs<scalar_t>(k, coeffs.data(), k.size());
    combine_dispatch<scalar_t>(y.data_ptr<scalar_t>(), st, static_cast<scalar_t>(h),
                               out.data_ptr<scalar_t>(), y.numel());
  });
}

// ---- the op: checks, then the device's kernel ------------------------------------------------

template <Kernel kernel>
void stage_combine_op(const at::Tensor& y, at::TensorList stages, c10::ArrayRef<double> coeffs,
                      double h, const at::Tensor& out) {
  const char* op = "stage_combine";
  detail::check_state(op, "y", y);
  detail::check_like(op, "out", out, "y", y);
  auto k = detail::checked_stages(op, stages, 1, kMaxStages, y);
  TORCH_CHECK(coeffs.size() == k.size(), cat("amaml_ext.stage_combine: argument 'coeffs' must have ",
              "one entry per stage (", k.size(), "), got ", coeffs.size()));
  detail::check_finite_scalar(op, "h", h);
  for (double c : coeffs) detail::check_finite_scalar(op, "coeffs", c);
  detail::check_output(op, "out", out, {{"y", y}}, stages, {});
  const at::Tensor yc = y.contiguous();
  detail::with_contiguous_out(out, [&](at::Tensor& o) { kernel(yc, k, coeffs, h, o); });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(amaml_ext, m) {
  m.def("stage_combine(Tensor y, Tensor[] stages, float[] coeffs, float h, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(amaml_ext, CPU, m) { m.impl("stage_combine", &stage_combine_op<stage_combine_cpu>); }

#ifdef AMAML_WITH_CUDA
TORCH_LIBRARY_IMPL(amaml_ext, CUDA, m) { m.impl("stage_combine", &stage_combine_op<stage_combine_cuda>); }
#endif

}  // namespace amaml
