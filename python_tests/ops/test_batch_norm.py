"""The fused BatchNorm double backward (torch.ops.amaml_ext.batch_norm_double_backward) against
aten's (autograd through native_batch_norm_backward) and its mirror in amaml_ext.ops.reference;
opcheck and argument checks; the autograd Functions of amaml_ext.ops.batch_norm: gradcheck,
second derivatives (HVPs of a small Conv+BN net) equal to F.batch_norm's, and torch.func.vmap
over tasks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amaml_ext import ops
from amaml_ext.ops import batch_norm as bn
from amaml_ext.ops import reference

from helpers import DEVICES

SHAPES = [(7, 3), (64, 5), (4, 3, 5, 5), (2, 6, 7, 3), (5, 4, 9)]
DTYPES = [torch.float32, torch.float64]
EPS = 1e-5


def tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)


def problem(shape, dtype, device, weight=True, seed=0):
    """x (channels with their own scale and shift), weight, mean, invstd, gy, ggx, ggw, ggb."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    cs = (1, c) + (1,) * (len(shape) - 2)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    x = r(*shape) * (0.5 + torch.rand(cs, generator=g, dtype=torch.float64)) + r(*cs)
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5) if weight else None
    out = [x, w, r(*shape), r(*shape), r(c), r(c)]
    x, w, gy, ggx, ggw, ggb = [None if t is None else t.to(dtype=dtype, device=device) for t in out]
    _, mean, invstd = torch.native_batch_norm(x, w, None, None, None, True, 0.0, EPS)
    return x, w, mean, invstd, gy, ggx, ggw, ggb


def aten_double_backward(x, w, mean, invstd, gy, ggx, ggw, ggb):
    """(grad_x, grad_weight, grad_gy) by autograd through aten's native_batch_norm_backward
    (None gradients as zeros)."""
    x, gy = x.detach().requires_grad_(), gy.detach().requires_grad_()
    wl = torch.ones_like(mean) if w is None else w
    wl = wl.detach().requires_grad_()
    gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
        gy, x, wl, None, None, mean, invstd, True, EPS, [True, True, True])
    zero = torch.zeros_like
    outs = (ggx if ggx is not None else zero(x), ggw if ggw is not None else zero(mean),
            ggb if ggb is not None else zero(mean))
    return torch.autograd.grad((gx, gw, gb), (x, wl, gy), outs, allow_unused=True)


