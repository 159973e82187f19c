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

    >>> ds = MovieLens100K("/path/to/data")      # or root=None: $AMAML_DATA_ROOT  # doctest: +SKIP
    >>> ds.num_ratings, ds.num_users, ds.num_items, ds.num_tasks                    # doctest: +SKIP
    (100000, 943, 1682, 575)
    >>> train, test = ds.pools("15shot-20val", seed=0)                              # doctest: +SKIP
    >>> b = train.batch(torch.tensor([0, 1]))     # support x [2, 15, 100], y [2, 15, 1]  # doctest: +SKIP

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

A missing file raises :class:`FileNotFoundError`, a damaged or malformed one
:class:`~amaml_ext.data.files.DataFileError` (a :class:`ValueError`), each naming the file (and
the zip member) and what was expected.
"""

from typing import Dict

from ... import _checks
from ..root import ENV_ROOT as DATA_ROOT_ENV
from .dataset import RATING_SETTINGS, RatingDataset
from .jester import Jester
from .movielens import MovieLens1M, MovieLens100K
from .pool import RatingPool

__all__ = ["RATING_SETTINGS", "DATA_ROOT_ENV", "RatingDataset", "RatingPool", "MovieLens100K", "MovieLens1M",
           "Jester", "RATING_DATASETS", "make_rating_dataset"]

RATING_DATASETS: Dict[str, type] = {"movielens-100k": MovieLens100K, "movielens-1m": MovieLens1M, "jester": Jester}


def make_rating_dataset(name: str, root=None, **kwargs) -> RatingDataset:
    """A rating dataset by name (``"movielens-100k"``, ``"movielens-1m"`` or ``"jester"``);
    ``root`` and ``kwargs`` go to its class.

    Raises:
        ValueError: an unknown ``name``; FileNotFoundError, DataFileError: as the class.

    Example:
        >>> import os, tempfile
        >>> from amaml_ext.tasks import make_rating_dataset
        >>> tmp = tempfile.TemporaryDirectory(); os.makedirs(os.path.join(tmp.name, "jester"))
        >>> with open(os.path.join(tmp.name, "jester", "jester-data-1.csv"), "w") as f:   # 12 users, 100 jokes
        ...     _ = f.write("".join("100," + ",".join(str((u * j) % 21 - 10) for j in range(100)) + "\\n"
        ...                         for u in range(12)))
        >>> ds = make_rating_dataset("jester", tmp.name, num_test=2)
        >>> ds.num_users, ds.in_dim, ds.scale(5.0)
        (12, 100, 0.5)
        >>> tmp.cleanup()
    """
    _checks.choice("name", name, sorted(RATING_DATASETS))
    return RATING_DATASETS[name](root, **kwargs)
