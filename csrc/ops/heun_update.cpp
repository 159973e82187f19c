// heun_update: the Heun adjoint update, out = lam + h/2 (a + b) when b is given (corrector), else
// out = lam + h a (predictor, and the discrete adjoint step of forward Euler). Schema, checks,
// CPU kernel and registration; the CUDA kernel is in heun_update_cuda.cu.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/op.h"

namespace amaml {

// heun_update_cuda.cu (CUDA builds): the kernel for contiguous, checked arguments; b may be
// null.
void heun_update_cuda(const at::Tensor& lam, const at::Tensor& a, const at::Tensor* b, double h,
                      at::Tensor& out);

namespace {

using Kernel = decltype(&heun_update_cuda);

// ---- CPU kernel ----------------------------------------------------------------------------

void heun_update_cpu(const at::Tensor& lam, const at::Tensor& a, const at::Tensor* b, double h,
                     at::Tensor& out) {
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
        for (int64_t i = begin; i < end; ++i) op[i] = lp[i] + half_h * (ap[i] + bp[i]);
      });
    } else {
      const T ht = static_cast<T>(h);
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
_Pragma("omp simd")
        for (int64_t i = begin; i < end; ++i) op[i] = lp[i] + ht * ap[i];
      });
    }
  });
}

// ---- the op: checks, then the device's kernel ------------------------------------------------

template <Kernel kernel>
void heun_update_op(const at::Tensor& lam, const at::Tensor& a, const c10::optional<at::Tensor>& b,
                    double h, const at::Tensor& out) {
  const char* op = "heun_update";
  detail::check_state(op, "lam", lam);
  detail::check_like(op, "a", a, "lam", lam);
  detail::check_like(op, "out", out, "lam", lam);
  detail::check_finite_scalar(op, "h", h);
  const at::Tensor lc = lam.contiguous();
  const at::Tensor ac = a.contiguous();
  at::Tensor bc;
  if (b.has_value() && b->defined()) {
    detail::check_like(op, "b", *b, "lam", lam);
    bc = b->contiguous();
  }
  detail::check_output(op, "out", out, {{"lam", lam}, {"a", a}, {"b", b.has_value() ? *b : at::Tensor()}}, {}, {});
  detail::with_contiguous_out(out, [&](at::Tensor& o) {
    kernel(lc, ac, bc.defined() ? &bc : nullptr, h, o);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(amaml_ext, m) {
  m.def("heun_update(Tensor lam, Tensor a, Tensor? b, float h, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(amaml_ext, CPU, m) { m.impl("heun_update", &heun_update_op<heun_update_cpu>); }

#ifdef AMAML_WITH_CUDA
TORCH_LIBRARY_IMPL(amaml_ext, CUDA, m) { m.impl("heun_update", &heun_update_op<heun_update_cuda>); }
#endif

}  // namespace amaml
