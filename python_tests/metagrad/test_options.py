"""The options object (amaml_ext.metagrad.options): built and checked once at every front door,
one rule per option, the same meta-gradient whichever way it is given; and the one core solve
behind adjoint_meta_grad and gradient_flow."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from amaml_ext import AdjointLearner, adjoint_meta_grad, flatten_params, gradient_flow, learners, ode
from amaml_ext.metagrad import MetaGradOptions
from amaml_ext.metagrad.options import AccuracyOptions, MemoryOptions, SolverOptions
from helpers import mlp, regression_task, rel


def test_build_replace_and_flat_round_trip():
    opts = MetaGradOptions.build(h=0.05, solver="euler", adjoint="discrete", memory="checkpoint", error_tol=0.1,
                                 compile="auto")
    assert opts.solver == SolverOptions(h=0.05, solver="euler", adjoint="discrete")
    assert opts.memory == MemoryOptions(memory="checkpoint")
    assert opts.accuracy == AccuracyOptions(error_tol=0.1)
    assert MetaGradOptions.build(**opts.flat()) == opts
    assert opts["memory"] == "checkpoint" and opts["h"] == 0.05
    assert opts.replace(h=0.1).solver.h == 0.1 and opts.solver.h == 0.05       # frozen: a copy
    with pytest.raises(Exception):
        opts.compile = True


@pytest.mark.parametrize("kw, match", [
    (dict(solver="foo"), "argument 'solver' must be one of"),
    (dict(rtol=5.0), "argument 'rtol' must be a number in \\(0, 1\\)"),
    (dict(atol=0.0), "argument 'atol' must be a number in \\(0, 1\\)"),
    (dict(max_steps=0), "argument 'max_steps' must be a positive int"),
    (dict(memory_budget=-1), "argument 'memory_budget' must be a number of bytes"),
    (dict(error_tol=0), "argument 'error_tol' must be finite and > 0"),
    (dict(solver="rk4", adjoint="discrete"), "'discrete' is the exact gradient of solver='euler'"),
    (dict(h=-0.1), "argument 'h' must be finite and > 0"),
])
def test_learners_check_every_option_at_construction(kw, match):
    """A learner made with a bad option fails when it is made, not at its first meta_grad."""
    net = mlp(width=4, depth=1)
    with pytest.raises(ValueError, match=match):
        learners.AMAML(net, F.mse_loss, T=0.5, **{"h": 0.05, **kw})
    with pytest.raises(ValueError, match=match):
        AdjointLearner(net, F.mse_loss, T=0.5, **{"h": 0.05, **kw})
    if "h" not in kw:                   # make_learner's h is its inner_lr
        with pytest.raises(ValueError, match=match):
            learners.make_learner("amaml-sgd", net, F.mse_loss, inner_steps=10, inner_lr=0.05, **kw)


def test_unknown_option_is_named():
    net = mlp(width=4, depth=1)
    s = regression_task(0)
    with pytest.raises(TypeError, match="adjoint_meta_grad\\(\\) got an unexpected keyword argument 'rtl'"):
        adjoint_meta_grad(net, F.mse_loss, flatten_params(net), 0.5, support=s, query=s, rtl=1e-3)
    with pytest.raises(TypeError, match="AMAML\\(\\) got an unexpected keyword argument 'solvr'"):
        learners.AMAML(net, F.mse_loss, T=0.5, h=0.05, solvr="rk4")
    with pytest.raises(TypeError, match="argument 'options' must be an amaml_ext.metagrad.MetaGradOptions"):
        gradient_flow(net, F.mse_loss, flatten_params(net), 0.5, s, options={"h": 0.1})


def test_one_tolerance_rule_for_the_ode_api_and_the_meta_gradient():
    """rtol = 0 was accepted by ode.solve_forward and refused by adjoint_meta_grad: one rule now."""
    net = mlp(width=4, depth=1)
    s = regression_task(0)
    y0 = torch.ones(2, dtype=torch.float64)
    for kw in (dict(rtol=0.0), dict(atol=2.0)):
        with pytest.raises(ValueError) as a:
            ode.solve_forward(lambda t, y: -y, y0, 1.0, 0.1, **kw)
        with pytest.raises(ValueError) as b:
            adjoint_meta_grad(net, F.mse_loss, flatten_params(net), 0.5, support=s, query=s, **kw)
        assert str(a.value) == str(b.value)


def test_options_object_and_keywords_give_the_same_gradient():
    net = mlp(width=6, depth=1)
    theta, s, q = flatten_params(net), regression_task(0), regression_task(1)
    kw = dict(h=0.05, solver="rk4", adjoint="rk4", memory="checkpoint")
    a = adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=s, query=q, **kw)
    opts = MetaGradOptions.build(**kw)
    b = adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=s, query=q, options=opts)
    c = adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=s, query=q, options=opts.replace(h=0.1), h=0.05)
    assert torch.equal(a.grad, b.grad) and torch.equal(a.grad, c.grad)


def test_both_front_doors_report_the_same_statistics():
    """One core solve builds the statistics: gradient_flow's stats hold every key of
    adjoint_meta_grad's, with the same solver counts for the same run."""
    net = mlp(width=6, depth=1)
    theta, s = flatten_params(net), regression_task(0)
    kw = dict(h=0.05, solver="euler", adjoint="discrete")
    r = adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=s, query=s, **kw)
    stats = {}
    t = theta.clone().requires_grad_()
    u = gradient_flow(net, F.mse_loss, t, 0.5, s, stats=stats, **kw)
    pred = torch.func.functional_call(net, dict(zip([n for n, _ in net.named_parameters()],
                                                    [v.view_as(p) for v, p in zip(u.split(
                                                        [p.numel() for p in net.parameters()]), net.parameters())])),
                                      (s[0],))
    F.mse_loss(pred, s[1]).backward()
    assert set(r.stats) <= set(stats), sorted(set(r.stats) - set(stats))
    for k in ("grid_steps", "adjoint_steps", "hvps", "linearisations", "memory", "solver", "adjoint", "h"):
        assert stats[k] == r.stats[k], k
    assert rel(t.grad, r.grad) < 1e-12


