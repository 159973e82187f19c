"""A fixed, indexable set of episodes of one split, for meta_train / meta_test."""

from typing import Optional

import torch

from ... import _checks
from ..batch import TaskBatch, task_seed
from .fewshot import FewShotImages


class EpisodePool:
    """``size`` N-way K-shot episodes of one split, episode ``i`` drawn from a generator seeded
    by ``(seed, i)``: indexable like :class:`amaml_ext.tasks.TaskPool` (``len``, ``batch(index,
    device=, dtype=)``, ``all()``) without holding the images of every episode, and the same
    episodes on every run, so a resumed meta-training run sees the same tasks. A huge ``size``
    (the default) makes it a stream of fresh episodes.

    Args:
        dataset: an :class:`~amaml_ext.tasks.Omniglot` or :class:`~amaml_ext.tasks.MiniImageNet`.
        split: the split the episodes come from.
        size: the number of episodes.
        ways: classes per episode (N; default the dataset's).
        shots: support images per class (K).
        query_shots: query images per class.
        seed: seeds the episodes.

    Raises:
        ValueError: an unknown split, or more ways or shots than it holds.

    Example:
        >>> import os, tempfile
        >>> from PIL import Image
        >>> from amaml_ext.tasks import EpisodePool, Omniglot
        >>> tmp = tempfile.TemporaryDirectory()
        >>> for src in ("images_background", "images_evaluation"):     # 3 characters x 2 drawings each
        ...     for c in range(1, 4):
        ...         d = os.path.join(tmp.name, "omniglot", src, "Alpha", f"character{c:02d}")
        ...         os.makedirs(d)
        ...         for j in (1, 2):
        ...             Image.new("1", (105, 105), j % 2).save(os.path.join(d, f"{c:02d}_{j:02d}.png"))
        >>> om = Omniglot(tmp.name, rotations=(0,), class_split="background")
        >>> pool = EpisodePool(om, "test", size=100, ways=2, shots=1, query_shots=1, seed=0)
        >>> b = pool.batch([0, 7])
        >>> len(pool), b.support[0].shape, bool((pool.batch([7]).query[0] == b.query[0][1:]).all())
        (100, torch.Size([2, 2, 1, 28, 28]), True)
        >>> tmp.cleanup()
    """

    def __init__(self, dataset: FewShotImages, split: str = "train", *, size: int = 10 ** 9, ways: Optional[int] = None,
                 shots: Optional[int] = None, query_shots: Optional[int] = None, seed: int = 0):
        self.family = dataset
        self.split = dataset._check_split(split)
        self.size = _checks.integer("size", size)
        self.ways = _checks.integer("ways", dataset.default_ways if ways is None else ways)
        self.shots = _checks.integer("shots", dataset.default_shots if shots is None else shots)
        self.query_shots = _checks.integer("query_shots", dataset.default_query_shots if query_shots is None
                                      else query_shots, lo=0)
        _checks.seed("seed", seed)
        self.seed = int(seed)
        # validate ways/shots against the split now, not at the first batch
        dataset.sample(self.split, 1, self.ways, self.shots, self.query_shots, seed=0)

    def __len__(self) -> int:
        return self.size

    def batch(self, index, device=None, dtype=torch.float32) -> TaskBatch:
        """Episodes ``index`` (a 1-D tensor or list of indices) as a :class:`~amaml_ext.tasks.TaskBatch`;
        IndexError outside ``0 .. size - 1``."""
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.size):
            raise IndexError(f"episode index out of range 0..{self.size - 1}: {index.tolist()}")
        parts = [self.family.sample(self.split, 1, self.ways, self.shots, self.query_shots,
                                    seed=task_seed(self.seed, i), dtype=dtype or torch.float32)
                 for i in index.tolist()]
        cat = lambda k, j: torch.cat([getattr(p, k)[j] for p in parts])  # noqa: E731
        b = TaskBatch((cat("support", 0), cat("support", 1)), (cat("query", 0), cat("query", 1)))
        return b.to(device=device) if device is not None else b

    def all(self, device=None, dtype=torch.float32) -> TaskBatch:
        """Every episode as one batch (for a small ``size`` only)."""
        return self.batch(torch.arange(self.size), device=device, dtype=dtype)
