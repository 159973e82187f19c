// Unit tests of amaml_ext's CPU kernels (csrc/ops/<op>.cpp) and of the
// tableaus (csrc/solvers/tableaus.h). The kernels are called
// through the dispatcher exactly as the solver drivers call them, and compared with naive
// scalar double-precision loops written here.
//
//   amaml_kernels_test <name>     name: one of the tests listed by `amaml_kernels_test --list`,
//                                 or "all"
//
// Exit status 0 when every check passed, 1 when one failed (each failure is printed as
// "FAIL [test] ..."), 2 for an unknown test name.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "solvers/tableaus.h"
#include "ops/calls.h"

namespace {

namespace tab = amaml::dopri5;

// ---- the ops, through the dispatcher (csrc/ops/calls.h) ---------------------------------------

using amaml::dispatch::dopri5_dense;
using amaml::dispatch::dopri5_finish;
using amaml::dispatch::heun_update;
using amaml::dispatch::stage_combine;

// ---- failure bookkeeping ----------------------------------------------------------------------

int g_failures = 0;
int64_t g_checks = 0;
std::string g_test;

void fail(const std::string& msg) {
  ++g_failures;
  if (g_failures <= 60) std::fprintf(stderr, "FAIL [%s] %s\n", g_test.c_str(), msg.c_str());
  if (g_failures == 60) std::fprintf(stderr, "FAIL [%s] (further failures not printed)\n", g_test.c_str());
}

void expect(bool cond, const std::string& msg) {
  ++g_checks;
  if (!cond) fail(msg);
}

std::string fmt(double v) {
  std::ostringstream s;
  s.precision(17);
  s << v;
  return s.str();
}

std::string shape_str(at::IntArrayRef s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

const char* dtype_str(at::ScalarType t) { return t == at::kFloat ? "float32" : "float64"; }

double tol_for(at::ScalarType t) { return t == at::kDouble ? 1e-12 : 1e-5; }

// ---- tensors <-> double vectors ---------------------------------------------------------------

std::vector<double> to_vec(const at::Tensor& t) {
  const at::Tensor c = t.detach().to(at::kDouble).contiguous();
  const double* p = c.data_ptr<double>();
  return std::vector<double>(p, p + c.numel());
}

std::vector<std::vector<double>> to_vecs(const std::vector<at::Tensor>& ts) {
  std::vector<std::vector<double>> r;
  for (const auto& t : ts) r.push_back(to_vec(t));
  return r;
}

// |out - ref| <= tol * mag elementwise, where mag bounds the magnitude of the terms that were
// summed (so that rounding of cancelling terms is allowed for). NaN never passes.
void check_close(const std::string& what, const at::Tensor& out, const std::vector<double>& ref,
                 const std::vector<double>& mag, double tol) {
  ++g_checks;
  const std::vector<double> o = to_vec(out);
  if (o.size() != ref.size()) {
    fail(what + ": " + std::to_string(o.size()) + " elements, expected " +
         std::to_string(ref.size()));
    return;
  }
  int64_t bad = 0, first = -1;
  for (size_t i = 0; i < o.size(); ++i) {
    const double bound = tol * std::max(mag[i], std::numeric_limits<double>::min());
    if (!(std::fabs(o[i] - ref[i]) <= bound)) {
      if (first < 0) first = static_cast<int64_t>(i);
      ++bad;
    }
  }
  if (bad) {
    const size_t i = static_cast<size_t>(first);
    fail(what + ": " + std::to_string(bad) + " of " + std::to_string(o.size()) +
         " elements off; first at flat index " + std::to_string(i) + ": got " + fmt(o[i]) +
         ", reference " + fmt(ref[i]) + ", |diff| " + fmt(std::fabs(o[i] - ref[i])) +
         " > allowed " + fmt(tol * mag[i]));
  }
}

// Same shape, dtype and bytes (logical element order).
bool bit_equal(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) return false;
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  return std::memcmp(ac.data_ptr(), bc.data_ptr(), ac.nbytes()) == 0;
}

// ---- inputs in several memory layouts ---------------------------------------------------------

enum class Layout { Contig, Strided, Transposed };

const char* layout_str(Layout l) {
  switch (l) {
    case Layout::Contig: return "contiguous";
    case Layout::Strided: return "strided";
    case Layout::Transposed: return "transposed";
  }
  return "?";
}

// Mode of a test case: every tensor in one layout, or the layouts mixed across arguments.
struct Mode {
  const char* name;
  bool mixed;
  Layout layout;
  Layout of(int arg) const { return mixed ? static_cast<Layout>(arg % 3) : layout; }
};

const Mode kModes[] = {{"contiguous", false, Layout::Contig},
                       {"strided", false, Layout::Strided},
                       {"transposed", false, Layout::Transposed},
                       {"mixed", true, Layout::Contig}};

// Storage shape for a view of `shape` in layout l:
//   strided:    every third element of a [..., 3] tensor (storage offset 1)
//   transposed: .t() of a [d, B] tensor; for [d], the first column of a [d, 2] tensor
std::vector<int64_t> base_shape(const std::vector<int64_t>& shape, Layout l) {
  std::vector<int64_t> s = shape;
  if (l == Layout::Strided) s.push_back(3);
  if (l == Layout::Transposed) {
    if (s.size() == 2) std::swap(s[0], s[1]);
    else s.push_back(2);
  }
  return s;
}

at::Tensor view_of(const at::Tensor& base, Layout l, size_t ndim) {
  switch (l) {
    case Layout::Contig: return base;
    case Layout::Strided: return base.select(-1, 1);
    case Layout::Transposed: return ndim == 2 ? base.t() : base.select(1, 0);
  }
  return base;
}

struct Buf {
  at::Tensor base, view;
  Layout layout;
};

at::Generator g_gen;

at::TensorOptions opts(at::ScalarType dt) { return at::TensorOptions().dtype(dt).device(at::kCPU); }

at::Tensor rand_in(const std::vector<int64_t>& shape, at::ScalarType dt, Layout l) {
  at::Tensor base = at::randn(base_shape(shape, l), g_gen, opts(dt));
  at::Tensor v = view_of(base, l, shape.size());
  bool all_gt1 = true;  // with a size-1 dimension a view may legitimately be contiguous
  for (int64_t s : shape) all_gt1 = all_gt1 && s > 1;
  if (l != Layout::Contig && all_gt1 && v.is_contiguous())
    fail("test setup: a " + std::string(layout_str(l)) + " view is contiguous");
  return v;
}

constexpr double kSentinel = -777.25;

Buf out_buf(const std::vector<int64_t>& shape, at::ScalarType dt, Layout l) {
  Buf b;
  b.layout = l;
  b.base = at::full(base_shape(shape, l), kSentinel, opts(dt));
  b.view = view_of(b.base, l, shape.size());
  return b;
}

// The elements of a strided output's storage outside the view must be left alone.
void check_untouched(const std::string& what, const Buf& b) {
  if (b.layout != Layout::Strided) return;
  expect(at::all(b.base.select(-1, 0) == kSentinel).item<bool>() &&
             at::all(b.base.select(-1, 2) == kSentinel).item<bool>(),
         what + ": wrote outside the output view");
}

std::string case_str(at::ScalarType dt, const std::vector<int64_t>& shape, const Mode& m) {
  return std::string(dtype_str(dt)) + " " + shape_str(shape) + " " + m.name;
}

const std::vector<std::vector<int64_t>> kShapes = {{100003}, {3, 100003}, {2, 5}, {1}, {1, 7}};
const at::ScalarType kDtypes[] = {at::kFloat, at::kDouble};

std::mt19937_64 g_rng(20240611);
double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(g_rng); }

