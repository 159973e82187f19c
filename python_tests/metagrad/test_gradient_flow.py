"""gradient_flow: u(T) in the autograd graph, with gradients for theta, the step sizes lr, the
horizon T and adjoint_params. References: autograd through the unrolled GD steps (exact mode),
fine-grid solves (continuous mode, orders 2 and 4), central differences (T)."""

import warnings

import pytest
import torch
from torch.nn import functional as F

import amaml_ext
from amaml_ext import AdjointAccuracyError, AdjointAccuracyWarning, flatten_params, gradient_flow, unflatten_params
from helpers import F64, ROOT, mlp, regression_task, rel, stack_tasks

EXACT = dict(solver="euler", adjoint="discrete")


def make_problem(seed=0, width=6, tasks=None):
    net = mlp(seed, width=width, depth=1)
    sup = regression_task(seed + 1, n=10) if tasks is None else stack_tasks(regression_task(seed + 1 + b, n=10)
                                                                            for b in range(tasks))
    qry = regression_task(seed + 50, n=7) if tasks is None else stack_tasks(regression_task(seed + 50 + b, n=7)
                                                                            for b in range(tasks))
    phi = torch.tensor(0.3, dtype=F64, requires_grad=True)

    def loss(pred, y):          # a training loss with a learnable weight in its closure
        return F.mse_loss(pred, y) + phi * pred.pow(2).mean()
    theta = flatten_params(net).detach().requires_grad_()
    lr = (0.5 + torch.rand(theta.numel(), dtype=F64, generator=torch.Generator().manual_seed(seed))).requires_grad_()
    return net, loss, phi, theta, lr, sup, qry


def query_loss(net, u, qry):
    """J(u(T)): the query loss (summed over tasks when batched)."""
    f = lambda w, x: torch.func.functional_call(net, unflatten_params(net, w), (x,))  # noqa: E731
    if u.dim() == 1:
        return F.mse_loss(f(u, qry[0]), qry[1])
    return sum(F.mse_loss(f(u[b], qry[0][b]), qry[1][b]) for b in range(u.shape[0]))


def unrolled(net, loss, theta, lr, sup, K, h):
    """K GD steps u <- u - h lr grad L(u) with create_graph: autograd's reference."""
    u = theta
    for _ in range(K):
        pred = torch.func.functional_call(net, unflatten_params(net, u), (sup[0],))
        (g,) = torch.autograd.grad(loss(pred, sup[1]), u, create_graph=True)
        u = u - h * (lr if lr is not None else 1.0) * g
    return u


@pytest.mark.parametrize("lr_kind", ["vector", "scalar", "none"])
@pytest.mark.parametrize("memory", ["store", "checkpoint"])
def test_exact_mode_equals_unrolled_autograd(lr_kind, memory):
    net, loss, phi, theta, lr, sup, qry = make_problem()
    lr = {"vector": lr, "scalar": torch.tensor(0.8, dtype=F64, requires_grad=True), "none": None}[lr_kind]
    K, h = 12, 0.1
    inputs = [theta, phi] + ([lr] if lr is not None else [])
    u = gradient_flow(net, loss, theta, K * h, sup, h=h, lr=lr, adjoint_params=[phi], memory=memory, **EXACT)
    got = torch.autograd.grad(query_loss(net, u, qry), inputs)
    want = torch.autograd.grad(query_loss(net, unrolled(net, loss, theta, lr, sup, K, h), qry), inputs)
    for name, a, b in zip(["theta", "phi", "lr"], got, want):
        assert a.shape == b.shape
        assert rel(a, b) < 1e-10, name


