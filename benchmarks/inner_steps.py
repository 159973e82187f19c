"""The paper's Figs. 3-4 on this machine: peak memory and time of one meta-step (the inner
loops and the meta-gradient of a meta-batch) against the number of inner GD steps K, one line
per method, from a ``benchmarks.meta_grad`` run. The dashed line is the run's memory limit
(``--mem-limit``), the paper's "capacity"; a point past it, or past the time-out, is missing
from its line and named in the table.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.meta_grad --model cosmixture --tasks 5 --threads 1 \\
        --ks 10,20,50,100,200,500,1000,2000 --mem-limit 4 --repeats 2 \\
        --methods ours_store,ours_dopri5_ckpt,ours_exact_linearise,ours_exact,ours_checkpoint,ours_revolve,maml_unrolled,learner_imaml,learner_fomaml,learner_reptile \\
        --out docs/results/inner_steps_cosmixture_cpu.json
    .venv/bin/python -m benchmarks.inner_steps docs/results/inner_steps_cosmixture_cpu.json \\
        --out docs/images/inner_steps_cosmixture_cpu.png
"""

import argparse
import json
from typing import Dict, List

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


def _cell(p: Dict, clock: str) -> str:
    if p.get("status") != "ok":
        return p.get("status", "")
    t = p["cpu_time_s"] if clock == "cpu" else p["time_s"]
    return f"{t:.3g} s / {p['peak_bytes'] / 2 ** 20:.3g} MiB"


def table(points: List[Dict], clock: str = "wall") -> List[str]:
    """A markdown table: one row per method, one column per K, "time / peak" in each cell."""
    ks = sorted({p["K"] for p in points})
    methods = [m for m in LABELS if any(p["method"] == m for p in points)]
    rows = ["| method | " + " | ".join(f"K = {k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for m in methods:
        cells = {p["K"]: _cell(p, clock) for p in points if p["method"] == m}
        rows.append(f"| {LABELS[m]} | " + " | ".join(cells.get(k, "") for k in ks) + " |")
    return rows


def plot(data: Dict, out: str, clock: str = "wall") -> None:
    """Two panels, as the paper's Figs. 3 and 4: peak memory and time per meta-step against K."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "cpu_time_s" if clock == "cpu" else "time_s"
    fig, (mem, tim) = plt.subplots(1, 2, figsize=(11, 4.3))
    for i, m in enumerate(LABELS):
        ok = sorted((p["K"], p["peak_bytes"] / 2 ** 20, p[key]) for p in data["points"]
                    if p["method"] == m and p.get("status") == "ok" and p.get("peak_bytes") and p.get(key))
        if not ok:
            continue
        style = dict(marker="os^vD<>ph*x"[i % 11], linestyle="-" if m.startswith("ours") else "--",
                     label=LABELS[m], markersize=4)
        mem.plot([k for k, _, _ in ok], [b for _, b, _ in ok], **style)
        tim.plot([k for k, _, _ in ok], [t for _, _, t in ok], **style)
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
