"""MovieLens-100K and MovieLens-1M (whole-star ratings 1..5)."""

import os

import numpy as np

from ..files import DataFileError
from .dataset import RatingDataset
from .readers import missing, read_movielens


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
        """The ratings file read."""
        return os.path.join(self.root, self.subdir, self.file)

    def _load(self):
        path = self.path
        sep = "tab" if self.sep == "\t" else repr(self.sep)
        what = (f"the {self.name} ratings file: one rating a line, {sep}-separated "
                f"user id, item id, rating (whole stars 1..5), timestamp")
        if os.path.isdir(path):
            raise DataFileError(f"{path!r} is a folder, not a file; expected {what}")
        if not os.path.isfile(path):
            raise missing(path, f"{self.name}: {what}", self.root)
        users, items, r = read_movielens(path, self.sep, what)
        return users, items, r, int(np.unique(users).size), int(np.unique(items).size)


class MovieLens100K(_MovieLens):
    """MovieLens-100K from ``root/ml-100k/u.data`` (``user<TAB>item<TAB>rating<TAB>timestamp``).

    Targets ``(r - 3) / 2`` in [-1, 1]; keeps the ``top_items=100`` most-rated movies and the users
    with at least ``min_ratings=20`` ratings of them. ``root`` defaults to ``$AMAML_DATA_ROOT``.

    Args:
        root: the data root holding ``ml-100k/``; default ``$AMAML_DATA_ROOT``.
        top_items: the most-rated movies kept (the one-hot input dimension).
        min_ratings: the least number of ratings of those movies a kept user has.
        num_test: test users :meth:`pools` holds out.

    Raises:
        FileNotFoundError: the file (or the root) does not exist, naming it.
        ValueError: a bad argument; ``DataFileError`` (a ValueError): a malformed file, naming it.

    Example:
        >>> import os, tempfile
        >>> from amaml_ext.tasks import MovieLens100K
        >>> tmp = tempfile.TemporaryDirectory(); os.makedirs(os.path.join(tmp.name, "ml-100k"))
        >>> with open(os.path.join(tmp.name, "ml-100k", "u.data"), "w") as f:     # 12 users x 30 movies
        ...     _ = f.write("".join(f"{u}\\t{i}\\t{1 + u * i % 5}\\t0\\n" for u in range(1, 13) for i in range(1, 31)))
        >>> ds = MovieLens100K(tmp.name, num_test=2)
        >>> ds.num_ratings, ds.num_tasks, ds.in_dim
        (360, 12, 30)
        >>> train, test = ds.pools("10shot-15val", seed=0)
        >>> len(train), len(test), train.batch([0, 1]).support[0].shape     # one-hot movies
        (10, 2, torch.Size([2, 10, 30]))
        >>> tmp.cleanup()
    """

    name = "movielens-100k"
    subdir, file, sep = "ml-100k", "u.data", "\t"


class MovieLens1M(_MovieLens):
    """MovieLens-1M from ``root/ml-1m/ratings.dat`` (``UserID::MovieID::Rating::Timestamp``).

    Targets ``(r - 3) / 2`` in [-1, 1]; keeps the ``top_items=100`` most-rated movies and the users
    with at least ``min_ratings=20`` ratings of them. ``root`` defaults to ``$AMAML_DATA_ROOT``.
    Arguments and errors as :class:`MovieLens100K`.

    Example:
        >>> import os, tempfile
        >>> from amaml_ext.tasks import MovieLens1M
        >>> tmp = tempfile.TemporaryDirectory(); os.makedirs(os.path.join(tmp.name, "ml-1m"))
        >>> with open(os.path.join(tmp.name, "ml-1m", "ratings.dat"), "w") as f:     # 12 users x 30 movies
        ...     _ = f.write("".join(f"{u}::{i}::{1 + u * i % 5}::0\\n" for u in range(1, 13) for i in range(1, 31)))
        >>> ds = MovieLens1M(tmp.name, num_test=2)
        >>> ds.num_ratings, ds.num_tasks, ds.in_dim
        (360, 12, 30)
        >>> train, test = ds.pools("10shot-15val", seed=0)
        >>> len(train), len(test), train.batch([0, 1]).support[0].shape     # one-hot movies
        (10, 2, torch.Size([2, 10, 30]))
        >>> tmp.cleanup()
    """

    name = "movielens-1m"
    subdir, file, sep = "ml-1m", "ratings.dat", "::"

