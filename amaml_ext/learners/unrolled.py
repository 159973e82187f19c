"""The unrolled and first-order baselines: MAML (autograd through the GD steps), MAML-1, ANIL,
FOMAML and Reptile."""

import torch
from torch import nn

from ..functional import LossFn
from ..functional import second_order as _math_attention
from .base import MetaLearner, MetaStep, head_mask


class MAML(MetaLearner):
    """Second-order MAML: autograd through ``steps`` GD steps (``create_graph=True``); memory
    grows linearly with ``steps``.

    Args:
        model: the model; theta is its flattened trainable parameters.
        loss: ``loss(pred, target) -> scalar``.
        inner_lr: the inner GD step size.
        steps: inner GD steps (the paper: 10 or 20).

    Example:
        >>> import torch, amaml_ext
        >>> from amaml_ext import learners, models, tasks
        >>> net = models.mlp(width=8)
        >>> batch = tasks.CosMixture(shots=10, val=10).pool(2, seed=0).all(dtype=torch.float32)
        >>> step = learners.MAML(net, torch.nn.functional.mse_loss, steps=3).meta_grad(amaml_ext.flatten_params(net), batch)
        >>> step.grad.shape, step.stats
        (torch.Size([105]), {'grad_evals': 8, 'inner_steps': 3})
    """

    name = "maml"
    second_order = True

    def meta_grad(self, theta, tasks):
        self._check(theta, tasks)
        fns = self.functions(tasks, theta=theta)
        B = tasks.size
        with torch.enable_grad(), _math_attention():
            th = theta.detach().clone().requires_grad_(True)
            u = th.expand(B, -1)
            for _ in range(self.steps):
                (g,) = torch.autograd.grad(fns.losses(u, tasks.support).sum(), u, create_graph=True)
                u = u - self.inner_lr * (g if self.adapt_mask is None else g * self.adapt_mask.to(g))
            per_task = fns.losses(u, tasks.query)
            (grad,) = torch.autograd.grad(per_task.mean(), th)
        return self._checked(MetaStep(grad, per_task.detach(), {"grad_evals": B * (self.steps + 1),
                                                                "inner_steps": self.steps}))


class MAML1(MAML):
    """MAML with one inner GD step (the common choice; the paper's MAML-1); ``steps`` must be 1.

    Example:
        >>> import torch, amaml_ext
        >>> from amaml_ext import learners, models, tasks
        >>> net = models.mlp(width=8)
        >>> batch = tasks.CosMixture(shots=10, val=10).pool(2, seed=0).all(dtype=torch.float32)
        >>> step = learners.MAML1(net, torch.nn.functional.mse_loss, inner_lr=0.1).meta_grad(amaml_ext.flatten_params(net), batch)
        >>> step.grad.shape, step.stats["inner_steps"]
        (torch.Size([105]), 1)
    """

    name = "maml1"

    def __init__(self, model: nn.Module, loss: LossFn, *, inner_lr: float = 0.01, steps: int = 1):
        if steps != 1:
            raise ValueError(f"argument 'steps' of MAML1 must be 1, got {steps!r} (use MAML for more)")
        super().__init__(model, loss, inner_lr=inner_lr, steps=1)


class ANIL(MAML):
    """ANIL (Raghu et al. 2020): MAML whose inner loop adapts only the head (``head``: names or
    prefixes of parameters, default the last module with parameters); the meta-gradient covers
    all of theta, the body learned through the head's adaptation. ``adapt`` also moves only the
    head.

    Example:
        >>> import torch, amaml_ext
        >>> from amaml_ext import learners, models, tasks
        >>> net = models.mlp(width=8)
        >>> batch = tasks.CosMixture(shots=10, val=10).pool(2, seed=0).all(dtype=torch.float32)
        >>> step = learners.ANIL(net, torch.nn.functional.mse_loss, steps=3).meta_grad(amaml_ext.flatten_params(net), batch)
        >>> int(learners.ANIL(net, torch.nn.functional.mse_loss).adapt_mask.sum())   # the last Linear
        9
        >>> step.grad.shape, step.stats["inner_steps"]
        (torch.Size([105]), 3)
    """

    name = "anil"
    second_order = True

    def __init__(self, model: nn.Module, loss: LossFn, *, inner_lr: float = 0.01, steps: int = 20, head=None):
        super().__init__(model, loss, inner_lr=inner_lr, steps=steps)
        self.adapt_mask = head_mask(model, head)


class FOMAML(MetaLearner):
    """First-order MAML: the query gradient at the adapted parameters (``steps`` GD steps of
    ``inner_lr`` on the support set).

    Example:
        >>> import torch, amaml_ext
        >>> from amaml_ext import learners, models, tasks
        >>> net = models.mlp(width=8)
        >>> batch = tasks.CosMixture(shots=10, val=10).pool(2, seed=0).all(dtype=torch.float32)
        >>> step = learners.FOMAML(net, torch.nn.functional.mse_loss, steps=3).meta_grad(amaml_ext.flatten_params(net), batch)
        >>> step.grad.shape, step.stats["grad_evals"]
        (torch.Size([105]), 4)
    """

    name = "fomaml"
    second_order = False

    def meta_grad(self, theta, tasks):
        fns, psi = self._adapt_batch(theta, tasks)
        per_task, g = fns.value_and_grad_val(psi)
        return self._checked(MetaStep(g.mean(0), per_task, {"grad_evals": fns.grad_evals + 1,
                                                             "inner_steps": self.steps}))


class Reptile(MetaLearner):
    """Reptile: the direction ``theta - psi`` (averaged over tasks), used as the gradient by the
    outer optimiser (``steps`` GD steps of ``inner_lr`` on the support set).

    Example:
        >>> import torch, amaml_ext
        >>> from amaml_ext import learners, models, tasks
        >>> net = models.mlp(width=8)
        >>> batch = tasks.CosMixture(shots=10, val=10).pool(2, seed=0).all(dtype=torch.float32)
        >>> step = learners.Reptile(net, torch.nn.functional.mse_loss, steps=3).meta_grad(amaml_ext.flatten_params(net), batch)
        >>> step.grad.shape, step.stats["inner_steps"]
        (torch.Size([105]), 3)
    """

    name = "reptile"
    second_order = False

    def meta_grad(self, theta, tasks):
        fns, psi = self._adapt_batch(theta, tasks)
        with torch.no_grad():
            per_task = fns.losses(psi, tasks.query)
        return self._checked(MetaStep((theta.detach() - psi).mean(0), per_task,
                                      {"grad_evals": fns.grad_evals, "inner_steps": self.steps}))


