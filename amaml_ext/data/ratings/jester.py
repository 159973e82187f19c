"""Jester dataset 1 (ratings -10..10 of 100 jokes; 99 = not rated)."""

import io
import os
import warnings
from typing import Optional

import numpy as np
import pandas as pd

from ... import _checks
from ..files import DataFileError, open_zip, read_member
from .dataset import RatingDataset
from .readers import first_bad, numeric, read_csv


class Jester(RatingDataset):
    """Jester dataset 1, part ``part`` (1, 2 or 3; the paper's Jester-1 is part 1), from
    ``root/jester/``: ``jester-data-<part>.xls`` (as released), else ``jester-data-<part>.csv``
    (its header-less CSV export), else that CSV inside ``jester-data-<part>.zip``.

    One row per user (user id = row number, from 1): column 0 the number of rated jokes, then the
    ratings of jokes 1..100 in [-10, 10], ``99`` = not rated. Targets ``r / 10`` in [-1, 1]. Keeps
    the ``top_items=100`` most-rated jokes (all of them) and the users with at least
    ``min_ratings=1`` rating (all users). ``root`` defaults to ``$AMAML_DATA_ROOT``. Other
    arguments and errors as :class:`~amaml_ext.tasks.MovieLens100K`.

    Example:
        >>> import os, tempfile
        >>> from amaml_ext.tasks import Jester
        >>> tmp = tempfile.TemporaryDirectory(); os.makedirs(os.path.join(tmp.name, "jester"))
        >>> with open(os.path.join(tmp.name, "jester", "jester-data-1.csv"), "w") as f:   # 12 users, 100 jokes
        ...     _ = f.write("".join("100," + ",".join(str((u * j) % 21 - 10) for j in range(100)) + "\\n"
        ...                         for u in range(12)))
        >>> ds = Jester(tmp.name, num_test=2)
        >>> ds.num_ratings, ds.num_tasks, ds.in_dim
        (1200, 12, 100)
        >>> tmp.cleanup()
    """

    name = "jester"
    default_min_ratings = 1
    NOT_RATED = 99.0

    def __init__(self, root=None, *, part: int = 1, top_items: int = 100, min_ratings: Optional[int] = None,
                 num_test: int = 100):
        if not _checks.is_int(part) or part not in (1, 2, 3):
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
        """The files looked for, in order: the ``.xls``, the ``.csv``, the ``.zip``."""
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
                raise DataFileError(f"{path!r} is not a readable .xls file ({type(e).__name__}: {e}); "
                                    f"expected {what}") from None
        elif path.endswith(".csv"):
            df = read_csv(path, path, what, engine="c")
        else:
            df = self._read_zip(path, what)
        if df.shape[1] != 101:
            raise DataFileError(f"{path!r} has {df.shape[1]} column(s), not 101; expected {what}")
        a = numeric(df, path, what)
        count, m = a[:, 0], a[:, 1:]
        rated = m != self.NOT_RATED
        bad = rated & ((m < -10) | (m > 10))
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise DataFileError(f"{path!r}: rating {m[i, j]:g} in row {i + 1}, column {j + 2} (joke {j + 1}) is out "
                                f"of range; expected {what}")
        mism = count != rated.sum(1)
        if mism.any():
            i = first_bad(mism)
            raise DataFileError(f"{path!r}: row {i + 1} says {count[i]:g} rated jokes in column 1 but has "
                                f"{int(rated[i].sum())} ratings other than 99; expected {what}")
        rows, cols = np.nonzero(rated)
        users = (rows + 1).astype(np.int64)
        items = (cols + 1).astype(np.int64)
        return users, items, m[rows, cols], int(m.shape[0]), int(m.shape[1])

    def _read_zip(self, path: str, what: str) -> pd.DataFrame:
        """The ratings CSV inside the zip ``path`` (the member ``jester-data-<part>.csv``, or its
        one ``.csv``); a damaged archive or member raises DataFileError naming both."""
        member_name = f"jester-data-{self.part}.csv"
        with open_zip(path, what, "is not a valid zip file") as zf:
            csvs = [n for n in zf.namelist() if n.lower().endswith(".csv") and not n.startswith("__MACOSX")]
            named = [n for n in csvs if os.path.basename(n) == member_name]
            member = named[0] if named else (csvs[0] if len(csvs) == 1 else None)
            if member is None:
                raise DataFileError(f"{path!r} holds no {member_name} (its .csv members: {csvs}); expected {what}")
            data = read_member(zf, member, path, what)
        return read_csv(io.BytesIO(data), f"{path}:{member}", what, engine="c")
