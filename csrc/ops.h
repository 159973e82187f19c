// The fused ops of amaml_ext: argument checking, contiguity handling and the backend
// interface. The op wrappers here are device-agnostic templates; ops.cpp instantiates them
// with the CPU backend, cuda/kernels_cuda.cu with the CUDA backend.
//
// Shapes: a state is [d] (one task) or [B, d] (B tasks); float32 or float64. Every output is
// written in place into a buffer the caller allocated (the solver drivers allocate once).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/ArrayRef.h>

#include <string>
#include <vector>

#include "format.h"
#include "kernel_math.h"

namespace amaml {

// Contiguous inputs handed to a backend. Outputs given to a backend are always contiguous.
struct Backend;  // documentation only: see CpuBackend / CudaBackend

namespace detail {

inline std::string shape_str(const at::Tensor& t) { return fmt::piece(t.sizes()); }

inline void check_state(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), cat("amaml_ext.", op, ": argument '", name, "' must be a tensor, got None"));
  TORCH_CHECK(t.dim() == 1 || t.dim() == 2, cat("amaml_ext.", op, ": argument '", name,
              "' must have shape [d] or [B, d], got ", shape_str(t)));
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, cat("amaml_ext.", op,
              ": argument '", name, "' must be float32 or float64, got ", t.scalar_type()));
  TORCH_CHECK(t.numel() > 0, cat("amaml_ext.", op, ": argument '", name,
              "' must not be empty, got shape ", shape_str(t)));
}

// `t` must match `ref` (named ref_name) in shape, dtype and device.
inline void check_like(const char* op, const std::string& name, const at::Tensor& t,
                       const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.defined(), cat("amaml_ext.", op, ": argument '", name, "' must be a tensor"));
  TORCH_CHECK(t.device() == ref.device(), cat("amaml_ext.", op, ": argument '", name,
              "' must be on the same device as '", ref_name, "' (", ref.device(), "), got ",
              t.device()));
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), cat("amaml_ext.", op, ": argument '", name,
              "' must have the dtype of '", ref_name, "' (", ref.scalar_type(), "), got ",
              t.scalar_type()));
  TORCH_CHECK(t.sizes() == ref.sizes(), cat("amaml_ext.", op, ": argument '", name,
              "' must have the shape of '", ref_name, "' ", shape_str(ref), ", got ",
              shape_str(t)));
}

inline std::vector<at::Tensor> checked_stages(const char* op, at::TensorList stages,
                                              size_t min_count, size_t max_count,
                                              const at::Tensor& ref) {
  TORCH_CHECK(stages.size() >= min_count && stages.size() <= max_count, cat("amaml_ext.", op,
              ": argument 'stages' must hold between ", min_count, " and ", max_count,
              " tensors, got ", stages.size()));
  std::vector<at::Tensor> out;
  out.reserve(stages.size());
  for (size_t j = 0; j < stages.size(); ++j) {
    check_like(op, "stages[" + std::to_string(j) + "]", stages[j], "y", ref);
    out.push_back(stages[j].contiguous());
  }
  return out;
}

inline void check_finite_scalar(const char* op, const char* name, double v) {
  TORCH_CHECK(std::isfinite(v), cat("amaml_ext.", op, ": argument '", name,
              "' must be finite, got ", v));
}

// Runs fn(o) with a contiguous o and copies back into `out` if `out` was not contiguous.
template <class Fn>
void with_contiguous_out(const at::Tensor& out, Fn&& fn) {
  if (out.is_contiguous()) {
    at::Tensor o = out;
    fn(o);
  } else {
    at::Tensor o = at::empty(out.sizes(), out.options());
    fn(o);
    out.copy_(o);
  }
}

// What an output may share with the other tensors of a call (as torch's own ops: a partial
// overlap is refused). Full overlap with an input is in-place use and allowed where the kernel
// reads every input element before writing that element (all the elementwise ops here);
// `allow_full` false refuses it too (two outputs, or an output the kernel writes in pieces).
inline void check_no_internal_overlap(const char* op, const char* name, const at::Tensor& out) {
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, cat("amaml_ext.", op,
              ": argument '", name, "' has elements that share memory (an expanded or ",
              "stride-0 view, shape ", shape_str(out), "); an output must be writable element by ",
              "element: pass a contiguous tensor"));
}

