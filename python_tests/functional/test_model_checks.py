"""Issue 23 (no silent wrong answers, round two), the model as the user holds it: each mode of
each submodule, a model changed between calls, two threads on one model, second order through
gradient_flow, randomness in the forward, a float32 model under a float64 theta, a loss that
does not reach the parameters; and from the first new-user trial, buffers and statistics changed
between calls, frozen parameters, dropout, a transformer. Every numeric check is against unrolled
autograd or a closed form. (Issue 23's RK4 stability bound is tested in metagrad/test_accuracy.py,
its fused ops with overlapping outputs in ops/test_ops.py.)"""

import copy
import threading
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import amaml_ext
from amaml_ext import adjoint_meta_grad, flatten_params, gradient_flow, learners, tasks, unflatten_params
from amaml_ext.functional.compile_policy import compile_refusal
from amaml_ext.data import TaskBatch

from helpers import EXACT, F64, data, mlp, rel, stack_tasks, unrolled

K = 5   # T = 0.5 with h = 0.1
# eager and compiled; torch.compile takes seconds per model: the compiled case is marked slow
COMPILE = [False, pytest.param(True, marks=pytest.mark.slow)]


def bn_net(seed=0):
    """Linear - BatchNorm - tanh - Linear with running statistics far from a batch's own."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).double()
    with torch.no_grad():
        net[1].running_mean.uniform_(-2, 2)
        net[1].running_var.uniform_(0.2, 3)
    return net


def reference(net, theta, s, q, steps=K, lr=0.1):
    """Unrolled autograd on a copy (a training-mode BatchNorm of the reference updates its own
    running statistics, which must not touch the model under test)."""
    return unrolled(copy.deepcopy(net), F.mse_loss, theta, s, q, steps, lr)


# -- 1. each submodule's own mode --------------------------------------------------------------

@pytest.mark.parametrize("outer,inner", [("train", "eval"), ("eval", "train")])
def test_each_submodule_follows_its_own_mode(outer, inner):
    net = bn_net()
    getattr(net, outer)()
    getattr(net[1], inner)()
    s, q = data(0), data(1)
    theta = flatten_params(net)
    before = net[1].running_mean.clone()
    r = adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=s, query=q, **EXACT)
    assert rel(r.grad, reference(net, theta, s, q)) < 1e-10
    assert torch.equal(net[1].running_mean, before)        # the user's statistics are never updated
    # and batch statistics and running statistics really differ here (the test can fail)
    flipped = bn_net()
    getattr(flipped, outer)()
    assert rel(reference(flipped, theta, s, q), reference(net, theta, s, q)) > 1e-2


# -- 2. a model changed after the first call ---------------------------------------------------

class Tempered(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = mlp(width=8, depth=1)
        self.temperature = 1.0

    def forward(self, x):
        return self.body(x) / self.temperature


def _change_attribute(net):
    net.temperature = 4.0


def _replace_submodule(net):
    net.body[1] = nn.Sigmoid()


def _add_hook(net):
    net.body.register_forward_hook(lambda m, i, o: o * 3)


def _mode_of_submodule(net):
    net.body.add_module("bn", nn.BatchNorm1d(1, affine=False).double())    # a new layer, in eval mode
    net.body.bn.eval()
    with torch.no_grad():
        net.body.bn.running_mean.fill_(0.7)


@pytest.mark.parametrize("change", [_change_attribute, _replace_submodule, _add_hook, _mode_of_submodule])
@pytest.mark.parametrize("compile", COMPILE)
def test_changed_model_is_seen(change, compile):
    if compile and compile_refusal() is not None:
        pytest.skip(compile_refusal())
    net = Tempered()
    s, q = data(0), data(1)
    theta = flatten_params(net)
    first = adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=s, query=q, compile=compile, **EXACT)
    change(net)
    theta = flatten_params(net)
    r = adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=s, query=q, compile=compile, **EXACT)
    ref = reference(net, theta, s, q)
    assert rel(r.grad, ref) < 1e-10
    assert rel(first.grad, ref) > 1e-3                       # the change matters


@pytest.mark.parametrize("name", ["AMAML", "MAML", "FOMAML"])
def test_learners_see_a_changed_model(name):
    net = Tempered()
    s, q = data(0), data(1)
    batch = TaskBatch(support=(s[0][None], s[1][None]), query=(q[0][None], q[1][None]))
    kwargs = dict(steps=K, inner_lr=0.1) if name != "AMAML" else dict(T=0.5, h=0.1, solver="euler",
                                                                             adjoint="discrete")
    learner = getattr(learners, name)(net, F.mse_loss, **kwargs)
    theta = flatten_params(net)
    learner.meta_grad(theta, batch)
    net.temperature = 3.0
    got = learner.meta_grad(theta, batch).grad
    if name == "FOMAML":     # the gradient of V at the adapted parameters, by unrolling without the graph
        u = theta.clone()
        for _ in range(K):
            u = u - 0.1 * torch.func.grad(lambda w: _loss(net, w, s))(u)
        ref = torch.func.grad(lambda w: _loss(net, w, q))(u)
    else:
        ref = reference(net, theta, s, q)
    assert rel(got, ref) < 1e-10


def _loss(net, w, data):
    params = amaml_ext.unflatten_params(net, w)
    return F.mse_loss(torch.func.functional_call(net, params, (data[0],)), data[1])


# -- 3. threads ------------------------------------------------------------------------------

@pytest.mark.parametrize("compile", COMPILE)
def test_two_threads_on_one_model_get_their_own_results(compile):
    if compile and compile_refusal() is not None:
        pytest.skip(compile_refusal())
    net = bn_net()
    net.train()
    EXACT = dict(globals()["EXACT"], compile=compile)
    s, q = data(0), data(1)
    thetas = [flatten_params(net) + 0.3 * i for i in range(2)]
    alone = [adjoint_meta_grad(net, F.mse_loss, th, 0.5, support=s, query=q, **EXACT).grad for th in thetas]
    results = [[], []]
    errors = []
    start = threading.Barrier(2)

    def work(i):
        try:
            start.wait()
            for _ in range(6):
                results[i].append(adjoint_meta_grad(net, F.mse_loss, thetas[i], 0.5, support=s, query=q,
                                                    **EXACT).grad)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert rel(alone[0], alone[1]) > 1e-2                    # the two threads' answers differ
    for i in range(2):
        for g in results[i]:
            assert rel(g, alone[i]) < 1e-12


# -- 4. second order through gradient_flow ----------------------------------------------------

def test_second_order_through_gradient_flow_raises():
    net = mlp(width=8, depth=1)
    s, q = data(0), data(1)
    th = flatten_params(net).requires_grad_()
    u = gradient_flow(net, F.mse_loss, th, 0.5, s, **EXACT)
    J = _loss(net, u, q)
    with pytest.raises(RuntimeError, match="second-order derivatives through gradient_flow are not supported"):
        torch.autograd.grad(J, th, create_graph=True)
    # the first derivative still works, and is MAML's
    (g,) = torch.autograd.grad(_loss(net, gradient_flow(net, F.mse_loss, th, 0.5, s, **EXACT), q), th)
    assert rel(g, unrolled(net, F.mse_loss, th.detach(), s, q, K, 0.1)) < 1e-10


# -- 5. randomness inside forward ---------------------------------------------------------------

class Noisy(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.body, self.kind = mlp(width=8, depth=1), kind

    def forward(self, x):
        h = self.body(x)
        if self.kind == "functional_dropout":
            return F.dropout(h, 0.5, self.training)
        if self.kind == "rand":
            return h + 0.1 * torch.rand_like(h)
        return h


@pytest.mark.parametrize("kind", ["functional_dropout", "rand"])
def test_random_forward_is_detected(kind):
    net = Noisy(kind)
    s, q = data(0), data(1)
    theta = flatten_params(net)
    with pytest.warns(amaml_ext.NondeterministicModelWarning, match="not deterministic"):
        adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=s, query=q, **EXACT)
    with pytest.raises(ValueError, match="not deterministic"):
        adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=s, query=q, strict=True, **EXACT)
    with pytest.warns(amaml_ext.NondeterministicModelWarning):
        gradient_flow(net, F.mse_loss, theta.clone().requires_grad_(), 0.5, s, **EXACT)


def test_deterministic_forward_is_not_flagged():
    net = Noisy("none")
    s, q = data(0), data(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", amaml_ext.NondeterministicModelWarning)
        adjoint_meta_grad(net, F.mse_loss, flatten_params(net), 0.5, support=s, query=q, strict=True, **EXACT)


# -- 14. float64 theta on a float32 model with buffers -----------------------------------------

def test_float64_theta_on_a_float32_model_with_batchnorm():
    net = bn_net().float().eval()
    s, q = data(0), data(1)
    theta = flatten_params(net).double()
    r = adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=s, query=q, **EXACT)
    assert r.grad.dtype == F64
    assert rel(r.grad, reference(copy.deepcopy(net).double(), theta, s, q)) < 1e-10


# -- 16. a loss that does not reach the parameters --------------------------------------------

@pytest.mark.parametrize("loss", [lambda p, y: F.mse_loss(p.detach(), y),
                                  lambda p, y: (p.argmax(-1).to(y.dtype) - y.squeeze(-1)).pow(2).mean()])
def test_loss_that_does_not_reach_the_parameters(loss):
    net = mlp(width=8, depth=1)
    s, q = data(0), data(1)
    with pytest.raises(ValueError, match="argument 'loss' or the model's forward cuts the graph"):
        adjoint_meta_grad(net, loss, flatten_params(net), 0.5, support=s, query=q, **EXACT)


# -- the new-user trial's defects (docs/design.md, Reliability, D1-D10) --------------------------------

def small(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def test_hook_reading_the_users_parameters_is_refused():
    net = small()
    net[2].register_forward_hook(lambda m, i, o: o + net[0].weight.sum())
    s, q = data(0), data(1)
    with pytest.raises(ValueError, match=r"reads the model.s own trainable parameters 0\.weight other than through"):
        adjoint_meta_grad(net, F.mse_loss, flatten_params(net), 0.5, support=s, query=q, **EXACT)
    net2 = small()        # the same hook reading its own module's parameters is fine
    net2[2].register_forward_hook(lambda m, i, o: o + m.weight.sum())
    theta = flatten_params(net2)
    r = adjoint_meta_grad(net2, F.mse_loss, theta, 0.5, support=s, query=q, **EXACT)
    assert rel(r.grad, reference(net2, theta, s, q)) < 1e-10


@pytest.mark.parametrize("wrap", [pytest.param("compile", marks=pytest.mark.slow), "data_parallel"])
def test_wrapped_modules_are_unwrapped(wrap):
    net = small()
    wrapped = torch.compile(net) if wrap == "compile" else nn.DataParallel(net)
    s, q = data(0), data(1)
    theta = flatten_params(wrapped)
    r = adjoint_meta_grad(wrapped, F.mse_loss, theta, 0.5, support=s, query=q, **EXACT)
    assert rel(r.grad, reference(net, theta, s, q)) < 1e-10


class Counter(nn.Module):
    def __init__(self, weight=0.0):
        super().__init__()
        self.body = small()
        self.weight = weight                      # how much the count enters the output
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return self.body(x) + self.weight * self.calls


def test_buffers_changed_in_place_by_the_forward_are_never_the_users():
    s, q = data(0), data(1)
    net = Counter()                               # counted, the output unchanged: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", amaml_ext.NondeterministicModelWarning)
        r = adjoint_meta_grad(net, F.mse_loss, flatten_params(net), 0.5, support=s, query=q, strict=True, **EXACT)
    assert int(net.calls) == 0
    assert rel(r.grad, reference(net.body, flatten_params(net), s, q)) < 1e-10
    net = Counter(weight=0.1)                     # the count changes the function: warned, strict refuses
    with pytest.warns(amaml_ext.NondeterministicModelWarning, match="changes its buffer"):
        adjoint_meta_grad(net, F.mse_loss, flatten_params(net), 0.5, support=s, query=q, **EXACT)
    assert int(net.calls) == 0
    with pytest.raises(ValueError, match="changes its buffer"):
        adjoint_meta_grad(net, F.mse_loss, flatten_params(net), 0.5, support=s, query=q, strict=True, **EXACT)
    assert int(net.calls) == 0


def test_spectral_norm_in_training_mode_leaves_the_users_vector_alone():
    torch.manual_seed(0)
    net = nn.Sequential(torch.nn.utils.parametrizations.spectral_norm(nn.Linear(2, 8)), nn.Tanh(),
                        nn.Linear(8, 1)).double()
    u_before = net[0].parametrizations.weight[0]._u.clone()
    s, q = data(0), data(1)
    adjoint_meta_grad(net, F.mse_loss, flatten_params(net), 0.5, support=s, query=q, **EXACT)
    assert torch.equal(net[0].parametrizations.weight[0]._u, u_before)


def test_instance_norm_with_running_stats_in_training_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Unflatten(1, (2, 4)), nn.InstanceNorm1d(2, track_running_stats=True),
                        nn.Flatten(), nn.Tanh(), nn.Linear(8, 1)).double()
    mean = net[2].running_mean.clone()
    s, q = data(0), data(1)
    theta = flatten_params(net)
    r = adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=s, query=q, **EXACT)
    assert torch.equal(net[2].running_mean, mean)
    assert rel(r.grad, reference(net, theta, s, q)) < 1e-10
    batched = adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=(s[0][None], s[1][None]),
                                query=(q[0][None], q[1][None]), batched=True, **EXACT)
    assert rel(batched.grad[0], r.grad) < 1e-12


def test_gradient_flow_differentiates_support_inputs_that_require_grad():
    net = small()
    s, q = data(0), data(1)
    W = (torch.eye(2, dtype=F64) + 0.1 * torch.randn(2, 2, dtype=F64)).requires_grad_()
    theta = flatten_params(net).requires_grad_()
    u = gradient_flow(net, F.mse_loss, theta, 0.5, (s[0] @ W, s[1]), **EXACT)
    gW, gth = torch.autograd.grad(_loss(net, u, (q[0] @ W, q[1])), (W, theta))
    # unrolled autograd through the same K GD steps, the features in the graph
    w = theta.detach().clone().requires_grad_()
    v = w
    for _ in range(K):
        (g,) = torch.autograd.grad(_loss(net, v, (s[0] @ W, s[1])), v, create_graph=True)
        v = v - 0.1 * g
    rW, rth = torch.autograd.grad(_loss(net, v, (q[0] @ W, q[1])), (W, w))
    assert rel(gW, rW) < 1e-10 and rel(gth, rth) < 1e-10


def _per_task_reference(net, theta, sets, queries):
    return torch.stack([reference(net, theta, s, q) for s, q in zip(sets, queries)])


def test_backward_hooks_that_change_the_gradient_hold_batched():
    net = small()
    net[2].register_full_backward_pre_hook(lambda m, go: (go[0] * 2,))
    sets, queries = [data(0), data(2)], [data(1), data(3)]
    S = (torch.stack([a for a, _ in sets]), torch.stack([b for _, b in sets]))
    Q = (torch.stack([a for a, _ in queries]), torch.stack([b for _, b in queries]))
    theta = flatten_params(net)
    r = adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=S, query=Q, batched=True, **EXACT)
    assert rel(r.grad, _per_task_reference(net, theta, sets, queries)) < 1e-10


class Branchy(nn.Module):
    """A forward vmap cannot run: data-dependent control flow."""

    def __init__(self):
        super().__init__()
        self.body = small()

    def forward(self, x):
        h = self.body(x)
        return h * 2 if x.mean().item() > 0 else h


def test_models_vmap_cannot_run_are_evaluated_task_by_task():
    net = Branchy()
    sets, queries = [data(0), data(2)], [data(1), data(3)]
    sets[1] = (-sets[1][0].abs(), sets[1][1])          # the two tasks take different branches
    S = (torch.stack([a for a, _ in sets]), torch.stack([b for _, b in sets]))
    Q = (torch.stack([a for a, _ in queries]), torch.stack([b for _, b in queries]))
    theta = flatten_params(net)
    with pytest.warns(RuntimeWarning, match="evaluated one at a time.*vmap"):
        r = adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=S, query=Q, batched=True, **EXACT)
    assert rel(r.grad, _per_task_reference(net, theta, sets, queries)) < 1e-10
    step = learners.MAML(net, F.mse_loss, steps=K, inner_lr=0.1).meta_grad(theta, TaskBatch(support=S, query=Q))
    assert rel(step.grad, _per_task_reference(net, theta, sets, queries).mean(0)) < 1e-10


def test_learner_refuses_a_model_whose_trainable_parameters_changed():
    net = small()
    learner = learners.MAML(net, F.mse_loss, steps=2, inner_lr=0.1)
    net[0].weight.requires_grad_(False)
    s, q = data(0), data(1)
    batch = TaskBatch(support=(s[0][None], s[1][None]), query=(q[0][None], q[1][None]))
    with pytest.raises(ValueError, match=r"trainable parameters changed since the learner was made \(33 -> 17"):
        learner.meta_grad(flatten_params(net), batch)
    ad = amaml_ext.AdjointLearner(small(), F.mse_loss, T=0.5, h=0.1, learn_lr=True, solver="euler", adjoint="discrete")
    ad.module[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="changed since the learner was made"):
        ad.adapt(*s)


def test_unsupported_models_and_grids_are_named():
    s, q = data(0), data(1)
    net = small()
    net[0].register_parameter("phase", nn.Parameter(torch.ones(2, dtype=torch.complex128)))
    with pytest.raises(TypeError, match="complex trainable parameter '0.phase'"):
        adjoint_meta_grad(net, F.mse_loss, torch.zeros(35, dtype=F64), 0.5, support=s, query=q, **EXACT)
    with pytest.raises(ValueError, match="arguments 'T' and 'h'.*grid steps"):
        adjoint_meta_grad(small(), F.mse_loss, flatten_params(small()), 1.0, support=s, query=q, h=1e-13,
                          solver="euler", adjoint="discrete")
    meta = small().to("meta")
    with pytest.raises(ValueError, match="'meta' device"):
        adjoint_meta_grad(meta, F.mse_loss, torch.zeros(33, dtype=F64, device="meta"), 0.5,
                          support=(s[0].to("meta"), s[1].to("meta")), query=(q[0].to("meta"), q[1].to("meta")), **EXACT)
    emb = nn.Sequential(nn.Embedding(5, 2, sparse=True), nn.Flatten(), nn.Linear(2, 1)).double()
    xi = torch.randint(0, 5, (6, 1))
    with pytest.raises(ValueError, match="sparse=True"):
        adjoint_meta_grad(emb, F.mse_loss, flatten_params(emb), 0.5, support=(xi, torch.zeros(6, 1, dtype=F64)),
                          query=(xi, torch.zeros(6, 1, dtype=F64)), **EXACT)


def _gd_value(net, theta, s, q, steps=K, lr=0.1):
    """V(u_K(theta)) by first-order autograd only (each GD step's gradient), for finite differences."""
    u = theta.clone()
    for _ in range(steps):
        u = u - lr * torch.func.grad(lambda w: _loss(net, w, s))(u)
    return _loss(net, u, q).item()


@pytest.mark.parametrize("api", ["parametrizations", "old"])
def test_weight_norm_second_order_is_right(api):
    torch.manual_seed(0)
    lin = nn.Linear(2, 4).double()
    lin = (torch.nn.utils.parametrizations.weight_norm(lin) if api == "parametrizations"
           else torch.nn.utils.weight_norm(lin))
    net = nn.Sequential(lin, nn.Tanh(), nn.Linear(4, 1)).double()
    s, q = data(0), data(1)
    theta = flatten_params(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)        # the old API is deprecated
        r = adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=s, query=q, **EXACT)
        eps = 1e-6
        fd = torch.stack([torch.tensor((_gd_value(net, theta + eps * e, s, q) - _gd_value(net, theta - eps * e, s, q))
                                       / (2 * eps), dtype=F64) for e in torch.eye(theta.numel(), dtype=F64)])
    assert rel(r.grad, fd) < 1e-6


