"""Collaborative-filtering task families (amaml_ext.data.ratings) on small fixtures written in each
original format, plus checks on the real files when $AMAML_DATA_ROOT holds them (optional data:
those tests are skipped without it)."""

import os
import struct
import zipfile

import numpy as np
import pytest
import torch

from amaml_ext.data.ratings import (RATING_SETTINGS, Jester, MovieLens1M, MovieLens100K, RatingPool,
                               make_rating_dataset)
from amaml_ext.tasks import TaskBatch, TaskPool


# --------------------------------------------------------------------------------------------
# fixtures
#
# MovieLens: items 1..100 are popular, 101..110 rare (rated by users 1, 2 and 14 only: 3 each).
#   user 1: items 1..30 and 101..110   -> 30 ratings of the top 100: kept
#   user 2: items 1..19 and 101..110   -> 19 of the top 100 (29 in all): dropped (< 20)
#   user 3: items 81..100              -> exactly 20: kept, but too few for any setting (>= 25)
#   users 4..13: all items 1..100      -> kept, eligible for every setting
#   user 14: items 101..110 only       -> dropped
# item counts: 1..19: 12, 20..30: 11, 31..80: 10, 81..100: 11, 101..110: 3.


def _ml_ratings():
    plan = {1: list(range(1, 31)) + list(range(101, 111)), 2: list(range(1, 20)) + list(range(101, 111)),
            3: list(range(81, 101)), 14: list(range(101, 111))}
    plan.update({u: list(range(1, 101)) for u in range(4, 14)})
    return {(u, i): (u * 7 + i * 3) % 5 + 1 for u in sorted(plan) for i in plan[u]}


ML = _ml_ratings()
ML_KEPT_USERS = [1, 3] + list(range(4, 14))


