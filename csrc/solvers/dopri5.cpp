// Adaptive Dormand-Prince 5(4) with Hairer's initial step selection and PI step-size control
// (Hairer, Norsett & Wanner, "Solving ODEs I", II.4 and the code DOPRI5), dense output of every
// grid time straight into the trajectory, and the replay of logged steps (memory="checkpoint").
//
// One step size is shared by the B tasks of a [B, d] state; a step is accepted when every
// task's error norm is <= 1. One host synchronisation per step (reading the error ratio).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "solvers/common.h"
#include "solvers/solvers.h"

namespace amaml {
namespace solvers {
namespace {

namespace dp = dopri5;
using dispatch::dopri5_dense;
using dispatch::dopri5_finish;
using dispatch::stage_combine;

// The state and stages of a DOPRI5 solve, and its step: shared by the forward solve and the
// replay, so that both do the same arithmetic and the replayed rows are bit-identical.
struct Dopri5State {
  explicit Dopri5State(const at::Tensor& y0)
      : y(y0.clone()), y_new(at::empty_like(y0)), y_stage(at::empty_like(y0)), k(dp::kStages) {}

  // Stages k2..k7 of a step of size h from (t, y), k1 = f(t, y) in k[0]. The 7th stage point
  // is the 5th-order solution (FSAL), formed in y_new; dopri5_finish re-forms it
  // bit-identically from the same five stages (k2 has weight 0) in the same order.
  void stages(Callback& f, double t, double h) {
    for (int s = 1; s < 6; ++s) {
      stage_combine(y, at::TensorList(k.data(), s), at::ArrayRef<double>(dp::a_rows[s], s), h, y_stage);
      k[s] = f(t + dp::c[s] * h, y, y_stage);
    }
    stage_combine(y, {k[0], k[2], k[3], k[4], k[5]}, at::ArrayRef<double>(dp::b_nz, dp::kSolStages), h, y_new);
    k[6] = f(t + h, y, y_new);
  }

  // Hairer's continuous extension of the step at each theta, into rows first.. of `out`.
  void dense(double h, const std::vector<double>& thetas, int64_t first, const at::Tensor& out) {
    if (!thetas.empty()) dopri5_dense(y, y_new, k, h, thetas, first, out);
  }

  // The step is accepted: y_new becomes y and k7 the next step's k1 (FSAL).
  void advance() {
    std::swap(y, y_new);
    k[0] = k[6];
  }

  at::Tensor y, y_new, y_stage;
  std::vector<at::Tensor> k;
};

// Weighted RMS norm per task (Hairer's ||.||), used only by the initial step selection.
at::Tensor rms(const at::Tensor& x, const at::Tensor& scale) {
  return (x / scale).square().mean(-1).sqrt();
}

double max_over_tasks(const at::Tensor& per_task) { return per_task.max().item<double>(); }

// Hairer's initial step (code DOPRI5, hinit; "Solving ODEs I", II.4): from the sizes of y0,
// f0 = f(t0, y0) and of f after an explicit Euler step of size h0, the step whose local error
// of order 5 would be about 0.01. `point` is scratch.
double initial_step(Callback& f, double t0, const at::Tensor& y0, const at::Tensor& f0, double rtol,
                    double atol, double span, const at::Tensor& point) {
  const at::Tensor scale = atol + rtol * y0.abs();
  const at::Tensor d0 = rms(y0, scale), d1 = rms(f0, scale);
  const at::Tensor h0v = at::where(at::logical_or(d0 < 1e-5, d1 < 1e-5), at::full_like(d0, 1e-6),
                                   0.01 * d0 / d1);
  const double h0 = std::min(h0v.min().item<double>(), span);
  stage_combine(y0, {f0}, euler::b, h0, point);
  const at::Tensor f1 = f(t0 + h0, y0, point);
  const double d2 = max_over_tasks(rms(f1 - f0, scale)) / h0;
  const double dm = std::max(max_over_tasks(d1), d2);
  const double h1 = (dm <= 1e-15 || !std::isfinite(dm)) ? std::max(1e-6, h0 * 1e-3)
                                                         : std::pow(0.01 / dm, 1.0 / 5.0);
  return std::min(100.0 * h0, h1);
}

// The error ratio of a step: the largest per-task RMS norm of err / (atol + rtol max(|y0|, |y1|))
// that dopri5_finish computed; the step is accepted when it is <= 1. The one host
// synchronisation of a step.
double error_ratio(const at::Tensor& err_norm) { return max_over_tasks(err_norm); }

// Hairer's PI step-size controller of DOPRI5 (beta = 0.04 stabilises it; "Solving ODEs I",
// II.4 and IV.2): the next step size from the error ratio e of the step just tried.
class StepSizeControl {
 public:
  double after_accept(double h, double e) {
    const double fac = std::max(1.0 / kFacMax, std::min(1.0 / kFacMin, fac11(e) / std::pow(fac_old_, kBeta) / kSafe));
    double h_new = h / fac;
    fac_old_ = std::max(e, 1e-4);
    if (rejected_last_) h_new = std::min(h_new, h);  // no growth right after a rejection
    rejected_last_ = false;
    return h_new;
  }

