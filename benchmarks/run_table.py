"""Markdown table of finished `amaml-ext train` runs meta-tested with `amaml-ext evaluate` (each
run with its own inner procedure), with paired per-task differences against a reference run
(the runs must share their test tasks) and, where a run records it, the continuous adjoint's
error estimate over meta-training:

    python -m benchmarks.run_table --ref maml5 runs/omni/maml5 runs/omni/exact5 runs/omni/exact10 ...
"""

import argparse
import csv
import json
import os
import statistics

from amaml_ext.cli.report import paired_difference


def load(run):
    with open(os.path.join(run, "eval.json")) as f:
        curve = json.load(f)
    with open(os.path.join(run, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(run, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    est = [float(r["adjoint_error_estimate"]) for r in rows if r.get("adjoint_error_estimate")]
    return curve, cfg, rows, est


def describe(cfg):
    if cfg["method"] == "amaml":
        steps = round(cfg["T"] / cfg["inner_lr"])
        mode = "exact" if cfg["adjoint"] == "discrete" else f"{cfg['solver']}+{cfg['adjoint']}"
        what = f"A-MAML {mode}, T = {cfg['T']:g} ({steps} x {cfg['inner_lr']:g})"
    else:
        what = f"{cfg['method'].upper()} {cfg['inner_steps']} x {cfg['inner_lr']:g}"
    if cfg.get("activation"):
        what += f", {cfg['activation']}/{cfg['pool']} Conv4"
    return what


def plot(data, path):
    """Meta-test curves of the runs, each against the fraction of its own inner run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.8, 4.4), dpi=120)
    for name, (curve, cfg, _, _) in data.items():
        frac = [s / curve["step"][-1] for s in curve["step"]]
        ax.plot(frac, [100 * m for m in curve["mean"]], label=f"{name}: {describe(cfg)}", lw=1.5)
    ax.set_xlabel("fraction of the run's own meta-test inner run")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--ref", required=True, help="name (last path component) of the reference run")
    p.add_argument("--plot", default=None, help="also draw the meta-test curves into this PNG")
    args = p.parse_args(argv)
    data = {os.path.basename(r.rstrip("/")): load(r) for r in args.runs}
    if args.plot:
        plot(data, args.plot)
    ref = data[args.ref][0]
    print("| run | meta-test | accuracy (95% CI) | minus " + args.ref + " (paired 95% CI) | better on | "
          "meta-steps | s / meta-step | adjoint error estimate (median / max) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (curve, cfg, rows, est) in data.items():
        mean, half, better, n = paired_difference(curve, ref)
        secs = statistics.median(float(r["seconds"]) for r in rows)
        est_txt = f"{statistics.median(est):.1e} / {max(est):.1e}" if est else "exact (none needed)" \
            if cfg.get("adjoint") == "discrete" else "–"
        diff = "–" if name == args.ref else f"{100 * mean:+.2f} ± {100 * half:.2f} pp"
        print(f"| {name}: {describe(cfg)} | {curve['test_steps']} GD steps of {cfg['inner_lr']:g} | "
              f"{100 * curve['mean'][-1]:.2f} ± {100 * curve['ci95'][-1]:.2f}% | {diff} | "
              f"{'–' if name == args.ref else f'{better}/{n}'} | {len(rows)} | {secs:.2f} | {est_txt} |")


if __name__ == "__main__":
    main()
