"""The learners and meta-testing refuse what they cannot train on (issue 23, items 6 and 15):
non-finite data or theta, theta and tasks of different dtypes, each with the same message for
every learner (A-MAML included); and an inner loop that turns finite inputs into non-finite
numbers raises InnerLoopDiverged instead of returning NaN."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from amaml_ext import flatten_params, train
from amaml_ext import learners as L
from amaml_ext.tasks import TaskBatch

from helpers import F64, mlp

METHODS = sorted(L.METHODS)
# the exact mode for A-MAML and the step-size variant; a continuous adjoint for the learned horizon
FLOW = {"amaml": dict(solver="euler", adjoint="discrete"), "amaml-sgd": dict(solver="euler", adjoint="discrete"),
        "amaml-t": dict(solver="rk4", adjoint="heun")}


def make_tasks(B=4, n=5, dtype=F64, seed=0, scale=None) -> TaskBatch:
    """B regression tasks on [-1, 1]^2; ``scale`` ``{task: factor}`` stretches a task's inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, B, n, 2, generator=g, dtype=F64) * 2 - 1
    for b, s in (scale or {}).items():
        x[:, b] *= s
    y = torch.sin(3 * x[..., :1]) + x[..., 1:]
    return TaskBatch((x[0], y[0]), (x[1], y[1])).to(dtype=dtype)


def make(method, net, lr=0.1, steps=2):
    return L.make_learner(method, net, F.mse_loss, inner_steps=steps, maml_steps=steps, inner_lr=lr,
                          **FLOW.get(method, {}))


def meta_grad(learner, theta, tasks):
    with warnings.catch_warnings():       # A-MAML's accuracy warnings are not what these tests look at
        warnings.simplefilter("ignore")
        return learner.meta_grad(learner.meta_params(theta), tasks)


def with_value(tasks: TaskBatch, part: str, which: int, task: int, value: float) -> TaskBatch:
    """A copy of ``tasks`` with one entry of ``part`` (support/query), x (0) or y (1), of ``task`` set to ``value``."""
    data = {"support": [t.clone() for t in tasks.support], "query": [t.clone() for t in tasks.query]}
    data[part][which][task].view(-1)[1] = value
    return TaskBatch(tuple(data["support"]), tuple(data["query"]))


# ------------------------------------------------------------------------------------------------
# item 6: non-finite data and theta


@pytest.mark.parametrize("method", METHODS)
def test_every_learner_refuses_non_finite_task_data_naming_part_and_task(method):
    net = mlp(width=4, depth=1)
    theta, tasks = flatten_params(net), make_tasks()
    learner = make(method, net)
    cases = [("support", 0, 3, float("nan")), ("support", 1, 1, float("inf")), ("query", 0, 2, float("-inf")),
             ("query", 1, 0, float("nan"))]
    for part, which, task, value in cases:
        label = f"{part} {'xy'[which]}"
        with pytest.raises(ValueError, match=rf"argument 'tasks' \({label}\) holds non-finite values at task "
                                             rf"{task}: 1 of \d+ entries \(e\.g\. {value}\)"):
            meta_grad(learner, theta, with_value(tasks, part, which, task, value))
    # two bad tasks: the first is named, the other counted
    two = with_value(with_value(tasks, "support", 0, 1, float("nan")), "support", 0, 3, float("nan"))
    with pytest.raises(ValueError, match=r"\(support x\) holds non-finite values at task 1 \(and 1 other task\)"):
        meta_grad(learner, theta, two)


@pytest.mark.parametrize("method", METHODS)
def test_every_learner_refuses_a_non_finite_theta(method):
    net = mlp(width=4, depth=1)
    learner = make(method, net)
    meta = learner.meta_params(flatten_params(net)).clone()
    meta[5] = float("nan")
    with pytest.raises(ValueError, match=r"argument 'theta' holds non-finite values at index 5: 1 of \d+ entries"):
        learner.meta_grad(meta, make_tasks())
    theta = flatten_params(net).clone()
    theta[2] = float("inf")
    with pytest.raises(ValueError, match=r"argument 'theta' holds non-finite values at index 2"):
        learner.adapt(theta, make_tasks().support, batched=True)


def test_adapt_refuses_non_finite_support_batched_and_not():
    net = mlp(width=4, depth=1)
    learner = L.MAML(net, F.mse_loss, steps=2)
    theta, tasks = flatten_params(net), with_value(make_tasks(), "support", 1, 2, float("nan"))
    with pytest.raises(ValueError, match=r"argument 'support' \(support y\) holds non-finite values at task 2"):
        learner.adapt(theta, tasks.support, batched=True)
    with pytest.raises(ValueError, match=r"argument 'support' \(support y\) holds non-finite values at index \d+"):
        learner.adapt(theta, tasks.task(2).support)
    # the finite tasks of the same batch adapt as before: the batched path equals each task alone
    good = make_tasks()
    both = learner.adapt(theta, good.support, batched=True)
    assert torch.equal(both[1], learner.adapt(theta, good.task(1).support))