  double after_reject(double h, double e) {
    rejected_last_ = true;
    return h / std::min(1.0 / kFacMin, fac11(e) / kSafe);
  }

 private:
  static constexpr double kSafe = 0.9, kFacMin = 0.2, kFacMax = 10.0, kBeta = 0.04;
  static double fac11(double e) { return std::pow(std::max(e, 1e-300), 0.2 - kBeta * 0.75); }

  double fac_old_ = 1e-4;
  bool rejected_last_ = false;
};

// What dopri5_replay needs to recompute grid rows without a stored trajectory: the start time
// and size of every accepted step, which step wrote each grid row at which theta, and the state
// at the start of every `every`-th step. `every` starts at 1 and doubles (dropping every other
// checkpoint) whenever more than `cap` are held, so at most `cap` states are kept whatever the
// number of steps.
struct StepLog {
  StepLog(int64_t n, int64_t cap) : row_step(n + 1, -1), row_theta(n + 1, 0.0), cap(cap) {}

  void checkpoint(int64_t step, const at::Tensor& y) {
    if (cap <= 0 || step % every != 0 || checkpoints.contains(py::int_(step))) return;
    checkpoints[py::int_(step)] = y.clone();
    if (static_cast<int64_t>(py::len(checkpoints)) <= cap) return;
    every *= 2;
    py::dict thinned;
    for (auto item : checkpoints)
      if (item.first.cast<int64_t>() % every == 0) thinned[item.first] = item.second;
    checkpoints = thinned;
  }

  py::dict to_dict(const at::Tensor& final_state) const {
    py::dict log;
    const auto f64 = at::TensorOptions().dtype(at::kDouble);
    log["step_t"] = at::tensor(step_t, f64);
    log["step_h"] = at::tensor(step_h, f64);
    log["row_step"] = at::tensor(row_step, at::TensorOptions().dtype(at::kLong));
    log["row_theta"] = at::tensor(row_theta, f64);
    log["checkpoints"] = checkpoints;
    log["final"] = final_state;
    return log;
  }

  std::vector<double> step_t, step_h;
  std::vector<int64_t> row_step;
  std::vector<double> row_theta;
  py::dict checkpoints;
  int64_t cap, every = 1;
};

// One adaptive solve from times[0] to times[N]: run() takes steps until every grid row is
// written (store) or logged.
class Dopri5Forward {
 public:
  Dopri5Forward(py::function f, const at::Tensor& y0, std::vector<int64_t> shape, const at::Tensor& times,
                double rtol, double atol, bool store, int64_t checkpoint_cap)
      : times_(grid_times(times)),
        n_(times.size(0) - 1),
        rtol_(rtol),
        atol_(atol),
        store_(store),
        st_(y0),
        err_(at::empty_like(y0)),
        err_norm_(at::empty({y0.size(0)}, y0.options())),
        call_(std::move(f), "f", "(t, y)", std::move(shape), {st_.y, st_.y_new, st_.y_stage, err_}),
        log_(n_, checkpoint_cap) {
    if (store_) {
      traj_ = at::empty({n_ + 1, y0.size(0), y0.size(1)}, y0.options());
      traj_[0].copy_(y0);
      call_.add_workspace(traj_);
    }
  }

