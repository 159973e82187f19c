"""Fused kernels vs the same math in plain PyTorch (``amaml_ext.ops.reference``).

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

from .common.kernel_cases import OPS, READS, WRITES, check_agree, fused_call, make_inputs, reference_call
from .common.params import DEVICES
from .common.results import d_label
from .common.timing import sync, timed

DTYPE = torch.float32
SIZES = [pytest.param(10 ** e, id=d_label(10 ** e)) for e in range(3, 8)]
IMPLS = ["fused", "reference"]

# (rounds, iterations per round) by d: keeps the CPU run to a couple of minutes while small
# sizes still get enough calls per round to sit well above the timer's resolution.
SCHEDULE = {10 ** 3: (100, 20), 10 ** 4: (100, 5), 10 ** 5: (50, 1), 10 ** 6: (20, 1),
            10 ** 7: (5, 1)}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device", DEVICES)
def test_kernel(benchmark, device, op, d, impl):
    x = make_inputs(op, d, DTYPE, device, torch.Generator().manual_seed(1234 + d))
    if impl == "fused":
        check_agree(op, x)
        fn = fused_call(op, x)
    else:
        fn = reference_call(op, x)
    benchmark.group = f"{op} d={d_label(d)} {device}"
    benchmark.extra_info.update(
        kind="kernel", op=op, impl=impl, d=d, device=device, dtype=str(DTYPE).replace("torch.", ""),
        bytes=(READS[op] + WRITES[op]) * d * DTYPE.itemsize, reads=READS[op], writes=WRITES[op],
    )
    rounds, iterations = SCHEDULE[d]
    sync(device)
    benchmark.pedantic(timed(fn, device), rounds=rounds, iterations=iterations, warmup_rounds=1)
