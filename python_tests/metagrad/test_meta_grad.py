"""adjoint_meta_grad against autograd unrolling, fine-grid references and itself."""

import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from amaml_ext import adjoint_meta_grad, flatten_params, unflatten_params
from amaml_ext.functional import compile_refusal

from helpers import DEVICES, F64, data, mlp, regression_task, rel, small_conv4, stack_tasks


def unrolled_maml_grad(model, loss, theta, support, query, steps, lr):
    """Autograd through `steps` GD steps (create_graph): MAML's meta-gradient."""
    th = theta.clone().requires_grad_(True)
    u = th
    for _ in range(steps):
        train = loss(torch.func.functional_call(model, unflatten_params(model, u), (support[0],)), support[1])
        (g,) = torch.autograd.grad(train, u, create_graph=True)
        u = u - lr * g
    val = loss(torch.func.functional_call(model, unflatten_params(model, u), (query[0],)), query[1])
    (grad,) = torch.autograd.grad(val, th)
    return grad, val.detach()


# ---- exact discrete mode = unrolled MAML ------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("memory", ["store", "checkpoint"])
def test_euler_discrete_equals_autograd_unrolling_mlp(device, memory):
    net = mlp().to(device)
    theta = flatten_params(net)
    support, query = regression_task(1, device=device), regression_task(2, device=device)
    K, h = 37, 0.05
    r = adjoint_meta_grad(net, F.mse_loss, theta, K * h, support=support, query=query, h=h,
                          solver="euler", adjoint="discrete", memory=memory)
    ref, val = unrolled_maml_grad(net, F.mse_loss, theta, support, query, K, h)
    assert rel(r.grad, ref) < 1e-10
    torch.testing.assert_close(r.loss, val, rtol=1e-12, atol=1e-14)
    assert r.stats["hvps"] == K and r.stats["grid_steps"] == K


def test_euler_discrete_equals_autograd_unrolling_conv4_batchnorm():
    torch.manual_seed(0)
    net = small_conv4().double().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    theta = flatten_params(net)
    g = torch.Generator().manual_seed(3)
    xs, ys = torch.randn(6, 1, 16, 16, generator=g, dtype=F64), torch.tensor([0, 1, 2, 0, 1, 2])
    xq, yq = torch.randn(9, 1, 16, 16, generator=g, dtype=F64), torch.tensor([0, 1, 2] * 3)
    K, h = 6, 0.1
    r = adjoint_meta_grad(net, F.cross_entropy, theta, K * h, support=(xs, ys), query=(xq, yq), h=h,
                          solver="euler", adjoint="discrete")
    ref_net = small_conv4().double().train()
    ref_net.load_state_dict(before)
    ref, val = unrolled_maml_grad(ref_net, F.cross_entropy, theta, (xs, ys), (xq, yq), K, h)
    assert rel(r.grad, ref) < 1e-10
    torch.testing.assert_close(r.loss, val, rtol=1e-12, atol=1e-14)
    # the user's module is untouched: parameters and BatchNorm running statistics
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---- continuous mode: convergence to a fine grid --------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("adjoint,order", [("heun", 2), ("rk4", 4)])
def test_continuous_mode_converges_at_the_adjoint_order(adjoint, order):
    net = mlp(width=8)
    theta = flatten_params(net)
    support, query = regression_task(3), regression_task(4)
    T = 1.0
    kw = dict(support=support, query=query, solver="rk4", adjoint=adjoint)
    fine = adjoint_meta_grad(net, F.mse_loss, theta, T, h=T / 640, **dict(kw, adjoint="rk4")).grad
    ns = [20, 40, 80]
    errs = [rel(adjoint_meta_grad(net, F.mse_loss, theta, T, h=T / n, **kw).grad, fine) for n in ns]
    slopes = [math.log2(errs[i] / errs[i + 1]) for i in range(len(ns) - 1)]
    assert errs[0] > errs[1] > errs[2]
    assert abs(slopes[-1] - order) < 0.3, (errs, slopes)


