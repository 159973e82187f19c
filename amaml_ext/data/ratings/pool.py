"""A fixed set of rating tasks (one per user), building one-hot inputs per batch."""

from typing import Optional

import torch

from ..batch import TaskBatch, TaskPool, task_seed


def rated_first(rated: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per row of ``rated`` (``[n, items]`` bool), the item positions with the rated ones first,
    in a random order drawn from ``g`` (then the unrated ones)."""
    keys = torch.rand(rated.shape, generator=g, dtype=torch.float64).masked_fill(~rated, 2.0)
    return keys.argsort(dim=1, stable=True)


class RatingPool(TaskPool):
    """A fixed set of rating tasks (one per user). Stores, per task, the item indices and scaled
    targets of its support and query ratings; :meth:`batch` builds the one-hot inputs. Behaves
    like :class:`~amaml_ext.tasks.TaskPool` (``len``, ``batch``, ``all``, ``params``, ``family``,
    ``data``).

    ``shots`` and ``val`` are the setting's sizes. A pool made with ``test_query="rest"`` holds
    each user's remaining ratings as the query (``query_sizes`` of them, padded to the largest
    and marked by ``query_mask``); otherwise every query has ``val`` ratings and ``query_mask``
    is None. Made by ``RatingDataset.pools``.

    Example:
        >>> import os, tempfile
        >>> from amaml_ext.tasks import MovieLens100K
        >>> tmp = tempfile.TemporaryDirectory(); os.makedirs(os.path.join(tmp.name, "ml-100k"))
        >>> with open(os.path.join(tmp.name, "ml-100k", "u.data"), "w") as f:     # 12 users x 30 movies
        ...     _ = f.write("".join(f"{u}\\t{i}\\t{1 + u * i % 5}\\t0\\n" for u in range(1, 13) for i in range(1, 31)))
        >>> train, test = MovieLens100K(tmp.name, num_test=2).pools((5, 8), seed=0)    # a RatingPool each
        >>> train.shots, train.val, train.setting, train.support_items.shape
        (5, 8, '5shot-8val', torch.Size([10, 5]))
        >>> train.batch([3]).query[0].shape                # one-hot items [1, val, in_dim]
        torch.Size([1, 8, 30])
        >>> tmp.cleanup()
    """

    def __init__(self, family, users: torch.Tensor, support_items: torch.Tensor,
                 support_y: torch.Tensor, query_items: torch.Tensor, query_y: torch.Tensor, setting: str,
                 val: Optional[int] = None, query_mask: Optional[torch.Tensor] = None, resample: bool = False):
        # no TaskPool.__init__: ``data`` is built on request (see the property below)
        self.family = family
        self.users = users                                    # [n] long, the original user ids
        self.params = users.to(torch.float64).unsqueeze(1)    # [n, 1]
        self.support_items, self.support_y = support_items, support_y    # [n, k] long, [n, k, 1] float64
        self.query_items, self.query_y = query_items, query_y            # [n, v] long, [n, v, 1] float64
        self.query_mask = query_mask                                     # [n, v] bool or None
        self.setting = setting
        self._val = query_items.shape[1] if val is None else int(val)
        self.in_dim = family.in_dim
        self.resample = bool(resample)

    @property
    def shots(self) -> int:
        """Support ratings per task (k)."""
        return self.support_items.shape[1]

    @property
    def val(self) -> int:
        """Query ratings per task (the setting's v)."""
        return self._val

    @property
    def query_sizes(self) -> torch.Tensor:
        """``[n]``: each task's number of (real) query ratings."""
        if self.query_mask is None:
            return torch.full((len(self),), self.query_items.shape[1], dtype=torch.long)
        return self.query_mask.sum(1)

    @property
    def data(self) -> TaskBatch:
        """All tasks as one float64 :class:`TaskBatch` (built on each access)."""
        return self.all()

    def _one_hot(self, items: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(items, self.in_dim).to(torch.float64)

    def batch(self, index: torch.Tensor, device=None, dtype=None) -> TaskBatch:
        """Tasks ``index`` (a 1-D tensor of indices) as a batch, cast to ``device``/``dtype``."""
        index = torch.as_tensor(index, dtype=torch.long)
        mask = None if self.query_mask is None else self.query_mask[index]
        b = TaskBatch((self._one_hot(self.support_items[index]), self.support_y[index]),
                      (self._one_hot(self.query_items[index]), self.query_y[index]), mask)
        return b.to(device=device, dtype=dtype)

    def draw(self, index: torch.Tensor, *, step: int, seed: int, device=None, dtype=None) -> TaskBatch:
        """The tasks ``index`` as meta-step ``step`` of a run seeded ``seed`` sees them (what
        :func:`~amaml_ext.train.meta_train` calls). Without ``resample`` this is
        :meth:`batch`. With it, each task's ``shots`` support and ``val`` query ratings are drawn
        afresh among all of the user's ratings at every visit, from a generator seeded by
        ``(seed, step)``, so a resumed run sees the same draws."""
        if not self.resample:
            return self.batch(index, device=device, dtype=dtype)
        index = torch.as_tensor(index, dtype=torch.long)
        g = torch.Generator().manual_seed(task_seed(seed, step) ^ 0x5DEECE66D)
        rows = torch.searchsorted(self.family.users, self.users[index])
        order = rated_first(self.family._rated[rows], g)[:, :self.shots + self.val]
        y = self.family._targets[rows.unsqueeze(1), order].unsqueeze(2)
        k = self.shots
        b = TaskBatch((self._one_hot(order[:, :k]), y[:, :k]), (self._one_hot(order[:, k:]), y[:, k:]))
        return b.to(device=device, dtype=dtype)

    def __repr__(self) -> str:
        rest = "" if self.query_mask is None else ", query: all remaining ratings"
        rest += ", resampled at every visit" if self.resample else ""
        return f"RatingPool({self.family.name}, {self.setting}, {len(self)} users{rest})"

