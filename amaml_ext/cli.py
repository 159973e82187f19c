"""The ``amaml-ext`` command (also ``python -m amaml_ext``).

    amaml-ext train --task cosmixture --method amaml --meta-steps 500 --seed 0 --out runs/amaml
    amaml-ext train ... --out runs/amaml --resume        # continue from the last checkpoint
    amaml-ext evaluate --run runs/amaml                   # meta-test curves -> runs/amaml/eval.json
    amaml-ext compare --task cosmixture --methods amaml,maml,maml1,fomaml,reptile,imaml \\
        --meta-steps 500 --out runs/compare               # train all, plot and table

``train`` writes the learned initialisation (a flat tensor) to ``OUT/theta.pt`` and its
checkpoints, metrics and settings under ``OUT`` (:func:`amaml_ext.train.meta_train`).
``compare`` trains every method from the same initial theta on the same tasks into
``OUT/<method>`` (continuing any run left unfinished there), meta-tests each on the same new
test tasks and writes ``OUT/compare.png``, ``OUT/compare.md`` and ``OUT/compare.json``.
Defaults follow the paper (Sec. 5.1): 50shot-50val, 100 training and 100 test tasks, inner
GD step 0.01, A-MAML T = 2 (200 steps; the others 200 GD steps, MAML 20), iMAML lambda = 1
with 5 CG steps, Adam lr 1e-3, meta-batch 5.
"""

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch.nn import functional as F

from . import learners as L
from . import models, tasks
from .functional import flatten_params
from .ode import ADJOINT_METHODS, FORWARD_METHODS
from .meta_grad import MEMORY_MODES
from .train import CONFIG, THETA, RunConfigMismatch, load_checkpoint, meta_test, meta_train

DTYPES = {"float32": torch.float32, "float64": torch.float64}
EVAL = "eval.json"


# ---- argument parsing -------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return v


def _methods(text: str) -> List[str]:
    ms = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in ms if m not in L.LEARNERS]
    if bad or not ms:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(L.LEARNERS)}, got {text!r}")
    return list(dict.fromkeys(ms))


def _add_problem_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tasks and model")
    g.add_argument("--task", choices=sorted(tasks.FAMILIES), default="cosmixture", help="task family")
    g.add_argument("--setting", choices=sorted(tasks.SETTINGS), default="50shot-50val",
                   help="support / query points per task")
    g.add_argument("--model", choices=models.MODELS, default="mlp32", help="MLP width 32 or 40 (tanh)")
    g.add_argument("--pool-size", type=_positive_int, default=100, help="meta-training tasks (and test tasks)")
    g.add_argument("--pool-seed", type=int, default=0, help="seeds the task pools")
    g = p.add_argument_group("inner training")
    g.add_argument("--inner-steps", type=_positive_int, default=200,
                   help="GD steps for fomaml/reptile/imaml; A-MAML's T = inner-steps x inner-lr")
    g.add_argument("--maml-steps", type=_positive_int, default=20, help="GD steps unrolled by maml")
    g.add_argument("--inner-lr", type=_positive_float, default=0.01, help="inner GD step (A-MAML's grid h)")
    g.add_argument("--solver", choices=FORWARD_METHODS, default="dopri5", help="A-MAML forward solver")
    g.add_argument("--adjoint", choices=ADJOINT_METHODS, default="heun", help="A-MAML adjoint scheme")
    g.add_argument("--memory", choices=MEMORY_MODES, default="store", help="A-MAML trajectory memory mode")
    g.add_argument("--rtol", type=_positive_float, default=1e-6, help="A-MAML dopri5 rtol")
    g.add_argument("--atol", type=_positive_float, default=1e-8, help="A-MAML dopri5 atol")
    g.add_argument("--compile", action="store_true", help="A-MAML: torch.compile the model callbacks")
    g.add_argument("--imaml-lambda", type=_positive_float, default=1.0, help="iMAML proximal strength")
    g.add_argument("--cg-steps", type=_positive_int, default=5, help="iMAML conjugate-gradient steps")
    g = p.add_argument_group("outer training")
    g.add_argument("--meta-steps", type=_positive_int, default=5000, help="outer Adam steps")
    g.add_argument("--meta-batch", type=_positive_int, default=5, help="tasks per outer step")
    g.add_argument("--lr", type=_positive_float, default=1e-3, help="outer Adam learning rate")
    g.add_argument("--seed", type=int, default=0, help="seeds the initial theta and the task draws")
    g.add_argument("--checkpoint-every", type=_positive_int, default=50, help="meta-steps between checkpoints")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--test-steps", type=_nonneg_int, default=None,
                   help="GD steps of meta-test adaptation (default: the run's --inner-steps)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="amaml-ext", description="Adjoint MAML and baselines: meta-train, "
                                 "meta-test and compare on the paper's synthetic tasks.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="meta-train one method; writes OUT/theta.pt and checkpoints")
    p.add_argument("--method", choices=list(L.LEARNERS), required=True)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    _add_problem_args(p)
    p = sub.add_parser("evaluate", help="meta-test a trained run: nRMSE curves -> RUN/eval.json")
    p.add_argument("--run", required=True, help="a run directory written by 'train'")
    _add_eval_args(p)
    p.add_argument("--device", default=None, help="default: the run's device")
    p.add_argument("--quiet", action="store_true")
    p = sub.add_parser("compare", help="train several methods on the same tasks; plot and table")
    p.add_argument("--methods", type=_methods, default=list(L.LEARNERS),
                   help="comma-separated, default all: " + ",".join(L.LEARNERS))
    p.add_argument("--out", required=True, help="output directory (one run per method inside)")
    _add_problem_args(p)
    _add_eval_args(p)
    return ap


