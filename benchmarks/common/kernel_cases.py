"""The fused-op benchmark cases, shared by test_bench_kernels.py (pytest-benchmark) and
gpu_bandwidth.py (CUDA-graph bandwidth script): inputs, the fused call, the plain-torch
reference call, the agreement check, and the bytes a single pass must move.

* ``stage_combine``: 6 stages, ``out = y + h sum_j c_j k_j`` (the DOPRI5 7th-stage point).
* ``dopri5_finish``: y1, err and the RMS error norm from y0 and 7 stages.
* ``dopri5_dense``: 4 dense-output rows written into rows 1..4 of a preallocated [5, d] trajectory.
* ``heun_update``: the corrector ``lam + h/2 (a + b)``.
"""

from typing import Callable, Dict

import torch

from amaml_ext import ops
from amaml_ext.ops import reference
from amaml_ext.ops.reference import DOPRI5_B

OPS = ("stage_combine", "dopri5_finish", "dopri5_dense", "heun_update")
H, RTOL, ATOL = 0.01, 1e-6, 1e-8
THETAS = (0.25, 0.5, 0.75, 1.0)
COMBINE_COEFFS = DOPRI5_B  # 6 stages

# Vectors of d elements each op reads and writes once. k2 has weight 0 in DOPRI5's solution,
# error and dense output, and the kernels do not load it: finish reads y0 + 6 stages, dense
# reads y0, y1 + 6 stages.
READS = {"stage_combine": 1 + len(COMBINE_COEFFS), "dopri5_finish": 1 + 6, "dopri5_dense": 2 + 6,
         "heun_update": 3}
WRITES = {"stage_combine": 1, "dopri5_finish": 2, "dopri5_dense": len(THETAS), "heun_update": 1}
# Allocated per input set beyond the reads and writes (the dense trajectory's untouched row 0).
EXTRA = {"stage_combine": 0, "dopri5_finish": 0, "dopri5_dense": 1, "heun_update": 0}


def make_inputs(op: str, d: int, dtype: torch.dtype, device, gen: torch.Generator) -> Dict:
    """Fresh random inputs (drawn on the CPU from ``gen``) and preallocated outputs."""
    def rnd():
        return torch.randn(d, generator=gen, dtype=dtype).to(device)

    def empty():
        return torch.empty(d, dtype=dtype, device=device)

    if op == "stage_combine":
        return {"y": rnd(), "k": [rnd() for _ in COMBINE_COEFFS], "out": empty()}
    if op == "dopri5_finish":
        y0 = rnd()
        return {"y0": y0, "k": [rnd() for _ in range(7)], "y1": empty(), "err": empty(),
                "norm": y0.new_empty(())}
    if op == "dopri5_dense":
        return {"y0": rnd(), "y1": rnd(), "k": [rnd() for _ in range(7)],
                "traj": torch.zeros(len(THETAS) + 1, d, dtype=dtype, device=device)}
    if op == "heun_update":
        return {"lam": rnd(), "a": rnd(), "b": rnd(), "out": empty()}
    raise ValueError(op)


def fused_call(op: str, x: Dict) -> Callable[[], object]:
    """The extension op writing into the preallocated outputs of ``x``."""
    if op == "stage_combine":
        return lambda: ops.stage_combine(x["y"], x["k"], COMBINE_COEFFS, H, out=x["out"])
    if op == "dopri5_finish":
        return lambda: ops.dopri5_finish(x["y0"], x["k"], H, RTOL, ATOL, y1=x["y1"], err=x["err"],
                                         err_norm=x["norm"])
    if op == "dopri5_dense":
        return lambda: ops.dopri5_dense(x["y0"], x["y1"], x["k"], H, THETAS, x["traj"], 1)
    if op == "heun_update":
        return lambda: ops.heun_update(x["lam"], x["a"], x["b"], H, out=x["out"])
    raise ValueError(op)


def reference_call(op: str, x: Dict) -> Callable[[], object]:
    """The same math in plain torch ops (allocating its results, as an unfused solver would)."""
    if op == "stage_combine":
        return lambda: reference.stage_combine(x["y"], x["k"], COMBINE_COEFFS, H)
    if op == "dopri5_finish":
        return lambda: reference.dopri5_finish(x["y0"], x["k"], H, RTOL, ATOL)
    if op == "dopri5_dense":
        return lambda: reference.dopri5_dense(x["y0"], x["y1"], x["k"], H, THETAS)
    if op == "heun_update":
        return lambda: reference.heun_update(x["lam"], x["a"], x["b"], H)
    raise ValueError(op)


def check_agree(op: str, x: Dict) -> None:
    """The fused op must match the reference before its time means anything."""
    want = reference_call(op, x)()
    fused_call(op, x)()
    if op == "dopri5_finish":
        got, want = [x["y1"], x["err"], x["norm"]], list(want)
    elif op == "dopri5_dense":
        got, want = [x["traj"][1:]], [want]
    else:
        got, want = [x["out"]], [want]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
