"""iMAML (Rajeswaran et al. 2019): the implicit meta-gradient of a proximal inner problem."""

import torch
from torch import nn

from .. import _checks
from ..functional import LossFn, TaskFunctions
from .base import MetaLearner, MetaStep


class IMAML(MetaLearner):
    """iMAML: inner GD on ``L(u) + lam/2 ||u - theta||^2``, then the implicit meta-gradient
    ``(I + H(psi) / lam)^-1 grad V(psi)`` by ``cg_steps`` conjugate-gradient iterations with
    HVPs at psi (one linearisation serves them all). Paper: ``lam = 1``, 5 CG steps.

    Args:
        model: the model; theta is its flattened trainable parameters.
        loss: ``loss(pred, target) -> scalar``.
        inner_lr: the inner GD step size.
        steps: inner GD steps.
        lam: the proximal weight (> 0).
        cg_steps: conjugate-gradient iterations (a positive int).

    Example:
        >>> import torch, amaml_ext
        >>> from amaml_ext import learners, models, tasks
        >>> net = models.mlp(width=8)
        >>> batch = tasks.CosMixture(shots=10, val=10).pool(2, seed=0).all(dtype=torch.float32)
        >>> step = learners.IMAML(net, torch.nn.functional.mse_loss, steps=5, lam=1.0, cg_steps=3).meta_grad(
        ...     amaml_ext.flatten_params(net), batch)
        >>> step.grad.shape, step.stats["cg_steps"]
        (torch.Size([105]), 3)
    """

    name = "imaml"
    second_order = True

    def __init__(self, model: nn.Module, loss: LossFn, *, inner_lr: float = 0.01, steps: int = 200,
                 lam: float = 1.0, cg_steps: int = 5):
        super().__init__(model, loss, inner_lr=inner_lr, steps=steps)
        self.lam = _checks.positive("lam", lam)
        self.cg_steps = _checks.positive("cg_steps", cg_steps, integer=True)

    def adapt_prox(self, theta: torch.Tensor, fns: TaskFunctions, batch: int) -> torch.Tensor:
        """``steps`` GD steps on ``L(u) + lam/2 ||u - theta||^2`` from theta for ``batch`` tasks:
        psi ``[batch, d]``."""
        anchor = theta.detach().expand(batch, -1)
        with torch.no_grad():
            return self._gd(fns, anchor.clone(), self.steps, self.inner_lr, prox=(self.lam, anchor))

    def meta_grad(self, theta, tasks):
        self._check(theta, tasks)
        fns = self.functions(tasks, theta=theta)
        psi = self.adapt_prox(theta, fns, tasks.size)
        per_task, g = fns.value_and_grad_val(psi)
        x = self.cg_solve(fns, psi, g)
        fns.release()
        return self._checked(MetaStep(x.mean(0), per_task, {"grad_evals": fns.grad_evals + 1, "hvps": fns.hvp_evals,
                                                            "inner_steps": self.steps, "cg_steps": self.cg_steps}))

    def cg_solve(self, fns: TaskFunctions, psi: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``cg_steps`` CG iterations on ``(I + H(psi) / lam) x = b``, per task (rows), from x = 0."""
        def A(v):
            return v + fns.hvp(psi, v, row=0) / self.lam
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

    def _advice(self, lr=None, steps=None) -> str:
        if lr is not None or steps is not None:       # adapt: plain GD
            return super()._advice(lr, steps)
        return super()._advice() + f" (or raise lam={self.lam:g}: CG on a system far from positive definite)"

    def __repr__(self):
        return f"IMAML(steps={self.steps}, inner_lr={self.inner_lr:g}, lam={self.lam:g}, cg_steps={self.cg_steps})"


