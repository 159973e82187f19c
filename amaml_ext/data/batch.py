"""What every task source hands the learners: a :class:`TaskBatch`, a :class:`TaskPool` to index,
and the seeds that make a pool's draws and a run's meta-batches the same on every machine.

The pool protocol (what ``meta_train``/``meta_test`` need of a pool): ``len(pool)``,
``pool.batch(index, device=, dtype=) -> TaskBatch`` and ``pool.all(device=, dtype=)``;
:class:`TaskPool`, ``RatingPool`` and ``EpisodePool`` follow it."""

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

#: a large prime: ``seed * _SEED_MIX + i`` gives distinct streams for (seed, i) pairs
_SEED_MIX = 1_000_003


def task_seed(seed: int, i: int) -> int:
    """The seed of draw ``i`` of a stream seeded with ``seed`` (episode ``i``, meta-step ``i``)."""
    return int(seed) * _SEED_MIX + int(i)


@dataclass
class TaskBatch:
    """B tasks: ``support = (x [B, k, in], y [B, k, 1])``, ``query`` likewise.

    ``query_mask`` (``[B, v]`` bool, optional) marks the real query points when the tasks'
    query sets have different sizes and are padded to the largest (the rating test pools,
    whose query is each test user's remaining ratings). Only meta-testing reads it; the
    learners refuse a masked batch rather than train on padding.

    Example:
        >>> import torch
        >>> from amaml_ext.tasks import TaskBatch
        >>> b = TaskBatch((torch.zeros(3, 5, 2), torch.zeros(3, 5, 1)), (torch.zeros(3, 7, 2), torch.zeros(3, 7, 1)))
        >>> b.size, b.select(torch.tensor([0, 2])).size, b.task(1).support[0].shape
        (3, 2, torch.Size([5, 2]))
        >>> b.to(dtype=torch.float64).query[1].dtype
        torch.float64
    """

    support: Tuple[torch.Tensor, torch.Tensor]
    query: Tuple[torch.Tensor, torch.Tensor]
    query_mask: Optional[torch.Tensor] = None

    @property
    def size(self) -> int:
        """B, the number of tasks."""
        return self.support[0].shape[0]

    def to(self, device=None, dtype=None) -> "TaskBatch":
        """A copy on ``device`` with the floating-point tensors cast to ``dtype`` (labels and the
        mask keep theirs)."""
        cast = lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None)  # noqa: E731
        mask = None if self.query_mask is None else self.query_mask.to(device=device)
        return TaskBatch(tuple(map(cast, self.support)), tuple(map(cast, self.query)), mask)

    def select(self, index) -> "TaskBatch":
        """Tasks ``index`` (a 1-D index tensor or a slice), keeping the task dimension."""
        mask = None if self.query_mask is None else self.query_mask[index]
        return TaskBatch(tuple(t[index] for t in self.support), tuple(t[index] for t in self.query), mask)

    def task(self, b: int) -> "TaskBatch":
        """Task ``b`` alone (no task dimension)."""
        mask = None if self.query_mask is None else self.query_mask[b]
        return TaskBatch(tuple(t[b] for t in self.support), tuple(t[b] for t in self.query), mask)


class TaskPool:
    """A fixed set of tasks with their data (float64, CPU); index it to get a batch.

    Args:
        family: the :class:`~amaml_ext.tasks.TaskFamily` that drew the tasks.
        params: ``[n, p]``, the tasks' parameters.
        batch: the tasks' data, a :class:`TaskBatch` of ``n`` tasks.

    Example:
        >>> import torch
        >>> from amaml_ext import tasks
        >>> pool = tasks.CosMixture(shots=10, val=20).pool(8, seed=0)      # a TaskPool
        >>> len(pool), pool.params.shape
        (8, torch.Size([8, 3]))
        >>> b = pool.batch(torch.tensor([1, 5]), dtype=torch.float32)
        >>> b.support[0].shape, b.query[1].shape, b.query[1].dtype
        (torch.Size([2, 10, 2]), torch.Size([2, 20, 1]), torch.float32)
    """

    def __init__(self, family, params: torch.Tensor, batch: TaskBatch):
        self.family = family
        self.params = params
        self.data = batch

    def __len__(self) -> int:
        return self.params.shape[0]

    def batch(self, index: torch.Tensor, device=None, dtype=None) -> TaskBatch:
        """Tasks ``index`` (a 1-D tensor of indices) as a batch, cast to ``device``/``dtype``."""
        return self.data.select(torch.as_tensor(index, dtype=torch.long)).to(device=device, dtype=dtype)

    def all(self, device=None, dtype=None) -> TaskBatch:
        """Every task as one batch, cast to ``device``/``dtype``."""
        return self.batch(torch.arange(len(self)), device=device, dtype=dtype)



def task_indices(seed: int, step: int, pool_size: int, meta_batch: int) -> torch.Tensor:
    """The meta-batch of step ``step``: ``meta_batch`` distinct pool indices, a function of
    ``(seed, step)`` only (so a resumed run draws the same tasks).

    Example:
        >>> from amaml_ext.train import task_indices
        >>> idx = task_indices(seed=0, step=3, pool_size=100, meta_batch=5)
        >>> idx.shape, bool((idx == task_indices(0, 3, 100, 5)).all()), len(set(idx.tolist()))
        (torch.Size([5]), True, 5)
    """
    g = torch.Generator().manual_seed(task_seed(seed, step))
    if pool_size <= 1_000_000:
        return torch.randperm(pool_size, generator=g)[:meta_batch]
    # a huge pool (a stream of episodes): draw until meta_batch distinct indices, no permutation
    picked: List[int] = []
    while len(picked) < meta_batch:
        for i in torch.randint(pool_size, (meta_batch,), generator=g).tolist():
            if i not in picked and len(picked) < meta_batch:
                picked.append(i)
    return torch.tensor(picked, dtype=torch.long)