std::vector<double> b_weights() { return std::vector<double>(tab::b, tab::b + 6); }

// ---- reference loops --------------------------------------------------------------------------

// out = y + h sum_j c_j k_j; mag = |y| + |h| sum_j |c_j k_j|.
void ref_combine(const std::vector<double>& y, const std::vector<std::vector<double>>& k,
                 const std::vector<double>& c, double h, std::vector<double>& out,
                 std::vector<double>& mag) {
  out.assign(y.size(), 0.0);
  mag.assign(y.size(), 0.0);
  for (size_t i = 0; i < y.size(); ++i) {
    double s = 0.0, m = 0.0;
    for (size_t j = 0; j < k.size(); ++j) {
      s += c[j] * k[j][i];
      m += std::fabs(c[j] * k[j][i]);
    }
    out[i] = y[i] + h * s;
    mag[i] = std::fabs(y[i]) + std::fabs(h) * m;
  }
}

// Hairer's contd5 at theta, with a bound of the magnitude of the terms.
void ref_dense(const std::vector<double>& y0, const std::vector<double>& y1,
               const std::vector<std::vector<double>>& k, double h, double th,
               std::vector<double>& out, std::vector<double>& mag) {
  out.assign(y0.size(), 0.0);
  mag.assign(y0.size(), 0.0);
  const double om = 1.0 - th;
  for (size_t i = 0; i < y0.size(); ++i) {
    const double ydiff = y1[i] - y0[i];
    const double bspl = h * k[0][i] - ydiff;
    const double r4 = ydiff - h * k[6][i] - bspl;
    double r5 = 0.0, r5m = 0.0;
    for (int j = 0; j < 7; ++j) {
      r5 += tab::d[j] * k[j][i];
      r5m += std::fabs(tab::d[j] * k[j][i]);
    }
    r5 *= h;
    r5m *= std::fabs(h);
    out[i] = y0[i] + th * (ydiff + om * (bspl + th * (r4 + om * r5)));
    const double ydm = std::fabs(y1[i]) + std::fabs(y0[i]);
    const double bm = std::fabs(h * k[0][i]) + ydm;
    const double r4m = ydm + std::fabs(h * k[6][i]) + bm;
    mag[i] = std::fabs(y0[i]) + th * (ydm + om * (bm + th * (r4m + om * r5m)));
  }
}

// ---- tests ------------------------------------------------------------------------------------

// A tableau identity, to rounding.
void near(double v, double want, const std::string& what) {
  expect(std::fabs(v - want) <= 1e-14, what + " = " + fmt(v) + ", expected " + fmt(want));
}

// The fixed-step tableaus: the quadrature conditions sum b c^p = 1/(p+1) up to their order
// (all of Euler's and Heun's conditions), and RK4's four others ("Solving ODEs I", II.2,
// Table 2.2) with its matrix a_{i,i-1} = c_i, zero elsewhere.
void check_fixed_tableaus() {
  struct Fixed {
    const char* name;
    const double* b;
    const double* c;
    int stages, order;
  };
  const Fixed fixed[] = {{"rk4", amaml::rk4::b, amaml::rk4::c, amaml::rk4::kStages, 4},
                         {"heun", amaml::heun::b, amaml::heun::c, amaml::heun::kStages, 2},
                         {"euler", amaml::euler::b, amaml::euler::c, amaml::euler::kStages, 1}};
  for (const Fixed& m : fixed) {
    for (int p = 0; p < m.order; ++p) {
      double s = 0.0;
      for (int i = 0; i < m.stages; ++i) s += m.b[i] * std::pow(m.c[i], p);
      near(s, 1.0 / (p + 1), std::string(m.name) + ": sum b c^" + std::to_string(p));
    }
  }
  const double* rb = amaml::rk4::b;
  const double* rc = amaml::rk4::c;
  double bac = 0.0, bcac = 0.0, bac2 = 0.0, baac = 0.0;
  for (int i = 1; i < amaml::rk4::kStages; ++i) {
    const double ac = rc[i] * rc[i - 1];                          // (A c)_i
    const double aac = i > 1 ? rc[i] * rc[i - 1] * rc[i - 2] : 0.0;  // (A A c)_i
    bac += rb[i] * ac;
    bcac += rb[i] * rc[i] * ac;
    bac2 += rb[i] * rc[i] * rc[i - 1] * rc[i - 1];
    baac += rb[i] * aac;
  }
  near(bac, 1.0 / 6.0, "rk4: sum b a c");
  near(bcac, 1.0 / 8.0, "rk4: sum b c a c");
  near(bac2, 1.0 / 12.0, "rk4: sum b a c^2");
  near(baac, 1.0 / 24.0, "rk4: sum b a a c");
}

void test_tableau() {
  const double* const* a = tab::a_rows;
  for (int i = 1; i < 7; ++i) {
    double s = 0.0;
    for (int j = 0; j < i; ++j) s += a[i][j];
    near(s, tab::c[i], "row sum of a" + std::to_string(i + 1) + " (c" + std::to_string(i + 1) + ")");
  }
  // b (order 5) and bhat = b - e (order 4): quadrature conditions and sum b_i a_ij c_j = 1/6.
  double bh[7];
  for (int i = 0; i < 7; ++i) bh[i] = (i < 6 ? tab::b[i] : 0.0) - tab::e[i];
  for (int p = 0; p < 5; ++p) {
    double sb = 0.0, sbh = 0.0;
    for (int i = 0; i < 7; ++i) {
      const double bi = i < 6 ? tab::b[i] : 0.0;
      sb += bi * std::pow(tab::c[i], p);
      sbh += bh[i] * std::pow(tab::c[i], p);
    }
    near(sb, 1.0 / (p + 1), "sum b c^" + std::to_string(p));
    if (p < 4) near(sbh, 1.0 / (p + 1), "sum bhat c^" + std::to_string(p));
  }
  double sbac = 0.0;
  for (int i = 1; i < 6; ++i)
    for (int j = 0; j < i; ++j) sbac += tab::b[i] * a[i][j] * tab::c[j];
  near(sbac, 1.0 / 6.0, "sum b a c");
  double se = 0.0, sd = 0.0;
  for (int i = 0; i < 7; ++i) {
    se += tab::e[i];
    sd += tab::d[i];
  }
  near(se, 0.0, "sum e");
  near(sd, 0.0, "sum d (dense output exact for constant f)");
  check_fixed_tableaus();
}