@pytest.mark.slow
def test_dopri5_heun_default_matches_fine_reference():
    net = mlp(width=8)
    theta = flatten_params(net)
    support, query = regression_task(5), regression_task(6)
    ref = adjoint_meta_grad(net, F.mse_loss, theta, 2.0, support=support, query=query, h=2.0 / 800,
                            solver="rk4", adjoint="rk4").grad
    r = adjoint_meta_grad(net, F.mse_loss, theta, 2.0, support=support, query=query, rtol=1e-9, atol=1e-10)
    assert rel(r.grad, ref) < 1e-3  # Heun at h = 0.01: O(h^2)
    assert r.stats["accepted_steps"] < r.stats["grid_steps"]  # dopri5 takes larger steps than the grid


# ---- batched tasks ------------------------------------------------------------------------

def batch_of_tasks(B, device="cpu"):
    sup = [regression_task(10 + b, device=device) for b in range(B)]
    qry = [regression_task(20 + b, device=device) for b in range(B)]
    return stack_tasks(sup), stack_tasks(qry), sup, qry


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver,adjoint,tol", [("euler", "discrete", 1e-12), ("rk4", "heun", 1e-12),
                                                ("dopri5", "heun", 1e-6)])
def test_batched_equals_loop_over_tasks(device, solver, adjoint, tol):
    net = mlp().to(device)
    theta = flatten_params(net)
    support, query, sup, qry = batch_of_tasks(3, device)
    r = adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=support, query=query, h=0.05,
                          solver=solver, adjoint=adjoint, batched=True, rtol=1e-10, atol=1e-12)
    assert r.grad.shape == (3, theta.numel()) and r.loss.shape == (3,) and r.params.shape == (3, theta.numel())
    for b in range(3):
        one = adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=sup[b], query=qry[b], h=0.05,
                                solver=solver, adjoint=adjoint, rtol=1e-10, atol=1e-12)
        assert rel(r.grad[b], one.grad) < tol
        torch.testing.assert_close(r.loss[b], one.loss, rtol=tol, atol=tol)


@pytest.mark.parametrize("solver,adjoint", [("euler", "discrete"), ("rk4", "rk4")])
def test_per_task_horizons(solver, adjoint):
    net = mlp()
    theta = flatten_params(net)
    support, query, sup, qry = batch_of_tasks(3)
    T = torch.tensor([0.3, 1.0, 0.65], dtype=F64)
    # per-task horizons and checkpointing together: the same as store
    for solver_, adjoint_ in (("dopri5", "heun" if adjoint == "discrete" else adjoint), (solver, adjoint)):
        kw = dict(support=support, query=query, h=0.05, solver=solver_, adjoint=adjoint_, batched=True)
        assert torch.equal(adjoint_meta_grad(net, F.mse_loss, theta, T, memory="store", **kw).grad,
                           adjoint_meta_grad(net, F.mse_loss, theta, T, memory="checkpoint", **kw).grad)
    r = adjoint_meta_grad(net, F.mse_loss, theta, T, support=support, query=query, h=0.05,
                          solver=solver, adjoint=adjoint, batched=True)
    for b in range(3):
        one = adjoint_meta_grad(net, F.mse_loss, theta, T[b].item(), support=sup[b], query=qry[b], h=0.05,
                                solver=solver, adjoint=adjoint)
        # Exact for the discrete adjoint; the RK4 adjoint restarts its interval pairing at each
        # horizon, a different (equally 4th-order) discretisation than the single-task run.
        assert rel(r.grad[b], one.grad) < (1e-12 if adjoint == "discrete" else 2e-5)
        assert rel(r.params[b], one.params) < 1e-14


# ---- memory modes ---------------------------------------------------------------------------

