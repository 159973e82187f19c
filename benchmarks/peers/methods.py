"""The peers' meta-gradients, and ours through the learners, as methods of the meta-gradient
benchmark: ``method(problem, K) -> (grad, stats)`` (:mod:`benchmarks.meta_grad.methods`).

Every peer computes what ``maml_unrolled`` computes: K SGD steps of step h on the support loss
from the model's parameters, the query loss there, its gradient with respect to the initial
parameters (second order), in the way each library's documentation writes a MAML step. They
run on the problem's module (``MetaGradProblem.module``: BatchNorm without running statistics,
the function every method differentiates); a meta-batch is a loop over the tasks, one gradient
each (``[B, d]``), as their MAML examples loop. The libraries are imported with this module,
before any measurement (an import is no part of a method's time or memory); where one is not
installed its points are errors and the rest of the benchmark runs.

* ``higher_sgd``: ``higher.innerloop_ctx(net, torch.optim.SGD(lr=h), copy_initial_weights=False)``,
  ``diffopt.step(loss)`` K times.
* ``torchopt_sgd``: TorchOpt's functional API: ``torchopt.sgd(lr=h)``, ``update`` and
  ``apply_updates(inplace=False)`` on the parameter tuple, the net evaluated by
  ``torch.func.functional_call``.
* ``torchopt_metasgd``: TorchOpt's object API: ``torchopt.MetaSGD(net, lr=h)``, ``step(loss)``
  K times, the net and the optimiser restored by ``extract_state_dict``/``recover_state_dict``
  (TorchOpt's MAML example).
* ``l2l_maml``: learn2learn's ``MAML(net, lr=h)``, ``clone()`` then ``adapt(loss)`` K times
  (loaded from its source package: :mod:`.learn2learn_src`).
* ``learner_amaml`` / ``learner_amaml_exact``: ours as a user meta-trains with it:
  ``amaml_ext.learners.make_learner("amaml", model, loss, inner_steps=K, inner_lr=h)`` at its
  defaults / with ``solver="euler", adjoint="discrete"``, one learner kept per problem and K (as
  in a meta-training loop), ``meta_grad(theta, TaskBatch)``; its gradient is the mean over the
  tasks (``[d]``; the correctness check compares it with the mean of the reference).
* ``learner_imaml`` / ``learner_fomaml`` / ``learner_reptile``: the paper's other baselines,
  ``make_learner(name, model, loss, inner_steps=K, inner_lr=h)`` (iMAML: lambda 1, 5 CG steps),
  for the time and memory of a meta-step against K (the paper's Figs. 3-4). They compute other
  gradients than MAML's: the correctness check shows by how much, as a difference, not an error.
"""

import copy
import importlib
import weakref
from importlib import metadata
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..meta_grad.problem import MetaGradProblem
from .learn2learn_src import load_maml

_LIBS: Dict[str, object] = {}
for _name in ("higher", "torchopt"):  # imported with the methods, before any measurement (as torchdiffeq)
    try:
        _LIBS[_name] = importlib.import_module(_name)
    except ImportError:
        pass
try:
    _LIBS["learn2learn"] = load_maml()[0]
except ImportError:
    pass


def _lib(name: str):
    """A peer library imported above; ImportError (the point's error) where it is not installed."""
    if name not in _LIBS:
        _LIBS[name] = load_maml()[0] if name == "learn2learn" else importlib.import_module(name)
    return _LIBS[name]

_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, Dict]" = weakref.WeakKeyDictionary()


def _cached(p: MetaGradProblem, key, make: Callable):
    """An object kept per problem (keyed by its module) and ``key``, made once by ``make()``."""
    store = _CACHE.setdefault(p.module, {})
    if key not in store:
        store[key] = make()
    return store[key]


def _tasks(p: MetaGradProblem) -> List[Tuple]:
    """``[(support, query), ...]``, one pair per task, without the task dimension."""
    if not p.batched:
        return [(p.support, p.query)]
    return [(tuple(t[b] for t in p.support), tuple(t[b] for t in p.query)) for b in range(p.tasks)]


def _per_task(one_task: Callable):
    """A method from ``one_task(p, K, support, query) -> gradients per parameter``: the flat
    gradient ``[d]``, or ``[B, d]`` for a meta-batch (one task after the other)."""
    def run(p: MetaGradProblem, K: int):
        grads = []
        with torch.enable_grad():
            for support, query in _tasks(p):
                grads.append(torch.cat([g.reshape(-1) for g in one_task(p, K, support, query)]))
        return (torch.stack(grads) if p.batched else grads[0]), {"grad_evals": len(grads) * (K + 1)}
    run.__name__ = one_task.__name__
    run.__doc__ = one_task.__doc__
    return run


def _params(net: torch.nn.Module) -> List[torch.Tensor]:
    return [w for w in net.parameters() if w.requires_grad]


@_per_task
def higher_sgd(p, K, support, query):
    """higher: ``innerloop_ctx`` with ``torch.optim.SGD``, second order."""
    higher = _lib("higher")
    net = p.module
    params = _params(net)
    opt = torch.optim.SGD(params, lr=p.h)
    with higher.innerloop_ctx(net, opt, copy_initial_weights=False, track_higher_grads=True) as (fnet, diffopt):
        for _ in range(K):
            diffopt.step(p.loss(fnet(support[0]), support[1]))
        return torch.autograd.grad(p.loss(fnet(query[0]), query[1]), params)