void test_stage_combine() {
  for (at::ScalarType dt : kDtypes) {
    const double tol = tol_for(dt);
    for (const auto& shape : kShapes) {
      const bool big = shape.back() > 1000;
      for (const Mode& m : kModes) {
        std::vector<int> counts = big ? std::vector<int>{1, 3, 6, 7} : std::vector<int>{1, 2, 3, 4, 5, 6, 7};
        for (int ns : counts) {
          const std::string cs = "stage_combine " + case_str(dt, shape, m) + " stages=" + std::to_string(ns);
          const double h = (ns % 2) ? 0.37 : -0.215;
          at::Tensor y = rand_in(shape, dt, m.of(0));
          std::vector<at::Tensor> k;
          std::vector<double> c;
          for (int j = 0; j < ns; ++j) {
            k.push_back(rand_in(shape, dt, m.of(j + 1)));
            c.push_back(j == 1 ? 0.0 : uniform(-2.0, 2.0));
          }
          const auto yv = to_vec(y);
          const auto kv = to_vecs(k);
          std::vector<double> ref, mag;
          ref_combine(yv, kv, c, h, ref, mag);

          Buf out = out_buf(shape, dt, m.of(ns + 1));
          stage_combine(y, k, c, h, out.view);
          check_close(cs, out.view, ref, mag, tol);
          check_untouched(cs, out);
          expect(to_vec(y) == yv, cs + ": input y modified");

          // In place: out is y itself (same layout as y), and out is one of the stages.
          at::Tensor yi = rand_in(shape, dt, m.of(0));
          const auto yiv = to_vec(yi);
          std::vector<double> refi, magi;
          ref_combine(yiv, kv, c, h, refi, magi);
          stage_combine(yi, k, c, h, yi);
          check_close(cs + " in place (out is y)", yi, refi, magi, tol);

          std::vector<at::Tensor> k2 = k;
          k2[ns - 1] = rand_in(shape, dt, m.of(ns));
          auto kv2 = to_vecs(k2);
          ref_combine(yv, kv2, c, h, refi, magi);
          stage_combine(y, k2, c, h, k2[ns - 1]);
          check_close(cs + " in place (out is stages[last])", k2[ns - 1], refi, magi, tol);
        }
      }
    }
  }
}

// err_norm buffer for a state of `shape` in layout l: [] for [d], [B] (maybe strided) for [B, d].
at::Tensor norm_buf(const std::vector<int64_t>& shape, at::ScalarType dt, Layout l) {
  if (shape.size() == 1) return at::full({}, kSentinel, opts(dt));
  if (l == Layout::Contig) return at::full({shape[0]}, kSentinel, opts(dt));
  return at::full({shape[0], 3}, kSentinel, opts(dt)).select(1, 1);
}

void test_dopri5_finish() {
  for (at::ScalarType dt : kDtypes) {
    const double tol = tol_for(dt);
    for (const auto& shape : kShapes) {
      for (const Mode& m : kModes) {
        for (int variant = 0; variant < 2; ++variant) {
          const std::string cs = "dopri5_finish " + case_str(dt, shape, m) + " variant " + std::to_string(variant);
          const double h = variant ? -0.083 : 0.29;
          const double rtol = variant ? 0.0 : 1e-3, atol = variant ? 2e-2 : 1e-4;
          const int64_t rows = shape.size() == 2 ? shape[0] : 1;
          const int64_t d = shape.back();
          at::Tensor y0 = rand_in(shape, dt, m.of(0));
          std::vector<at::Tensor> k;
          for (int j = 0; j < 7; ++j) {
            k.push_back(rand_in(shape, dt, m.of(j + 1)));
            // Tasks of very different error size, so a mix-up of rows shows in the norms.
            if (shape.size() == 2) {
              const double f[3] = {1.0, 8.0, 0.125};
              at::Tensor fac = at::empty({rows, 1}, opts(dt));
              for (int64_t r = 0; r < rows; ++r) fac[r][0] = f[r % 3];
              k.back().mul_(fac);
            }
          }
          const auto y0v = to_vec(y0);
          const auto kv = to_vecs(k);
          const size_t n = y0v.size();
          std::vector<double> y1r(n), y1m(n), errr(n), errm(n), normr(static_cast<size_t>(rows));
          for (size_t i = 0; i < n; ++i) {
            double s = 0.0, sm = 0.0, e = 0.0, em = 0.0;
            for (int j = 0; j < 6; ++j) {
              s += tab::b[j] * kv[j][i];
              sm += std::fabs(tab::b[j] * kv[j][i]);
            }
            for (int j = 0; j < 7; ++j) {
              e += tab::e[j] * kv[j][i];
              em += std::fabs(tab::e[j] * kv[j][i]);
            }
            y1r[i] = y0v[i] + h * s;
            y1m[i] = std::fabs(y0v[i]) + std::fabs(h) * sm;
            errr[i] = h * e;
            errm[i] = std::fabs(h) * em;
          }
          for (int64_t r = 0; r < rows; ++r) {
            double s = 0.0;
            for (int64_t j = 0; j < d; ++j) {
              const size_t i = static_cast<size_t>(r * d + j);
              const double sc = atol + rtol * std::max(std::fabs(y0v[i]), std::fabs(y1r[i]));
              s += (errr[i] / sc) * (errr[i] / sc);
            }
            normr[static_cast<size_t>(r)] = std::sqrt(s / static_cast<double>(d));
          }

          Buf y1 = out_buf(shape, dt, m.of(8));
          Buf err = out_buf(shape, dt, m.of(9));
          at::Tensor norm = norm_buf(shape, dt, m.of(10));
          dopri5_finish(y0, k, h, rtol, atol, y1.view, err.view, norm);
          check_close(cs + " y1", y1.view, y1r, y1m, tol);
          check_close(cs + " err", err.view, errr, errm, tol);
          check_untouched(cs + " y1", y1);
          check_untouched(cs + " err", err);
          expect(norm.dim() == (shape.size() == 2 ? 1 : 0), cs + ": err_norm shape changed");
          check_close(cs + " err_norm", norm, normr, normr, tol);

          // y1 is bit-identical to stage_combine with the six b weights.
          Buf sc = out_buf(shape, dt, m.of(8));
          stage_combine(y0, at::TensorList(k).slice(0, 6), b_weights(), h, sc.view);
          expect(bit_equal(sc.view, y1.view),
                 cs + ": y1 is not bit-identical to stage_combine(y0, stages[:6], b, h)");

          // A task's norm does not depend on the tasks beside it: row r alone gives the same.
          if (shape.size() == 2) {
            for (int64_t r = 0; r < rows; ++r) {
              std::vector<at::Tensor> kr;
              for (const auto& t : k) kr.push_back(t[r]);
              at::Tensor y1s = at::empty({d}, opts(dt)), errs = at::empty({d}, opts(dt));
              at::Tensor ns = at::empty({}, opts(dt));
              dopri5_finish(y0[r], kr, h, rtol, atol, y1s, errs, ns);
              expect(bit_equal(ns, norm[r]) && bit_equal(y1s, y1.view[r]) && bit_equal(errs, err.view[r]),
                     cs + ": task " + std::to_string(r) + " alone gives a different result (norm " +
                         fmt(ns.item<double>()) + " vs " + fmt(norm[r].item<double>()) + ")");
            }
          } else if (m.layout == Layout::Contig && !m.mixed) {
            // A one-element [1] err_norm is accepted for a [d] state too.
            at::Tensor n1 = at::full({1}, kSentinel, opts(dt));
            dopri5_finish(y0, k, h, rtol, atol, y1.view, err.view, n1);
            expect(bit_equal(n1[0], norm), cs + ": err_norm of shape [1] differs from shape []");
          }

          // Outputs aliasing their inputs: y1 written into y0, err into stages[6].
          std::vector<at::Tensor> ka;
          for (const auto& t : k) ka.push_back(t.clone());
          at::Tensor y0a = y0.clone();
          at::Tensor na = norm_buf(shape, dt, Layout::Contig);
          dopri5_finish(y0a, ka, h, rtol, atol, y0a, ka[6], na);
          expect(bit_equal(y0a, y1.view) && bit_equal(ka[6], err.view) && bit_equal(na, norm),
                 cs + ": in place (y1 is y0, err is stages[6]) differs from out of place");
        }
      }
    }
  }
}

