"""The memory-time figure (issue 25): per setting of a peer benchmark run (model x tasks per
meta-step), time per meta-step against peak memory; ours a curve over memory plans (checkpoint,
store, a quarter and half of the linearisations kept, all of them), each peer a point, one
colour per K.

    OMP_NUM_THREADS=1 .venv-peers/bin/python -m benchmarks.peers --models conv4,cosmixture \\
        --methods ours_checkpoint,ours_exact,ours_exact_b25,ours_exact_b50,ours_exact_linearise,maml_unrolled,higher_sgd,torchopt_sgd,torchopt_metasgd,l2l_maml \\
        --out docs/results/peers_memory_time.json
    .venv/bin/python -m benchmarks.memory_time docs/results/peers_memory_time.json --out docs/results/memory_time.png
"""

import argparse
import json
from typing import Dict, List

OURS = ["ours_checkpoint", "ours_exact", "ours_exact_b25", "ours_exact_b50", "ours_exact_linearise"]
"""Ours from the least memory to the most: the curve's points, in order."""
PEERS = {"maml_unrolled": "o", "higher_sgd": "s", "torchopt_sgd": "^", "torchopt_metasgd": "v", "l2l_maml": "D"}
"""The peers' points and their markers."""
LABELS = {"ours_checkpoint": "checkpoint", "ours_exact": "store", "ours_exact_b25": "25% kept",
          "ours_exact_b50": "50% kept", "ours_exact_linearise": "linearise"}


def _name(setting: Dict) -> str:
    st = setting["setting"]
    return f"{st['model']}, {st['task']}, {setting['tasks']} task(s)" if isinstance(st, dict) else str(st)


def time_and_peak(points: List[Dict], method: str, K: int, clock: str = "wall"):
    """(time in s on ``clock``, peak MiB) of ``method``'s finished point at K, or None."""
    key = "cpu_time_s" if clock == "cpu" else "time_s"
    for p in points:
        if p["method"] == method and p["K"] == K and p.get("status") == "ok" and p.get("peak_bytes") and p.get(key):
            return p[key], p["peak_bytes"] / 2 ** 20
    return None


def plot(data: Dict, out: str, clock: str = "wall") -> List[str]:
    """One panel per setting; returns the lines of a markdown table of the plotted points.
    ``clock``: "wall" (time_s) or "cpu" (the child's CPU time, cpu_time_s)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = data["settings"]
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4.5), squeeze=False)
    rows = [f"| setting | K | method | {clock} time (s) | peak (MiB) |", "|---|---|---|---|---|"]
    for ax, s in zip(axes[0], settings):
        ks = sorted({p["K"] for p in s["points"]})
        colours = plt.cm.viridis([i / max(1, len(ks) - 1) for i in range(len(ks))])
        for K, colour in zip(ks, colours):
            curve = [(m, time_and_peak(s["points"], m, K, clock)) for m in OURS]
            curve = [(m, v) for m, v in curve if v is not None]
            if curve:
                ax.plot([v[1] for _, v in curve], [v[0] for _, v in curve], "-o", color=colour, label=f"ours, K = {K}")
            for m, marker in PEERS.items():
                v = time_and_peak(s["points"], m, K, clock)
                if v is not None:
                    ax.plot(v[1], v[0], marker, color=colour, markerfacecolor="none", markersize=8)
                    curve.append((m, v))
            rows += [f"| {_name(s)} | {K} | {LABELS.get(m, m)} | {v[0]:.3g} | {v[1]:.3g} |" for m, v in curve]
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("peak memory (MiB)")
        ax.set_ylabel(f"{clock} time per meta-step (s)")
        ax.set_title(_name(s), fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    handles = [plt.Line2D([], [], marker=mk, linestyle="", color="k", markerfacecolor="none", label=m)
               for m, mk in PEERS.items()]
    axes[0][0].legend(handles=axes[0][0].get_legend_handles_labels()[0] + handles, fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.memory_time", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="JSON written by python -m benchmarks.peers")
    ap.add_argument("--out", required=True, help="PNG path")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or the child's CPU time (runs from 2026-12-07 evening on)")
    args = ap.parse_args(argv)
    with open(args.results) as f:
        data = json.load(f)
    print("\n".join(plot(data, args.out, args.clock)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
