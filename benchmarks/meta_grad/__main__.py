"""Time and peak memory of ONE meta-gradient against the number of inner steps K.

    python -m benchmarks.meta_grad --model cosmixture --out meta_grad_cosmixture.json
    python -m benchmarks.meta_grad --model conv4 --channels 8 --ks 10,50 --repeats 1
    python -m benchmarks.meta_grad --methods ours_store,maml_unrolled --ks 10,100 --timeout 60

Methods, measurements and caveats: docs/benchmarks.md, Methods.
"""

import argparse
import json
import sys
import time
from typing import Dict, List, Optional

import torch

from ..common.machine import machine_info
from ..common.memory import mem_available_bytes
from ..common.results import write_json
from . import report
from .check import check_table, correctness_check
from .methods import ALL_METHODS, METHODS, not_applicable
from .point import run_point, run_single
from .problem import DTYPES, MODELS, build_problem

DEFAULT_KS = [10, 50, 200, 500, 1000, 2000]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.meta_grad", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=MODELS, default="cosmixture")
    ap.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)), help="inner steps K, comma-separated")
    ap.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma-separated; default {ALL_METHODS}; also "
                         f"{[m for m in METHODS if m not in ALL_METHODS]} (benchmarks.peers)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--h", type=float, default=0.01, help="inner step / grid spacing; T = K h")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (median)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per point after set-up")
    ap.add_argument("--setup-timeout", type=float, default=180.0, help="seconds for a child's imports and set-up")
    ap.add_argument("--mem-limit", type=float, default=None,
                    help="GiB of resident memory per point (CPU; default: half of MemAvailable)")
    ap.add_argument("--no-predict", action="store_true",
                    help="do not skip a K whose time, extrapolated linearly from the previous K, exceeds --timeout")
    ap.add_argument("--channels", type=int, default=64, help="Conv4 width")
    ap.add_argument("--query-shots", type=int, default=1, help="Conv4 query images per class (1 or 5)")
    ap.add_argument("--rtol", type=float, default=1e-6, help="dopri5 rtol (ours_store, odeint_adjoint)")
    ap.add_argument("--atol", type=float, default=1e-8, help="dopri5 atol (ours_store, odeint_adjoint)")
    ap.add_argument("--jacobian-vectorize", action="store_true",
                    help="authors_rk4: torch.autograd.functional.jacobian(vectorize=True) (default: False, as written)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", type=int, default=1,
                    help="tasks per meta-gradient (a meta-batch): ours and maml_unrolled batch them "
                         "(vmap), authors_* loop over them one task at a time, odeint_adjoint solves "
                         "the [B, d] state")
    ap.add_argument("--check-k", type=int, default=10)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--out", default=None, help="JSON output path")
    ap.add_argument("--single", nargs=2, metavar=("METHOD", "K"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.ks = sorted({int(k) for k in args.ks.split(",") if k.strip()})
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {list(METHODS)}")
    if args.mem_limit is None:
        avail = mem_available_bytes()
        args.mem_limit = (avail / 2 / 2**30) if avail else 8.0
    return args


def _skip(m: str, K: int, why: Optional[str], stop: Optional[str], last: Optional[Dict], args) -> Optional[Dict]:
    """The row of a point not run (n/a, skipped after a failure, or predicted past the time-out)."""
    if why:
        return {"method": m, "K": K, "status": "n/a", "error": why}
    if stop:
        return {"method": m, "K": K, "status": "skipped", "error": stop}
    if last is not None and not args.no_predict and last["time_s"] * K / last["K"] > args.timeout:
        return {"method": m, "K": K, "status": "skipped",
                "error": f"skipped: predicted {last['time_s'] * K / last['K']:.0f} s > time-out"}
    return None


def sweep_method(m: str, p, check: Optional[Dict], args) -> List[Dict]:
    """Every K of one method, smallest first; after a failure (or a failed check at a K no
    larger than the smallest) the larger K are skipped."""
    why, stop, last, points = not_applicable(m, p), None, None, []
    failed = (check or {}).get("methods", {}).get(m, {}).get("status", "ok")
    if failed.startswith(("timeout", "error")) and args.check_k <= min(args.ks):
        stop = f"skipped: {failed.split(':')[0]} in the correctness check at K={args.check_k}"
    for K in args.ks:
        r = _skip(m, K, why, stop, last, args)
        if r is None:
            t0 = time.perf_counter()
            r = run_point(args, m, K)
            r["wall_s"] = time.perf_counter() - t0
        print(report.progress_line(r), file=sys.stderr, flush=True)
        points.append(r)
        if r["status"] == "ok":
            last = r
        elif r["status"] == "n/a":
            why = r.get("error", "n/a")
        elif r["status"] in ("timeout", "error", "oom") and stop is None:
            stop = f"skipped: {r['status']} at K={K}"
        elif r["status"] == "skipped" and stop is None:
            stop = r["error"]
    return points


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.single:
        print("RESULT " + json.dumps(run_single(args)), flush=True)
        return 0

    p = build_problem(args)
    print(report.header(p, args), flush=True)
    check = None
    if not args.no_check:
        check = correctness_check(args, args.methods)
        print("\n" + check_table(check) + "\n", flush=True)
        oe = check["methods"].get("ours_exact", {})
        if "rel_vs_maml_unrolled" in oe:
            print(f"ours_exact vs maml_unrolled at K = {check['K']} ({args.dtype}): "
                  f"relative error {oe['rel_vs_maml_unrolled']:.2e}\n", flush=True)
    points = [r for m in args.methods for r in sweep_method(m, p, check, args)]
    print(report.results_table(points))
    for line in report.notes(points, args.repeats):
        print(line)
    if args.out:
        write_json(args.out, {"config": {k: v for k, v in vars(args).items() if k != "single"}, "setting": p.info,
                              "machine": machine_info(args.device), "check": check, "points": points})
    return 0


if __name__ == "__main__":
    sys.exit(main())
