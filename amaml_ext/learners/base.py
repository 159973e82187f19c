"""The learners' interface: :class:`MetaStep`, :class:`MetaLearner` (argument checks, the shared
GD inner loop, ``adapt``) and :func:`head_mask`."""

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .. import _checks
from ..data.batch import TaskBatch
from ..functional import LossFn, TaskFunctions, param_count, param_shapes
from . import checks


@dataclass
class MetaStep:
    """What one meta-gradient evaluation returns.

    ``grad``: ``[d]``, the meta-gradient averaged over the batch's tasks; ``query_loss``: ``[B]``,
    the query loss of each task at its adapted parameters; ``stats``: counts (gradient
    evaluations, HVPs, ...).

    Example:
        >>> import torch, amaml_ext
        >>> from amaml_ext import learners, models, tasks
        >>> net = models.mlp(width=8)
        >>> batch = tasks.CosMixture(shots=10, val=10).pool(3, seed=0).all(dtype=torch.float32)
        >>> learner = learners.FOMAML(net, torch.nn.functional.mse_loss, steps=5)
        >>> step = learner.meta_grad(amaml_ext.flatten_params(net), batch)
        >>> step.grad.shape, step.query_loss.shape, step.stats
        (torch.Size([105]), torch.Size([3]), {'grad_evals': 6, 'inner_steps': 5})
    """

    grad: torch.Tensor
    query_loss: torch.Tensor
    stats: Dict[str, Any] = field(default_factory=dict)