def test_batched_exact_mode_equals_unrolled_and_a_loop_over_tasks():
    net, loss, phi, theta, lr, sup, qry = make_problem(tasks=3)
    K, h = 8, 0.1
    u = gradient_flow(net, loss, theta, K * h, sup, h=h, lr=lr, adjoint_params=[phi], batched=True, **EXACT)
    assert u.shape == (3, theta.numel())
    got = torch.autograd.grad(query_loss(net, u, qry), [theta, lr, phi])
    loop = [torch.zeros_like(t) for t in (theta, lr, phi)]
    for b in range(3):
        ub = gradient_flow(net, loss, theta, K * h, (sup[0][b], sup[1][b]), h=h, lr=lr, adjoint_params=[phi], **EXACT)
        for acc, g in zip(loop, torch.autograd.grad(query_loss(net, ub, (qry[0][b], qry[1][b])), [theta, lr, phi])):
            acc += g
        want = torch.autograd.grad(query_loss(net, unrolled(net, loss, theta, lr, (sup[0][b], sup[1][b]), K, h),
                                              (qry[0][b], qry[1][b])), [theta])[0]
        assert rel(ub.detach(), unrolled(net, loss, theta, lr, (sup[0][b], sup[1][b]), K, h).detach()) < 1e-12
        assert want.shape == theta.shape
    for a, b in zip(got, loop):
        assert rel(a, b) < 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("adjoint,order", [("heun", 2), ("rk4", 4)])
def test_continuous_gradients_converge_at_the_schemes_order(adjoint, order):
    net, loss, phi, theta, lr, sup, qry = make_problem()
    T = 1.2
    inputs = [theta, lr, phi]
    u = gradient_flow(net, loss, theta, T, sup, h=0.004, solver="rk4", adjoint="rk4", lr=lr, adjoint_params=[phi])
    ref = torch.autograd.grad(query_loss(net, u, qry), inputs)
    errors = []
    for h in (0.1, 0.05, 0.025):
        u = gradient_flow(net, loss, theta, T, sup, h=h, solver="rk4", adjoint=adjoint, lr=lr, adjoint_params=[phi])
        errors.append([rel(a, b) for a, b in zip(torch.autograd.grad(query_loss(net, u, qry), inputs), ref)])
    for name, k in zip(["theta", "lr", "phi"], range(3)):
        ratio = errors[1][k] / errors[2][k]
        assert ratio > 0.75 * 2 ** order, (name, [e[k] for e in errors])
        assert errors[2][k] < (1e-2 if order == 2 else 2e-4), name


@pytest.mark.slow
def test_T_gradient_matches_central_differences():
    net, loss, _, theta, lr, sup, qry = make_problem()
    T = torch.tensor(1.2, dtype=F64, requires_grad=True)
    opts = dict(h=0.004, solver="rk4", adjoint="rk4")
    u = gradient_flow(net, loss, theta, T, sup, lr=lr, **opts)
    (dT,) = torch.autograd.grad(query_loss(net, u, qry), [T])
    assert dT.shape == T.shape

    def J(t):
        with torch.no_grad():
            return query_loss(net, gradient_flow(net, loss, theta.detach(), t, sup, lr=lr.detach(), **opts), qry).item()
    # Richardson-extrapolated central differences (error O(eps^4))
    d1 = (J(1.2 + 0.04) - J(1.2 - 0.04)) / 0.08
    d2 = (J(1.2 + 0.02) - J(1.2 - 0.02)) / 0.04
    fd = (4 * d2 - d1) / 3
    assert abs(dT.item() - fd) / abs(fd) < 1e-5


def test_per_task_horizons_get_per_task_T_gradients():
    net, loss, _, theta, _, sup, qry = make_problem(tasks=2)
    T = torch.tensor([0.6, 1.0], dtype=F64, requires_grad=True)
    opts = dict(h=0.01, solver="rk4", adjoint="rk4")
    u = gradient_flow(net, loss, theta, T, sup, batched=True, **opts)
    dT, dtheta = torch.autograd.grad(query_loss(net, u, qry), [T, theta])
    assert dT.shape == (2,)
    want_theta = torch.zeros_like(theta)
    for b in range(2):
        tb = T[b].detach().clone().requires_grad_()
        ub = gradient_flow(net, loss, theta, tb, (sup[0][b], sup[1][b]), **opts)
        g_t, g_theta = torch.autograd.grad(query_loss(net, ub, (qry[0][b], qry[1][b])), [tb, theta])
        assert abs(dT[b].item() - g_t.item()) <= 1e-8 * abs(g_t.item())
        want_theta += g_theta
    assert rel(dtheta, want_theta) < 1e-6