# ------------------------------------------------------------------------------------------------
# item 6: a diverging inner loop


DIVERGING_LR = {"maml1": 1e25}       # one step: it needs a larger step to overflow float32


@pytest.mark.parametrize("method", METHODS)
def test_a_diverging_inner_loop_raises_naming_its_step_size(method):
    net = mlp(width=4, depth=1, dtype=torch.float32)
    lr = DIVERGING_LR.get(method, 1e6)
    learner = make(method, net, lr=lr, steps=30)
    tasks = make_tasks(dtype=torch.float32)
    with pytest.raises(L.InnerLoopDiverged, match="the inner loop diverged") as e:
        meta_grad(learner, flatten_params(net), tasks)
    assert isinstance(e.value, ValueError) and isinstance(e.value, FloatingPointError)
    text = str(e.value)
    if L.METHODS[method].flow:
        assert "h=1e+06" in text and "T=3e+07" in text, text
    else:
        assert f"inner_lr={lr:g}" in text and (f"steps={learner.steps}") in text, text
    # the same learner at a small step trains normally
    step = meta_grad(make(method, net, lr=0.01, steps=2), flatten_params(net), tasks)
    assert bool(torch.isfinite(step.grad).all())


@pytest.mark.parametrize("method", ["maml", "fomaml", "reptile", "imaml"])
def test_divergence_names_the_task_that_diverged(method):
    """A linear model: task 2's inputs are 100x larger, so its loss curvature is 10^4x larger and
    GD at lr 0.1 diverges on it alone (|1 - lr * lambda| >> 1), while the others converge."""
    torch.manual_seed(0)
    net = nn.Linear(2, 1)
    tasks = make_tasks(dtype=torch.float32, scale={2: 100.0})
    learner = L.make_learner(method, net, F.mse_loss, inner_steps=40, maml_steps=40, inner_lr=0.1)
    with pytest.raises(L.InnerLoopDiverged, match=r"diverged on task 2 of 4"):
        learner.meta_grad(flatten_params(net), tasks)
    with pytest.raises(L.InnerLoopDiverged, match=r"adapt: the inner loop diverged on task 2 of 4.*lr=0\.1.*steps=40"):
        learner.adapt(flatten_params(net), tasks.support, batched=True)
    rest = tasks.select(torch.tensor([0, 1, 3]))
    assert bool(torch.isfinite(learner.meta_grad(flatten_params(net), rest).grad).all())


# ------------------------------------------------------------------------------------------------
# item 15: dtypes and shapes


@pytest.mark.parametrize("method", METHODS)
def test_every_learner_names_a_dtype_mismatch(method):
    net = mlp(width=4, depth=1)
    learner = make(method, net)
    theta = learner.meta_params(flatten_params(net))
    with pytest.raises(ValueError, match=r"argument 'tasks' \(support x\) must have theta's dtype torch.float64, "
                                         r"got torch.float32"):
        learner.meta_grad(theta, make_tasks(dtype=torch.float32))
    with pytest.raises(ValueError, match=r"argument 'tasks' \(support x\) must have theta's dtype torch.float32, "
                                         r"got torch.float64"):
        learner.meta_grad(theta.float(), make_tasks())
    mixed = make_tasks()
    mixed = TaskBatch(mixed.support, (mixed.query[0], mixed.query[1].float()))
    with pytest.raises(ValueError, match=r"argument 'tasks' \(query y\) must have theta's dtype torch.float64"):
        learner.meta_grad(theta, mixed)
    with pytest.raises(TypeError, match=r"argument 'theta' must be float32 or float64, got torch.int64"):
        learner.meta_grad(theta.long(), make_tasks())
    with pytest.raises(ValueError, match=rf"argument 'theta' must have shape \[{theta.numel()}\]"):
        learner.meta_grad(theta[None], make_tasks())
    with pytest.raises(ValueError, match=r"argument 'support' \(support x\) must have theta's dtype torch.float64"):
        learner.adapt(theta[:learner.d], make_tasks(dtype=torch.float32).support, batched=True)


