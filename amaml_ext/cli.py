"""The ``amaml-ext`` command (also ``python -m amaml_ext``).

    amaml-ext train --task cosmixture --method amaml --meta-steps 500 --seed 0 --out runs/amaml
    amaml-ext train ... --out runs/amaml --resume        # continue from the last checkpoint
    amaml-ext evaluate --run runs/amaml                   # meta-test curves -> eval.json, eval.png
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
from .ratings import RATING_DATASETS, RATING_SETTINGS
from .functional import flatten_params
from .ode import ADJOINT_METHODS, FORWARD_METHODS
from .metagrad import MEMORY_MODES
from .accuracy import AdjointAccuracyError
from .train import (CONFIG, THETA, RunConfigMismatch, RunFileError, UnreadableRunFile, load_checkpoint, meta_test, meta_train,
                    read_json_file, read_torch_file)

DTYPES = {"float32": torch.float32, "float64": torch.float64}
EVAL = "eval.json"
#: --task values and their kind
TASK_KINDS = {**{name: "synthetic" for name in tasks.FAMILIES}, **{name: "ratings" for name in RATING_DATASETS},
              "omniglot": "images", "miniimagenet": "images"}
DEFAULT_SETTING = {"synthetic": "50shot-50val", "ratings": "10shot-15val"}


# ---- argument parsing -------------------------------------------------------------------------

def _number(cast, lowest, what: str):
    """An argparse type: ``cast(text)``, finite and at least ``lowest`` (``> 0`` for floats)."""
    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            v = None
        if v is None or not math.isfinite(v) or v < lowest or (cast is float and v <= 0):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


_positive_int = _number(int, 1, "a positive integer")
_nonneg_int = _number(int, 0, "a non-negative integer")
_positive_float = _number(float, 0.0, "a positive finite number")


def _methods(text: str) -> List[str]:
    ms = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in ms if m not in L.LEARNERS]
    if bad or not ms:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(L.LEARNERS)}, got {text!r}")
    return list(dict.fromkeys(ms))


def _add_problem_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tasks and model")
    g.add_argument("--task", choices=list(TASK_KINDS), default="cosmixture",
                   help="task family: synthetic regression (cosmixture, alpine), collaborative filtering "
                        "(movielens-100k, movielens-1m, jester) or few-shot images (omniglot, miniimagenet)")
    g.add_argument("--setting", choices=sorted(tasks.SETTINGS) + sorted(RATING_SETTINGS), default=None,
                   help="support / query points per task: 50shot-50val (default) or 100shot-100val for the "
                        "synthetic families; 10shot-15val (default), 15shot-20val or 20shot-30val for ratings")
    g.add_argument("--model", choices=models.MODELS, default=None,
                   help="MLP width (tanh): mlp32 (synthetic default) or mlp40 (ratings default); images use Conv4")
    g.add_argument("--channels", type=_positive_int, default=64, help="Conv4 width (images)")
    g.add_argument("--activation", choices=sorted(models.ACTIVATIONS), default="relu",
                   help="Conv4 activation (images); smooth ones (gelu, ...) with --pool avg for continuous A-MAML")
    g.add_argument("--pool", choices=sorted(models.POOLS), default="max", help="Conv4 pooling (images)")
    g.add_argument("--ways", type=_positive_int, default=None, help="classes per task (images; Omniglot 20, Mini-ImageNet 5)")
    g.add_argument("--shots", type=_positive_int, default=None, help="support images per class (images; default 1)")
    g.add_argument("--query-shots", type=_positive_int, default=None,
                   help="query images per class (images; Omniglot 1, Mini-ImageNet 15)")
    g.add_argument("--data-root", default=None,
                   help="folder with ml-100k/, ml-1m/, jester/, omniglot/, miniimagenet/ (default: $AMAML_DATA_ROOT)")
    g.add_argument("--pool-size", type=_positive_int, default=None,
                   help="synthetic: meta-training tasks and test tasks (default 100); images: test episodes "
                        "(default 600); ratings: not used (100 held-out test users)")
    g.add_argument("--pool-seed", type=int, default=0, help="seeds the task pools (and the held-out users/episodes)")
    g.add_argument("--resample", action="store_true",
                   help="ratings: draw each training user's support and query ratings afresh at every visit "
                        "(default: one fixed split per user)")
    g = p.add_argument_group("inner training")
    g.add_argument("--inner-steps", type=_positive_int, default=200,
                   help="GD steps for fomaml/reptile/imaml; A-MAML's T = inner-steps x inner-lr")
    g.add_argument("--maml-steps", type=_positive_int, default=20, help="GD steps unrolled by maml and anil")
    g.add_argument("--inner-lr", type=_positive_float, default=0.01, help="inner GD step (A-MAML's grid h)")
    g.add_argument("--solver", choices=FORWARD_METHODS, default="dopri5", help="A-MAML forward solver")
    g.add_argument("--adjoint", choices=ADJOINT_METHODS, default="heun", help="A-MAML adjoint scheme")
    g.add_argument("--memory", choices=MEMORY_MODES, default="store", help="A-MAML trajectory memory mode")
    g.add_argument("--rtol", type=_positive_float, default=1e-6, help="A-MAML dopri5 rtol")
    g.add_argument("--atol", type=_positive_float, default=1e-8, help="A-MAML dopri5 atol")
    g.add_argument("--compile", action="store_true", help="A-MAML: torch.compile the model callbacks")
    g.add_argument("--error-tol", type=_positive_float, default=1e-2,
                   help="A-MAML (continuous adjoint): relative error estimate above which it warns")
    g.add_argument("--strict", action="store_true",
                   help="A-MAML: stop with an error instead of warning when the estimate exceeds --error-tol")
    g.add_argument("--refine", action="store_true",
                   help="A-MAML: on a smooth flow, solve again on a finer adjoint grid when the estimate exceeds --error-tol")
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


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default and keeps the epilog's layout."""