def test_gradcheck_exact_mode():
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(1, 2), torch.nn.Tanh(), torch.nn.Linear(2, 1)).to(F64)
    xs, ys = torch.randn(4, 1, dtype=F64), torch.randn(4, 1, dtype=F64)
    phi = torch.tensor(0.2, dtype=F64, requires_grad=True)
    theta = flatten_params(net).detach().requires_grad_()
    lr = torch.full((theta.numel(),), 0.9, dtype=F64, requires_grad=True)

    def fn(theta, lr, phi):
        loss = lambda p, y: F.mse_loss(p, y) + phi * p.pow(2).mean()  # noqa: E731
        return gradient_flow(net, loss, theta, 0.3, (xs, ys), h=0.1, lr=lr, adjoint_params=[phi], **EXACT)
    assert torch.autograd.gradcheck(fn, (theta, lr, phi), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_adjoint_meta_grad_is_gradient_flow_and_backward():
    for tasks, opts in ((None, dict(solver="dopri5", adjoint="heun")), (3, EXACT), (3, dict(solver="rk4", adjoint="rk4"))):
        net, _, _, theta, _, sup, qry = make_problem(tasks=tasks)
        r = amaml_ext.adjoint_meta_grad(net, F.mse_loss, theta.detach(), 0.5, support=sup, query=qry, h=0.05,
                                        batched=tasks is not None, **opts)
        u = gradient_flow(net, F.mse_loss, theta, 0.5, sup, h=0.05, batched=tasks is not None, **opts)
        (g,) = torch.autograd.grad(query_loss(net, u, qry), [theta])
        assert rel(u.detach(), r.params) < 1e-14
        assert rel(g, r.grad if tasks is None else r.grad.sum(0)) < 1e-12


def test_optimiser_loop_over_theta_and_lr():
    net, _, _, theta, lr, sup, qry = make_problem()
    log_lr = torch.zeros_like(lr, requires_grad=True)
    opt = torch.optim.Adam([theta, log_lr], lr=0.02)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        u = gradient_flow(net, F.mse_loss, theta, 0.5, sup, h=0.05, lr=log_lr.exp(), **EXACT)
        J = query_loss(net, u, qry)
        J.backward()
        losses.append(J.item())
        assert theta.grad is not None and log_lr.grad is not None and bool(log_lr.grad.abs().sum() > 0)
        opt.step()
    assert losses[-1] < 0.8 * losses[0]


def test_two_flows_in_a_row_backpropagate_through_both():
    net, loss, phi, theta, lr, sup, qry = make_problem()
    u1 = gradient_flow(net, loss, theta, 0.4, sup, h=0.1, lr=lr, adjoint_params=[phi], **EXACT)
    u2 = gradient_flow(net, loss, u1, 0.3, qry, h=0.1, lr=lr, adjoint_params=[phi], **EXACT)
    got = torch.autograd.grad(query_loss(net, u2, sup), [theta, lr, phi])
    ref = unrolled(net, loss, unrolled(net, loss, theta, lr, sup, 4, 0.1), lr, qry, 3, 0.1)
    want = torch.autograd.grad(query_loss(net, ref, sup), [theta, lr, phi])
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-10
    # and one flow used twice (two backward passes through it)
    u = gradient_flow(net, loss, theta, 0.4, sup, h=0.1, **EXACT)
    (first,) = torch.autograd.grad(query_loss(net, u, qry), [theta], retain_graph=True)
    (second,) = torch.autograd.grad(query_loss(net, u, qry), [theta])
    assert torch.equal(first, second)


def test_stats_and_accuracy_warning_reach_the_caller():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(F64)
    xs = 8 * torch.randn(20, 2, dtype=F64)          # large inputs: a stiff flow, h * lambda_max >> 2
    ys = torch.randn(20, 1, dtype=F64)
    theta = flatten_params(net).detach().requires_grad_()
    stats = {}
    u = gradient_flow(net, F.mse_loss, theta, 1.0, (xs, ys), h=0.1, solver="rk4", stats=stats)
    assert stats["grid_steps"] == 10
    with pytest.warns(AdjointAccuracyWarning, match="gradient_flow: .*estimated relative error"):
        u.sum().backward()
    assert stats["adjoint_error_estimate"] > 1e-2 and stats["hvps"] > 0
    u = gradient_flow(net, F.mse_loss, theta, 1.0, (xs, ys), h=0.1, solver="rk4", strict=True)
    with pytest.raises(AdjointAccuracyError):
        u.sum().backward()
    u = gradient_flow(net, F.mse_loss, theta, 1.0, (xs, ys), h=0.1, **EXACT)   # exact mode: no estimate
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdjointAccuracyWarning)
        u.sum().backward()


