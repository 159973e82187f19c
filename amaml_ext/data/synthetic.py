"""Synthetic task families of the paper (Sec. 5.1): CosMixture and Alpine regression.

A task family draws *tasks* (function parameters) and, for each task, a support set (the
inner training data, k shots) and a query set (the validation data, k val points). Batches of
tasks are tensors with a leading task dimension, ready for ``adjoint_meta_grad(...,
batched=True)``:

    >>> fam = CosMixture(shots=50, val=50)
    >>> pool = fam.pool(100, seed=0)             # a fixed pool of 100 tasks, data included
    >>> batch = pool.batch(torch.tensor([3, 7])) # support x [2, 50, 2], y [2, 50, 1]
    >>> batch.support[0].shape
    torch.Size([2, 50, 2])

* :class:`CosMixture`: ``f(x) = -0.1 sum_i A cos(w x_i + phi) - sum_i x_i^2``, ``x in [-1, 1]^2``,
  ``A ~ U[0.1, 1]``, ``w ~ U[0.5 pi, 2 pi]``, ``phi ~ U[3, 6]``.
* :class:`Alpine`: ``f(x) = sum_i |x_i sin(x_i + phi_i) + 0.1 x_i|``, ``x in [-10, 10]^2``,
  ``phi_1, phi_2 ~ U[-5 pi / 12, 5 pi / 12]`` independently. The model sees ``x / 10`` (in
  ``[-1, 1]^2``; ``input_scale=0.1``): with raw inputs the gradient flow of the paper's MLP is
  stiff (dopri5 needs ~600 steps for T = 2, and GD with step 0.01 is at the edge of stability,
  so its exact meta-gradient has norm ~1e5 and the Heun adjoint at h = 0.01 overflows).
  ``Alpine(input_scale=1.0)`` gives the raw inputs.

The stored support/query ``x`` is what the model sees: ``input_scale * x``; ``y = f(x)``.

Pools are seeded: ``family.pool(100, seed=0)`` and ``family.pool(100, seed=1)`` are the
meta-training and the meta-test tasks of :func:`train_test_pools` (disjoint seeds, so the
test tasks are new tasks). Everything is generated in float64 on the CPU from a
``torch.Generator`` and cast on request, so a pool is the same on every machine and device.
"""

import math
from typing import Dict, Optional, Tuple

import torch

from .. import _checks
from .batch import TaskBatch, TaskPool
from .settings import SYNTHETIC_SETTINGS as SETTINGS

__all__ = ["TaskFamily", "CosMixture", "Alpine", "FAMILIES", "SETTINGS", "make_family", "train_test_pools"]


class TaskFamily:
    """Base class: subclasses define ``name``, ``low/high`` (the input box), ``sample_params``
    and ``function``.

    Args:
        shots: support points per task (k).
        val: query points per task.
        input_scale: the factor on the inputs the model sees (default the family's:
            :class:`Alpine` 0.1, :class:`CosMixture` 1).

    Raises:
        ValueError: a non-positive ``shots``, ``val`` or ``input_scale``.

    Example:
        >>> import torch
        >>> from amaml_ext.tasks import TaskFamily
        >>> class Line(TaskFamily):                        # y = a x_1 + b x_2
        ...     name = "line"
        ...     def sample_params(self, n, g):
        ...         return torch.rand(n, 2, generator=g, dtype=torch.float64)
        ...     def function(self, x, params):
        ...         return (x * params[:, None, :]).sum(-1, keepdim=True)
        >>> Line(shots=4, val=6).pool(3, seed=0).data.query[1].shape
        torch.Size([3, 6, 1])
    """

    name = "family"
    in_dim = 2
    low, high = -1.0, 1.0
    default_input_scale = 1.0

    def __init__(self, shots: int = 50, val: int = 50, input_scale: Optional[float] = None):
        self.shots, self.val = _checks.integer("shots", shots), _checks.integer("val", val)
        scale = self.default_input_scale if input_scale is None else input_scale
        self.input_scale = _checks.positive("input_scale", scale)

    def sample_params(self, n: int, g: torch.Generator) -> torch.Tensor:  # pragma: no cover
        """``[n, p]`` float64 parameters of ``n`` tasks, drawn from ``g``."""
        raise NotImplementedError

    def function(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """``x [B, k, in]``, ``params [B, p]`` -> ``y [B, k, 1]``."""
        raise NotImplementedError

    def _inputs(self, n: int, k: int, g: torch.Generator) -> torch.Tensor:
        u = torch.rand(n, k, self.in_dim, generator=g, dtype=torch.float64)
        return self.low + (self.high - self.low) * u

    def pool(self, n: int, seed: int) -> TaskPool:
        """``n`` tasks with their support and query data, all drawn from ``seed``."""
        _checks.integer("n", n)
        g = torch.Generator().manual_seed(int(seed))
        params = self.sample_params(n, g)
        xs = self._inputs(n, self.shots, g)
        xq = self._inputs(n, self.val, g)
        c = self.input_scale
        batch = TaskBatch((c * xs, self.function(xs, params)), (c * xq, self.function(xq, params)))
        return TaskPool(self, params, batch)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shots={self.shots}, val={self.val}, input_scale={self.input_scale:g})"


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


