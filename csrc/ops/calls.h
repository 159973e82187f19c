// The fused ops called through the dispatcher (so CPU or CUDA by the tensors' device), for C++
// callers: the solver drivers and the C++ kernel tests. Typed handles are looked up once, and
// the dispatcher checks each signature here against the op's schema (ops/<op>.cpp) on lookup.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace amaml {
namespace dispatch {

// The typed handle of torch.ops.amaml_ext.<name>; Sig is the C++ signature of its schema.
template <class Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow((std::string("amaml_ext::") + name).c_str(), "")
      .typed<Sig>();
}

inline void stage_combine(const at::Tensor& y, at::TensorList stages, at::ArrayRef<double> coeffs,
                          double h, const at::Tensor& out) {
  static const auto op = find_op<void(const at::Tensor&, at::TensorList, at::ArrayRef<double>, double,
                                      const at::Tensor&)>("stage_combine");
  op.call(y, stages, coeffs, h, out);
}

inline void dopri5_finish(const at::Tensor& y0, at::TensorList stages, double h, double rtol,
                          double atol, const at::Tensor& y1, const at::Tensor& err,
                          const at::Tensor& err_norm) {
  static const auto op = find_op<void(const at::Tensor&, at::TensorList, double, double, double,
                                      const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "dopri5_finish");
  op.call(y0, stages, h, rtol, atol, y1, err, err_norm);
}

inline void dopri5_dense(const at::Tensor& y0, const at::Tensor& y1, at::TensorList stages, double h,
                         at::ArrayRef<double> thetas, int64_t first_row, const at::Tensor& trajectory) {
  static const auto op = find_op<void(const at::Tensor&, const at::Tensor&, at::TensorList, double,
                                      at::ArrayRef<double>, int64_t, const at::Tensor&)>("dopri5_dense");
  op.call(y0, y1, stages, h, thetas, first_row, trajectory);
}

inline void heun_update(const at::Tensor& lam, const at::Tensor& a, const std::optional<at::Tensor>& b,
                        double h, const at::Tensor& out) {
  static const auto op = find_op<void(const at::Tensor&, const at::Tensor&,
                                      const std::optional<at::Tensor>&, double, const at::Tensor&)>(
      "heun_update");
  op.call(lam, a, b, h, out);
}

}  // namespace dispatch
}  // namespace amaml
