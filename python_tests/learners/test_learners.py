"""Each learner's meta-gradient against a brute-force reference on a tiny problem.

The references do not use amaml_ext's callbacks: inner training is a plain per-task loop with
``torch.autograd.grad``, derivatives with respect to theta are central finite differences of
that loop (float64), and iMAML's implicit system is solved with a dense Hessian.
"""

import pytest
import torch
from torch.nn import functional as F

from amaml_ext import flatten_params, learners, tasks, unflatten_params
from amaml_ext import learners as L
from amaml_ext.tasks import TaskBatch

from helpers import F64, data, mlp, rel, stack_tasks


def tiny_tasks(B=2, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(B, n, 2, generator=g, dtype=F64) * 2 - 1
    xq = torch.rand(B, n, 2, generator=g, dtype=F64) * 2 - 1
    w = torch.randn(B, 1, 2, generator=g, dtype=F64)
    f = lambda x: torch.sin(3 * (x * w).sum(-1, keepdim=True))  # noqa: E731
    return TaskBatch((xs, f(xs)), (xq, f(xq)))


def loss_at(net, u, x, y):
    return F.mse_loss(torch.func.functional_call(net, unflatten_params(net, u), (x,)), y)


def grad_at(net, u, x, y):
    with torch.enable_grad():
        leaf = u.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_at(net, leaf, x, y), leaf)
    return g


def gd(net, theta, x, y, steps, lr, lam=None):
    u = theta.clone()
    for _ in range(steps):
        g = grad_at(net, u, x, y)
        if lam is not None:
            g = g + lam * (u - theta)
        u = u - lr * g
    return u


def mean_query_loss_after_gd(net, theta, tasks, steps, lr):
    vals = []
    for b in range(tasks.size):
        t = tasks.task(b)
        u = gd(net, theta, *t.support, steps, lr)
        vals.append(loss_at(net, u, *t.query))
    return torch.stack(vals).mean()


def finite_difference(fn, theta, eps=1e-6):
    out = torch.zeros_like(theta)
    for i in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[i] = eps
        out[i] = (fn(theta + e) - fn(theta - e)) / (2 * eps)
    return out


@pytest.fixture(scope="module")
def problem():
    net = mlp(width=3, depth=1)  # d = 13
    return net, flatten_params(net), tiny_tasks()


@pytest.mark.parametrize("method,steps", [("maml", 4), ("maml1", 1)])
def test_maml_equals_finite_differences_of_unrolled_gd(problem, method, steps):
    net, theta, tasks = problem
    lr = 0.3
    learner = L.make_learner(method, net, F.mse_loss, maml_steps=steps, inner_lr=lr)
    out = learner.meta_grad(theta, tasks)
    ref = finite_difference(lambda th: mean_query_loss_after_gd(net, th, tasks, steps, lr), theta)
    assert rel(out.grad, ref) < 1e-7
    assert learner.second_order and learner.steps == steps
    assert out.query_loss.shape == (tasks.size,)


