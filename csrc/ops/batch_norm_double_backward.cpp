// batch_norm_double_backward: the backward of training-mode BatchNorm's backward
// (aten::native_batch_norm_backward with train=True), what aten's batchnorm_double_backward
// returns, fused: per channel five sums in one pass, then one element-wise pass. Schema, checks,
// CPU kernel and registration; the CUDA kernel is in batch_norm_double_backward_cuda.cu.
//
// Forward y = w xh + b, xh = (x - mean) s, s = invstd; the first backward
//   gx = w s (g - mean(g) - xh mean(g xh)),  gw = sum(g xh),  gb = sum(g)   (g = grad_out).
// Given the gradients ggx, ggw, ggb of gx, gw, gb (each may be None: zero), with per-channel sums
// over the M = numel / C elements of a channel, A = mean(g xh), Q = mean(ggx xh),
// K = sum(ggx g) - M mean(g) mean(ggx) - M A Q:
//   grad_weight   = s K
//   grad_grad_out = w s ggx + (ggw - w s Q) xh + ggb - w s mean(ggx)
//   grad_x        = p g + q ggx + (-w s^2 K / M - p A - q Q) xh - p mean(g) - q mean(ggx),
//                   p = ggw s - w s^2 Q,  q = -w s^2 A
// (mean and invstd are functions of x: grad_x includes their derivatives, as aten's does).
// grad_weight does not depend on w; with weight None it is what the weight's gradient would be.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "ops/op.h"

namespace amaml {

// batch_norm_double_backward_cuda.cu (CUDA builds): the kernel for checked, contiguous
// arguments; w, ggx, ggw, ggb may be null (weight 1, zero gradients).
void batch_norm_double_backward_cuda(const at::Tensor& x, const at::Tensor* w, const at::Tensor& mean,
                                     const at::Tensor& invstd, const at::Tensor& gy, const at::Tensor* ggx,
                                     const at::Tensor* ggw, const at::Tensor* ggb, at::Tensor& gx,
                                     at::Tensor& gw, at::Tensor& ggy);

namespace {

using Kernel = decltype(&batch_norm_double_backward_cuda);

// ---- CPU kernel ----------------------------------------------------------------------------

// One channel c of x viewed as [N, C, L] (L: the product of the trailing sizes).
template <typename T>
void bn_dd_channel(int64_t c, int64_t N, int64_t C, int64_t L, const T* x, const T* w, const T* mean,
                   const T* invstd, const T* gy, const T* ggx, const T* ggw, const T* ggb, T* gx, T* gw,
                   T* ggy) {
  using A = at::acc_type<T, false>;  // double for float32
  const A mu = mean[c], s = invstd[c];
  const A wc = w ? static_cast<A>(w[c]) : A(1);
  A sg = 0, sgx = 0, sq = 0, sqx = 0, sqg = 0;  // sums of g, g (x-mu), ggx, ggx (x-mu), ggx g
  for (int64_t n = 0; n < N; ++n) {
    const int64_t o = (n * C + c) * L;
    const T* xp = x + o;
    const T* gp = gy + o;
    A a0 = 0, a1 = 0;
_Pragma("omp simd reduction(+:a0,a1)")
    for (int64_t k = 0; k < L; ++k) {
      const A g = gp[k];
      a0 += g;
      a1 += g * (static_cast<A>(xp[k]) - mu);
    }
    sg += a0;
    sgx += a1;
    if (ggx) {
      const T* qp = ggx + o;
      A b0 = 0, b1 = 0, b2 = 0;
_Pragma("omp simd reduction(+:b0,b1,b2)")
      for (int64_t k = 0; k < L; ++k) {
        const A q = qp[k];
        b0 += q;
        b1 += q * (static_cast<A>(xp[k]) - mu);
        b2 += q * static_cast<A>(gp[k]);
      }
      sq += b0;
      sqx += b1;
      sqg += b2;
    }
  }
  const A M = static_cast<A>(N * L);
  const A gbar = sg / M, qbar = sq / M, Am = s * sgx / M, Qm = s * sqx / M;
  const A K = sqg - M * gbar * qbar - M * Am * Qm;
  const A ggwc = ggw ? static_cast<A>(ggw[c]) : A(0);
  const A ggbc = ggb ? static_cast<A>(ggb[c]) : A(0);
  const A ws = wc * s, ws2 = ws * s;
  const A p = ggwc * s - ws2 * Qm, q = -ws2 * Am;
  // grad_x = p g + q ggx + ax (x - mu) + a0; grad_grad_out = ws ggx + bx (x - mu) + b0
  const T ap = static_cast<T>(p), aq = static_cast<T>(q);
  const T ax = static_cast<T>((-ws2 * K / M - p * Am - q * Qm) * s);
  const T a0 = static_cast<T>(-p * gbar - q * qbar);
  const T bq = static_cast<T>(ws), bx = static_cast<T>((ggwc - ws * Qm) * s);
  const T b0 = static_cast<T>(ggbc - ws * qbar);
  const T mut = static_cast<T>(mu);
  gw[c] = static_cast<T>(s * K);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t o = (n * C + c) * L;
    const T* xp = x + o;
    const T* gp = gy + o;
    T* gxp = gx + o;
    T* ggyp = ggy + o;
    if (ggx) {
      const T* qp = ggx + o;
_Pragma("omp simd")
      for (int64_t k = 0; k < L; ++k) {
        const T xc = xp[k] - mut;
        gxp[k] = ap * gp[k] + aq * qp[k] + ax * xc + a0;
        ggyp[k] = bq * qp[k] + bx * xc + b0;
      }
    } else {
_Pragma("omp simd")
      for (int64_t k = 0; k < L; ++k) {
        const T xc = xp[k] - mut;
        gxp[k] = ap * gp[k] + ax * xc + a0;
        ggyp[k] = bx * xc + b0;
      }
    }
  }
}

void batch_norm_double_backward_cpu(const at::Tensor& x, const at::Tensor* w, const at::Tensor& mean,
                                    const at::Tensor& invstd, const at::Tensor& gy, const at::Tensor* ggx,
                                    const at::Tensor* ggw, const at::Tensor* ggb, at::Tensor& gx,
                                    at::Tensor& gw, at::Tensor& ggy) {
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / (N * C);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "amaml_batch_norm_double_backward_cpu", [&] {
    using T = scalar_t;
    auto ptr = [](const at::Tensor* t) -> const T* { return t ? t->data_ptr<T>() : nullptr; };
    const T *xp = x.data_ptr<T>(), *mp = mean.data_ptr<T>(), *sp = invstd.data_ptr<T>();
    const T *gp = gy.data_ptr<T>(), *wp = ptr(w), *qp = ptr(ggx), *gwp = ptr(ggw), *gbp = ptr(ggb);
    T *gxp = gx.data_ptr<T>(), *gwo = gw.data_ptr<T>(), *ggyp = ggy.data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, N * L));
    at::parallel_for(0, C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c)
        bn_dd_channel<T>(c, N, C, L, xp, wp, mp, sp, gp, qp, gwp, gbp, gxp, gwo, ggyp);
    });
  });
}