class MetaLearner:
    """Base class. Subclasses implement :meth:`meta_grad`; ``adapt`` is K GD steps.

    Args:
        model: the model; its trainable parameters, flattened, are theta (``d`` entries).
        loss: ``loss(pred, target) -> scalar``, the inner (support) and meta (query) loss.
        inner_lr: the inner GD step size (> 0).
        steps: inner GD steps (a positive int).

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``loss`` not callable.
        ValueError: a non-positive ``inner_lr`` or ``steps``.

    Example:
        >>> import torch, amaml_ext
        >>> from amaml_ext import learners, models, tasks
        >>> net = models.mlp(width=8)
        >>> learner = learners.Reptile(net, torch.nn.functional.mse_loss, inner_lr=0.05, steps=10)
        >>> learner.d, learner.second_order
        (105, False)
        >>> support = tasks.CosMixture(shots=10, val=10).pool(1, seed=0).all(dtype=torch.float32).task(0).support
        >>> learner.adapt(amaml_ext.flatten_params(net), support).shape     # 10 GD steps from theta
        torch.Size([105])
    """

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
        self.trainable = list(param_shapes(model))       # (name, shape) of what theta covers
        self.d = param_count(self.trainable)

    # -- meta-parameters beyond theta ------------------------------------------------------------

    extra = 0
    """How many meta-parameters follow theta in the vector ``meta_grad`` takes (learned step
    sizes, a learned horizon); 0 for the initialisation-only learners."""

    def meta_params(self, theta: torch.Tensor) -> torch.Tensor:
        """The initial meta-parameter vector for the initial ``theta`` ``[d]``: theta itself, or
        theta followed by the learner's ``extra`` own."""
        return theta

    def test_adaptation(self, meta: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(theta, lr_scale)`` for meta-testing learned meta-parameters: the initialisation, and
        a multiplier of the test GD step (None: plain ``inner_lr``; ``[d]``: per parameter)."""
        return meta[:self.d], None

    # -- helpers -------------------------------------------------------------------------------

    def _check(self, theta: torch.Tensor, tasks: TaskBatch) -> None:
        """The shared argument checks (:mod:`amaml_ext.learners.checks`): theta ``[d + extra]``,
        float32/float64 and finite; the tasks of theta's dtype and device, finite, unpadded."""
        self._check_model_unchanged()
        what = "the model's parameter count" if not self.extra else (
            f"the model's {self.d} parameters and the learner's {self.extra} own")
        checks.check_theta(theta, self.d + self.extra, what)
        checks.check_tasks(tasks, theta)
        checks.check_model_device(self.model, theta)

    def _check_model_unchanged(self) -> None:
        """The model's trainable parameters still number what the learner was made for (theta,
        the learner's own meta-parameters and ANIL's head were sized for them)."""
        now = list(param_shapes(self.model))
        if now != self.trainable:
            d = param_count(now)
            changed = sorted(set(n for n, _ in now) ^ set(n for n, _ in self.trainable))
            raise ValueError(f"{self!r}: the model's trainable parameters changed since the learner was made "
                             f"({self.d} -> {d} entries; {', '.join(changed[:3]) or 'shapes'} changed: a parameter "
                             "frozen or unfrozen, added, removed or reshaped); theta, the learner's own "
                             "meta-parameters and ANIL's head were laid out for the old ones: make a new learner "
                             "(and a new theta, amaml_ext.flatten_params(model))")

    def _checked(self, step: MetaStep) -> MetaStep:
        """``step``, once its meta-gradient and query losses are finite (the data were checked
        finite): else :class:`~amaml_ext.learners.checks.InnerLoopDiverged`."""
        checks.diverged(f"{self!r}.meta_grad", [("query loss", step.query_loss), ("meta-gradient", step.grad)],
                        per_task=step.query_loss, advice=self._advice())
        return step

    def _advice(self, lr: Optional[float] = None, steps: Optional[int] = None) -> str:
        """What to change when the inner loop diverges."""
        return (f"lower the inner step size (inner_lr={self.inner_lr if lr is None else lr:g}) or the number "
                f"of inner steps (steps={self.steps if steps is None else steps})")

    def functions(self, tasks: TaskBatch, batched: bool = True, theta: Optional[torch.Tensor] = None) -> TaskFunctions:
        """The model's callbacks on ``tasks``; with ``theta``, the model checked at it
        (:meth:`TaskFunctions.check_model`: a forward reading the model's own parameters, buffers
        changed in place; a random forward is fine for these learners)."""
        fns = TaskFunctions(self.model, self.loss, tasks.support, tasks.query, batched)
        if theta is not None:
            fns.check_model(self._start(theta, tasks.size) if batched else theta, caller=f"{self!r}", random_ok=True)
        return fns

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
        fns = self.functions(tasks, theta=theta)
        with torch.no_grad():
            return fns, self._gd(fns, self._start(theta, tasks.size), self.steps, self.inner_lr)

    def adapt(self, theta: torch.Tensor, support, steps: Optional[int] = None, batched: bool = False,
              lr: Optional[float] = None) -> torch.Tensor:
        """Plain GD from ``theta`` on ``support`` for ``steps`` (default: the learner's inner
        steps) of ``lr`` (default ``inner_lr``): ``[d]``, or ``[B, d]`` with ``batched``.

        Raises ValueError/TypeError on bad arguments (theta ``[d]``, ``support = (x, y)`` of its
        dtype and device, finite), :class:`InnerLoopDiverged` when the steps diverge."""
        steps = self.steps if steps is None else _checks.positive("steps", steps, integer=True)
        lr = self.inner_lr if lr is None else _checks.positive("lr", lr)
        self._check_model_unchanged()
        checks.check_theta(theta, self.d)
        checks.check_pairs("support", (("support", support),), theta, batched)
        checks.check_model_device(self.model, theta)
        fns = TaskFunctions(self.model, self.loss, support, support, batched)
        u = self._start(theta, support[0].shape[0]) if batched else theta.detach().clone()
        fns.check_model(u, caller=f"{self!r}.adapt", random_ok=True)
        with torch.no_grad():
            u = self._gd(fns, u, steps, lr)
        checks.diverged(f"{self!r}.adapt", [("adapted parameters", u)], per_task=u if batched else None,
                        advice=self._advice(lr, steps).replace("inner_lr=", "lr="))
        return u

    def meta_grad(self, theta: torch.Tensor, tasks: TaskBatch) -> MetaStep:  # pragma: no cover
        """The meta-gradient of the mean query loss over ``tasks`` (a :class:`~amaml_ext.tasks.TaskBatch`
        of theta's dtype and device) at ``theta`` (``[d + extra]``, :meth:`meta_params`); raises
        ValueError/TypeError on bad arguments and :class:`InnerLoopDiverged` on non-finite results."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, inner_lr={self.inner_lr:g})"


def head_mask(model: nn.Module, head=None) -> torch.Tensor:
    """``[d]`` float mask over theta: 1 on the parameters of ``head`` (names or prefixes; default:
    the last submodule that holds trainable parameters, e.g. ``Conv4.head`` or an MLP's last
    Linear), 0 elsewhere.

    Raises:
        ValueError: ``head`` names no trainable parameter.

    Example:
        >>> from amaml_ext import models
        >>> net = models.mlp(width=8)                      # layers 0, 2 and 4 hold parameters
        >>> int(head_mask(net).sum()), int(head_mask(net, "0").sum())
        (9, 24)
    """
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