@_per_task
def torchopt_sgd(p, K, support, query):
    """TorchOpt, functional: ``torchopt.sgd`` on a parameter tuple, ``inplace=False``."""
    torchopt = _lib("torchopt")
    net = p.module
    names, params = zip(*[(n, w) for n, w in net.named_parameters() if w.requires_grad])
    opt = torchopt.sgd(lr=p.h)
    state = opt.init(params)
    cur = params
    for _ in range(K):
        out = torch.func.functional_call(net, dict(zip(names, cur)), (support[0],))
        grads = torch.autograd.grad(p.loss(out, support[1]), cur, create_graph=True)
        updates, state = opt.update(grads, state, inplace=False)
        cur = torchopt.apply_updates(cur, updates, inplace=False)
    out = torch.func.functional_call(net, dict(zip(names, cur)), (query[0],))
    return torch.autograd.grad(p.loss(out, query[1]), params)


def _metasgd_setup(p: MetaGradProblem):
    torchopt = _lib("torchopt")
    net = copy.deepcopy(p.module)  # MetaSGD swaps the module's parameters for the stepped ones
    opt = torchopt.MetaSGD(net, lr=p.h)
    return (torchopt, net, opt, torchopt.extract_state_dict(net, by="reference", detach_buffers=True),
            torchopt.extract_state_dict(opt, by="reference"))


@_per_task
def torchopt_metasgd(p, K, support, query):
    """TorchOpt, object API: ``MetaSGD(net).step(loss)``, then the state recovered."""
    torchopt, net, opt, net_state, opt_state = _cached(p, "metasgd", lambda: _metasgd_setup(p))
    params = _params(net)
    try:
        for _ in range(K):
            opt.step(p.loss(net(support[0]), support[1]))
        return torch.autograd.grad(p.loss(net(query[0]), query[1]), params)
    finally:
        torchopt.recover_state_dict(net, net_state)
        torchopt.recover_state_dict(opt, opt_state)


def _l2l_wrapper(p: MetaGradProblem):
    return _lib("learn2learn")(p.module, lr=p.h)


@_per_task
def l2l_maml(p, K, support, query):
    """learn2learn: ``MAML(net, lr=h).clone()``, ``adapt(loss)`` K times."""
    maml = _cached(p, "l2l", lambda: _l2l_wrapper(p))
    learner = maml.clone()
    for _ in range(K):
        learner.adapt(p.loss(learner(support[0]), support[1]))
    return torch.autograd.grad(p.loss(learner(query[0]), query[1]), _params(maml))


def _task_batch(p: MetaGradProblem):
    from amaml_ext.tasks import TaskBatch
    add = (lambda pair: pair) if p.batched else (lambda pair: tuple(t.unsqueeze(0) for t in pair))  # noqa: E731
    return TaskBatch(add(p.support), add(p.query))


def _learner(method: str = "amaml", **options):
    def run(p: MetaGradProblem, K: int):
        from amaml_ext.learners import make_learner
        learner = _cached(p, ("learner", method, K, tuple(sorted(options.items()))),
                          lambda: make_learner(method, p.model, p.loss, inner_steps=K, inner_lr=p.h, **options))
        batch = _cached(p, "task_batch", lambda: _task_batch(p))
        step = learner.meta_grad(p.theta, batch)
        return step.grad, dict(step.stats)
    return run


PEER_METHODS: Dict[str, Callable] = {
    "higher_sgd": higher_sgd,
    "torchopt_sgd": torchopt_sgd,
    "torchopt_metasgd": torchopt_metasgd,
    "l2l_maml": l2l_maml,
}
"""The libraries a user would pick instead (all second-order MAML)."""

LEARNER_METHODS: Dict[str, Callable] = {
    "learner_amaml": _learner(),
    "learner_amaml_exact": _learner(solver="euler", adjoint="discrete"),
    "learner_imaml": _learner("imaml"),
    "learner_fomaml": _learner("fomaml"),
    "learner_reptile": _learner("reptile"),
}
"""Ours through ``make_learner("amaml", ...)``: at its defaults, and in exact mode; and the
paper's baselines that are not MAML (iMAML, FOMAML, Reptile: K inner GD steps each) through
``make_learner``, for the paper's Figs. 3-4 (their gradients are not MAML's)."""

MEAN_OVER_TASKS = set(LEARNER_METHODS)
"""Methods whose gradient is the mean over a meta-batch's tasks (``[d]``), not one per task."""

def prewarm_k(method: str, K: int) -> Optional[int]:
    """The K of a call made once before the memory baseline (its time is ``first_call_s``), or
    None: a peer's first call in a process sets the library up (higher's first
    ``torch.optim.SGD`` imports ``torch._dynamo``: 0.7 s and 117 MiB here), a K = 1 call does it;
    a learner may compile at its defaults, per shape and step count, and a budget method measures
    a linearisation: a call at K (like ``ours_*_compiled``'s compilation, kept out of the time and
    the memory)."""
    if method in PEER_METHODS:
        return 1
    if method in LEARNER_METHODS or method in BUDGET_PROBES:
        return K
    return None


BUDGET_PROBES = {"ours_exact_b25", "ours_exact_b50"}
"""Methods whose first call measures a linearisation (a full "linearise" run) to set their
budget: made before the memory baseline, like a compilation."""

CONTINUOUS = {"ours_store", "ours_dopri5_ckpt", "ours_store_compiled", "learner_amaml", "odeint_adjoint"}
"""Methods that solve the gradient flow by dopri5 (and its continuous adjoint): not run on a
ReLU/max-pool net, where dopri5 cannot step over the kinks at the default tolerances and the
continuous adjoint is not the net's gradient. The fixed-step ``authors_*`` do run there."""


def peer_versions() -> Dict[str, Optional[str]]:
    """The installed version of each peer library (None where absent), learn2learn's with how it
    was loaded."""
    out: Dict[str, Optional[str]] = {}
    for name in ("higher", "torchopt"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        out["learn2learn"] = load_maml()[1]
    except ImportError as e:
        out["learn2learn"] = f"unavailable: {e}"
    return out
