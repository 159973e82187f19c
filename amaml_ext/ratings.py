"""Collaborative-filtering task families of the paper (Sec. 5.3): Jester-1, MovieLens-100K and
MovieLens-1M.

One task is one user: the model sees the **one-hot encoding of an item** (joke or movie; the
dimension is the number of kept items) and predicts **that user's rating** of it, scaled into
``[-1, 1]``:

* MovieLens (whole stars 1..5): ``y = (r - 3) / 2``;
* Jester (-10.00..+10.00): ``y = r / 10``.

Filtering (the paper, following Denevi et al.): keep the ``top_items=100`` most-rated items
(counted over the whole raw file; ties broken by the smaller item id), then keep the users with
at least ``min_ratings`` ratings of those items (MovieLens: 20; Jester: 1, i.e. all users, since
every Jester-1 user rated at least 36 jokes and there are only 100 jokes).

    >>> ds = MovieLens100K("/path/to/data")      # or root=None: $AMAML_DATA_ROOT
    >>> ds.num_ratings, ds.num_users, ds.num_items, ds.num_tasks
    (100000, 943, 1682, 575)
    >>> train, test = ds.pools("15shot-20val", seed=0)
    >>> b = train.batch(torch.tensor([0, 1]))     # support x [2, 15, 100], y [2, 15, 1]

Settings (:data:`RATING_SETTINGS`): ``10shot-15val``, ``15shot-20val``, ``20shot-30val`` (k
support ratings and v query ratings per task). A setting uses only the users with at least
``k + v`` ratings of the kept items ("eligible" users). The paper re-samples a task whose user
has too few ratings; here the pools are drawn among the eligible users only, which gives the
same distribution of tasks. :meth:`RatingDataset.pools` then draws, from one
``torch.Generator`` seeded by ``seed``: ``num_test=100`` test users among the eligible users
(held out; the other eligible users are the meta-training pool), and for every eligible user
``k + v`` distinct rated items, the first ``k`` as the support set and the other ``v`` as the
query set (so they never overlap). The query set of a test task has ``v`` ratings, a fixed size
(the paper evaluates on all of the test user's remaining ratings; :meth:`user_ratings` gives them).

Pools are :class:`RatingPool` objects, a :class:`amaml_ext.tasks.TaskPool` that keeps item
indices and targets and builds the one-hot inputs per batch (a Jester meta-training pool of
24,883 users stored as dense one-hots would take 0.5 to 1 GB); ``pool.batch(index, device=,
dtype=)`` returns the same :class:`~amaml_ext.tasks.TaskBatch` (float64 on the CPU, cast on
request) as the synthetic families, and ``pool.params`` holds the user ids as float64 ``[n, 1]``.

Files (read with pandas; see ``shared/data/README.md`` for the layout and the terms of use; the
data is never copied anywhere):

* ``root/ml-100k/u.data``: ``user<TAB>item<TAB>rating<TAB>timestamp``;
* ``root/ml-1m/ratings.dat``: ``UserID::MovieID::Rating::Timestamp``;
* ``root/jester/jester-data-1.xls`` (as released), or its CSV export ``jester-data-1.csv``
  (no header), plain or inside ``jester-data-1.zip``: one row per user, column 0 the number of
  rated jokes, then the ratings of jokes 1..100 in [-10, 10], ``99`` for "not rated".

A missing file raises :class:`FileNotFoundError`, a malformed one :class:`ValueError`, each
naming the file and what was expected.
"""

import numbers
import os
import warnings
import zipfile
from typing import Dict, Optional, Tuple

import numpy as np
import pandas as pd
import torch

from .tasks import TaskBatch, TaskPool

__all__ = ["RATING_SETTINGS", "DATA_ROOT_ENV", "RatingDataset", "RatingPool", "MovieLens100K", "MovieLens1M",
           "Jester", "RATING_DATASETS", "make_rating_dataset"]

#: the paper's k-shot / k-val settings for collaborative filtering (plus the smaller 10shot-15val)
RATING_SETTINGS: Dict[str, Tuple[int, int]] = {"10shot-15val": (10, 15), "15shot-20val": (15, 20),
                                               "20shot-30val": (20, 30)}
