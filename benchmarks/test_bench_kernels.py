"""Fused kernels vs the same math in plain PyTorch (``amaml_ext.reference``).

For every op, d in {1e3, ..., 1e7}, float32 and device (cpu, and cuda when available), two
benchmarks share a group ``<op> d=<d> <device>``: ``fused`` (the extension op writing into
preallocated outputs) and ``reference`` (the unfused torch expression, which allocates its
results, as an unfused solver would).

* ``stage_combine``: 6 stages, ``out = y + h sum_j c_j k_j`` (the DOPRI5 7th-stage point).
* ``dopri5_finish``: y1, err and the RMS error norm from y0 and 7 stages.
* ``dopri5_dense``: 4 dense-output rows (theta = 0.25, 0.5, 0.75, 1) written into rows 1..4 of
  a preallocated [5, d] trajectory.
* ``heun_update``: the corrector ``lam + h/2 (a + b)``.

``extra_info`` holds op, impl, d, device, dtype and ``bytes`` (each input read once and each
output written once, what a single-pass kernel must move), so a summary can derive GB/s.
"""

import pytest
import torch

from amaml_ext import ops, reference
from amaml_ext.reference import DOPRI5_B

from _bench_common import DEVICES, d_label, sync, timed

DTYPE = torch.float32
H, RTOL, ATOL = 0.01, 1e-6, 1e-8
THETAS = (0.25, 0.5, 0.75, 1.0)
COMBINE_COEFFS = DOPRI5_B  # 6 stages

SIZES = [pytest.param(10 ** e, id=d_label(10 ** e)) for e in range(3, 8)]
OPS = ["stage_combine", "dopri5_finish", "dopri5_dense", "heun_update"]
IMPLS = ["fused", "reference"]

# (rounds, iterations per round) by d: keeps the CPU run to a couple of minutes while small
# sizes still get enough calls per round to sit well above the timer's resolution.
SCHEDULE = {10 ** 3: (100, 20), 10 ** 4: (100, 5), 10 ** 5: (50, 1), 10 ** 6: (20, 1),
            10 ** 7: (5, 1)}

# Vectors each op reads and writes (per element of the state).
READS = {"stage_combine": 1 + len(COMBINE_COEFFS), "dopri5_finish": 1 + 7,
         "dopri5_dense": 2 + 7, "heun_update": 3}
WRITES = {"stage_combine": 1, "dopri5_finish": 2, "dopri5_dense": len(THETAS),
          "heun_update": 1}


def _inputs(op: str, d: int, device: str):
    g = torch.Generator(device="cpu").manual_seed(1234 + d)

    def rnd():
        return torch.randn(d, generator=g, dtype=DTYPE).to(device)

    if op == "stage_combine":
        return {"y": rnd(), "k": [rnd() for _ in COMBINE_COEFFS], "out": torch.empty(d, dtype=DTYPE, device=device)}
    if op == "dopri5_finish":
        y0 = rnd()
        return {"y0": y0, "k": [rnd() for _ in range(7)], "y1": torch.empty_like(y0),
                "err": torch.empty_like(y0), "norm": y0.new_empty(())}
    if op == "dopri5_dense":
        y0 = rnd()
        return {"y0": y0, "y1": rnd(), "k": [rnd() for _ in range(7)],
                "traj": torch.zeros(len(THETAS) + 1, d, dtype=DTYPE, device=device)}
    if op == "heun_update":
        return {"lam": rnd(), "a": rnd(), "b": rnd(), "out": torch.empty(d, dtype=DTYPE, device=device)}
    raise ValueError(op)


def _fused(op: str, x):
    if op == "stage_combine":
        return lambda: ops.stage_combine(x["y"], x["k"], COMBINE_COEFFS, H, out=x["out"])
    if op == "dopri5_finish":
        return lambda: ops.dopri5_finish(x["y0"], x["k"], H, RTOL, ATOL, y1=x["y1"], err=x["err"], err_norm=x["norm"])
    if op == "dopri5_dense":
        return lambda: ops.dopri5_dense(x["y0"], x["y1"], x["k"], H, THETAS, x["traj"], 1)
    if op == "heun_update":
        return lambda: ops.heun_update(x["lam"], x["a"], x["b"], H, out=x["out"])
    raise ValueError(op)


def _reference(op: str, x):
    if op == "stage_combine":
        return lambda: reference.stage_combine(x["y"], x["k"], COMBINE_COEFFS, H)
    if op == "dopri5_finish":
        return lambda: reference.dopri5_finish(x["y0"], x["k"], H, RTOL, ATOL)
    if op == "dopri5_dense":
        return lambda: reference.dopri5_dense(x["y0"], x["y1"], x["k"], H, THETAS)
    if op == "heun_update":
        return lambda: reference.heun_update(x["lam"], x["a"], x["b"], H)
    raise ValueError(op)


def _check_agree(op: str, x) -> None:
    """The fused op must match the reference before its time means anything."""
    ref = _reference(op, x)()
    _fused(op, x)()
    sync(x[next(iter(x))].device.type)
    if op == "stage_combine":
        got, want = [x["out"]], [ref]
    elif op == "dopri5_finish":
        got, want = [x["y1"], x["err"], x["norm"]], list(ref)
    elif op == "dopri5_dense":
        got, want = [x["traj"][1:]], [ref]
    else:
        got, want = [x["out"]], [ref]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device", DEVICES)
def test_kernel(benchmark, device, op, d, impl):
    x = _inputs(op, d, device)
    if impl == "fused":
        _check_agree(op, x)
        fn = _fused(op, x)
    else:
        fn = _reference(op, x)
    benchmark.group = f"{op} d={d_label(d)} {device}"
    benchmark.extra_info.update(
        kind="kernel", op=op, impl=impl, d=d, device=device, dtype=str(DTYPE).replace("torch.", ""),
        bytes=(READS[op] + WRITES[op]) * d * DTYPE.itemsize, reads=READS[op], writes=WRITES[op],
    )
    rounds, iterations = SCHEDULE[d]
    sync(device)
    benchmark.pedantic(timed(fn, device), rounds=rounds, iterations=iterations, warmup_rounds=1)
