"""The fused ops against their plain-PyTorch mirrors (amaml_ext.ops.reference), opcheck, argument
checking and outputs that overlap; the build's torch version."""

import pytest
import torch

import amaml_ext
from amaml_ext import ops
from amaml_ext.ops import reference

from helpers import DEVICES, F64

SHAPES = [(1000,), (3, 4099), (2, 70001)]  # [d] and [B, d]; odd sizes leave vector tails
DTYPES = [torch.float32, torch.float64]


def tol(dtype):
    return dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)


def rand(shape, dtype, device, noncontig=False):
    if noncontig:
        # A strided view: every other column of a wider tensor.
        big = torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device)
        x = big[..., ::2]
        assert not x.is_contiguous()
        return x
    return torch.randn(shape, dtype=dtype, device=device)


def stages(n, shape, dtype, device, noncontig=False):
    return [rand(shape, dtype, device, noncontig) for _ in range(n)]


def sample_inputs(op, shape, dtype, device, noncontig=False, count=7):
    """Random inputs of the fused op ``op`` in the order amaml_ext.ops and amaml_ext.ops.reference
    share, outputs left out: the one builder behind the comparisons with the reference and
    opcheck. ``count``: stage_combine's number of stages (the DOPRI5 ops take 7)."""
    y = rand(shape, dtype, device, noncontig)
    if op == "stage_combine":
        coeffs = torch.randn(count, dtype=torch.float64).tolist()
        return y, stages(count, shape, dtype, device, noncontig), coeffs, 0.37
    if op == "dopri5_finish":
        return y, stages(7, shape, dtype, device, noncontig), 0.013, 1e-3, 1e-4
    if op == "dopri5_dense":
        y1, ks = rand(shape, dtype, device, noncontig), stages(7, shape, dtype, device, noncontig)
        return y, y1, ks, 0.05, torch.rand(3, dtype=torch.float64).tolist() + [1.0]
    if op == "heun_update":
        a, b = stages(2, shape, dtype, device, noncontig)
        return y, a, b, 0.01
    raise ValueError(f"no sample inputs for op {op!r}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("noncontig", [False, True])
@pytest.mark.parametrize("count", [1, 4, 7])
def test_stage_combine_matches_reference(device, dtype, shape, noncontig, count):
    y, ks, coeffs, h = sample_inputs("stage_combine", shape, dtype, device, noncontig, count)
    out = torch.full(shape, float("nan"), dtype=dtype, device=device)
    if noncontig:
        out = torch.full((*shape[:-1], 2 * shape[-1]), float("nan"), dtype=dtype, device=device)[..., ::2]
    ops.stage_combine(y, ks, coeffs, h, out)
    torch.testing.assert_close(out, reference.stage_combine(y, ks, coeffs, h), **tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_stage_combine_in_place(device, dtype):
    y = torch.randn(5, 333, dtype=dtype, device=device)
    ks = stages(3, y.shape, dtype, device)
    expect = reference.stage_combine(y, ks, [0.5, -1.0, 2.0], 0.1)
    ops.stage_combine(y, ks, [0.5, -1.0, 2.0], 0.1, y)
    torch.testing.assert_close(y, expect, **tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("noncontig", [False, True])
def test_dopri5_finish_matches_reference(device, dtype, shape, noncontig):
    args = sample_inputs("dopri5_finish", shape, dtype, device, noncontig)
    y0 = args[0]
    y1, err, norm = ops.dopri5_finish(*args)
    ry1, rerr, rnorm = reference.dopri5_finish(*args)
    torch.testing.assert_close(y1, ry1, **tol(dtype))
    torch.testing.assert_close(err, rerr, **tol(dtype))
    torch.testing.assert_close(norm, rnorm, **tol(dtype))
    assert norm.shape == y0.shape[:-1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dopri5_finish_y1_is_bitwise_the_seventh_stage_point(device, dtype):
    # The driver forms the 7th stage point with stage_combine (b weights) and evaluates f
    # there (FSAL); finish must reproduce exactly that point.
    y0 = torch.randn(4, 10007, dtype=dtype, device=device)
    ks = stages(7, y0.shape, dtype, device)
    b_nonzero = [reference.DOPRI5_B[i] for i in (0, 2, 3, 4, 5)]  # k2 has weight 0
    point = ops.stage_combine(y0, [ks[i] for i in (0, 2, 3, 4, 5)], b_nonzero, 0.02)
    y1, _, _ = ops.dopri5_finish(y0, ks, 0.02, 1e-6, 1e-8)
    assert torch.equal(point, y1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("noncontig", [False, True])
def test_dopri5_dense_matches_reference(device, dtype, shape, noncontig):
    y0, y1, ks, h, thetas = sample_inputs("dopri5_dense", shape, dtype, device, noncontig)
    traj = torch.full((len(thetas) + 3, *shape), float("nan"), dtype=dtype, device=device)
    if noncontig:
        traj = traj.transpose(0, -1).contiguous().transpose(0, -1)  # same values, strided
        assert not traj.is_contiguous()
    ops.dopri5_dense(y0, y1, ks, h, thetas, traj, first_row=2)
    expect = reference.dopri5_dense(y0, y1, ks, h, thetas)
    torch.testing.assert_close(traj[2:2 + len(thetas)], expect, **tol(dtype))
    assert torch.equal(traj[2 + len(thetas) - 1], y1)  # theta = 1 is y1 exactly
    assert torch.isnan(traj[:2]).all() and torch.isnan(traj[-1]).all()  # other rows untouched


@pytest.mark.parametrize("device", DEVICES)
def test_dopri5_dense_many_rows(device):
    # More rows than one CUDA launch carries (32): exercises the chunking.
    y0, y1 = torch.randn(2, 513, device=device), torch.randn(2, 513, device=device)
    ks = stages(7, y0.shape, torch.float32, device)
    thetas = torch.linspace(0.01, 1.0, 70, dtype=torch.float64).tolist()
    traj = torch.empty(71, 2, 513, device=device)
    ops.dopri5_dense(y0, y1, ks, 0.5, thetas, traj, first_row=1)
    torch.testing.assert_close(traj[1:], reference.dopri5_dense(y0, y1, ks, 0.5, thetas), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("noncontig", [False, True])
@pytest.mark.parametrize("corrector", [False, True])
def test_heun_update_matches_reference(device, dtype, shape, noncontig, corrector):
    lam, a, b, h = sample_inputs("heun_update", shape, dtype, device, noncontig)
    b = b if corrector else None
    out = ops.heun_update(lam, a, b, h)
    torch.testing.assert_close(out, reference.heun_update(lam, a, b, h), **tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_heun_update_in_place(device):
    lam, a, b = (torch.randn(3, 1001, dtype=torch.float64, device=device) for _ in range(3))
    expect = reference.heun_update(lam, a, b, 0.3)
    ops.heun_update(lam, a, b, 0.3, lam)
    torch.testing.assert_close(lam, expect, rtol=1e-13, atol=1e-13)


# ---- opcheck: schema, fake implementations, autograd registration, aot dispatch ----------

def _opcheck_samples(device):
    """(op name, the raw op's arguments: sample inputs and outputs)."""
    shape, f64 = (3, 257), torch.float64
    y, ks, coeffs, h = sample_inputs("stage_combine", shape, f64, device, count=3)
    yield "stage_combine", (y, ks, coeffs, h, torch.empty_like(y))
    y0, ks, h, rtol, atol = sample_inputs("dopri5_finish", shape, f64, device)
    yield "dopri5_finish", (y0, ks, h, rtol, atol, torch.empty_like(y0), torch.empty_like(y0), y0.new_empty(3))
    y0, y1, ks, h, thetas = sample_inputs("dopri5_dense", shape, f64, device)
    yield "dopri5_dense", (y0, y1, ks, h, thetas, 1, torch.empty(len(thetas) + 2, *shape, dtype=f64, device=device))
    lam, a, b, h = sample_inputs("heun_update", shape, f64, device)
    yield "heun_update", (lam, a, b, h, torch.empty_like(lam))
    lam, a, _, h = sample_inputs("heun_update", shape[-1:], f64, device)
    yield "heun_update", (lam, a, None, h, torch.empty_like(lam))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for name, args in _opcheck_samples(device):
        torch.library.opcheck(getattr(torch.ops.amaml_ext, name).default, args)


def test_ops_work_under_torch_compile():
    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(y, k1, k2, out):
        torch.ops.amaml_ext.stage_combine(y, [k1, k2], [0.5, 0.5], 0.2, out)
        return out * 2

    y, k1, k2 = (torch.randn(4, 100) for _ in range(3))
    got = step(y, k1, k2, torch.empty_like(y))
    torch.testing.assert_close(got, 2 * reference.stage_combine(y, [k1, k2], [0.5, 0.5], 0.2))


# ---- argument checking -----------------------------------------------------------------

def test_wrong_dtype_is_named():
    y = torch.zeros(10, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"argument 'y' must be float32 or float64, got Int"):
        torch.ops.amaml_ext.stage_combine(y, [y], [1.0], 0.1, y)


def test_mixed_dtype_is_named():
    y = torch.zeros(10)
    k = torch.zeros(10, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"'stages\[0\]' must have the dtype of 'y'"):
        ops.stage_combine(y, [k], [1.0], 0.1)


def test_wrong_shape_is_named():
    y = torch.zeros(2, 10)
    with pytest.raises(RuntimeError, match=r"'stages\[1\]' must have the shape of 'y' \[2, 10\], got \[2, 9\]"):
        ops.stage_combine(y, [torch.zeros(2, 10), torch.zeros(2, 9)], [1.0, 1.0], 0.1)
    with pytest.raises(RuntimeError, match=r"argument 'y' must have shape \[d\] or \[B, d\], got \[2, 2, 2\]"):
        ops.stage_combine(torch.zeros(2, 2, 2), [torch.zeros(2, 2, 2)], [1.0], 0.1)


def test_stage_and_coeff_counts_are_checked():
    y = torch.zeros(8)
    with pytest.raises(RuntimeError, match=r"'coeffs' must have one entry per stage \(2\), got 1"):
        ops.stage_combine(y, [y, y], [1.0], 0.1)
    with pytest.raises(RuntimeError, match=r"'stages' must hold between 7 and 7 tensors, got 6"):
        ops.dopri5_finish(y, [y] * 6, 0.1, 1e-6, 1e-8)
    with pytest.raises(RuntimeError, match=r"'stages' must hold between 1 and 7 tensors, got 8"):
        ops.stage_combine(y, [y] * 8, [1.0] * 8, 0.1)


def test_bad_scalars_are_named():
    y = torch.zeros(8)
    with pytest.raises(RuntimeError, match=r"'h' must be finite, got nan"):
        ops.stage_combine(y, [y], [1.0], float("nan"))
    with pytest.raises(RuntimeError, match=r"'rtol' and 'atol' must be finite"):
        ops.dopri5_finish(y, [y] * 7, 0.1, 0.0, 0.0)
    with pytest.raises(RuntimeError, match=r"every entry of 'thetas' must lie in \[0, 1\], got 1.5"):
        ops.dopri5_dense(y, y, [y] * 7, 0.1, [1.5], torch.zeros(2, 8), 0)
    with pytest.raises(RuntimeError, match=r"rows \[1, 3\) do not fit in 'trajectory' with 2 rows"):
        ops.dopri5_dense(y, y, [y] * 7, 0.1, [0.5, 1.0], torch.zeros(2, 8), 1)
    with pytest.raises(RuntimeError, match=r"'err_norm' must have shape \[B\] = \[2\], got \[3\]"):
        z = torch.zeros(2, 4)
        ops.dopri5_finish(z, [z] * 7, 0.1, 1e-6, 1e-8, err_norm=torch.zeros(3))


@pytest.mark.cuda
def test_device_mismatch_is_named():
    y = torch.zeros(8, device="cuda")
    with pytest.raises(RuntimeError, match=r"'stages\[0\]' must be on the same device as 'y'"):
        ops.stage_combine(y, [torch.zeros(8)], [1.0], 0.1)


# ---- CPU and CUDA kernels agree ------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("noncontig", [False, True])
def test_cpu_and_cuda_kernels_agree(dtype, shape, noncontig):
    y0 = rand(shape, dtype, "cpu", noncontig)
    ks = stages(7, shape, dtype, "cpu", noncontig)
    on = lambda t: t.cuda()  # noqa: E731
    t = tol(dtype)
    torch.testing.assert_close(ops.stage_combine(on(y0), [on(k) for k in ks], [0.3] * 7, 0.1).cpu(),
                               ops.stage_combine(y0, ks, [0.3] * 7, 0.1), **t)
    for a, b in zip(ops.dopri5_finish(on(y0), [on(k) for k in ks], 0.1, 1e-4, 1e-5),
                    ops.dopri5_finish(y0, ks, 0.1, 1e-4, 1e-5)):
        torch.testing.assert_close(a.cpu(), b, **t)
    y1 = rand(shape, dtype, "cpu", noncontig)
    tr_c = torch.empty(3, *shape, dtype=dtype, device="cuda")
    tr = torch.empty(3, *shape, dtype=dtype)
    ops.dopri5_dense(on(y0), on(y1), [on(k) for k in ks], 0.1, [0.2, 0.7, 1.0], tr_c, 0)
    ops.dopri5_dense(y0, y1, ks, 0.1, [0.2, 0.7, 1.0], tr, 0)
    torch.testing.assert_close(tr_c.cpu(), tr, **t)
    torch.testing.assert_close(ops.heun_update(on(y0), on(ks[0]), on(ks[1]), 0.1).cpu(),
                               ops.heun_update(y0, ks[0], ks[1], 0.1), **t)


@pytest.mark.cuda
def test_cuda_misaligned_views_take_the_scalar_path():
    base = torch.randn(10001, device="cuda")
    y = base[1:]  # 4-byte offset: not 16-byte aligned
    ks = [torch.randn(10001, device="cuda")[1:] for _ in range(7)]
    torch.testing.assert_close(ops.stage_combine(y, ks, [0.1] * 7, 0.3),
                               reference.stage_combine(y, ks, [0.1] * 7, 0.3), rtol=2e-5, atol=2e-5)


def test_build_info_reports_the_build():
    info = amaml_ext.build_info()
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_archs"] and all(a[0].isdigit() for a in info["cuda_archs"])
    else:
        assert info["cuda_archs"] == []


def test_import_warns_when_built_against_another_torch(monkeypatch):
    monkeypatch.setattr(amaml_ext, "build_info", lambda: {"torch_version": "2.9.0"})
    with pytest.warns(RuntimeWarning, match="built against torch 2.9.0"):
        amaml_ext._check_build_torch()


# -- fused ops with overlapping outputs (issue 23, item 7) ----------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_fused_ops_refuse_partial_overlap(device, dtype):
    buf = torch.arange(10, dtype=dtype, device=device)
    k = torch.ones(9, dtype=dtype, device=device)
    with pytest.raises(RuntimeError, match="argument 'out' partially overlaps argument 'y'"):
        ops.stage_combine(buf[:-1], [k], [1.0], 0.5, out=buf[1:])
    with pytest.raises(RuntimeError, match=r"argument 'out' partially overlaps argument 'stages\[0\]'"):
        ops.stage_combine(k, [buf[:-1]], [1.0], 0.5, out=buf[1:])
    with pytest.raises(RuntimeError, match="argument 'out' partially overlaps argument 'a'"):
        ops.heun_update(k, buf[1:], None, 0.5, out=buf[:-1])
    with pytest.raises(RuntimeError, match="elements that share memory"):
        ops.heun_update(k, k, None, 0.5, out=torch.zeros(1, dtype=dtype, device=device).expand(9))
    assert torch.equal(buf, torch.arange(10, dtype=dtype, device=device))   # nothing was written


@pytest.mark.parametrize("device", DEVICES)
def test_fused_ops_in_place_is_allowed_and_right(device):
    y = torch.arange(6, dtype=F64, device=device)
    k = torch.full((6,), 2.0, dtype=F64, device=device)
    expect = y + 0.5 * k
    ops.stage_combine(y, [k], [1.0], 0.5, out=y)
    assert torch.equal(y, expect)
    lam = torch.ones(2, 3, dtype=F64, device=device)
    a = torch.full((2, 3), 3.0, dtype=F64, device=device)
    ops.heun_update(lam, a, a, 0.5, out=lam)
    assert torch.equal(lam, torch.full((2, 3), 2.5, dtype=F64, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_dopri5_outputs_must_not_share_memory(device):
    d = 4
    y0 = torch.randn(d, dtype=F64, device=device)
    stages = [torch.randn(d, dtype=F64, device=device) for _ in range(7)]
    buf = torch.zeros(2 * d, dtype=F64, device=device)
    with pytest.raises(RuntimeError, match="argument 'y1' is the same memory as argument 'err'"):
        ops.dopri5_finish(y0, stages, 0.1, 1e-6, 1e-8, y1=buf[:d], err=buf[:d])
    with pytest.raises(RuntimeError, match="argument 'y1' partially overlaps argument 'err'"):
        ops.dopri5_finish(y0, stages, 0.1, 1e-6, 1e-8, y1=buf[:d], err=buf[1:d + 1])
    traj = torch.zeros(3, d, dtype=F64, device=device)
    with pytest.raises(RuntimeError, match="argument 'trajectory' partially overlaps argument 'y1'"):
        ops.dopri5_dense(y0, traj[2], stages, 0.1, [0.5, 1.0], traj, 1)
    # separate buffers: the reference implementation's values
    y1, err, _ = ops.dopri5_finish(y0, stages, 0.1, 1e-6, 1e-8)
    ref_y1, ref_err, _ = reference.dopri5_finish(y0, stages, 0.1, 1e-6, 1e-8)
    assert torch.allclose(y1, ref_y1, rtol=0, atol=1e-14) and torch.allclose(err, ref_err, rtol=0, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES)
def test_outputs_sharing_memory_through_strided_views_are_refused(device):
    y0 = torch.randn(3, 6, dtype=F64, device=device)
    stages = [torch.randn(3, 6, dtype=F64, device=device) for _ in range(7)]
    y1 = torch.empty(3, 6, dtype=F64, device=device)
    with pytest.raises(RuntimeError, match="argument 'y1' may share memory with argument 'err_norm'"):
        ops.dopri5_finish(y0, stages, 0.1, 1e-6, 1e-8, y1=y1, err=torch.empty_like(y1), err_norm=y1[:, 0])
    buf = torch.empty(18, dtype=F64, device=device)
    with pytest.raises(RuntimeError, match="argument 'y1' may share memory with argument 'err'"):
        ops.dopri5_finish(y0[0], [k[0] for k in stages], 0.1, 1e-6, 1e-8, y1=buf[:6], err=buf[::3])