void test_dopri5_dense() {
  const std::vector<double> thetas = {0.0, 0.2, 1.0 / 3.0, 0.5, 0.9, 1.0};
  const int64_t nth = static_cast<int64_t>(thetas.size());
  for (at::ScalarType dt : kDtypes) {
    const double tol = tol_for(dt);
    for (const auto& shape : kShapes) {
      for (const Mode& m : kModes) {
        const std::string cs = "dopri5_dense " + case_str(dt, shape, m);
        const double h = 0.31;
        at::Tensor y0 = rand_in(shape, dt, m.of(0));
        at::Tensor y1 = rand_in(shape, dt, m.of(1));
        std::vector<at::Tensor> k;
        for (int j = 0; j < 7; ++j) k.push_back(rand_in(shape, dt, m.of(j + 2)));
        const auto y0v = to_vec(y0), y1v = to_vec(y1);
        const auto kv = to_vecs(k);

        // Trajectory [R, *shape] with one untouched row before and one after the written rows;
        // non-contiguous (rows interleaved) outside the contiguous mode.
        const int64_t first_row = 1, R = nth + 2;
        std::vector<int64_t> tshape = {R};
        tshape.insert(tshape.end(), shape.begin(), shape.end());
        at::Tensor traj;
        if (!m.mixed && m.layout == Layout::Contig) {
          traj = at::full(tshape, kSentinel, opts(dt));
        } else {
          std::vector<int64_t> bs(shape.begin(), shape.end());
          bs.push_back(R);
          traj = at::full(bs, kSentinel, opts(dt)).movedim(-1, 0);
        }
        dopri5_dense(y0, y1, k, h, thetas, first_row, traj);

        std::vector<double> ref, mag;
        for (int64_t r = 0; r < nth; ++r) {
          const double th = thetas[static_cast<size_t>(r)];
          ref_dense(y0v, y1v, kv, h, th, ref, mag);
          check_close(cs + " theta=" + fmt(th), traj[first_row + r], ref, mag, tol);
        }
        expect(at::all(traj[0] == kSentinel).item<bool>() &&
                   at::all(traj[R - 1] == kSentinel).item<bool>(),
               cs + ": rows outside [first_row, first_row + len(thetas)) were written");
        // theta = 1 is y1 exactly; theta = 0 is y0 within rounding.
        expect(bit_equal(traj[first_row + nth - 1], y1), cs + ": theta=1 row is not exactly y1");
        std::vector<double> absy0(y0v.size());
        for (size_t i = 0; i < y0v.size(); ++i) absy0[i] = std::fabs(y0v[i]);
        check_close(cs + " theta=0 vs y0", traj[first_row], y0v, absy0, tol);

        // No thetas: nothing written. Rows flush with the end and with the start.
        at::Tensor before = traj.clone();
        dopri5_dense(y0, y1, k, h, {}, R, traj);
        expect(bit_equal(before, traj), cs + ": empty thetas wrote to the trajectory");
        const std::vector<double> two = {0.75, 1.0};
        dopri5_dense(y0, y1, k, h, two, R - 2, traj);
        dopri5_dense(y0, y1, k, h, two, 0, traj);
        ref_dense(y0v, y1v, kv, h, 0.75, ref, mag);
        check_close(cs + " last rows theta=0.75", traj[R - 2], ref, mag, tol);
        check_close(cs + " first rows theta=0.75", traj[0], ref, mag, tol);
        expect(bit_equal(traj[R - 1], y1) && bit_equal(traj[1], y1), cs + ": theta=1 rows are not y1");
      }
    }
  }
}

void test_heun_update() {
  for (at::ScalarType dt : kDtypes) {
    const double tol = tol_for(dt);
    for (const auto& shape : kShapes) {
      for (const Mode& m : kModes) {
        for (int with_b = 0; with_b < 3; ++with_b) {  // 0: b=None, 1: b given, 2: undefined b
          const std::string cs = "heun_update " + case_str(dt, shape, m) +
                                 (with_b == 1 ? " with b" : with_b == 0 ? " b=None" : " b=undefined");
          const double h = with_b == 1 ? 0.37 : -0.123;
          at::Tensor lam = rand_in(shape, dt, m.of(0));
          at::Tensor a = rand_in(shape, dt, m.of(1));
          at::Tensor b = rand_in(shape, dt, m.of(2));
          std::optional<at::Tensor> bo;
          if (with_b == 1) bo = b;
          if (with_b == 2) bo = at::Tensor();
          auto reference = [&](const std::vector<double>& l, const std::vector<double>& av,
                               const std::vector<double>& bv, std::vector<double>& ref,
                               std::vector<double>& mag) {
            ref.assign(l.size(), 0.0);
            mag.assign(l.size(), 0.0);
            for (size_t i = 0; i < l.size(); ++i) {
              if (with_b == 1) {
                ref[i] = l[i] + 0.5 * h * (av[i] + bv[i]);
                mag[i] = std::fabs(l[i]) + 0.5 * std::fabs(h) * (std::fabs(av[i]) + std::fabs(bv[i]));
              } else {
                ref[i] = l[i] + h * av[i];
                mag[i] = std::fabs(l[i]) + std::fabs(h * av[i]);
              }
            }
          };
          const auto lv = to_vec(lam), av = to_vec(a), bv = to_vec(b);
          std::vector<double> ref, mag;
          reference(lv, av, bv, ref, mag);
          Buf out = out_buf(shape, dt, m.of(3));
          heun_update(lam, a, bo, h, out.view);
          check_close(cs, out.view, ref, mag, tol);
          check_untouched(cs, out);

          // In place: out is lam; out is a.
          heun_update(lam, a, bo, h, lam);
          check_close(cs + " in place (out is lam)", lam, ref, mag, tol);
          at::Tensor lam2 = rand_in(shape, dt, m.of(0));
          const auto lv2 = to_vec(lam2);
          reference(lv2, av, bv, ref, mag);
          heun_update(lam2, a, bo, h, a);
          check_close(cs + " in place (out is a)", a, ref, mag, tol);
        }
      }
    }
  }
}

