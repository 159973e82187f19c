"""The HVP benchmark's problems (docs/benchmarks.md, Methods): a model, its support data and the
training loss as a function of one flat parameter vector ``u``.

* ``cosmix``: ``amaml_ext.models.mlp(width=32)`` on ``--points`` points of a random mixture
  of 3 cosines on [-5, 5]^2 (this benchmark's own regression data), MSE;
* ``cosmix_b5``: the same for ``--tasks`` tasks, ``u [B, d]``, the forward vmapped over tasks;
* ``conv4``: ``amaml_ext.models.Conv4(ways, channels=C)`` (BatchNorm in training mode) on
  ``ways`` random 1x28x28 images, cross-entropy.
"""

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from amaml_ext import flatten_params, models
from amaml_ext.functional import TaskFunctions

from ..common.problems import flat_loss, stack_tasks

MODELS = ("cosmix", "cosmix_b5", "conv4")


def mse_explicit(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``F.mse_loss`` written out: identical value, but differentiable forward-over-reverse.

    In torch 2.14 ``jvp(grad(F.mse_loss ...))`` raises "ZeroTensors are immutable" and
    ``torch.func.linearize`` of it crashes the process (pytorch/pytorch#123996: an in-place
    division in ``mse_loss_double_backward`` when the target has no tangent).
    """
    return ((pred - target) ** 2).mean()


def cosmix_loss(mse: str) -> Callable:
    return F.mse_loss if mse == "functional" else mse_explicit


def cosmix_task(gen: torch.Generator, n: int = 100, k: int = 3):
    """``n`` points of a random mixture of ``k`` cosines on [-5, 5]^2."""
    x = (torch.rand(n, 2, generator=gen) * 10 - 5)
    w = torch.randn(k, 2, generator=gen)
    phase = torch.rand(k, generator=gen) * 2 * torch.pi
    amp = torch.rand(k, generator=gen) + 0.5
    y = (amp * torch.cos(x @ w.T + phase)).sum(-1, keepdim=True)
    return x, y


class HvpProblem:
    """A model, its support data ``(x, y)`` and the training loss of a flat ``u`` (``[d]``, or
    ``[B, d]`` with ``batched``), with the vectors ``v``, ``v2`` the HVPs multiply."""

    def __init__(self, name: str, model: nn.Module, loss: Callable, x, y, batched: bool, device: str, seed: int):
        self.name = name
        self.model = model.to(device).train()
        self.fmodel = copy.deepcopy(self.model)  # for torch.func: BatchNorm without running statistics
        torch.func.replace_all_batch_norm_modules_(self.fmodel)
        self.loss = loss
        self.x, self.y = x.to(device), y.to(device)
        self.batched = batched
        flat = flatten_params(self.model)
        self.d = flat.numel()
        gen = torch.Generator().manual_seed(seed + 1)
        if batched:
            B = x.shape[0]
            u = flat.repeat(B, 1) + 0.1 * torch.randn(B, self.d, generator=gen).to(device)
        else:
            u = flat.clone()
        self.u = u.contiguous()
        self.v = torch.randn(self.u.shape, generator=gen).to(device)
        self.v2 = torch.randn(self.u.shape, generator=gen).to(device)

    def f_autograd(self, u):
        """Training loss (sum over tasks) through the module itself: for the autograd variants."""
        return flat_loss(self.model, self.model, self.loss, u, (self.x, self.y), self.batched)

    def f_func(self, u):
        """The same loss through the BatchNorm-stripped copy: for the torch.func variants."""
        return flat_loss(self.model, self.fmodel, self.loss, u, (self.x, self.y), self.batched)

    def task_functions(self) -> TaskFunctions:
        data = (self.x, self.y)
        return TaskFunctions(self.model, self.loss, data, data, batched=self.batched)


def build_problem(name: str, args, device: str) -> HvpProblem:
    """Problem ``name`` with the options ``args`` (``--points``, ``--tasks``, ``--ways``,
    ``--channels``, ``--mse``, ``--seed``)."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    if name == "cosmix":
        x, y = cosmix_task(gen, args.points)
        return HvpProblem(name, models.mlp(width=32), cosmix_loss(args.mse), x, y, False, device, args.seed)
    if name == "cosmix_b5":
        x, y = stack_tasks([cosmix_task(gen, args.points) for _ in range(args.tasks)])
        return HvpProblem(name, models.mlp(width=32), cosmix_loss(args.mse), x, y, True, device, args.seed)
    if name == "conv4":
        x = torch.randn(args.ways, 1, 28, 28, generator=gen)
        y = torch.arange(args.ways)
        model = models.Conv4(ways=args.ways, channels=args.channels)
        return HvpProblem(name, model, F.cross_entropy, x, y, False, device, args.seed)
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
