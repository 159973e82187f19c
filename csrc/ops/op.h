// What every fused op's host side shares (ops/<op>.cpp): argument checks, contiguity and overlap
// handling, and the grain of the CPU loops.
//
// An op lives in ops/<op>.cpp (its schema, checks, CPU kernel and registration, on both devices)
// and ops/<op>_cuda.cu (its CUDA kernel <op>_cuda, declared in the .cpp and called there with
// checked, contiguous arguments), so the arguments are checked in one place for both devices.
//
// Shapes: a state is [d] (one task) or [B, d] (B tasks); float32 or float64. Every output is
// written in place into a buffer the caller allocated (the solver drivers allocate once).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/ArrayRef.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "format.h"
#include "ops/kernel_math.h"

namespace amaml {

// Elements per task of the CPU kernels' at::parallel_for (at::internal::GRAIN_SIZE). The CPU
// loops are `omp simd` loops over pointers copied into locals, so the compiler vectorises them
// without runtime alias checks (the extension is compiled with -fopenmp, see setup.py).
constexpr int64_t kGrain = 32768;

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

}  // namespace detail
}  // namespace amaml