// Bad input must raise c10::Error naming the offending argument, and write nothing.
void expect_error(const std::string& what, const std::string& needle, const std::function<void()>& fn) {
  ++g_checks;
  try {
    fn();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    if (msg.find(needle) == std::string::npos)
      fail(what + ": the c10::Error does not name " + needle + ": " + msg);
    return;
  } catch (const std::exception& e) {
    fail(what + ": expected c10::Error, got another exception: " + e.what());
    return;
  }
  fail(what + ": no error raised");
}

constexpr int64_t kBadB = 3, kBadD = 10;  // shape [B, d] of the bad-input tests

void test_bad_input() {
  constexpr int64_t B = kBadB, d = kBadD;
  auto F = [&](std::vector<int64_t> s) { return at::randn(s, g_gen, opts(at::kFloat)); };
  auto D = [&](std::vector<int64_t> s) { return at::randn(s, g_gen, opts(at::kDouble)); };
  auto I = [&](std::vector<int64_t> s) { return at::zeros(s, opts(at::kInt)); };
  const at::Tensor y = F({B, d});
  auto stages = [&](int n, std::vector<int64_t> s = {kBadB, kBadD}) {
    std::vector<at::Tensor> k;
    for (int j = 0; j < n; ++j) k.push_back(F(s));
    return k;
  };
  const double h = 0.1;
  at::Tensor out = at::full({B, d}, kSentinel, opts(at::kFloat));
  const std::vector<double> c2 = {0.5, 0.5}, c3 = {0.2, 0.3, 0.5};
  const std::vector<double> c8(8, 0.125);

  // stage_combine
  expect_error("stage_combine int32 y", "'y'", [&] { stage_combine(I({B, d}), {I({B, d})}, {1.0}, h, I({B, d})); });
  expect_error("stage_combine 3-D y", "'y'", [&] { stage_combine(F({2, B, d}), stages(1, {2, B, d}), {1.0}, h, F({2, B, d})); });
  expect_error("stage_combine empty y", "'y'", [&] { stage_combine(F({0}), stages(1, {0}), {1.0}, h, F({0})); });
  expect_error("stage_combine out shape", "'out'", [&] { stage_combine(y, stages(2), c2, h, F({B, d + 1})); });
  expect_error("stage_combine out [B*d]", "'out'", [&] { stage_combine(y, stages(2), c2, h, F({B * d})); });
  expect_error("stage_combine out dtype", "'out'", [&] { stage_combine(y, stages(2), c2, h, D({B, d})); });
  expect_error("stage_combine out int32", "'out'", [&] { stage_combine(y, stages(2), c2, h, I({B, d})); });
  expect_error("stage_combine stage dtype", "'stages[1]'", [&] {
    auto k = stages(2);
    k[1] = D({B, d});
    stage_combine(y, k, c2, h, out);
  });
  expect_error("stage_combine stage int32", "'stages[0]'", [&] {
    auto k = stages(2);
    k[0] = I({B, d});
    stage_combine(y, k, c2, h, out);
  });
  expect_error("stage_combine stage shape", "'stages[2]'", [&] {
    auto k = stages(3);
    k[2] = F({d, B});
    stage_combine(y, k, c3, h, out);
  });
  expect_error("stage_combine 0 stages", "'stages'", [&] { stage_combine(y, {}, {}, h, out); });
  expect_error("stage_combine 8 stages", "'stages'", [&] { stage_combine(y, stages(8), c8, h, out); });
  expect_error("stage_combine 3 stages 2 coeffs", "'coeffs'", [&] { stage_combine(y, stages(3), c2, h, out); });
  expect_error("stage_combine 2 stages 3 coeffs", "'coeffs'", [&] { stage_combine(y, stages(2), c3, h, out); });
  expect_error("stage_combine inf coeff", "'coeffs'", [&] {
    stage_combine(y, stages(2), std::vector<double>{1.0, INFINITY}, h, out);
  });
  expect_error("stage_combine nan h", "'h'", [&] { stage_combine(y, stages(2), c2, NAN, out); });
  expect(at::all(out == kSentinel).item<bool>(), "stage_combine: a rejected call wrote to 'out'");

  // dopri5_finish
  at::Tensor y1 = at::full({B, d}, kSentinel, opts(at::kFloat));
  at::Tensor err = at::full({B, d}, kSentinel, opts(at::kFloat));
  at::Tensor nrm = at::full({B}, kSentinel, opts(at::kFloat));
  expect_error("dopri5_finish 6 stages", "'stages'", [&] { dopri5_finish(y, stages(6), h, 1e-3, 1e-6, y1, err, nrm); });
  expect_error("dopri5_finish 8 stages", "'stages'", [&] { dopri5_finish(y, stages(8), h, 1e-3, 1e-6, y1, err, nrm); });
  expect_error("dopri5_finish int32 y0", "'y0'", [&] {
    std::vector<at::Tensor> k(7, I({B, d}));
    dopri5_finish(I({B, d}), k, h, 1e-3, 1e-6, I({B, d}), I({B, d}), I({B}));
  });
  expect_error("dopri5_finish stage int32", "'stages[3]'", [&] {
    auto k = stages(7);
    k[3] = I({B, d});
    dopri5_finish(y, k, h, 1e-3, 1e-6, y1, err, nrm);
  });
  expect_error("dopri5_finish stage shape", "'stages[6]'", [&] {
    auto k = stages(7);
    k[6] = F({B, d - 1});
    dopri5_finish(y, k, h, 1e-3, 1e-6, y1, err, nrm);
  });
  expect_error("dopri5_finish y1 shape", "'y1'", [&] { dopri5_finish(y, stages(7), h, 1e-3, 1e-6, F({B + 1, d}), err, nrm); });
  expect_error("dopri5_finish err dtype", "'err'", [&] { dopri5_finish(y, stages(7), h, 1e-3, 1e-6, y1, D({B, d}), nrm); });
  expect_error("dopri5_finish err_norm shape [B-1]", "'err_norm'", [&] { dopri5_finish(y, stages(7), h, 1e-3, 1e-6, y1, err, F({B - 1})); });
  expect_error("dopri5_finish err_norm shape [B, 1]", "'err_norm'", [&] { dopri5_finish(y, stages(7), h, 1e-3, 1e-6, y1, err, F({B, 1})); });
  expect_error("dopri5_finish err_norm dtype", "'err_norm'", [&] { dopri5_finish(y, stages(7), h, 1e-3, 1e-6, y1, err, D({B})); });
  expect_error("dopri5_finish [d] err_norm shape [2]", "'err_norm'", [&] {
    dopri5_finish(F({d}), stages(7, {d}), h, 1e-3, 1e-6, F({d}), F({d}), F({2}));
  });
  expect_error("dopri5_finish negative rtol", "'rtol'", [&] { dopri5_finish(y, stages(7), h, -1e-3, 1e-6, y1, err, nrm); });
  expect_error("dopri5_finish rtol=atol=0", "'atol'", [&] { dopri5_finish(y, stages(7), h, 0.0, 0.0, y1, err, nrm); });
  expect_error("dopri5_finish inf h", "'h'", [&] { dopri5_finish(y, stages(7), INFINITY, 1e-3, 1e-6, y1, err, nrm); });
  expect(at::all(y1 == kSentinel).item<bool>() && at::all(err == kSentinel).item<bool>() &&
             at::all(nrm == kSentinel).item<bool>(),
         "dopri5_finish: a rejected call wrote to its outputs");

  // dopri5_dense
  const std::vector<double> th = {0.5, 1.0};
  at::Tensor traj = at::full({4, B, d}, kSentinel, opts(at::kFloat));
  expect_error("dopri5_dense int32 y0", "'y0'", [&] {
    std::vector<at::Tensor> k(7, I({B, d}));
    dopri5_dense(I({B, d}), I({B, d}), k, h, th, 0, I({4, B, d}));
  });
  expect_error("dopri5_dense y1 shape", "'y1'", [&] { dopri5_dense(y, F({d}), stages(7), h, th, 0, traj); });
  expect_error("dopri5_dense y1 dtype", "'y1'", [&] { dopri5_dense(y, D({B, d}), stages(7), h, th, 0, traj); });
  expect_error("dopri5_dense 5 stages", "'stages'", [&] { dopri5_dense(y, y, stages(5), h, th, 0, traj); });
  expect_error("dopri5_dense 8 stages", "'stages'", [&] { dopri5_dense(y, y, stages(8), h, th, 0, traj); });
  expect_error("dopri5_dense stage dtype", "'stages[4]'", [&] {
    auto k = stages(7);
    k[4] = D({B, d});
    dopri5_dense(y, y, k, h, th, 0, traj);
  });
  expect_error("dopri5_dense trajectory shape", "'trajectory'", [&] { dopri5_dense(y, y, stages(7), h, th, 0, F({4, B, d + 1})); });
  expect_error("dopri5_dense trajectory rank", "'trajectory'", [&] { dopri5_dense(y, y, stages(7), h, th, 0, F({B, d})); });
  expect_error("dopri5_dense trajectory dtype", "'trajectory'", [&] { dopri5_dense(y, y, stages(7), h, th, 0, D({4, B, d})); });
  expect_error("dopri5_dense rows past the end", "'trajectory'", [&] { dopri5_dense(y, y, stages(7), h, th, 3, traj); });
  expect_error("dopri5_dense negative first_row", "'trajectory'", [&] { dopri5_dense(y, y, stages(7), h, th, -1, traj); });
  expect_error("dopri5_dense theta > 1", "'thetas'", [&] {
    dopri5_dense(y, y, stages(7), h, std::vector<double>{0.5, 1.5}, 0, traj);
  });
  expect_error("dopri5_dense theta < 0", "'thetas'", [&] {
    dopri5_dense(y, y, stages(7), h, std::vector<double>{-0.25}, 0, traj);
  });
  expect_error("dopri5_dense nan theta", "'thetas'", [&] {
    dopri5_dense(y, y, stages(7), h, std::vector<double>{NAN}, 0, traj);
  });
  expect_error("dopri5_dense nan h", "'h'", [&] { dopri5_dense(y, y, stages(7), NAN, th, 0, traj); });
  expect(at::all(traj == kSentinel).item<bool>(), "dopri5_dense: a rejected call wrote to 'trajectory'");

  // heun_update
  at::Tensor hout = at::full({B, d}, kSentinel, opts(at::kFloat));
  expect_error("heun_update int32 lam", "'lam'", [&] { heun_update(I({B, d}), I({B, d}), std::nullopt, h, I({B, d})); });
  expect_error("heun_update 3-D lam", "'lam'", [&] { heun_update(F({1, B, d}), F({1, B, d}), std::nullopt, h, F({1, B, d})); });
  expect_error("heun_update a shape", "'a'", [&] { heun_update(y, F({B, d + 2}), std::nullopt, h, hout); });
  expect_error("heun_update a dtype", "'a'", [&] { heun_update(y, D({B, d}), std::nullopt, h, hout); });
  expect_error("heun_update b dtype", "'b'", [&] { heun_update(y, F({B, d}), D({B, d}), h, hout); });
  expect_error("heun_update b shape", "'b'", [&] { heun_update(y, F({B, d}), F({d}), h, hout); });
  expect_error("heun_update out shape", "'out'", [&] { heun_update(y, F({B, d}), std::nullopt, h, F({d, B})); });
  expect_error("heun_update out int32", "'out'", [&] { heun_update(y, F({B, d}), F({B, d}), h, I({B, d})); });
  expect_error("heun_update inf h", "'h'", [&] { heun_update(y, F({B, d}), F({B, d}), -INFINITY, hout); });
  expect(at::all(hout == kSentinel).item<bool>(), "heun_update: a rejected call wrote to 'out'");
}

