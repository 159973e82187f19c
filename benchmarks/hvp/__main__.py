"""Cost of one Hessian-vector product of the training loss, by implementation.

    python -m benchmarks.hvp                       # all models, markdown table
    python -m benchmarks.hvp --threads 1 --out hvp.json
    python -m benchmarks.hvp --models conv4 --channels 64 --no-compile

Variants, models and measurement: docs/benchmarks.md, Methods.
"""

import argparse
import sys
import time
from typing import Dict, List

import torch

from ..common.machine import machine_info
from ..common.results import write_json
from . import report
from .children import child_main, run_jobs
from .measure import bench_model
from .problem import MODELS
from .variants import COMPILE_BASES, CRASH_PRONE, NOTES


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hvp", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--channels", type=int, default=32, help="Conv4 channels (default 32)")
    ap.add_argument("--ways", type=int, default=20, help="Conv4 classes = support images (default 20)")
    ap.add_argument("--points", type=int, default=100, help="CosMixture support points per task (default 100)")
    ap.add_argument("--tasks", type=int, default=5, help="tasks in cosmix_b5 (default 5)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--min-repeats", type=int, default=20)
    ap.add_argument("--max-repeats", type=int, default=2000)
    ap.add_argument("--min-time", type=float, default=0.4, help="seconds of timed calls per variant, at least")
    ap.add_argument("--slow-call", type=float, default=0.25,
                    help="a variant whose second call takes longer (s) is timed only --slow-repeats times")
    ap.add_argument("--slow-repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--compile-timeout", type=float, default=60.0,
                    help="give up on a torch.compile variant whose first call (the compile) takes longer")
    ap.add_argument("--compile-variants", nargs="+", default=["double_backward", "fwd_over_rev"],
                    choices=sorted(COMPILE_BASES), help="HVP functions to torch.compile")
    ap.add_argument("--compile-cache", action="store_true",
                    help="let torch.compile use its on-disk caches (default: disabled, cold compile times)")
    ap.add_argument("--mse", default="explicit", choices=("explicit", "functional"),
                    help="CosMixture loss: ((pred - y) ** 2).mean() (default) or F.mse_loss, with which "
                         "forward-over-reverse fails in torch 2.14")
    ap.add_argument("--no-mse-check", action="store_true",
                    help="skip checking fwd_over_rev / linearize with F.mse_loss on cosmix (child process)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-4, help="max rel diff for a variant to count as agreeing")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--_child-jobs", dest="child_jobs", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def run_probes(args):
    """The crash-prone transforms on every model in child processes, then (last, since linearize
    segfaults there) the forward-mode variants with F.mse_loss itself. Returns (model ->
    variant -> probe result, variant -> F.mse_loss outcome)."""
    jobs = [[m, "probe_" + v, args.mse] for m in args.models for v in CRASH_PRONE]
    if args.mse == "explicit" and not args.no_mse_check and any(m.startswith("cosmix") for m in args.models):
        jobs += [["cosmix", "probe_fwd_over_rev", "functional"], ["cosmix", "probe_linearize_reuse_func", "functional"]]
    probes: Dict[str, Dict[str, Dict]] = {m: {} for m in args.models}
    compat = {}
    for (m, job, mse), res in zip(jobs, run_jobs(jobs, args, timeout_per_job=60)):
        if mse == args.mse:
            probes[m][job[len("probe_"):]] = res
        else:
            compat[job[len("probe_"):]] = res.get("skipped") or f"ok (max rel diff {res['max_rel_diff']:.1e})"
    return probes, compat


def compile_rows(args, by_model: Dict[str, List[Dict]]) -> None:
    """The torch.compile variants, compiled and timed in child processes; appended to ``by_model``."""
    jobs = [[m, "compile_" + v, args.mse] for m in args.models for v in args.compile_variants]
    for (m, v, _), res in zip(jobs, run_jobs(jobs, args, timeout_per_job=args.compile_timeout + 60)):
        d, batch = by_model[m][0]["d"], by_model[m][0]["batch"]
        row = {"model": m, "d": d, "batch": batch, "variant": v, "hvps_per_state": 1, "note": NOTES[v]}
        if "skipped" in res:
            res["skipped"] = res["skipped"].replace("failed:", "skipped: compile failed:", 1)
        row.update(res)
        if "compile_s" in row:
            row["note"] += f"; compile {row['compile_s']:.1f} s, timed in a child process"
        if row.pop("slow", False):
            row["note"] += f"; slow: {args.slow_repeats} repeats"
        by_model[m].append(row)
        print(report.row_line(row), file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    if args.child_jobs:
        child_main(args)
        return
    t0 = time.perf_counter()
    probes, compat = run_probes(args)
    print(f"  probes: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    by_model = {m: bench_model(m, args, args.device, probes[m]) for m in args.models}
    if not args.no_compile:
        t1 = time.perf_counter()
        compile_rows(args, by_model)
        print(f"  compile: {time.perf_counter() - t1:.1f} s", file=sys.stderr, flush=True)

    rows = [r for m in args.models for r in by_model[m]]
    report.add_x_grad(rows)
    env = machine_info(args.device)
    print(report.header(env, args))
    print(report.markdown(rows))
    print()
    print(report.summary(rows, args.tol))
    if compat:
        print("\ncosmix losses use mse_explicit, ((pred - y) ** 2).mean(); with F.mse_loss instead: "
              + "; ".join(f"{k}: {v}" for k, v in compat.items()) + " (pytorch/pytorch#123996)")
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    if args.out:
        write_json(args.out, {"environment": env, "args": {k: v for k, v in vars(args).items() if k != "child_jobs"},
                              "results": rows, "f_mse_loss_check": compat or None}, indent=2)


if __name__ == "__main__":
    main()