# ---- building runs from settings --------------------------------------------------------------

def _device(text: str) -> torch.device:
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise SystemExit(f"amaml-ext: argument --device: expected cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"amaml-ext: argument --device: {text!r} requested but no CUDA device is available")
    return dev


def run_config(args, method: str) -> Dict:
    """The JSON-able settings that define a training run (stored in config.json)."""
    shots, val = tasks.SETTINGS[args.setting]
    cfg = {"method": method, "task": args.task, "setting": args.setting, "shots": shots, "val": val,
           "model": args.model, "pool_size": args.pool_size, "pool_seed": args.pool_seed,
           "inner_lr": args.inner_lr, "dtype": args.dtype, "device": str(args.device),
           # meta-test adaptation length, the same for every method (the paper: the inner steps)
           "test_steps": args.inner_steps}
    if method == "amaml":
        cfg.update(T=args.inner_steps * args.inner_lr, solver=args.solver, adjoint=args.adjoint,
                   memory=args.memory, rtol=args.rtol, atol=args.atol, compile=args.compile)
    elif method == "maml":
        cfg["inner_steps"] = args.maml_steps
    elif method == "maml1":
        cfg["inner_steps"] = 1
    else:
        cfg["inner_steps"] = args.inner_steps
    if method == "imaml":
        cfg.update(imaml_lambda=args.imaml_lambda, cg_steps=args.cg_steps)
    return cfg


class Problem:
    """Task family, pools, model and loss of a configuration."""

    def __init__(self, cfg: Dict, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.dtype = DTYPES[cfg["dtype"]]
        self.family = tasks.make_family(cfg["task"], cfg["shots"], cfg["val"])
        self.train_pool, self.test_pool = tasks.train_test_pools(self.family, cfg["pool_size"], cfg["pool_size"],
                                                                 seed=cfg["pool_seed"])
        self.loss = F.mse_loss

    def model(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return models.make_model(self.cfg["model"]).to(device=self.device, dtype=self.dtype)


def make_run_learner(cfg: Dict, model, loss) -> L.MetaLearner:
    m = cfg["method"]
    if m == "amaml":
        steps = round(cfg["T"] / cfg["inner_lr"])
        return L.make_learner("amaml", model, loss, inner_steps=steps, inner_lr=cfg["inner_lr"],
                              solver=cfg["solver"], adjoint=cfg["adjoint"], memory=cfg["memory"],
                              rtol=cfg["rtol"], atol=cfg["atol"], compile=cfg["compile"])
    return L.make_learner(m, model, loss, inner_steps=cfg["inner_steps"], maml_steps=cfg["inner_steps"],
                          inner_lr=cfg["inner_lr"], imaml_lambda=cfg.get("imaml_lambda", 1.0),
                          cg_steps=cfg.get("cg_steps", 5))


def train_one(args, method: str, out: str, resume: bool) -> torch.Tensor:
    cfg = run_config(args, method)
    prob = Problem(cfg, args.device)
    model = prob.model(args.seed)
    learner = make_run_learner(cfg, model, prob.loss)
    return meta_train(learner, prob.train_pool, meta_steps=args.meta_steps, out_dir=out, meta_batch=args.meta_batch,
                      lr=args.lr, seed=args.seed, resume=resume, checkpoint_every=args.checkpoint_every,
                      device=args.device, dtype=prob.dtype, config=cfg, progress=not args.quiet)


def evaluate_run(run: str, test_steps: Optional[int], device: Optional[torch.device] = None,
                 quiet: bool = False) -> Dict:
    cfg_path = os.path.join(run, CONFIG)
    if not os.path.exists(cfg_path):
        raise SystemExit(f"amaml-ext: argument --run: {run!r} has no {CONFIG}; is it a directory written by 'train'?")
    with open(cfg_path) as f:
        cfg = json.load(f)
    theta_path = os.path.join(run, THETA)
    if not os.path.exists(theta_path):
        ck = load_checkpoint(run)
        at = f"it stopped at meta-step {ck['step']} of {cfg.get('meta_steps')}" if ck else "no checkpoint either"
        raise SystemExit(f"amaml-ext: argument --run: {run!r} has no {THETA} ({at}); finish it with "
                         f"'amaml-ext train ... --out {run} --resume'")
    device = device or _device(cfg.get("device", "cpu"))
    prob = Problem(cfg, device)
    model = prob.model(0)
    theta = torch.load(theta_path, map_location=device, weights_only=True).to(prob.dtype)
    if theta.numel() != flatten_params(model).numel():
        raise SystemExit(f"amaml-ext: {theta_path} holds {theta.numel()} parameters, the model {cfg['model']} "
                         f"has {flatten_params(model).numel()}")
    steps = cfg["test_steps"] if test_steps is None else test_steps
    batch = prob.test_pool.all(device=device, dtype=prob.dtype)
    t0 = time.perf_counter()
    curve = meta_test(model, prob.loss, theta, batch, steps=steps, lr=cfg["inner_lr"])
    curve.update(method=cfg["method"], test_tasks=batch.size, test_steps=steps, seconds=time.perf_counter() - t0)
    with open(os.path.join(run, EVAL), "w") as f:
        json.dump(curve, f, indent=1)
    if not quiet:
        print(f"{cfg['method']}: meta-test nRMSE over {batch.size} test tasks: step 0 {curve['mean'][0]:.4f}, "
              f"step {steps} {curve['mean'][-1]:.4f} +- {curve['std'][-1]:.4f}")
    return curve


# ---- compare outputs ----------------------------------------------------------------------------

LABELS = {"amaml": "A-MAML", "maml": "MAML", "maml1": "MAML-1", "fomaml": "FOMAML", "reptile": "Reptile",
          "imaml": "iMAML"}


def table_steps(n: int) -> List[int]:
    picks = sorted({0, n // 10, n // 4, n // 2, n} if n >= 10 else set(range(n + 1)))
    return picks


def compare_table(curves: Dict[str, Dict]) -> str:
    n = min(c["step"][-1] for c in curves.values())
    steps = table_steps(n)
    head = "| method | " + " | ".join(f"step {s}" for s in steps) + " | meta-train s |"
    lines = [head, "|" + "---|" * (len(steps) + 2)]
    for m, c in sorted(curves.items(), key=lambda kv: kv[1]["mean"][kv[1]["step"].index(n)]):
        cells = []
        for s in steps:
            i = c["step"].index(s)
            cells.append(f"{c['mean'][i]:.4f} ± {c['std'][i]:.4f}")
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + f" | {c.get('train_seconds', float('nan')):.0f} |")
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
    ax.set_ylabel("test nRMSE (mean ± std over test tasks)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def compare(args) -> Dict:
    os.makedirs(args.out, exist_ok=True)
    curves = {}
    for method in args.methods:
        run = os.path.join(args.out, method)
        ck = load_checkpoint(run)
        done = os.path.exists(os.path.join(run, THETA)) and ck is not None and ck["step"] >= args.meta_steps
        t0 = time.perf_counter()
        if not done:
            if ck is not None and not args.quiet:
                print(f"{method}: continuing the run in {run} from meta-step {ck['step']}")
            try:
                train_one(args, method, run, resume=True)
            except RunConfigMismatch as e:
                raise SystemExit(f"amaml-ext compare: {e}; use another --out") from None
        elif not args.quiet:
            print(f"{method}: already trained in {run}")
        rows = (load_checkpoint(run) or {}).get("metrics", [])
        curve = evaluate_run(run, args.test_steps, args.device, quiet=args.quiet)
        curve["train_seconds"] = sum(r["seconds"] for r in rows)
        curve["wall_seconds_this_call"] = time.perf_counter() - t0
        curves[method] = curve
    shots, val = tasks.SETTINGS[args.setting]
    title = (f"{args.task}, {args.setting}: {args.meta_steps} meta-steps, inner {args.inner_steps} steps "
             f"(MAML {args.maml_steps}), {args.pool_size} test tasks")
    plot_title = (f"{args.task} {args.setting}, {args.meta_steps} meta-steps\n"
                  f"inner {args.inner_steps} GD steps (MAML {args.maml_steps}, MAML-1 1), {args.pool_size} test tasks")
    compare_plot(curves, os.path.join(args.out, "compare.png"), plot_title)
    table = compare_table(curves)
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write(f"# {title}\n\nTest nRMSE (mean ± std over the test tasks) after meta-test GD steps "
                f"(step {args.inner_lr:g}); last column: meta-training seconds.\n\n{table}\n")
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump({"args": {k: (v if isinstance(v, (int, float, str, list, bool, type(None))) else str(v))
                            for k, v in vars(args).items()}, "curves": curves}, f, indent=1)
    print(f"\n{title}\n\n{table}\n\nwrote {os.path.join(args.out, 'compare.png')}, compare.md, compare.json")
    return curves


# ---- entry point --------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "evaluate":
        evaluate_run(args.run, args.test_steps, _device(args.device) if args.device else None, args.quiet)
        return 0
    args.device = _device(args.device)
    if args.meta_batch > args.pool_size:
        raise SystemExit(f"amaml-ext: argument --meta-batch: must be at most --pool-size {args.pool_size}, "
                         f"got {args.meta_batch}")
    try:
        if args.command == "train":
            if not args.resume and load_checkpoint(args.out) is not None:
                raise SystemExit(f"amaml-ext: argument --out: {args.out!r} already holds a run; add --resume "
                                 f"to continue it or choose another directory")
            train_one(args, args.method, args.out, args.resume)
            print(f"wrote {os.path.join(args.out, THETA)}")
        else:
            compare(args)
    except RunConfigMismatch as e:
        raise SystemExit(f"amaml-ext: {e}") from None
    except KeyboardInterrupt as e:
        print(f"\namaml-ext: {e or 'interrupted'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
