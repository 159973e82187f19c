"""The continuous adjoint's error estimate, warning, strict error and refinement, against
fine-grid references, and the RK4 adjoint's stability bound (amaml_ext.metagrad.accuracy)."""

import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import amaml_ext
from amaml_ext import (AdjointAccuracyError, AdjointAccuracyWarning, accuracy, adjoint_meta_grad, flatten_params, models,
                       ode)

from helpers import F64, ROOT, mlp, regression_task, rel, stack_tasks


def regression(seed):
    return regression_task(seed, n=30)


class SmallConv(nn.Module):
    """3 x [conv 3x3, activation, pool 2] on 16x16 images, 10 classes."""

    def __init__(self, smooth: bool, channels=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        layers, c = [], 1
        for _ in range(3):
            layers += [nn.Conv2d(c, channels, 3, padding=1), nn.GELU() if smooth else nn.ReLU(),
                       (nn.AvgPool2d if smooth else nn.MaxPool2d)(2)]
            c = channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels * 4, 10)
        self.double()

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def images(seed, n=40):
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(10, 1, 16, 16, generator=g, dtype=F64)
    y = torch.arange(n) % 10
    return protos[y] + 0.5 * torch.randn(n, 1, 16, 16, generator=g, dtype=F64), y


def scaled(loss, c):
    return lambda p, y: c * loss(p, y)


def reference(model, loss, theta, T, support, query, h):
    """The flow's gradient on a fine grid: tight dopri5 forward, RK4 adjoint."""
    return adjoint_meta_grad(model, loss, theta, T, support=support, query=query, h=h, rtol=1e-10, atol=1e-12,
                             adjoint="rk4", error_estimate=False).grad


def quiet_call(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdjointAccuracyWarning)
        return adjoint_meta_grad(*args, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("adjoint,h", [("heun", 0.05), ("heun", 0.02), ("rk4", 0.05), ("rk4", 0.025)])
def test_estimate_tracks_true_error_on_smooth_mlp(adjoint, h):
    net, s, q = mlp(), regression(0), regression(1)
    theta = flatten_params(net)
    ref = reference(net, F.mse_loss, theta, 1.0, s, q, 0.002)
    r = adjoint_meta_grad(net, F.mse_loss, theta, 1.0, support=s, query=q, h=h, adjoint=adjoint, rtol=1e-10,
                          atol=1e-12, error_tol=1.0, error_estimate="richardson")
    true = rel(r.grad, ref)
    for key in ("invariant_drift", "richardson_estimate"):
        est = r.stats[key]
        assert est / 3 <= true <= 3 * est, (key, est, true)
    assert r.stats["adjoint_error_estimate"] == max(r.stats["invariant_drift"], r.stats["richardson_estimate"])
    d = adjoint_meta_grad(net, F.mse_loss, theta, 1.0, support=s, query=q, h=h, adjoint=adjoint, rtol=1e-10,
                          atol=1e-12, error_tol=1.0)
    assert d.stats["richardson_estimate"] is None
    assert d.stats["adjoint_error_estimate"] == pytest.approx(r.stats["invariant_drift"], rel=1e-9)


@pytest.mark.slow
def test_no_false_alarm_cosmixture_defaults():
    net = models.mlp(width=32).double()
    pool = amaml_ext.tasks.CosMixture(50, 50).pool(5, seed=0).all(dtype=F64)
    theta = flatten_params(net)
    r = quiet_call(net, F.mse_loss, theta, 0.5, support=pool.support, query=pool.query, batched=True)
    assert r.stats["adjoint_error_estimate"] < 1e-2
    assert r.stats["h_lambda_max"] is None      # only computed past the tolerance
    ref = adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=pool.support, query=pool.query, batched=True,
                            h=0.001, adjoint="rk4", error_estimate=False).grad
    true = max(rel(r.grad[b], ref[b]) for b in range(5))
    assert r.stats["adjoint_error_estimate"] / 3 <= true <= 3 * r.stats["adjoint_error_estimate"]


