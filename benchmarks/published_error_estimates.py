"""The continuous adjoint's error estimate at the settings of the published A-MAML runs.

Re-runs the first ``--meta-steps`` meta-steps of A-MAML at the settings of each published
comparison in docs/results.md (same command options, so the same tasks and initial theta) and
reports the estimate over those steps (``adjoint_error_estimate`` in metrics.csv):

    python -m benchmarks.published_error_estimates --data-root ../shared/data --meta-steps 200 \
        --out runs/published_estimates

A run whose estimate exceeds the tolerance (1e-2) is marked; its meta-gradients were not right.
"""

import argparse
import csv
import os
import statistics
import subprocess
import sys

SETTINGS = {
    "cosmixture_50 (T=2, h=0.01)": ["--task", "cosmixture", "--setting", "50shot-50val", "--inner-steps", "200"],
    "alpine_50 (T=2, h=0.01)": ["--task", "alpine", "--setting", "50shot-50val", "--inner-steps", "200"],
    "demo cosmixture (T=0.5, h=0.01)": ["--task", "cosmixture", "--setting", "50shot-50val", "--inner-steps", "50"],
    "movielens-100k 10shot-15val (T=0.5)": ["--task", "movielens-100k", "--setting", "10shot-15val", "--inner-steps", "50"],
    "jester 10shot-15val (T=0.5)": ["--task", "jester", "--setting", "10shot-15val", "--inner-steps", "50"],
}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.published_error_estimates", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=os.environ.get("AMAML_DATA_ROOT"))
    p.add_argument("--meta-steps", type=int, default=200)
    p.add_argument("--out", default="runs/published_estimates")
    p.add_argument("--only", default=None, help="substring of the settings to run")
    args = p.parse_args(argv)
    rows = []
    for name, opts in SETTINGS.items():
        if args.only and args.only not in name:
            continue
        if any(t in opts for t in ("movielens-100k", "jester")):
            if not args.data_root:
                print(f"{name}: no --data-root, left out")
                continue
            opts = opts + ["--data-root", args.data_root]
        run = os.path.join(args.out, name.split()[0])
        cmd = [sys.executable, "-m", "amaml_ext", "train", "--method", "amaml", "--meta-steps", str(args.meta_steps),
               "--compile", "--quiet", "--out", run, "--resume"] + opts
        subprocess.run(cmd, check=True)
        with open(os.path.join(run, "metrics.csv")) as f:
            est = [float(r["adjoint_error_estimate"]) for r in csv.DictReader(f)]
        rows.append((name, max(est), statistics.median(est), est[-1]))
        print(f"{name}: max {max(est):.2e}, median {statistics.median(est):.2e}, last {est[-1]:.2e}", flush=True)
    print(f"\n| setting | estimate over the first {args.meta_steps} meta-steps: max | median | last | within 1e-2 |")
    print("|---|---|---|---|---|")
    for name, mx, med, last in rows:
        print(f"| {name} | {mx:.2e} | {med:.2e} | {last:.2e} | {'yes' if mx <= 1e-2 else '**no**'} |")


if __name__ == "__main__":
    main()
