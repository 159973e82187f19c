"""The fused BatchNorm double backward (issue 25): one HVP of a Conv4 (training-mode BatchNorm)
with aten's BatchNorm beside the same net whose BatchNorm layers are
``amaml_ext.ops.batch_norm.FusedBatchNorm`` (double backward: the fused op), and the op alone
beside aten's double backward (autograd through ``native_batch_norm_backward``) on the Conv4's
four BatchNorm input shapes. CPU time (``time.process_time``), one thread, the methods called in
turn in each round (interleaved), medians over the rounds.

    OMP_NUM_THREADS=1 python -m benchmarks.bn_double_backward [--image-size 84] [--repeats 15]
        [--channels 32] [--samples 5] [--json bn_double_backward.json]

"HVP" times ``autograd.grad(g, params, v)`` on a kept graph of the gradient ``g`` (what A-MAML's
adjoint pays per HVP at a kept linearisation); "grad+HVP" also builds that graph (forward and
gradient with ``create_graph=True``).
"""

import argparse
import copy
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from amaml_ext import models, ops
from amaml_ext.ops import batch_norm as bn
from amaml_ext.ops import reference

from .common.machine import machine_info
from .common.results import write_json


def cpu_rounds(calls: Dict[str, Callable[[], object]], reps: int) -> Dict[str, float]:
    """One untimed call of each, then ``reps`` rounds calling each once in turn: the median CPU
    milliseconds (``time.process_time``) of each."""
    for fn in calls.values():
        fn()
    times: Dict[str, List[float]] = {k: [] for k in calls}
    for _ in range(reps):
        for k, fn in calls.items():
            t0 = time.process_time()
            fn()
            times[k].append(time.process_time() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def hvp_calls(args) -> Dict[str, Callable[[], object]]:
    torch.manual_seed(0)
    net = models.Conv4(ways=args.samples, in_channels=3, channels=args.channels, image_size=args.image_size)
    fused = bn.use_fused_batch_norm(copy.deepcopy(net))
    x = torch.randn(args.samples, 3, args.image_size, args.image_size)
    y = torch.arange(args.samples) % args.samples
    calls = {}
    v = [torch.randn_like(p) for p in net.parameters()]
    for name, m in (("aten", net), ("fused", fused)):
        params = list(m.parameters())

        def linearise(m=m, params=params):
            loss = F.cross_entropy(m(x), y)
            return torch.autograd.grad(loss, params, create_graph=True)

        def full(linearise=linearise, params=params, v=v):
            return torch.autograd.grad(linearise(), params, v)

        kept = linearise()

        def hvp(kept=kept, params=params, v=v):
            return torch.autograd.grad(kept, params, v, retain_graph=True)
        calls[f"HVP {name}"] = hvp
        calls[f"grad+HVP {name}"] = full
    h0 = torch.cat([t.reshape(-1) for t in calls["HVP aten"]()])
    h1 = torch.cat([t.reshape(-1) for t in calls["HVP fused"]()])
    print(f"HVP fused vs aten: relative difference {float((h1 - h0).norm() / h0.norm()):.2e} (float32)")
    return calls


def op_calls(shape, dtype=torch.float32) -> Dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(1)
    x, gy, ggx = (torch.randn(shape, generator=g, dtype=dtype) for _ in range(3))
    c = shape[1]
    w, ggw, ggb = torch.rand(c, generator=g, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    _, mean, invstd = torch.native_batch_norm(x, w, None, None, None, True, 0.0, 1e-5)
    xl, wl, gyl = x.clone().requires_grad_(), w.clone().requires_grad_(), gy.clone().requires_grad_()
    first = torch.ops.aten.native_batch_norm_backward(gyl, xl, wl, None, None, mean, invstd, True, 1e-5,
                                                      [True, True, True])
    return {
        "op": lambda: ops.batch_norm_double_backward(x, w, mean, invstd, gy, ggx, ggw, ggb),
        "aten": lambda: torch.autograd.grad(first, (xl, wl, gyl), (ggx, ggw, ggb), retain_graph=True),
        "reference": lambda: reference.batch_norm_double_backward(x, w, mean, invstd, gy, ggx, ggw, ggb),
    }


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bn_double_backward", description=__doc__.split("\n")[0])
    p.add_argument("--image-size", type=int, default=84)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    doc = {"machine": machine_info("cpu"), "args": vars(args), "hvp_ms": {}, "op_ms": {}}
    print(f"Conv4 {args.channels} channels, {args.samples} x 3 x {args.image_size}^2, float32, "
          f"1 thread, CPU ms (median of {args.repeats} interleaved rounds)")
    doc["hvp_ms"] = cpu_rounds(hvp_calls(args), args.repeats)
    for what in ("HVP", "grad+HVP"):
        a, f = doc["hvp_ms"][f"{what} aten"], doc["hvp_ms"][f"{what} fused"]
        print(f"  {what:<9} aten {a:8.2f}   fused {f:8.2f}   ({a / f:.2f}x)")
    print("BatchNorm double backward alone (float32): op | aten (autograd) | reference mirror")
    s, shapes = args.image_size, []
    for _ in range(4):
        shapes.append((args.samples, args.channels, s, s))
        s //= 2
    for shape in shapes:
        t = cpu_rounds(op_calls(shape), args.repeats)
        doc["op_ms"][str(list(shape))] = t
        print(f"  {str(list(shape)):<18} {t['op']:8.3f} | {t['aten']:8.3f} | {t['reference']:8.3f}"
              f"   ({t['aten'] / t['op']:.2f}x)")
    if args.json:
        write_json(args.json, doc)
    return doc


if __name__ == "__main__":
    main()
