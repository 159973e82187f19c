"""The spread over seeds of ``amaml-ext compare`` runs that differ only in ``--seed``: for each
method the last meta-test step's mean over the test tasks in every seed, their mean and
standard deviation over the seeds, and A-MAML minus the method per seed (the paired per-task
mean difference) with the 95% interval of that seed's paired test. A lead that holds in every
seed, each with an interval that excludes 0, is one the seed cannot explain.

    for s in 0 1 2; do amaml-ext compare ... --seed $s --out runs/cos_s$s; done
    python -m benchmarks.seed_spread runs/cos_s0/compare.json runs/cos_s1/compare.json runs/cos_s2/compare.json
"""

import argparse
import json
import statistics
from typing import Dict, List

from amaml_ext.cli.report import paired_difference
from amaml_ext.learners import LABELS


def spread_table(runs: List[Dict], ref: str = "amaml") -> List[str]:
    """Markdown lines; ``runs``: the loaded compare.json of each seed (same methods, same tasks)."""
    seeds = [r["args"]["seed"] for r in runs]
    methods = [m for m in runs[0]["curves"] if all(m in r["curves"] for r in runs)]
    acc = runs[0]["curves"][methods[0]].get("metric") == "accuracy"
    scale = 100 if acc else 1
    fmt = (lambda v: f"{scale * v:.2f}") if acc else (lambda v: f"{v:.4f}")  # noqa: E731
    head = "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd over seeds |"
    if ref in methods:
        head += f" {LABELS.get(ref, ref)} minus it, per seed (paired 95% CI) |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for m in methods:
        means = [statistics.fmean(r["curves"][m]["final"]) for r in runs]
        spread = f" ± {fmt(statistics.stdev(means))}" if len(means) > 1 else " (one seed: no sd)"
        row = f"| {LABELS.get(m, m)} | " + " | ".join(fmt(v) for v in means)
        row += f" | {fmt(statistics.fmean(means))}{spread} |"
        if ref in methods:
            cells = []
            for r in runs:
                mean, half, _, _ = paired_difference(r["curves"][ref], r["curves"][m])
                cells.append("–" if m == ref else f"{scale * mean:+.4f} ± {scale * half:.4f}")
            row += " " + "; ".join(cells) + " |"
        lines.append(row)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.seed_spread", description=__doc__.split("\n\n")[0])
    ap.add_argument("compare_json", nargs="+", help="compare.json of each seed's run")
    ap.add_argument("--ref", default="amaml", help="the method the others are paired against")
    args = ap.parse_args(argv)
    runs = []
    for path in args.compare_json:
        with open(path) as f:
            runs.append(json.load(f))
    print("\n".join(spread_table(runs, args.ref)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
