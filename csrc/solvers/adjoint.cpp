// Adjoint schemes over a stored trajectory, chosen by name from kAdjointSchemes. Each solves
// dlam/dt = -(df/dy)^T lam from times[N] down to times[0] as a forward Runge-Kutta method in
// reversed time, with vjp(t, y, v) = (df/dy)^T v evaluated at stored grid states only:
//
//   heun      backward Heun (the paper's modified Euler), two VJPs per interval:
//             a = vjp(t_{j+1}, y_{j+1}, lam), lt = lam + h a, b = vjp(t_j, y_j, lt),
//             lam <- lam + h/2 (a + b).
//   rk4       backward classical RK4 over pairs of intervals (the midpoint of [t_{j-2}, t_j] is
//             the stored t_{j-1}): order 4 for the same two VJPs per interval as Heun. An odd N
//             first takes one RK4 step of size h whose midpoint state is the cubic interpolant
//             of y_{N-3..N}; N = 1 is one Heun step.
//   discrete  the exact reverse of forward Euler, lam <- lam + h vjp(t_j, y_j, lam).
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
#include <optional>
#include <utility>
#include <vector>

#include "solvers/common.h"
#include "solvers/solvers.h"

namespace amaml {
namespace solvers {
namespace {

using dispatch::heun_update;
using dispatch::stage_combine;

// The step-doubling companion: its adjoint, its stage point, and the rows [lo, hi] it steps
// over (`spans`: at least one of its steps fits there).
struct Coarse {
  at::Tensor lam, point;
  int64_t lo = 0, hi = 0;
  bool spans = false;
};

struct AdjointScheme;

// One adjoint solve: the callback, the grid and its states, lam and its scratch buffers, the
// companion (`est`), and the step count.
struct AdjointRun {
  AdjointRun(py::function vjp, const at::Tensor& states, std::vector<int64_t> shape,
             const at::Tensor& times, const at::Tensor& lam_T, std::optional<py::function> node_fn)
      : traj(states),
        t(grid_times(times)),
        n(times.size(0) - 1),
        lam(lam_T.contiguous().clone()),
        tmp(at::empty_like(lam)),
        mid(at::empty_like(lam)),
        call(std::move(vjp), "vjp", "(t, y, v)", std::move(shape), {traj, lam, tmp, mid}),
        node(std::move(node_fn)) {}

  void start_coarse(const AdjointScheme& scheme, const at::Tensor& lam_coarse, int64_t row0);

  // vjp(t_row, y_row, v)
  at::Tensor vjp(int64_t row, const at::Tensor& v) { return call(t[row], lam, traj[row], v); }

  void report(int64_t row) {
    if (node.has_value()) (*node)(t[row], lam);
  }

  // Whether the fine step hi -> lo lies in the companion's span.
  bool in_coarse(int64_t hi, int64_t lo) const { return coarse.spans && hi <= coarse.hi && lo >= coarse.lo; }

  // Runs one fine step; outside the companion's span the companion takes its increment.
  template <class Step>
  void fine_step(bool inside, Step&& step) {
    const bool follow = est && !inside;
    const at::Tensor before = follow ? lam.clone() : at::Tensor();
    step();
    if (follow) coarse.lam.add_(lam).sub_(before);
  }