#: environment variable naming the data root when ``root`` is not given
DATA_ROOT_ENV = "AMAML_DATA_ROOT"


# --------------------------------------------------------------------------------------------
# argument checks


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_int(name: str, v, minimum: int) -> int:
    if not _is_int(v) or v < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"argument '{name}' must be {what}, got {v!r}")
    return int(v)


def _resolve_root(root) -> str:
    if root is None:
        root = os.environ.get(DATA_ROOT_ENV) or None
        if root is None:
            raise ValueError(f"argument 'root' must be the data directory (holding ml-100k/, ml-1m/, jester/); "
                             f"got None and the environment variable {DATA_ROOT_ENV} is not set")
    if not isinstance(root, (str, os.PathLike)):
        raise ValueError(f"argument 'root' must be a path (str or os.PathLike), got {root!r}")
    return os.fspath(root)


def _parse_setting(setting) -> Tuple[str, int, int]:
    if isinstance(setting, str):
        if setting not in RATING_SETTINGS:
            raise ValueError(f"argument 'setting' must be one of {list(RATING_SETTINGS)} or a (shots, val) pair of "
                             f"positive ints, got {setting!r}")
        shots, val = RATING_SETTINGS[setting]
        return setting, shots, val
    if (isinstance(setting, (tuple, list)) and len(setting) == 2
            and all(_is_int(v) and v >= 1 for v in setting)):
        shots, val = int(setting[0]), int(setting[1])
        return f"{shots}shot-{val}val", shots, val
    raise ValueError(f"argument 'setting' must be one of {list(RATING_SETTINGS)} or a (shots, val) pair of "
                     f"positive ints, got {setting!r}")


# --------------------------------------------------------------------------------------------
# file reading


def _missing(path: str, what: str, root: str) -> FileNotFoundError:
    where = "" if os.path.isdir(root) else f" (the root directory {root!r} does not exist)"
    return FileNotFoundError(f"{what}: expected the file {path!r}, which does not exist{where}")


def _read_csv(source, path: str, what: str, **kw) -> pd.DataFrame:
    """``pd.read_csv`` with the parser's errors turned into ValueErrors that name the file."""
    try:
        return pd.read_csv(source, header=None, **kw)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path!r} is empty; expected {what}") from None
    except pd.errors.ParserError as e:
        raise ValueError(f"{path!r} is malformed: {str(e).strip()}; expected {what}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path!r} is not a text file ({e}); expected {what}") from None


def _numeric(df: pd.DataFrame, path: str, what: str, columns=None) -> np.ndarray:
    """The frame as a float64 array; a ValueError naming the row and column of the first
    non-numeric or missing value. ``columns`` restricts the checks (and the result) to those."""
    columns = list(df.columns) if columns is None else list(columns)
    out = np.empty((len(df), len(columns)), dtype=np.float64)
    for j, c in enumerate(columns):
        col = df[c]
        if pd.api.types.is_bool_dtype(col):
            raise ValueError(f"{path!r}: non-numeric value {col.iloc[0]!r} in row 1, column {c + 1}; expected {what}")
        if not pd.api.types.is_numeric_dtype(col):
            num = pd.to_numeric(col, errors="coerce")
            bad = num.isna() & col.notna()
            if bad.any():
                i = int(np.flatnonzero(bad.to_numpy())[0])
                raise ValueError(f"{path!r}: non-numeric value {col.iloc[i]!r} in row {i + 1}, column {c + 1}; "
                                 f"expected {what}")
            col = num
        vals = col.to_numpy(dtype=np.float64, na_value=np.nan)
        nan = np.isnan(vals)
        if nan.any():
            i = int(np.flatnonzero(nan)[0])
            raise ValueError(f"{path!r}: row {i + 1} has no value in column {c + 1} (a missing field, or too few "
                             f"fields on that line); expected {what}")
        if not np.isfinite(vals).all():
            i = int(np.flatnonzero(~np.isfinite(vals))[0])
            raise ValueError(f"{path!r}: non-finite value {vals[i]:g} in row {i + 1}, column {c + 1}; expected {what}")
        out[:, j] = vals
    return out


