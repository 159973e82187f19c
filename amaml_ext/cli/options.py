"""The command's options: argparse types, the parser, and the task-dependent defaults read from
the benchmark registry."""

import argparse
import math
import sys
from typing import List

import torch

from .. import learners as L
from .. import models
from ..train.benchmarks import BENCHMARKS
from ..data.settings import RATING_SETTINGS, SYNTHETIC_SETTINGS
from ..metagrad import MEMORY_MODES
from ..ode import ADJOINT_METHODS, FORWARD_METHODS

DTYPES = {"float32": torch.float32, "float64": torch.float64}
COMPILE_MODES = {"auto": "auto", "on": True, "off": False}


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


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _bytes(text: str) -> int:
    """An argparse type: a number of bytes, with an optional K, M, G or T (binary) suffix."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS and t[-1:] else ""
    v = _number(float, 0.0, "a positive number of bytes (e.g. 8G, 512M)")(t[:len(t) - len(unit)] or text)
    return int(v * _UNITS[unit])


def _tolerance(text: str) -> float:
    """An argparse type: dopri5's rtol / atol, a number in (0, 1)."""
    v = _number(float, 0.0, "a number in (0, 1) (dopri5's tolerance)")(text)
    if not v < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1) (dopri5's tolerance), got {text!r}")
    return v


def _methods(text: str) -> List[str]:
    ms = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in ms if m not in L.LEARNERS]
    if bad or not ms:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(L.LEARNERS)}, got {text!r}")
    return list(dict.fromkeys(ms))


def _add_problem_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tasks and model")
    g.add_argument("--task", choices=list(BENCHMARKS), default="cosmixture",
                   help="task family: synthetic regression (cosmixture, alpine), collaborative filtering "
                        "(movielens-100k, movielens-1m, jester) or few-shot images (omniglot, miniimagenet)")
    g.add_argument("--setting", choices=sorted(SYNTHETIC_SETTINGS) + sorted(RATING_SETTINGS), default=None,
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
    g.add_argument("--memory", choices=MEMORY_MODES, default="auto",
                   help="A-MAML memory plan: auto (the fastest that fits --memory-budget), linearise (keep the "
                        "states and as many linearisations as fit), store (the states), checkpoint (about 2 sqrt(N) "
                        "states)")
    g.add_argument("--memory-budget", type=_bytes, default=None,
                   help="A-MAML: bytes the plan may use (e.g. 8G; default: half the free GPU memory, a quarter "
                        "of the RAM)")
    g.add_argument("--rtol", type=_tolerance, default=1e-6, help="A-MAML dopri5 rtol")
    g.add_argument("--atol", type=_tolerance, default=1e-8, help="A-MAML dopri5 atol")
    g.add_argument("--compile", nargs="?", const="on", default="auto", choices=COMPILE_MODES,
                   help="A-MAML: torch.compile the model callbacks: on, off, or auto (where it pays: dense "
                        "models on the CPU; compiled once per model and shape, cached on disk across runs)")
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
    g.add_argument("--clip-grad-norm", type=_positive_float, default=None, metavar="C",
                   help="rescale each meta-gradient to a 2-norm of at most C before the Adam step (default: no clipping)")
    g.add_argument("--seed", type=int, default=0, help="seeds the initial theta and the task draws")
    g.add_argument("--checkpoint-every", type=_positive_int, default=50, help="meta-steps between checkpoints")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_dist_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dist-timeout", type=_positive_float, default=None,
                   help="under torchrun: seconds a rank waits for the others before it fails (default: "
                        "AMAML_DIST_TIMEOUT or 600)")
    p.add_argument("--tasks-per-call", type=_positive_int, default=1,
                   help="under torchrun: tasks per meta-gradient call (fixed groups split over the ranks; the "
                        "result depends on it by rounding, not on the number of processes)")


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
                                 formatter_class=_Formatter, epilog=_plain(sys.modules[__package__].__doc__))
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="meta-train one method; writes OUT/theta.pt and checkpoints",
                       formatter_class=_Formatter)
    p.add_argument("--method", choices=list(L.LEARNERS), required=True)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    _add_problem_args(p)
    _add_dist_args(p)
    p = sub.add_parser("evaluate", help="meta-test a trained run: curves -> RUN/eval.json and RUN/eval.png",
                       formatter_class=_Formatter)
    p.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="a run directory written by 'train' (under torchrun: --run-dir)")
    _add_eval_args(p)
    p.add_argument("--device", default=None, help="default: the run's device")
    p.add_argument("--quiet", action="store_true")
    _add_dist_args(p)
    p = sub.add_parser("compare", help="train several methods on the same tasks; plot and table",
                       formatter_class=_Formatter)
    p.add_argument("--methods", type=_methods, default=list(L.PAPER_METHODS),
                   help="comma-separated subset of " + ",".join(L.LEARNERS))
    p.add_argument("--out", required=True, help="output directory (one run per method inside)")
    _add_problem_args(p)
    _add_eval_args(p)
    _add_dist_args(p)
    return ap


# ---- building runs from settings --------------------------------------------------------------

def device_of(text: str) -> torch.device:
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise SystemExit(f"amaml-ext: argument --device: expected cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"amaml-ext: argument --device: {text!r} requested but no CUDA device is available")
    return dev


def resolve_task_args(args) -> None:
    """Fill the task-dependent defaults of --setting / --model / --pool-size and check them."""
    bench = BENCHMARKS[args.task]
    if not bench.resample and getattr(args, "resample", False):
        raise SystemExit(f"amaml-ext: argument --resample: only for the rating tasks, not --task {args.task}")
    if not bench.episodes and any(v is not None for v in (args.ways, args.shots, args.query_shots)):
        raise SystemExit(f"amaml-ext: arguments --ways/--shots/--query-shots: only for the image tasks, "
                         f"not --task {args.task}")
    if not bench.settings and args.setting is not None:
        raise SystemExit(f"amaml-ext: argument --setting: not used by --task {args.task} (use --ways/--shots/"
                         f"--query-shots), got {args.setting!r}")
    if bench.default_model is None and args.model is not None:
        raise SystemExit(f"amaml-ext: argument --model: --task {args.task} uses Conv4 (set --channels), "
                         f"got {args.model!r}")
    if bench.settings:
        args.setting = args.setting or bench.default_setting
        if args.setting not in bench.settings:
            raise SystemExit(f"amaml-ext: argument --setting: --task {args.task} takes one of {sorted(bench.settings)}, "
                             f"got {args.setting!r}")
        args.model = args.model or bench.default_model
    if bench.default_pool_size is None and args.pool_size is not None:
        raise SystemExit(f"amaml-ext: argument --pool-size: not used by --task {args.task} (every kept user is a "
                         f"task; 100 are held out for testing), got {args.pool_size}")
    args.pool_size = args.pool_size or bench.default_pool_size
    if bench.trains_on_pool_size and args.meta_batch > args.pool_size:
        raise SystemExit(f"amaml-ext: argument --meta-batch: must be at most --pool-size {args.pool_size}, "
                         f"got {args.meta_batch}")
