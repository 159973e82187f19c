"""Runs of the command: a run's settings (config.json), its task problem and learner, training
one method and meta-testing a finished run."""

import json
import os
import time
from contextlib import contextmanager
from typing import Dict, Optional, Sequence, Tuple

import torch

from .. import learners as L
from .. import ode
from ..train.benchmarks import BENCHMARKS
from ..functional import flatten_params
from ..train import CONFIG, THETA, UnreadableRunFile, load_checkpoint, meta_test, meta_train, read_json_file, read_torch_file
from ..train.io import atomic_write_bytes, check_writable, lock_run_dir, unlock_run_dir
from .options import COMPILE_MODES, DTYPES, device_of
from .report import compare_plot

EVAL = "eval.json"
EVAL_PLOT = "eval.png"


def run_config(args, method: str) -> Dict:
    """The JSON-able settings that define a training run (stored in config.json)."""
    bench = BENCHMARKS[args.task]
    cfg = {"method": method, "task": args.task, "kind": bench.kind, "pool_seed": args.pool_seed,
           "inner_lr": args.inner_lr, "dtype": args.dtype, "device": str(args.device),
           # meta-test adaptation length, the same for every method (the paper: the inner steps)
           "test_steps": args.inner_steps}
    cfg.update(bench.config(**vars(args)))
    if L.METHODS[method].flow:
        cfg.update(T=args.inner_steps * args.inner_lr, solver=args.solver, adjoint=args.adjoint,
                   memory=args.memory, rtol=args.rtol, atol=args.atol)
    else:
        cfg["inner_steps"] = L.method_steps(method, args.inner_steps, args.maml_steps)
    cfg.update({opt: getattr(args, opt) for opt in L.METHODS[method].options})
    return cfg


