// Every Butcher tableau of the solvers, once: Dormand-Prince 5(4) with the dense-output
// coefficients of Hairer's DOPRI5 code, classical RK4, Heun (explicit trapezoidal rule) and
// explicit Euler. Pure data: read by the CPU and CUDA kernels (dopri5), the solver drivers
// (csrc/solvers/*.cpp), the C++ tests, and from Python through _C.tableaus()
// (amaml_ext.reference).
#pragma once

namespace amaml {

// ---- Dormand-Prince 5(4) (Hairer, Norsett & Wanner, "Solving ODEs I", II.5, Table 5.2) --------
namespace dopri5 {

constexpr int kStages = 7;

// Nodes c_i.
constexpr double c[kStages] = {0.0, 1.0 / 5.0, 3.0 / 10.0, 4.0 / 5.0, 8.0 / 9.0, 1.0, 1.0};

// Rows a_{i,j} (j < i) of the Runge-Kutta matrix for stages 2..7; row 7 equals b (FSAL).
constexpr double a2[1] = {1.0 / 5.0};
constexpr double a3[2] = {3.0 / 40.0, 9.0 / 40.0};
constexpr double a4[3] = {44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0};
constexpr double a5[4] = {19372.0 / 6561.0, -25360.0 / 2187.0, 64448.0 / 6561.0, -212.0 / 729.0};
constexpr double a6[5] = {9017.0 / 3168.0, -355.0 / 33.0, 46732.0 / 5247.0, 49.0 / 176.0,
                          -5103.0 / 18656.0};

// 5th-order weights b_i (b_7 = 0). Only the first six enter the solution.
constexpr double b[6] = {35.0 / 384.0, 0.0, 500.0 / 1113.0, 125.0 / 192.0, -2187.0 / 6784.0,
                         11.0 / 84.0};

// a_rows[i] is row i + 1 of the Runge-Kutta matrix (i + 1 entries); a_rows[0] is empty.
constexpr const double* a_rows[kStages] = {nullptr, a2, a3, a4, a5, a6, b};

// Embedded error weights e_i = b_i - bhat_i, bhat the 4th-order weights.
constexpr double e[kStages] = {71.0 / 57600.0,  0.0,           -71.0 / 16695.0, 71.0 / 1920.0,
                               -17253.0 / 339200.0, 22.0 / 525.0, -1.0 / 40.0};

// Dense output (Hairer's contd5): with ydiff = y1 - y0, bspl = h k1 - ydiff,
//   r1 = y0, r2 = ydiff, r3 = bspl, r4 = ydiff - h k7 - bspl,
//   r5 = h (d1 k1 + d3 k3 + d4 k4 + d5 k5 + d6 k6 + d7 k7),
//   y(t0 + theta h) = r1 + theta (r2 + (1-theta) (r3 + theta (r4 + (1-theta) r5))).
constexpr double d[kStages] = {-12715105075.0 / 11282082432.0, 0.0,
                               87487479700.0 / 32700410799.0,  -10690763975.0 / 1880347072.0,
                               701980252875.0 / 199316789632.0, -1453857185.0 / 822651844.0,
                               69997945.0 / 29380423.0};

// b_2 = e_2 = d_2 = 0: the solution, the error estimate and the dense output never read k2.
// The kernels therefore take the stages without k2 (kernel order k1, k3, k4, k5, k6, k7) and
// these weights, which saves one of the 8-9 vectors each pass would otherwise read.
constexpr int kSolStages = 5;    // k1, k3, k4, k5, k6
constexpr int kErrStages = 6;    // k1, k3, k4, k5, k6, k7
constexpr double b_nz[kSolStages] = {b[0], b[2], b[3], b[4], b[5]};
constexpr double e_nz[kErrStages] = {e[0], e[2], e[3], e[4], e[5], e[6]};
constexpr double d_nz[kErrStages] = {d[0], d[2], d[3], d[4], d[5], d[6]};

}  // namespace dopri5

// ---- classical Runge-Kutta of order 4 (Hairer, Norsett & Wanner, II.1, Table 1.2) -------
// Its matrix is zero but for the subdiagonal, a_{i,i-1} = c_i: stage i is evaluated at
// y + h c_i k_{i-1}.
namespace rk4 {

constexpr int kStages = 4;
constexpr double c[kStages] = {0.0, 1.0 / 2.0, 1.0 / 2.0, 1.0};
constexpr double b[kStages] = {1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0};

}  // namespace rk4

// ---- Heun: the explicit trapezoidal rule, order 2 (a_21 = 1) --------------------------------
// The heun_update kernel applies exactly these weights: predictor lam + h a, corrector
// lam + h/2 (a + b).
namespace heun {

constexpr int kStages = 2;
constexpr double c[kStages] = {0.0, 1.0};
constexpr double b[kStages] = {1.0 / 2.0, 1.0 / 2.0};

}  // namespace heun

// ---- explicit Euler, order 1 ----------------------------------------------------------------
namespace euler {

constexpr int kStages = 1;
constexpr double c[kStages] = {0.0};
constexpr double b[kStages] = {1.0};

}  // namespace euler

}  // namespace amaml