// The results must not depend on the number of threads (the error norm included).
void test_threads() {
  // How many threads at::parallel_for really uses in this build (1 without OpenMP).
  auto threads_used = [] {
    std::atomic<int> used{0};
    at::parallel_for(0, int64_t(1) << 20, 1024, [&](int64_t, int64_t) { used.fetch_add(1); });
    return used.load();
  };
  auto run_all = [](at::ScalarType dt, const std::vector<int64_t>& shape) {
    at::Generator gen = at::detail::createCPUGenerator(99);
    auto R = [&] { return at::randn(shape, gen, opts(dt)); };
    std::vector<at::Tensor> res;
    at::Tensor y0 = R();
    std::vector<at::Tensor> k;
    for (int j = 0; j < 7; ++j) k.push_back(R());
    at::Tensor o = at::empty(shape, opts(dt));
    stage_combine(y0, k, std::vector<double>{0.1, -0.2, 0.3, 0.4, -0.5, 0.6, 0.7}, 0.3, o);
    res.push_back(o);
    at::Tensor y1 = at::empty(shape, opts(dt)), err = at::empty(shape, opts(dt));
    at::Tensor nrm = shape.size() == 2 ? at::empty({shape[0]}, opts(dt)) : at::empty({}, opts(dt));
    dopri5_finish(y0, k, 0.3, 1e-3, 1e-5, y1, err, nrm);
    res.insert(res.end(), {y1, err, nrm});
    std::vector<int64_t> ts = {3};
    ts.insert(ts.end(), shape.begin(), shape.end());
    at::Tensor traj = at::empty(ts, opts(dt));
    dopri5_dense(y0, y1, k, 0.3, std::vector<double>{0.25, 0.5, 1.0}, 0, traj);
    res.push_back(traj);
    at::Tensor l = at::empty(shape, opts(dt)), l2 = at::empty(shape, opts(dt));
    heun_update(y0, k[0], k[1], 0.3, l);
    heun_update(y0, k[0], std::nullopt, 0.3, l2);
    res.insert(res.end(), {l, l2});
    return res;
  };
  const char* names[] = {"stage_combine", "y1", "err", "err_norm", "dense", "heun(b)", "heun"};
  const int saved = at::get_num_threads();
  const std::vector<std::vector<int64_t>> shapes = {{300007}, {3, 100003}, {2, 65536}};
  for (at::ScalarType dt : kDtypes) {
    for (const auto& shape : shapes) {
      at::set_num_threads(1);
      const int used1 = threads_used();
      const auto one = run_all(dt, shape);
      at::set_num_threads(4);
      const int used4 = threads_used();
      const auto four = run_all(dt, shape);
      std::printf("  %s %s: parallel_for used %d thread(s) at 1, %d at 4\n", dtype_str(dt),
                  shape_str(shape).c_str(), used1, used4);
      for (size_t i = 0; i < one.size(); ++i)
        expect(bit_equal(one[i], four[i]), std::string("threads ") + dtype_str(dt) + " " +
                                               shape_str(shape) + ": " + names[i] +
                                               " differs between 1 and 4 threads");
    }
  }
  at::set_num_threads(saved);
}

