"""Meta-learners: A-MAML and the paper's baselines behind one interface.

Every learner holds a model and a loss and offers

* ``meta_grad(theta, tasks) -> MetaStep``: the meta-gradient for a batch of tasks
  (:class:`amaml_ext.tasks.TaskBatch`, leading task dimension B), averaged over the tasks,
  with the per-task query losses and statistics;
* ``adapt(theta, support, steps=None) -> params``: the parameters after inner training from
  ``theta`` on ``support`` (one task ``(x, y)``, or B tasks with ``batched=True``).

``second_order`` says whether the meta-gradient differentiates through inner training:

==========  =============================================================  ============
learner     meta-gradient of the mean query loss V(psi_b(theta))           second order
==========  =============================================================  ============
``AMAML``   exact gradient of the gradient flow up to T (adjoint ODE)      yes
``MAML``    autograd through K GD steps (``create_graph``)                 yes
``MAML1``   MAML with one GD step                                          yes
``ANIL``    MAML adapting only the head in the inner loop; the body is     yes
            meta-learned through it (Raghu et al. 2020)
``FOMAML``  ``grad V(psi)`` at the adapted parameters (Jacobian dropped)   no
``Reptile`` ``theta - psi`` (Nichol et al. 2018)                           no
``IMAML``   ``(I + H(psi) / lambda)^-1 grad V(psi)`` by CG, psi minimising  yes (implicit)
            ``L(u) + lambda/2 ||u - theta||^2`` (Rajeswaran et al. 2019)
==========  =============================================================  ============

All inner training is plain gradient descent with step ``inner_lr`` (A-MAML: gradient flow up
to ``T``; its ``adapt`` runs ``T / h`` GD steps of ``h``). Tasks are evaluated together by
``torch.func.vmap`` (:class:`amaml_ext.functional.TaskFunctions`).

    >>> from amaml_ext import models, tasks, learners
    >>> net = models.mlp(width=32)
    >>> batch = tasks.CosMixture(50, 50).pool(5, seed=0).all(dtype=torch.float32)
    >>> step = learners.AMAML(net, torch.nn.functional.mse_loss, T=0.5).meta_grad(
    ...     amaml_ext.flatten_params(net), batch)
    >>> step.grad.shape, step.query_loss.shape
    (torch.Size([1185]), torch.Size([5]))
"""

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from . import _checks
from .data.batch import TaskBatch
from .functional import LossFn, TaskFunctions, param_shapes
from .functional import second_order as _math_attention
from .metagrad import adjoint_meta_grad

__all__ = ["MetaStep", "MetaLearner", "AMAML", "MAML", "MAML1", "ANIL", "FOMAML", "Reptile", "IMAML",
           "METHODS", "Method", "LEARNERS", "LABELS", "PAPER_METHODS", "make_learner",
           "method_steps", "head_mask"]

@dataclass
class MetaStep:
    """What one meta-gradient evaluation returns.

    ``grad``: ``[d]``, the meta-gradient averaged over the batch's tasks; ``query_loss``: ``[B]``,
    the query loss of each task at its adapted parameters; ``stats``: counts (gradient
    evaluations, HVPs, ...)."""

    grad: torch.Tensor
    query_loss: torch.Tensor
    stats: Dict[str, Any] = field(default_factory=dict)