@pytest.mark.parametrize("solver,adjoint", [("euler", "discrete"), ("euler", "heun"), ("rk4", "rk4"),
                                            ("rk4", "heun"), ("dopri5", "heun"), ("dopri5", "rk4")])
@pytest.mark.parametrize("K", [1, 2, 7, 37])
def test_checkpoint_is_bit_identical_to_store(solver, adjoint, K):
    net = mlp()
    theta = flatten_params(net)
    support, query = regression_task(7), regression_task(8)
    kw = dict(support=support, query=query, h=0.02, solver=solver, adjoint=adjoint)
    store = adjoint_meta_grad(net, F.mse_loss, theta, K * 0.02, memory="store", **kw)
    ckpt = adjoint_meta_grad(net, F.mse_loss, theta, K * 0.02, memory="checkpoint", **kw)
    assert torch.equal(store.grad, ckpt.grad)
    assert torch.equal(store.params, ckpt.params)
    if K >= 30:
        assert ckpt.stats["trajectory_bytes"] < store.stats["trajectory_bytes"] / 2


@pytest.mark.slow
@pytest.mark.parametrize("solver,adjoint", [("dopri5", "heun"), ("rk4", "rk4")])
def test_checkpoint_memory_is_order_sqrt_n(solver, adjoint):
    net = mlp(width=8)
    theta = flatten_params(net)
    K = 400
    kw = dict(support=regression_task(7), query=regression_task(8), h=0.01, solver=solver, adjoint=adjoint)
    store = adjoint_meta_grad(net, F.mse_loss, theta, K * 0.01, memory="store", **kw)
    ckpt = adjoint_meta_grad(net, F.mse_loss, theta, K * 0.01, memory="checkpoint", **kw)
    assert torch.equal(store.grad, ckpt.grad)
    state = theta.numel() * theta.element_size()
    assert store.stats["trajectory_bytes"] == (K + 1) * state
    assert ckpt.stats["trajectory_bytes"] <= 3 * math.sqrt(K + 1) * state


def test_auto_memory_picks_by_budget():
    net = mlp()
    theta = flatten_params(net)
    kw = dict(support=regression_task(1), query=regression_task(2), h=0.01, solver="euler", adjoint="discrete")
    small = adjoint_meta_grad(net, F.mse_loss, theta, 1.0, memory="auto", memory_budget=1000, **kw)
    states = (small.stats["grid_steps"] + 1) * theta.numel() * theta.element_size()
    middle = adjoint_meta_grad(net, F.mse_loss, theta, 1.0, memory="auto", memory_budget=states, **kw)
    large = adjoint_meta_grad(net, F.mse_loss, theta, 1.0, memory="auto", memory_budget=1 << 30, **kw)
    # the fastest plan that fits: checkpoints, the states, the states and every linearisation
    assert small.stats["memory"] == "checkpoint" and middle.stats["memory"] == "store"
    assert large.stats["memory"] == "linearise" and large.stats["kept_linearisations"] == 100
    assert torch.equal(small.grad, middle.grad)
    assert rel(large.grad, middle.grad) < 1e-12          # its gradients come from the graph-building path


# ---- errors -------------------------------------------------------------------------------