@pytest.mark.slow
def test_smooth_conv_quiet_and_close():
    net, s, q = SmallConv(True), images(0), images(1)
    theta = flatten_params(net)
    r = quiet_call(net, F.cross_entropy, theta, 1.0, support=s, query=q, h=0.01, solver="rk4",
                   error_estimate="richardson")
    ref = adjoint_meta_grad(net, F.cross_entropy, theta, 1.0, support=s, query=q, h=0.0025, solver="rk4",
                            adjoint="rk4", error_estimate=False).grad
    true = rel(r.grad, ref)
    assert r.stats["adjoint_error_estimate"] < 1e-2
    for key in ("invariant_drift", "richardson_estimate"):
        assert r.stats[key] / 3 <= true <= 3 * r.stats[key], (key, r.stats[key], true)


@pytest.mark.slow
def test_relu_maxpool_is_flagged():
    net, s, q = SmallConv(False), images(0), images(1)
    theta = flatten_params(net)
    for h in (0.05, 0.01):
        with pytest.warns(AdjointAccuracyWarning, match="not smooth") as rec:
            r = adjoint_meta_grad(net, F.cross_entropy, theta, 1.0, support=s, query=q, h=h, solver="rk4",
                                  error_estimate="richardson")
        assert r.stats["invariant_drift"] > 1e-2
        msg = next(str(w.message) for w in rec if w.category is AdjointAccuracyWarning)
        assert f"h={h:g}" in msg and "adjoint='discrete'" in msg and "h * lambda_max" in msg
        assert "features.1 (ReLU)" in msg
    # step doubling alone would pass it: both of its solves converge to the classical adjoint
    assert r.stats["richardson_estimate"] < 1e-2
    # a ReLU applied functionally is invisible to the module scan: the drift still flags it
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = SmallConv(True)

        def forward(self, x):
            for i in range(3):
                x = F.max_pool2d(F.relu(self.inner.features[3 * i](x)), 2)
            return self.inner.head(x.flatten(1))

    fnet = Functional()
    with pytest.warns(AdjointAccuracyWarning, match="invariant drift") as rec:
        adjoint_meta_grad(fnet, F.cross_entropy, flatten_params(fnet), 1.0, support=s, query=q, h=0.01, solver="rk4")


@pytest.mark.slow
def test_stiff_is_flagged_names_numbers_and_strict_raises():
    net, s, q = mlp(), regression(0), regression(1)
    theta = flatten_params(net)
    loss = scaled(F.mse_loss, 20.0)           # Hessian x 20: h * lambda_max past Heun's bound 2
    with pytest.warns(AdjointAccuracyWarning) as rec:
        r = adjoint_meta_grad(net, loss, theta, 0.5, support=s, query=q, h=0.05)
    hl = r.stats["h_lambda_max"]
    assert hl is not None and hl > 2
    ref = reference(net, loss, theta, 0.5, s, q, 0.0005)
    assert rel(r.grad, ref) > 1e-2            # the gradient really is wrong
    assert r.stats["adjoint_error_estimate"] == math.inf      # its adjoint saw h * lambda past the bound
    msg = next(str(w.message) for w in rec if w.category is AdjointAccuracyWarning)
    for piece in ("has no error bound", "h=0.05", f"{hl:.3g}", "stability bound 2",
                  "solver='euler', adjoint='discrete'"):
        assert piece in msg, (piece, msg)
    with pytest.raises(AdjointAccuracyError, match="no error bound"):
        adjoint_meta_grad(net, loss, theta, 0.5, support=s, query=q, h=0.05, strict=True)