  py::tuple run(int64_t max_steps, double h_initial) {
    const double T = times_[n_], span = T - times_[0];
    double h = std::min(start(h_initial, span), span);
    const double h_first = h;
    while (next_row_ <= n_) {
      check_budget(max_steps, h, T);
      log_.checkpoint(accepted_, st_.y);
      const bool last = t_ + 1.01 * h >= T;
      if (last) h = T - t_;
      st_.stages(call_, t_, h);
      dopri5_finish(st_.y, st_.k, h, rtol_, atol_, st_.y_new, err_, err_norm_);
      const double e = error_ratio(err_norm_);
      if (!std::isfinite(e)) {
        throw py::value_error(cat("amaml_ext.ode.solve_forward(method='dopri5'): non-finite values in the step from t=",
                                  t_, " with h=", h, " (after ", accepted_,
                                  " accepted steps): f returned non-finite values or the state overflowed"));
      }
      if (e <= 1.0) {
        accept(h, last ? T : t_ + h, last);
        h = std::min(control_.after_accept(h, e), span);
      } else {
        ++rejected_;
        h = control_.after_reject(h, e);
      }
    }
    return py::make_tuple(store_ ? py::object(py::cast(traj_)) : py::object(py::none()),
                          forward_stats(call_.calls(), accepted_, rejected_, h_first), log_.to_dict(st_.y));
  }

 private:
  // k1 at t0, and the first step: h_initial, or Hairer's choice when it is not > 0.
  double start(double h_initial, double span) {
    st_.k[0] = call_(t_, st_.y, st_.y);
    if (!at::isfinite(st_.k[0]).all().item<bool>())
      throw py::value_error(cat("amaml_ext.ode.solve_forward: f(", t_, ", y0) returned non-finite values"));
    if (h_initial > 0.0) return h_initial;
    return initial_step(call_, t_, st_.y, st_.k[0], rtol_, atol_, span, st_.y_stage);
  }

  void check_budget(int64_t max_steps, double h, double T) const {
    if (accepted_ + rejected_ >= max_steps) {
      throw py::value_error(cat("amaml_ext.ode.solve_forward(method='dopri5'): reached max_steps=",
                                max_steps, " at t=", t_, " of T=", T, " (", accepted_, " accepted, ",
                                rejected_, " rejected steps); the problem may be stiff: raise ",
                                "max_steps, loosen rtol/atol, or use method='rk4' with a small h"));
    }
    const double eps = std::numeric_limits<double>::epsilon();
    if (h <= 10.0 * eps * std::max(std::abs(t_), 1.0)) {
      throw py::value_error(cat("amaml_ext.ode.solve_forward(method='dopri5'): step size underflow (h=",
                                h, ") at t=", t_));
    }
  }

  // The accepted step [t, t_new] of size h: log it, write the grid rows it covers by dense
  // output (a row within 1e-12 of its end, or the last row in the last step, gets theta = 1:
  // y1 itself), and move on.
  void accept(double h, double t_new, bool last) {
    ++accepted_;
    const double T = times_[n_];
    thetas_.clear();
    const int64_t first = next_row_;
    for (; next_row_ <= n_; ++next_row_) {
      const double tj = times_[next_row_];
      const bool at_end = std::abs(tj - t_new) <= 1e-12 * std::max(1.0, std::abs(T));
      const bool end_row = at_end || (last && next_row_ == n_);
      if (!(tj <= t_new || end_row)) break;
      const double theta = end_row ? 1.0 : (tj - t_) / h;
      thetas_.push_back(std::min(1.0, std::max(0.0, theta)));
      log_.row_step[next_row_] = accepted_ - 1;
      log_.row_theta[next_row_] = thetas_.back();
    }
    log_.step_t.push_back(t_);
    log_.step_h.push_back(h);
    if (store_) st_.dense(h, thetas_, first, traj_);
    st_.advance();
    t_ = t_new;
  }