def test_bad_input_gets_clear_errors():
    net = mlp()
    theta = flatten_params(net)
    s, q = regression_task(1), regression_task(2)
    call = lambda **kw: adjoint_meta_grad(**{**dict(model=net, loss=F.mse_loss, theta=theta, T=1.0,  # noqa: E731
                                                     support=s, query=q, h=0.1), **kw})
    d = theta.numel()
    with pytest.raises(ValueError, match=rf"argument 'theta' must have shape \[{d}\].*got \({d - 1},\)"):
        call(theta=theta[:-1])
    with pytest.raises(ValueError, match=r"argument 'T' must be finite and > 0, got 0.0"):
        call(T=0.0)
    with pytest.raises(ValueError, match=r"argument 'T' must be finite and > 0, got -1.0"):
        call(T=-1.0)
    with pytest.raises(ValueError, match=r"argument 'h' must be <= T"):
        call(h=2.0)
    with pytest.raises(ValueError, match=r"argument 'support' \(support x\) must have theta's dtype"):
        call(support=(s[0].float(), s[1]))
    with pytest.raises(ValueError, match=r"argument 'query': x and y must have the same number of samples, got 20 and 19"):
        call(query=(q[0], q[1][:19]))
    support, query, _, _ = batch_of_tasks(3)
    with pytest.raises(ValueError, match=r"'support' and 'query' must hold the same number of tasks, got 3 and 2"):
        call(support=support, query=(query[0][:2], query[1][:2]), batched=True)
    with pytest.raises(ValueError, match=r"argument 'T' must be a number or a tensor of shape \[B\] = \[3\]"):
        call(support=support, query=query, batched=True, T=torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match=r"argument 'solver' must be one of"):
        call(solver="rk45")
    with pytest.raises(ValueError, match=r"argument 'memory' must be one of"):
        call(memory="disk")


@pytest.mark.parametrize("solver", ["dopri5", "rk4", "euler"])
def test_non_finite_training_loss_names_time_and_step(solver):
    net = mlp()
    theta = flatten_params(net)

    def loss_with_a_cliff(pred, target):
        # -2 mean(pred) drives the predictions up; sqrt turns NaN once their mean passes 1.
        m = pred.mean()
        return F.mse_loss(pred, target) - 2 * m + torch.sqrt(1.0 - m)

    with pytest.raises(ValueError, match=r"inner training loss or its gradient became non-finite.*(step|t=)"):
        adjoint_meta_grad(net, loss_with_a_cliff, theta, 20.0, support=regression_task(1),
                          query=regression_task(2), h=0.1, solver=solver, adjoint="heun")


@pytest.mark.cuda
def test_device_mismatch_is_named():
    net = mlp()
    theta = flatten_params(net).cuda()
    with pytest.raises(ValueError, match=r"argument 'support' \(support x\) must be on theta's device"):
        adjoint_meta_grad(net, F.mse_loss, theta, 1.0, support=regression_task(1), query=regression_task(2), h=0.1)


# ---- compile=True: torch.compile-d torch.func callbacks --------------------------------------

# torch 2.13 refuses compile=True (its inductor segfaults on the compiled HVP): there the same
# calls must warn, run eagerly and stay exact
COMPILE_OK = compile_refusal() is None


@pytest.mark.slow
def test_compiled_callbacks_equal_autograd_unrolling_and_eager():
    """compile=True (forward-over-reverse HVPs) gives MAML's exact gradient, batched too, and
    agrees with the eager callbacks in the continuous mode."""
    if not COMPILE_OK:
        with pytest.warns(RuntimeWarning, match="segfaults"):
            _compiled_callbacks_case()
        return
    _compiled_callbacks_case()


