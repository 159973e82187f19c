"""Cost of the continuous adjoint's error estimate (``error_estimate=True``, the default, against
``False`` and ``"richardson"``) and of ``refine=True``, timed side by side in one process.

    python -m benchmarks.error_estimate --reps 15 --out docs/results/error_estimate_cpu.json
    python -m benchmarks.error_estimate --quick --reps 1      # the MLP settings only

Settings and method: docs/benchmarks.md, Methods.
"""

import statistics
import time

import torch
from torch.nn import functional as F

import amaml_ext
from amaml_ext import models, tasks

from .common.machine import machine_info
from .common.problems import SMOOTH_CONV4, smooth_conv4_batch
from .common.options import cost_parser, parse
from .common.results import write_json
from .common.timing import rounds


def settings(quick: bool):
    out = []
    net = models.mlp(width=32)
    pool = tasks.CosMixture(100, 100).pool(5, seed=0).all(dtype=torch.float32)
    for T in (2.0, 0.5):
        out.append((f"CosMixture MLP, 5 tasks, T={T:g}, h=0.01, dopri5+heun", net, F.mse_loss, pool,
                    dict(T=T, h=0.01)))
    out.append(("CosMixture MLP, 5 tasks, T=2, h=0.01, dopri5+rk4", net, F.mse_loss, pool,
                dict(T=2.0, h=0.01, adjoint="rk4")))
    out.append(("CosMixture MLP, 5 tasks, T=2, h=0.01, dopri5+heun, compile=True", net, F.mse_loss, pool,
                dict(T=2.0, h=0.01, compile=True)))
    if not quick:
        conv, batch = smooth_conv4_batch()
        out.append((SMOOTH_CONV4, conv, F.cross_entropy, batch, dict(T=0.05, h=0.002)))
    return out


def call(net, loss, batch, opts, estimate):
    theta = amaml_ext.flatten_params(net)
    kw = dict(opts)
    T = kw.pop("T")
    t0 = time.perf_counter()
    r = amaml_ext.adjoint_meta_grad(net, loss, theta, T, support=batch.support, query=batch.query, batched=True,
                                    error_estimate=estimate, error_tol=1e9, **kw)
    return time.perf_counter() - t0, r


def refine_cost(reps: int):
    """refine=True on a stiff smooth problem (the CosMixture MLP with its training loss x 10, so
    that h = 0.05 is past Heun's bound) against one solve at the step refine ends with."""
    net = models.mlp(width=32)
    pool = tasks.CosMixture(100, 100).pool(5, seed=0).all(dtype=torch.float32)
    loss = lambda p, y: 10.0 * F.mse_loss(p, y)  # noqa: E731
    theta = amaml_ext.flatten_params(net)
    kw = dict(support=pool.support, query=pool.query, batched=True)
    r = amaml_ext.adjoint_meta_grad(net, loss, theta, 1.0, h=0.05, refine=True, **kw)
    h_end = r.stats["h"]
    t_ref, t_one = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        amaml_ext.adjoint_meta_grad(net, loss, theta, 1.0, h=0.05, refine=True, **kw)
        t_ref.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        amaml_ext.adjoint_meta_grad(net, loss, theta, 1.0, h=h_end, **kw)
        t_one.append(time.perf_counter() - t0)
    out = {"h_start": 0.05, "h_end": h_end, "estimate_end": r.stats["adjoint_error_estimate"],
           "ms_refine": 1e3 * statistics.median(t_ref), "ms_single_at_h_end": 1e3 * statistics.median(t_one)}
    out["ratio"] = out["ms_refine"] / out["ms_single_at_h_end"]
    print(f"refine=True from h=0.05 (stiff MLP, loss x 10, T=1): ends at h={h_end:.4g} with estimate "
          f"{out['estimate_end']:.2e}; {out['ms_refine']:.1f} ms vs {out['ms_single_at_h_end']:.1f} ms for one solve "
          f"at that h (x{out['ratio']:.2f})", flush=True)
    return out


def main(argv=None):
    args = parse(cost_parser("python -m benchmarks.error_estimate", __doc__), argv)
    rows = []
    kinds = {"off": False, "on": True, "richardson": "richardson"}
    for name, net, loss, batch, opts in settings(args.quick):
        calls = {k: (lambda est=est: call(net, loss, batch, opts, est)[1].stats) for k, est in kinds.items()}
        ms, stats = rounds(calls, args.reps)
        stats_on, stats_off = stats["on"], stats["off"]
        row = {"setting": name, "ms_off": ms["off"], "ms_on": ms["on"], "ratio": ms["on"] / ms["off"],
               "ms_richardson": ms["richardson"], "ratio_richardson": ms["richardson"] / ms["off"],
               "hvps_richardson": stats["richardson"]["hvps"],
               "estimate": stats_on["adjoint_error_estimate"], "richardson": stats_on["richardson_estimate"],
               "drift": stats_on["invariant_drift"], "hvps_off": stats_off["hvps"], "hvps_on": stats_on["hvps"],
               "linearisations_off": stats_off["linearisations"], "linearisations_on": stats_on["linearisations"]}
        rows.append(row)
        print(f"{name}: {row['ms_off']:.1f} ms -> {row['ms_on']:.1f} ms with the estimate (x{row['ratio']:.3f}); "
              f"estimate {row['estimate']:.2e}; HVPs {row['hvps_off']} -> {row['hvps_on']}, linearisations "
              f"{row['linearisations_off']} -> {row['linearisations_on']}", flush=True)
    refine = refine_cost(args.reps)
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d"), "reps": args.reps, **machine_info("cpu")}
        write_json(args.out, {"meta": meta, "rows": rows, "refine": refine})
    print("\n| setting | no estimate (ms) | drift, the default (ms) | ratio | + step doubling (ms) | ratio | "
          "estimate | HVPs off / drift / + doubling |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['ms_off']:.1f} | {r['ms_on']:.1f} | {r['ratio']:.3f} | {r['ms_richardson']:.1f} | "
              f"{r['ratio_richardson']:.3f} | {r['estimate']:.2e} | {r['hvps_off']} / {r['hvps_on']} / "
              f"{r['hvps_richardson']} |")


if __name__ == "__main__":
    main()