// One DOPRI5 step of y' = y^2 (exact y(t) = y0 / (1 - y0 t)) built from the ops, at three step
// sizes: the error of y1 must shrink like h^6, that of the embedded 4th-order solution and of
// the dense output like h^5. Checks the b, e and d coefficients independently of the formulas.
void test_convergence() {
  const int64_t d = 1001;
  const at::Tensor y0 = at::linspace(-1.0, 0.5, d, opts(at::kDouble));
  const double* a[6] = {nullptr, tab::a2, tab::a3, tab::a4, tab::a5, tab::a6};
  const std::vector<double> thetas = {0.25, 0.5, 0.75};
  const std::vector<double> hs = {0.1, 0.05, 0.025};
  std::vector<double> e_y1, e_hat, e_est, e_dense;
  auto exact = [&](double t) { return y0 / (1.0 - y0 * t); };
  auto maxabs = [](const at::Tensor& t) { return t.abs().max().item<double>(); };
  for (double h : hs) {
    std::vector<at::Tensor> k = {y0 * y0};
    for (int s = 1; s < 6; ++s) {
      at::Tensor ys = at::empty({d}, opts(at::kDouble));
      stage_combine(y0, k, std::vector<double>(a[s], a[s] + s), h, ys);
      k.push_back(ys * ys);
    }
    at::Tensor y7 = at::empty({d}, opts(at::kDouble));
    stage_combine(y0, k, b_weights(), h, y7);
    k.push_back(y7 * y7);
    at::Tensor y1 = at::empty({d}, opts(at::kDouble)), err = at::empty({d}, opts(at::kDouble));
    at::Tensor nrm = at::empty({}, opts(at::kDouble));
    dopri5_finish(y0, k, h, 1e-6, 1e-6, y1, err, nrm);
    expect(bit_equal(y1, y7), "y1 of dopri5_finish is not the FSAL stage point");
    at::Tensor traj = at::empty({3, d}, opts(at::kDouble));
    dopri5_dense(y0, y1, k, h, thetas, 0, traj);
    e_y1.push_back(maxabs(y1 - exact(h)));
    e_hat.push_back(maxabs(y1 - err - exact(h)));
    e_est.push_back(maxabs(err));
    double ed = 0.0;
    for (size_t r = 0; r < thetas.size(); ++r)
      ed = std::max(ed, maxabs(traj[static_cast<int64_t>(r)] - exact(thetas[r] * h)));
    e_dense.push_back(ed);
  }
  for (size_t i = 0; i < hs.size(); ++i)
    std::printf("  h=%-5g |y1 err| %.3e  |4th-order err| %.3e  |err estimate| %.3e  |dense err| %.3e\n",
                hs[i], e_y1[i], e_hat[i], e_est[i], e_dense[i]);
  for (size_t i = 1; i < hs.size(); ++i) {
    const std::string step = " (h " + fmt(hs[i - 1]) + " -> " + fmt(hs[i]) + ")";
    const double ry = e_y1[i - 1] / e_y1[i], rh = e_hat[i - 1] / e_hat[i];
    const double re = e_est[i - 1] / e_est[i], rd = e_dense[i - 1] / e_dense[i];
    std::printf("  ratios%s: y1 %.1f  4th-order %.1f  estimate %.1f  dense %.1f\n", step.c_str(), ry, rh, re, rd);
    expect(ry > 45.0, "y1 error is not O(h^6): ratio " + fmt(ry) + step);
    // O(h^5) gives 32; a wrong weight drops the ratio to about 16 (order 3) or 2.
    expect(rh > 20.0 && rh < 48.0, "embedded solution error is not O(h^5): ratio " + fmt(rh) + step);
    expect(re > 20.0 && re < 48.0, "error estimate is not O(h^5): ratio " + fmt(re) + step);
    expect(rd > 20.0 && rd < 48.0, "dense output error is not O(h^5): ratio " + fmt(rd) + step);
    expect(e_y1[i] < e_hat[i], "y1 is not more accurate than the embedded solution" + step);
  }
}

