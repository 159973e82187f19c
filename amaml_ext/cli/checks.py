"""What the command checks before it writes anything: the environment, every method's options
(its learner built as the run will build it) and the first meta-step of each run that starts
afresh; and how it ends on an error (:class:`CommandError`: a one-line message, exit status 2
for a refusal)."""

import math
import re
import sys
import warnings
from typing import Dict, List, Optional

import torch

from .. import learners as L
from .. import ode
from ..metagrad.accuracy import lambda_max, stability_bound
from ..functional.compile_policy import compile_env
from ..data.batch import task_indices
from ..functional import TaskFunctions, flatten_params
from ..train.loop import clip_scale, too_large_for_adam
from .runs import RunProblem, accuracy_options, make_run_learner, run_config


class CommandError(SystemExit):
    """The command's end on an error: ``str(e)`` is its one-line message, ``code`` the exit status
    (2: an option or a run directory refused, as argparse does; 1: a run that failed)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def ending(e: BaseException) -> SystemExit:
    """The exit for ``e`` (a SystemExit, or an error of the run files): its message printed on
    stderr, as a :class:`CommandError` (status 2 unless it says otherwise); argparse's own exits
    (an int status, its message already printed) as they are."""
    if isinstance(e, SystemExit) and not isinstance(e, CommandError) and not isinstance(e.code, str):
        return e
    message = str(e) if isinstance(e, SystemExit) else f"amaml-ext: {e}"
    print(message, file=sys.stderr)
    return CommandError(message, e.code if isinstance(e, CommandError) else 2)


_OPTIONS = {"inner_lr": "--inner-lr", "h": "--inner-lr", "T": "--inner-steps x --inner-lr", "steps": "--inner-steps",
            "lam": "--imaml-lambda", "cg_steps": "--cg-steps", "solver": "--solver", "adjoint": "--adjoint",
            "memory": "--memory", "rtol": "--rtol", "atol": "--atol", "error_tol": "--error-tol",
            "strict": "--strict", "refine": "--refine", "compile": "--compile", "memory_budget": "--memory-budget"}
"""The command's option for each keyword of a learner or of ``adjoint_meta_grad``."""


def as_options(message: str) -> str:
    """A library message with ``argument 'x'`` written as the command's option for ``x``."""
    return re.sub(r"argument '(\w+)'", lambda m: f"argument {_OPTIONS.get(m.group(1), repr(m.group(1)))}", message)


def check_environment() -> None:
    """``$AMAML_EXT_COMPILE`` (read lazily by the callbacks) checked now."""
    try:
        compile_env()
    except ValueError as e:
        raise CommandError(f"amaml-ext: {e}") from None


def _exact(adjoint) -> bool:
    """Whether ``adjoint`` names an exact adjoint (the registry's ``exact_for``)."""
    scheme = ode.ADJOINT_SCHEMES.get(adjoint)
    return scheme is not None and scheme.exact_for is not None


def check_methods(args, fresh: Dict[str, bool]) -> None:
    """Build the learner of every method of ``fresh`` with the run's options (they are checked as
    the run would meet them) and make the first meta-step of each run that starts afresh
    (``fresh[method]``): refusals name the option; nothing is written."""
    prob = RunProblem(run_config(args, next(iter(fresh))), args.device, args.data_root)
    model = prob.model(args.seed)
    for method, starts in fresh.items():
        cfg = run_config(args, method)
        if callable(getattr(L.METHODS[method].cls, "horizon", None)) and _exact(cfg.get("adjoint")):
            raise CommandError(f"amaml-ext: argument --adjoint: --method {method} learns the horizon T, which needs "
                               f"a continuous adjoint ({ode.continuous_adjoints()}), got {cfg['adjoint']!r} (exact mode: K = T / h "
                               f"GD steps, whose number has no derivative)")
        try:
            make_run_learner(cfg, model, prob.loss, accuracy_options(args, method))
        except (ValueError, TypeError) as e:
            raise CommandError(f"amaml-ext: --method {method}: {as_options(str(e))}") from None
        if starts:
            first_step(args, method, cfg, prob, model)


def first_step(args, method: str, cfg: Dict, prob: RunProblem, model) -> None:
    """The meta-gradient of meta-step 0's tasks at the initial theta (eager, without the strict
    stop, with --refine as given, warnings silenced; under torchrun in groups of --tasks-per-call, as a rank takes them):
    what the run's first step meets. One that fails, is not finite or is too large for Adam (as
    ``meta_train`` checks it) is refused before any file is written, naming --inner-lr where the
    step size is past its stability bound there."""
    acc = accuracy_options(args, method)
    learner = make_run_learner(cfg, model, prob.loss, acc and dict(acc, strict=False, compile=False))
    pool = prob.train_pool
    idx = task_indices(args.seed, 0, len(pool), args.meta_batch)
    draw = getattr(pool, "draw", None)
    batch = (draw(idx, step=0, seed=args.seed, device=prob.device, dtype=prob.dtype) if draw is not None
             else pool.batch(idx, device=prob.device, dtype=prob.dtype))
    theta = learner.meta_params(flatten_params(model)).to(device=prob.device, dtype=prob.dtype)
    group = batch.size if args.distributed is None else args.tasks_per_call
    why = ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for a in range(0, batch.size, group):
            part = batch if group >= batch.size else batch.select(slice(a, a + group))
            try:
                out = learner.meta_grad(theta, part)
                if not (bool(torch.isfinite(out.grad).all()) and bool(torch.isfinite(out.query_loss).all())):
                    why = "its meta-gradient or query loss is not finite"
                elif (big := too_large_for_adam(out.grad, prob.dtype, clip_scale(
                        float(out.grad.double().norm()), getattr(args, "clip_grad_norm", None)))):
                    why = (f"its meta-gradient is finite but too large for Adam in {prob.dtype} (largest entry "
                           f"{big:.3g}); clip it (--clip-grad-norm) or train in float64")
            except (ValueError, TypeError, FloatingPointError) as e:
                why = str(e)
            if why:
                break
    where = f"the first meta-step of --method {method} (tasks {idx.tolist()})"
    unstable = unstable_step(learner, cfg, part, theta)          # the failing group (else the last)
    if not why:
        if unstable is not None and (args.distributed is None or args.distributed.is_main):
            print(f"amaml-ext: warning: argument --inner-lr: {unstable}; {where} stays finite, but the "
                  f"inner training is unstable there", file=sys.stderr)
        return
    if unstable is not None:
        raise CommandError(f"amaml-ext: argument --inner-lr: {where} fails: {unstable}. Nothing was written")
    raise CommandError(f"amaml-ext: --method {method}: {where} fails: {as_options(why)}. Nothing was written")