def _plain(text: str) -> str:
    """The module docstring for a terminal: no reStructuredText markup."""
    return text.replace("``", "").replace(":func:", "").replace("`", "")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="amaml-ext", description="Adjoint MAML and baselines: meta-train, "
                                 "meta-test and compare on the paper's synthetic and real tasks.",
                                 formatter_class=_Formatter, epilog=_plain(__doc__))
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="meta-train one method; writes OUT/theta.pt and checkpoints",
                       formatter_class=_Formatter)
    p.add_argument("--method", choices=list(L.LEARNERS), required=True)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    _add_problem_args(p)
    p = sub.add_parser("evaluate", help="meta-test a trained run: curves -> RUN/eval.json and RUN/eval.png",
                       formatter_class=_Formatter)
    p.add_argument("--run", required=True, help="a run directory written by 'train'")
    _add_eval_args(p)
    p.add_argument("--device", default=None, help="default: the run's device")
    p.add_argument("--quiet", action="store_true")
    p = sub.add_parser("compare", help="train several methods on the same tasks; plot and table",
                       formatter_class=_Formatter)
    p.add_argument("--methods", type=_methods, default=list(L.PAPER_METHODS),
                   help="comma-separated subset of " + ",".join(L.LEARNERS))
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


def resolve_task_args(args) -> None:
    """Fill the task-dependent defaults of --setting / --model / --pool-size and check them."""
    kind = TASK_KINDS[args.task]
    if kind != "ratings" and getattr(args, "resample", False):
        raise SystemExit(f"amaml-ext: argument --resample: only for the rating tasks, not --task {args.task}")
    if kind == "images":
        if args.setting is not None:
            raise SystemExit(f"amaml-ext: argument --setting: not used by --task {args.task} (use --ways/--shots/"
                             f"--query-shots), got {args.setting!r}")
        if args.model is not None:
            raise SystemExit(f"amaml-ext: argument --model: --task {args.task} uses Conv4 (set --channels), "
                             f"got {args.model!r}")
        args.pool_size = args.pool_size or 600
        return
    if any(v is not None for v in (args.ways, args.shots, args.query_shots)):
        raise SystemExit(f"amaml-ext: arguments --ways/--shots/--query-shots: only for the image tasks, "
                         f"not --task {args.task}")
    allowed = tasks.SETTINGS if kind == "synthetic" else RATING_SETTINGS
    args.setting = args.setting or DEFAULT_SETTING[kind]
    if args.setting not in allowed:
        raise SystemExit(f"amaml-ext: argument --setting: --task {args.task} takes one of {sorted(allowed)}, "
                         f"got {args.setting!r}")
    args.model = args.model or ("mlp32" if kind == "synthetic" else "mlp40")
    if kind == "ratings" and args.pool_size is not None:
        raise SystemExit(f"amaml-ext: argument --pool-size: not used by --task {args.task} (every kept user is a "
                         f"task; 100 are held out for testing), got {args.pool_size}")
    if kind == "synthetic":
        args.pool_size = args.pool_size or 100