inline void check_overlap(const char* op, const char* out_name, const at::Tensor& out,
                          const std::string& in_name, const at::Tensor& in, bool allow_full) {
  if (!in.defined()) return;
  const at::MemOverlapStatus s = at::get_overlap_status(out, in);
  // TooHard: a view that is not dense (a stride-2 slice). Against an input it is harmless (that
  // side goes through a contiguous copy); between two outputs both are written, one of them
  // from a temporary copied back afterwards, so any shared storage is refused.
  const bool shared = s == at::MemOverlapStatus::TooHard && !allow_full && out.has_storage() &&
                      in.has_storage() && out.storage().is_alias_of(in.storage());
  const bool partial = s == at::MemOverlapStatus::Partial || shared;
  const bool full = s == at::MemOverlapStatus::Full;
  TORCH_CHECK(!partial && (allow_full || !full), cat("amaml_ext.", op, ": argument '", out_name,
              "' ", shared ? "may share memory with" : partial ? "partially overlaps" : "is the same memory as",
              " argument '", in_name,
              "' (", out_name, " ", shape_str(out), ", ", in_name, " ", shape_str(in), "); ",
              allow_full ? "an output may be an input itself (in place) but not overlap it in part"
                         : "they must not share memory",
              ": pass separate buffers"));
}

// Checks `out` against every input (full overlap allowed: in place) and against the other
// outputs (no sharing at all).
inline void check_output(const char* op, const char* name, const at::Tensor& out,
                         std::initializer_list<std::pair<std::string, at::Tensor>> inputs,
                         at::TensorList stages,
                         std::initializer_list<std::pair<const char*, at::Tensor>> other_outputs,
                         bool allow_in_place = true) {
  check_no_internal_overlap(op, name, out);
  for (const auto& in : inputs) check_overlap(op, name, out, in.first, in.second, allow_in_place);
  for (size_t j = 0; j < stages.size(); ++j) {
    check_overlap(op, name, out, "stages[" + std::to_string(j) + "]", stages[j], allow_in_place);
  }
  for (const auto& o : other_outputs) check_overlap(op, name, out, o.first, o.second, false);
}

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

// Backend kernel entry points take contiguous tensors that have passed the checks.
struct CpuBackend {
  static void stage_combine(const at::Tensor& y, const std::vector<at::Tensor>& k,
                            c10::ArrayRef<double> coeffs, double h, at::Tensor& out);
  static void dopri5_finish(const at::Tensor& y0, const std::vector<at::Tensor>& k, double h,
                            double rtol, double atol, at::Tensor& y1, at::Tensor& err,
                            at::Tensor& err_norm);
  static void dopri5_dense(const at::Tensor& y0, const at::Tensor& y1,
                           const std::vector<at::Tensor>& k, double h,
                           c10::ArrayRef<double> thetas, at::Tensor& rows);
  static void heun_update(const at::Tensor& lam, const at::Tensor& a, const at::Tensor* b,
                          double h, at::Tensor& out);
};

// ---- op wrappers -------------------------------------------------------------------------

// out = y + h * sum_j coeffs[j] * stages[j]
template <class B>
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
  detail::with_contiguous_out(out, [&](at::Tensor& o) { B::stage_combine(yc, k, coeffs, h, o); });
}

// From y0 and the seven DOPRI5 stages of a step of size h: y1 (5th order), err (embedded
// error estimate) and err_norm (per-task RMS of err / (atol + rtol max(|y0|, |y1|)), shape
// [] for a [d] state, [B] for [B, d]), in one pass over memory. stages[1] (k2) is checked but
// not read: its weights are zero.
template <class B>
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
        B::dopri5_finish(y0c, k, h, rtol, atol, y1o, erro, no);
      });
    });
  });
}

// Dense output of one accepted DOPRI5 step [t0, t0 + h]: for each theta_i in (0, 1],
// trajectory[first_row + i] = y(t0 + theta_i h) from Hairer's continuous extension.
template <class B>
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
    B::dopri5_dense(y0c, y1c, k, h, thetas, rows);
  });
}

// Heun adjoint update: out = lam + h/2 (a + b) when b is given (corrector), else
// out = lam + h a (predictor, and the discrete adjoint step of forward Euler).
template <class B>
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
    B::heun_update(lc, ac, bc.defined() ? &bc : nullptr, h, o);
  });
}

}  // namespace amaml
