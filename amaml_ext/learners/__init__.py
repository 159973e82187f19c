"""Meta-learners: A-MAML and the paper's baselines behind one interface.

Every learner holds a model and a loss and offers

* ``meta_grad(theta, tasks) -> MetaStep``: the meta-gradient for a batch of tasks
  (:class:`amaml_ext.tasks.TaskBatch`, leading task dimension B), averaged over the tasks,
  with the per-task query losses and statistics;
* ``adapt(theta, support, steps=None) -> params``: the parameters after inner training from
  ``theta`` on ``support`` (one task ``(x, y)``, or B tasks with ``batched=True``).

``second_order`` says whether the meta-gradient differentiates through inner training:

===========  ==============================================================  ==============
learner      meta-gradient of the mean query loss V(psi_b(theta))            second order
===========  ==============================================================  ==============
``AMAML``    exact gradient of the gradient flow up to T (adjoint ODE)       yes
``MAML``     autograd through K GD steps (``create_graph``)                  yes
``MAML1``    MAML with one GD step                                           yes
``ANIL``     MAML adapting only the head in the inner loop; the body is      yes
             meta-learned through it (Raghu et al. 2020)
``FOMAML``   ``grad V(psi)`` at the adapted parameters (Jacobian dropped)    no
``Reptile``  ``theta - psi`` (Nichol et al. 2018)                            no
``IMAML``    ``(I + H(psi) / lambda)^-1 grad V(psi)`` by CG, psi minimising  yes (implicit)
             ``L(u) + lambda/2 ||u - theta||^2`` (Rajeswaran et al. 2019)
===========  ==============================================================  ==============

All inner training is plain gradient descent with step ``inner_lr`` (A-MAML: gradient flow up
to ``T``; its ``adapt`` runs ``T / h`` GD steps of ``h``). Tasks are evaluated together by
``torch.func.vmap`` (:class:`amaml_ext.functional.TaskFunctions`).

    >>> import torch, amaml_ext
    >>> from amaml_ext import models, tasks, learners
    >>> net = models.mlp(width=32)
    >>> batch = tasks.CosMixture(50, 50).pool(5, seed=0).all(dtype=torch.float32)
    >>> step = learners.AMAML(net, torch.nn.functional.mse_loss, T=0.5, compile=False).meta_grad(
    ...     amaml_ext.flatten_params(net), batch)
    >>> step.grad.shape, step.query_loss.shape
    (torch.Size([1185]), torch.Size([5]))
"""

from dataclasses import dataclass, field
from typing import Dict, Optional

from torch import nn

from .. import _checks
from ..functional import LossFn
from .adjoint import AMAML, AMAMLSGD, AMAMLT
from .base import MetaLearner, MetaStep, head_mask
from .checks import InnerLoopDiverged
from .implicit import IMAML
from .module import AdaptedModel, AdjointLearner
from .unrolled import ANIL, FOMAML, MAML, MAML1, Reptile

__all__ = ["AdaptedModel", "AdjointLearner", "MetaStep", "MetaLearner", "AMAML", "AMAMLSGD", "AMAMLT", "MAML", "MAML1", "ANIL", "FOMAML", "Reptile", "IMAML",
           "METHODS", "Method", "LEARNERS", "LABELS", "PAPER_METHODS", "make_learner", "method_steps", "head_mask",
           "InnerLoopDiverged"]


@dataclass(frozen=True)
class Method:
    """A learner of the registry: its class, its label in tables and plots, which of
    :func:`make_learner`'s step counts it runs (``"inner_steps"``, ``"maml_steps"``, or None: its
    own fixed count), its other options (``make_learner`` keyword -> constructor keyword),
    whether it is one of the paper's comparisons, and whether it solves the inner gradient flow
    (``flow``: ``T = inner_steps * inner_lr``, and it takes A-MAML's solver options).

    Example:
        >>> from amaml_ext.learners import METHODS
        >>> m = METHODS["imaml"]
        >>> m.cls.__name__, m.label, m.steps, m.options, m.paper, m.flow
        ('IMAML', 'iMAML', 'inner_steps', {'imaml_lambda': 'lam', 'cg_steps': 'cg_steps'}, True, False)
    """

    cls: type
    label: str
    steps: Optional[str] = "inner_steps"
    options: Dict[str, str] = field(default_factory=dict)
    paper: bool = True
    flow: bool = False


