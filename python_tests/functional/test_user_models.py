"""Models and inputs users hold (docs/design.md, "Reliability"), in the cases that work: each against an
independent reference, MAML's unrolled autograd through K GD steps with
``torch.func.functional_call`` on the user's own module (or a closed form), or the clear error
for an input that is truly unsupported. Exact mode (``solver="euler", adjoint="discrete"``,
T = K h) must equal the reference to 1e-10 in float64."""

import math

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as activation_checkpoint
from torch import nn
from torch.func import functional_call

import amaml_ext
from amaml_ext import learners
from amaml_ext.data.batch import TaskBatch

F64 = torch.float64
K, H = 5, 0.1
TOL = 1e-10


# -- the reference -----------------------------------------------------------------------------

def _unflat(model, u):
    out, i = {}, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = u[i:i + p.numel()].reshape(p.shape)
            i += p.numel()
    return out


def unrolled(model, loss, theta, K, h, support, query):
    """MAML: autograd through K GD steps of size h on the support loss, then the query loss;
    the model is the user's own (frozen parameters and buffers as it holds them)."""
    xs, ys = support
    xq, yq = query
    th = theta.detach().clone().requires_grad_(True)
    u = th
    for _ in range(K):
        (g,) = torch.autograd.grad(loss(functional_call(model, _unflat(model, u), (xs,)), ys), u, create_graph=True)
        u = u - h * g
    V = loss(functional_call(model, _unflat(model, u), (xq,)), yq)
    (G,) = torch.autograd.grad(V, th)
    return G, V.detach(), u.detach()


def unrolled_batched(model, loss, theta, K, h, support, query):
    rows = [unrolled(model, loss, theta, K, h, (support[0][b], support[1][b]), (query[0][b], query[1][b]))
            for b in range(support[0].shape[0])]
    return tuple(torch.stack(r) for r in zip(*rows))


def rel(a, b):
    return float((a - b).norm() / b.norm())


def exact(model, loss, theta, support, query, K=K, h=H, **kw):
    return amaml_ext.adjoint_meta_grad(model, loss, theta, T=K * h, h=h, solver="euler", adjoint="discrete",
                                       support=support, query=query, **kw)


