"""The HVP benchmark's output: progress lines, the markdown table, the per-model summary and the
header with the oversubscription warning."""

from typing import Dict, List

from .variants import REFERENCE


def row_line(r: Dict) -> str:
    return f"  {r['model']:10s} {r['variant']:26s} " + (f"{r['median_s'] * 1e3:9.3f} ms" if "median_s" in r
                                                         else r["skipped"])


def add_x_grad(rows: List[Dict]) -> None:
    """Each timed row's median as a multiple of its model's gradient (``x_grad``)."""
    for model in dict.fromkeys(r["model"] for r in rows):
        grad_t = next((r["median_s"] for r in rows if r["model"] == model and r["variant"] == "gradient"
                       and "median_s" in r), None)
        for r in rows:
            if r["model"] == model and "median_s" in r and grad_t:
                r["x_grad"] = r["median_s"] / grad_t


def markdown(rows: List[Dict]) -> str:
    head = ("| model | d | variant | ms / HVP (median) | IQR (ms) | x grad | repeats | max rel diff | note |\n"
            "|---|---:|---|---:|---:|---:|---:|---:|---|")
    lines = [head]
    for r in rows:
        d = f"{r['batch']}x{r['d']}" if r["batch"] > 1 else str(r["d"])
        if "median_s" in r:
            lines.append(f"| {r['model']} | {d} | {r['variant']} | {r['median_s'] * 1e3:.3f} | "
                         f"{r['q1_s'] * 1e3:.3f}-{r['q3_s'] * 1e3:.3f} | {r.get('x_grad', float('nan')):.2f} | "
                         f"{r['repeats']} | {r['max_rel_diff']:.1e} | {r['note']} |")
        else:
            lines.append(f"| {r['model']} | {d} | {r['variant']} | - | - | - | - | - | {r['skipped']} |")
    return "\n".join(lines)


def summary(rows: List[Dict], tol: float) -> str:
    """Per model: the fastest agreeing variant overall, without torch.compile, and among the
    one-HVP-per-state (no reuse) eager variants."""
    def fmt(r):
        return f"{r['variant']} {r['median_s'] * 1e3:.3f} ms ({r.get('x_grad', float('nan')):.2f} x grad)"

    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        hvps = [r for r in rows if r["model"] == model and r["variant"] != "gradient" and "median_s" in r
                and r["max_rel_diff"] <= tol]
        eager = [r for r in hvps if not r["variant"].startswith("compile_")]
        single = [r for r in eager if r["hvps_per_state"] == 1 and not r["variant"].startswith("amaml")]
        if not single:
            continue
        worst = max(r["max_rel_diff"] for r in rows if r["model"] == model and "max_rel_diff" in r)
        out.append(f"- {model}: fastest {fmt(min(hvps, key=lambda r: r['median_s']))}; "
                   f"fastest eager {fmt(min(eager, key=lambda r: r['median_s']))}; "
                   f"fastest eager without reuse {fmt(min(single, key=lambda r: r['median_s']))}; "
                   f"largest rel diff vs {REFERENCE} {worst:.1e}")
    return "\n".join(out)


def header(env: Dict, args) -> str:
    """What was measured, how, and (if the machine is oversubscribed) a warning."""
    out = (f"HVP of the training loss, {args.device}, torch {env['torch']}, {env['torch_threads']} threads "
           f"({env['cpu_count']} CPUs, 1-min load average {env['loadavg_1m']}); "
           f"median over >= {args.min_repeats} repeats / {args.min_time} s after {args.warmup} warm-up calls, "
           f"in-process variants interleaved round-robin; "
           f"max rel diff = max|Hv - Hv_{REFERENCE}| / max|Hv_{REFERENCE}|\n")
    if env["loadavg_1m"] + env["torch_threads"] > (env["cpu_count"] or 1) + 0.5 and env["torch_threads"] > 1:
        out += (f"\nWARNING: {env['torch_threads']} threads on {env['cpu_count']} CPUs with a load average of "
                f"{env['loadavg_1m']}: the machine is oversubscribed; OpenMP threads then wait for each other "
                f"and every op can take a scheduler time slice. Compare with --threads 1.\n")
    return out