# ---- the op against aten and the mirror --------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weight", [True, False])
def test_op_matches_aten_and_reference(device, dtype, shape, weight):
    args = problem(shape, dtype, device, weight)
    expect = aten_double_backward(*args)
    got = ops.batch_norm_double_backward(*args)
    mirror = reference.batch_norm_double_backward(*args)
    for name, e, o, m in zip(("grad_x", "grad_weight", "grad_grad_out"), expect, got, mirror):
        torch.testing.assert_close(o, e, **tol(dtype), msg=lambda s: f"{name} (op): {s}")
        torch.testing.assert_close(m, e, **tol(dtype), msg=lambda s: f"{name} (reference): {s}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("missing", ["ggx", "ggw", "ggb", "all"])
def test_none_gradients_count_as_zero(device, missing):
    x, w, mean, invstd, gy, ggx, ggw, ggb = problem((6, 4, 3, 3), torch.float64, device)
    drop = {"ggx": (None, ggw, ggb), "ggw": (ggx, None, ggb), "ggb": (ggx, ggw, None),
            "all": (None, None, None)}[missing]
    expect = aten_double_backward(x, w, mean, invstd, gy, *drop)
    got = ops.batch_norm_double_backward(x, w, mean, invstd, gy, *drop)
    for e, o in zip(expect, got):
        torch.testing.assert_close(o, e, rtol=1e-12, atol=1e-12)


def test_noncontiguous_inputs_and_float64_agreement_to_rounding():
    x, w, mean, invstd, gy, ggx, ggw, ggb = problem((5, 3, 6, 4), torch.float64, "cpu", seed=3)
    xt, gyt = x.transpose(2, 3).contiguous().transpose(2, 3), gy.contiguous(memory_format=torch.channels_last)
    got = ops.batch_norm_double_backward(xt, w, mean, invstd, gyt, ggx[..., ::1], ggw, ggb)
    expect = aten_double_backward(x, w, mean, invstd, gy, ggx, ggw, ggb)
    for e, o in zip(expect, got):
        assert o.is_contiguous()
        torch.testing.assert_close(o, e, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for weight, shape in ((True, (4, 3, 5, 5)), (False, (9, 2))):
        args = problem(shape, torch.float64, device, weight)
        torch.library.opcheck(torch.ops.amaml_ext.batch_norm_double_backward.default, args)
        x, w, mean, invstd, gy = args[:5]
        torch.library.opcheck(torch.ops.amaml_ext.batch_norm_double_backward.default,
                              (x, w, mean, invstd, gy, None, None, None))


@pytest.mark.parametrize("bad, needle", [
    (lambda a: {**a, "x": a["x"][:, 0, 0, 0]}, "'x' must have shape [N, C, *]"),
    (lambda a: {**a, "x": a["x"].to(torch.int64)}, "'x' must be float32 or float64"),
    (lambda a: {**a, "grad_out": a["grad_out"][:2]}, "'grad_out' must have the shape of 'x'"),
    (lambda a: {**a, "grad_out": a["grad_out"].float()}, "'grad_out' must have the dtype"),
    (lambda a: {**a, "mean": a["mean"][:2]}, "'mean' must have shape [C] = [3]"),
    (lambda a: {**a, "invstd": a["invstd"].float()}, "'invstd' must have the dtype of 'x'"),
    (lambda a: {**a, "weight": torch.ones(4, dtype=torch.float64)}, "'weight' must have shape [C]"),
    (lambda a: {**a, "ggx": a["ggx"][:, :2]}, "'ggx' must have the shape of 'x'"),
    (lambda a: {**a, "ggw": a["ggw"].reshape(3, 1)}, "'ggw' must have shape [C]"),
    (lambda a: {**a, "ggb": a["ggb"].float()}, "'ggb' must have the dtype of 'x'"),
])
def test_bad_arguments_are_named(bad, needle):
    names = ("x", "weight", "mean", "invstd", "grad_out", "ggx", "ggw", "ggb")
    args = bad(dict(zip(names, problem((4, 3, 2, 2), torch.float64, "cpu"))))
    with pytest.raises(RuntimeError, match="amaml_ext.batch_norm_double_backward") as e:
        torch.ops.amaml_ext.batch_norm_double_backward(*(args[n] for n in names))
    assert needle in str(e.value)


# ---- the autograd Functions ---------------------------------------------------------------------

@pytest.mark.parametrize("weight", [True, False])
def test_gradcheck_of_the_functions(weight):
    x, w, _, _, gy = problem((4, 3, 3, 2), torch.float64, "cpu", weight)[:5]
    x, gy = x.requires_grad_(), gy.requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True) if weight else None
    w = w.requires_grad_() if weight else None
    assert torch.autograd.gradcheck(lambda *a: bn.batch_norm_train(*a), (x, w, b, EPS))
    assert torch.autograd.gradgradcheck(lambda *a: bn.batch_norm_train(*a), (x, w, b, EPS))
    # BatchNormBackward's first derivatives are the fused op: mean and invstd, the statistics of
    # x, are detached inputs there (the op carries their dependence on x).
    def first_backward(g, xx, ww):
        _, m, s = torch.native_batch_norm(xx.detach(), None, None, None, None, True, 0.0, EPS)
        return bn.BatchNormBackward.apply(g, xx, ww, m, s, EPS)
    assert torch.autograd.gradcheck(first_backward, (gy, x, w))


def test_forward_and_first_backward_are_aten():
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    w, b = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    y0 = F.batch_norm(x, None, None, w, b, training=True, eps=EPS)
    y1 = bn.batch_norm_train(x, w, b, EPS)
    assert torch.equal(y0, y1)
    gy = torch.randn_like(y0)
    assert torch.equal(*(torch.autograd.grad(y, x, gy)[0] for y in (y0, y1)))


def small_net(fused, dtype=torch.float64, affine=True):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4, affine=affine,
                        track_running_stats=False), nn.Tanh(), nn.Conv2d(4, 3, 3),
                        nn.BatchNorm2d(3, track_running_stats=False),
                        nn.Flatten(), nn.Linear(48, 3)).to(dtype)
    return bn.use_fused_batch_norm(net) if fused else net


def hvp_autograd(net, x, y, v):
    params = list(net.parameters())
    loss = F.cross_entropy(net(x), y)
    g = torch.autograd.grad(loss, params, create_graph=True)
    return torch.cat([h.reshape(-1) for h in torch.autograd.grad(g, params, v)])


@pytest.mark.parametrize("affine", [True, False])
def test_hvp_of_a_conv_bn_net_matches_f_batch_norm(affine):
    x, y = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    plain, fused = small_net(False, affine=affine), small_net(True, affine=affine)
    assert any(isinstance(m, bn.FusedBatchNorm) for m in fused.modules())
    v = [torch.randn_like(p) for p in plain.parameters()]
    h0, h1 = hvp_autograd(plain, x, y, v), hvp_autograd(fused, x, y, v)
    assert h0.abs().max() > 1e-3
    torch.testing.assert_close(h1, h0, rtol=1e-12, atol=1e-12)


def test_running_statistics_follow_nn_batch_norm():
    plain = nn.BatchNorm2d(3, momentum=None).double()
    fused = bn.use_fused_batch_norm(nn.Sequential(nn.BatchNorm2d(3, momentum=None).double()))[0]
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused.running_var, plain.running_var, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused.running_mean, plain.running_mean, rtol=1e-12, atol=1e-12)
    fused.eval(), plain.eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(fused(x), plain(x))