class MetaLearner:
    """Base class. Subclasses implement :meth:`meta_grad`; ``adapt`` is K GD steps."""

    name = "base"
    second_order = False

    adapt_mask: Optional[torch.Tensor] = None
    """``[d]`` 0/1 over theta: the parameters the inner loop moves (None: all; ANIL: the head)."""

    def __init__(self, model: nn.Module, loss: LossFn, *, inner_lr: float = 0.01, steps: int = 200):
        if not isinstance(model, nn.Module):
            raise TypeError(f"argument 'model' must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss):
            raise TypeError(f"argument 'loss' must be callable loss(pred, target), got {type(loss).__name__}")
        self.model, self.loss = model, loss
        self.inner_lr = _checks.positive("inner_lr", inner_lr)
        self.steps = _checks.positive("steps", steps, integer=True)
        self.d = sum(math.prod(s) for _, s in param_shapes(model))

    # -- helpers -------------------------------------------------------------------------------

    def _check(self, theta: torch.Tensor, tasks: TaskBatch) -> None:
        if not isinstance(theta, torch.Tensor) or theta.dim() != 1 or theta.numel() != self.d:
            got = tuple(theta.shape) if isinstance(theta, torch.Tensor) else type(theta).__name__
            raise ValueError(f"argument 'theta' must have shape [{self.d}] (the model's parameter count), got {got}")
        if not isinstance(tasks, TaskBatch):
            raise TypeError(f"argument 'tasks' must be an amaml_ext.tasks.TaskBatch, got {type(tasks).__name__}")
        if tasks.query_mask is not None:
            raise ValueError("argument 'tasks' must have same-size query sets (query_mask None) to meta-train on, "
                             f"got padded query sets with a query_mask of shape {tuple(tasks.query_mask.shape)} "
                             "(a test pool: meta-train on the training pool)")

    def functions(self, tasks: TaskBatch, batched: bool = True) -> TaskFunctions:
        return TaskFunctions(self.model, self.loss, tasks.support, tasks.query, batched)

    def _start(self, theta: torch.Tensor, batch: int) -> torch.Tensor:
        return theta.detach().expand(batch, -1).clone()

    def _gd(self, fns: TaskFunctions, u: torch.Tensor, steps: int, lr: float, prox: Optional[Tuple[float, torch.Tensor]] = None):
        """``steps`` GD steps on the support loss (plus ``lam/2 ||u - anchor||^2`` with ``prox``)."""
        for _ in range(steps):
            g = fns.grad(u)
            if prox is not None:
                lam, anchor = prox
                g = g + lam * (u - anchor)
            u = u - lr * (g if self.adapt_mask is None else g * self.adapt_mask.to(g))
        return u

    def _adapt_batch(self, theta: torch.Tensor, tasks: TaskBatch) -> Tuple[TaskFunctions, torch.Tensor]:
        """Check the arguments, then ``steps`` GD steps on every task's support set: the
        callbacks and the adapted parameters ``psi [B, d]``."""
        self._check(theta, tasks)
        fns = self.functions(tasks)
        with torch.no_grad():
            return fns, self._gd(fns, self._start(theta, tasks.size), self.steps, self.inner_lr)

    def adapt(self, theta: torch.Tensor, support, steps: Optional[int] = None, batched: bool = False,
              lr: Optional[float] = None) -> torch.Tensor:
        """Plain GD from ``theta`` on ``support`` for ``steps`` (default: the learner's inner
        steps) of ``lr`` (default ``inner_lr``): ``[d]``, or ``[B, d]`` with ``batched``."""
        steps = self.steps if steps is None else _checks.positive("steps", steps, integer=True)
        lr = self.inner_lr if lr is None else _checks.positive("lr", lr)
        fns = TaskFunctions(self.model, self.loss, support, support, batched)
        u = self._start(theta, support[0].shape[0]) if batched else theta.detach().clone()
        with torch.no_grad():
            return self._gd(fns, u, steps, lr)

    def meta_grad(self, theta: torch.Tensor, tasks: TaskBatch) -> MetaStep:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, inner_lr={self.inner_lr:g})"


class AMAML(MetaLearner):
    """A-MAML: :func:`amaml_ext.adjoint_meta_grad` of the gradient flow up to ``T``.

    ``h`` is the grid (the adjoint's step, and the GD step of ``adapt``): ``T = K h``. Other
    keyword arguments (``solver``, ``adjoint``, ``rtol``, ``atol``, ``memory``, ``compile``)
    go to ``adjoint_meta_grad``."""

    name = "amaml"
    second_order = True

    def __init__(self, model: nn.Module, loss: LossFn, *, T: float = 2.0, h: float = 0.01,
                 solver: str = "dopri5", adjoint: str = "heun", **options):
        T = _checks.positive("T", T)
        h = _checks.positive("h", h)
        steps = round(T / h)
        if steps < 1 or abs(steps * h - T) > 1e-9 * max(1.0, T):
            raise ValueError(f"argument 'T' must be a whole multiple of h={h:g}, got T={T:g}")
        super().__init__(model, loss, inner_lr=h, steps=steps)
        self.T, self.h, self.solver, self.adjoint = T, h, solver, adjoint
        self.options = options

    def meta_grad(self, theta, tasks):
        self._check(theta, tasks)
        r = adjoint_meta_grad(self.model, self.loss, theta, self.T, support=tasks.support, query=tasks.query,
                              h=self.h, solver=self.solver, adjoint=self.adjoint, batched=True, **self.options)
        return MetaStep(r.grad.mean(0), r.loss, dict(r.stats))

    def __repr__(self):
        return f"AMAML(T={self.T:g}, h={self.h:g}, solver={self.solver!r}, adjoint={self.adjoint!r})"


class MAML(MetaLearner):
    """Second-order MAML: autograd through ``steps`` GD steps (``create_graph=True``); memory
    grows linearly with ``steps``."""

    name = "maml"
    second_order = True

    def meta_grad(self, theta, tasks):
        self._check(theta, tasks)
        fns = self.functions(tasks)
        B = tasks.size
        with torch.enable_grad(), _math_attention():
            th = theta.detach().clone().requires_grad_(True)
            u = th.expand(B, -1)
            for _ in range(self.steps):
                (g,) = torch.autograd.grad(fns.losses(u, tasks.support).sum(), u, create_graph=True)
                u = u - self.inner_lr * (g if self.adapt_mask is None else g * self.adapt_mask.to(g))
            per_task = fns.losses(u, tasks.query)
            (grad,) = torch.autograd.grad(per_task.mean(), th)
        return MetaStep(grad, per_task.detach(), {"grad_evals": B * (self.steps + 1), "inner_steps": self.steps})