def data(seed, n=8, din=2, dout=1, B=None, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if B is None else (B, n)
    return torch.randn(*shape, din, generator=g, dtype=dtype), torch.randn(*shape, dout, generator=g, dtype=dtype)


S, Q = data(1), data(2)
SB, QB = data(1, B=2), data(2, B=2)


def mlp(din=2, dout=1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(din, 8), nn.Tanh(), nn.Linear(8, dout)).double()


def assert_exact(model, loss=F.mse_loss, support=S, query=Q, K=K, h=H, batched=False):
    """Ours in exact mode against the unrolled reference: gradient, query loss and u(T)."""
    theta = amaml_ext.flatten_params(model)
    r = exact(model, loss, theta, support, query, K=K, h=h, batched=batched)
    G, V, U = (unrolled_batched if batched else unrolled)(model, loss, theta, K, h, support, query)
    assert r.grad.shape == G.shape
    assert rel(r.grad, G) < TOL
    assert torch.allclose(r.loss, V, rtol=TOL, atol=0)
    assert rel(r.params, U) < TOL
    return r


# -- hooks -------------------------------------------------------------------------------------

@pytest.mark.parametrize("batched", [False, True])
def test_forward_hook_and_pre_hook(batched):
    net = mlp()
    net[0].register_forward_hook(lambda m, i, o: o * 1.5 + 0.1)
    net[2].register_forward_pre_hook(lambda m, i: (i[0] ** 2,))
    if batched:
        assert_exact(net, support=SB, query=QB, batched=True)
    else:
        assert_exact(net)


class _HookFree(nn.Module):
    """The forward hook ``o * 1.5 + 0.1`` on the first layer, written into the forward."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        return self.net[2](self.net[1](self.net[0](x) * 1.5 + 0.1))


@pytest.mark.parametrize("solver,adjoint", [("dopri5", "heun"), ("rk4", "rk4")])
def test_forward_hook_in_continuous_modes_equals_the_hook_free_module(solver, adjoint):
    hooked, plain = mlp(), _HookFree()
    hooked[0].register_forward_hook(lambda m, i, o: o * 1.5 + 0.1)
    theta = amaml_ext.flatten_params(hooked)
    assert torch.equal(theta, amaml_ext.flatten_params(plain))
    a = amaml_ext.adjoint_meta_grad(hooked, F.mse_loss, theta, T=0.5, h=0.05, solver=solver, adjoint=adjoint,
                                    support=S, query=Q)
    b = amaml_ext.adjoint_meta_grad(plain, F.mse_loss, theta, T=0.5, h=0.05, solver=solver, adjoint=adjoint,
                                    support=S, query=Q)
    assert rel(a.grad, b.grad) < 1e-12
    assert rel(a.params, b.params) < 1e-12


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("batched", [False, True])
def test_backward_hooks_that_observe(batched):
    net = mlp()
    seen = []
    net[0].register_full_backward_hook(lambda m, gi, go: seen.append(1))
    net[0].weight.register_hook(lambda g: g * 3)                          # on the Parameter: replaced by theta
    if batched:
        assert_exact(net, support=SB, query=QB, batched=True)
    else:
        assert_exact(net)
    assert seen


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_backward_hooks_that_change_the_gradient_one_task():
    # batched: test_model_reliability.py::test_backward_hooks_that_change_the_gradient_hold_batched
    net = mlp()
    net[2].register_full_backward_pre_hook(lambda m, go: (go[0] * 2,))
    net[2].register_full_backward_hook(lambda m, gi, go: (gi[0] * 0.5,))
    assert_exact(net)


# -- parametrizations --------------------------------------------------------------------------

P = torch.nn.utils.parametrizations


# weight_norm (both APIs): against central finite differences in test_model_reliability.py, since
# unrolled autograd inherits torch's wrong double backward of torch._weight_norm (trial D10)


def test_spectral_norm_in_eval_mode():
    net = mlp()
    P.spectral_norm(net[0])
    net.eval()
    assert_exact(net)


def test_orthogonal_parametrization():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    P.orthogonal(net[0])
    assert_exact(net, support=data(1, din=4), query=data(2, din=4))


# -- what is trained, what is shared ---------------------------------------------------------

class _LoRA(nn.Module):
    def __init__(self, base: nn.Linear, r: int = 2):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(r, base.in_features, dtype=F64) * 0.3)
        self.B = nn.Parameter(torch.randn(base.out_features, r, dtype=F64) * 0.3)

    def forward(self, x):
        return self.base(x) + x @ self.A.T @ self.B.T


def test_lora_adapters_over_a_frozen_base():
    torch.manual_seed(0)
    net = nn.Sequential(_LoRA(nn.Linear(2, 8).double()), nn.Tanh(), _LoRA(nn.Linear(8, 1).double()))
    assert amaml_ext.flatten_params(net).numel() == 2 * (2 + 8) + 2 * (8 + 1)
    before = [p.detach().clone() for p in net.parameters()]
    assert_exact(net)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3).double()
        self.b = nn.Linear(3, 3).double()
        self.b.weight = self.a.weight              # one Parameter registered twice

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("batched", [False, True])
def test_tied_parameter(batched):
    torch.manual_seed(0)
    net = _Tied()
    assert amaml_ext.flatten_params(net).numel() == 9 + 3 + 3
    if batched:
        assert_exact(net, support=data(1, din=3, dout=3, B=2), query=data(2, din=3, dout=3, B=2), batched=True)
    else:
        assert_exact(net, support=data(1, din=3, dout=3), query=data(2, din=3, dout=3))


def test_one_submodule_registered_twice():
    torch.manual_seed(0)
    lin = nn.Linear(3, 3).double()
    assert_exact(nn.Sequential(lin, nn.Tanh(), lin), support=data(1, din=3, dout=3), query=data(2, din=3, dout=3))


class _SharedBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        scale = torch.tensor([2.0], dtype=F64)
        self.l1, self.l2 = nn.Linear(2, 4).double(), nn.Linear(4, 1).double()
        self.l1.register_buffer("scale", scale)
        self.l2.register_buffer("scale", scale)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x) * self.l1.scale)) * self.l2.scale


def test_shared_buffer_and_its_in_place_change():
    torch.manual_seed(0)
    net = _SharedBuffer()
    assert_exact(net)
    net.l1.scale.fill_(0.5)                      # both modules see it, and so does the next call
    r = assert_exact(net)
    torch.manual_seed(0)
    fresh = _SharedBuffer()
    fresh.l1.scale.fill_(0.5)
    G, _, _ = unrolled(fresh, F.mse_loss, amaml_ext.flatten_params(fresh), K, H, S, Q)
    assert rel(r.grad, G) < TOL


class _IntParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1).double()
        self.k = nn.Parameter(torch.tensor([3]), requires_grad=False)

    def forward(self, x):
        return self.lin(x) * self.k


def test_integer_parameter_is_a_constant():
    r = assert_exact(_IntParam())
    assert r.grad.numel() == 3


class _Lists(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.ws = nn.ParameterList([nn.Parameter(torch.randn(2, 4, dtype=F64) * 0.5),
                                    nn.Parameter(torch.randn(4, 1, dtype=F64) * 0.5)])
        self.bs = nn.ParameterDict({"a": nn.Parameter(torch.zeros(4, dtype=F64)),
                                    "unused": nn.Parameter(torch.ones(3, dtype=F64))})

    def forward(self, x):
        return torch.tanh(x @ self.ws[0] + self.bs["a"]) @ self.ws[1]


def test_parameter_list_and_dict_with_an_unused_parameter():
    r = assert_exact(_Lists())
    assert torch.equal(r.grad[-3:], torch.zeros(3, dtype=F64))


# -- outputs, losses, data --------------------------------------------------------------------

class _TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        return self.net(x), x


class _DictOut(_TupleOut):
    def forward(self, x):
        return {"out": self.net(x)}


@pytest.mark.parametrize("batched", [False, True])
def test_forward_returning_a_tuple_or_a_dict(batched):
    for net, loss in ((_TupleOut(), lambda o, y: F.mse_loss(o[0], y)),
                      (_DictOut(), lambda o, y: F.mse_loss(o["out"], y))):
        if batched:
            assert_exact(net, loss, support=SB, query=QB, batched=True)
        else:
            assert_exact(net, loss)


def test_reduction_sum_and_none():
    assert_exact(mlp(), lambda p, y: F.mse_loss(p, y, reduction="sum"))
    with pytest.raises(ValueError, match="'loss'"):
        exact(mlp(), lambda p, y: F.mse_loss(p, y, reduction="none"), amaml_ext.flatten_params(mlp()), S, Q)


@pytest.mark.parametrize("batched", [False, True])
def test_cross_entropy_with_integer_labels(batched):
    net = mlp(dout=3)
    g = torch.Generator().manual_seed(3)
    xs, xq = torch.randn(2, 9, 2, generator=g, dtype=F64), torch.randn(2, 9, 2, generator=g, dtype=F64)
    ys, yq = torch.randint(0, 3, (2, 9), generator=g), torch.randint(0, 3, (2, 9), generator=g)
    if batched:
        assert_exact(net, F.cross_entropy, (xs, ys), (xq, yq), batched=True)
    else:
        assert_exact(net, F.cross_entropy, (xs[0], ys[0]), (xq[0], yq[0]))


def test_argmax_loss_is_refused_naming_the_loss():
    net = mlp(dout=3)
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(0))
    error_rate = lambda p, y: (p.argmax(1) != y).double().mean()  # noqa: E731
    for solver, adjoint in (("euler", "discrete"), ("dopri5", "heun")):
        with pytest.raises(ValueError, match="loss"):
            amaml_ext.adjoint_meta_grad(net, error_rate, amaml_ext.flatten_params(net), T=0.5, h=0.1,
                                        solver=solver, adjoint=adjoint, support=(S[0], y), query=(Q[0], y))


def test_zero_gradient_loss_gives_zero():
    r = exact(mlp(), lambda p, y: F.mse_loss(p.round(), y), amaml_ext.flatten_params(mlp()), S, Q)
    assert torch.equal(r.grad, torch.zeros_like(r.grad))


def test_single_sample_support_and_query():
    assert_exact(mlp(), support=(S[0][:1], S[1][:1]), query=(Q[0][:1], Q[1][:1]))


def test_batched_with_one_task():
    net = mlp()
    r = assert_exact(net, support=data(1, B=1), query=data(2, B=1), batched=True)
    assert r.grad.shape == (1, 33)
    theta = amaml_ext.flatten_params(net)
    a = amaml_ext.adjoint_meta_grad(net, F.mse_loss, theta, T=0.5, h=0.1, solver="rk4", adjoint="rk4",
                                    support=data(1, B=1), query=data(2, B=1), batched=True)
    b = amaml_ext.adjoint_meta_grad(net, F.mse_loss, theta, T=0.5, h=0.1, solver="rk4", adjoint="rk4",
                                    support=S, query=Q)
    assert rel(a.grad[0], b.grad) < 1e-12


class _Embed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.e = nn.Embedding(10, 4).double()
        self.l = nn.Linear(4, 1).double()

    def forward(self, i):
        return self.l(torch.tanh(self.e(i)))


def _ids(seed, B=None):
    g = torch.Generator().manual_seed(seed)
    shape = (8,) if B is None else (B, 8)
    return torch.randint(0, 10, shape, generator=g), torch.randn(*shape, 1, generator=g, dtype=F64)


def test_embedding_with_integer_inputs():
    assert_exact(_Embed(), support=_ids(1), query=_ids(2))
    assert_exact(_Embed(), support=_ids(3, B=2), query=_ids(4, B=2), batched=True)


# -- horizons and steps -----------------------------------------------------------------------

def test_bad_horizons_are_refused_naming_the_argument():
    theta = amaml_ext.flatten_params(mlp())

    def call(T, h=0.1):
        return amaml_ext.adjoint_meta_grad(mlp(), F.mse_loss, theta, T=T, h=h, solver="euler", adjoint="discrete",
                                           support=S, query=Q)

    with pytest.raises(ValueError, match="T / h must be a whole number"):
        call(0.35)
    for T in (0.0, torch.tensor(0.0), -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="'T'"):
            call(T)
    with pytest.raises(ValueError, match="'h'"):
        call(-0.5, h=-0.1)


def test_float32_horizon_and_rounded_quotient_give_whole_steps():
    net = mlp()
    theta = amaml_ext.flatten_params(net)
    G, _, _ = unrolled(net, F.mse_loss, theta, 3, 0.1, S, Q)
    for T in (0.3, torch.tensor(0.3)):            # 0.3 / 0.1 = 2.9999999999999996
        r = amaml_ext.adjoint_meta_grad(net, F.mse_loss, theta, T=T, h=0.1, solver="euler", adjoint="discrete",
                                        support=S, query=Q)
        assert r.stats["grid_steps"] == 3
        assert rel(r.grad, G) < TOL


@pytest.mark.slow
def test_many_steps_with_checkpointing_against_the_closed_form():
    # linear least squares: GD is u_{k+1} = M u_k + h b with M = I - h H, so
    # dV(u_K)/du_0 = (M^K)^T grad V(u_K)
    torch.manual_seed(0)
    net = nn.Linear(3, 1).double()
    g = torch.Generator().manual_seed(5)
    X, Xq = torch.randn(10, 3, generator=g, dtype=F64), torch.randn(10, 3, generator=g, dtype=F64)
    y, yq = torch.randn(10, 1, generator=g, dtype=F64), torch.randn(10, 1, generator=g, dtype=F64)
    steps, h = 1000, 2e-3
    theta = amaml_ext.flatten_params(net)
    A, Aq = (torch.cat([Z, torch.ones(10, 1, dtype=F64)], 1) for Z in (X, Xq))
    M = torch.eye(4, dtype=F64) - h * 2 * A.T @ A / 10
    u = theta.clone()
    for _ in range(steps):
        u = M @ u + h * 2 * A.T @ y[:, 0] / 10
    want = torch.linalg.matrix_power(M, steps).T @ (2 * Aq.T @ (Aq @ u - yq[:, 0]) / 10)
    got = {mem: amaml_ext.adjoint_meta_grad(net, F.mse_loss, theta, T=steps * h, h=h, solver="euler",
                                            adjoint="discrete", support=(X, y), query=(Xq, yq), memory=mem)
           for mem in ("checkpoint", "store")}
    for r in got.values():
        assert r.stats["grid_steps"] == steps
        assert rel(r.grad, want) < 1e-11
        assert rel(r.params, u) < 1e-11
    assert torch.equal(got["checkpoint"].grad, got["store"].grad)
    stored = got["checkpoint"].stats["trajectory_bytes"] // (4 * 8)
    assert stored <= 3 * math.sqrt(steps + 1)
    assert got["store"].stats["trajectory_bytes"] == (steps + 1) * 4 * 8


# -- normalisation, recurrent nets, forwards that cut or branch ------------------------------

@pytest.mark.parametrize("norm", [lambda: nn.LayerNorm(6), lambda: nn.GroupNorm(2, 6)])
def test_layer_and_group_norm(norm):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), norm(), nn.Tanh(), nn.Linear(6, 1)).double()
    assert_exact(net, support=data(1, din=4), query=data(2, din=4))


class _Instance(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(4, 6).double()
        self.n = nn.InstanceNorm1d(2, affine=True, track_running_stats=True).double()
        self.l2 = nn.Linear(6, 1).double()

    def forward(self, x):
        z = self.n(self.l1(x).reshape(x.shape[0], 2, 3))
        return self.l2(torch.tanh(z).reshape(x.shape[0], 6))


def test_instance_norm_with_running_stats_in_eval_mode():
    net = _Instance()
    net.n.running_mean.uniform_(-1, 1)
    net.n.running_var.uniform_(0.5, 2)
    net.eval()
    assert_exact(net, support=data(1, din=4), query=data(2, din=4))


class _Recurrent(nn.Module):
    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = kind(2, 5, batch_first=True).double()
        self.head = nn.Linear(5, 1).double()

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _sequences(seed):
    x = torch.randn(6, 4, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return x, x.sum((-1, -2)).unsqueeze(-1).sin()


@pytest.mark.parametrize("kind", [nn.RNN, nn.GRU, nn.LSTM])
def test_recurrent_nets_one_task(kind):
    assert_exact(_Recurrent(kind), support=_sequences(1), query=_sequences(2), K=3)


class _NoGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        y = self.net(x)
        with torch.no_grad():                     # a stop-gradient shift
            m = y.mean() + y.abs().max()
        return y - 0.5 * m


@pytest.mark.parametrize("batched", [False, True])
def test_no_grad_inside_forward(batched):
    if batched:
        assert_exact(_NoGrad(), support=SB, query=QB, batched=True)
    else:
        assert_exact(_NoGrad())


class _Item(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        y = self.net(x)
        return y * 2 if y.mean().item() > 0 else y


def test_python_control_flow_on_item_one_task():
    assert_exact(_Item())


class _Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.net = mlp()
        self.reentrant = reentrant

    def forward(self, x):
        return activation_checkpoint.checkpoint(self.net, x, use_reentrant=self.reentrant)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_activation_checkpointing():
    assert_exact(_Checkpointed(False))
    net = _Checkpointed(True)                     # the reentrant variant cuts autograd.grad's graph
    with pytest.raises(ValueError, match="loss"):
        exact(net, F.mse_loss, amaml_ext.flatten_params(net), S, Q)


# -- dtypes and devices -----------------------------------------------------------------------

def test_half_precision_theta_and_complex_parameters_are_refused_naming_them():
    net = mlp().half()
    with pytest.raises(TypeError, match="'theta'"):
        exact(net, F.mse_loss, amaml_ext.flatten_params(net), (S[0].half(), S[1].half()), (Q[0].half(), Q[1].half()))

    class Complex(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1).double()
            self.c = nn.Parameter(torch.tensor([1.0 + 0.5j], dtype=torch.complex128))

        def forward(self, x):
            return self.lin(x) * self.c.abs()

    net = Complex()
    with pytest.raises(TypeError, match="argument 'model' has a complex trainable parameter 'c'"):
        exact(net, F.mse_loss, amaml_ext.flatten_params(net), S, Q)


def test_low_precision_model_with_float64_theta_computes_in_float64():
    net = mlp().bfloat16()
    theta = amaml_ext.flatten_params(mlp())
    r = exact(net, F.mse_loss, theta, S, Q)
    G, _, _ = unrolled(mlp(), F.mse_loss, theta, K, H, S, Q)
    assert r.grad.dtype == F64 and rel(r.grad, G) < TOL


def _bn_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).eval()
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    return net


def test_float32_eval_batchnorm_model_with_float64_theta():
    net = _bn_net()
    theta = amaml_ext.flatten_params(net).double()
    r = exact(net, F.mse_loss, theta, S, Q)
    G, _, _ = unrolled(_bn_net().double(), F.mse_loss, theta, K, H, S, Q)
    assert rel(r.grad, G) < TOL


def test_model_moved_to_float64_after_the_first_call():
    net = _bn_net()
    exact(net, F.mse_loss, amaml_ext.flatten_params(net), (S[0].float(), S[1].float()), (Q[0].float(), Q[1].float()))
    net.double()
    assert_exact(net)


def test_theta_that_requires_grad_is_a_view_or_is_not_contiguous():
    net = mlp()
    base = amaml_ext.flatten_params(net)
    G, _, _ = unrolled(net, F.mse_loss, base, K, H, S, Q)
    GB, _, _ = unrolled_batched(net, F.mse_loss, base, K, H, SB, QB)
    leaf = base.clone().requires_grad_()
    strided = torch.stack([base, torch.zeros_like(base)], 1)[:, 0]
    offset = torch.cat([torch.zeros(5, dtype=F64), base])[5:]
    assert not strided.is_contiguous() and offset.storage_offset() == 5
    for theta in (leaf, leaf * 1.0, strided, offset, base.expand(2, -1)[0]):
        r = exact(net, F.mse_loss, theta, S, Q)
        assert rel(r.grad, G) < TOL and not r.grad.requires_grad
        assert torch.equal(theta.detach(), base)              # the input is left as it was
        assert rel(exact(net, F.mse_loss, theta, SB, QB, batched=True).grad, GB) < TOL


def test_theta_on_another_device_is_refused():
    net = mlp()
    with pytest.raises(ValueError, match="device"):
        exact(net, F.mse_loss, amaml_ext.flatten_params(net).to("meta"), S, Q)


# -- gradient_flow, AdjointLearner, learners, meta_train ---------------------------------------

def test_gradient_flow_with_a_non_leaf_theta():
    net = mlp()
    base = amaml_ext.flatten_params(net)
    w = base.clone().requires_grad_()
    u = amaml_ext.gradient_flow(net, F.mse_loss, w * 2.0, K * H, S, h=H, solver="euler", adjoint="discrete")
    F.mse_loss(functional_call(net, amaml_ext.unflatten_params(net, u), (Q[0],)), Q[1]).backward()
    G, _, _ = unrolled(net, F.mse_loss, base * 2.0, K, H, S, Q)
    assert rel(w.grad, 2 * G) < TOL


def test_adjoint_learner_after_a_parameter_is_frozen():
    net = mlp()
    learner = amaml_ext.AdjointLearner(net, F.mse_loss, T=K * H, h=H, solver="euler", adjoint="discrete")
    net[0].weight.requires_grad_(False)
    F.mse_loss(learner.adapt(*S)(Q[0]), Q[1]).backward()
    G, _, _ = unrolled(net, F.mse_loss, amaml_ext.flatten_params(net), K, H, S, Q)
    got = torch.cat([p.grad.reshape(-1) for p in net.parameters() if p.requires_grad])
    assert rel(got, G) < TOL
    assert net[0].weight.grad is None


@pytest.mark.parametrize("make", [
    lambda net: learners.MAML(net, F.mse_loss, steps=K, inner_lr=H),
    lambda net: learners.AMAML(net, F.mse_loss, T=K * H, h=H, solver="euler", adjoint="discrete", compile=False),
])
def test_learners_on_a_model_with_hooks_tied_weights_and_a_frozen_base(make):
    torch.manual_seed(0)
    net = nn.Sequential(_LoRA(nn.Linear(2, 4).double()), nn.Tanh(), nn.Linear(4, 1).double())
    net[0].register_forward_hook(lambda m, i, o: o * 1.5)
    theta = amaml_ext.flatten_params(net)
    step = make(net).meta_grad(theta, TaskBatch(SB, QB))
    G, V, _ = unrolled_batched(net, F.mse_loss, theta, K, H, SB, QB)
    assert rel(step.grad, G.mean(0)) < TOL
    assert torch.allclose(step.query_loss, V, rtol=TOL, atol=0)


def test_meta_train_interrupted_then_resumed_equals_the_uninterrupted_run(tmp_path):
    from amaml_ext import tasks
    from amaml_ext.train import meta_train

    pool, _ = tasks.train_test_pools(tasks.CosMixture(shots=5, val=5))

    def run(out, on_step=None, resume=False):
        torch.manual_seed(0)
        learner = learners.AMAML(mlp(), F.mse_loss, T=3 * H, h=H, solver="euler", adjoint="discrete",
                                 compile=False)
        return meta_train(learner, pool, meta_steps=6, meta_batch=2, out_dir=str(out), dtype=F64,
                          checkpoint_every=1, progress=False, on_step=on_step, resume=resume)

    whole = run(tmp_path / "whole")

    def ctrl_c(step, row):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", on_step=ctrl_c)
    assert (tmp_path / "cut" / "checkpoint.pt").exists()
    assert torch.equal(run(tmp_path / "cut", resume=True), whole)
