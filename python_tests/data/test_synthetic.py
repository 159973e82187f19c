"""The synthetic task families (amaml_ext.data.synthetic): CosMixture and Alpine against their
formulas and ranges, seeded pools and new test tasks."""

import math

import pytest
import torch

from amaml_ext import tasks


def test_cosmixture_matches_its_formula_and_ranges():
    fam = tasks.CosMixture(shots=7, val=5)
    pool = fam.pool(50, seed=3)
    A, w, phi = pool.params.unbind(1)
    assert A.min() >= 0.1 and A.max() <= 1 and w.min() >= 0.5 * math.pi and w.max() <= 2 * math.pi
    assert phi.min() >= 3 and phi.max() <= 6
    (xs, ys), (xq, yq) = pool.data.support, pool.data.query
    assert xs.shape == (50, 7, 2) and ys.shape == (50, 7, 1) and xq.shape == (50, 5, 2) and yq.shape == (50, 5, 1)
    assert xs.min() >= -1 and xs.max() <= 1
    b, k = 11, 4
    x1, x2 = xs[b, k].tolist()
    a, ww, p = pool.params[b].tolist()
    expect = -0.1 * (a * math.cos(ww * x1 + p) + a * math.cos(ww * x2 + p)) - (x1 ** 2 + x2 ** 2)
    assert ys[b, k, 0].item() == pytest.approx(expect, rel=1e-12)


def test_alpine_matches_its_formula_and_ranges():
    fam = tasks.Alpine(shots=4, val=4)
    pool = fam.pool(40, seed=1)
    lim = 5 * math.pi / 12
    assert pool.params.abs().max() <= lim and pool.params.shape == (40, 2)
    assert not torch.equal(pool.params[:, 0], pool.params[:, 1])  # drawn independently
    xs, ys = pool.data.support
    assert xs.abs().max() <= 1 and xs.abs().max() > 0.5  # the model sees x / 10
    b, k = 7, 2
    x1, x2 = (xs[b, k] * 10).tolist()
    p1, p2 = pool.params[b].tolist()
    expect = abs(x1 * math.sin(x1 + p1) + 0.1 * x1) + abs(x2 * math.sin(x2 + p2) + 0.1 * x2)
    assert ys[b, k, 0].item() == pytest.approx(expect, rel=1e-12)
    raw = tasks.Alpine(shots=4, val=4, input_scale=1.0).pool(40, seed=1)
    torch.testing.assert_close(raw.data.support[0], xs * 10)
    torch.testing.assert_close(raw.data.support[1], ys)


def test_pools_are_seeded_and_test_tasks_are_new():
    fam = tasks.make_family("cosmixture", 5, 5)
    tr, te = tasks.train_test_pools(fam, 10, 10, seed=0)
    tr2, _ = tasks.train_test_pools(fam, 10, 10, seed=0)
    assert torch.equal(tr.params, tr2.params) and torch.equal(tr.data.support[0], tr2.data.support[0])
    assert not torch.isin(te.params[:, 0], tr.params[:, 0]).any()
    batch = tr.batch(torch.tensor([3, 1]), dtype=torch.float32)
    assert batch.support[0].dtype == torch.float32 and torch.equal(batch.support[1][1], tr.data.support[1][1].float())
    with pytest.raises(ValueError, match="argument 'task' must be one of"):
        tasks.make_family("sine")
    with pytest.raises(ValueError, match="argument 'shots' must be a positive int, got 0"):
        tasks.CosMixture(shots=0)