def _compiled_callbacks_case():
    net = mlp(seed=4)
    theta = flatten_params(net)
    support, query = regression_task(1), regression_task(2)
    K, h = 12, 0.05
    r = adjoint_meta_grad(net, F.mse_loss, theta, K * h, support=support, query=query, h=h,
                          solver="euler", adjoint="discrete", compile=True)
    assert r.stats["compiled"] is COMPILE_OK
    ref, _ = unrolled_maml_grad(net, F.mse_loss, theta, support, query, K, h)
    assert rel(r.grad, ref) < 1e-10
    eager = adjoint_meta_grad(net, F.mse_loss, theta, K * h, support=support, query=query, h=h, rtol=1e-9, atol=1e-10)
    comp = adjoint_meta_grad(net, F.mse_loss, theta, K * h, support=support, query=query, h=h, rtol=1e-9,
                             atol=1e-10, compile=True)
    assert eager.stats["compiled"] is False and comp.stats["compiled"] is COMPILE_OK
    assert rel(comp.grad, eager.grad) < 1e-10
    # a meta-batch, and new task data of the same shapes (reusing the compiled code)
    bsup, bqry, sup, qry = batch_of_tasks(2)
    rb = adjoint_meta_grad(net, F.mse_loss, theta, K * h, support=bsup, query=bqry, h=h, solver="euler",
                           adjoint="discrete", batched=True, compile=True)
    assert rb.stats["compiled"] is COMPILE_OK
    for b in range(2):
        ref_b, _ = unrolled_maml_grad(net, F.mse_loss, theta, sup[b], qry[b], K, h)
        assert rel(rb.grad[b], ref_b) < 1e-10


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler here")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    net = mlp(seed=5)  # a fresh module: no cached compiled callbacks
    theta = flatten_params(net)
    support, query = regression_task(1), regression_task(2)
    expect = "torch.compile of the model callbacks failed.*no compiler here" if COMPILE_OK else "segfaults"
    with pytest.warns(RuntimeWarning, match=expect):
        r = adjoint_meta_grad(net, F.mse_loss, theta, 0.2, support=support, query=query, h=0.05,
                              solver="euler", adjoint="discrete", compile=True)
    assert r.stats["compiled"] is False
    ref, _ = unrolled_maml_grad(net, F.mse_loss, theta, support, query, 4, 0.05)
    assert rel(r.grad, ref) < 1e-10
    with pytest.raises(TypeError, match="argument 'compile' must be a bool, got str"):
        adjoint_meta_grad(net, F.mse_loss, theta, 0.2, support=support, query=query, compile="yes")


def test_dopri5_warns_when_its_steps_collapse_below_the_grid():
    """A non-smooth training loss (ReLU, max-pool) makes dopri5 take more steps than the grid
    has intervals: the user is told to switch solver or loosen the tolerances, and a run past
    max_steps stops with an error saying so instead of running for hours."""
    torch.manual_seed(0)
    net = small_conv4(channels=2, ways=2).double().train()
    theta = flatten_params(net)
    g = torch.Generator().manual_seed(3)
    xs, ys = torch.randn(4, 1, 16, 16, generator=g, dtype=F64), torch.tensor([0, 1, 0, 1])
    kw = dict(support=(xs, ys), query=(xs, ys), h=0.1)
    with pytest.warns(RuntimeWarning, match=r"dopri5 took \d+ accepted .* for 5 grid intervals.*solver='rk4'"):
        adjoint_meta_grad(net, F.cross_entropy, theta, 0.5, rtol=1e-3, atol=1e-5, **kw)
    with pytest.raises(ValueError, match=r"reached max_steps=60 .*not smooth.*solver='rk4'"):
        adjoint_meta_grad(net, F.cross_entropy, theta, 0.5, rtol=1e-4, atol=1e-6, max_steps=60, **kw)
    net2 = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a smooth loss at the defaults: no warning
        adjoint_meta_grad(net2, F.mse_loss, flatten_params(net2), 0.5, support=regression_task(1),
                          query=regression_task(2))


def test_compile_auto_compiles_dense_models_on_the_cpu_only(monkeypatch):
    from amaml_ext.functional.compile_policy import compile_pays, resolve_compile
    from amaml_ext import models
    cpu = torch.device("cpu")
    mlp_net, conv = models.mlp(width=8), models.Conv4(ways=3, channels=4, image_size=16)
    assert compile_pays(mlp_net, cpu) and not compile_pays(conv, cpu)
    assert not compile_pays(mlp_net, torch.device("cuda"))           # not measured on a GPU: eager
    monkeypatch.setenv("AMAML_EXT_COMPILE", "auto")
    assert resolve_compile("auto", mlp_net, cpu) is COMPILE_OK and resolve_compile("auto", conv, cpu) is False
    assert resolve_compile(False, mlp_net, cpu) is False and resolve_compile(True, conv, cpu) is True
    monkeypatch.setenv("AMAML_EXT_COMPILE", "on")
    assert resolve_compile("auto", conv, cpu) is COMPILE_OK
    monkeypatch.setenv("AMAML_EXT_COMPILE", "off")
    assert resolve_compile("auto", mlp_net, cpu) is False
    monkeypatch.setenv("AMAML_EXT_COMPILE", "sometimes")
    with pytest.raises(ValueError, match="AMAML_EXT_COMPILE must be auto, on or off, got 'sometimes'"):
        resolve_compile("auto", mlp_net, cpu)
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")      # refused there: auto is silently eager
    monkeypatch.setenv("AMAML_EXT_COMPILE", "auto")
    assert resolve_compile("auto", mlp_net, cpu) is False


