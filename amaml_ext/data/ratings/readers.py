"""Reading the rating files with pandas: every malformed input becomes a
:class:`~amaml_ext.data.files.DataFileError` (a ValueError) naming the file, the row and column,
and what was expected; a missing file a FileNotFoundError."""

import os

import numpy as np
import pandas as pd

from ..files import DataFileError, decode_text, read_bytes


def missing(path: str, what: str, root: str) -> FileNotFoundError:
    where = "" if os.path.isdir(root) else f" (the root directory {root!r} does not exist)"
    return FileNotFoundError(f"{what}: expected the file {path!r}, which does not exist{where}")


def read_csv(source, path: str, what: str, **kw) -> pd.DataFrame:
    """``pd.read_csv`` with the parser's and the reader's errors turned into DataFileErrors that
    name the file."""
    try:
        return pd.read_csv(source, header=None, **kw)
    except pd.errors.EmptyDataError:
        raise DataFileError(f"{path!r} is empty; expected {what}") from None
    except pd.errors.ParserError as e:
        raise DataFileError(f"{path!r} is malformed: {str(e).strip()}; expected {what}") from None
    except UnicodeDecodeError as e:
        data = read_bytes(source, what) if isinstance(source, str) else getattr(source, "getvalue", bytes)()
        decode_text(data, path, what)       # names the line and the byte
        raise DataFileError(f"{path!r} is not a text file ({e}); expected {what}") from None
    except FileNotFoundError:
        raise
    except OSError as e:
        raise DataFileError(f"cannot read {path!r} ({e.strerror or e}); expected {what}") from None


def numeric(df: pd.DataFrame, path: str, what: str, columns=None) -> np.ndarray:
    """The frame as a float64 array; a ValueError naming the row and column of the first
    non-numeric or missing value. ``columns`` restricts the checks (and the result) to those."""
    columns = list(df.columns) if columns is None else list(columns)
    out = np.empty((len(df), len(columns)), dtype=np.float64)
    for j, c in enumerate(columns):
        col = df[c]
        if pd.api.types.is_bool_dtype(col):
            raise DataFileError(f"{path!r}: non-numeric value {col.iloc[0]!r} in row 1, column {c + 1}; "
                                f"expected {what}")
        if not pd.api.types.is_numeric_dtype(col):
            num = pd.to_numeric(col, errors="coerce")
            bad = num.isna() & col.notna()
            if bad.any():
                i = int(np.flatnonzero(bad.to_numpy())[0])
                raise DataFileError(f"{path!r}: non-numeric value {col.iloc[i]!r} in row {i + 1}, column {c + 1}; "
                                    f"expected {what}")
            col = num
        vals = col.to_numpy(dtype=np.float64, na_value=np.nan)
        nan = np.isnan(vals)
        if nan.any():
            i = int(np.flatnonzero(nan)[0])
            raise DataFileError(f"{path!r}: row {i + 1} has no value in column {c + 1} (a missing field, or too few "
                                f"fields on that line); expected {what}")
        if not np.isfinite(vals).all():
            i = int(np.flatnonzero(~np.isfinite(vals))[0])
            raise DataFileError(f"{path!r}: non-finite value {vals[i]:g} in row {i + 1}, column {c + 1}; "
                                f"expected {what}")
        out[:, j] = vals
    return out


def first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def check_ids(arr: np.ndarray, path: str, name: str, column: int, what: str) -> np.ndarray:
    bad = (arr != np.round(arr)) | (arr < 1) | (arr > 2 ** 53)    # past 2^53 a float id is not exact (int64 wraps)
    if bad.any():
        i = first_bad(bad)
        raise DataFileError(f"{path!r}: {name} {arr[i]:g} in row {i + 1}, column {column} is not a positive integer "
                            f"up to 2^53; expected {what}")
    return arr.astype(np.int64)


def check_duplicates(users: np.ndarray, items: np.ndarray, path: str, what: str) -> None:
    key = pd.Series(users * (int(items.max()) + 1) + items)
    dup = key.duplicated().to_numpy()
    if dup.any():
        i = first_bad(dup)
        raise DataFileError(f"{path!r}: row {i + 1} rates item {items[i]} by user {users[i]} a second time; "
                            f"expected {what}")


def read_movielens(path: str, sep: str, what: str):
    """(users, items, ratings) of a MovieLens rating file with whole-star ratings 1..5."""
    if sep == "::":
        # the C parser cannot split on "::": split on ":" and check that every other field is empty
        df = read_csv(path, path, what, sep=":", engine="c")
        if df.shape[1] != 7 or not df[[1, 3, 5]].isna().all().all():
            raise DataFileError(f"{path!r} does not have 4 '::'-separated fields on every line (split on ':' it has "
                                f"{df.shape[1]} columns, not 7 with every other one empty); expected {what}")
        df = df[[0, 2, 4, 6]]
        df.columns = range(4)
    else:
        df = read_csv(path, path, what, sep=sep, engine="c")
        if df.shape[1] != 4:
            raise DataFileError(f"{path!r} has {df.shape[1]} column(s), not 4; expected {what}")
    a = numeric(df, path, what)
    users = check_ids(a[:, 0], path, "user id", 1, what)
    items = check_ids(a[:, 1], path, "item id", 2, what)
    r = a[:, 2]
    bad = (r != np.round(r)) | (r < 1) | (r > 5)
    if bad.any():
        i = first_bad(bad)
        raise DataFileError(f"{path!r}: rating {r[i]:g} in row {i + 1} is out of range (MovieLens ratings are whole "
                            f"stars 1..5); expected {what}")
    check_duplicates(users, items, path, what)
    return users, items, r


# --------------------------------------------------------------------------------------------
# pools