def _task_hvp_fn(net):
    """hvp(params, v, x, y) of one task, reverse over reverse with torch.func."""
    names = [n for n, _ in net.named_parameters()]

    def loss(p, x, y):
        return F.cross_entropy(torch.func.functional_call(net, dict(zip(names, p)), (x,)), y)

    def hvp(p, v, x, y):
        def gv(p):
            g = torch.func.grad(loss)(p, x, y)
            return sum((gi * vi).sum() for gi, vi in zip(g, v))
        return torch.func.grad(gv)(p)
    return hvp, names


@pytest.mark.parametrize("dtype", DTYPES)
def test_vmap_over_tasks(dtype):
    """B tasks' HVPs: torch.func.vmap of a reverse-over-reverse HVP, and autograd through a
    vmapped loss (as A-MAML's TaskFunctions), against F.batch_norm task by task."""
    B = 3
    plain, fused = small_net(False, dtype), small_net(True, dtype)
    xs = torch.randn(B, 5, 2, 6, 6, dtype=dtype)
    ys = torch.randint(0, 3, (B, 5))
    ps = [p.detach().unsqueeze(0).repeat(B, *([1] * p.dim())) + 0.1 * torch.randn(B, *p.shape, dtype=dtype)
          for p in plain.parameters()]
    vs = [torch.randn_like(p) for p in ps]
    hvp_p, names = _task_hvp_fn(plain)
    hvp_f, _ = _task_hvp_fn(fused)
    expect = [hvp_p([p[b] for p in ps], [v[b] for v in vs], xs[b], ys[b]) for b in range(B)]
    got = torch.func.vmap(hvp_f)(ps, vs, xs, ys)
    t = tol(dtype)
    for b in range(B):
        for e, o in zip(expect[b], got):
            torch.testing.assert_close(o[b], e, **t)

    def loss(p, x, y):
        return F.cross_entropy(torch.func.functional_call(fused, dict(zip(names, p)), (x,)), y)
    leaves = [p.clone().requires_grad_() for p in ps]
    total = torch.func.vmap(loss)(leaves, xs, ys).sum()
    g = torch.autograd.grad(total, leaves, create_graph=True)
    hv = torch.autograd.grad(g, leaves, vs)
    for b in range(B):
        for e, o in zip(expect[b], hv):
            torch.testing.assert_close(o[b], e, **t)


@pytest.mark.parametrize("in_dims", [(0, 0, 0, 0, 0, 0, 0, 0), (2, None, 1, 0, None, 3, 0, None),
                                     (None, 0, None, None, 1, None, None, 0)])
def test_the_batching_rule_matches_a_loop(in_dims):
    """vmap of the op itself, batch dims anywhere or absent (None: shared by the problems)."""
    B, shape = 3, (4, 3, 5, 2)
    probs = [problem(shape, torch.float64, "cpu", seed=s) for s in range(B)]
    if in_dims[0] is None:   # one x (and its statistics) for all problems
        probs = [(probs[0][0], p[1], probs[0][2], probs[0][3], *p[4:]) for p in probs]
    args = []
    for j, d in enumerate(in_dims):
        args.append(probs[0][j] if d is None else torch.stack([p[j] for p in probs], d))
    got = torch.func.vmap(torch.ops.amaml_ext.batch_norm_double_backward, in_dims=in_dims)(*args)
    for b in range(B):
        one = [a if d is None else a.select(d, b) for a, d in zip(args, in_dims)]
        for e, o in zip(torch.ops.amaml_ext.batch_norm_double_backward(*one), got):
            torch.testing.assert_close(o[b], e, rtol=1e-13, atol=1e-13)


def composite_batch_norm(x, w):
    var, mean = torch.var_mean(x, [0, 2, 3], correction=0, keepdim=True)
    return (x - mean) * torch.rsqrt(var + EPS) * w.reshape(1, -1, 1, 1)


def test_third_derivative_matches_a_composite_batch_norm():
    """A graph of the double backward (create_graph in the second backward) goes through the
    plain-torch mirror with the statistics of x: third derivatives equal those of batch norm
    written in torch ops (aten's F.batch_norm refuses third derivatives)."""
    x0 = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    w0 = torch.rand(3, dtype=torch.float64) + 0.5
    out = []
    for f in (composite_batch_norm, lambda x, w: bn.batch_norm_train(x, w, None, EPS)):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        g = torch.autograd.grad((f(x, w) ** 3).sum(), (x, w), create_graph=True)
        h = torch.autograd.grad(sum((t ** 2).sum() for t in g), (x, w), create_graph=True)
        out.append(torch.autograd.grad(sum((t * t.detach()).sum() for t in h), (x, w)))
    for e, o in zip(*out):
        assert e.abs().max() > 1e-3
        torch.testing.assert_close(o, e, rtol=1e-10, atol=1e-10)