@pytest.mark.slow
def test_every_model_of_a_process_is_compiled():
    """Dynamo keeps compiled code per code object and stops compiling one after 8 recompilations:
    with one code object for every model, the ninth model of a process silently ran eagerly."""
    if compile_refusal() is not None:
        pytest.skip(compile_refusal())
    from amaml_ext.functional import TaskFunctions
    from torch._dynamo.utils import counters
    s = (data(0)[0][None], data(0)[1][None])
    for width in range(2, 12):                                # 10 models, each its own shapes
        torch.manual_seed(width)
        net = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, 1)).double()
        fns = TaskFunctions(net, F.mse_loss, s, s, True, compile=True)
        u = flatten_params(net)[None]
        before = counters["stats"]["unique_graphs"]
        fns.hvp(u, u)
        assert fns.compiled and counters["stats"]["unique_graphs"] > before, f"model {width - 1} not compiled"


# -- the second pass: other members of each class ---------------------------------------------------

def _two_tasks():
    sets, queries = [data(0), data(2)], [data(1), data(3)]
    S = (torch.stack([a for a, _ in sets]), torch.stack([b for _, b in sets]))
    Q = (torch.stack([a for a, _ in queries]), torch.stack([b for _, b in queries]))
    return sets, queries, TaskBatch(support=S, query=Q)


