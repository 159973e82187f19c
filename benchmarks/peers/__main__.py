"""Ours against the peers (higher, TorchOpt, learn2learn), unrolled MAML and the authors'
approach: time per meta-step and peak memory over models x tasks per meta-step x inner steps K.

    make bench-peers                                   # the environment, then the grid below
    python -m benchmarks.peers --out docs/results/peers_cpu.json
    python -m benchmarks.peers --models cosmixture --tasks 1 --ks 5,20 --repeats 1   # smallest

Each point runs in its own process through the meta-gradient benchmark's harness
(``benchmarks.meta_grad``); run it with the peers' environment (``.venv-peers``). Methods,
measurements and caveats: docs/benchmarks.md, Peers.
"""

import argparse
import copy
import datetime
import json
import sys
from typing import Dict, List

import torch

from ..common.machine import machine_info
from ..common.results import write_json
from ..meta_grad import __main__ as meta_grad_main
from ..meta_grad import report as meta_grad_report
from ..meta_grad.check import check_table, correctness_check
from ..meta_grad.methods import METHODS, not_applicable
from ..meta_grad.problem import build_problem
from . import report
from .methods import CONTINUOUS, peer_versions

GRID_METHODS = ["ours_store", "ours_exact", "ours_exact_linearise", "ours_checkpoint", "learner_amaml", "learner_amaml_exact",
                "maml_unrolled", "authors_rk4", "authors_heun",
                "higher_sgd", "torchopt_sgd", "torchopt_metasgd", "l2l_maml"]
CONV_NOT_SMOOTH = ("n/a: Conv4 (ReLU, max-pool) has no smooth gradient flow; the continuous adjoint does not "
                   "apply (amaml_ext warns; exact mode is the library's answer there)")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cosmixture,conv4", help="comma-separated: cosmixture, conv4")
    ap.add_argument("--tasks", default="1,5", help="tasks per meta-step, comma-separated")
    ap.add_argument("--ks", default="5,20,200,1000", help="inner steps K, comma-separated")
    ap.add_argument("--methods", default=",".join(GRID_METHODS), help=f"comma-separated; default {GRID_METHODS}")
    ap.add_argument("--channels", type=int, default=32, help="Conv4 width")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="dtype of the timed runs")
    ap.add_argument("--check-dtype", choices=["float32", "float64"], default="float64",
                    help="dtype of the correctness check")
    ap.add_argument("--check-k", type=int, default=10)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (median)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per point after set-up")
    ap.add_argument("--mem-limit", type=float, default=None, help="GiB resident per point (CPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every process (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.tasks = sorted({int(t) for t in args.tasks.split(",") if t.strip()})
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {list(METHODS)}")
    return args


def setting_args(args, model: str, tasks: int, methods: List[str]):
    """The meta-gradient benchmark's options for one (model, tasks) setting."""
    argv = ["--model", model, "--tasks", str(tasks), "--ks", args.ks, "--methods", ",".join(methods),
            "--device", args.device, "--dtype", args.dtype, "--repeats", str(args.repeats),
            "--timeout", repr(args.timeout), "--channels", str(args.channels), "--check-k", str(args.check_k),
            "--threads", str(args.threads)]
    if args.mem_limit is not None:
        argv += ["--mem-limit", repr(args.mem_limit)]
    return meta_grad_main.parse_args(argv)


def run_setting(args, model: str, tasks: int) -> Dict:
    skipped = [m for m in args.methods if model == "conv4" and m in CONTINUOUS]
    methods = [m for m in args.methods if m not in skipped]
    a = setting_args(args, model, tasks, methods)
    p = build_problem(a)
    print("\n## " + meta_grad_report.header(p, a), flush=True)
    check = None
    if not args.no_check:
        ca = copy.copy(a)
        ca.dtype = args.check_dtype
        check = correctness_check(ca, [m for m in methods if not not_applicable(m, p)])
        print("\n" + check_table(check) + "\n", flush=True)
    points = [r for m in methods for r in meta_grad_main.sweep_method(m, p, check, a)]
    points += [{"method": m, "K": K, "status": "n/a", "error": CONV_NOT_SMOOTH} for m in skipped for K in a.ks]
    order = {m: i for i, m in enumerate(args.methods)}
    points.sort(key=lambda r: (order[r["method"]], r["K"]))
    print(meta_grad_report.results_table(points), flush=True)
    return {"model": model, "tasks": tasks, "setting": p.info, "check": check, "points": points}


def summary(settings: List[Dict]) -> str:
    out = ["Each cell: time per meta-step / the fastest peer's at that K, and peak memory / the smallest peak "
           f"of the peers (at least {report.MEM_FLOOR // 2**20} MiB). Peers: higher, TorchOpt (functional "
           "sgd, MetaSGD), learn2learn MAML."]
    for s in settings:
        out += ["", f"### {report.title(s)}", "", report.ratio_table(s), "", report.check_cells(s)]
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    versions = peer_versions()
    print(f"Peers: {json.dumps(versions)}; torch {torch.__version__}", flush=True)
    started = datetime.datetime.now().astimezone()
    settings = [run_setting(args, model, tasks) for model in args.models for tasks in args.tasks]
    print("\n# Ratios to the peers\n\n" + summary(settings))
    if args.out:
        write_json(args.out, {"config": vars(args), "started": started.isoformat(timespec="seconds"),
                              "peers": versions, "machine": machine_info(args.device), "settings": settings})
    return 0


if __name__ == "__main__":
    sys.exit(main())