def test_bad_arguments_are_named():
    net, loss, phi, theta, lr, sup, _ = make_problem()
    with pytest.raises(ValueError, match=r"'lr' must be a scalar or have theta's shape \[\d+\].*got shape \(3,\)"):
        gradient_flow(net, loss, theta, 0.5, sup, lr=torch.ones(3, dtype=F64))
    bad = lr.detach().clone()
    bad[4] = -0.1
    with pytest.raises(ValueError, match="'lr' must be finite and > 0 everywhere.*-0.1 at index 4"):
        gradient_flow(net, loss, theta, 0.5, sup, lr=bad)
    with pytest.raises(ValueError, match="'T' requires grad, but adjoint='discrete'"):
        gradient_flow(net, loss, theta, torch.tensor(0.5, dtype=F64, requires_grad=True), sup, **EXACT)
    with pytest.raises(ValueError, match="'adjoint_params' must hold tensors that require grad.*position 0"):
        gradient_flow(net, loss, theta, 0.5, sup, adjoint_params=[phi.detach()])
    with pytest.raises(ValueError, match="'compile' must be False with adjoint_params"):
        gradient_flow(net, loss, theta, 0.5, sup, adjoint_params=[phi], compile=True)
    with pytest.raises(ValueError, match="'theta' must have shape"):
        gradient_flow(net, loss, theta[:-1], 0.5, sup)
    with pytest.raises(TypeError, match="'stats' must be None or a dict"):
        gradient_flow(net, loss, theta, 0.5, sup, stats=[])


def _l2l_style_maml_grads(model, xs, ys, xq, yq, steps, lr):
    """learn2learn's MAML loop in plain PyTorch: clone the parameters, K differentiable GD steps,
    query loss backward into the original parameters."""
    params = dict(model.named_parameters())
    fast = dict(params)
    for _ in range(steps):
        loss = F.mse_loss(torch.func.functional_call(model, fast, (xs,)), ys)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
        fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads)}
    F.mse_loss(torch.func.functional_call(model, fast, (xq,)), yq).backward()
    return {n: p.grad.clone() for n, p in params.items()}


def test_adjoint_learner_fills_the_models_grads_like_maml():
    torch.manual_seed(0)
    model = mlp(0, width=8)
    xs, ys = regression_task(1, n=10)
    xq, yq = regression_task(2, n=10)
    want = _l2l_style_maml_grads(model, xs, ys, xq, yq, steps=5, lr=0.1)
    model.zero_grad()
    learner = amaml_ext.AdjointLearner(model, F.mse_loss, T=0.5, h=0.1, **EXACT)
    fast = learner.adapt(xs, ys)
    assert isinstance(fast, amaml_ext.AdaptedModel) and fast.stats["grid_steps"] == 5
    F.mse_loss(fast(xq), yq).backward()
    for n, p in model.named_parameters():
        assert rel(p.grad, want[n]) < 1e-10, n
    assert [n for n, _ in learner.named_parameters()] == [f"module.{n}" for n, _ in model.named_parameters()]