@pytest.mark.parametrize("name", ["MAML", "FOMAML", "Reptile", "IMAML", "ANIL"])
def test_baselines_check_the_model_too(name):
    _, _, batch = _two_tasks()
    net = small()
    net[2].register_forward_pre_hook(lambda m, i: (i[0] + net[0].weight.sum(),))
    kwargs = dict(steps=2, inner_lr=0.1) if name != "ANIL" else dict(steps=2, inner_lr=0.1, head="2")
    learner = getattr(learners, name)(net, F.mse_loss, **kwargs)
    with pytest.raises(ValueError, match="reads the model's own trainable parameters 0.weight"):
        learner.meta_grad(flatten_params(net), batch)
    counted = Counter(weight=0.1)
    learner = getattr(learners, name)(counted, F.mse_loss, **dict(kwargs, head="body.2") if name == "ANIL" else kwargs)
    with pytest.warns(amaml_ext.NondeterministicModelWarning, match="changes its buffer"):
        learner.meta_grad(flatten_params(counted), batch)
    assert int(counted.calls) == 0


def test_meta_test_checks_the_model_and_runs_what_vmap_cannot():
    from amaml_ext import train
    sets, queries, batch = _two_tasks()
    net = Branchy()
    theta = flatten_params(net)
    with pytest.warns(RuntimeWarning, match="one at a time"):
        curve = train.meta_test(net, F.mse_loss, theta, batch, steps=2, lr=0.1)
    for b, (s, q) in enumerate(zip(sets, queries)):
        u = theta.clone()
        for _ in range(2):
            u = u - 0.1 * torch.func.grad(lambda w: _loss(net, w, s))(u)
        pred = torch.func.functional_call(net, amaml_ext.unflatten_params(net, u), (q[0],))
        assert curve["final"][b] == pytest.approx(float((pred - q[1]).norm() / q[1].norm()), rel=1e-10)
    hooked = small()
    hooked[2].register_forward_hook(lambda m, i, o: o + hooked[0].bias.sum())
    with pytest.raises(ValueError, match="reads the model's own trainable parameters 0.bias"):
        train.meta_test(hooked, F.mse_loss, flatten_params(hooked), batch, steps=2, lr=0.1)


class TensorHooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = small()

    def forward(self, x):
        h = self.body[1](self.body[0](x))
        if h.requires_grad:
            h.register_hook(lambda g: g * 2)          # vmap skips it: the tasks must run one at a time
        return self.body[2](h)


def test_tensor_hooks_inside_the_forward_hold_batched():
    sets, queries, batch = _two_tasks()
    net = TensorHooked()
    theta = flatten_params(net)
    ref = torch.stack([reference(net, theta, s, q) for s, q in zip(sets, queries)])
    with pytest.warns(RuntimeWarning, match="another gradient than plain autograd"):
        r = adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=batch.support, query=batch.query, batched=True,
                              **EXACT)
    assert rel(r.grad, ref) < 1e-10
    step = learners.MAML(net, F.mse_loss, steps=K, inner_lr=0.1).meta_grad(theta, batch)
    assert rel(step.grad, ref.mean(0)) < 1e-10


class Act(nn.Module):
    def forward(self, x):
        return torch.tanh(x)


@pytest.mark.parametrize("compile", COMPILE)
def test_a_method_patched_on_the_class_is_seen(compile, monkeypatch):
    if compile and compile_refusal() is not None:
        pytest.skip(compile_refusal())
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), Act(), nn.Linear(8, 1)).double()
    s, q = data(0), data(1)
    theta = flatten_params(net)
    adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=s, query=q, compile=compile, **EXACT)
    monkeypatch.setattr(Act, "forward", lambda self, x: torch.sin(x))
    r = adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=s, query=q, compile=compile, **EXACT)
    assert rel(r.grad, reference(net, theta, s, q)) < 1e-10