def run_config(args, method: str) -> Dict:
    """The JSON-able settings that define a training run (stored in config.json)."""
    kind = TASK_KINDS[args.task]
    cfg = {"method": method, "task": args.task, "kind": kind, "pool_seed": args.pool_seed,
           "inner_lr": args.inner_lr, "dtype": args.dtype, "device": str(args.device),
           # meta-test adaptation length, the same for every method (the paper: the inner steps)
           "test_steps": args.inner_steps}
    if kind == "synthetic":
        shots, val = tasks.SETTINGS[args.setting]
        cfg.update(setting=args.setting, shots=shots, val=val, model=args.model, pool_size=args.pool_size)
    elif kind == "ratings":
        cfg.update(setting=args.setting, model=args.model, data_root=args.data_root)
        if args.resample:          # only when set: runs made before the flag existed still resume
            cfg["resample"] = True
    else:
        cfg.update(ways=args.ways, shots=args.shots, query_shots=args.query_shots, channels=args.channels,
                   test_tasks=args.pool_size, data_root=args.data_root)
        if (args.activation, args.pool) != ("relu", "max"):  # only when set: older runs still resume
            cfg.update(activation=args.activation, pool=args.pool)
    if method == "amaml":
        cfg.update(T=args.inner_steps * args.inner_lr, solver=args.solver, adjoint=args.adjoint,
                   memory=args.memory, rtol=args.rtol, atol=args.atol, compile=args.compile)
    elif method in ("maml", "anil"):
        cfg["inner_steps"] = args.maml_steps
    elif method == "maml1":
        cfg["inner_steps"] = 1
    else:
        cfg["inner_steps"] = args.inner_steps
    if method == "imaml":
        cfg.update(imaml_lambda=args.imaml_lambda, cg_steps=args.cg_steps)
    return cfg


_DATASETS: Dict = {}


def _dataset(task: str, root: Optional[str]):
    """The (cached) real dataset of --task, read from ``root`` (or $AMAML_DATA_ROOT)."""
    key = (task, root)
    if key not in _DATASETS:
        try:
            if TASK_KINDS[task] == "ratings":
                from .ratings import make_rating_dataset
                _DATASETS[key] = make_rating_dataset(task, root)
            else:
                from . import images
                _DATASETS[key] = images.Omniglot(root) if task == "omniglot" else images.MiniImageNet(root)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"amaml-ext: --task {task}: {e}") from None
    return _DATASETS[key]