@pytest.mark.slow
def test_compile_auto_is_the_learners_default_and_gives_the_eager_gradient(monkeypatch):
    from amaml_ext import learners as L
    monkeypatch.setenv("AMAML_EXT_COMPILE", "auto")
    net = mlp(0, width=4, depth=1)
    support, query, _, _ = batch_of_tasks(2)
    from amaml_ext.tasks import TaskBatch
    tasks_ = TaskBatch(support, query)
    learner = L.make_learner("amaml", net, F.mse_loss, inner_steps=4, inner_lr=0.05, solver="euler",
                             adjoint="discrete")
    assert learner.options["compile"] == "auto"
    step = learner.meta_grad(flatten_params(net), tasks_)
    assert step.stats["compiled"] is COMPILE_OK
    eager = L.make_learner("amaml", net, F.mse_loss, inner_steps=4, inner_lr=0.05, solver="euler",
                           adjoint="discrete", compile=False).meta_grad(flatten_params(net), tasks_)
    assert eager.stats["compiled"] is False
    assert rel(step.grad, eager.grad) < 1e-10


def test_solver_option_and_model_errors():
    m = mlp(width=4, depth=1)
    theta = flatten_params(m)
    s, q = data(0), data(1)
    for kw, match in ((dict(rtol=0.0), "rtol"), (dict(atol=-1e-8), "atol"), (dict(rtol=5.0), "rtol"),
                      (dict(max_steps=0), "max_steps"), (dict(memory_budget=-1), "memory_budget")):
        with pytest.raises(ValueError, match=match):
            adjoint_meta_grad(m, F.mse_loss, theta, 0.5, support=s, query=q, **kw)
    with pytest.raises(ValueError, match="no trainable parameters"):
        adjoint_meta_grad(nn.Tanh(), F.mse_loss, torch.zeros(0, dtype=F64), 0.5, support=s, query=q)


def test_float32_per_task_horizons_accepted():
    m = mlp(width=4, depth=1)
    xs, ys = stack_tasks(data(i) for i in range(3))
    kw = dict(support=(xs, ys), query=(xs, ys), batched=True, h=0.1, solver="euler", adjoint="discrete")
    T32 = torch.tensor([0.3, 0.7, 1.1], dtype=torch.float32)
    a = adjoint_meta_grad(m, F.mse_loss, flatten_params(m), T32, **kw)
    b = adjoint_meta_grad(m, F.mse_loss, flatten_params(m), torch.tensor([0.3, 0.7, 1.1], dtype=F64), **kw)
    assert torch.equal(a.grad, b.grad)
    c = adjoint_meta_grad(m, F.mse_loss, flatten_params(m)[:].clone(), torch.tensor(0.3, dtype=torch.float32),
                          support=(xs[0], ys[0]), query=(xs[0], ys[0]), h=0.1, solver="euler", adjoint="discrete")
    assert rel(c.grad, b.grad[0]) < 1e-12


def test_batched_flag_with_unbatched_data_says_so():
    m = mlp(width=4, depth=1)
    s, q = data(0), data(1)
    with pytest.raises(ValueError, match="is the data batched"):
        adjoint_meta_grad(m, F.mse_loss, flatten_params(m), 0.5, support=s, query=q, batched=True)