def test_swapping_which_parameters_train_is_refused():
    net = small()
    learner = learners.ANIL(net, F.mse_loss, steps=2, inner_lr=0.1, head="2")
    net[0].bias.requires_grad_(False)
    net[2].weight.requires_grad_(False)
    net[2].weight.requires_grad_(True)
    net[0].bias.requires_grad_(True)          # the same again: accepted
    _, _, batch = _two_tasks()
    learner.meta_grad(flatten_params(net), batch)
    net[0].bias.requires_grad_(False)
    extra = nn.Parameter(torch.zeros(8, dtype=F64))
    net[0].register_parameter("scale", extra)   # the same count, other parameters
    with pytest.raises(ValueError, match="trainable parameters changed since the learner was made"):
        learner.meta_grad(flatten_params(net), batch)


def test_discrete_adjoint_needs_the_euler_forward():
    s, q = data(0), data(1)
    net = small()
    for solver in ("rk4", "dopri5"):
        with pytest.raises(ValueError, match="'discrete' is the exact gradient of solver='euler'"):
            adjoint_meta_grad(net, F.mse_loss, flatten_params(net), 0.4, support=s, query=q, h=0.2, solver=solver,
                              adjoint="discrete")
        with pytest.raises(ValueError, match="must be paired with it"):
            learners.AMAML(net, F.mse_loss, T=0.4, h=0.2, solver=solver, adjoint="discrete")
        with pytest.raises(ValueError, match="must be paired with it"):
            amaml_ext.AdjointLearner(net, F.mse_loss, T=0.4, h=0.2, solver=solver, adjoint="discrete")


