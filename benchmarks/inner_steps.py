"""The paper's Figs. 3-4 on this machine: peak memory and time of one meta-step (the inner
loops and the meta-gradient of a meta-batch) against the number of inner GD steps K, one line
per method, from a ``benchmarks.meta_grad`` run. The dashed line is the run's memory limit
(``--mem-limit``), the paper's "capacity"; a point past it, or past the time-out, is missing
from its line and named in the table.

    bash benchmarks/paper_budgets.sh figs34    # the run (its method list), then this figure
    .venv/bin/python -m benchmarks.inner_steps RESULTS.json --clock cpu --out FIGURE.png
"""

import argparse
import json
from typing import Dict, List

from .memory_time import time_and_peak

LABELS = {
    "ours_store": "A-MAML dopri5 + Heun, store",
    "ours_dopri5_ckpt": "A-MAML dopri5 + Heun, checkpoint",
    "ours_exact_linearise": "A-MAML exact, linearise",
    "ours_exact_auto": "A-MAML exact, auto",
    "ours_exact": "A-MAML exact, store",
    "ours_checkpoint": "A-MAML exact, checkpoint",
    "ours_revolve": "A-MAML exact, Revolve (32 states)",
    "maml_unrolled": "MAML (unrolled autograd)",
    "learner_imaml": "iMAML (5 CG steps)",
    "learner_fomaml": "FOMAML",
    "learner_reptile": "Reptile",
}
"""The methods drawn, in this order, and their names in the figure and the table."""


def _cell(points: List[Dict], m: str, K: int, clock: str) -> str:
    v = time_and_peak(points, m, K, clock)
    if v is not None:
        return f"{v[0]:.3g} s / {v[1]:.3g} MiB"
    return next((p.get("status", "") for p in points if p["method"] == m and p["K"] == K), "")


def table(points: List[Dict], clock: str = "wall") -> List[str]:
    """A markdown table: one row per method, one column per K, "time / peak" in each cell."""
    ks = sorted({p["K"] for p in points})
    methods = [m for m in LABELS if any(p["method"] == m for p in points)]
    rows = ["| method | " + " | ".join(f"K = {k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for m in methods:
        rows.append(f"| {LABELS[m]} | " + " | ".join(_cell(points, m, k, clock) for k in ks) + " |")
    return rows


def plot(data: Dict, out: str, clock: str = "wall") -> None:
    """Two panels, as the paper's Figs. 3 and 4: peak memory and time per meta-step against K."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({p["K"] for p in data["points"]})
    fig, (mem, tim) = plt.subplots(1, 2, figsize=(11, 4.3))
    for i, m in enumerate(LABELS):
        ok = [(k, v) for k in ks for v in [time_and_peak(data["points"], m, k, clock)] if v is not None]
        if not ok:
            continue
        style = dict(marker="os^vD<>ph*x"[i % 11], linestyle="-" if m.startswith("ours") else "--",
                     label=LABELS[m], markersize=4)
        mem.plot([k for k, _ in ok], [v[1] for _, v in ok], **style)
        tim.plot([k for k, _ in ok], [v[0] for _, v in ok], **style)
    limit = data["config"].get("mem_limit")
    if limit:
        mem.axhline(limit * 1024, color="k", linestyle=":", label=f"memory limit ({limit:g} GiB)")
    for ax, ylabel in ((mem, "peak memory per meta-step (MiB)"), (tim, f"{clock} time per meta-step (s)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("inner GD steps K (T = K h)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    st = data["setting"]
    fig.suptitle(f"{st['task']}, {st['model']}, {st['support']} support / {st['query']} query points, "
                 f"{st['tasks']} tasks per meta-step", fontsize=9)
    mem.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.inner_steps", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="JSON written by python -m benchmarks.meta_grad")
    ap.add_argument("--out", required=True, help="PNG path")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="wall time, or the child's CPU time")
    args = ap.parse_args(argv)
    with open(args.results) as f:
        data = json.load(f)
    plot(data, args.out, args.clock)
    print("\n".join(table(data["points"], args.clock)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