  const std::vector<double> times_;
  const int64_t n_;
  const double rtol_, atol_;
  const bool store_;
  Dopri5State st_;
  at::Tensor err_, err_norm_, traj_;
  Callback call_;
  StepLog log_;
  StepSizeControl control_;
  std::vector<double> thetas_;
  double t_ = times_[0];
  int64_t accepted_ = 0, rejected_ = 0, next_row_ = 1;
};

// First grid row written by step `first`: the one after the last row of earlier steps.
int64_t first_row_of(int64_t first, const at::TensorAccessor<int64_t, 1>& row_step, int64_t rows) {
  int64_t row = 1;
  while (row < rows && row_step[row] < first) ++row;
  return row;
}

}  // namespace

py::tuple dopri5_forward(py::function f, const at::Tensor& y0, std::vector<int64_t> shape,
                         const at::Tensor& times, double rtol, double atol, int64_t max_steps,
                         double h_initial, bool store, int64_t checkpoint_cap) {
  Dopri5Forward solve(std::move(f), y0, std::move(shape), times, rtol, atol, store, checkpoint_cap);
  return solve.run(max_steps, h_initial);
}

// `steps` first..last are indices into the forward's log; y_start is the state at the start of
// step `first`; row_step/row_theta are the forward's log.
at::Tensor dopri5_replay(py::function f, const at::Tensor& y_start, std::vector<int64_t> shape,
                         const at::Tensor& step_t, const at::Tensor& step_h, int64_t first,
                         int64_t last, const at::Tensor& row_step, const at::Tensor& row_theta,
                         int64_t row_lo, int64_t row_hi) {
  const auto st = step_t.accessor<double, 1>();
  const auto sh = step_h.accessor<double, 1>();
  const auto rs = row_step.accessor<int64_t, 1>();
  const auto rt = row_theta.accessor<double, 1>();
  const int64_t n_rows = row_step.size(0);
  TORCH_CHECK(0 <= row_lo && row_lo <= row_hi && row_hi < n_rows && 0 <= first && first <= last + 1 &&
                  last < step_t.size(0),
              "amaml_ext: dopri5_replay: inconsistent step or row range");
  at::Tensor rows = at::empty({row_hi - row_lo + 1, y_start.size(0), y_start.size(1)}, y_start.options());
  Dopri5State state(y_start);
  Callback call(std::move(f), "f", "(t, y)", std::move(shape), {rows, state.y, state.y_new, state.y_stage});
  if (row_lo == 0) rows[0].copy_(state.y);  // row 0 is y0 itself (first must then be 0)
  int64_t row = first_row_of(first, rs, n_rows);
  std::vector<double> thetas;
  for (int64_t s = first; s <= last && row <= row_hi; ++s) {
    const double t = st[s], h = sh[s];
    if (s == first) state.k[0] = call(t, state.y, state.y);
    state.stages(call, t, h);
    thetas.clear();
    int64_t out_first = -1;
    for (; row < n_rows && rs[row] == s; ++row) {
      if (row < row_lo || row > row_hi) continue;
      if (out_first < 0) out_first = row - row_lo;
      thetas.push_back(rt[row]);
    }
    state.dense(h, thetas, out_first, rows);
    state.advance();
  }
  TORCH_CHECK(row > row_hi, cat("amaml_ext: dopri5_replay: the steps given do not reach row ", row_hi));
  return rows;
}

}  // namespace solvers
}  // namespace amaml