def unstable_step(learner, cfg: Dict, batch, theta: torch.Tensor) -> Optional[str]:
    """Why the inner step size ``h`` (--inner-lr) is unstable at ``theta``, if it is: ``h *
    lambda_max`` of the training loss's Hessian (power iteration) past the stability bound of
    what steps by ``h`` (GD; A-MAML's fixed-step forward or adjoint); else None."""
    fns = TaskFunctions(learner.model, learner.loss, batch.support, batch.query, True)
    u, mask = theta[:learner.d].expand(batch.size, -1).contiguous(), learner.adapt_mask
    if mask is None:
        hvp = lambda v: fns.hvp(u, v)                                           # noqa: E731
    else:                                       # ANIL: the Hessian of the parameters it adapts
        mask = mask.to(u)
        hvp = lambda v: fns.hvp(u, v * mask) * mask                             # noqa: E731
    lam = lambda_max(hvp, u)
    if L.METHODS[cfg["method"]].flow:
        bound, what = stability_bound(cfg["solver"], cfg["adjoint"]), f"{cfg['solver']} / {cfg['adjoint']} on the grid h"
    else:
        lam += cfg.get("imaml_lambda", 0.0)     # iMAML: GD on the loss plus lambda/2 ||u - theta||^2
        bound, what = ode.FORWARD_SCHEMES["euler"].stability_bound, "gradient descent"
    h = cfg["inner_lr"]
    if not (math.isfinite(bound) and math.isfinite(lam) and h * lam > bound):
        return None
    return (f"h * lambda_max of the support loss's Hessian at the initial theta is {h:g} x {lam:.3g} = "
            f"{h * lam:.3g}, past {bound:.3g}, the stability bound of {what}; it is stable below --inner-lr "
            f"{bound / lam:.3g}")


_FLOW_OPTIONS = ("solver", "adjoint", "memory", "memory_budget", "rtol", "atol", "compile", "error_tol", "strict",
                 "refine")
_IMAGE_OPTIONS = ("channels", "activation", "pool")


def given_options(parser, argv) -> set:
    """The options written on the command line (argparse's prefixes resolved), as ``dest`` names."""
    known = {s: a.dest for a in _all_actions(parser) for s in a.option_strings if s.startswith("--")}
    out = set()
    for token in argv:
        if not token.startswith("--") or token == "--":
            continue
        name = token.split("=", 1)[0]
        hits = [s for s in known if s == name] or [s for s in known if s.startswith(name)]
        if len({known[s] for s in hits}) == 1:
            out.add(known[hits[0]])
    return out


def _all_actions(parser):
    for a in parser._actions:
        yield a
        for sub in (getattr(a, "choices", None) or {}).values() if hasattr(a, "_name_parser_map") else ():
            yield from _all_actions(sub)


def unused_options(args, given: set) -> List[str]:
    """The warnings (one line each, printed once the run's checks have passed) naming the options written on the command line none of the run's
    methods or its task uses, so they are not ignored without a word (a warning, not a refusal:
    one option list for a loop over methods is common): A-MAML's solver options with no A-MAML method,
    iMAML's with no iMAML, --maml-steps with no MAML/ANIL, the Conv4 options off the image tasks,
    the error-estimate options in exact mode."""
    methods = [args.method] if args.command == "train" else list(args.methods)
    info = [L.METHODS[m] for m in methods]
    flow = any(m.flow for m in info)
    exact = _exact(getattr(args, "adjoint", None))
    uses = {opt: flow for opt in _FLOW_OPTIONS}
    uses.update({opt: flow and not exact for opt in ("error_tol", "strict", "refine")})
    uses.update({"imaml_lambda": any("imaml_lambda" in m.options for m in info),
                 "cg_steps": any("cg_steps" in m.options for m in info),
                 "maml_steps": any(m.steps == "maml_steps" for m in info)})   # --inner-steps: also the test steps
    from ..train.benchmarks import BENCHMARKS
    uses.update({opt: bool(BENCHMARKS[args.task].episodes) for opt in _IMAGE_OPTIONS})
    out = []
    for opt in sorted(given):
        if uses.get(opt, True) is False:
            why = (f"--task {args.task} has no Conv4" if opt in _IMAGE_OPTIONS else
                   "exact mode (--adjoint discrete) has no error estimate" if flow and exact and opt in uses
                   and opt in ("error_tol", "strict", "refine") else f"no method of {', '.join(methods)} uses it")
            out.append(f"amaml-ext: warning: argument --{opt.replace('_', '-')} is not used ({why}): ignored")
    return out


def warn_unused(args) -> None:
    """Print :func:`unused_options`'s warnings (rank 0 alone under torchrun)."""
    if args.distributed is None or args.distributed.is_main:
        for line in args.unused:
            print(line, file=sys.stderr)