def _dataset_dir(root, name):
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def _write_movielens(root, name, file, sep, first_time, ratings):
    """``ratings`` as lines ``user sep item sep rating sep timestamp`` in ``root/name/file``."""
    path = _dataset_dir(root, name) / file
    lines = [sep.join(str(v) for v in (u, i, r, first_time + n)) for n, ((u, i), r) in enumerate(ratings.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_ml100k(root, ratings=ML):
    return _write_movielens(root, "ml-100k", "u.data", "\t", 881250949, ratings)


def _write_ml1m(root, ratings=ML):
    return _write_movielens(root, "ml-1m", "ratings.dat", "::", 978300760, ratings)


def _jester_matrix(n_users=12, seed=0):
    """Ratings [n, 100] with 99 = not rated: user 1 rates 40 jokes, user 2 rates all 100, the others
    60 to 100; ratings with 2 decimals in [-10, 10] (both ends included)."""
    rng = np.random.default_rng(seed)
    m = np.round(rng.uniform(-10, 10, size=(n_users, 100)), 2)
    m[0, 0], m[1, 0], m[1, 1] = -10.0, 10.0, 0.0
    counts = [40, 100] + list(rng.integers(60, 101, size=n_users - 2))
    for u, c in enumerate(counts):
        m[u, rng.permutation(100)[c:]] = 99
    return m


JM = _jester_matrix()


def _jester_rows(m=JM):
    return [[int((row != 99).sum())] + list(row) for row in m]


def _jester_csv_text(rows):
    return "\n".join(",".join(f"{v:g}" for v in row) for row in rows) + "\n"


def _write_jester_csv(root, rows=None):
    d = _dataset_dir(root, "jester")
    (d / "jester-data-1.csv").write_text(_jester_csv_text(_jester_rows() if rows is None else rows))
    return d / "jester-data-1.csv"


def _write_jester_zip(root, rows=None, member="jester-data-1.csv"):
    d = _dataset_dir(root, "jester")
    with zipfile.ZipFile(d / "jester-data-1.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, _jester_csv_text(_jester_rows() if rows is None else rows))
    return d / "jester-data-1.zip"


def _write_jester_xls(root, rows=None):
    """A BIFF2 worksheet (the simplest .xls: BOF, one NUMBER record per cell, EOF); xlwt is not
    available, and xlrd reads BIFF2 through the same pandas.read_excel path as the released BIFF8."""
    def rec(kind, data):
        return struct.pack("<HH", kind, len(data)) + data
    b = rec(0x0009, struct.pack("<HH", 7, 0x0010))
    for i, row in enumerate(_jester_rows() if rows is None else rows):
        for j, v in enumerate(row):
            b += rec(0x0003, struct.pack("<HH3sd", i, j, b"\0\0\0", float(v)))
    b += rec(0x000A, b"")
    d = _dataset_dir(root, "jester")
    (d / "jester-data-1.xls").write_bytes(b)
    return d / "jester-data-1.xls"


# --------------------------------------------------------------------------------------------
# MovieLens


@pytest.mark.parametrize("cls,write", [(MovieLens100K, _write_ml100k), (MovieLens1M, _write_ml1m)])
def test_movielens_counts_and_filtering(tmp_path, cls, write):
    write(tmp_path)
    ds = cls(tmp_path, num_test=3)
    assert (ds.num_ratings, ds.num_users, ds.num_items) == (len(ML), 14, 110)
    assert ds.items.tolist() == list(range(1, 101))          # the rare items 101..110 are dropped
    assert ds.in_dim == 100
    assert ds.users.tolist() == ML_KEPT_USERS                  # users 2 (19 kept ratings) and 14 dropped
    assert ds.num_tasks == 12
    assert dict(zip(ds.users.tolist(), ds.ratings_per_user.tolist()))[3] == 20


def test_top_items_ties_and_min_ratings(tmp_path):
    _write_ml100k(tmp_path)
    ds = MovieLens100K(tmp_path, top_items=5, min_ratings=1, num_test=3)
    assert ds.items.tolist() == [1, 2, 3, 4, 5]               # counts 12 for items 1..19: ties -> smaller ids
    assert ds.users.tolist() == [1, 2] + list(range(4, 14))    # user 3 rated none of them
    ds = MovieLens100K(tmp_path, min_ratings=31, num_test=3)
    assert ds.users.tolist() == list(range(4, 14))


def test_movielens_targets_match_the_file(tmp_path):
    _write_ml100k(tmp_path)
    ds = MovieLens100K(str(tmp_path), num_test=3)
    idx, y = ds.user_ratings(1)
    assert ds.items[idx].tolist() == list(range(1, 31))
    want = torch.tensor([(ML[1, i] - 3) / 2 for i in range(1, 31)], dtype=torch.float64)
    assert torch.equal(y.squeeze(1), want)
    assert y.min() >= -1 and y.max() <= 1
    assert torch.equal(ds.unscale(y.squeeze(1)), torch.tensor([float(ML[1, i]) for i in range(1, 31)],
                                                                  dtype=torch.float64))
    with pytest.raises(ValueError, match="argument 'user'.*got 2"):
        ds.user_ratings(2)


def _check_pool(pool, ratings, to_item, scale, shots, val):
    assert isinstance(pool, TaskPool) and isinstance(pool, RatingPool)
    b = pool.all()
    assert isinstance(b, TaskBatch)
    n = len(pool)
    (xs, ys), (xq, yq) = b.support, b.query
    assert xs.shape == (n, shots, pool.in_dim) and ys.shape == (n, shots, 1)
    assert xq.shape == (n, val, pool.in_dim) and yq.shape == (n, val, 1)
    assert all(t.dtype == torch.float64 and t.device.type == "cpu" for t in (xs, ys, xq, yq))
    for x in (xs, xq):                                         # one-hot rows
        assert torch.equal(x.sum(-1), torch.ones(x.shape[:2], dtype=torch.float64))
        assert set(x.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(pool.params, pool.users.to(torch.float64).unsqueeze(1))
    for t, user in enumerate(pool.users.tolist()):
        si, qi = xs[t].argmax(-1), xq[t].argmax(-1)
        assert len(set(si.tolist()) | set(qi.tolist())) == shots + val      # distinct: support and query disjoint
        for x_items, y in ((si, ys[t]), (qi, yq[t])):
            want = [scale(ratings[user, to_item(int(j))]) for j in x_items]
            assert y.squeeze(1).tolist() == want


def _check_pools(ds, setting, seed, eligible, ratings, to_item, scale):
    """``ds.pools(setting)`` (query: ``val`` ratings) splits the eligible users into disjoint train
    and test pools, each holding its users' ratings (checked by _check_pool). Returns the pools."""
    shots, val = RATING_SETTINGS[setting]
    train, test = ds.pools(setting, seed=seed, test_query="val")
    assert not set(train.users.tolist()) & set(test.users.tolist())
    assert sorted(train.users.tolist() + test.users.tolist()) == eligible
    for pool in (train, test):
        _check_pool(pool, ratings, to_item, scale, shots, val)
    return train, test


@pytest.mark.parametrize("setting", list(RATING_SETTINGS))
def test_movielens_pools(tmp_path, setting):
    _write_ml100k(tmp_path)
    ds = MovieLens100K(tmp_path, num_test=3)
    shots, val = RATING_SETTINGS[setting]
    # user 3 (20 ratings) is never used; user 1 (30) only when shots + val <= 30
    eligible = ([1] if shots + val <= 30 else []) + list(range(4, 14))
    assert ds.eligible_users(setting).tolist() == eligible
    train, test = _check_pools(ds, setting, 0, eligible, ML, lambda j: int(ds.items[j]), lambda r: (r - 3) / 2)
    assert len(test) == 3 and len(train) == len(eligible) - 3
    for pool in (train, test):
        assert (pool.shots, pool.val, pool.setting) == (shots, val, setting)


def test_same_seed_same_pools(tmp_path):
    _write_ml100k(tmp_path)
    ds = MovieLens100K(tmp_path, num_test=3)
    a, b = ds.pools("10shot-15val", seed=3), MovieLens100K(tmp_path, num_test=3).pools("10shot-15val", seed=3)
    c = ds.pools("10shot-15val", seed=4)
    same = lambda p, q: all(torch.equal(s, t) for s, t in zip(  # noqa: E731
        (p.users, p.support_items, p.support_y, p.query_items, p.query_y),
        (q.users, q.support_items, q.support_y, q.query_items, q.query_y)))
    assert same(a[0], b[0]) and same(a[1], b[1])
    assert not (same(a[0], c[0]) and same(a[1], c[1]))


def test_pool_batch_like_task_pool(tmp_path):
    _write_ml100k(tmp_path)
    train, _ = MovieLens100K(tmp_path, num_test=3).pools("15shot-20val")
    idx = torch.tensor([4, 0, 2])
    b = train.batch(idx, dtype=torch.float32)
    assert b.size == 3 and b.support[0].dtype == torch.float32 and b.query[1].dtype == torch.float32
    full = train.data
    assert torch.equal(b.support[0], full.support[0][idx].float())
    assert torch.equal(b.query[1], full.query[1][idx].float())
    assert torch.equal(b.task(1).support[1], full.support[1][0].float())


def test_setting_with_too_few_users(tmp_path):
    _write_ml100k(tmp_path)
    ds = MovieLens100K(tmp_path)                                # num_test=100 > the 11 eligible users
    with pytest.raises(ValueError, match="argument 'setting'.*11 such users.*num_test=100"):
        ds.pools("10shot-15val")
    train, test = MovieLens100K(tmp_path, num_test=11).pools((5, 5))   # users 1, 3, 4..13 have >= 10
    assert len(test) == 11 and len(train) == 1 and train.setting == "5shot-5val"


# --------------------------------------------------------------------------------------------
# Jester


@pytest.mark.parametrize("writer", [_write_jester_csv, _write_jester_zip, _write_jester_xls])
def test_jester_formats(tmp_path, writer):
    path = writer(tmp_path)
    ds = Jester(tmp_path, num_test=4)
    assert ds.path == str(path)
    n_rated = int((JM != 99).sum())
    assert (ds.num_ratings, ds.num_users, ds.num_items) == (n_rated, 12, 100)
    assert ds.num_tasks == 12 and ds.in_dim == 100 and ds.items.tolist() == list(range(1, 101))
    idx, y = ds.user_ratings(1)
    assert (ds.items[idx] - 1).tolist() == np.flatnonzero(JM[0] != 99).tolist()
    assert torch.allclose(y.squeeze(1), torch.from_numpy(JM[0][JM[0] != 99] / 10), rtol=0, atol=1e-15)
    assert y.min() >= -1 and y.max() <= 1 and ds.user_ratings(2)[1].max() == 1.0


def test_jester_prefers_xls_then_csv_then_zip(tmp_path):
    _write_jester_zip(tmp_path)
    assert Jester(tmp_path, num_test=4).path.endswith(".zip")
    _write_jester_csv(tmp_path)
    assert Jester(tmp_path, num_test=4).path.endswith(".csv")
    _write_jester_xls(tmp_path)
    assert Jester(tmp_path, num_test=4).path.endswith(".xls")


@pytest.mark.parametrize("setting", list(RATING_SETTINGS))
def test_jester_pools(tmp_path, setting):
    _write_jester_zip(tmp_path)
    ds = Jester(tmp_path, num_test=4)
    shots, val = RATING_SETTINGS[setting]
    eligible = [u for u in range(1, 13) if (JM[u - 1] != 99).sum() >= shots + val]
    ratings = {(u + 1, j + 1): JM[u, j] for u, j in zip(*np.nonzero(JM != 99))}
    _, test = _check_pools(ds, setting, 1, eligible, ratings, lambda j: j + 1, lambda r: r / 10)
    assert len(test) == 4


# --------------------------------------------------------------------------------------------
# errors


def test_root_from_environment(tmp_path, monkeypatch):
    _write_ml100k(tmp_path)
    monkeypatch.setenv("AMAML_DATA_ROOT", str(tmp_path))
    assert MovieLens100K(num_test=3).num_ratings == len(ML)
    assert make_rating_dataset("movielens-100k", num_test=3).num_tasks == 12
    monkeypatch.delenv("AMAML_DATA_ROOT")
    with pytest.raises(ValueError, match="argument 'root'.*AMAML_DATA_ROOT is not set"):
        MovieLens100K()


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ml-100k.u\.data.*does not exist"):
        MovieLens100K(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"ml-1m.ratings\.dat"):
        MovieLens1M(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"jester-data-1\.xls.*jester-data-1\.csv.*jester-data-1\.zip"):
        Jester(tmp_path)
    with pytest.raises(FileNotFoundError, match="root directory .* does not exist"):
        MovieLens100K(tmp_path / "nowhere")


def _lines(path):
    return path.read_text().splitlines()


@pytest.mark.parametrize("edit,match", [
    (lambda ls: ls[:2] + ["1\t2\t3"] + ls[2:], "row 3 has no value in column 4"),
    (lambda ls: ls[:2] + ["1\t2\t3\t4\t5"] + ls[2:], "malformed.*line 3"),
    (lambda ls: [line.rsplit("\t", 1)[0] for line in ls], "3 column.*not 4"),
    (lambda ls: ls[:4] + ["1\tabc\t3\t4"] + ls[4:], "non-numeric value 'abc' in row 5, column 2"),
    (lambda ls: ls[:4] + ["1\t2\t6\t4"] + ls[4:], "rating 6 in row 5 is out of range"),
    (lambda ls: ls[:4] + ["1\t2\t3.5\t4"] + ls[4:], "rating 3.5 in row 5 is out of range"),
    (lambda ls: ls[:4] + ["0\t2\t3\t4"] + ls[4:], "user id 0 in row 5"),
    (lambda ls: ls + [ls[0]], "a second time"),
    (lambda ls: [], "is empty"),
])
def test_malformed_u_data(tmp_path, edit, match):
    path = _write_ml100k(tmp_path)
    path.write_text("\n".join(edit(_lines(path))) + "\n")
    with pytest.raises(ValueError, match=match) as e:
        MovieLens100K(tmp_path)
    assert "u.data" in str(e.value) and "tab-separated" in str(e.value)


@pytest.mark.parametrize("edit,match", [
    (lambda ls: [line.replace("::", "\t") for line in ls], "4 '::'-separated fields"),
    (lambda ls: ls[:2] + ["1::2::3::4::5"] + ls[2:], "malformed|4 '::'-separated"),
    (lambda ls: ls[:2] + ["1::x::3::4"] + ls[2:], "non-numeric value 'x' in row 3, column 2"),
    (lambda ls: ls[:2] + ["1::2::0::4"] + ls[2:], "rating 0 in row 3 is out of range"),
])
def test_malformed_ratings_dat(tmp_path, edit, match):
    path = _write_ml1m(tmp_path)
    path.write_text("\n".join(edit(_lines(path))) + "\n")
    with pytest.raises(ValueError, match=match) as e:
        MovieLens1M(tmp_path)
    assert "ratings.dat" in str(e.value)


def _bad_jester_rows(kind):
    rows = _jester_rows()
    if kind == "range":
        j = next(j for j in range(1, 101) if rows[2][j] != 99)
        rows[2][j] = 12.5
    elif kind == "count":
        rows[3][0] += 1
    elif kind == "columns":
        rows = [r[:60] for r in rows]
    return rows


@pytest.mark.parametrize("writer", [_write_jester_csv, _write_jester_zip, _write_jester_xls])
@pytest.mark.parametrize("kind,match", [("range", "rating 12.5 in row 3.*out of range"),
                                        ("count", "row 4 says .* rated jokes"),
                                        ("columns", "60 column.*not 101")])
def test_malformed_jester(tmp_path, writer, kind, match):
    writer(tmp_path, _bad_jester_rows(kind))
    with pytest.raises(ValueError, match=match) as e:
        Jester(tmp_path)
    assert "jester-data-1" in str(e.value) and "99 = not rated" in str(e.value)


def test_malformed_jester_files(tmp_path):
    d = tmp_path / "jester"
    d.mkdir()
    (d / "jester-data-1.csv").write_text("count," + ",".join(f"joke{j}" for j in range(1, 101)) + "\n"
                                         + _jester_csv_text(_jester_rows()))
    with pytest.raises(ValueError, match="non-numeric value 'count' in row 1, column 1"):
        Jester(tmp_path)
    os.remove(d / "jester-data-1.csv")
    (d / "jester-data-1.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a valid zip file"):
        Jester(tmp_path)
    _write_jester_zip(tmp_path, member="readme.txt")
    with pytest.raises(ValueError, match="holds no jester-data-1.csv"):
        Jester(tmp_path)
    (d / "jester-data-1.xls").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 100)
    with pytest.raises(ValueError, match=r"jester-data-1\.xls' is not a readable \.xls file"):
        Jester(tmp_path)


def test_argument_validation(tmp_path):
    _write_ml100k(tmp_path)
    for kw, match in [({"top_items": 0}, "argument 'top_items' must be a positive int, got 0"),
                      ({"min_ratings": 2.5}, "argument 'min_ratings' must be a positive int, got 2.5"),
                      ({"num_test": True}, "argument 'num_test' must be a positive int, got True")]:
        with pytest.raises(ValueError, match=match):
            MovieLens100K(tmp_path, **kw)
    with pytest.raises(ValueError, match="argument 'root' must be a path"):
        MovieLens100K(3)
    with pytest.raises(ValueError, match="argument 'part' must be 1, 2 or 3, got 4"):
        Jester(tmp_path, part=4)
    with pytest.raises(ValueError, match="argument 'name'"):
        make_rating_dataset("netflix", tmp_path)
    ds = MovieLens100K(tmp_path, num_test=3)
    with pytest.raises(ValueError, match="argument 'setting' must be one of .*got '5shot'"):
        ds.pools("5shot")
    with pytest.raises(ValueError, match=r"argument 'setting'.*got \(5, 0\)"):
        ds.pools((5, 0))
    with pytest.raises(ValueError, match="argument 'seed' must be an int, got '1'"):
        ds.pools(seed="1")
    with pytest.raises(ValueError, match="argument 'test_query' must be 'rest'.*or 'val'.*got 'all'"):
        ds.pools(test_query="all")
    with pytest.raises(ValueError, match="argument 'resample' must be a bool, got 1"):
        ds.pools(resample=1)


@pytest.mark.parametrize("setting", ["10shot-15val", "20shot-30val"])
def test_test_query_rest_is_every_remaining_rating(tmp_path, setting):
    """The paper's protocol: a test user's query is all of their ratings outside the support set.
    Same training pool, test users and supports as test_query="val"; the query holds exactly
    the user's other ratings (checked against the fixture's ratings), padding is masked."""
    _write_ml100k(tmp_path)
    ds = MovieLens100K(tmp_path, num_test=4)
    shots, val = RATING_SETTINGS[setting]
    train_v, test_v = ds.pools(setting, seed=2, test_query="val")
    train, test = ds.pools(setting, seed=2)                     # default: "rest"
    for a, b in ((train, train_v), (test, test_v)):
        assert torch.equal(a.users, b.users) and torch.equal(a.support_items, b.support_items)
        assert torch.equal(a.support_y, b.support_y)
    assert train.query_mask is None and torch.equal(train.query_items, train_v.query_items)
    assert (test.shots, test.val) == (shots, val) and "remaining" in repr(test)
    batch = test.all()
    assert batch.query_mask is not None and torch.equal(batch.query_mask, test.query_mask)
    for t, user in enumerate(test.users.tolist()):
        rated = {i for (u, i) in ML if u == user and i <= 100}           # items 101..110 are not kept
        support = {int(ds.items[j]) for j in test.support_items[t]}
        n = int(test.query_sizes[t])
        assert n == len(rated) - shots
        items = [int(ds.items[j]) for j in test.query_items[t, :n]]
        assert set(items) == rated - support and len(items) == n
        assert test.query_y[t, :n, 0].tolist() == [(ML[user, i] - 3) / 2 for i in items]
        assert not test.query_mask[t, n:].any() and test.query_mask[t, :n].all()
        assert (test.query_y[t, n:] == 0).all()
        # the fixed-size query is the first val of the remaining ratings
        assert torch.equal(test_v.query_items[t], test.query_items[t, :val])
    assert int(test.query_sizes.max()) == test.query_items.shape[1] > val


def test_masked_query_refused_for_meta_training(tmp_path):
    from amaml_ext import learners, models
    _write_ml100k(tmp_path)
    _, test = MovieLens100K(tmp_path, num_test=4).pools("10shot-15val")
    net = models.mlp(in_dim=100, width=8).double()
    learner = learners.make_learner("fomaml", net, torch.nn.functional.mse_loss, inner_steps=2)
    theta = torch.cat([p.detach().flatten() for p in net.parameters()])
    with pytest.raises(ValueError, match="argument 'tasks' must have same-size query sets.*query_mask of shape"):
        learner.meta_grad(theta, test.batch(torch.arange(2)))


def test_resampling_pool_draws_fresh_valid_splits(tmp_path):
    _write_ml100k(tmp_path)
    ds = MovieLens100K(tmp_path, num_test=3)
    fixed, _ = ds.pools("10shot-15val", seed=0)
    train, test = ds.pools("10shot-15val", seed=0, resample=True)
    assert train.resample and not test.resample and "resampled" in repr(train)
    assert torch.equal(train.users, fixed.users)
    idx = torch.tensor([2, 0, 5])
    same = lambda a, b: all(torch.equal(s, t) for s, t in zip(a.support + a.query, b.support + b.query))  # noqa: E731
    assert same(fixed.draw(idx, step=3, seed=1), fixed.batch(idx))          # no resampling: the fixed split
    a, b = train.draw(idx, step=3, seed=1), train.draw(idx, step=3, seed=1)
    assert same(a, b) and a.support[0].shape == (3, 10, 100) and a.query[1].shape == (3, 15, 1)
    assert not same(a, train.draw(idx, step=4, seed=1)) and not same(a, train.draw(idx, step=3, seed=2))
    seen = set()
    for step in range(6):
        d = train.draw(idx, step=step, seed=0)
        for t, user in enumerate(train.users[idx].tolist()):
            si, qi = d.support[0][t].argmax(-1), d.query[0][t].argmax(-1)
            items = [int(ds.items[j]) for j in torch.cat([si, qi])]
            assert len(set(items)) == 25 and all((user, i) in ML for i in items)
            ys = torch.cat([d.support[1][t], d.query[1][t]]).squeeze(1).tolist()
            assert ys == [(ML[user, i] - 3) / 2 for i in items]
            seen.add((user, frozenset(items[:10])))
    assert len(seen) > 3 * 3          # different supports over the steps


def test_meta_train_with_resampling_resumes_exactly(tmp_path):
    from amaml_ext import learners, models
    from amaml_ext.train import meta_train
    _write_ml100k(tmp_path)
    ds = MovieLens100K(tmp_path, num_test=3)
    train, _ = ds.pools((5, 5), seed=0, resample=True)
    fixed, _ = ds.pools((5, 5), seed=0)

    def run(pool, out, steps, resume=False):
        torch.manual_seed(0)
        net = models.mlp(in_dim=100, width=6).double()
        learner = learners.make_learner("fomaml", net, torch.nn.functional.mse_loss, inner_steps=3, inner_lr=0.1)
        return meta_train(learner, pool, meta_steps=steps, out_dir=str(tmp_path / out), meta_batch=3, lr=0.01,
                          resume=resume, checkpoint_every=1, progress=False, dtype=torch.float64)

    whole = run(train, "a", 4)
    run(train, "b", 2)
    assert torch.equal(run(train, "b", 4, resume=True), whole)
    assert not torch.equal(run(fixed, "c", 4), whole)


# --------------------------------------------------------------------------------------------
# the real files (optional: only where $AMAML_DATA_ROOT holds them)

ROOT = os.environ.get("AMAML_DATA_ROOT", "")
HAS_ML100K = bool(ROOT) and os.path.isfile(os.path.join(ROOT, "ml-100k", "u.data"))
HAS_JESTER = bool(ROOT) and any(os.path.isfile(os.path.join(ROOT, "jester", f"jester-data-1.{ext}"))
                                for ext in ("xls", "csv", "zip"))


@pytest.mark.skipif(not HAS_ML100K, reason="real MovieLens-100K not found under $AMAML_DATA_ROOT")
def test_real_movielens_100k():
    ds = MovieLens100K()
    assert (ds.num_ratings, ds.num_users, ds.num_items) == (100_000, 943, 1682)
    assert ds.in_dim == 100 and int(ds.ratings_per_user.min()) >= 20
    assert ds.num_tasks == 575          # the paper reports 489 tasks for this filter
    for setting, (shots, val) in RATING_SETTINGS.items():
        train, test = ds.pools(setting)
        assert len(test) == 100 and len(train) + 100 == len(ds.eligible_users(setting))
        b = train.batch(torch.arange(5))
        assert b.support[0].shape == (5, shots, 100) and b.query[1].shape == (5, val, 1)
        per_user = ds.ratings_per_user[torch.searchsorted(ds.users, test.users)]
        assert torch.equal(test.query_sizes, per_user - shots) and int(test.query_sizes.min()) >= val


@pytest.mark.skipif(not HAS_JESTER, reason="real Jester-1 not found under $AMAML_DATA_ROOT")
def test_real_jester_1():
    ds = Jester()
    assert (ds.num_users, ds.num_items, ds.num_ratings) == (24_983, 100, 1_810_455)
    assert ds.num_tasks == 24_983 and int(ds.ratings_per_user.min()) == 36
    train, test = ds.pools("15shot-20val")
    assert len(test) == 100 and len(train) == 24_883
    b = test.all()
    assert b.support[0].shape == (100, 15, 100) and b.support[1].abs().max() <= 1