@pytest.mark.slow
def test_refine_meets_tolerance_on_stiff_smooth_model():
    net, s, q = mlp(), regression(0), regression(1)
    theta = flatten_params(net)
    loss = scaled(F.mse_loss, 10.0)
    ref = reference(net, loss, theta, 0.5, s, q, 0.0005)
    r = quiet_call(net, loss, theta, 0.5, support=s, query=q, h=0.05, refine=True)
    assert r.stats["h"] < 0.05
    assert r.stats["adjoint_error_estimate"] <= 1e-2
    assert rel(r.grad, ref) <= 1e-2


def test_exact_mode_has_no_estimate():
    net, s, q = mlp(), regression(0), regression(1)
    r = quiet_call(net, scaled(F.mse_loss, 400.0), flatten_params(net), 0.5, support=s, query=q, h=0.05,
                   solver="euler", adjoint="discrete")
    assert r.stats["adjoint_error_estimate"] is None and r.stats["error_tol"] is None


def test_estimate_off_changes_nothing_else():
    net, s, q = mlp(), regression(0), regression(1)
    theta = flatten_params(net)
    a = adjoint_meta_grad(net, F.mse_loss, theta, 1.0, support=s, query=q, h=0.05)
    b = adjoint_meta_grad(net, F.mse_loss, theta, 1.0, support=s, query=q, h=0.05, error_estimate=False)
    assert torch.equal(a.grad, b.grad)
    assert b.stats["adjoint_error_estimate"] is None
    c = adjoint_meta_grad(net, F.mse_loss, theta, 1.0, support=s, query=q, h=0.05, error_estimate="richardson")
    assert torch.equal(a.grad, c.grad)
    assert a.stats["hvps"] == b.stats["hvps"] and a.stats["linearisations"] == b.stats["linearisations"]
    assert c.stats["hvps"] == b.stats["hvps"] * 3 // 2 and c.stats["linearisations"] == b.stats["linearisations"]
    with pytest.raises(ValueError, match="error_estimate"):
        adjoint_meta_grad(net, F.mse_loss, theta, 1.0, support=s, query=q, error_estimate="yes")


@pytest.mark.slow
@pytest.mark.parametrize("adjoint", ["heun", "rk4"])
@pytest.mark.parametrize("T", [1.0, 1.05, 1.15])
def test_checkpoint_and_per_task_horizons_estimate(adjoint, T):
    """Segments and phases start off the coarse grid: the estimate is the same with checkpoints,
    and still tracks the true error with per-task horizons."""
    net = mlp()
    xs, ys = stack_tasks(regression(i) for i in range(3))
    theta = flatten_params(net)
    kw = dict(support=(xs, ys), query=(xs, ys), h=0.05, batched=True, adjoint=adjoint, error_tol=1.0,
              error_estimate="richardson")
    a = adjoint_meta_grad(net, F.mse_loss, theta, T, **kw)
    b = adjoint_meta_grad(net, F.mse_loss, theta, T, memory="checkpoint", **kw)
    assert torch.equal(a.grad, b.grad)
    assert a.stats["adjoint_error_estimate"] == pytest.approx(b.stats["adjoint_error_estimate"], rel=1e-9)
    Ts = torch.tensor([T, 0.6, 0.85], dtype=F64)
    c = adjoint_meta_grad(net, F.mse_loss, theta, Ts, **kw)
    kw2 = dict(kw, h=0.002, error_estimate=False, adjoint="rk4", rtol=1e-10, atol=1e-12)
    ref = adjoint_meta_grad(net, F.mse_loss, theta, Ts, **kw2).grad
    true = max(rel(c.grad[i], ref[i]) for i in range(3))
    est = c.stats["adjoint_error_estimate"]
    assert est / 5 <= true <= 5 * est, (est, true)


