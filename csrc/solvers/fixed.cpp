// Fixed-step forward schemes on the grid: each new state is written straight into its
// trajectory row. No host synchronisation in the loop; one finiteness check at the end names
// the first non-finite step.
#include <algorithm>
#include <cmath>

#include "solvers/common.h"
#include "solvers/solvers.h"

namespace amaml {
namespace solvers {
namespace {

using dispatch::stage_combine;

// One step of size h from (t, y) into `next`; `point` is scratch for stage points.
using FixedStep = void (*)(Callback& f, double t, double h, const at::Tensor& y,
                           const at::Tensor& point, const at::Tensor& next);

void euler_step(Callback& f, double t, double h, const at::Tensor& y, const at::Tensor&,
                const at::Tensor& next) {
  stage_combine(y, {f(t, y, y)}, euler::b, h, next);
}

void rk4_step(Callback& f, double t, double h, const at::Tensor& y, const at::Tensor& point,
              const at::Tensor& next) {
  Rk4Step step(y, h, point, next);
  step.push(f(t, y, y));
  for (int i = 1; i < rk4::kStages; ++i) step.push(f(t + rk4::c[i] * h, y, point));
}

struct FixedScheme {
  const char* name;
  FixedStep step;
};

// name -> step. Adding a scheme: a step function here and its entry in
// amaml_ext/ode/schemes.py (order, stability bound).
const FixedScheme kFixedSchemes[] = {
    {"euler", euler_step},
    {"rk4", rk4_step},
};

// Raises if the trajectory holds a non-finite value, naming the first such grid row.
// Checked in blocks of rows (about 256k elements each) so that the temporaries of isfinite (an
// abs copy and boolean masks) stay small: a whole-trajectory isfinite would almost triple the
// peak memory.
void check_trajectory_finite(const at::Tensor& traj, const at::Tensor& times, const char* method) {
  const int64_t per_row = std::max<int64_t>(1, traj.numel() / std::max<int64_t>(1, traj.size(0)));
  const int64_t block = std::max<int64_t>(1, (int64_t{1} << 18) / per_row);
  int64_t row = -1;
  for (int64_t r0 = 0; r0 < traj.size(0) && row < 0; r0 += block) {
    const at::Tensor rows = traj.narrow(0, r0, std::min(block, traj.size(0) - r0));
    if (at::isfinite(rows).all().item<bool>()) continue;
    const at::Tensor bad = at::logical_not(at::isfinite(rows.reshape({rows.size(0), -1}))).any(1);
    row = r0 + bad.nonzero().min().item<int64_t>();
  }
  if (row < 0) return;
  // Global step number on the grid (the times may be a segment starting after 0).
  const double h = times[1].item<double>() - times[0].item<double>();
  const int64_t step = row + static_cast<int64_t>(std::llround(times[0].item<double>() / h));
  throw py::value_error(cat("amaml_ext.ode.solve_forward(method='", method,
                            "'): the solution became non-finite in step ", step, " (from t=",
                            times[row - 1].item<double>(), " to t=", times[row].item<double>(),
                            "); f returned non-finite values or the state overflowed. Reduce h or check f."));
}

}  // namespace

py::dict fixed_schemes() {
  py::dict out;
  for (const auto& s : kFixedSchemes) out[s.name] = py::dict(py::arg("span") = 1);
  return out;
}

py::tuple fixed_forward(py::function f, const at::Tensor& y0, std::vector<int64_t> shape,
                        const at::Tensor& times, const std::string& method) {
  const FixedStep step = find_scheme(kFixedSchemes, method, "solve_forward").step;
  const int64_t n = times.size(0) - 1;
  at::Tensor traj = at::empty({n + 1, y0.size(0), y0.size(1)}, y0.options());
  traj[0].copy_(y0);
  at::Tensor point = at::empty_like(y0);
  Callback call(std::move(f), "f", "(t, y)", std::move(shape), {traj, point});
  const auto tv = times.accessor<double, 1>();
  for (int64_t j = 0; j < n; ++j) step(call, tv[j], tv[j + 1] - tv[j], traj[j], point, traj[j + 1]);
  check_trajectory_finite(traj, times, method.c_str());
  return py::make_tuple(traj, forward_stats(call.calls(), n, 0, n > 0 ? tv[1] - tv[0] : 0.0));
}

}  // namespace solvers
}  // namespace amaml
