// Solver drivers: the whole forward and adjoint loops run here, in C++, calling back into
// Python only for f(t, y) and vjp(t, y, v). Every state buffer, the trajectory included, is
// allocated once before the loop; the per-step arithmetic goes through the fused ops
// (torch.ops.amaml_ext.*), so it runs on the state's device.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>
#include <torch/version.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "dopri5_tableau.h"
#include "format.h"
#include "op_calls.h"
#include "ops.h"
#include "amaml_build_config.h"

namespace py = pybind11;

namespace amaml {
namespace {

using dispatch::dopri5_dense;
using dispatch::dopri5_finish;
using dispatch::heun_update;
using dispatch::stage_combine;

// ---- callbacks ---------------------------------------------------------------------------

// Calls a user callback and checks what it returned. `state` is the [B, d] workspace view
// handed to the user in `shape`; the result is returned as a contiguous [B, d] tensor that
// shares no memory with the solver's workspace (`workspace`), so that later in-place writes
// of the solver cannot change it behind the user's back.
class Callback {
 public:
  Callback(py::function fn, std::string name, std::string signature, std::vector<int64_t> shape,
           std::vector<at::Tensor> workspace)
      : fn_(std::move(fn)),
        name_(std::move(name)),
        signature_(std::move(signature)),
        shape_(std::move(shape)),
        workspace_(std::move(workspace)) {}

