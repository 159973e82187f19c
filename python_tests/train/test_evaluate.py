"""Meta-testing (amaml_ext.train.evaluate): the metric after each step against a plain loop per
task, padded query sets, its arguments."""

import pytest
import torch
from torch.nn import functional as F

from amaml_ext import flatten_params, models, tasks, unflatten_params
from amaml_ext import learners as L
from amaml_ext.train import meta_test, nrmse

from helpers import cosmixture_learner


def test_meta_test_records_nrmse_after_each_step():
    torch.manual_seed(0)
    net = models.mlp(width=8).double()
    batch = tasks.CosMixture(10, 10).pool(4, seed=2).all()
    theta = flatten_params(net)
    c = meta_test(net, F.mse_loss, theta, batch, steps=3, lr=0.05)
    assert c["step"] == [0, 1, 2, 3] and len(c["final"]) == 4
    # reference: a plain loop per task
    errs = []
    for b in range(4):
        t = batch.task(b)
        u = L.FOMAML(net, F.mse_loss, inner_lr=0.05, steps=3).adapt(theta, t.support)
        pred = torch.func.functional_call(net, unflatten_params(net, u), (t.query[0],))
        errs.append(((pred - t.query[1]).norm() / t.query[1].norm()).item())
    assert c["final"] == pytest.approx(errs, rel=1e-10)
    assert c["mean"][-1] == pytest.approx(sum(errs) / 4, rel=1e-10)
    torch.testing.assert_close(nrmse(batch.query[1] * 2, batch.query[1]), torch.ones(4, dtype=torch.float64))



@pytest.mark.parametrize("metric", ["nrmse", "accuracy"])
def test_meta_test_ragged_query_equals_each_task_alone(metric):
    """Padded query sets (query_mask): the metric of each task equals meta-testing that task
    alone on its real query points; the padding (filled with junk) must not count, also when
    the tasks are processed in chunks."""
    torch.manual_seed(0)
    sizes = [7, 3, 10, 1, 5]
    if metric == "nrmse":
        net = models.mlp(width=8).double()
        full = tasks.CosMixture(6, 10).pool(5, seed=3).all()
        loss, junk = F.mse_loss, lambda t: t.fill_(1e3)
    else:
        net = models.mlp(in_dim=2, width=8, out_dim=3).double()
        xs, xq = torch.randn(5, 6, 2, dtype=torch.float64), torch.randn(5, 10, 2, dtype=torch.float64)
        full = tasks.TaskBatch((xs, torch.randint(0, 3, (5, 6))), (xq, torch.randint(0, 3, (5, 10))))
        loss, junk = F.cross_entropy, lambda t: t.fill_(0)
    mask = torch.arange(10).unsqueeze(0) < torch.tensor(sizes).unsqueeze(1)
    xq, yq = full.query[0].clone(), full.query[1].clone()
    for b, n in enumerate(sizes):
        junk(xq[b, n:]); junk(yq[b, n:])
    ragged = tasks.TaskBatch(full.support, (xq, yq), mask)
    theta = flatten_params(net)
    got = meta_test(net, loss, theta, ragged, steps=2, lr=0.05, metric=metric, chunk=2)
    want = []
    for b, n in enumerate(sizes):
        alone = tasks.TaskBatch(tuple(t[b:b + 1] for t in full.support), (full.query[0][b:b + 1, :n],
                                                                         full.query[1][b:b + 1, :n]))
        want += meta_test(net, loss, theta, alone, steps=2, lr=0.05, metric=metric)["final"]
    assert got["final"] == pytest.approx(want, rel=1e-12, abs=1e-15)
    unmasked = meta_test(net, loss, theta, tasks.TaskBatch(full.support, (xq, yq)), steps=2, lr=0.05, metric=metric)
    assert unmasked["final"] != pytest.approx(want, rel=1e-6)          # the padding would count without the mask


def test_meta_test_rejects_a_bad_record_every():
    net, pool, _ = cosmixture_learner("fomaml")
    theta = flatten_params(net)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match=f"argument 'record_every' must be a positive int, got {bad}"):
            meta_test(net, F.mse_loss, theta, pool.all(dtype=torch.float32), steps=2, record_every=bad)
