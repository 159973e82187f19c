"""Accuracy of the adjoint schemes on the paper's Appendix A problem.

dy/dt = -2 t^3 - 2 t y, L = (y(T) - 3)^6, exact dL/dy(0) = 6 (y(T) - 3)^5 exp(-T^2).
Prints the relative error of each adjoint method for several grids, and the same for the
torchdiffeq adjoint (odeint_adjoint, dopri5) when torchdiffeq is installed.

    python examples/adjoint_accuracy.py
"""

import math

import torch

from amaml_ext import ode


def f(t, y):
    return -2 * t**3 - 2 * t * y


def vjp(t, y, v):
    return -2 * t * v


def main():
    print(f"{'T':>4} {'N':>5} " + " ".join(f"{m:>12}" for m in ode.ADJOINT_METHODS) + f" {'dopri5 steps':>13}")
    for T in (0.5, 1.0, 2.0):
        for n in (20, 50, 200, 1000):
            traj = ode.solve_forward(f, torch.tensor([1.0], dtype=torch.float64), T, T / n, rtol=1e-10, atol=1e-12)
            lam_T = 6 * (traj.states[-1] - 3) ** 5
            exact = lam_T * math.exp(-T * T)
            errs = []
            for m in ode.ADJOINT_METHODS:
                t = traj if m != "discrete" else ode.solve_forward(f, traj.states[0], T, T / n, method="euler")
                lam_T_m = 6 * (t.states[-1] - 3) ** 5
                lam0 = ode.solve_adjoint(vjp, t, lam_T_m, method=m)
                errs.append(abs((lam0 - exact) / exact).item())
            print(f"{T:>4} {n:>5} " + " ".join(f"{e:>12.3e}" for e in errs) + f" {traj.stats.accepted_steps:>13}")
    print("\nrelative error of dL/dy(0) against the closed form; 'discrete' is the exact gradient of "
          "N Euler steps, so its error is Euler's O(h).")


if __name__ == "__main__":
    main()
