"""A-MAML: the meta-gradient of the inner gradient flow by the adjoint method; and its variants
that meta-learn the flow's step sizes or its horizon with the initialisation."""

import math
from contextlib import contextmanager
from typing import Dict

import torch
from torch import nn

from .. import _checks, ode
from ..data.batch import TaskBatch
from ..functional import LossFn, TaskFunctions
from ..metagrad import adjoint_meta_grad, gradient_flow
from ..metagrad.options import MetaGradOptions
from .base import MetaLearner, MetaStep
from .checks import InnerLoopDiverged


class AMAML(MetaLearner):
    """A-MAML: :func:`amaml_ext.adjoint_meta_grad` of the gradient flow up to ``T``.

    ``h`` is the grid (the adjoint's step, and the GD step of ``adapt``): ``T = K h``. Other
    keyword arguments (``solver``, ``adjoint``, ``rtol``, ``atol``, ``memory``, ``compile``, ...)
    go to ``adjoint_meta_grad``; ``compile`` defaults to ``"auto"`` here (compiled callbacks
    where they pay: dense models on the CPU), as a learner calls it many times with the same
    shapes.

    Args:
        model: the model; theta is its flattened trainable parameters.
        loss: ``loss(pred, target) -> scalar``.
        T: the inner horizon (> 0); ``T / h`` must be whole.
        h: the grid spacing.
        solver: the forward method (:data:`amaml_ext.ode.FORWARD_METHODS`).
        adjoint: the adjoint method (:data:`amaml_ext.ode.ADJOINT_METHODS`).
        **options: the other options of :func:`amaml_ext.adjoint_meta_grad`, checked here.

    Raises:
        TypeError, ValueError: a bad option (as :func:`amaml_ext.adjoint_meta_grad`), at construction.

    Example:
        >>> import torch, amaml_ext
        >>> from amaml_ext import learners, models, tasks
        >>> net = models.mlp(width=8)
        >>> learner = AMAML(net, torch.nn.functional.mse_loss, T=0.2, h=0.05, solver="euler",
        ...                 adjoint="discrete", compile=False)           # exact: 4 GD steps of 0.05
        >>> batch = tasks.CosMixture(shots=10, val=10).pool(2, seed=0).all(dtype=torch.float32)
        >>> step = learner.meta_grad(amaml_ext.flatten_params(net), batch)
        >>> step.grad.shape, step.stats["grid_steps"]
        (torch.Size([105]), 4)
    """

    name = "amaml"
    second_order = True

    def __init__(self, model: nn.Module, loss: LossFn, *, T: float = 2.0, h: float = 0.01,
                 solver: str = "dopri5", adjoint: str = "heun", **options):
        T = _checks.positive("T", T)
        options.setdefault("compile", "auto")
        # every option checked now, not at the first meta_grad
        opts = MetaGradOptions.build(caller=type(self).__name__, h=h, solver=solver, adjoint=adjoint, **options)
        super().__init__(model, loss, inner_lr=opts.solver.h, steps=ode.grid_size(T, opts.solver.h))
        self.T = T
        self.options = opts

    @property
    def options(self) -> MetaGradOptions:
        """The learner's :class:`~amaml_ext.metagrad.MetaGradOptions`, checked when set. To change
        some: ``learner.options = learner.options.replace(rtol=1e-3)`` (the grid ``h`` stays: it
        is the learner's step size)."""
        return self._options

    @options.setter
    def options(self, value) -> None:
        value = MetaGradOptions.build(caller="options", **value) if isinstance(value, dict) else value
        if not isinstance(value, MetaGradOptions):
            raise TypeError(f"argument 'options' must be a MetaGradOptions or a dict of options, got "
                            f"{type(value).__name__}")
        if hasattr(self, "_options") and value.solver.h != self.h:
            raise ValueError(f"argument 'options': h is the learner's grid and step size ({self.h:g}), got "
                             f"{value.solver.h:g}; make a new learner for another h")
        self._options = value
        self._batched = {False: value.replace(batched=False), True: value.replace(batched=True)}

    @property
    def h(self) -> float:
        """The grid spacing (the GD step of ``adapt``): fixed when the learner is made."""
        return self.inner_lr

    @property
    def solver(self) -> str:
        """The forward method."""
        return self.options.solver.solver

    @property
    def adjoint(self) -> str:
        """The adjoint method."""
        return self.options.solver.adjoint

    def meta_grad(self, theta, tasks):
        self._check(theta, tasks)
        batched = tasks.size > 1     # one task: no vmap (measured 1.5-1.7x faster eager, docs/benchmarks.md)
        data = tasks if batched else tasks.task(0)
        with self._diverging():
            r = adjoint_meta_grad(self.model, self.loss, theta, self.T, support=data.support, query=data.query,
                                  options=self._batched[batched])
        return self._checked(MetaStep(r.grad.mean(0) if batched else r.grad, r.loss.reshape(-1), dict(r.stats)))

    def _advice(self, lr=None, steps=None) -> str:
        if lr is not None or steps is not None:       # adapt: plain GD
            return super()._advice(lr, steps)
        return (f"lower the horizon (T={self.T:g}) or, with a fixed-step solver ('rk4', 'euler'), the grid "
                f"step (h={self.h:g})")

    @contextmanager
    def _diverging(self):
        """The adjoint's refusal of a non-finite inner flow (theta and the data were checked
        finite) as :class:`InnerLoopDiverged`, like the other learners' divergence."""
        try:
            yield
        except ValueError as e:
            if isinstance(e, InnerLoopDiverged) or "non-finite" not in str(e) or str(e).startswith("argument"):
                raise
            raise InnerLoopDiverged(f"{self!r}.meta_grad: the inner loop diverged: {e}; {self._advice()}") from e

    def __repr__(self):
        return f"{type(self).__name__}(T={self.T:g}, h={self.h:g}, solver={self.solver!r}, adjoint={self.adjoint!r})"