def test_non_finite_data_is_named_by_adjoint_meta_grad():
    s, q = data(0), data(1)
    net = small()
    qx = q[0].clone()
    qx[3, 0] = -float("inf")
    with pytest.raises(ValueError, match=r"argument 'query' \(query x\) holds non-finite values"):
        adjoint_meta_grad(net, F.mse_loss, flatten_params(net), 0.5, support=s, query=(qx, q[1]), **EXACT)
    sx = torch.stack([s[0], s[0]])
    sx[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"argument 'support' \(support x\) holds non-finite values at task 1"):
        adjoint_meta_grad(net, F.mse_loss, flatten_params(net), 0.5, support=(sx, torch.stack([s[1], s[1]])),
                          query=(torch.stack([q[0], q[0]]), torch.stack([q[1], q[1]])), batched=True, **EXACT)


@pytest.mark.slow
def test_a_loss_without_graph_is_named_before_any_compiled_call():
    """torch 2.14's compiled path crashes the process on a loss under inference_mode (every later
    backward fails too): the check refuses it first. In a child process, to keep this one clean."""
    import subprocess
    import sys
    code = """
import torch, torch.nn.functional as F, amaml_ext
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
def loss(p, y):
    with torch.inference_mode():
        return F.mse_loss(p.detach(), y)
x, y = torch.rand(6, 2, dtype=torch.float64), torch.rand(6, 1, dtype=torch.float64)
try:
    amaml_ext.adjoint_meta_grad(net, loss, amaml_ext.flatten_params(net), 0.5, support=(x, y), query=(x, y), h=0.1,
                                solver="euler", adjoint="discrete", compile=True)
except ValueError as e:
    print("refused:", e)
net(x).sum().backward()
print("backward ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env=dict(__import__("os").environ, OMP_NUM_THREADS="1"))
    assert "refused: the training loss does not depend on the model's parameters" in out.stdout, out.stderr[-2000:]
    assert "backward ok" in out.stdout


def test_torch_func_transforms_through_gradient_flow_are_named():
    net = small()
    s, q = data(0), data(1)
    theta = flatten_params(net)

    def J(th):
        return _loss(net, gradient_flow(net, F.mse_loss, th, 0.5, s, **EXACT), q)
    for transform in (torch.func.grad, torch.func.hessian):
        with pytest.raises(RuntimeError, match="gradient_flow: its inputs come from a torch.func transform"):
            transform(J)(theta)
    with pytest.raises(RuntimeError, match="gradient_flow: its inputs come from a torch.func transform"):
        torch.func.jvp(J, (theta,), (torch.ones_like(theta),))


# -- the review of the change ----------------------------------------------------------------------

def test_a_first_unbatched_call_does_not_hide_vmap_trouble_from_batched_ones():
    sets, queries, batch = _two_tasks()
    net = TensorHooked()
    theta = flatten_params(net)
    adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=sets[0], query=queries[0], **EXACT)
    with pytest.warns(RuntimeWarning, match="one at a time"):
        r = adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=batch.support, query=batch.query, batched=True,
                              **EXACT)
    assert rel(r.grad, torch.stack([reference(net, theta, s, q) for s, q in zip(sets, queries)])) < 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("batched", [False, True])
def test_compiled_callbacks_that_differ_from_autograd_are_dropped(batched):
    if compile_refusal() is not None:
        pytest.skip(compile_refusal())
    sets, queries, batch = _two_tasks()
    net = TensorHooked()
    theta = flatten_params(net)
    s, q = (batch.support, batch.query) if batched else (sets[0], queries[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=s, query=q, batched=batched, compile=True, **EXACT)
    ref = torch.stack([reference(net, theta, a, b) for a, b in zip(sets, queries)])
    assert rel(r.grad, ref if batched else ref[0]) < 1e-10


class Leaky(nn.Module):
    """A callable activation object with a field, a set attribute, and activations kept in a dict."""

    class Act:
        def __init__(self):
            self.alpha = 1.0

        def __call__(self, x):
            return torch.tanh(self.alpha * x)

    def __init__(self):
        super().__init__()
        self.body = small()
        self.act, self.skip, self.acts = Leaky.Act(), set(), {}

    def forward(self, x):
        h = self.act(self.body[0](x))
        self.acts["h"] = h
        return self.body[2](h) * (2.0 if 1 in self.skip else 1.0)


@pytest.mark.parametrize("compile", COMPILE)
def test_changes_inside_attribute_objects_are_seen(compile):
    if compile and compile_refusal() is not None:
        pytest.skip(compile_refusal())
    net = Leaky()
    s, q = data(0), data(1)
    theta = flatten_params(net)
    net(s[0])                                    # the user's own call leaves a non-leaf tensor in net.acts
    adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=s, query=q, compile=compile, **EXACT)
    net.act.alpha = 2.0
    net.skip.add(1)
    net(s[0])
    r = adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=s, query=q, compile=compile, **EXACT)
    net.acts.clear()                             # (the reference deep-copies the model, which a non-leaf blocks)
    assert rel(r.grad, reference(net, theta, s, q)) < 1e-10


def test_a_random_forward_is_still_caught_after_a_baseline_allowed_it():
    _, _, batch = _two_tasks()
    net = Noisy("rand")
    theta = flatten_params(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        learners.FOMAML(net, F.mse_loss, steps=2, inner_lr=0.1).meta_grad(theta, batch)
    with pytest.raises(ValueError, match="not deterministic"):
        adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=data(0), query=data(1), strict=True, **EXACT)


def test_frozen_sparse_embedding_and_integer_inputs_in_meta_test():
    from amaml_ext import train
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(6, 3, sparse=True), nn.Flatten(), nn.Linear(3, 1)).double()
    net[0].weight.requires_grad_(False)
    xi = torch.randint(0, 6, (2, 8, 1))
    y = torch.randn(2, 8, 1, dtype=F64)
    batch = TaskBatch(support=(xi, y), query=(xi, y))
    theta = flatten_params(net)
    curve = train.meta_test(net, F.mse_loss, theta, batch, steps=2, lr=0.1)
    u = theta.clone()
    for _ in range(2):
        u = u - 0.1 * torch.func.grad(lambda w: _loss(net, w, (xi[0], y[0])))(u)
    pred = torch.func.functional_call(net, amaml_ext.unflatten_params(net, u), (xi[0],))
    assert curve["final"][0] == pytest.approx(float((pred - y[0]).norm() / y[0].norm()), rel=1e-10)


def test_eval_transformer_batched():
    torch.manual_seed(0)

    class T(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(2, 8)
            self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.out = nn.Linear(8, 1)

        def forward(self, x):
            return self.out(self.enc(self.inp(x)[None])[0])
    net = T().double().eval()
    sets, queries, batch = _two_tasks()
    theta = flatten_params(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = adjoint_meta_grad(net, F.mse_loss, theta, 0.5, support=batch.support, query=batch.query, batched=True,
                              strict=True, **EXACT)
    assert rel(r.grad, torch.stack([reference(net, theta, s, q) for s, q in zip(sets, queries)])) < 1e-10


# -- the first new-user trial: buffers and statistics changed between calls, frozen parameters, the
# loss, dropout in training mode, torch 2.13's compiler, a transformer ----------------------------

class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp(width=8, depth=1)
        self.register_buffer("scale", torch.tensor(1.0, dtype=F64))

    def forward(self, x):
        return self.net(x) * self.scale


@pytest.mark.parametrize("compile", COMPILE)
def test_buffer_changed_between_calls_is_seen(compile):
    m = Scaled()
    s, q = data(0), data(1)
    theta = flatten_params(m)
    adjoint_meta_grad(m, F.mse_loss, theta, 0.5, support=s, query=q, compile=compile, **EXACT)
    m.scale.fill_(2.5)                                       # in place
    r = adjoint_meta_grad(m, F.mse_loss, theta, 0.5, support=s, query=q, compile=compile, **EXACT)
    assert rel(r.grad, unrolled(m, F.mse_loss, theta, s, q, 5, 0.1)) < 1e-10
    m.scale = torch.tensor(0.5, dtype=F64)                   # reassigned
    r = adjoint_meta_grad(m, F.mse_loss, theta, 0.5, support=s, query=q, compile=compile, **EXACT)
    assert rel(r.grad, unrolled(m, F.mse_loss, theta, s, q, 5, 0.1)) < 1e-10


def test_batchnorm_eval_running_stats_updated_between_calls():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).double().eval()
    s, q = data(0), data(1)
    theta = flatten_params(m)
    adjoint_meta_grad(m, F.mse_loss, theta, 0.5, support=s, query=q, **EXACT)
    m.train()
    with torch.no_grad():
        for _ in range(5):
            m(torch.randn(16, 2, dtype=F64) * 3 + 1)        # the user updates the running statistics
    m.eval()
    r = adjoint_meta_grad(m, F.mse_loss, theta, 0.5, support=s, query=q, **EXACT)
    assert rel(r.grad, unrolled(m, F.mse_loss, theta, s, q, 5, 0.1)) < 1e-10


def test_frozen_parameters_are_constants():
    m = mlp(width=8, depth=1)
    m[0].weight.requires_grad_(False)
    theta = flatten_params(m)
    assert theta.numel() == 8 + 8 + 1                           # bias of layer 0 and layer 2
    views = unflatten_params(m, theta)
    assert list(views) == ["0.bias", "2.weight", "2.bias"]
    s, q = data(0), data(1)
    r = adjoint_meta_grad(m, F.mse_loss, theta, 0.5, support=s, query=q, **EXACT)
    assert rel(r.grad, unrolled(m, F.mse_loss, theta, s, q, 5, 0.1)) < 1e-10
    with torch.no_grad():
        m[0].weight.mul_(2)                                     # frozen weights changed: seen
    r2 = adjoint_meta_grad(m, F.mse_loss, theta, 0.5, support=s, query=q, **EXACT)
    assert rel(r2.grad, unrolled(m, F.mse_loss, theta, s, q, 5, 0.1)) < 1e-10
    # every learner follows the same rule
    xs, ys = stack_tasks(data(i) for i in range(3))
    batch = tasks.TaskBatch((xs, ys), (xs, ys))
    for name in ("maml", "fomaml", "reptile", "imaml", "amaml"):
        step = learners.make_learner(name, m, F.mse_loss, inner_steps=3, maml_steps=3, inner_lr=0.1).meta_grad(theta, batch)
        assert step.grad.shape == theta.shape
    all_frozen = nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        flatten_params(all_frozen)


def test_loss_must_be_a_scalar_and_sets_non_empty():
    m = mlp(width=4, depth=1)
    theta = flatten_params(m)
    s, q = data(0), data(1)
    per_sample = lambda p, y: F.mse_loss(p, y, reduction="none")  # noqa: E731
    with pytest.raises(ValueError, match=r"scalar.*shape \(12, 1\)"):
        adjoint_meta_grad(m, per_sample, theta, 0.5, support=s, query=q)
    with pytest.raises(ValueError, match="scalar torch.Tensor, got float"):
        adjoint_meta_grad(m, lambda p, y: 1.0, theta, 0.5, support=s, query=q)
    with pytest.raises(ValueError, match="floating-point"):
        adjoint_meta_grad(m, lambda p, y: torch.tensor(1), theta, 0.5, support=s, query=q)
    empty = (s[0][:0], s[1][:0])
    with pytest.raises(ValueError, match="'support' is empty"):
        adjoint_meta_grad(m, F.mse_loss, theta, 0.5, support=empty, query=q)
    with pytest.raises(ValueError, match="'query' is empty"):
        adjoint_meta_grad(m, F.mse_loss, theta, 0.5, support=s, query=empty)


def test_dropout_in_training_mode_warns_naming_the_module():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 1)).double()
    s, q = data(0), data(1)
    with pytest.warns(RuntimeWarning, match=r"dropout in training mode \(2\).*eval"):
        adjoint_meta_grad(m, F.mse_loss, flatten_params(m), 0.5, support=s, query=q, **EXACT)
    m.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adjoint_meta_grad(m, F.mse_loss, flatten_params(m), 0.5, support=s, query=q, **EXACT)


def test_compile_refused_on_torch_2_13(monkeypatch):
    from amaml_ext import functional
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    m = Scaled()
    s, q = data(0), data(1)
    with pytest.warns(RuntimeWarning, match="2.13.0.*segfaults"):
        r = adjoint_meta_grad(m, F.mse_loss, flatten_params(m), 0.5, support=s, query=q, compile=True, **EXACT)
    assert r.stats["compiled"] is False
    monkeypatch.setattr(torch, "__version__", "2.14.1")
    assert functional.compile_refusal() is None


def test_transformer_encoder_layer_works():
    torch.manual_seed(0)

    class TF(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, dtype=F64)
            self.head = nn.Linear(8, 1, dtype=F64)

        def forward(self, x):
            return self.head(self.enc(x).mean(1))
    m = TF()
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(6, 4, 8, generator=g, dtype=F64), torch.randn(6, 1, generator=g, dtype=F64))
    q = (torch.randn(6, 4, 8, generator=g, dtype=F64), torch.randn(6, 1, generator=g, dtype=F64))
    theta = flatten_params(m)
    r = adjoint_meta_grad(m, F.mse_loss, theta, 0.2, support=s, query=q, h=0.05, solver="euler", adjoint="discrete")
    assert rel(r.grad, unrolled(m, F.mse_loss, theta, s, q, 4, 0.05)) < 1e-10
    xs, ys = s[0].unsqueeze(0).expand(2, -1, -1, -1), s[1].unsqueeze(0).expand(2, -1, -1)
    step = learners.make_learner("maml", m, F.mse_loss, maml_steps=2, inner_lr=0.05).meta_grad(
        theta, tasks.TaskBatch((xs, ys), (xs, ys)))
    assert torch.isfinite(step.grad).all()