class MAML1(MAML):
    """MAML with one inner GD step (the common choice; the paper's MAML-1)."""

    name = "maml1"

    def __init__(self, model: nn.Module, loss: LossFn, *, inner_lr: float = 0.01, steps: int = 1):
        if steps != 1:
            raise ValueError(f"argument 'steps' of MAML1 must be 1, got {steps!r} (use MAML for more)")
        super().__init__(model, loss, inner_lr=inner_lr, steps=1)


def head_mask(model: nn.Module, head=None) -> torch.Tensor:
    """``[d]`` float mask over theta: 1 on the parameters of ``head`` (names or prefixes; default:
    the last submodule that holds trainable parameters, e.g. ``Conv4.head`` or an MLP's last
    Linear), 0 elsewhere."""
    shapes = list(param_shapes(model))
    if head is None:
        owners = [n.rsplit(".", 1)[0] if "." in n else "" for n, _ in shapes]
        head = [owners[-1]] if owners and owners[-1] else [shapes[-1][0]]
    elif isinstance(head, str):
        head = [head]
    inside = lambda n: any(n == p or n.startswith(p + ".") for p in head)  # noqa: E731
    mask = torch.cat([torch.full((math.prod(s),), 1.0 if inside(n) else 0.0) for n, s in shapes])
    if not bool(mask.any()):
        raise ValueError(f"argument 'head' must name trainable parameters of the model, got {head!r}; "
                         f"its parameters are {[n for n, _ in shapes]}")
    return mask


class ANIL(MAML):
    """ANIL (Raghu et al. 2020): MAML whose inner loop adapts only the head (``head``: names or
    prefixes of parameters, default the last module with parameters); the meta-gradient covers
    all of theta, the body learned through the head's adaptation. ``adapt`` also moves only the
    head."""

    name = "anil"
    second_order = True

    def __init__(self, model: nn.Module, loss: LossFn, *, inner_lr: float = 0.01, steps: int = 20, head=None):
        super().__init__(model, loss, inner_lr=inner_lr, steps=steps)
        self.adapt_mask = head_mask(model, head)


class FOMAML(MetaLearner):
    """First-order MAML: the query gradient at the adapted parameters."""

    name = "fomaml"
    second_order = False

    def meta_grad(self, theta, tasks):
        fns, psi = self._adapt_batch(theta, tasks)
        per_task, g = fns.value_and_grad_val(psi)
        return MetaStep(g.mean(0), per_task, {"grad_evals": fns.grad_evals + 1, "inner_steps": self.steps})


class Reptile(MetaLearner):
    """Reptile: the direction ``theta - psi`` (averaged over tasks), used as the gradient by the
    outer optimiser."""

    name = "reptile"
    second_order = False

    def meta_grad(self, theta, tasks):
        fns, psi = self._adapt_batch(theta, tasks)
        with torch.no_grad():
            per_task = fns.losses(psi, tasks.query)
        return MetaStep((theta.detach() - psi).mean(0), per_task,
                        {"grad_evals": fns.grad_evals, "inner_steps": self.steps})