class _LearnedFlow(AMAML):
    """An A-MAML variant whose inner flow has meta-parameters of its own, meta-trained with theta
    through :func:`amaml_ext.gradient_flow` (the query loss's gradient reaches them by the same
    adjoint solve)."""

    def __init__(self, model: nn.Module, loss: LossFn, **kwargs):
        super().__init__(model, loss, **kwargs)
        if self.options.accuracy.refine:
            raise ValueError(f"argument 'refine' is not available for {self.name!r} (the flow's own "
                             f"meta-parameters would change with the grid); lower h instead")

    def flow_of(self, own: torch.Tensor):
        """``(T, lr)`` of the inner flow for the learner's own meta-parameters ``own``."""
        raise NotImplementedError  # pragma: no cover

    def meta_grad(self, meta, tasks):
        self._check(meta, tasks)
        with torch.enable_grad():
            theta = meta[:self.d].detach().requires_grad_()
            own = meta[self.d:].detach().requires_grad_()
            T, lr = self.flow_of(own)
            return self._flow_step(tasks, theta, [theta, own], T, lr)

    def _flow_step(self, tasks: TaskBatch, theta: torch.Tensor, inputs, T, lr=None) -> MetaStep:
        stats: Dict = {}
        with self._diverging():
            u = gradient_flow(self.model, self.loss, theta, T, tasks.support, lr=lr, stats=stats,
                              options=self._batched[True])
            with torch.enable_grad():
                per_task = TaskFunctions(self.model, self.loss, tasks.support, tasks.query, True).losses(u, tasks.query)
                grads = torch.autograd.grad(per_task.mean(), inputs)
        return self._checked(MetaStep(torch.cat([g.reshape(-1) for g in grads]), per_task.detach(), stats))


class AMAMLSGD(_LearnedFlow):
    """A-MAML with learned per-parameter step sizes (Meta-SGD, Li et al. 2017, over long
    horizons): the inner flow is ``du/dt = -exp(s) * grad L(u)``, ``s`` ``[d]`` meta-trained with
    theta from 0 (the plain flow). Meta-parameters ``[theta, s]``; meta-testing steps by
    ``inner_lr * exp(s)``. Arguments as :class:`AMAML` (``refine`` excepted).

    Example:
        >>> import torch, amaml_ext
        >>> from amaml_ext import learners, models, tasks
        >>> net = models.mlp(width=8)
        >>> learner = AMAMLSGD(net, torch.nn.functional.mse_loss, T=0.2, h=0.02, compile=False)
        >>> meta = learner.meta_params(amaml_ext.flatten_params(net))        # [theta, s = 0]
        >>> batch = tasks.CosMixture(shots=10, val=10).pool(2, seed=0).all(dtype=torch.float32)
        >>> meta.shape, learner.meta_grad(meta, batch).grad.shape
        (torch.Size([210]), torch.Size([210]))
    """

    name = "amaml-sgd"

    def __init__(self, model: nn.Module, loss: LossFn, **kwargs):
        super().__init__(model, loss, **kwargs)
        self.extra = self.d

    def meta_params(self, theta):
        return torch.cat([theta, torch.zeros_like(theta)])

    def test_adaptation(self, meta):
        return meta[:self.d], meta[self.d:].exp()

    def flow_of(self, own):
        return self.T, own.exp()


class AMAMLT(_LearnedFlow):
    """A-MAML that meta-learns its horizon: ``T = exp(tau)``, ``tau`` meta-trained with theta from
    ``log T`` (continuous adjoints only; the grid is ``ceil(T / h)`` equal steps of about h).
    Meta-parameters ``[theta, tau]``. Arguments as :class:`AMAML` (``refine`` excepted).

    Example:
        >>> import torch, amaml_ext
        >>> from amaml_ext import learners, models, tasks
        >>> net = models.mlp(width=8)
        >>> learner = AMAMLT(net, torch.nn.functional.mse_loss, T=0.2, h=0.02, compile=False)
        >>> meta = learner.meta_params(amaml_ext.flatten_params(net))        # [theta, log T]
        >>> batch = tasks.CosMixture(shots=10, val=10).pool(2, seed=0).all(dtype=torch.float32)
        >>> round(learner.horizon(meta), 6), learner.meta_grad(meta, batch).grad.shape
        (0.2, torch.Size([106]))
    """

    name = "amaml-t"
    extra = 1

    def meta_params(self, theta):
        return torch.cat([theta, theta.new_tensor([math.log(self.T)])])

    def flow_of(self, own):
        return own[0].exp(), None

    def horizon(self, meta: torch.Tensor) -> float:
        """The learned T of a meta-parameter vector."""
        return float(meta[self.d].exp())
