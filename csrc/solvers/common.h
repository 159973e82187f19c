// What the solver drivers (dopri5.cpp, fixed.cpp, adjoint.cpp) share: the wrapper of the
// user's callbacks, the grid, the name -> scheme lookup, the counts they return, and the
// classical RK4 and Heun steps taken one stage at a time (so the forward solve, the adjoint and
// its step-doubling companion, whose stages are evaluated at different moments, run the same
// arithmetic).
#pragma once

#include <torch/extension.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "format.h"
#include "ops/calls.h"
#include "solvers/tableaus.h"

namespace amaml {
namespace solvers {

namespace py = pybind11;

// pybind11 compiles its types with hidden visibility; a class holding one must be hidden too.
#if defined(__GNUC__)
#define AMAML_HIDDEN __attribute__((visibility("hidden")))
#else
#define AMAML_HIDDEN
#endif

// Calls a user callback and checks what it returned. `state` is the [B, d] workspace view
// handed to the user in `shape`; the result is returned as a contiguous [B, d] tensor that
// shares no memory with the solver's workspace (`workspace`), so that later in-place writes
// of the solver cannot change it behind the user's back.
class AMAML_HIDDEN Callback {
 public:
  Callback(py::function fn, std::string name, std::string signature, std::vector<int64_t> shape,
           std::vector<at::Tensor> workspace)
      : fn_(std::move(fn)),
        name_(std::move(name)),
        signature_(std::move(signature)),
        shape_(std::move(shape)),
        workspace_(std::move(workspace)) {}

  void add_workspace(const at::Tensor& t) { workspace_.push_back(t); }

  // fn(t, args viewed as `shape`...); `ref` is a state whose shape, dtype and device the
  // result must have.
  template <class... Tensors>
  at::Tensor operator()(double t, const at::Tensor& ref, const Tensors&... args) {
    ++calls_;
    py::object r = fn_(t, args.view(shape_)...);
    if (!THPVariable_Check(r.ptr())) {
      throw py::type_error(cat(name_, signature_, " must return a torch.Tensor, got ",
                               std::string(py::str(py::type::of(r).attr("__name__"))), " (at t=", t, ")"));
    }
    at::Tensor out = r.cast<at::Tensor>();
    const at::Tensor expect = ref.view(shape_);
    if (out.sizes() != expect.sizes() || out.scalar_type() != ref.scalar_type() ||
        out.device() != ref.device()) {
      throw py::value_error(cat(name_, signature_, " must return a tensor of shape ", expect.sizes(),
                                ", dtype ", ref.scalar_type(), " on ", ref.device(),
                                " (like the state); got shape ", out.sizes(), ", dtype ",
                                out.scalar_type(), " on ", out.device(), " at t=", t));
    }
    out = out.detach();
    bool alias = false;
    for (const auto& w : workspace_) alias = alias || out.is_alias_of(w);
    if (alias) {
      out = out.clone(at::MemoryFormat::Contiguous);
    } else {
      out = out.contiguous();  // a copy only when `out` is strided
    }
    return out.view(ref.sizes());
  }

  int64_t calls() const { return calls_; }

 private:
  py::function fn_;
  std::string name_, signature_;
  std::vector<int64_t> shape_;
  std::vector<at::Tensor> workspace_;
  int64_t calls_ = 0;
};

// The grid times (a [N+1] float64 CPU tensor) as a vector.
inline std::vector<double> grid_times(const at::Tensor& times) {
  const auto tv = times.accessor<double, 1>();
  std::vector<double> out(static_cast<size_t>(tv.size(0)));
  for (int64_t j = 0; j < tv.size(0); ++j) out[static_cast<size_t>(j)] = tv[j];
  return out;
}

// The entry of `table` named `method`; `caller` names the Python function in the error.
template <class Scheme, size_t N>
const Scheme& find_scheme(const Scheme (&table)[N], const std::string& method, const char* caller) {
  std::string names;
  for (const auto& s : table) {
    if (method == s.name) return s;
    names += std::string(names.empty() ? "" : ", ") + s.name;
  }
  throw py::value_error(cat("amaml_ext.ode.", caller, ": unknown method '", method, "' (one of ", names, ")"));
}

// The counts a forward solve returns (amaml_ext.ode.SolverStats).
inline py::dict forward_stats(int64_t nfe, int64_t accepted, int64_t rejected, double h_initial) {
  py::dict s;
  s["function_evals"] = nfe;
  s["accepted_steps"] = accepted;
  s["rejected_steps"] = rejected;
  s["initial_step"] = h_initial;
  return s;
}

// One classical RK4 step (tableaus.h, rk4) of size h from x, fed one stage at a time: after
// push(k_i) the next stage point x + h c_{i+1} k_i is in `point`; after the fourth,
// x + h sum_i b_i k_i is in `out` (which may be x itself). The caller evaluates each stage
// where it likes: at t + c_i h (forward), at stored states (adjoint), or later (the adjoint's
// step-doubling companion, whose stages fall between the fine solve's).
class Rk4Step {
 public:
  Rk4Step(at::Tensor x, double h, at::Tensor point, at::Tensor out)
      : x_(std::move(x)), point_(std::move(point)), out_(std::move(out)), h_(h) {}

  void push(const at::Tensor& k) {
    k_[count_++] = k;
    if (count_ < rk4::kStages) {
      dispatch::stage_combine(x_, {k}, {rk4::c[count_]}, h_, point_);
    } else {
      dispatch::stage_combine(x_, k_, rk4::b, h_, out_);
    }
  }

 private:
  at::Tensor x_, point_, out_;
  at::Tensor k_[rk4::kStages];
  double h_;
  int count_ = 0;
};

// One Heun (explicit trapezoidal) step of size h from x, fed one stage at a time like
// Rk4Step: push(a) forms the predictor x + h a in `point`, push(b) the result
// x + h/2 (a + b) in `out` (the heun_update kernel applies heun::b).
class HeunStep {
 public:
  HeunStep(at::Tensor x, double h, at::Tensor point, at::Tensor out)
      : x_(std::move(x)), point_(std::move(point)), out_(std::move(out)), h_(h) {}

  void push(const at::Tensor& k) {
    if (!a_.defined()) {
      a_ = k;
      dispatch::heun_update(x_, a_, std::nullopt, h_, point_);
    } else {
      dispatch::heun_update(x_, a_, k, h_, out_);
    }
  }

 private:
  at::Tensor x_, point_, out_, a_;
  double h_;
};

}  // namespace solvers
}  // namespace amaml
