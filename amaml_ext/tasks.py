"""Every task family and dataset in one namespace (they live in :mod:`amaml_ext.data`).

    >>> from amaml_ext import tasks
    >>> train_pool, test_pool = tasks.train_test_pools(tasks.CosMixture(shots=50, val=50))
    >>> ml = tasks.MovieLens100K("/data")   # or root=None: $AMAML_DATA_ROOT   # doctest: +SKIP
    >>> om = tasks.Omniglot("/data")                                           # doctest: +SKIP

The synthetic families are :mod:`amaml_ext.data.synthetic`; the rating datasets
(MovieLens-100K/1M, Jester; pandas) :mod:`amaml_ext.data.ratings`; the image datasets
(Omniglot, Mini-ImageNet; Pillow) :mod:`amaml_ext.data.images`. The last two are imported on
first use, so ``import amaml_ext`` does not load pandas or Pillow.
"""

import importlib

from .data.batch import TaskBatch, TaskPool
from .data.synthetic import FAMILIES, SETTINGS, Alpine, CosMixture, TaskFamily, make_family, train_test_pools

__all__ = ["TaskBatch", "TaskPool", "TaskFamily", "CosMixture", "Alpine", "FAMILIES", "SETTINGS",
           "make_family", "train_test_pools"]

_LAZY = {"MovieLens100K": "ratings", "MovieLens1M": "ratings", "Jester": "ratings", "RATING_SETTINGS": "ratings",
         "RatingPool": "ratings", "make_rating_dataset": "ratings", "Omniglot": "images", "MiniImageNet": "images",
         "EpisodePool": "images"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".data.{_LAZY[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