def test_smooth_flow_at_a_tight_tolerance_does_not_warn_of_a_collapse():
    """dopri5 at rtol 1e-10 on a smooth MLP takes more steps than a coarse grid has intervals:
    that is the tolerance, not a collapse, and it was blamed on ReLU/max-pool."""
    net = mlp(width=8, depth=2)
    s = regression_task(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = adjoint_meta_grad(net, F.mse_loss, flatten_params(net), 1.0, support=s, query=s, h=0.5, rtol=1e-10,
                              atol=1e-12, error_estimate=False)
    assert r.stats["accepted_steps"] > 4 * r.stats["grid_steps"]          # the old rule's trigger
    assert not [w for w in caught if "fell far below" in str(w.message)], [str(w.message) for w in caught]


def test_warnings_point_at_the_users_line():
    """However deep the library's call chain (the options object and the core solve added
    frames), a warning names the line of the user's call: filters by module and "once" act on it."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Dropout(0.5), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    net.train()
    theta = flatten_params(net).double()
    s = regression_task(0)
    net.double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adjoint_meta_grad(net, F.mse_loss, theta, 0.2, support=s, query=s, h=0.1, solver="euler", adjoint="discrete")
        t = theta.clone().requires_grad_()
        gradient_flow(net, F.mse_loss, t, 0.2, s, h=0.1, solver="euler", adjoint="discrete").sum().backward()
        # a continuous adjoint past a tolerance no solve can meet: the accuracy warning
        net.eval()
        adjoint_meta_grad(net, F.mse_loss, theta, 0.2, support=s, query=s, h=0.1, error_tol=1e-300)
    assert len(caught) >= 3, [str(w.message) for w in caught]
    assert {w.filename for w in caught} == {__file__}, [(w.filename, w.lineno, str(w.message)[:60]) for w in caught]


def test_compiled_gradient_flow_with_learned_features_falls_back_to_eager():
    """Support tensors that require grad get their gradient through the eager linearisation:
    compile=True is set aside for them (it crashed the backward once)."""
    net = mlp(width=6, depth=1)
    theta, (x, y) = flatten_params(net), regression_task(0)
    grads = []
    for compile in (False, True):
        th, xs = theta.clone().requires_grad_(), x.clone().requires_grad_()
        u = gradient_flow(net, F.mse_loss, th, 0.4, (xs, y), h=0.1, solver="rk4", adjoint="rk4", compile=compile)
        grads.append(torch.autograd.grad((u ** 2).sum(), [th, xs]))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_adjoint_learner_passes_adjoint_params_on():
    """AdjointLearner's keywords are gradient_flow's: adjoint_params (a tensor of the loss's
    closure) gets its gradient, as through gradient_flow itself."""
    net = mlp(width=4, depth=1)
    x, y = regression_task(0)
    grads = []
    for via_learner in (True, False):
        w = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
        loss = lambda p, t: w * F.mse_loss(p, t)                                   # noqa: E731
        kw = dict(solver="euler", adjoint="discrete", adjoint_params=[w])
        if via_learner:
            u = AdjointLearner(net, loss, T=0.5, h=0.05, **kw).adapt(x, y).params
        else:
            u = gradient_flow(net, loss, flatten_params(net), 0.5, (x, y), h=0.05, **kw)
        (g,) = torch.autograd.grad((u ** 2).sum(), [w])
        grads.append(g)
    assert torch.equal(grads[0], grads[1]) and float(grads[0]) != 0.0


def test_learner_options_can_be_replaced_and_unpacked():
    net = mlp(width=4, depth=1)
    learner = learners.AMAML(net, F.mse_loss, T=0.2, h=0.05, solver="euler", adjoint="discrete")
    learner.options = learner.options.replace(memory="checkpoint")
    assert learner.meta_grad(flatten_params(net), _tasks(2)).stats["memory"] == "checkpoint"
    with pytest.raises(ValueError, match="argument 'options': h is the learner's grid"):
        learner.options = learner.options.replace(h=0.1)
    with pytest.raises(AttributeError):
        learner.h = 0.1                                   # fixed when made: it was silently ignored
    again = learners.AMAML(net, F.mse_loss, T=0.2, **learner.options)
    assert again.options == learner.options


def _tasks(n):
    from amaml_ext import tasks
    return tasks.CosMixture(10, 10).pool(n, seed=0).batch(list(range(n)), dtype=torch.float64)