  at::Tensor traj;
  std::vector<double> t;
  int64_t n;
  at::Tensor lam, tmp, mid;
  Callback call;
  std::optional<py::function> node;
  bool est = false;
  Coarse coarse;
  int64_t steps = 0;
};

// ---- the schemes ---------------------------------------------------------------------------

// One Heun step over interval j (lam_{j+1} -> lam_j): VJPs at y_{j+1} and y_j.
void heun_interval(AdjointRun& r, int64_t j) {
  HeunStep step(r.lam, r.t[j + 1] - r.t[j], r.tmp, r.lam);
  step.push(r.vjp(j + 1, r.lam));
  step.push(r.vjp(j, r.tmp));
  ++r.steps;
}

void solve_discrete(AdjointRun& r) {
  for (int64_t j = r.n - 1; j >= 0; --j) {
    heun_update(r.lam, r.vjp(j, r.lam), std::nullopt, r.t[j + 1] - r.t[j], r.lam);
    ++r.steps;
    r.report(j);
  }
}

// The companion's Heun step hi -> hi - 2 takes its first VJP (at y_hi) when the fine solve is
// at hi, and its second (at y_{hi-2}) when the fine solve reaches hi - 2.
void solve_heun(AdjointRun& r) {
  Coarse& c = r.coarse;
  std::optional<HeunStep> coarse_step;
  auto coarse_start = [&](int64_t hi) {
    coarse_step.emplace(c.lam, r.t[hi] - r.t[hi - 2], c.point, c.lam);
    coarse_step->push(r.vjp(hi, c.lam));
  };
  for (int64_t j = r.n - 1; j >= 0; --j) {
    const bool inside = r.in_coarse(j + 1, j);
    if (c.spans && j + 1 == c.hi) coarse_start(c.hi);
    r.fine_step(inside, [&] { heun_interval(r, j); });
    if (inside && (c.hi - j) % 2 == 0) {
      coarse_step->push(r.vjp(j, c.point));
      if (j - 2 >= c.lo) coarse_start(j);
    }
    r.report(j);
  }
}

// The fine RK4 steps as (hi, lo) pairs of rows, top first: N = 1 is one interval (a Heun step),
// an odd N starts with one interval, then pairs of intervals.
std::vector<std::pair<int64_t, int64_t>> rk4_steps(int64_t n) {
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
  return fine;
}

// Lagrange weights of nodes -2, -1, 0, 1 (in units of h from t_{N-1}) at +1/2, written as
// y_{N-1} + sum w_i y_i so that stage_combine forms the cubic interpolant in one pass.
constexpr double kCubicMidpoint[4] = {0.0625, -0.3125, -0.0625, 0.3125};

// One classical RK4 step of the adjoint from row hi down to row lo, over the stored midpoint
// (a pair of intervals) or the interpolated one (the odd top interval).
void rk4_pair(AdjointRun& r, int64_t hi, int64_t lo) {
  if (r.n == 1) return heun_interval(r, 0);
  double t_mid = r.t[hi - 1];
  at::Tensor y_mid;
  if (hi - lo == 1) {
    const int64_t n = r.n;
    stage_combine(r.traj[n - 1], {r.traj[n - 3], r.traj[n - 2], r.traj[n - 1], r.traj[n]}, kCubicMidpoint, 1.0, r.mid);
    t_mid = 0.5 * (r.t[n - 1] + r.t[n]);
    y_mid = r.mid;
  } else {
    y_mid = r.traj[hi - 1];
  }
  Rk4Step step(r.lam, r.t[hi] - r.t[lo], r.tmp, r.lam);
  step.push(r.vjp(hi, r.lam));
  step.push(r.call(t_mid, r.lam, y_mid, r.tmp));
  step.push(r.call(t_mid, r.lam, y_mid, r.tmp));
  step.push(r.vjp(lo, r.tmp));
  ++r.steps;
}

// The companion's RK4 step over four intervals hi -> hi - 4 (midpoint hi - 2) takes k1 at hi,
// k2 and k3 at hi - 2, k4 at hi - 4, each when the fine solve is at that row.
void solve_rk4(AdjointRun& r) {
  Coarse& c = r.coarse;
  std::optional<Rk4Step> coarse_step;
  int64_t c_hi = -1;  // top row of the companion's step in progress
  for (const auto& [hi, lo] : rk4_steps(r.n)) {
    const bool inside = r.in_coarse(hi, lo) && hi - lo == 2;
    if (inside && (c.hi - hi) % 4 == 0) {
      c_hi = hi;
      coarse_step.emplace(c.lam, r.t[hi] - r.t[hi - 4], c.point, c.lam);
      coarse_step->push(r.vjp(hi, c.lam));
    }
    r.fine_step(inside, [&, hi = hi, lo = lo] { rk4_pair(r, hi, lo); });
    if (inside && c_hi == hi) {
      coarse_step->push(r.vjp(lo, c.point));
      coarse_step->push(r.vjp(lo, c.point));
    }
    if (inside && c_hi - lo == 4) coarse_step->push(r.vjp(lo, c.point));
    r.report(lo);
  }
}

// ---- name -> scheme --------------------------------------------------------------------------

struct AdjointScheme {
  const char* name;
  int span;           // grid intervals per step (rk4: pairs)
  int coarse_stride;  // grid intervals per step of the step-doubling companion; 0: no estimate
  void (*solve)(AdjointRun&);
};

// Adding a scheme: its solve function above, a row here, and its entry in
// amaml_ext/ode/schemes.py (order, stability bound).
const AdjointScheme kAdjointSchemes[] = {
    {"heun", 1, 2, solve_heun},
    {"rk4", 2, 4, solve_rk4},
    {"discrete", 1, 0, solve_discrete},
};

// The companion's rows are the absolute rows r = row0 + j with (r - phase) % stride == 0,
// where phase makes them fine nodes (rk4: the pair nodes, whose parity is that of the first
// one below an odd top step). It runs on [lo, hi], the widest span with such rows at both ends.
void AdjointRun::start_coarse(const AdjointScheme& scheme, const at::Tensor& lam_coarse, int64_t row0) {
  est = true;
  coarse.lam = lam_coarse.contiguous().clone();
  coarse.point = at::empty_like(lam);
  call.add_workspace(coarse.lam);
  call.add_workspace(coarse.point);
  const int64_t stride = scheme.coarse_stride;
  const int64_t top = n > 1 ? n - n % scheme.span : n;  // the top fine node
  const int64_t phase = (row0 + top) % scheme.span;
  auto on_grid = [&](int64_t j) { return ((row0 + j - phase) % stride + stride) % stride == 0; };
  coarse.hi = top;
  coarse.lo = 0;
  while (coarse.hi > 0 && !on_grid(coarse.hi)) --coarse.hi;
  while (coarse.lo < n && !on_grid(coarse.lo)) ++coarse.lo;
  coarse.spans = coarse.hi - coarse.lo >= stride;
}

py::dict adjoint_stats(int64_t vjps, int64_t steps) {
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

}  // namespace

py::dict adjoint_schemes() {
  py::dict out;
  for (const auto& s : kAdjointSchemes)
    out[s.name] = py::dict(py::arg("span") = s.span, py::arg("coarse_stride") = s.coarse_stride);
  return out;
}

py::tuple adjoint_solve(py::function vjp, const at::Tensor& traj, std::vector<int64_t> shape,
                        const at::Tensor& times, const at::Tensor& lam_T, const std::string& method,
                        std::optional<at::Tensor> coarse, int64_t row0, std::optional<py::function> node) {
  const AdjointScheme& scheme = find_scheme(kAdjointSchemes, method, "solve_adjoint");
  AdjointRun run(std::move(vjp), traj, std::move(shape), times, lam_T, std::move(node));
  if (coarse.has_value() && scheme.coarse_stride > 0) run.start_coarse(scheme, *coarse, row0);
  scheme.solve(run);
  check_lambda_finite(run.lam, run.t[0], 0, scheme.name);
  return py::make_tuple(run.lam, adjoint_stats(run.call.calls(), run.steps),
                        run.est ? py::object(py::cast(run.coarse.lam)) : py::object(py::none()));
}

}  // namespace solvers
}  // namespace amaml
