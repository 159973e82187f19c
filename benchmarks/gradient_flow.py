"""What ``gradient_flow`` + ``.backward()`` costs against ``adjoint_meta_grad`` (the same solve),
and what each extra gradient adds (step sizes ``lr``, ``adjoint_params``, the horizon ``T``),
timed side by side and interleaved in one process.

    python -m benchmarks.gradient_flow --reps 15 --out docs/results/gradient_flow_cpu.json
    python -m benchmarks.gradient_flow --quick --reps 1

Settings and method: docs/benchmarks.md, Methods.
"""

import time

import torch
from torch.nn import functional as F

import amaml_ext
from amaml_ext import models, tasks
from amaml_ext.functional import TaskFunctions

from .common.machine import machine_info
from .common.problems import SMOOTH_CONV4, smooth_conv4_batch
from .common.options import cost_parser, parse
from .common.results import write_json
from .common.timing import rounds


def settings(quick: bool):
    pool = tasks.CosMixture(100, 100).pool(5, seed=0).all(dtype=torch.float32)
    out = [("CosMixture MLP, 5 tasks, T=2, h=0.01, dopri5+heun", models.mlp(width=32), pool,
            dict(T=2.0, h=0.01)),
           ("CosMixture MLP, 5 tasks, K=200 GD steps of 0.01, exact (euler+discrete)", models.mlp(width=32), pool,
            dict(T=2.0, h=0.01, solver="euler", adjoint="discrete"))]
    if not quick:
        conv, batch = smooth_conv4_batch()
        out.append((SMOOTH_CONV4, conv, batch, dict(T=0.05, h=0.002)))
    return out


def query_loss(net, loss, u, batch):
    """The summed query loss at ``u`` (``[B, d]``), as adjoint_meta_grad evaluates it (BatchNorm included)."""
    return TaskFunctions(net, loss, batch.support, batch.query, batched=True).losses(u, batch.query).sum()


def variants(net, batch, opts, loss):
    """name -> a call returning its stats: the same meta-gradient five ways."""
    kw = dict(opts)
    T = kw.pop("T")
    theta0 = amaml_ext.flatten_params(net)
    continuous = kw.get("adjoint", "heun") != "discrete"

    def amg():
        return amaml_ext.adjoint_meta_grad(net, loss, theta0, T, support=batch.support, query=batch.query,
                                           batched=True, **kw).stats

    def flow(lr=False, phi=False, learn_T=False):
        def run():
            theta = theta0.clone().requires_grad_()
            stats, inputs = {}, [theta]
            extra = {}
            if lr:
                extra["lr"] = torch.ones_like(theta, requires_grad=True)
                inputs.append(extra["lr"])
            fn = loss
            if phi:
                w = torch.ones((), requires_grad=True)
                fn = lambda p, y: w * loss(p, y)  # noqa: E731
                extra["adjoint_params"] = [w]
                inputs.append(w)
            horizon = torch.tensor(T, requires_grad=True) if learn_T else T
            if learn_T:
                inputs.append(horizon)
            u = amaml_ext.gradient_flow(net, fn, theta, horizon, batch.support, batched=True, stats=stats, **kw, **extra)
            torch.autograd.grad(query_loss(net, loss, u, batch), inputs)
            return stats
        return run

    out = {"adjoint_meta_grad": amg, "gradient_flow + backward": flow(), "+ lr [d]": flow(lr=True),
           "+ adjoint_params": flow(phi=True)}
    if continuous:
        out["+ T"] = flow(learn_T=True)
    return out


def main(argv=None):
    args = parse(cost_parser("python -m benchmarks.gradient_flow", __doc__), argv)
    rows = []
    for name, net, batch, opts in settings(args.quick):
        calls = variants(net, batch, opts, F.mse_loss if batch.support[1].is_floating_point() else F.cross_entropy)
        ms, stats = rounds(calls, args.reps)     # interleaved: drift in the machine's speed hits all alike
        base = ms["gradient_flow + backward"]
        row = {"setting": name, "ms": ms, "ratio_flow_vs_amg": base / ms["adjoint_meta_grad"],
               "ratio_vs_flow": {k: v / base for k, v in ms.items()},
               "hvps": {k: s.get("hvps") for k, s in stats.items()},
               "param_vjps": {k: s.get("param_vjps", 0) for k, s in stats.items()},
               "adjoint_steps": stats["gradient_flow + backward"].get("adjoint_steps"),
               "grid_steps": stats["adjoint_meta_grad"]["grid_steps"]}
        rows.append(row)
        print(f"{name}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()), flush=True)
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d"), "reps": args.reps, **machine_info("cpu")}
        write_json(args.out, {"meta": meta, "rows": rows})
    print("\n| setting | adjoint_meta_grad (ms) | gradient_flow + backward (ms) | ratio | + lr [d] | + adjoint_params "
          "| + T | HVPs | extra VJPs (adjoint_params) / grid steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        q = r["ratio_vs_flow"]
        t = f"x{q['+ T']:.3f}" if "+ T" in q else "n/a (exact)"
        print(f"| {r['setting']} | {r['ms']['adjoint_meta_grad']:.1f} | {r['ms']['gradient_flow + backward']:.1f} | "
              f"{r['ratio_flow_vs_amg']:.3f} | x{q['+ lr [d]']:.3f} | x{q['+ adjoint_params']:.3f} | {t} | "
              f"{r['hvps']['adjoint_meta_grad']} | {r['param_vjps']['+ adjoint_params']} / {r['grid_steps']} |")


if __name__ == "__main__":
    main()
