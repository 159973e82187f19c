// The solver drivers bound in bindings.cpp (amaml_ext._C). The whole forward and adjoint loops
// run in C++, calling back into Python only for f(t, y) and vjp(t, y, v). Every state buffer,
// the trajectory included, is allocated once before the loop; the per-step arithmetic goes
// through the fused ops (torch.ops.amaml_ext.*), so it runs on the state's device.
//
// States are [B, d] (B tasks); `shape` is the shape the callbacks see; `times` are the float64
// grid times t_0..t_N on the CPU. The callers (amaml_ext.ode) check the arguments.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

namespace amaml {
namespace solvers {

namespace py = pybind11;

// dopri5.cpp: adaptive Dormand-Prince 5(4) onto the grid (store=true: the trajectory
// [N+1, B, d]; store=false: the step log and checkpoints dopri5_replay needs). Returns
// (trajectory or None, counts, log).
py::tuple dopri5_forward(py::function f, const at::Tensor& y0, std::vector<int64_t> shape,
                         const at::Tensor& times, double rtol, double atol, int64_t max_steps,
                         double h_initial, bool store, int64_t checkpoint_cap);

// dopri5.cpp: grid rows row_lo..row_hi of a logged dopri5_forward, recomputed bit for bit by
// replaying its accepted steps first..last from y_start.
at::Tensor dopri5_replay(py::function f, const at::Tensor& y_start, std::vector<int64_t> shape,
                         const at::Tensor& step_t, const at::Tensor& step_h, int64_t first,
                         int64_t last, const at::Tensor& row_step, const at::Tensor& row_theta,
                         int64_t row_lo, int64_t row_hi);

// fixed.cpp: a fixed-step forward scheme on the grid ("rk4", "euler"). Returns
// (trajectory [N+1, B, d], counts).
py::tuple fixed_forward(py::function f, const at::Tensor& y0, std::vector<int64_t> shape,
                        const at::Tensor& times, const std::string& method);

// adjoint.cpp: the adjoint from lam_T at times[N] down to times[0] over the stored states
// `traj` [N+1, B, d] by `method` ("heun", "rk4", "discrete"). Returns (lam(times[0]), counts,
// the step-doubling companion or None).
py::tuple adjoint_solve(py::function vjp, const at::Tensor& traj, std::vector<int64_t> shape,
                        const at::Tensor& times, const at::Tensor& lam_T, const std::string& method,
                        std::optional<at::Tensor> coarse, int64_t row0,
                        std::optional<py::function> node);

// The step tables of fixed.cpp and adjoint.cpp, name -> their columns (amaml_ext.ode.schemes
// holds its registry to them): fixed {"span": 1}, adjoint {"span", "coarse_stride"}.
py::dict fixed_schemes();
py::dict adjoint_schemes();

}  // namespace solvers
}  // namespace amaml