def test_task_shapes_are_named():
    net = mlp(width=4, depth=1)
    learner, theta, t = L.FOMAML(net, F.mse_loss, steps=2), flatten_params(net), make_tasks()
    with pytest.raises(ValueError, match=r"argument 'tasks' \(query\) must hold as many tasks as the support set "
                                         r"\(4\), got 3"):
        learner.meta_grad(theta, TaskBatch(t.support, (t.query[0][:3], t.query[1][:3])))
    with pytest.raises(ValueError, match=r"argument 'tasks' \(support\): x and y must be \[tasks, samples, \.\.\.\] "
                                         r"with as many samples, got x \(4, 5, 2\), y \(4, 4, 1\)"):
        learner.meta_grad(theta, TaskBatch((t.support[0], t.support[1][:, :4]), t.query))


@pytest.mark.cuda
def test_device_mismatch_is_named():
    net = mlp(width=4, depth=1)
    learner, theta = L.MAML(net, F.mse_loss, steps=2), flatten_params(net)
    with pytest.raises(ValueError, match=r"argument 'tasks' \(support x\) must be on theta's device cpu, got cuda"):
        learner.meta_grad(theta, make_tasks().to(device="cuda"))
    with pytest.raises(ValueError, match=r"argument 'model' must be on theta's device cuda"):
        learner.meta_grad(theta.cuda(), make_tasks().to(device="cuda"))


# ------------------------------------------------------------------------------------------------
# meta_test


def test_meta_test_refuses_non_finite_theta_and_data():
    net = mlp(width=4, depth=1)
    theta, tasks = flatten_params(net), make_tasks()
    bad = theta.clone()
    bad[0] = float("nan")
    with pytest.raises(ValueError, match=r"argument 'theta' holds non-finite values at index 0"):
        train.meta_test(net, F.mse_loss, bad, tasks, steps=3)
    with pytest.raises(ValueError, match=r"argument 'tasks' \(query y\) holds non-finite values at task 1"):
        train.meta_test(net, F.mse_loss, theta, with_value(tasks, "query", 1, 1, float("inf")), steps=3)
    with pytest.raises(ValueError, match=r"argument 'theta' must have shape \[\d+\]"):
        train.meta_test(net, F.mse_loss, theta[1:], tasks, steps=3)


def test_meta_test_still_casts_theta_to_the_data_dtype():
    net = mlp(width=4, depth=1)
    theta, tasks = flatten_params(net), make_tasks()
    a = train.meta_test(net, F.mse_loss, theta.float(), tasks, steps=3)
    b = train.meta_test(net, F.mse_loss, theta.float().double(), tasks, steps=3)
    assert a["final"] == b["final"]


@pytest.mark.parametrize("chunk", [1, 100])
def test_meta_test_divergence_raises_naming_the_task_and_lr(chunk):
    torch.manual_seed(0)
    net = nn.Linear(2, 1)
    tasks = make_tasks(dtype=torch.float32, scale={2: 100.0})
    with pytest.raises(L.InnerLoopDiverged, match=r"meta_test\(steps=40, lr=0\.1\): the inner loop diverged on task "
                                                  r"2 of 4.*lower the test step size"):
        train.meta_test(net, F.mse_loss, flatten_params(net), tasks, steps=40, lr=0.1, chunk=chunk, record_every=10)
    # the other tasks: finite curves, as an independent GD loop gives them
    rest = tasks.select(torch.tensor([0, 1, 3]))
    out = train.meta_test(net, F.mse_loss, flatten_params(net), rest, steps=40, lr=0.1, chunk=chunk)
    for b in range(3):
        w = flatten_params(net).clone().requires_grad_(True)
        x, y = rest.task(b).support
        for _ in range(40):
            (g,) = torch.autograd.grad(F.mse_loss(x @ w[:2, None] + w[2], y), w)
            w = (w - 0.1 * g).detach().requires_grad_(True)
        xq, yq = rest.task(b).query
        pred = xq @ w[:2, None].detach() + w[2].detach()
        assert abs(out["final"][b] - float((pred - yq).norm() / yq.norm())) < 1e-5


def test_meta_test_divergence_is_seen_through_accuracy():
    """Accuracy of NaN logits is a finite (meaningless) number: the adapted parameters are checked.
    A two-layer linear net: each layer's gradient grows with the other, so a huge step overflows."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, 2, generator=g)
    y = torch.randint(3, (2, 3, 6), generator=g)
    tasks = TaskBatch((x[0], y[0]), (x[1], y[1]))
    theta = flatten_params(net)
    ok = train.meta_test(net, F.cross_entropy, theta, tasks, steps=5, lr=0.1, metric="accuracy")
    assert all(0 <= v <= 1 for v in ok["final"])
    with pytest.raises(L.InnerLoopDiverged, match=r"meta_test\(steps=5, lr=1e\+20\)"):
        train.meta_test(net, F.cross_entropy, theta, tasks, steps=5, lr=1e20, metric="accuracy")