def test_ode_solve_adjoint_estimate_appendix_a():
    f = lambda t, y: -2 * t ** 3 - 2 * t * y
    vjp = lambda t, y, v: -2 * t * v
    for method, p in (("heun", 2), ("rk4", 4)):
        traj = ode.solve_forward(f, torch.tensor([1.0], dtype=F64), 1.0, 0.05, method="rk4")
        yT = traj.states[-1]
        lam0, st = ode.solve_adjoint(vjp, traj, 6 * (yT - 3) ** 5, method=method, return_stats=True,
                                     error_estimate=True)
        exact = 6 * (yT - 3) ** 5 * math.exp(-1.0)
        true = rel(lam0, exact)
        assert st.error_estimate / 3 <= true <= 3 * st.error_estimate, (method, st.error_estimate, true)


def test_bad_accuracy_arguments():
    net, s, q = mlp(), regression(0), regression(1)
    theta = flatten_params(net)
    with pytest.raises(ValueError, match="error_tol"):
        adjoint_meta_grad(net, F.mse_loss, theta, 1.0, support=s, query=q, error_tol=0.0)
    with pytest.raises(TypeError, match="strict"):
        adjoint_meta_grad(net, F.mse_loss, theta, 1.0, support=s, query=q, strict="yes")


def test_conv4_smooth_variant():
    smooth = models.Conv4(ways=5, channels=4, activation="gelu", pool="avg")
    assert any(isinstance(m, nn.GELU) for m in smooth.modules())
    assert any(isinstance(m, nn.AvgPool2d) for m in smooth.modules())
    assert not any(isinstance(m, (nn.ReLU, nn.MaxPool2d)) for m in smooth.modules())
    plain = models.Conv4(ways=5, channels=4)
    assert any(isinstance(m, nn.ReLU) for m in plain.modules())
    assert sum(p.numel() for p in smooth.parameters()) == sum(p.numel() for p in plain.parameters())
    with pytest.raises(ValueError, match="activation"):
        models.Conv4(activation="swish")
    with pytest.raises(ValueError, match="pool"):
        models.Conv4(pool="min")


def test_learner_strict_and_metrics_column(tmp_path):
    from amaml_ext import learners, train
    net = mlp()
    pool = amaml_ext.tasks.CosMixture(20, 20).pool(4, seed=0)
    stiff = learners.AMAML(net, scaled(F.mse_loss, 20.0), T=0.5, h=0.05, strict=True)
    with pytest.raises(AdjointAccuracyError, match="meta-step 1"):
        train.meta_train(stiff, pool, meta_steps=2, out_dir=str(tmp_path / "a"), meta_batch=2, dtype=F64)
    ok = learners.AMAML(net, F.mse_loss, T=0.5, h=0.05)
    train.meta_train(ok, pool, meta_steps=2, out_dir=str(tmp_path / "b"), meta_batch=2, dtype=F64, progress=False)
    header = (tmp_path / "b" / "metrics.csv").read_text().splitlines()[0]
    assert "adjoint_error_estimate" in header


@pytest.mark.slow
def test_readme_accuracy_example_runs():
    """The README's example of the estimate runs as written (and warns on the ReLU/max-pool net)."""
    import pathlib
    readme = (pathlib.Path(ROOT) / "README.md").read_text()
    block = readme.split("## How far to trust a continuous meta-gradient")[1].split("```python")[1].split("```")[0]
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["r"].stats["adjoint_error_estimate"] <= 1e-2          # the smooth Conv4, strict
    assert scope["w"] and scope["w"][-1].category is AdjointAccuracyWarning
    assert scope["exact"].stats["adjoint_error_estimate"] is None


# -- the RK4 adjoint's stability bound (issue 23, item 8) -----------------------------------------