class IMAML(MetaLearner):
    """iMAML: inner GD on ``L(u) + lam/2 ||u - theta||^2``, then the implicit meta-gradient
    ``(I + H(psi) / lam)^-1 grad V(psi)`` by ``cg_steps`` conjugate-gradient iterations with
    HVPs at psi (one linearisation serves them all). Paper: ``lam = 1``, 5 CG steps."""

    name = "imaml"
    second_order = True

    def __init__(self, model: nn.Module, loss: LossFn, *, inner_lr: float = 0.01, steps: int = 200,
                 lam: float = 1.0, cg_steps: int = 5):
        super().__init__(model, loss, inner_lr=inner_lr, steps=steps)
        self.lam = _checks.positive("lam", lam)
        self.cg_steps = _checks.positive("cg_steps", cg_steps, integer=True)

    def adapt_prox(self, theta: torch.Tensor, fns: TaskFunctions, batch: int) -> torch.Tensor:
        anchor = theta.detach().expand(batch, -1)
        with torch.no_grad():
            return self._gd(fns, anchor.clone(), self.steps, self.inner_lr, prox=(self.lam, anchor))

    def meta_grad(self, theta, tasks):
        self._check(theta, tasks)
        fns = self.functions(tasks)
        psi = self.adapt_prox(theta, fns, tasks.size)
        per_task, g = fns.value_and_grad_val(psi)
        x = self.cg_solve(fns, psi, g)
        fns.release()
        return MetaStep(x.mean(0), per_task, {"grad_evals": fns.grad_evals + 1, "hvps": fns.hvp_evals,
                                              "inner_steps": self.steps, "cg_steps": self.cg_steps})

    def cg_solve(self, fns: TaskFunctions, psi: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``cg_steps`` CG iterations on ``(I + H(psi) / lam) x = b``, per task (rows), from x = 0."""
        def A(v):
            return v + fns.hvp(psi, v, key="psi") / self.lam
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rr = (r * r).sum(-1, keepdim=True)
        tiny = torch.finfo(b.dtype).tiny
        for _ in range(self.cg_steps):
            Ap = A(p)
            pAp = (p * Ap).sum(-1, keepdim=True)
            # plain CG, as iMAML's reference code: alpha may be negative where I + H/lam is not
            # positive definite; a task with a zero residual (or direction) stays put
            ok = (rr > 0) & (pAp.abs() > tiny)
            alpha = torch.where(ok, rr / torch.where(ok, pAp, torch.ones_like(pAp)), torch.zeros_like(pAp))
            x = x + alpha * p
            r = r - alpha * Ap
            rr_new = (r * r).sum(-1, keepdim=True)
            beta = torch.where(rr > 0, rr_new / rr.clamp_min(tiny), torch.zeros_like(rr))
            p = r + beta * p
            rr = rr_new
        return x

    def __repr__(self):
        return f"IMAML(steps={self.steps}, inner_lr={self.inner_lr:g}, lam={self.lam:g}, cg_steps={self.cg_steps})"


@dataclass(frozen=True)
class Method:
    """A learner of the registry: its class, its label in tables and plots, which of
    :func:`make_learner`'s step counts it runs (``"inner_steps"``, ``"maml_steps"``, or None: its
    own fixed count), its other options (``make_learner`` keyword -> constructor keyword), and
    whether it is one of the paper's comparisons."""

    cls: type
    label: str
    steps: Optional[str] = "inner_steps"
    options: Dict[str, str] = field(default_factory=dict)
    paper: bool = True


METHODS: Dict[str, Method] = {
    "amaml": Method(AMAML, "A-MAML"),
    "maml": Method(MAML, "MAML", steps="maml_steps"),
    "maml1": Method(MAML1, "MAML-1", steps=None),
    "fomaml": Method(FOMAML, "FOMAML"),
    "reptile": Method(Reptile, "Reptile"),
    "imaml": Method(IMAML, "iMAML", options={"imaml_lambda": "lam", "cg_steps": "cg_steps"}),
    "anil": Method(ANIL, "ANIL", steps="maml_steps", paper=False),
}
"""Every learner by name: adding one is its class and an entry here."""

LEARNERS = {name: m.cls for name, m in METHODS.items()}
LABELS = {name: m.label for name, m in METHODS.items()}
PAPER_METHODS = tuple(name for name, m in METHODS.items() if m.paper)
"""The methods of the paper's comparisons (``amaml-ext compare``'s default)."""


def method_steps(method: str, inner_steps: int, maml_steps: int) -> int:
    """The inner GD steps ``method`` runs given the two step options (MAML-1: 1)."""
    which = METHODS[method].steps
    return {"inner_steps": inner_steps, "maml_steps": maml_steps, None: 1}[which]


def make_learner(method: str, model: nn.Module, loss: LossFn, *, inner_steps: int = 200, maml_steps: int = 20,
                 inner_lr: float = 0.01, imaml_lambda: float = 1.0, cg_steps: int = 5, **amaml_options) -> MetaLearner:
    """A learner by name with the paper's conventions: A-MAML's ``T = inner_steps * inner_lr``
    (``h = inner_lr``); MAML and ANIL run ``maml_steps``; MAML1 one step; the others ``inner_steps``.
    ``amaml_options`` (solver, adjoint, memory, compile, rtol, atol, ...) go to A-MAML."""
    _checks.choice("method", method, sorted(METHODS))
    if method == "amaml":
        inner_steps = _checks.positive("inner_steps", inner_steps, integer=True)
        return AMAML(model, loss, T=inner_steps * inner_lr, h=inner_lr, **amaml_options)
    if amaml_options:
        raise ValueError(f"options {sorted(amaml_options)} apply to method 'amaml' only, got method {method!r}")
    m = METHODS[method]
    given = {"imaml_lambda": imaml_lambda, "cg_steps": cg_steps}
    kw = {to: given[opt] for opt, to in m.options.items()}
    if m.steps is not None:
        kw["steps"] = method_steps(method, inner_steps, maml_steps)
    return m.cls(model, loss, inner_lr=inner_lr, **kw)