  void add_workspace(const at::Tensor& t) { workspace_.push_back(t); }

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

double max_over_tasks(const at::Tensor& per_task) { return per_task.max().item<double>(); }

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

// ---- forward solvers -------------------------------------------------------------------

py::dict make_forward_stats(int64_t nfe, int64_t accepted, int64_t rejected, double h_initial) {
  py::dict s;
  s["function_evals"] = nfe;
  s["accepted_steps"] = accepted;
  s["rejected_steps"] = rejected;
  s["initial_step"] = h_initial;
  return s;
}

// Fixed-step forward solve on t_j = times[j]: "euler" or "rk4".
py::tuple fixed_forward(py::function f, const at::Tensor& y0, std::vector<int64_t> shape,
                        const at::Tensor& times, const std::string& method) {
  const int64_t n = times.size(0) - 1;
  at::Tensor traj = at::empty({n + 1, y0.size(0), y0.size(1)}, y0.options());
  traj[0].copy_(y0);
  at::Tensor tmp = at::empty_like(y0);
  Callback call(std::move(f), "f", "(t, y)", std::move(shape), {traj, tmp});
  const auto tv = times.accessor<double, 1>();
  const bool rk4 = method == "rk4";
  for (int64_t j = 0; j < n; ++j) {
    const double t = tv[j], h = tv[j + 1] - tv[j];
    const at::Tensor yj = traj[j];
    const at::Tensor next = traj[j + 1];
    const at::Tensor k1 = call(t, yj, yj);
    if (!rk4) {
      stage_combine(yj, {k1}, {1.0}, h, next);
      continue;
    }
    stage_combine(yj, {k1}, {0.5}, h, tmp);
    const at::Tensor k2 = call(t + 0.5 * h, yj, tmp);
    stage_combine(yj, {k2}, {0.5}, h, tmp);
    const at::Tensor k3 = call(t + 0.5 * h, yj, tmp);
    stage_combine(yj, {k3}, {1.0}, h, tmp);
    const at::Tensor k4 = call(t + h, yj, tmp);
    stage_combine(yj, {k1, k2, k3, k4}, {1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0}, h, next);
  }
  check_trajectory_finite(traj, times, method.c_str());
  return py::make_tuple(traj, make_forward_stats(call.calls(), n, 0, n > 0 ? tv[1] - tv[0] : 0.0));
}

// Weighted RMS norm per task (Hairer's ||.||), used only by the initial step selection.
at::Tensor rms(const at::Tensor& x, const at::Tensor& scale) {
  return (x / scale).square().mean(-1).sqrt();
}

// Adaptive Dormand-Prince 5(4) with Hairer's PI step control and initial step selection
// (Hairer, Norsett & Wanner, "Solving ODEs I", II.4 and the code DOPRI5), dense output of
// every grid time t_j = times[j] straight into the trajectory. One step size is shared by the
// B tasks of a [B, d] state; a step is accepted when every task's error norm is <= 1.
//
// With store=false no trajectory is kept (memory="checkpoint"): the step log (start time and
// size of every accepted step, which step wrote each grid row and at which theta) and the
// state at the start of every `every`-th accepted step are returned instead, so that
// dopri5_replay can recompute any range of grid rows bit for bit. `every` starts at 1 and
// doubles (dropping every other checkpoint) whenever more than checkpoint_cap are held, so
// at most checkpoint_cap states are kept whatever the number of steps.
py::tuple dopri5_forward(py::function f, const at::Tensor& y0, std::vector<int64_t> shape,
                         const at::Tensor& times, double rtol, double atol, int64_t max_steps,
                         double h_initial, bool store, int64_t checkpoint_cap) {
  namespace dp = dopri5;
  const int64_t n = times.size(0) - 1;
  const auto tv = times.accessor<double, 1>();
  const double t0 = tv[0], T = tv[n], span = T - t0;
  at::Tensor traj;
  if (store) {
    traj = at::empty({n + 1, y0.size(0), y0.size(1)}, y0.options());
    traj[0].copy_(y0);
  }
  std::vector<double> step_t, step_h, row_theta(n + 1, 0.0);
  std::vector<int64_t> row_step(n + 1, -1);
  py::dict checkpoints;
  int64_t every = 1;
  at::Tensor y = y0.clone();
  at::Tensor y_new = at::empty_like(y0);
  at::Tensor y_stage = at::empty_like(y0);
  at::Tensor err = at::empty_like(y0);
  at::Tensor err_norm = at::empty({y0.size(0)}, y0.options());
  Callback call(std::move(f), "f", "(t, y)", std::move(shape), {y, y_new, y_stage, err});
  if (store) call.add_workspace(traj);

  std::vector<at::Tensor> k(dp::kStages);
  k[0] = call(t0, y, y);
  if (!at::isfinite(k[0]).all().item<bool>())
    throw py::value_error(cat("amaml_ext.ode.solve_forward: f(", t0, ", y0) returned non-finite values"));

  double h = h_initial;
  if (!(h > 0.0)) {  // Hairer's hinit
    const at::Tensor scale = atol + rtol * y0.abs();
    const at::Tensor d0 = rms(y0, scale), d1 = rms(k[0], scale);
    const at::Tensor h0v = at::where(at::logical_or(d0 < 1e-5, d1 < 1e-5), at::full_like(d0, 1e-6),
                                     0.01 * d0 / d1);
    double h0 = std::min(h0v.min().item<double>(), span);
    stage_combine(y, {k[0]}, {1.0}, h0, y_stage);
    const at::Tensor f1 = call(t0 + h0, y, y_stage);
    const double d2 = max_over_tasks(rms(f1 - k[0], scale)) / h0;
    const double dm = std::max(max_over_tasks(d1), d2);
    const double h1 = (dm <= 1e-15 || !std::isfinite(dm)) ? std::max(1e-6, h0 * 1e-3)
                                                           : std::pow(0.01 / dm, 1.0 / 5.0);
    h = std::min(100.0 * h0, h1);
  }
  h = std::min(h, span);
  const double h_first = h;

  // Hairer's step-size controller constants.
  const double safe = 0.9, fac_min = 0.2, fac_max = 10.0, beta = 0.04;
  const double expo1 = 0.2 - beta * 0.75;
  double fac_old = 1e-4;
  bool rejected_last = false;
  int64_t accepted = 0, rejected = 0, next_row = 1;
  double t = t0;
  const double eps = std::numeric_limits<double>::epsilon();
  std::vector<double> thetas;

  const double* a_rows[5] = {dp::a2, dp::a3, dp::a4, dp::a5, dp::a6};
  while (next_row <= n) {
    if (accepted + rejected >= max_steps) {
      throw py::value_error(cat("amaml_ext.ode.solve_forward(method='dopri5'): reached max_steps=",
                                max_steps, " at t=", t, " of T=", T, " (", accepted, " accepted, ",
                                rejected, " rejected steps); the problem may be stiff: raise ",
                                "max_steps, loosen rtol/atol, or use method='rk4' with a small h"));
    }
    if (h <= 10.0 * eps * std::max(std::abs(t), 1.0)) {
      throw py::value_error(cat("amaml_ext.ode.solve_forward(method='dopri5'): step size underflow (h=",
                                h, ") at t=", t));
    }
    if (checkpoint_cap > 0 && accepted % every == 0 && !checkpoints.contains(py::int_(accepted))) {
      checkpoints[py::int_(accepted)] = y.clone();
      if (static_cast<int64_t>(py::len(checkpoints)) > checkpoint_cap) {
        every *= 2;
        py::dict thinned;
        for (auto item : checkpoints)
          if (item.first.cast<int64_t>() % every == 0) thinned[item.first] = item.second;
        checkpoints = thinned;
      }
    }
    bool last = false;
    if (t + 1.01 * h >= T) {
      h = T - t;
      last = true;
    }
    for (int s = 1; s < 6; ++s) {
      stage_combine(y, at::TensorList(k.data(), s), at::ArrayRef<double>(a_rows[s - 1], s), h, y_stage);
      k[s] = call(t + dp::c[s] * h, y, y_stage);
    }
    // 7th stage point = 5th-order solution (FSAL); finish re-forms it bit-identically from
    // the same five stages (k2 has weight 0) in the same order.
    stage_combine(y, {k[0], k[2], k[3], k[4], k[5]}, at::ArrayRef<double>(dp::b_nz, dp::kSolStages), h, y_new);
    k[6] = call(t + h, y, y_new);
    dopri5_finish(y, k, h, rtol, atol, y_new, err, err_norm);
    const double e = max_over_tasks(err_norm);
    if (!std::isfinite(e)) {
      throw py::value_error(cat("amaml_ext.ode.solve_forward(method='dopri5'): non-finite values in the step from t=",
                                t, " with h=", h, " (after ", accepted,
                                " accepted steps): f returned non-finite values or the state overflowed"));
    }
    const double fac11 = std::pow(std::max(e, 1e-300), expo1);
    if (e <= 1.0) {
      ++accepted;
      const double t_new = last ? T : t + h;
      thetas.clear();
      const int64_t first = next_row;
      while (next_row <= n) {
        const double tj = tv[next_row];
        const bool at_end = std::abs(tj - t_new) <= 1e-12 * std::max(1.0, std::abs(T));
        if (!(tj <= t_new || at_end || (last && next_row == n))) break;
        double theta = (at_end || (last && next_row == n)) ? 1.0 : (tj - t) / h;
        thetas.push_back(std::min(1.0, std::max(0.0, theta)));
        row_step[next_row] = accepted - 1;
        row_theta[next_row] = thetas.back();
        ++next_row;
      }
      step_t.push_back(t);
      step_h.push_back(h);
      if (store && !thetas.empty()) dopri5_dense(y, y_new, k, h, thetas, first, traj);
      std::swap(y, y_new);
      k[0] = k[6];
      t = t_new;
      double fac = std::max(1.0 / fac_max, std::min(1.0 / fac_min, fac11 / std::pow(fac_old, beta) / safe));
      double h_new = h / fac;
      fac_old = std::max(e, 1e-4);
      if (rejected_last) h_new = std::min(h_new, h);
      rejected_last = false;
      h = std::min(h_new, span);
    } else {
      ++rejected;
      rejected_last = true;
      h = h / std::min(1.0 / fac_min, fac11 / safe);
    }
  }
  py::dict log;
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  log["step_t"] = at::tensor(step_t, f64);
  log["step_h"] = at::tensor(step_h, f64);
  log["row_step"] = at::tensor(row_step, at::TensorOptions().dtype(at::kLong));
  log["row_theta"] = at::tensor(row_theta, f64);
  log["checkpoints"] = checkpoints;
  log["final"] = y;
  return py::make_tuple(store ? py::object(py::cast(traj)) : py::object(py::none()),
                        make_forward_stats(call.calls(), accepted, rejected, h_first), log);
}

// Re-runs accepted DOPRI5 steps from a checkpoint and returns grid rows row_lo..row_hi.
// `steps` are the accepted-step indices first..last of the log; y_start is the state at the
// start of step `first`; row_step/row_theta are the forward's log. The stage arithmetic, the
// FSAL stage and the dense output are exactly the forward's, so the rows are bit-identical to
// a stored trajectory's.
at::Tensor dopri5_replay(py::function f, const at::Tensor& y_start, std::vector<int64_t> shape,
                         const at::Tensor& step_t, const at::Tensor& step_h, int64_t first,
                         int64_t last, const at::Tensor& row_step, const at::Tensor& row_theta,
                         int64_t row_lo, int64_t row_hi) {
  namespace dp = dopri5;
  const auto st = step_t.accessor<double, 1>();
  const auto sh = step_h.accessor<double, 1>();
  const auto rs = row_step.accessor<int64_t, 1>();
  const auto rt = row_theta.accessor<double, 1>();
  TORCH_CHECK(0 <= row_lo && row_lo <= row_hi && row_hi < row_step.size(0) && 0 <= first &&
                  first <= last + 1 && last < step_t.size(0),
              "amaml_ext: dopri5_replay: inconsistent step or row range");
  at::Tensor rows = at::empty({row_hi - row_lo + 1, y_start.size(0), y_start.size(1)}, y_start.options());
  at::Tensor y = y_start.clone();
  at::Tensor y_new = at::empty_like(y), y_stage = at::empty_like(y);
  Callback call(std::move(f), "f", "(t, y)", std::move(shape), {rows, y, y_new, y_stage});
  if (row_lo == 0) rows[0].copy_(y);  // row 0 is y0 itself (first must then be 0)
  // First row written by step `first`: the one after the last row of earlier steps.
  int64_t row = 1;
  while (row < row_step.size(0) && rs[row] < first) ++row;
  std::vector<at::Tensor> k(dp::kStages);
  const double* a_rows[5] = {dp::a2, dp::a3, dp::a4, dp::a5, dp::a6};
  std::vector<double> thetas;
  for (int64_t s = first; s <= last && row <= row_hi; ++s) {
    const double t = st[s], h = sh[s];
    if (s == first) k[0] = call(t, y, y);
    for (int j = 1; j < 6; ++j) {
      stage_combine(y, at::TensorList(k.data(), j), at::ArrayRef<double>(a_rows[j - 1], j), h, y_stage);
      k[j] = call(t + dp::c[j] * h, y, y_stage);
    }
    stage_combine(y, {k[0], k[2], k[3], k[4], k[5]}, at::ArrayRef<double>(dp::b_nz, dp::kSolStages), h, y_new);
    k[6] = call(t + h, y, y_new);
    thetas.clear();
    int64_t out_first = -1;
    for (; row < row_step.size(0) && rs[row] == s; ++row) {
      if (row < row_lo || row > row_hi) continue;
      if (out_first < 0) out_first = row - row_lo;
      thetas.push_back(rt[row]);
    }
    if (!thetas.empty()) dopri5_dense(y, y_new, k, h, thetas, out_first, rows);
    std::swap(y, y_new);
    k[0] = k[6];
  }
  TORCH_CHECK(row > row_hi, cat("amaml_ext: dopri5_replay: the steps given do not reach row ", row_hi));
  return rows;
}

// ---- adjoint solvers ---------------------------------------------------------------------

py::dict make_adjoint_stats(int64_t vjps, int64_t steps) {
  py::dict s;
  s["vjp_evals"] = vjps;
  s["steps"] = steps;
  return s;
}

void check_lambda_finite(const at::Tensor& lam, double t, int64_t row, const char* method) {
  if (at::isfinite(lam).all().item<bool>()) return;
  throw py::value_error(cat("amaml_ext.ode.solve_adjoint(method='", method,
                            "'): the adjoint became non-finite at grid row ", row, " (t=", t,
                            "); vjp returned non-finite values"));
}

// Backward Heun (the paper's modified Euler): two VJPs per interval.
//   a = vjp(t_{j+1}, y_{j+1}, lam), lt = lam + h a, b = vjp(t_j, y_j, lt),
//   lam <- lam + h/2 (a + b).
// Backward RK4 over pairs of intervals (the midpoint of [t_{j-2}, t_j] is the stored
// t_{j-1}): order 4 for the same two VJPs per interval as Heun. An odd N first takes one
// RK4 step of size h whose midpoint state is the cubic interpolant of y_{N-3..N}.
// Discrete: the exact reverse of forward Euler, lam <- lam + h vjp(t_j, y_j, lam).
//
// Error estimate (`coarse` given, heun and rk4): the same scheme with twice the step runs
// alongside on the same stored states (Heun over 2h between even rows, RK4 over 4h between
// rows divisible by 4, both counted in absolute rows `row0 + j`), so that Richardson's
// |lam_h - lam_2h| / (2^p - 1) estimates the error of lam_h. Its VJPs are made at states
// where the fine solve makes its own, right next to them (the caller's linearisation of that
// state is reused): one extra VJP per interval and no extra linearisation. Where a call's
// first or last rows are not aligned to the coarse grid (odd N, segment or phase boundaries)
// the coarse solution takes the fine solve's increment over those intervals. `coarse` holds
// the coarse adjoint at times[n] on entry and at times[0] on return.
// `node(t_j, lam_j)`, if given, is called whenever lam is final at a fine node (every row for
// heun and discrete, every pair node for rk4), after the VJPs at that node.
py::tuple adjoint_solve(py::function vjp, const at::Tensor& traj, std::vector<int64_t> shape,
                        const at::Tensor& times, const at::Tensor& lam_T,
                        const std::string& method, std::optional<at::Tensor> coarse,
                        int64_t row0, std::optional<py::function> node) {
  const int64_t n = times.size(0) - 1;
  const auto tv = times.accessor<double, 1>();
  at::Tensor lam = lam_T.contiguous().clone();
  at::Tensor tmp = at::empty_like(lam);
  at::Tensor mid = at::empty_like(lam);
  at::Tensor lc, ltc, ac, kc1, kc2, kc3;  // coarse state and its stages
  const bool est = coarse.has_value() && method != "discrete";
  if (est) {
    lc = coarse->contiguous().clone();
    ltc = at::empty_like(lam);
  }
  Callback call(std::move(vjp), "vjp", "(t, y, v)", std::move(shape), {traj, lam, tmp, mid});
  if (est) {
    call.add_workspace(lc);
    call.add_workspace(ltc);
  }
  int64_t steps = 0;
  const char* m = method.c_str();
  auto report = [&](int64_t j) {
    if (node.has_value()) (*node)(tv[j], lam);
  };
  // Coarse rows: absolute rows r = row0 + j with (r - phase) % stride == 0, where phase makes
  // them fine nodes (rk4: the fine pair nodes, whose parity is that of the first one below an
  // odd top step). The coarse solve runs on [lo_c, hi_c], the widest span with coarse ends.
  const int64_t stride = method == "rk4" ? 4 : 2;
  const int64_t top_fine = (method == "rk4" && n % 2 == 1 && n > 1) ? n - 1 : n;
  const int64_t phase = method == "rk4" ? (row0 + top_fine) % 2 : 0;
  auto is_coarse = [&](int64_t j) { return ((row0 + j - phase) % stride + stride) % stride == 0; };
  int64_t hi_c = top_fine, lo_c = 0;
  while (hi_c > 0 && !is_coarse(hi_c)) --hi_c;
  while (lo_c < n && !is_coarse(lo_c)) ++lo_c;
  const bool coarse_ok = est && hi_c - lo_c >= stride;
  auto sync = [&](const at::Tensor& before) { lc.add_(lam).sub_(before); };  // the fine increment

  auto heun_interval = [&](int64_t j) {  // lam_{j+1} -> lam_j
    const double h = tv[j + 1] - tv[j];
    const at::Tensor a = call(tv[j + 1], lam, traj[j + 1], lam);
    heun_update(lam, a, std::nullopt, h, tmp);
    const at::Tensor b = call(tv[j], lam, traj[j], tmp);
    heun_update(lam, a, b, h, lam);
    ++steps;
  };
  // One classical RK4 step of the adjoint from t_hi down to t_lo, midpoint state y_mid.
  auto rk4_step = [&](double t_hi, const at::Tensor& y_hi, double t_mid, const at::Tensor& y_mid,
                      double t_lo, const at::Tensor& y_lo) {
    const double H = t_hi - t_lo;
    const at::Tensor k1 = call(t_hi, lam, y_hi, lam);
    stage_combine(lam, {k1}, {0.5}, H, tmp);
    const at::Tensor k2 = call(t_mid, lam, y_mid, tmp);
    stage_combine(lam, {k2}, {0.5}, H, tmp);
    const at::Tensor k3 = call(t_mid, lam, y_mid, tmp);
    stage_combine(lam, {k3}, {1.0}, H, tmp);
    const at::Tensor k4 = call(t_lo, lam, y_lo, tmp);
    stage_combine(lam, {k1, k2, k3, k4}, {1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0}, H, lam);
    ++steps;
  };

  if (method == "discrete") {
    for (int64_t j = n - 1; j >= 0; --j) {
      const at::Tensor a = call(tv[j], lam, traj[j], lam);
      heun_update(lam, a, std::nullopt, tv[j + 1] - tv[j], lam);
      ++steps;
      report(j);
    }
  } else if (method == "heun") {
    // Coarse Heun step hi -> lo (rows lo = hi - 2): a_c at y_hi is taken when the fine solve is
    // at hi, b_c at y_lo when it reaches lo.
    auto coarse_start = [&](int64_t hi) {
      ac = call(tv[hi], lam, traj[hi], lc);
      heun_update(lc, ac, std::nullopt, tv[hi] - tv[hi - 2], ltc);
    };
    auto coarse_finish = [&](int64_t lo) {
      const at::Tensor bc = call(tv[lo], lam, traj[lo], ltc);
      heun_update(lc, ac, bc, tv[lo + 2] - tv[lo], lc);
    };
    for (int64_t j = n - 1; j >= 0; --j) {
      const int64_t top = j + 1;
      const bool in_coarse = coarse_ok && top <= hi_c && j >= lo_c;
      if (coarse_ok && top == hi_c) coarse_start(hi_c);
      const at::Tensor before = (est && !in_coarse) ? lam.clone() : at::Tensor();
      heun_interval(j);
      if (est && !in_coarse) sync(before);
      if (in_coarse && ((hi_c - j) % 2 == 0)) {
        coarse_finish(j);
        if (j - 2 >= lo_c) coarse_start(j);
      }
      report(j);
    }
  } else if (method == "rk4") {
    // Coarse RK4 step over 4 intervals hi -> hi - 4, midpoint hi - 2: k1 at hi, k2 and k3 at
    // hi - 2, k4 at hi - 4, each taken when the fine solve is at that row.
    auto c_k1 = [&](int64_t hi) {
      kc1 = call(tv[hi], lam, traj[hi], lc);
      stage_combine(lc, {kc1}, {0.5}, tv[hi] - tv[hi - 4], ltc);
    };
    auto c_k23 = [&](int64_t hi) {
      const double H = tv[hi] - tv[hi - 4];
      kc2 = call(tv[hi - 2], lam, traj[hi - 2], ltc);
      stage_combine(lc, {kc2}, {0.5}, H, ltc);
      kc3 = call(tv[hi - 2], lam, traj[hi - 2], ltc);
      stage_combine(lc, {kc3}, {1.0}, H, ltc);
    };
    auto c_k4 = [&](int64_t hi) {
      const double H = tv[hi] - tv[hi - 4];
      const at::Tensor kc4 = call(tv[hi - 4], lam, traj[hi - 4], ltc);
      stage_combine(lc, {kc1, kc2, kc3, kc4}, {1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0}, H, lc);
    };
    // the fine steps as (hi, lo) pairs of rows, top first, exactly as without the estimate
    std::vector<std::pair<int64_t, int64_t>> fine;
    int64_t j = n;
    if (n == 1) {
      fine.push_back({1, 0});
      j = 0;
    } else if (n % 2 == 1) {
      fine.push_back({n, n - 1});
      j = n - 1;
    }
    for (; j >= 2; j -= 2) fine.push_back({j, j - 2});
    int64_t c_hi = -1;  // top row of the coarse step in progress
    for (const auto& [hi, lo] : fine) {
      const bool in_coarse = coarse_ok && hi <= hi_c && lo >= lo_c && hi - lo == 2;
      if (in_coarse && (hi_c - hi) % 4 == 0) {
        c_hi = hi;
        c_k1(hi);
      }
      const at::Tensor before = (est && !in_coarse) ? lam.clone() : at::Tensor();
      if (n == 1) {
        heun_interval(0);
      } else if (hi - lo == 1) {
        // Lagrange weights of nodes -2, -1, 0, 1 (in units of h from t_{N-1}) at +1/2, written as
        // y_{N-1} + sum w_i y_i so that stage_combine forms it in one pass.
        stage_combine(traj[n - 1], {traj[n - 3], traj[n - 2], traj[n - 1], traj[n]},
                      {0.0625, -0.3125, -0.0625, 0.3125}, 1.0, mid);
        rk4_step(tv[n], traj[n], 0.5 * (tv[n - 1] + tv[n]), mid, tv[n - 1], traj[n - 1]);
      } else {
        rk4_step(tv[hi], traj[hi], tv[hi - 1], traj[hi - 1], tv[lo], traj[lo]);
      }
      if (est && !in_coarse) sync(before);
      if (in_coarse && c_hi == hi) c_k23(c_hi);
      if (in_coarse && c_hi - lo == 4) c_k4(c_hi);
      report(lo);
    }
  } else {
    throw py::value_error("amaml_ext.ode.solve_adjoint: unknown method '" + method + "'");
  }
  check_lambda_finite(lam, tv[0], 0, m);
  return py::make_tuple(lam, make_adjoint_stats(call.calls(), steps),
                        est ? py::object(py::cast(lc)) : py::object(py::none()));
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
  m.doc() = "amaml_ext compiled core: fused ODE ops (torch.ops.amaml_ext) and solver drivers";
  m.def("dopri5_forward", &amaml::dopri5_forward, py::arg("f"), py::arg("y0"), py::arg("shape"),
        py::arg("times"), py::arg("rtol"), py::arg("atol"), py::arg("max_steps"),
        py::arg("h_initial"), py::arg("store") = true, py::arg("checkpoint_cap") = 0);
  m.def("dopri5_replay", &amaml::dopri5_replay, py::arg("f"), py::arg("y_start"), py::arg("shape"),
        py::arg("step_t"), py::arg("step_h"), py::arg("first"), py::arg("last"),
        py::arg("row_step"), py::arg("row_theta"), py::arg("row_lo"), py::arg("row_hi"));
  m.def("fixed_forward", &amaml::fixed_forward, py::arg("f"), py::arg("y0"), py::arg("shape"),
        py::arg("times"), py::arg("method"));
  m.def("adjoint_solve", &amaml::adjoint_solve, py::arg("vjp"), py::arg("trajectory"),
        py::arg("shape"), py::arg("times"), py::arg("lam_T"), py::arg("method"),
        py::arg("coarse") = py::none(), py::arg("row0") = 0, py::arg("node") = py::none());
  m.def("build_info", &amaml::build_info);

}