def _quadratic(h_lambda, h=0.01, n=200):
    """w -> (a w)^2 on one point: Hessian lambda = 2 a^2; the RK4 adjoint over ``n`` steps of h."""
    net = nn.Linear(1, 1, bias=False).double()
    a = math.sqrt(h_lambda / h / 2)
    x, y = torch.full((1, 1), a, dtype=F64), torch.zeros(1, 1, dtype=F64)
    theta = torch.ones(1, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = adjoint_meta_grad(net, F.mse_loss, theta, n * h, support=(x, y), query=(x, y), h=h, solver="rk4",
                              adjoint="rk4", error_tol=1e9)
    return float(r.grad.abs()), 2 * a * a * float(r.params.abs())       # |lam(0)|, |lam(T)|


def test_rk4_adjoint_stability_bound_is_where_it_blows_up():
    bound = accuracy.stability_bound("rk4", "rk4")
    assert bound == pytest.approx(2.7852935634 / 2, rel=1e-9)
    assert accuracy.stability_bound("rk4", "heun") == pytest.approx(2.0)
    lam0, lamT = _quadratic(0.97 * bound)
    assert lam0 < lamT                               # decays backward, as the exact adjoint does
    lam0, lamT = _quadratic(1.03 * bound)
    assert lam0 > 1e3 * lamT                         # grows without bound past it


def test_rk4_adjoint_message_says_beyond_the_bound():
    net = nn.Linear(1, 1, bias=False).double()
    a = math.sqrt(1.8 / 0.01 / 2)
    x, y = torch.full((1, 1), a, dtype=F64), torch.zeros(1, 1, dtype=F64)
    with pytest.warns(amaml_ext.AdjointAccuracyWarning, match=r"1\.8, beyond the stability bound 1\.393 of the rk4 "
                                                              r"adjoint"):
        adjoint_meta_grad(net, F.mse_loss, torch.ones(1, dtype=F64), 1.0, support=(x, y), query=(x, y), h=0.01,
                          solver="rk4", adjoint="rk4")


def _stiff_direction_unseen(a2, h=0.01, T=0.5, dtype=F64, **kw):
    """Gradient flow of ((a w1 - y1)^2 + (w2 - y2)^2) / 2 (Hessian diag(a2, 1)) from w1 = y1 / a, so
    the training gradient has no w1 component anywhere: the invariant cannot see the w1 component
    of the adjoint (as on Alpine, where a Heun adjoint past its bound reached 1e20 unflagged). The
    result and the closed form ``e^{-AT} dV/du(T)``."""
    a = math.sqrt(a2)
    net = nn.Linear(2, 1, bias=False).to(dtype)
    xs = torch.tensor([[a, 0.0], [0.0, 1.0]], dtype=dtype)
    ys = torch.tensor([[a * 0.3], [1.0]], dtype=dtype)
    xq, yq = torch.tensor([[1.0, 1.0]], dtype=dtype), torch.zeros(1, 1, dtype=dtype)
    theta = torch.tensor([0.3, -0.5], dtype=dtype)
    r = adjoint_meta_grad(net, F.mse_loss, theta, T, support=(xs, ys), query=(xq, yq), h=h, **kw)
    w2 = 1.0 + (-0.5 - 1.0) * math.exp(-T)                 # w1 stays at 0.3
    dv = 2 * (0.3 + w2)                                    # d/dw of (w1 + w2)^2, both components
    exact = torch.tensor([math.exp(-a2 * T) * dv, math.exp(-T) * dv], dtype=F64)
    return r, exact


def test_an_adjoint_past_its_stability_bound_is_flagged_where_the_invariant_is_blind():
    with pytest.warns(AdjointAccuracyWarning) as rec:
        r, exact = _stiff_direction_unseen(300.0)            # h * lambda = 3 > Heun's 2
    assert rel(r.grad, exact) > 1e6                          # the gradient really is wrong, by far
    assert r.stats["invariant_drift"] < 1e-3                 # and the invariant alone does not see it
    assert r.stats["adjoint_error_estimate"] == math.inf
    assert r.stats["h_lambda_max"] == pytest.approx(3.0, rel=1e-3)
    msg = next(str(w.message) for w in rec if w.category is AdjointAccuracyWarning)
    assert "has no error bound" in msg and "3, beyond the stability bound 2 of the heun adjoint" in msg
    with pytest.raises(AdjointAccuracyError, match="no error bound"):
        _stiff_direction_unseen(300.0, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdjointAccuracyWarning)
        fixed, _ = _stiff_direction_unseen(300.0, refine=True)         # a finer grid, within the bound
        assert fixed.stats["h"] < 0.01 * 2 / 3 and rel(fixed.grad, exact) < 1e-2
        ok, exact = _stiff_direction_unseen(150.0)                   # h * lambda = 1.5: stable, quiet
    assert rel(ok.grad, exact) < 1e-2 and ok.stats["adjoint_error_estimate"] < 1e-2


def test_rayleigh_quotients_are_kept_in_float64():
    m = accuracy.ErrorMonitor(grad_at=lambda row: None)
    m.add(torch.zeros(2, 3), torch.zeros(2, 3))
    x = torch.tensor([[1e20, 0.0, 0.0], [1.0, 1.0, 0.0]])          # float32: x . x overflows
    m.observe(x, 4.0 * x)
    assert m.curvature.tolist() == [4.0, 4.0] and m.lambda_seen() == 4.0
    m.observe(2 * x, 2 * x, x, mask=torch.tensor([[1.0], [0.0]]))    # lr 2: x.Hx / x.v = 4 x.x / 2 x.x
    assert m.curvature.tolist() == [4.0, 4.0]
    m.observe(3 * x, 3 * x, x, mask=torch.tensor([[1.0], [0.0]]))    # lr 3: 9 x.x / 3 x.x = 3 < 4 kept
    m.observe(x, 9.0 * x, mask=torch.tensor([[0.0], [1.0]]))         # a frozen row 0 is skipped
    assert m.curvature.tolist() == [4.0, 9.0]
    m.observe(x, torch.full_like(x, math.inf))        # an overflowed product gives no quotient (its solve is
    assert m.lambda_seen() == 9.0                     # refused elsewhere), and it hides none of the others


def test_an_adjoint_that_overflows_past_its_bound_says_so_and_refine_recovers():
    """h * lambda = 6 past Heun's 2: the w1 component of the adjoint grows by 13x a step and
    overflows float32 over 50 steps; the flow is finite. Not 'the inner loop diverged'."""
    kw = dict(h=0.01, T=0.5)
    with pytest.raises(accuracy.AdjointUnstable, match=r"adjoint_meta_grad: the heun adjoint \(h=0.01, T=0.5\) "
                                                       r"overflowed: .* at least 6, past .*bound 2,") as e:
        _stiff_direction_unseen(600.0, dtype=torch.float32, **kw)
    assert isinstance(e.value, FloatingPointError) and e.value.h_within <= 0.01 * 2 / 6 / 2 * 1.01
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdjointAccuracyWarning)
        r, exact = _stiff_direction_unseen(600.0, dtype=torch.float32, refine=True, **kw)
    assert r.stats["h"] < 0.01 / 3 and rel(r.grad.double(), exact) < 1e-2



def test_the_stability_check_runs_without_the_estimate_and_a_companion_overflow_is_not_blamed_on_it():
    with pytest.raises(accuracy.AdjointUnstable, match="at least 6, past"):     # estimate off: still named
        _stiff_direction_unseen(600.0, dtype=torch.float32, error_estimate=False)
    # h * lambda = 1.5 is within Heun's bound 2, but step doubling's 2h companion (3) overflows float32
    with pytest.warns(AdjointAccuracyWarning, match="has no error estimate: a solve behind it overflowed"):
        r, exact = _stiff_direction_unseen(150.0, T=2.0, dtype=torch.float32, error_estimate="richardson")
    assert r.stats["adjoint_error_estimate"] == math.inf and rel(r.grad.double(), exact) < 1e-2
    assert r.stats["h_lambda_max"] == pytest.approx(1.5, rel=1e-2)
