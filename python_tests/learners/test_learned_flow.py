"""The A-MAML variants that meta-learn their flow's step sizes (amaml-sgd) or horizon (amaml-t),
against gradient_flow's own gradients and against autograd through the unrolled GD steps."""

import math

import pytest
import torch
from torch.nn import functional as F

from amaml_ext import flatten_params, gradient_flow, tasks, train
from amaml_ext import learners as L
from amaml_ext.cli import main

from helpers import F64, mlp, rel
from test_learners import loss_at, tiny_tasks


def per_task_unrolled(net, theta, lr, batch, K, h):
    """Mean query loss after K GD steps of h * lr, task by task, with the graph kept."""
    vals = []
    for b in range(batch.size):
        t = batch.task(b)
        u = theta
        for _ in range(K):
            (g,) = torch.autograd.grad(loss_at(net, u, *t.support), u, create_graph=True)
            u = u - h * lr * g
        vals.append(loss_at(net, u, *t.query))
    return torch.stack(vals).mean()


def test_learned_step_sizes_equal_unrolled_meta_sgd():
    net, batch = mlp(width=5, depth=1), tiny_tasks()
    K, h = 6, 0.1
    learner = L.make_learner("amaml-sgd", net, F.mse_loss, inner_steps=K, inner_lr=h, solver="euler",
                             adjoint="discrete")
    d = learner.d
    assert learner.extra == d
    meta = learner.meta_params(flatten_params(net))
    assert meta.shape == (2 * d,) and torch.equal(meta[d:], torch.zeros(d, dtype=F64))
    meta = meta.clone()
    meta[d:] = 0.3 * torch.randn(d, dtype=F64, generator=torch.Generator().manual_seed(1))
    step = learner.meta_grad(meta, batch)
    theta = meta[:d].clone().requires_grad_()
    s = meta[d:].clone().requires_grad_()
    want = torch.autograd.grad(per_task_unrolled(net, theta, s.exp(), batch, K, h), [theta, s])
    assert step.grad.shape == (2 * d,)
    assert rel(step.grad[:d], want[0]) < 1e-10 and rel(step.grad[d:], want[1]) < 1e-10
    # at s = 0 the theta part is A-MAML's meta-gradient
    zero = learner.meta_params(flatten_params(net))
    plain = L.make_learner("amaml", net, F.mse_loss, inner_steps=K, inner_lr=h, solver="euler", adjoint="discrete")
    assert rel(learner.meta_grad(zero, batch).grad[:d], plain.meta_grad(zero[:d], batch).grad) < 1e-12
    init, scale = learner.test_adaptation(meta)
    assert torch.equal(init, meta[:d]) and torch.allclose(scale, meta[d:].exp())


def test_learned_horizon_gradient_is_T_times_dJ_dT():
    net, batch = mlp(width=5, depth=1), tiny_tasks()
    learner = L.make_learner("amaml-t", net, F.mse_loss, inner_steps=20, inner_lr=0.05, solver="rk4", adjoint="rk4")
    d = learner.d
    meta = learner.meta_params(flatten_params(net))
    assert meta.shape == (d + 1,) and meta[d].item() == pytest.approx(math.log(1.0))
    meta = meta.clone()
    meta[d] = math.log(0.83)                         # not a whole number of steps of 0.05
    step = learner.meta_grad(meta, batch)
    assert learner.horizon(meta) == pytest.approx(0.83)
    T = torch.tensor(0.83, dtype=F64, requires_grad=True)
    u = gradient_flow(net, F.mse_loss, meta[:d], T, batch.support, h=0.05, solver="rk4", adjoint="rk4", batched=True)
    J = torch.stack([loss_at(net, u[b], *batch.task(b).query) for b in range(batch.size)]).mean()
    (dT,) = torch.autograd.grad(J, [T])
    assert step.grad[d].item() == pytest.approx(0.83 * dT.item(), rel=1e-9)
    # the horizon moves the loss: a central difference in tau agrees to the solver's accuracy
    def J_at(tau):
        m = meta.clone()
        m[d] = tau
        return learner.meta_grad(m, batch).query_loss.mean().item()
    fd = (J_at(meta[d].item() + 1e-3) - J_at(meta[d].item() - 1e-3)) / 2e-3
    assert step.grad[d].item() == pytest.approx(fd, rel=2e-3)


def test_exact_mode_cannot_learn_the_horizon():
    net, batch = mlp(width=5, depth=1), tiny_tasks()
    learner = L.make_learner("amaml-t", net, F.mse_loss, inner_steps=4, inner_lr=0.1, solver="euler",
                             adjoint="discrete")
    with pytest.raises(ValueError, match="'T' requires grad, but adjoint='discrete'"):
        learner.meta_grad(learner.meta_params(flatten_params(net)), batch)
    with pytest.raises(ValueError, match="'refine' is not available for 'amaml-sgd'"):
        L.make_learner("amaml-sgd", net, F.mse_loss, inner_steps=4, inner_lr=0.1, refine=True)


@pytest.mark.parametrize("method", ["amaml-sgd", "amaml-t"])
def test_meta_train_resume_and_command(tmp_path, method):
    net = mlp(width=6, depth=1, dtype=None)
    pool = tasks.CosMixture(shots=8, val=8).pool(6, seed=0)
    learner = L.make_learner(method, net, F.mse_loss, inner_steps=5, inner_lr=0.05, solver="rk4", adjoint="rk4")
    full = train.meta_train(learner, pool, meta_steps=4, meta_batch=2, progress=False)
    assert full.shape == (learner.d + learner.extra,)
    stopped = []

    def stop(step, row):
        if step == 2 and not stopped:
            stopped.append(step)
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train.meta_train(learner, pool, meta_steps=4, meta_batch=2, out_dir=str(tmp_path / "r"), on_step=stop,
                         progress=False)
    resumed = train.meta_train(learner, pool, meta_steps=4, meta_batch=2, out_dir=str(tmp_path / "r"), resume=True,
                               progress=False)
    assert torch.equal(resumed, full)
    out = str(tmp_path / "cmd")
    assert main(["train", "--task", "cosmixture", "--method", method, "--pool-size", "6", "--meta-batch", "2",
                 "--inner-steps", "4", "--meta-steps", "2", "--out", out, "--quiet"]) == 0
    assert main(["evaluate", "--run", out, "--quiet"]) == 0
