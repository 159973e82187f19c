// The Python module amaml_ext._C: the solver drivers (csrc/solvers/), the tableaus they use, and
// what the extension was built with. The fused ops are registered separately, as
// torch.ops.amaml_ext.* (ops/<op>.cpp, ops/<op>_cuda.cu).
#include <torch/extension.h>
#include <torch/version.h>

#include <string>
#include <vector>

#include "solvers/solvers.h"
#include "solvers/tableaus.h"
#include "amaml_build_config.h"

namespace py = pybind11;

namespace amaml {
namespace {

template <size_t N>
std::vector<double> list(const double (&a)[N]) {
  return std::vector<double>(a, a + N);
}

// Every tableau of solvers/tableaus.h, for amaml_ext.reference (one copy of the numbers).
py::dict tableaus() {
  std::vector<std::vector<double>> a;
  for (int i = 1; i < dopri5::kStages; ++i) a.emplace_back(dopri5::a_rows[i], dopri5::a_rows[i] + i);
  py::dict dp;
  dp["c"] = list(dopri5::c);
  dp["a"] = a;
  dp["b"] = list(dopri5::b);
  dp["e"] = list(dopri5::e);
  dp["d"] = list(dopri5::d);
  py::dict out;
  out["dopri5"] = dp;
  out["rk4"] = py::dict(py::arg("c") = list(rk4::c), py::arg("b") = list(rk4::b));
  out["heun"] = py::dict(py::arg("c") = list(heun::c), py::arg("b") = list(heun::b));
  out["euler"] = py::dict(py::arg("c") = list(euler::c), py::arg("b") = list(euler::b));
  return out;
}

py::dict build_info() {
  py::dict info;
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." +
                          std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);
#ifdef AMAML_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = std::string(AMAML_CUDA_ARCHS);
  info["cuda_version"] = std::string(AMAML_CUDA_VERSION);
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::string("");
  info["cuda_version"] = std::string("");
#endif
  return info;
}

}  // namespace
}  // namespace amaml

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace s = amaml::solvers;
  m.doc() = "amaml_ext compiled core: fused ODE ops (torch.ops.amaml_ext) and solver drivers";
  m.def("dopri5_forward", &s::dopri5_forward, py::arg("f"), py::arg("y0"), py::arg("shape"),
        py::arg("times"), py::arg("rtol"), py::arg("atol"), py::arg("max_steps"),
        py::arg("h_initial"), py::arg("store") = true, py::arg("checkpoint_cap") = 0);
  m.def("dopri5_replay", &s::dopri5_replay, py::arg("f"), py::arg("y_start"), py::arg("shape"),
        py::arg("step_t"), py::arg("step_h"), py::arg("first"), py::arg("last"),
        py::arg("row_step"), py::arg("row_theta"), py::arg("row_lo"), py::arg("row_hi"));
  m.def("fixed_forward", &s::fixed_forward, py::arg("f"), py::arg("y0"), py::arg("shape"),
        py::arg("times"), py::arg("method"));
  m.def("adjoint_solve", &s::adjoint_solve, py::arg("vjp"), py::arg("trajectory"),
        py::arg("shape"), py::arg("times"), py::arg("lam_T"), py::arg("method"),
        py::arg("coarse") = py::none(), py::arg("row0") = 0, py::arg("node") = py::none());
  m.def("fixed_schemes", &s::fixed_schemes,
        "the step table of fixed_forward: name -> {'span': grid intervals per step (1)}");
  m.def("adjoint_schemes", &s::adjoint_schemes,
        "the step table of adjoint_solve: name -> {'span': grid intervals per step, "
        "'coarse_stride': grid intervals per step of the step-doubling companion (0: none)}");
  m.def("tableaus", &amaml::tableaus, "every Butcher tableau of the solvers (csrc/solvers/tableaus.h)");
  m.def("build_info", &amaml::build_info);
}