// ---- the op: checks, then the device's kernel ------------------------------------------------

constexpr const char* kOp = "batch_norm_double_backward";

// A per-channel tensor: shape [C], the dtype and device of x.
void check_channel(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), cat("amaml_ext.", kOp, ": argument '", name,
              "' must be on the device of 'x' (", x.device(), "), got ", t.device()));
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), cat("amaml_ext.", kOp, ": argument '", name,
              "' must have the dtype of 'x' (", x.scalar_type(), "), got ", t.scalar_type()));
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), cat("amaml_ext.", kOp, ": argument '", name,
              "' must have shape [C] = [", x.size(1), "] (C: dim 1 of 'x' ",
              detail::shape_str(x), "), got ", detail::shape_str(t)));
}

// The contiguous version of an optional argument, checked by `check`; undefined when None.
template <class Check>
at::Tensor optional_arg(const c10::optional<at::Tensor>& t, Check&& check) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  check(*t);
  return t->contiguous();
}

template <Kernel kernel>
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_double_backward_op(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& grad_out, const c10::optional<at::Tensor>& ggx,
    const c10::optional<at::Tensor>& ggw, const c10::optional<at::Tensor>& ggb) {
  TORCH_CHECK(x.defined() && x.dim() >= 2, cat("amaml_ext.", kOp,
              ": argument 'x' must have shape [N, C, *], got ", x.defined() ? detail::shape_str(x) : "None"));
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, cat("amaml_ext.", kOp,
              ": argument 'x' must be float32 or float64, got ", x.scalar_type()));
  TORCH_CHECK(x.numel() > 0, cat("amaml_ext.", kOp, ": argument 'x' must not be empty, got shape ",
              detail::shape_str(x)));
  detail::check_like(kOp, "grad_out", grad_out, "x", x);
  check_channel("mean", mean, x);
  check_channel("invstd", invstd, x);
  const at::Tensor wc = optional_arg(weight, [&](const at::Tensor& t) { check_channel("weight", t, x); });
  const at::Tensor qc = optional_arg(ggx, [&](const at::Tensor& t) { detail::check_like(kOp, "ggx", t, "x", x); });
  const at::Tensor gwc = optional_arg(ggw, [&](const at::Tensor& t) { check_channel("ggw", t, x); });
  const at::Tensor gbc = optional_arg(ggb, [&](const at::Tensor& t) { check_channel("ggb", t, x); });
  const at::Tensor xc = x.contiguous(), mc = mean.contiguous(), sc = invstd.contiguous();
  const at::Tensor gc = grad_out.contiguous();
  const auto opt = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor gx = at::empty(x.sizes(), opt), gw = at::empty({x.size(1)}, opt);
  at::Tensor ggy = at::empty(x.sizes(), opt);
  auto p = [](const at::Tensor& t) { return t.defined() ? &t : nullptr; };
  kernel(xc, p(wc), mc, sc, gc, p(qc), p(gwc), p(gbc), gx, gw, ggy);
  return {gx, gw, ggy};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(amaml_ext, m) {
  m.def("batch_norm_double_backward(Tensor x, Tensor? weight, Tensor mean, Tensor invstd, "
        "Tensor grad_out, Tensor? ggx, Tensor? ggw, Tensor? ggb) -> "
        "(Tensor grad_x, Tensor grad_weight, Tensor grad_grad_out)");
}

TORCH_LIBRARY_IMPL(amaml_ext, CPU, m) {
  m.impl("batch_norm_double_backward", &batch_norm_double_backward_op<batch_norm_double_backward_cpu>);
}

#ifdef AMAML_WITH_CUDA
TORCH_LIBRARY_IMPL(amaml_ext, CUDA, m) {
  m.impl("batch_norm_double_backward", &batch_norm_double_backward_op<batch_norm_double_backward_cuda>);
}
#endif

}  // namespace amaml
