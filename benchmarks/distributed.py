"""Meta-steps per second of ``amaml-ext train`` alone and under ``torchrun`` with 1, 2, ... processes
(issue 16; docs/benchmarks.md, "Distributed meta-training").

    OMP_NUM_THREADS=1 python -m benchmarks.distributed --procs 1,2 --out bench_distributed.json
    python -m benchmarks.distributed --case omniglot --data-root DIR --procs 1,2

Each run is a child process (``python -m amaml_ext train`` for "alone", ``python -m
torch.distributed.run --nproc-per-node N -m amaml_ext train`` otherwise) with one thread per
process; the rate is 1 / the median of metrics.csv's per-step seconds after the first
``--warmup`` steps (the meta-gradient, the gather and the Adam step; not the start-up), and the
wall rate counts every step over the whole command, start-up included."""

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List

from .common.children import Child, module_command
from .common.machine import machine_info
from .common.results import write_json

CASES = {
    # name -> train options (the README's demo settings: 5 tasks per step)
    "cosmixture-amaml": ["--task", "cosmixture", "--method", "amaml", "--inner-steps", "50", "--compile", "off"],
    "cosmixture-maml": ["--task", "cosmixture", "--method", "maml", "--inner-steps", "50", "--maml-steps", "10"],
    "omniglot": ["--task", "omniglot", "--method", "maml", "--ways", "5", "--shots", "1", "--inner-steps", "5",
                 "--maml-steps", "5", "--inner-lr", "0.1"],
}


def run_once(case: str, procs: int, steps: int, meta_batch: int, extra: List[str], timeout: float,
             per_call: int = 1) -> Dict:
    out = tempfile.mkdtemp(prefix="bench-dist-")
    train = ["train", *CASES[case], "--meta-steps", str(steps), "--meta-batch", str(meta_batch),
             "--checkpoint-every", str(steps), "--quiet", "--out", out, *extra]
    cmd = (module_command("amaml_ext", *train) if procs == 0 else
           module_command("torch.distributed.run", "--nproc-per-node", str(procs), "-m", "amaml_ext", *train,
                          "--tasks-per-call", str(per_call)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    child = Child(cmd, env=env, own_session=True)
    while child.next_line(timeout=max(1.0, timeout - (time.perf_counter() - t0))) is not None:
        if time.perf_counter() - t0 > timeout:
            child.kill()
            break
    rc = child.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        return {"case": case, "procs": procs, "error": f"exit {rc}: " + " | ".join(child.stderr_lines()[-3:])}
    with open(os.path.join(out, "metrics.csv")) as f:
        secs = [float(r["seconds"]) for r in csv.DictReader(f)]
    return {"case": case, "procs": procs, "tasks_per_call": per_call, "meta_batch": meta_batch, "steps": steps,
            "step_seconds_median": statistics.median(secs[1:] or secs), "wall_seconds": wall}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="cosmixture-amaml,cosmixture-maml", help=",".join(CASES))
    p.add_argument("--procs", default="1,2", help="torchrun process counts (the single-process command is run too)")
    p.add_argument("--tasks-per-call", default="1", help="comma-separated values for the torchrun runs")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--meta-batch", type=int, default=5)
    p.add_argument("--data-root", default=None)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    extra = ["--data-root", args.data_root] if args.data_root else []
    rows = []
    print("| case | processes | meta-batch | median step s | steps/s | vs alone | wall s |\n|---|---|---|---|---|---|---|")
    runs = [(0, 1)] + [(int(n), int(k)) for k in args.tasks_per_call.split(",") for n in args.procs.split(",")]
    for case in args.case.split(","):
        base = None
        for procs, per_call in runs:
            r = run_once(case, procs, args.steps, args.meta_batch, extra, args.timeout, per_call)
            rows.append(r)
            who = "alone" if procs == 0 else f"torchrun {procs}, {per_call} task(s)/call"
            if "error" in r:
                print(f"| {case} | {who} | {args.meta_batch} | {r['error']} |||||")
                continue
            rate = 1.0 / r["step_seconds_median"]
            base = rate if procs == 0 else base
            ratio = f"{rate / base:.2f}x" if base else "-"
            print(f"| {case} | {who} | {args.meta_batch} | {r['step_seconds_median']:.4f} | {rate:.2f} | {ratio} | "
                  f"{r['wall_seconds']:.1f} |", flush=True)
    if args.out:
        write_json(args.out, {"machine": machine_info("cpu"), "argv": sys.argv, "runs": rows})


if __name__ == "__main__":
    main()
