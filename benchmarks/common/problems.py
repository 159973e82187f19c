"""Problem builders shared by the benchmarks: tasks drawn from their own seeds, and a model's
loss as a function of one flat parameter vector (what every meta-gradient and HVP
implementation differentiates).

Models come from :mod:`amaml_ext.models` (``mlp(width=32)``: the paper's 2-32-32-1 tanh
regression net; ``Conv4(ways, channels=C)``: the few-shot classifier) and synthetic tasks from
:mod:`amaml_ext.tasks`; only what the library does not hold (random images) is built here.
"""

from typing import Callable, List, Tuple

import torch
from torch import nn

from amaml_ext import tasks, unflatten_params

Pair = Tuple[torch.Tensor, torch.Tensor]


def cosmixture_task(seed: int, n_support: int = 100, n_query: int = 100, dtype=torch.float32,
                    device="cpu") -> Tuple[Pair, Pair, Tuple[float, float, float]]:
    """One task of the library's CosMixture family, drawn from ``seed`` alone: ``(support,
    query, (A, w, phi))`` with ``x [n, 2]``, ``y [n, 1]`` (no task dimension)."""
    pool = tasks.CosMixture(n_support, n_query).pool(1, seed)
    task = pool.all(device=device, dtype=dtype).task(0)
    A, w, phi = pool.params[0].tolist()
    return task.support, task.query, (A, w, phi)


def random_image_task(seed: int, ways: int = 20, shots: int = 1, query_shots: int = 1, image_size: int = 28,
                      dtype=torch.float32, device="cpu") -> Tuple[Pair, Pair]:
    """One N-way K-shot task of random images (standard normal pixels, drawn in float64 from
    ``seed``): support ``ways * shots`` images ``[n, 1, S, S]``, query ``ways * query_shots``,
    labels 0..ways-1."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(ways * shots, 1, image_size, image_size, generator=g, dtype=torch.float64)
    xq = torch.randn(ways * query_shots, 1, image_size, image_size, generator=g, dtype=torch.float64)
    ys = torch.arange(ways).repeat(shots)
    yq = torch.arange(ways).repeat(query_shots)
    to = dict(device=device, dtype=dtype)
    return (xs.to(**to), ys.to(device)), (xq.to(**to), yq.to(device))


def stack_tasks(pairs: List[Pair]) -> Pair:
    """``[(x, y), ...]`` -> ``(x [B, ...], y [B, ...])``."""
    return tuple(torch.stack([p[i] for p in pairs]) for i in range(2))


def flat_loss(model: nn.Module, module: nn.Module, loss: Callable, u: torch.Tensor, data: Pair,
              batched: bool = False) -> torch.Tensor:
    """The loss of ``module`` on ``data`` with the parameters of ``model`` (by name) taken from the
    flat ``u``: ``[d]`` for one task; ``[B, d]`` with ``batched`` (data with a leading task
    dimension), then the sum of the per-task losses (vmap), whose gradient with respect to
    ``u[b]`` is task b's gradient. ``module`` is ``model`` or a copy of it (e.g. one whose
    BatchNorm keeps no running statistics); its own buffers are used."""
    def task_loss(flat_u, x, y):
        pred = torch.func.functional_call(module, unflatten_params(model, flat_u), (x,))
        return loss(pred, y)

    x, y = data
    if batched:
        return torch.func.vmap(task_loss)(u, x, y).sum()
    return task_loss(u, x, y)


SMOOTH_CONV4 = "smooth Conv4 (16 ch), 5 tasks 20-way 1-shot, T=0.05, h=0.002, dopri5+heun"


def smooth_conv4_batch(tasks_: int = 5, ways: int = 20):
    """The smooth Conv4 setting of the cost benchmarks: ``models.Conv4`` (16 channels, GELU,
    average pooling; seed 0) and ``tasks_`` random 28x28 ``ways``-way 1-shot tasks as a TaskBatch."""
    from amaml_ext import models
    torch.manual_seed(0)
    conv = models.Conv4(ways=ways, channels=16, activation="gelu", pool="avg")
    g = torch.Generator().manual_seed(0)
    xs, xq = torch.rand(tasks_, ways, 1, 28, 28, generator=g), torch.rand(tasks_, ways, 1, 28, 28, generator=g)
    y = torch.arange(ways).expand(tasks_, ways).clone()
    return conv, tasks.TaskBatch((xs, y), (xq, y))