class Problem:
    """Task family, pools, model, loss and metric of a configuration."""

    def __init__(self, cfg: Dict, device: torch.device, data_root: Optional[str] = None):
        self.cfg = cfg
        self.device = device
        self.dtype = DTYPES[cfg["dtype"]]
        kind = cfg.get("kind", "synthetic")
        self.kind = kind
        self.loss, self.metric = F.mse_loss, "nrmse"
        root = data_root or cfg.get("data_root")
        if kind == "synthetic":
            self.family = tasks.make_family(cfg["task"], cfg["shots"], cfg["val"])
            self.train_pool, self.test_pool = tasks.train_test_pools(self.family, cfg["pool_size"], cfg["pool_size"],
                                                                     seed=cfg["pool_seed"])
            self.in_dim = self.family.in_dim
        elif kind == "ratings":
            self.family = _dataset(cfg["task"], root)
            self.train_pool, self.test_pool = self.family.pools(cfg["setting"], seed=cfg["pool_seed"],
                                                                resample=cfg.get("resample", False))
            self.in_dim = self.family.in_dim
        else:
            from .images import EpisodePool
            self.family = _dataset(cfg["task"], root)
            kw = dict(ways=cfg["ways"], shots=cfg["shots"], query_shots=cfg["query_shots"])
            try:
                self.train_pool = EpisodePool(self.family, "train", seed=cfg["pool_seed"], **kw)
                self.test_pool = EpisodePool(self.family, "test", size=cfg["test_tasks"], seed=cfg["pool_seed"] + 1, **kw)
            except ValueError as e:
                raise SystemExit(f"amaml-ext: --task {cfg['task']}: {e}") from None
            self.loss, self.metric = F.cross_entropy, "accuracy"

    def model(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        if self.kind == "images":
            c, side = self.family.image_shape[0], self.family.image_shape[-1]
            net = models.Conv4(ways=self.train_pool.ways, in_channels=c, channels=self.cfg["channels"], image_size=side,
                               activation=self.cfg.get("activation", "relu"), pool=self.cfg.get("pool", "max"))
        else:
            width = 32 if self.cfg["model"] == "mlp32" else 40
            net = models.mlp(in_dim=self.in_dim, width=width)
        return net.to(device=self.device, dtype=self.dtype)


def make_run_learner(cfg: Dict, model, loss, accuracy: Optional[Dict] = None) -> L.MetaLearner:
    """The learner of a run; ``accuracy`` (A-MAML: error_tol, strict, refine) is not part of the
    run's settings, so it may change when a run is resumed."""
    m = cfg["method"]
    if m == "amaml":
        steps = round(cfg["T"] / cfg["inner_lr"])
        return L.make_learner("amaml", model, loss, inner_steps=steps, inner_lr=cfg["inner_lr"],
                              solver=cfg["solver"], adjoint=cfg["adjoint"], memory=cfg["memory"],
                              rtol=cfg["rtol"], atol=cfg["atol"], compile=cfg["compile"], **(accuracy or {}))
    return L.make_learner(m, model, loss, inner_steps=cfg["inner_steps"], maml_steps=cfg["inner_steps"],
                          inner_lr=cfg["inner_lr"], imaml_lambda=cfg.get("imaml_lambda", 1.0),
                          cg_steps=cfg.get("cg_steps", 5))


def train_one(args, method: str, out: str, resume: bool) -> torch.Tensor:
    cfg = run_config(args, method)
    prob = Problem(cfg, args.device, args.data_root)
    model = prob.model(args.seed)
    acc = {"error_tol": args.error_tol, "strict": args.strict, "refine": args.refine} if method == "amaml" else None
    learner = make_run_learner(cfg, model, prob.loss, acc)
    return meta_train(learner, prob.train_pool, meta_steps=args.meta_steps, out_dir=out, meta_batch=args.meta_batch,
                      lr=args.lr, seed=args.seed, resume=resume, checkpoint_every=args.checkpoint_every,
                      device=args.device, dtype=prob.dtype, config=cfg, progress=not args.quiet)


def evaluate_run(run: str, test_steps: Optional[int], device: Optional[torch.device] = None,
                 quiet: bool = False, data_root: Optional[str] = None) -> Dict:
    cfg_path = os.path.join(run, CONFIG)
    if not os.path.exists(cfg_path):
        raise SystemExit(f"amaml-ext: argument --run: {run!r} has no {CONFIG}; is it a directory written by 'train'?")
    cfg = read_json_file(cfg_path, "the run's settings")
    theta_path = os.path.join(run, THETA)
    if not os.path.exists(theta_path):
        ck = load_checkpoint(run)
        at = f"it stopped at meta-step {ck['step']} of {cfg.get('meta_steps')}" if ck else "no checkpoint either"
        raise SystemExit(f"amaml-ext: argument --run: {run!r} has no {THETA} ({at}); finish it with "
                         f"'amaml-ext train ... --out {run} --resume'")
    device = device or _device(cfg.get("device", "cpu"))
    prob = Problem(cfg, device, data_root)
    model = prob.model(0)
    theta = read_torch_file(theta_path, "the learned theta")
    if not isinstance(theta, torch.Tensor):
        raise UnreadableRunFile(f"{theta_path} (the learned theta) is unreadable: it holds a {type(theta).__name__}, "
                                f"not a tensor. It was left as it is")
    theta = theta.to(device=device, dtype=prob.dtype)
    if theta.numel() != flatten_params(model).numel():
        raise SystemExit(f"amaml-ext: {theta_path} holds {theta.numel()} parameters, the model {cfg['model']} "
                         f"has {flatten_params(model).numel()}")
    steps = cfg["test_steps"] if test_steps is None else test_steps
    batch = prob.test_pool.all(device=device, dtype=prob.dtype)
    t0 = time.perf_counter()
    mask = L.head_mask(model) if cfg["method"] == "anil" else None      # ANIL adapts the head only
    curve = meta_test(model, prob.loss, theta, batch, steps=steps, lr=cfg["inner_lr"], metric=prob.metric,
                      adapt_mask=mask)
    curve.update(method=cfg["method"], test_tasks=batch.size, test_steps=steps, seconds=time.perf_counter() - t0)
    with open(os.path.join(run, EVAL), "w") as f:
        json.dump(curve, f, indent=1)
    compare_plot({cfg["method"]: curve}, os.path.join(run, "eval.png"),
                 f"{cfg['task']}: {cfg['method']}, {batch.size} test tasks, {steps} GD steps of {cfg['inner_lr']:g}")
    if not quiet:
        if prob.metric == "accuracy":
            print(f"{cfg['method']}: meta-test accuracy over {batch.size} test tasks after {steps} steps: "
                  f"{100 * curve['mean'][-1]:.2f} ± {100 * curve['ci95'][-1]:.2f}% (95% CI)")
        else:
            print(f"{cfg['method']}: meta-test nRMSE over {batch.size} test tasks: step 0 {curve['mean'][0]:.4f}, "
                  f"step {steps} {curve['mean'][-1]:.4f} ± {curve['std'][-1]:.4f}")
    return curve


# ---- compare outputs ----------------------------------------------------------------------------

LABELS = {"amaml": "A-MAML", "maml": "MAML", "maml1": "MAML-1", "anil": "ANIL", "fomaml": "FOMAML", "reptile": "Reptile",
          "imaml": "iMAML"}


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


def paired_table(curves: Dict[str, Dict], ref: str = "amaml") -> str:
    """Per-task paired differences at the last meta-test step: ``ref`` minus each other method,
    mean with its 95% confidence interval (t ~ 1.96), and on how many tasks ``ref`` is better.
    The methods are tested on the same tasks, so the paired interval is much tighter than the
    spread over tasks."""
    if ref not in curves or len(curves) < 2:
        return ""
    acc = curves[ref].get("metric") == "accuracy"
    a = torch.tensor(curves[ref]["final"], dtype=torch.float64)
    lines = [f"| {LABELS.get(ref, ref)} minus | mean difference ± 95% CI | {LABELS.get(ref, ref)} better on |",
             "|---|---|---|"]
    for m, c in curves.items():
        if m == ref:
            continue
        d = a - torch.tensor(c["final"], dtype=torch.float64)
        n = d.numel()
        half = 1.96 * float(d.std()) / math.sqrt(n) if n > 1 else float("nan")
        better = int((d > 0).sum()) if acc else int((d < 0).sum())
        scale, unit = (100, " pp") if acc else (1, "")
        lines.append(f"| {LABELS.get(m, m)} | {scale * float(d.mean()):+.4f} ± {scale * half:.4f}{unit} | {better}/{n} tasks |")
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
        curve = evaluate_run(run, args.test_steps, args.device, quiet=args.quiet, data_root=args.data_root)
        curve["train_seconds"] = sum(r["seconds"] for r in rows)
        curve["wall_seconds_this_call"] = time.perf_counter() - t0
        curves[method] = curve
    what = args.setting
    if TASK_KINDS[args.task] == "images":
        prob = Problem(run_config(args, args.methods[0]), args.device, args.data_root)
        what = f"{prob.train_pool.ways}-way {prob.train_pool.shots}-shot"
    n_test = next(iter(curves.values()))["test_tasks"]
    title = (f"{args.task}, {what}: {args.meta_steps} meta-steps, inner {args.inner_steps} steps "
             f"(MAML {args.maml_steps}), {n_test} test tasks")
    plot_title = (f"{args.task} {what}, {args.meta_steps} meta-steps\n"
                  f"inner {args.inner_steps} GD steps (MAML {args.maml_steps}, MAML-1 1), {n_test} test tasks")
    compare_plot(curves, os.path.join(args.out, "compare.png"), plot_title)
    table = compare_table(curves)
    paired = paired_table(curves)
    if paired:
        table += ("\n\nPaired per-task differences at the last step (the same test tasks for every method):\n\n"
                  + paired)
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        measure = {"images": "Test accuracy (mean ± 95% confidence interval over the test tasks)",
                   "ratings": "Test nRMSE on each test user's remaining ratings (mean ± std over the test tasks)",
                   }.get(TASK_KINDS[args.task], "Test nRMSE (mean ± std over the test tasks)")
        f.write(f"# {title}\n\n{measure} after meta-test GD steps (step {args.inner_lr:g}); last column: "
                f"meta-training seconds.\n\n{table}\n")
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump({"args": {k: (v if isinstance(v, (int, float, str, list, bool, type(None))) else str(v))
                            for k, v in vars(args).items()}, "curves": curves}, f, indent=1)
    print(f"\n{title}\n\n{table}\n\nwrote {os.path.join(args.out, 'compare.png')}, compare.md, compare.json")
    return curves


# ---- entry point --------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except RunFileError as e:
        raise SystemExit(f"amaml-ext: {e}") from None


def _main(args) -> int:
    if args.command == "evaluate":
        evaluate_run(args.run, args.test_steps, _device(args.device) if args.device else None, args.quiet)
        return 0
    args.device = _device(args.device)
    resolve_task_args(args)
    if TASK_KINDS[args.task] == "synthetic" and args.meta_batch > args.pool_size:
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
    except (RunConfigMismatch, AdjointAccuracyError, FloatingPointError) as e:
        raise SystemExit(f"amaml-ext: {e}") from None
    except KeyboardInterrupt as e:
        print(f"\namaml-ext: {e or 'interrupted'}", file=sys.stderr)
        return 143 if "SIGTERM" in str(e) else 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