class CosMixture(TaskFamily):
    """``f(x) = -0.1 sum_i A cos(w x_i + phi) - sum_i x_i^2`` on ``[-1, 1]^2``; params (A, w, phi).

    Arguments as :class:`TaskFamily`; the paper's settings are :data:`SETTINGS`.

    Example:
        >>> from amaml_ext.tasks import CosMixture
        >>> pool = CosMixture(shots=50, val=50).pool(100, seed=0)
        >>> pool.data.support[0].shape, pool.params.shape            # x [100, 50, 2]; (A, w, phi)
        (torch.Size([100, 50, 2]), torch.Size([100, 3]))
    """

    name = "cosmixture"
    low, high = -1.0, 1.0

    def sample_params(self, n, g):
        A = _uniform(n, 0.1, 1.0, g)
        w = _uniform(n, 0.5 * math.pi, 2 * math.pi, g)
        phi = _uniform(n, 3.0, 6.0, g)
        return torch.stack([A, w, phi], dim=1)

    def function(self, x, params):
        A, w, phi = (params[:, i, None, None] for i in range(3))
        return (-0.1 * (A * torch.cos(w * x + phi)).sum(-1, keepdim=True)
                - (x ** 2).sum(-1, keepdim=True))


class Alpine(TaskFamily):
    """``f(x) = sum_i |x_i sin(x_i + phi_i) + 0.1 x_i|`` on ``[-10, 10]^2``; params (phi_1, phi_2).

    Arguments as :class:`TaskFamily`; the model sees ``x / 10`` (``input_scale=0.1``).

    Example:
        >>> from amaml_ext.tasks import Alpine
        >>> x = Alpine(shots=50, val=50).pool(4, seed=0).data.support[0]
        >>> bool(x.abs().max() <= 1.0), Alpine(input_scale=1.0)
        (True, Alpine(shots=50, val=50, input_scale=1))
    """

    name = "alpine"
    low, high = -10.0, 10.0
    default_input_scale = 0.1

    def sample_params(self, n, g):
        lim = 5 * math.pi / 12
        return torch.stack([_uniform(n, -lim, lim, g), _uniform(n, -lim, lim, g)], dim=1)

    def function(self, x, params):
        phi = params[:, None, :]
        return (x * torch.sin(x + phi) + 0.1 * x).abs().sum(-1, keepdim=True)


FAMILIES: Dict[str, type] = {"cosmixture": CosMixture, "alpine": Alpine}
"""The synthetic task families by name (:func:`make_family`)."""


def make_family(name: str, shots: int = 50, val: int = 50) -> TaskFamily:
    """A task family by name (``"cosmixture"`` or ``"alpine"``), with ``shots`` support and
    ``val`` query points per task.

    Raises:
        ValueError: ``name`` is not in :data:`FAMILIES`, or bad ``shots``/``val``.

    Example:
        >>> make_family("alpine", shots=10, val=10)
        Alpine(shots=10, val=10, input_scale=0.1)
    """
    _checks.choice("task", name, sorted(FAMILIES))
    return FAMILIES[name](shots=shots, val=val)


def train_test_pools(family: TaskFamily, n_train: int = 100, n_test: int = 100,
                     seed: int = 0) -> Tuple[TaskPool, TaskPool]:
    """The fixed meta-training pool and the pool of new test tasks (seeds ``2 seed`` and
    ``2 seed + 1``: disjoint for every seed).

    Args:
        family: the task family.
        n_train: meta-training tasks.
        n_test: test tasks.
        seed: the pair's seed.

    Returns:
        ``(train_pool, test_pool)``, two :class:`~amaml_ext.tasks.TaskPool`.

    Example:
        >>> train, test = train_test_pools(CosMixture(shots=10, val=10), n_train=20, n_test=5)
        >>> len(train), len(test), bool((train.params[:5] == test.params).all())
        (20, 5, False)
    """
    return family.pool(n_train, 2 * seed), family.pool(n_test, 2 * seed + 1)


# The real-data task families live in amaml_ext.ratings (MovieLens-100K/1M, Jester) and