def _rated_first(rated: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per row of ``rated`` (``[n, items]`` bool), the item positions with the rated ones first,
    in a random order drawn from ``g`` (then the unrated ones)."""
    keys = torch.rand(rated.shape, generator=g, dtype=torch.float64).masked_fill(~rated, 2.0)
    return keys.argsort(dim=1, stable=True)


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _check_ids(arr: np.ndarray, path: str, name: str, column: int, what: str) -> np.ndarray:
    bad = (arr != np.round(arr)) | (arr < 1)
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(f"{path!r}: {name} {arr[i]:g} in row {i + 1}, column {column} is not a positive integer; "
                         f"expected {what}")
    return arr.astype(np.int64)


def _check_duplicates(users: np.ndarray, items: np.ndarray, path: str, what: str) -> None:
    key = pd.Series(users * (int(items.max()) + 1) + items)
    dup = key.duplicated().to_numpy()
    if dup.any():
        i = _first_bad(dup)
        raise ValueError(f"{path!r}: row {i + 1} rates item {items[i]} by user {users[i]} a second time; "
                         f"expected {what}")


def _read_movielens(path: str, sep: str, what: str):
    """(users, items, ratings) of a MovieLens rating file with whole-star ratings 1..5."""
    if sep == "::":
        # the C parser cannot split on "::": split on ":" and check that every other field is empty
        df = _read_csv(path, path, what, sep=":", engine="c")
        if df.shape[1] != 7 or not df[[1, 3, 5]].isna().all().all():
            raise ValueError(f"{path!r} does not have 4 '::'-separated fields on every line (split on ':' it has "
                             f"{df.shape[1]} columns, not 7 with every other one empty); expected {what}")
        df = df[[0, 2, 4, 6]]
        df.columns = range(4)
    else:
        df = _read_csv(path, path, what, sep=sep, engine="c")
        if df.shape[1] != 4:
            raise ValueError(f"{path!r} has {df.shape[1]} column(s), not 4; expected {what}")
    a = _numeric(df, path, what)
    users = _check_ids(a[:, 0], path, "user id", 1, what)
    items = _check_ids(a[:, 1], path, "item id", 2, what)
    r = a[:, 2]
    bad = (r != np.round(r)) | (r < 1) | (r > 5)
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(f"{path!r}: rating {r[i]:g} in row {i + 1} is out of range (MovieLens ratings are whole "
                         f"stars 1..5); expected {what}")
    _check_duplicates(users, items, path, what)
    return users, items, r


# --------------------------------------------------------------------------------------------
# pools


class RatingPool(TaskPool):
    """A fixed set of rating tasks (one per user). Stores, per task, the item indices and scaled
    targets of its support and query ratings; :meth:`batch` builds the one-hot inputs. Behaves
    like :class:`~amaml_ext.tasks.TaskPool` (``len``, ``batch``, ``all``, ``params``, ``family``,
    ``data``).

    ``shots`` and ``val`` are the setting's sizes. A pool made with ``test_query="rest"`` holds
    each user's remaining ratings as the query (``query_sizes`` of them, padded to the largest
    and marked by ``query_mask``); otherwise every query has ``val`` ratings and ``query_mask``
    is None."""

    def __init__(self, family: "RatingDataset", users: torch.Tensor, support_items: torch.Tensor,
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
        return self.support_items.shape[1]

    @property
    def val(self) -> int:
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
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) ^ 0x5DEECE66D)
        rows = torch.searchsorted(self.family.users, self.users[index])
        order = _rated_first(self.family._rated[rows], g)[:, :self.shots + self.val]
        y = self.family._targets[rows.unsqueeze(1), order].unsqueeze(2)
        k = self.shots
        b = TaskBatch((self._one_hot(order[:, :k]), y[:, :k]), (self._one_hot(order[:, k:]), y[:, k:]))
        return b.to(device=device, dtype=dtype)

    def __repr__(self) -> str:
        rest = "" if self.query_mask is None else ", query: all remaining ratings"
        rest += ", resampled at every visit" if self.resample else ""
        return f"RatingPool({self.family.name}, {self.setting}, {len(self)} users{rest})"


# --------------------------------------------------------------------------------------------
# datasets


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
        self.top_items = _check_int("top_items", top_items, 1)
        if min_ratings is None:
            min_ratings = self.default_min_ratings
        self.min_ratings = _check_int("min_ratings", min_ratings, 1)
        self.num_test = _check_int("num_test", num_test, 1)
        self.root = _resolve_root(root)
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
        return int(self.users.numel())

    @property
    def in_dim(self) -> int:
        return int(self.items.numel())

    def user_ratings(self, user: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """All kept ratings of user ``user`` (an original id): ``(item positions [n] long,
        targets [n, 1] float64)``, items in ascending order."""
        if not _is_int(user):
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
        if not _is_int(seed):
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
        order = _rated_first(self._rated[elig], g)
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


class _MovieLens(RatingDataset):
    default_min_ratings = 20
    subdir = file = sep = ""

    @staticmethod
    def scale(r):
        """Whole stars 1..5 -> ``(r - 3) / 2`` in [-1, 1]."""
        return (r - 3.0) / 2.0

    @staticmethod
    def unscale(y):
        return 2.0 * y + 3.0

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.subdir, self.file)

    def _load(self):
        path = self.path
        sep = "tab" if self.sep == "\t" else repr(self.sep)
        what = (f"the {self.name} ratings file: one rating a line, {sep}-separated "
                f"user id, item id, rating (whole stars 1..5), timestamp")
        if not os.path.isfile(path):
            raise _missing(path, f"{self.name}: {what}", self.root)
        users, items, r = _read_movielens(path, self.sep, what)
        return users, items, r, int(np.unique(users).size), int(np.unique(items).size)


class MovieLens100K(_MovieLens):
    """MovieLens-100K from ``root/ml-100k/u.data`` (``user<TAB>item<TAB>rating<TAB>timestamp``).

    Targets ``(r - 3) / 2`` in [-1, 1]; keeps the ``top_items=100`` most-rated movies and the users
    with at least ``min_ratings=20`` ratings of them. ``root`` defaults to ``$AMAML_DATA_ROOT``."""

    name = "movielens-100k"
    subdir, file, sep = "ml-100k", "u.data", "\t"


class MovieLens1M(_MovieLens):
    """MovieLens-1M from ``root/ml-1m/ratings.dat`` (``UserID::MovieID::Rating::Timestamp``).

    Targets ``(r - 3) / 2`` in [-1, 1]; keeps the ``top_items=100`` most-rated movies and the users
    with at least ``min_ratings=20`` ratings of them. ``root`` defaults to ``$AMAML_DATA_ROOT``."""

    name = "movielens-1m"
    subdir, file, sep = "ml-1m", "ratings.dat", "::"


class Jester(RatingDataset):
    """Jester dataset 1, part ``part`` (1, 2 or 3; the paper's Jester-1 is part 1), from
    ``root/jester/``: ``jester-data-<part>.xls`` (as released), else ``jester-data-<part>.csv``
    (its header-less CSV export), else that CSV inside ``jester-data-<part>.zip``.

    One row per user (user id = row number, from 1): column 0 the number of rated jokes, then the
    ratings of jokes 1..100 in [-10, 10], ``99`` = not rated. Targets ``r / 10`` in [-1, 1]. Keeps
    the ``top_items=100`` most-rated jokes (all of them) and the users with at least
    ``min_ratings=1`` rating (all users). ``root`` defaults to ``$AMAML_DATA_ROOT``."""

    name = "jester"
    default_min_ratings = 1
    NOT_RATED = 99.0

    def __init__(self, root=None, *, part: int = 1, top_items: int = 100, min_ratings: Optional[int] = None,
                 num_test: int = 100):
        if not _is_int(part) or part not in (1, 2, 3):
            raise ValueError(f"argument 'part' must be 1, 2 or 3, got {part!r}")
        self.part = int(part)
        self.name = f"jester-{self.part}"
        super().__init__(root, top_items=top_items, min_ratings=min_ratings, num_test=num_test)

    @staticmethod
    def scale(r):
        """-10..10 -> ``r / 10`` in [-1, 1]."""
        return r / 10.0

    @staticmethod
    def unscale(y):
        return 10.0 * y

    def candidates(self):
        stem = os.path.join(self.root, "jester", f"jester-data-{self.part}")
        return [stem + ".xls", stem + ".csv", stem + ".zip"]

    def _load(self):
        what = ("the Jester ratings matrix: one row per user, 101 numeric columns (the number of rated jokes, "
                "then the ratings of jokes 1..100 in [-10, 10], 99 = not rated), no header")
        found = [p for p in self.candidates() if os.path.isfile(p)]
        if not found:
            where = "" if os.path.isdir(self.root) else f" (the root directory {self.root!r} does not exist)"
            raise FileNotFoundError(f"{self.name}: expected one of {self.candidates()} ({what}); none exists{where}")
        path = self.path = found[0]
        if path.endswith(".xls"):
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*xlrd.*")
                    df = pd.read_excel(path, header=None, engine="xlrd")
            except ImportError as e:
                raise ImportError(f"reading {path!r} needs the xlrd package ({e}); or export the sheet to "
                                  f"jester-data-{self.part}.csv") from None
            except Exception as e:  # xlrd raises its own XLRDError (and others) on a corrupt file
                raise ValueError(f"{path!r} is not a readable .xls file ({type(e).__name__}: {e}); "
                                 f"expected {what}") from None
        elif path.endswith(".csv"):
            df = _read_csv(path, path, what, engine="c")
        else:
            member_name = f"jester-data-{self.part}.csv"
            try:
                with zipfile.ZipFile(path) as zf:
                    csvs = [n for n in zf.namelist() if n.lower().endswith(".csv") and not n.startswith("__MACOSX")]
                    named = [n for n in csvs if os.path.basename(n) == member_name]
                    member = named[0] if named else (csvs[0] if len(csvs) == 1 else None)
                    if member is None:
                        raise ValueError(f"{path!r} holds no {member_name} (its .csv members: {csvs}); "
                                         f"expected {what}")
                    with zf.open(member) as f:
                        df = _read_csv(f, f"{path}:{member}", what, engine="c")
            except zipfile.BadZipFile as e:
                raise ValueError(f"{path!r} is not a valid zip file ({e}); expected {what}") from None
        if df.shape[1] != 101:
            raise ValueError(f"{path!r} has {df.shape[1]} column(s), not 101; expected {what}")
        a = _numeric(df, path, what)
        count, m = a[:, 0], a[:, 1:]
        rated = m != self.NOT_RATED
        bad = rated & ((m < -10) | (m > 10))
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise ValueError(f"{path!r}: rating {m[i, j]:g} in row {i + 1}, column {j + 2} (joke {j + 1}) is out "
                             f"of range; expected {what}")
        mism = count != rated.sum(1)
        if mism.any():
            i = _first_bad(mism)
            raise ValueError(f"{path!r}: row {i + 1} says {count[i]:g} rated jokes in column 1 but has "
                             f"{int(rated[i].sum())} ratings other than 99; expected {what}")
        rows, cols = np.nonzero(rated)
        users = (rows + 1).astype(np.int64)
        items = (cols + 1).astype(np.int64)
        return users, items, m[rows, cols], int(m.shape[0]), int(m.shape[1])


RATING_DATASETS: Dict[str, type] = {"movielens-100k": MovieLens100K, "movielens-1m": MovieLens1M, "jester": Jester}


def make_rating_dataset(name: str, root=None, **kwargs) -> RatingDataset:
    """A rating dataset by name (``"movielens-100k"``, ``"movielens-1m"`` or ``"jester"``)."""
    if name not in RATING_DATASETS:
        raise ValueError(f"argument 'name' must be one of {sorted(RATING_DATASETS)}, got {name!r}")
    return RATING_DATASETS[name](root, **kwargs)