def test_amaml_exact_mode_equals_finite_differences_and_maml(problem):
    net, theta, tasks = problem
    K, h = 5, 0.2
    amaml = L.AMAML(net, F.mse_loss, T=K * h, h=h, solver="euler", adjoint="discrete")
    out = amaml.meta_grad(theta, tasks)
    ref = finite_difference(lambda th: mean_query_loss_after_gd(net, th, tasks, K, h), theta)
    assert rel(out.grad, ref) < 1e-7
    maml = L.MAML(net, F.mse_loss, inner_lr=h, steps=K).meta_grad(theta, tasks)
    assert rel(out.grad, maml.grad) < 1e-10
    torch.testing.assert_close(out.query_loss, maml.query_loss, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
def test_amaml_default_mode_approximates_the_flow(problem):
    """dopri5 + Heun at a small h: the gradient of the flow, which fine GD approaches."""
    net, theta, tasks = problem
    T = 0.6
    out = L.AMAML(net, F.mse_loss, T=T, h=0.005, rtol=1e-10, atol=1e-12).meta_grad(theta, tasks)
    fine = 600  # GD with step T/600 is within O(T/600) of the flow
    ref = finite_difference(lambda th: mean_query_loss_after_gd(net, th, tasks, fine, T / fine), theta, eps=1e-5)
    assert rel(out.grad, ref) < 5e-3


def test_first_order_learners_drop_the_jacobian(problem):
    net, theta, tasks = problem
    K, lr = 6, 0.3
    fo = L.FOMAML(net, F.mse_loss, inner_lr=lr, steps=K)
    rp = L.Reptile(net, F.mse_loss, inner_lr=lr, steps=K)
    assert not fo.second_order and not rp.second_order
    out_fo, out_rp = fo.meta_grad(theta, tasks), rp.meta_grad(theta, tasks)
    psis = [gd(net, theta, *tasks.task(b).support, K, lr) for b in range(tasks.size)]
    ref_fo = torch.stack([grad_at(net, psis[b], *tasks.task(b).query) for b in range(tasks.size)]).mean(0)
    ref_rp = torch.stack([theta - p for p in psis]).mean(0)
    assert rel(out_fo.grad, ref_fo) < 1e-12
    assert rel(out_rp.grad, ref_rp) < 1e-12
    # first order is not second order: MAML's gradient at the same K differs
    maml = L.MAML(net, F.mse_loss, inner_lr=lr, steps=K).meta_grad(theta, tasks)
    assert rel(out_fo.grad, maml.grad) > 1e-3
    torch.testing.assert_close(out_fo.query_loss, maml.query_loss, rtol=1e-12, atol=1e-14)


def test_imaml_solves_the_implicit_system(problem):
    net, theta, tasks = problem
    K, lr, lam = 40, 0.2, 1.0
    d = theta.numel()
    exact = L.IMAML(net, F.mse_loss, inner_lr=lr, steps=K, lam=lam, cg_steps=d).meta_grad(theta, tasks)
    five = L.IMAML(net, F.mse_loss, inner_lr=lr, steps=K, lam=lam, cg_steps=5).meta_grad(theta, tasks)
    refs = []
    for b in range(tasks.size):
        t = tasks.task(b)
        psi = gd(net, theta, *t.support, K, lr, lam=lam)
        H = torch.autograd.functional.hessian(lambda u: loss_at(net, u, *t.support), psi)
        g = grad_at(net, psi, *t.query)
        refs.append(torch.linalg.solve(torch.eye(d, dtype=F64) + H / lam, g))
    ref = torch.stack(refs).mean(0)
    assert rel(exact.grad, ref) < 1e-8
    assert rel(five.grad, ref) < 0.05  # 5 CG steps on a well-conditioned system: close, not exact
    assert exact.stats["hvps"] == d and five.stats["hvps"] == 5


def test_adapt_is_plain_gd(problem):
    net, theta, tasks = problem
    learner = L.FOMAML(net, F.mse_loss, inner_lr=0.1, steps=7)
    t = tasks.task(1)
    assert rel(learner.adapt(theta, t.support), gd(net, theta, *t.support, 7, 0.1)) < 1e-13
    both = learner.adapt(theta, tasks.support, steps=3, batched=True)
    assert both.shape == (tasks.size, theta.numel())
    assert rel(both[1], gd(net, theta, *t.support, 3, 0.1)) < 1e-13


def test_learners_reject_bad_arguments(problem):
    net, theta, tasks = problem
    with pytest.raises(ValueError, match="argument 'steps' must be a positive int, got 0"):
        L.MAML(net, F.mse_loss, steps=0)
    with pytest.raises(ValueError, match="argument 'inner_lr' must be a positive finite number, got -0.1"):
        L.FOMAML(net, F.mse_loss, inner_lr=-0.1)
    with pytest.raises(ValueError, match="argument 'T' must be a whole multiple of h=0.01, got T=0.015"):
        L.AMAML(net, F.mse_loss, T=0.015)
    with pytest.raises(ValueError, match="argument 'method' must be one of"):
        L.make_learner("maml2", net, F.mse_loss)
    with pytest.raises(ValueError, match=r"options \['solver'\] apply to method 'amaml' only"):
        L.make_learner("fomaml", net, F.mse_loss, solver="rk4")
    with pytest.raises(ValueError, match=r"argument 'theta' must have shape \[13\]"):
        L.Reptile(net, F.mse_loss, steps=2).meta_grad(theta[:5], tasks)
    with pytest.raises(TypeError, match="argument 'tasks' must be an amaml_ext.tasks.TaskBatch"):
        L.Reptile(net, F.mse_loss, steps=2).meta_grad(theta, (tasks.support, tasks.query))


def test_amaml_on_one_task_equals_the_batched_path():
    """A one-task batch runs unbatched (no vmap): the same meta-gradient as a batch of that task twice."""
    net = mlp(width=5, depth=1)
    one = tiny_tasks(B=1)
    two = TaskBatch(tuple(torch.cat([t, t]) for t in one.support), tuple(torch.cat([t, t]) for t in one.query))
    learner = L.make_learner("amaml", net, F.mse_loss, inner_steps=5, inner_lr=0.05, solver="euler", adjoint="discrete")
    a, b = learner.meta_grad(flatten_params(net), one), learner.meta_grad(flatten_params(net), two)
    assert a.grad.shape == b.grad.shape and a.query_loss.shape == (1,)
    assert rel(a.grad, b.grad) < 1e-12 and torch.allclose(a.query_loss, b.query_loss[:1], rtol=1e-12)


def test_anil_adapts_only_the_head():
    m = mlp(width=6, depth=1)
    theta = flatten_params(m)
    mask = learners.head_mask(m)
    assert mask.tolist() == [0.0] * 18 + [1.0] * 7                 # "2.weight", "2.bias"
    xs, ys = stack_tasks(data(i) for i in range(2))
    xq, yq = stack_tasks(data(i + 5) for i in range(2))
    step = learners.make_learner("anil", m, F.mse_loss, maml_steps=3, inner_lr=0.1).meta_grad(
        theta, tasks.TaskBatch((xs, ys), (xq, yq)))
    # reference: per task, autograd through 3 head-only GD steps (body constant inside, but in the graph)
    ref = torch.zeros_like(theta)
    for b in range(2):
        th = theta.clone().requires_grad_(True)
        body, head = th[:18], th[18:]
        def f(h_, x):
            return torch.func.functional_call(m, unflatten_params(m, torch.cat([body, h_])), (x,))
        for _ in range(3):
            (g,) = torch.autograd.grad(F.mse_loss(f(head, xs[b]), ys[b]), head, create_graph=True)
            head = head - 0.1 * g
        (gb,) = torch.autograd.grad(F.mse_loss(f(head, xq[b]), yq[b]), th)
        ref += gb / 2
    assert rel(step.grad, ref) < 1e-10
    assert step.grad[:18].abs().sum() > 0                           # the body is meta-learned
    with pytest.raises(ValueError, match="head"):
        learners.head_mask(m, head="nothing")