def test_adjoint_learner_learns_step_sizes_and_horizon_with_an_optimiser():
    model = mlp(0, width=8)
    xs, ys = regression_task(1, n=10)
    xq, yq = regression_task(2, n=10)
    learner = amaml_ext.AdjointLearner(model, F.mse_loss, T=0.5, h=0.05, learn_lr=True, learn_T=True, solver="rk4",
                                       adjoint="rk4")
    names = {n for n, _ in learner.named_parameters()}
    assert {"log_lr", "log_T"} <= names
    F.mse_loss(learner.adapt(xs, ys)(xq), yq).backward()
    T = torch.tensor(0.5, dtype=F64, requires_grad=True)
    lr = torch.ones(learner.log_lr.numel(), dtype=F64, requires_grad=True)
    u = gradient_flow(model, F.mse_loss, learner.theta().detach(), T, (xs, ys), h=0.05, lr=lr, solver="rk4",
                      adjoint="rk4")
    d_T, d_lr = torch.autograd.grad(F.mse_loss(torch.func.functional_call(model, unflatten_params(model, u), (xq,)),
                                               yq), [T, lr])
    assert learner.log_T.grad.item() == pytest.approx(0.5 * d_T.item(), rel=1e-10)   # d/dlog T = T d/dT
    assert rel(learner.log_lr.grad, d_lr) < 1e-10                                     # lr = exp(0) = 1


def test_the_ported_learn2learn_example_runs():
    import importlib.util
    import os
    path = os.path.join(ROOT, "examples", "port_learn2learn_maml.py")
    spec = importlib.util.spec_from_file_location("port_l2l", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model, history = mod.train(iterations=2, steps=3, meta_batch=2)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(history)))


def test_readme_patterns_run():
    """The README's "Use it like torchdiffeq or learn2learn" block runs as written."""
    import pathlib
    readme = (pathlib.Path(ROOT) / "README.md").read_text()
    block = readme.split("## Use it like torchdiffeq or learn2learn")[1].split("```python")[1].split("```")[0]
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    for name in ("theta", "log_lr", "phi", "T"):
        g = scope[name].grad
        assert g is not None and bool(torch.isfinite(g).all()) and bool(g.abs().sum() > 0), name
    assert all(p.grad is not None for p in scope["net"].parameters())


@pytest.mark.parametrize("adjoint", ["heun", "rk4"])
def test_per_task_horizons_give_each_task_its_own_lr_and_param_gradients(adjoint):
    """With per-task horizons the quadrature restarts at every T_b (the integrand jumps there):
    the batched lr and adjoint_params gradients equal the sum over tasks run alone (Heun: the
    same nodes, to rounding; RK4: its pairs start from another top, so to the scheme's accuracy)."""
    net, loss, phi, theta, lr, sup, qry = make_problem(tasks=3)
    T = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    opts = dict(h=0.025, solver="rk4", adjoint=adjoint)
    u = gradient_flow(net, loss, theta, T, sup, lr=lr, adjoint_params=[phi], batched=True, **opts)
    got = torch.autograd.grad(query_loss(net, u, qry), [lr, phi])
    want = [torch.zeros_like(lr), torch.zeros_like(phi)]
    for b in range(3):
        ub = gradient_flow(net, loss, theta, float(T[b]), (sup[0][b], sup[1][b]), lr=lr, adjoint_params=[phi], **opts)
        for acc, g in zip(want, torch.autograd.grad(query_loss(net, ub, (qry[0][b], qry[1][b])), [lr, phi])):
            acc += g
    tol = 1e-10 if adjoint == "heun" else 1e-5
    for name, a, b in zip(["lr", "phi"], got, want):
        assert rel(a, b) < tol, name


def test_adjoint_learner_names_bad_settings_at_construction():
    model = mlp(0, width=4)
    with pytest.raises(ValueError, match="'learn_T' needs a continuous adjoint"):
        amaml_ext.AdjointLearner(model, F.mse_loss, T=0.5, h=0.1, learn_T=True, **EXACT)
    with pytest.raises(ValueError, match=r"'T' must be a whole multiple of h=0.1, got T=0.55"):
        amaml_ext.AdjointLearner(model, F.mse_loss, T=0.55, h=0.1)
    frozen = mlp(0, width=4).requires_grad_(False)
    with pytest.raises(ValueError, match="'model' has no trainable parameters"):
        amaml_ext.AdjointLearner(frozen, F.mse_loss, T=0.5, h=0.1)
