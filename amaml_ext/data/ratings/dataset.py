"""The base class of the rating datasets: filtering to the most-rated items, settings, and the
train/test pools of a seed."""

from typing import Optional, Tuple

import numpy as np
import pandas as pd
import torch

from ... import _checks
from ..root import given_root
from ..settings import RATING_SETTINGS
from .pool import RatingPool, rated_first



def _parse_setting(setting) -> Tuple[str, int, int]:
    if isinstance(setting, str):
        if setting not in RATING_SETTINGS:
            raise ValueError(f"argument 'setting' must be one of {list(RATING_SETTINGS)} or a (shots, val) pair of "
                             f"positive ints, got {setting!r}")
        shots, val = RATING_SETTINGS[setting]
        return setting, shots, val
    if (isinstance(setting, (tuple, list)) and len(setting) == 2
            and all(_checks.is_int(v) and v >= 1 for v in setting)):
        shots, val = int(setting[0]), int(setting[1])
        return f"{shots}shot-{val}val", shots, val
    raise ValueError(f"argument 'setting' must be one of {list(RATING_SETTINGS)} or a (shots, val) pair of "
                     f"positive ints, got {setting!r}")


# --------------------------------------------------------------------------------------------
# file reading


class RatingDataset:
    """Base class of the rating datasets; subclasses define ``name``, ``default_min_ratings``,
    ``scale`` / ``unscale`` and ``_load`` (the raw (user, item, rating) triples).

    Attributes (of the raw file): ``num_ratings``, ``num_users``, ``num_items``. After filtering:
    ``num_tasks`` (kept users), ``in_dim`` (kept items), ``users`` (kept user ids, ascending),
    ``items`` (kept item ids, ascending: item ``items[j]`` is one-hot position ``j``) and
    ``ratings_per_user`` (each kept user's number of ratings of the kept items).
    """

    name = "ratings"
    default_min_ratings = 20

    def __init__(self, root=None, *, top_items: int = 100, min_ratings: Optional[int] = None,
                 num_test: int = 100):
        self.top_items = _checks.integer("top_items", top_items, 1)
        if min_ratings is None:
            min_ratings = self.default_min_ratings
        self.min_ratings = _checks.integer("min_ratings", min_ratings, 1)
        self.num_test = _checks.integer("num_test", num_test, 1)
        self.root = given_root(root, "ml-100k/, ml-1m/ and/or jester/")
        users, items, ratings, self.num_users, self.num_items = self._load()
        self.num_ratings = int(len(ratings))
        self._filter(users, items, ratings)

    # -- to be defined by subclasses
    def _load(self):  # pragma: no cover
        """``(users, items, ratings, num_users, num_items)``: int64/int64/float64 arrays of the
        raw ratings and the raw counts."""
        raise NotImplementedError

    @staticmethod
    def scale(r):  # pragma: no cover
        """Raw rating -> target in [-1, 1]."""
        raise NotImplementedError

    @staticmethod
    def unscale(y):  # pragma: no cover
        """Target -> raw rating."""
        raise NotImplementedError

    # -- filtering
    def _filter(self, users: np.ndarray, items: np.ndarray, ratings: np.ndarray) -> None:
        counts = pd.Series(items).value_counts()
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))      # most rated first, ties: smaller id
        kept_items = np.sort(np.array([i for i, _ in ranked[:self.top_items]], dtype=np.int64))
        sel = np.isin(items, kept_items)
        u, it, r = users[sel], items[sel], ratings[sel]
        per_user = pd.Series(u).value_counts()
        kept_users = np.sort(per_user.index[per_user.to_numpy() >= self.min_ratings].to_numpy().astype(np.int64))
        sel = np.isin(u, kept_users)
        u, it, r = u[sel], it[sel], r[sel]
        targets = np.full((len(kept_users), len(kept_items)), np.nan)
        targets[np.searchsorted(kept_users, u), np.searchsorted(kept_items, it)] = self.scale(r)
        self.users = torch.from_numpy(kept_users)
        self.items = torch.from_numpy(kept_items)
        self._targets = torch.from_numpy(targets)           # [num_tasks, in_dim], NaN where not rated
        self._rated = ~torch.isnan(self._targets)
        self.ratings_per_user = self._rated.sum(1)

    @property
    def num_tasks(self) -> int:
        """Kept users (one task each)."""
        return int(self.users.numel())

    @property
    def in_dim(self) -> int:
        """Kept items: the dimension of the one-hot inputs."""
        return int(self.items.numel())

    def user_ratings(self, user: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """All kept ratings of user ``user`` (an original id): ``(item positions [n] long,
        targets [n, 1] float64)``, items in ascending order."""
        if not _checks.is_int(user):
            raise ValueError(f"argument 'user' must be an int (a user id), got {user!r}")
        pos = int(torch.searchsorted(self.users, torch.tensor(int(user))))
        if pos >= self.num_tasks or int(self.users[pos]) != user:
            raise ValueError(f"argument 'user' must be a kept user id of {self.name} (one with at least "
                             f"{self.min_ratings} ratings of the {self.in_dim} kept items), got {user!r}")
        idx = torch.nonzero(self._rated[pos]).squeeze(1)
        return idx, self._targets[pos, idx].unsqueeze(1)

    def eligible_users(self, setting="10shot-15val") -> torch.Tensor:
        """The kept user ids with at least ``shots + val`` ratings of the kept items."""
        _, shots, val = _parse_setting(setting)
        return self.users[self.ratings_per_user >= shots + val]

    def pools(self, setting="10shot-15val", seed: int = 0, test_query: str = "rest",
              resample: bool = False) -> Tuple[RatingPool, RatingPool]:
        """``(meta-training pool, test pool)`` for ``setting`` (a key of
        :data:`RATING_SETTINGS` or a ``(shots, val)`` pair), all drawn from ``seed``: the test
        pool holds ``num_test`` users drawn among the eligible users, the training pool the other
        eligible users (both in ascending user id); each task's support and query ratings are
        ``shots`` and ``val`` distinct rated items drawn at random.

        ``test_query="rest"`` (the paper's protocol, the default): a test user's query is all of
        their ratings not in the support set (padded, with ``query_mask``); ``"val"``: ``val``
        of them, like the training tasks. The training pool and the test users and supports do
        not depend on ``test_query``.

        ``resample=True``: the training pool draws each task's support and query afresh at every
        meta-training visit (:meth:`RatingPool.draw`) instead of keeping the split drawn here."""
        name, shots, val = _parse_setting(setting)
        if not _checks.is_int(seed):
            raise ValueError(f"argument 'seed' must be an int, got {seed!r}")
        if not isinstance(resample, bool):
            raise ValueError(f"argument 'resample' must be a bool, got {resample!r}")
        if test_query not in ("rest", "val"):
            raise ValueError(f"argument 'test_query' must be 'rest' (all remaining ratings) or 'val' "
                             f"({val} ratings), got {test_query!r}")
        need = shots + val
        elig = torch.nonzero(self.ratings_per_user >= need).squeeze(1)     # task rows
        if elig.numel() <= self.num_test:
            raise ValueError(f"argument 'setting': {name} needs users with at least {need} ratings of the "
                             f"{self.in_dim} kept items; {self.name} has {elig.numel()} such users, not more than "
                             f"num_test={self.num_test} (no meta-training users would be left)")
        g = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(elig.numel(), generator=g)
        order = rated_first(self._rated[elig], g)
        y = self._targets[elig.unsqueeze(1), order].unsqueeze(2)           # NaN past each user's ratings

        def make(pos: torch.Tensor, rest: bool, fresh: bool) -> RatingPool:
            pos = pos.sort().values
            width, mask = val, None
            if rest:
                n_query = self.ratings_per_user[elig[pos]] - shots
                width = int(n_query.max())
                mask = torch.arange(width).unsqueeze(0) < n_query.unsqueeze(1)
            q_items = order[pos, shots:shots + width]
            q_y = y[pos, shots:shots + width]
            if mask is not None:                                             # padding: item 0, target 0
                q_items = q_items.masked_fill(~mask, 0)
                q_y = q_y.masked_fill(~mask.unsqueeze(2), 0.0)
            return RatingPool(self, self.users[elig[pos]], order[pos, :shots].contiguous(),
                              y[pos, :shots].contiguous(), q_items.contiguous(), q_y.contiguous(), name,
                              val=val, query_mask=mask, resample=fresh)

        return (make(perm[self.num_test:], False, bool(resample)),
                make(perm[:self.num_test], test_query == "rest", False))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={self.root!r}, top_items={self.top_items}, "
                f"min_ratings={self.min_ratings}, num_test={self.num_test}): {self.num_ratings} ratings, "
                f"{self.num_users} users, {self.num_items} items -> {self.num_tasks} tasks, in_dim {self.in_dim}")