class RunProblem:
    """The benchmark of a run's settings: its pools, model, loss and metric, on a device and dtype."""

    def __init__(self, cfg: Dict, device: torch.device, data_root: Optional[str] = None):
        self.cfg, self.device, self.dtype = cfg, device, DTYPES[cfg["dtype"]]
        self.bench = BENCHMARKS[cfg["task"]]
        self.kind, self.loss, self.metric = self.bench.kind, self.bench.loss, self.bench.metric
        try:
            self.family, self.train_pool, self.test_pool = self.bench.pools(cfg, data_root or cfg.get("data_root"))
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"amaml-ext: --task {cfg['task']}: {e}") from None

    def model(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        net = self.bench.model(self.cfg, self.family, self.train_pool)
        return net.to(device=self.device, dtype=self.dtype)


def make_run_learner(cfg: Dict, model, loss, accuracy: Optional[Dict] = None) -> L.MetaLearner:
    """The learner of a run; ``accuracy`` (A-MAML: error_tol, strict, refine, compile) is not part
    of the run's settings, so it may change when a run is resumed."""
    m = cfg["method"]
    if L.METHODS[m].flow:
        steps = ode.grid_size(cfg["T"], cfg["inner_lr"])
        return L.make_learner(m, model, loss, inner_steps=steps, inner_lr=cfg["inner_lr"],
                              solver=cfg["solver"], adjoint=cfg["adjoint"], memory=cfg["memory"],
                              rtol=cfg["rtol"], atol=cfg["atol"], **(accuracy or {}))
    options = {opt: cfg[opt] for opt in L.METHODS[m].options if opt in cfg}
    return L.make_learner(m, model, loss, inner_steps=cfg["inner_steps"], maml_steps=cfg["inner_steps"],
                          inner_lr=cfg["inner_lr"], **options)


def accuracy_options(args, method: str) -> Optional[Dict]:
    """The options of ``method``'s learner that are not run settings (A-MAML's accuracy and
    compile options; None for the others)."""
    return ({"error_tol": args.error_tol, "strict": args.strict, "refine": args.refine,
             "compile": COMPILE_MODES[args.compile], "memory_budget": getattr(args, "memory_budget", None)}
            if L.METHODS[method].flow else None)


@contextmanager
def locked(dirs: Sequence[str], distributed=None, writable: Optional[Tuple] = None, create: bool = True,
           option: str = "--out"):
    """Hold the locks of the run directories ``dirs`` (:func:`~amaml_ext.train.io.lock_run_dir`;
    made if ``create``; a refusal names ``option``), then check that ``writable`` = ``(directory,
    names)`` can be written; on rank 0 alone under torchrun (its refusal raised on every rank)."""
    held = []

    def take():
        for d in dirs:
            lock_run_dir(d, create, option)
            held.append(d)
        if writable is not None:
            check_writable(*writable, option)
    try:
        if distributed is None:
            take()
        else:
            distributed.on_main(take, "locking the run directories (rank 0)")
        yield
    finally:
        for d in reversed(held):
            unlock_run_dir(d)


def train_one(args, method: str, out: str, resume: bool) -> torch.Tensor:
    cfg = run_config(args, method)
    prob = RunProblem(cfg, args.device, args.data_root)
    model = prob.model(args.seed)
    learner = make_run_learner(cfg, model, prob.loss, accuracy_options(args, method))
    return meta_train(learner, prob.train_pool, meta_steps=args.meta_steps, out_dir=out, meta_batch=args.meta_batch,
                      lr=args.lr, seed=args.seed, resume=resume, checkpoint_every=args.checkpoint_every,
                      device=args.device, dtype=prob.dtype, config=cfg, progress=not args.quiet,
                      distributed=getattr(args, "distributed", None), clip_grad_norm=args.clip_grad_norm)


def _checked_config(cfg, path: str) -> Dict:
    """A run's config.json as evaluate reads it: an object naming a known task, method and dtype,
    with the settings the meta-test needs; else UnreadableRunFile naming what is wrong."""
    def bad(what):
        return UnreadableRunFile(f"{path} (the run's settings) is damaged: {what}. It was left as it is")
    for key, allowed in (("task", BENCHMARKS), ("method", L.METHODS), ("dtype", DTYPES)):
        if cfg.get(key) not in allowed:
            raise bad(f"'{key}' is {cfg.get(key)!r}, not one of {sorted(allowed)}")
    needed = ["inner_lr", "test_steps"] + (["T", "solver", "adjoint", "memory", "rtol", "atol"]
                                           if L.METHODS[cfg["method"]].flow else ["inner_steps"])
    missing = [k for k in needed if k not in cfg]
    if missing:
        raise bad(f"it lacks {', '.join(missing)}")
    return cfg


def evaluate_run(run: str, test_steps: Optional[int], device: Optional[torch.device] = None,
                 quiet: bool = False, data_root: Optional[str] = None, distributed=None) -> Dict:
    """Meta-test the run in ``run`` (its test tasks split over the ranks with ``distributed``;
    rank 0 writes eval.json and eval.png). The run directory is locked, and checked writable,
    before any work."""
    cfg_path = os.path.join(run, CONFIG)
    if not os.path.exists(cfg_path):
        raise SystemExit(f"amaml-ext: argument --run: {run!r} has no {CONFIG}; is it a directory written by 'train'?")
    cfg = _checked_config(read_json_file(cfg_path, "the run's settings"), cfg_path)
    theta_path = os.path.join(run, THETA)
    if not os.path.exists(theta_path):
        ck = load_checkpoint(run)
        at = f"it stopped at meta-step {ck['step']} of {cfg.get('meta_steps')}" if ck else "no checkpoint either"
        raise SystemExit(f"amaml-ext: argument --run: {run!r} has no {THETA} ({at}); finish it with "
                         f"'amaml-ext train ... --out {run} --resume'")
    with locked([run], distributed, writable=(run, (EVAL, EVAL_PLOT)), create=False, option="--run"):
        curve, title = _meta_test_run(run, cfg, theta_path, test_steps, device, data_root, distributed)
        if distributed is not None and not distributed.is_main:
            return curve
        atomic_write_bytes(os.path.join(run, EVAL), json.dumps(curve, indent=1).encode())
        compare_plot({cfg["method"]: curve}, os.path.join(run, EVAL_PLOT), title)
    if not quiet:
        steps, n = curve["test_steps"], curve["test_tasks"]
        if curve.get("metric") == "accuracy":
            print(f"{cfg['method']}: meta-test accuracy over {n} test tasks after {steps} steps: "
                  f"{100 * curve['mean'][-1]:.2f} ± {100 * curve['ci95'][-1]:.2f}% (95% CI)")
        else:
            print(f"{cfg['method']}: meta-test nRMSE over {n} test tasks: step 0 {curve['mean'][0]:.4f}, "
                  f"step {steps} {curve['mean'][-1]:.4f} ± {curve['std'][-1]:.4f}")
    return curve


def _meta_test_run(run: str, cfg: Dict, theta_path: str, test_steps: Optional[int], device, data_root,
                   distributed) -> Tuple[Dict, str]:
    """The meta-test curve of a finished run, and its plot's title."""
    device = device or device_of(cfg.get("device", "cpu"))
    prob = RunProblem(cfg, device, data_root)
    model = prob.model(0)
    theta = read_torch_file(theta_path, "the learned theta")
    if not isinstance(theta, torch.Tensor):
        raise UnreadableRunFile(f"{theta_path} (the learned theta) is unreadable: it holds a {type(theta).__name__}, "
                                f"not a tensor. It was left as it is")
    theta = theta.to(device=device, dtype=prob.dtype)
    learner = make_run_learner(cfg, model, prob.loss)
    if theta.numel() != learner.d + learner.extra:
        raise SystemExit(f"amaml-ext: {theta_path} holds {theta.numel()} parameters, the model {cfg.get('model')} "
                         f"has {flatten_params(model).numel()}" + (f" (+ {learner.extra} of {cfg['method']})"
                                                                   if learner.extra else ""))
    steps = cfg["test_steps"] if test_steps is None else test_steps
    batch = prob.test_pool.all(device=device, dtype=prob.dtype)
    t0 = time.perf_counter()
    init, scale = learner.test_adaptation(theta)        # learned step sizes scale the test GD step
    lr = cfg["inner_lr"] if scale is None else cfg["inner_lr"] * scale
    curve = meta_test(model, prob.loss, init, batch, steps=steps, lr=lr, metric=prob.metric,
                      adapt_mask=learner.adapt_mask, distributed=distributed)   # ANIL adapts the head only
    curve.update(method=cfg["method"], test_tasks=batch.size, test_steps=steps, seconds=time.perf_counter() - t0)
    if hasattr(learner, "horizon"):
        curve["learned_T"] = learner.horizon(theta)
    return curve, f"{cfg['task']}: {cfg['method']}, {batch.size} test tasks, {steps} GD steps of {cfg['inner_lr']:g}"