// batch_norm_double_backward against aten's batchnorm_double_backward formula (FunctionsManual),
// written out term for term in double loops: 2D and 4D, with and without weight and ggx.
void test_batch_norm_double_backward() {
  using Opt = std::optional<at::Tensor>;
  using Sig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const Opt&, const at::Tensor&,
                                                             const at::Tensor&, const at::Tensor&, const Opt&,
                                                             const Opt&, const Opt&);
  static const auto op = amaml::dispatch::find_op<Sig>("batch_norm_double_backward");
  const std::vector<std::vector<int64_t>> shapes = {{7, 3}, {4, 5, 3, 6}, {2, 33, 5, 7}};
  for (at::ScalarType dt : kDtypes) {
    for (const auto& shape : shapes) {
      for (int variant = 0; variant < 3; ++variant) {  // 0: all given, 1: no weight, 2: no ggx
        const std::string cs = std::string("batch_norm_double_backward ") + dtype_str(dt) + " " +
                               shape_str(shape) + (variant == 1 ? " no weight" : variant == 2 ? " no ggx" : "");
        const int64_t N = shape[0], C = shape[1];
        const at::Tensor x = at::randn(shape, g_gen, opts(dt)) * 1.7 + 0.3;
        const at::Tensor gy = at::randn(shape, g_gen, opts(dt)), ggx = at::randn(shape, g_gen, opts(dt));
        const at::Tensor w = at::rand({C}, g_gen, opts(dt)) + 0.5, ggw = at::randn({C}, g_gen, opts(dt));
        const at::Tensor ggb = at::randn({C}, g_gen, opts(dt));
        const auto stats = at::native_batch_norm(x, w, {}, {}, {}, true, 0.0, 1e-5);
        const at::Tensor mean = std::get<1>(stats), invstd = std::get<2>(stats);
        const Opt wo = variant == 1 ? Opt() : Opt(w), qo = variant == 2 ? Opt() : Opt(ggx);
        const auto out = op.call(x, wo, mean, invstd, gy, qo, ggw, ggb);
        const auto X = to_vec(x), G = to_vec(gy), Q = to_vec(ggx), W = to_vec(w), GW = to_vec(ggw);
        const auto GB = to_vec(ggb), MU = to_vec(mean), S = to_vec(invstd);
        const int64_t L = x.numel() / (N * C);
        const double M = static_cast<double>(N * L);
        std::vector<double> gi(X.size()), gg(C), ggo(X.size()), mag(X.size()), magc(C);
        for (int64_t c = 0; c < C; ++c) {
          const double mu = MU[c], s = S[c], s3 = s * s * s, wc = variant == 1 ? 1.0 : W[c];
          const double q_on = variant == 2 ? 0.0 : 1.0;
          double g_sum = 0, gxm = 0, q_sum = 0, qxm = 0, gq = 0, scale = 0;
          for (int64_t n = 0; n < N; ++n)
            for (int64_t k = 0; k < L; ++k) {
              const size_t i = static_cast<size_t>((n * C + c) * L + k);
              g_sum += G[i];
              gxm += G[i] * (X[i] - mu);
              q_sum += q_on * Q[i];
              qxm += q_on * Q[i] * (X[i] - mu);
              gq += q_on * G[i] * Q[i];
              scale = std::max(scale, std::fabs(G[i]) + std::fabs(Q[i]) + std::fabs(X[i] - mu) * s);
            }
          const double all_sub = q_sum * g_sum / M - gq + 3.0 * s * s * gxm * qxm / M;
          double ggc = 0;
          for (int64_t n = 0; n < N; ++n)
            for (int64_t k = 0; k < L; ++k) {
              const size_t i = static_cast<size_t>((n * C + c) * L + k);
              const double xm = X[i] - mu, q = q_on * Q[i];
              const double first = G[i] * s - s * g_sum / M - xm * s3 * gxm / M;  // gamma = 1
              gi[i] = wc * (xm * s3 * all_sub / M + qxm * s3 / M * (g_sum / M - G[i]) +
                            gxm * s3 / M * (q_sum / M - q)) + GW[c] * first;
              ggo[i] = wc * (q * s - s * q_sum / M - xm * s3 * qxm / M) + GW[c] * xm * s + GB[c];
              ggc += q * first;
              mag[i] = 10.0 * (1.0 + wc + std::fabs(GW[c]) + std::fabs(GB[c])) * s * s * scale * scale;
            }
          gg[c] = ggc;
          magc[c] = 10.0 * M * s * scale * scale;
        }
        check_close(cs + " grad_x", std::get<0>(out), gi, mag, tol_for(dt));
        check_close(cs + " grad_weight", std::get<1>(out), gg, magc, tol_for(dt));
        check_close(cs + " grad_grad_out", std::get<2>(out), ggo, mag, tol_for(dt));
      }
    }
  }
  const at::Tensor x = at::randn({4, 3}, g_gen, opts(at::kDouble)), m = at::zeros({3}, opts(at::kDouble));
  expect_error("batch_norm_double_backward weight shape", "'weight'",
               [&] { op.call(x, at::ones({4}, opts(at::kDouble)), m, m, x, {}, {}, {}); });
  expect_error("batch_norm_double_backward ggx dtype", "'ggx'",
               [&] { op.call(x, {}, m, m, x, x.to(at::kFloat), {}, {}); });
  expect_error("batch_norm_double_backward invstd shape", "'invstd'",
               [&] { op.call(x, {}, m, at::zeros({2}, opts(at::kDouble)), x, {}, {}, {}); });
}

struct Test {
  const char* name;
  void (*fn)();
};

const Test kTests[] = {
    {"tableau", test_tableau},           {"stage_combine", test_stage_combine},
    {"dopri5_finish", test_dopri5_finish}, {"dopri5_dense", test_dopri5_dense},
    {"heun_update", test_heun_update},   {"bad_input", test_bad_input},
    {"convergence", test_convergence},   {"threads", test_threads},
    {"batch_norm_double_backward", test_batch_norm_double_backward},
};

bool run_test(const Test& t) {
  g_test = t.name;
  const int f0 = g_failures;
  const int64_t c0 = g_checks;
  const auto t0 = std::chrono::steady_clock::now();
  try {
    t.fn();
  } catch (const c10::Error& e) {
    fail(std::string("unexpected c10::Error: ") + e.what_without_backtrace());
  } catch (const std::exception& e) {
    fail(std::string("unexpected exception: ") + e.what());
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const bool ok = g_failures == f0;
  std::printf("%s %s (%lld checks, %.2f s)\n", ok ? "PASS" : "FAIL", t.name,
              static_cast<long long>(g_checks - c0), s);
  std::fflush(stdout);
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string which = argc > 1 ? argv[1] : "all";
  if (which == "--list" || which == "-h" || which == "--help") {
    std::printf("usage: %s <test>\ntests: all", argv[0]);
    for (const auto& t : kTests) std::printf(" %s", t.name);
    std::printf("\n");
    return 0;
  }
  g_gen = at::detail::createCPUGenerator(1234);
  bool found = false, ok = true;
  for (const auto& t : kTests) {
    if (which == "all" || which == t.name) {
      found = true;
      ok = run_test(t) && ok;
    }
  }
  if (!found) {
    std::fprintf(stderr, "unknown test '%s'; run with --list for the names\n", which.c_str());
    return 2;
  }
  if (!ok) std::fprintf(stderr, "%d check(s) failed\n", g_failures);
  return ok ? 0 : 1;
}
