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
    with at least ``min_ratings=20`` ratings of them. ``root`` defaults to ``$AMAML_DATA_ROOT``."""

    name = "movielens-100k"
    subdir, file, sep = "ml-100k", "u.data", "\t"


class MovieLens1M(_MovieLens):
    """MovieLens-1M from ``root/ml-1m/ratings.dat`` (``UserID::MovieID::Rating::Timestamp``).

    Targets ``(r - 3) / 2`` in [-1, 1]; keeps the ``top_items=100`` most-rated movies and the users
    with at least ``min_ratings=20`` ratings of them. ``root`` defaults to ``$AMAML_DATA_ROOT``."""

    name = "movielens-1m"
    subdir, file, sep = "ml-1m", "ratings.dat", "::"