METHODS: Dict[str, Method] = {
    "amaml": Method(AMAML, "A-MAML", flow=True),
    "maml": Method(MAML, "MAML", steps="maml_steps"),
    "maml1": Method(MAML1, "MAML-1", steps=None),
    "fomaml": Method(FOMAML, "FOMAML"),
    "reptile": Method(Reptile, "Reptile"),
    "imaml": Method(IMAML, "iMAML", options={"imaml_lambda": "lam", "cg_steps": "cg_steps"}),
    "anil": Method(ANIL, "ANIL", steps="maml_steps", paper=False),
    "amaml-sgd": Method(AMAMLSGD, "A-MAML, learned lr", paper=False, flow=True),
    "amaml-t": Method(AMAMLT, "A-MAML, learned T", paper=False, flow=True),
}
"""Every learner by name: adding one is its class and an entry here."""

LEARNERS = {name: m.cls for name, m in METHODS.items()}
"""Every learner's class by name (from :data:`METHODS`)."""
LABELS = {name: m.label for name, m in METHODS.items()}
"""Every learner's label in tables and plots by name (from :data:`METHODS`)."""
PAPER_METHODS = tuple(name for name, m in METHODS.items() if m.paper)
"""The methods of the paper's comparisons (``amaml-ext compare``'s default)."""


def method_steps(method: str, inner_steps: int, maml_steps: int) -> int:
    """The inner GD steps ``method`` runs given the two step options (MAML-1: 1).

    Example:
        >>> method_steps("amaml", 200, 20), method_steps("maml", 200, 20), method_steps("maml1", 200, 20)
        (200, 20, 1)
    """
    which = METHODS[method].steps
    return {"inner_steps": inner_steps, "maml_steps": maml_steps, None: 1}[which]


def make_learner(method: str, model: nn.Module, loss: LossFn, *, inner_steps: int = 200, maml_steps: int = 20,
                 inner_lr: float = 0.01, imaml_lambda: float = 1.0, cg_steps: int = 5, **amaml_options) -> MetaLearner:
    """A learner by name with the paper's conventions: A-MAML's ``T = inner_steps * inner_lr``
    (``h = inner_lr``); MAML and ANIL run ``maml_steps``; MAML1 one step; the others ``inner_steps``.
    ``amaml_options`` (solver, adjoint, memory, compile, rtol, atol, ...) go to the A-MAML
    learners (``flow`` in :data:`METHODS`).

    Args:
        method: a key of :data:`METHODS`.
        model: the model (its parameters are what theta covers).
        loss: ``loss(pred, target) -> scalar``.
        inner_steps: GD steps of A-MAML (``T = inner_steps * inner_lr``), FOMAML, Reptile, iMAML.
        maml_steps: GD steps of MAML and ANIL.
        inner_lr: the inner step size (A-MAML's grid ``h``).
        imaml_lambda: iMAML's proximal weight.
        cg_steps: iMAML's conjugate-gradient iterations.
        **amaml_options: :func:`amaml_ext.adjoint_meta_grad`'s options, for the A-MAML learners.

    Returns:
        MetaLearner: the learner.

    Raises:
        ValueError: an unknown ``method``, A-MAML options for another method, or a bad value.

    Example:
        >>> import torch
        >>> from amaml_ext import models
        >>> make_learner("maml", models.mlp(width=8), torch.nn.functional.mse_loss, maml_steps=5)
        MAML(steps=5, inner_lr=0.01)
        >>> make_learner("amaml", models.mlp(width=8), torch.nn.functional.mse_loss, inner_steps=20,
        ...              inner_lr=0.05, compile=False)
        AMAML(T=1, h=0.05, solver='dopri5', adjoint='heun')
    """
    _checks.choice("method", method, sorted(METHODS))
    m = METHODS[method]
    if m.flow:
        inner_steps = _checks.positive("inner_steps", inner_steps, integer=True)
        return m.cls(model, loss, T=inner_steps * inner_lr, h=inner_lr, **amaml_options)
    if amaml_options:
        variants = ", ".join(k for k, v in METHODS.items() if v.flow and k != "amaml")
        raise ValueError(f"options {sorted(amaml_options)} apply to method 'amaml' only (and its variants "
                         f"{variants}), got method {method!r}")
    given = {"imaml_lambda": imaml_lambda, "cg_steps": cg_steps}
    kw = {to: given[opt] for opt, to in m.options.items()}
    if m.steps is not None:
        kw["steps"] = method_steps(method, inner_steps, maml_steps)
    return m.cls(model, loss, inner_lr=inner_lr, **kw)
