"""A learn2learn/higher-style wrapper for existing training loops: ``learner.adapt(x, y)``
returns the model after inner training, as a callable whose parameters are ``u(T)`` of
:func:`amaml_ext.gradient_flow`; a loss on its outputs backpropagates into the wrapped model's
parameters (and the learner's own step sizes or horizon), for any ``torch.optim`` optimiser.

    learner = amaml_ext.AdjointLearner(model, F.mse_loss, T=0.5, h=0.05)
    opt = torch.optim.Adam(learner.parameters(), 1e-3)
    for xs, ys, xq, yq in tasks:
        fast = learner.adapt(xs, ys)              # 10 GD steps of 0.05, no graph kept
        F.mse_loss(fast(xq), yq).backward()       # the adjoint: model's .grad filled
    opt.step(); opt.zero_grad()
"""

import math
from typing import Dict, Optional

import torch
from torch import nn

from .. import _checks, ode
from ..functional import LossFn, flatten_params, param_count, param_shapes, unflatten_params
from ..metagrad import gradient_flow
from ..metagrad.options import MetaGradOptions


class AdaptedModel(nn.Module):
    """The wrapped model with its parameters replaced by the adapted ``params`` (``[d]``, in the
    autograd graph); buffers are the model's. Calling it runs ``torch.func.functional_call``.
    Made by :meth:`AdjointLearner.adapt`; ``stats`` holds the inner solve's statistics.

    Example:
        >>> import torch
        >>> from amaml_ext import AdaptedModel
        >>> net = torch.nn.Linear(2, 1)
        >>> fast = AdaptedModel(net, torch.tensor([1.0, 2.0, 0.5]), stats={})   # weight [1, 2], bias 0.5
        >>> fast(torch.tensor([[1.0, 1.0]]))
        tensor([[3.5000]])
    """

    def __init__(self, model: nn.Module, params: torch.Tensor, stats: Dict):
        super().__init__()
        self.model = model
        self.params = params
        self.stats = stats

    def forward(self, *args, **kwargs):
        """The wrapped model's forward with the adapted parameters."""
        return torch.func.functional_call(self.model, unflatten_params(self.model, self.params), args, kwargs)


class AdjointLearner(nn.Module):
    """Wrap ``model`` for meta-learning by the adjoint method (cf. ``learn2learn.algorithms.MAML``).

    Args:
        model: any ``nn.Module``; its trainable parameters are the initialisation theta.
        loss: the inner training loss ``loss(pred, target)``.
        T, h: inner training is the gradient flow up to ``T`` on a grid of ``h`` (exact mode:
            ``T / h`` GD steps of size h).
        learn_lr: also meta-learn per-parameter step-size multipliers ``exp(log_lr)`` (Meta-SGD),
            a parameter of this module.
        learn_T: also meta-learn the horizon, ``T = exp(log_T)`` (continuous adjoints only).
        **options: :func:`amaml_ext.gradient_flow`'s (``solver``, ``adjoint``, ``memory``, ...).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; a bad option type.
        ValueError: ``T / h`` not whole (without ``learn_T``), ``learn_T`` with an exact adjoint,
            a model without trainable parameters, or a bad option value.

    Example:
        >>> import torch, amaml_ext
        >>> from amaml_ext import tasks
        >>> F, net = torch.nn.functional, torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> learner = amaml_ext.AdjointLearner(net, F.mse_loss, T=0.2, h=0.05, solver="euler",
        ...                                    adjoint="discrete", compile=False)
        >>> opt = torch.optim.Adam(learner.parameters(), 1e-3)
        >>> task = tasks.CosMixture(shots=10, val=10).pool(1, seed=0).all(dtype=torch.float32).task(0)
        >>> fast = learner.adapt(*task.support)                       # 4 GD steps of 0.05
        >>> F.mse_loss(fast(task.query[0]), task.query[1]).backward()   # MAML's meta-gradient into net
        >>> net[0].weight.grad.shape
        torch.Size([8, 2])
        >>> opt.step()
    """

    def __init__(self, model: nn.Module, loss: LossFn, T: float = 1.0, h: float = 0.01, *,
                 learn_lr: bool = False, learn_T: bool = False, **options):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"argument 'model' must be a torch.nn.Module, got {type(model).__name__}")
        self.module = model
        self.loss = loss
        self.T = _checks.positive("T", T)
        self.adjoint_params = tuple(options.pop("adjoint_params", ()))     # gradient_flow's, not an option
        self.options = MetaGradOptions.build(caller="AdjointLearner", h=h, **options)   # checked now, once
        self.h = self.options.solver.h
        if learn_T and self.options.adjoint_scheme.exact_for is not None:
            raise ValueError(f"argument 'learn_T' needs a continuous adjoint ({ode.continuous_adjoints()}): exact mode "
                             f"(adjoint={self.options.solver.adjoint!r}) differentiates T / h GD steps, whose number "
                             "has no derivative")
        if not learn_T:
            ode.grid_size(self.T, self.h)
        like = flatten_params(model)      # [d]; names a model with nothing trainable
        self.trainable = list(param_shapes(model))       # (name, shape) of what theta and log_lr cover
        self.log_lr = nn.Parameter(torch.zeros_like(like)) if learn_lr else None
        self.log_T = nn.Parameter(like.new_tensor(math.log(self.T))) if learn_T else None

    def forward(self, *args, **kwargs):
        """The wrapped model, unadapted."""
        return self.module(*args, **kwargs)

    def theta(self) -> torch.Tensor:
        """The model's trainable parameters as one flat vector, in the graph (grads reach them)."""
        return torch.cat([p.reshape(-1) for p in self.module.parameters() if p.requires_grad])

    def adapt(self, x: torch.Tensor, y: torch.Tensor, *, T: Optional[float] = None) -> AdaptedModel:
        """Inner training on the support set ``(x, y)``: the adapted model, whose outputs
        backpropagate into the model's parameters and the learner's own (``T`` overrides the
        horizon)."""
        now = list(param_shapes(self.module))
        if self.log_lr is not None and now != self.trainable:
            raise ValueError(f"AdjointLearner.adapt: the model's trainable parameters changed since the learner "
                             f"was made ({self.log_lr.numel()} -> {param_count(now)} entries: a "
                             "parameter frozen or unfrozen, added, removed or reshaped); its learned step sizes "
                             "(learn_lr=True) were laid out for the old ones: make a new AdjointLearner")
        stats: Dict = {}
        horizon = self.log_T.exp() if self.log_T is not None and T is None else (self.T if T is None else T)
        lr = None if self.log_lr is None else self.log_lr.exp()
        u = gradient_flow(self.module, self.loss, self.theta(), horizon, (x, y), lr=lr, stats=stats,
                          adjoint_params=self.adjoint_params, options=self.options.replace(h=self.h))
        return AdaptedModel(self.module, u, stats)
