"""What ``compare`` and ``evaluate`` write: tables (markdown) and plots of the meta-test curves."""

import io
from typing import Dict, List, Tuple

import torch

from ..learners import LABELS
from ..train.evaluate import half_width
from ..train.io import atomic_write_bytes


def table_steps(n: int) -> List[int]:
    picks = sorted({0, n // 10, n // 4, n // 2, n} if n >= 10 else set(range(n + 1)))
    return picks


def compare_table(curves: Dict[str, Dict]) -> str:
    n = min(c["step"][-1] for c in curves.values())
    steps = table_steps(n)
    acc = next(iter(curves.values())).get("metric") == "accuracy"
    head = "| method | " + " | ".join(f"step {s}" for s in steps) + " | meta-train s |"
    lines = [head, "|" + "---|" * (len(steps) + 2)]
    order = sorted(curves.items(), key=lambda kv: kv[1]["mean"][kv[1]["step"].index(n)], reverse=acc)
    for m, c in order:
        cells = []
        for s in steps:
            i = c["step"].index(s)
            if acc:
                cells.append(f"{100 * c['mean'][i]:.2f} ± {100 * c['ci95'][i]:.2f}%")
            else:
                cells.append(f"{c['mean'][i]:.4f} ± {c['std'][i]:.4f}")
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + f" | {c.get('train_seconds', float('nan')):.0f} |")
    return "\n".join(lines)


def paired_difference(ref: Dict, other: Dict) -> Tuple[float, float, int, int]:
    """``ref``'s last meta-test step minus ``other``'s, paired over their (shared) test tasks:
    the mean difference, its 95% half-width, on how many tasks ``ref`` is better (higher
    accuracy, lower error) and the number of tasks."""
    d = torch.tensor(ref["final"], dtype=torch.float64) - torch.tensor(other["final"], dtype=torch.float64)
    n = d.numel()
    half = half_width(float(d.std()), n) if n > 1 else float("nan")
    better = int((d > 0).sum()) if ref.get("metric") == "accuracy" else int((d < 0).sum())
    return float(d.mean()), half, better, n


def paired_table(curves: Dict[str, Dict], ref: str = "amaml") -> str:
    """Per-task paired differences at the last meta-test step: ``ref`` minus each other method,
    mean with its 95% confidence interval (t ~ 1.96), and on how many tasks ``ref`` is better.
    The methods are tested on the same tasks, so the paired interval is much tighter than the
    spread over tasks."""
    if ref not in curves or len(curves) < 2:
        return ""
    scale, unit = (100, " pp") if curves[ref].get("metric") == "accuracy" else (1, "")
    lines = [f"| {LABELS.get(ref, ref)} minus | mean difference ± 95% CI | {LABELS.get(ref, ref)} better on |",
             "|---|---|---|"]
    for m, c in curves.items():
        if m == ref:
            continue
        mean, half, better, n = paired_difference(curves[ref], c)
        lines.append(f"| {LABELS.get(m, m)} | {scale * mean:+.4f} ± {scale * half:.4f}{unit} | {better}/{n} tasks |")
    return "\n".join(lines)


def compare_plot(curves: Dict[str, Dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for m, c in curves.items():
        s = torch.tensor(c["step"], dtype=torch.float64)
        mu = torch.tensor(c["mean"])
        sd = torch.tensor(c["std"])
        ax.plot(s, mu, label=LABELS.get(m, m), lw=1.6)
        ax.fill_between(s, (mu - sd).clamp_min(1e-12), mu + sd, alpha=0.06)
    ax.set_xlabel("meta-test GD steps")
    if next(iter(curves.values())).get("metric") == "accuracy":
        ax.set_ylabel("test accuracy (mean ± std over test tasks)")
    else:
        ax.set_ylabel("test nRMSE (mean ± std over test tasks)")
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
