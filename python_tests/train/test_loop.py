"""The meta-training loop (amaml_ext.train.loop): the tasks of each step, checkpoints and resume,
a diverging inner run, checkpoints by time, an unwritable run directory, no run directory, its
arguments."""

import csv
import dataclasses
import json
import os

import pytest
import torch
from torch.nn import functional as F

import amaml_ext
from amaml_ext import flatten_params, learners, tasks, train
from amaml_ext.train import RunConfigMismatch, meta_train, task_indices

from helpers import cosmixture_learner, mlp


def test_task_indices_depend_only_on_seed_and_step():
    a = task_indices(0, 5, 100, 5)
    assert torch.equal(a, task_indices(0, 5, 100, 5)) and len(set(a.tolist())) == 5
    assert not torch.equal(a, task_indices(0, 6, 100, 5))


# ---- meta-training: checkpoints and resume ----------------------------------------------------

@pytest.mark.parametrize("method", ["amaml", "imaml"])
def test_resume_equals_uninterrupted(tmp_path, method):
    net, pool, learner = cosmixture_learner(method)
    theta0 = flatten_params(net)
    kw = dict(meta_steps=7, meta_batch=3, lr=1e-2, seed=4, checkpoint_every=2, progress=False, theta0=theta0)
    full = meta_train(learner, pool, out_dir=str(tmp_path / "full"), **kw)

    def stop_at_5(step, row):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt, match="interrupted after meta-step 5"):
        meta_train(learner, pool, out_dir=str(tmp_path / "cut"), on_step=stop_at_5, **kw)
    assert not (tmp_path / "cut" / "theta.pt").exists()
    with pytest.raises(FileExistsError, match="already holds a run"):
        meta_train(learner, pool, out_dir=str(tmp_path / "cut"), **kw)
    resumed = meta_train(learner, pool, out_dir=str(tmp_path / "cut"), resume=True, **kw)
    assert torch.equal(resumed, full)
    assert not torch.equal(full, theta0)
    assert torch.equal(torch.load(tmp_path / "cut" / "theta.pt"), full)
    rows_full = (tmp_path / "full" / "metrics.csv").read_text().splitlines()
    rows_cut = (tmp_path / "cut" / "metrics.csv").read_text().splitlines()
    assert len(rows_full) == 8
    # same steps and losses (the seconds column differs)
    strip = lambda rows: [r.rsplit(",", 1)[0] for r in rows]  # noqa: E731
    assert strip(rows_cut) == strip(rows_full)
    assert not any(n.startswith(".tmp-") for n in os.listdir(tmp_path / "cut"))
    # resuming with other settings is refused
    with pytest.raises(RunConfigMismatch, match="lr"):
        meta_train(learner, pool, out_dir=str(tmp_path / "cut"), resume=True, **dict(kw, lr=0.5))


def test_meta_train_rejects_bad_arguments(tmp_path):
    _, pool, learner = cosmixture_learner("fomaml")
    with pytest.raises(ValueError, match="argument 'meta_batch' must be at most the pool size 8, got 9"):
        meta_train(learner, pool, meta_steps=2, out_dir=str(tmp_path), meta_batch=9, progress=False)
    with pytest.raises(ValueError, match="argument 'meta_steps' must be a positive int, got 0"):
        meta_train(learner, pool, meta_steps=0, out_dir=str(tmp_path), progress=False)


def test_resume_across_devices_and_json_config(tmp_path):
    """The device string (``cuda`` alone, ``cuda:0`` under torchrun) and the compile mode may change
    on resume; a config with tuples resumes (config.json turns them into lists); a config that is
    not JSON-able is refused up front."""
    _, pool, learner = cosmixture_learner("fomaml")
    out = str(tmp_path / "r")
    kw = dict(meta_batch=2, progress=False, out_dir=out)
    meta_train(learner, pool, meta_steps=1, config={"device": "cuda", "hidden": (4, 4)}, **kw)
    meta_train(learner, pool, meta_steps=2, config={"device": "cuda:0", "hidden": (4, 4)}, resume=True, **kw)
    with pytest.raises(ValueError, match="argument 'config' must be JSON-able"):
        meta_train(learner, pool, meta_steps=3, config={"f": object()}, resume=True, **kw)


def test_diverging_inner_run_stops_with_checkpoint(tmp_path):
    m = mlp(width=8, depth=1, dtype=None)
    pool = tasks.CosMixture(10, 10).pool(4, seed=0)
    learner = learners.make_learner("maml", m, F.mse_loss, maml_steps=3, inner_lr=1e6)
    with pytest.raises(FloatingPointError, match="meta-step 1 .*not finite.*0 meta-steps before it"):
        train.meta_train(learner, pool, meta_steps=5, out_dir=str(tmp_path), meta_batch=2, progress=False)
    assert train.load_checkpoint(str(tmp_path))["step"] == 0


def test_overflowing_meta_gradient_is_told_apart_from_a_diverged_inner_run(tmp_path, monkeypatch):
    """A finite query loss with a non-finite meta-gradient (an exponentially sensitive inner run,
    measured on Alpine) must not be reported as a diverged inner training."""
    _, pool, learner = cosmixture_learner("fomaml")
    real, calls = learner.meta_grad, []

    def overflowing(theta, batch):
        out = real(theta, batch)
        calls.append(1)
        return dataclasses.replace(out, grad=out.grad * float("inf")) if len(calls) == 3 else out
    monkeypatch.setattr(learner, "meta_grad", overflowing)
    with pytest.raises(FloatingPointError) as e:
        train.meta_train(learner, pool, meta_steps=5, out_dir=str(tmp_path), meta_batch=2, progress=False)
    msg = str(e.value)
    assert "the meta-gradient of meta-step 3" in msg and "the query loss is finite" in msg
    assert "diverged" not in msg.replace("did not diverge", "") and "2 meta-steps before it" in msg
    assert train.load_checkpoint(str(tmp_path))["step"] == 2


def _huge_at_step_3(learner, monkeypatch, factor=1e22):
    """Make ``learner``'s third meta-gradient finite but huge (entries ~1e21, as measured on Alpine:
    their float32 norm overflows and their square is past float32's range)."""
    real, calls = learner.meta_grad, []

    def huge(theta, batch):
        out = real(theta, batch)
        calls.append(1)
        return dataclasses.replace(out, grad=out.grad * factor) if len(calls) == 3 else out
    monkeypatch.setattr(learner, "meta_grad", huge)


def test_a_finite_huge_meta_gradient_is_not_called_non_finite_and_adam_is_kept_finite(tmp_path, monkeypatch):
    _, pool, learner = cosmixture_learner("fomaml")
    _huge_at_step_3(learner, monkeypatch)
    with pytest.raises(FloatingPointError) as e:
        train.meta_train(learner, pool, meta_steps=5, out_dir=str(tmp_path / "free"), meta_batch=2, progress=False)
    msg = str(e.value)
    assert "meta-step 3" in msg and "is finite but too large for Adam in torch.float32" in msg
    assert "--clip-grad-norm" in msg and "float64" in msg and "not finite" not in msg
    assert train.load_checkpoint(str(tmp_path / "free"))["step"] == 2
    # clipped, it is a step like any other: theta and Adam's state stay finite, its norm is recorded
    _huge_at_step_3(learner, monkeypatch)
    theta = train.meta_train(learner, pool, meta_steps=5, out_dir=str(tmp_path / "clip"), meta_batch=2,
                             progress=False, clip_grad_norm=1.0)
    assert bool(torch.isfinite(theta).all())
    state = train.load_checkpoint(str(tmp_path / "clip"))["optimizer"]["state"][0]
    assert bool(torch.isfinite(state["exp_avg_sq"]).all()) and float(state["exp_avg_sq"].max()) < 1.0
    rows = list(csv.DictReader(open(tmp_path / "clip" / "metrics.csv")))
    assert 1e20 < float(rows[2]["grad_norm"]) < 1e30 and rows[2]["clipped"] == "1"


def test_checkpoint_by_time(tmp_path):
    m = mlp(width=8, depth=1, dtype=None)
    pool = tasks.CosMixture(10, 10).pool(4, seed=0)
    learner = learners.make_learner("fomaml", m, F.mse_loss, inner_steps=2)

    def stop(step, row):
        if step == 3:
            raise RuntimeError("crash")      # not an interrupt: nothing is saved on the way out
    with pytest.raises(RuntimeError):
        train.meta_train(learner, pool, meta_steps=10, out_dir=str(tmp_path), meta_batch=2, progress=False,
                         checkpoint_every=1000, checkpoint_seconds=0.0, on_step=stop)
    assert train.load_checkpoint(str(tmp_path))["step"] == 3


def test_unwritable_run_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    m = mlp(seed=None, width=4, depth=1, dtype=None)
    learner = learners.make_learner("fomaml", m, F.mse_loss, inner_steps=2)
    with pytest.raises(ValueError, match="argument 'out_dir': cannot write"):
        train.meta_train(learner, tasks.CosMixture(10, 10).pool(4, seed=0), meta_steps=1,
                         out_dir=str(blocker / "run"), meta_batch=2, progress=False)


def test_meta_train_without_out_dir_and_learners_doc_example():
    import doctest
    m = mlp(width=4, depth=1, dtype=None)
    learner = learners.make_learner("fomaml", m, F.mse_loss, inner_steps=2)
    pool = tasks.CosMixture(10, 10).pool(4, seed=0)
    a = train.meta_train(learner, pool, meta_steps=2, meta_batch=2, progress=False)
    b = train.meta_train(learner, pool, meta_steps=2, meta_batch=2, progress=False)   # twice: no FileExistsError
    assert torch.equal(a, b)
    res = doctest.testmod(learners, extraglobs={"torch": torch, "amaml_ext": amaml_ext}, verbose=False)
    assert res.attempted > 0 and res.failed == 0


# ---- clipping the meta-gradient -----------------------------------------------------------------

def _adam_on_clipped(learner, pool, theta0, steps, meta_batch, seed, lr, clip):
    """A plain mirror of meta_train's outer loop: Adam on g * min(1, clip / |g|)."""
    theta = torch.nn.Parameter(theta0.clone())
    opt = torch.optim.Adam([theta], lr=lr)
    norms = []
    for step in range(steps):
        g = learner.meta_grad(theta.detach(), pool.batch(task_indices(seed, step, len(pool), meta_batch),
                                                         dtype=theta0.dtype)).grad
        norms.append(float(g.norm()))
        theta.grad = g * min(1.0, clip / norms[-1])
        opt.step()
    return theta.detach(), norms


def test_clip_grad_norm_equals_adam_on_the_clipped_gradient(tmp_path):
    net, pool, learner = cosmixture_learner("maml")
    theta0 = flatten_params(net)
    kw = dict(meta_steps=6, meta_batch=3, lr=1e-2, seed=1, progress=False, theta0=theta0)
    free = meta_train(learner, pool, out_dir=str(tmp_path / "free"), **kw)
    _, norms = _adam_on_clipped(learner, pool, theta0, 6, 3, 1, 1e-2, float("inf"))
    clip = sum(sorted(norms)[2:4]) / 2                 # about half the steps are clipped, none borderline
    clipped = meta_train(learner, pool, out_dir=str(tmp_path / "clip"), clip_grad_norm=clip, **kw)
    ref, ref_norms = _adam_on_clipped(learner, pool, theta0, 6, 3, 1, 1e-2, clip)
    torch.testing.assert_close(clipped, ref, rtol=1e-5, atol=1e-6)
    assert (clipped - free).abs().max() > 1e-4          # clipping changed the run
    rows = list(csv.DictReader(open(tmp_path / "clip" / "metrics.csv")))
    assert [r["clipped"] for r in rows] == [str(int(n > clip)) for n in ref_norms]
    assert "0" in [r["clipped"] for r in rows] and "1" in [r["clipped"] for r in rows]
    torch.testing.assert_close(torch.tensor([float(r["grad_norm"]) for r in rows]), torch.tensor(ref_norms))
    assert "clipped" not in open(tmp_path / "free" / "metrics.csv").readline()
    assert json.load(open(tmp_path / "clip" / "config.json"))["clip_grad_norm"] == clip
    assert "clip_grad_norm" not in json.load(open(tmp_path / "free" / "config.json"))
    with pytest.raises(RunConfigMismatch, match="clip_grad_norm"):
        meta_train(learner, pool, out_dir=str(tmp_path / "clip"), resume=True, clip_grad_norm=2 * clip, **kw)
    with pytest.raises(RunConfigMismatch, match="clip_grad_norm"):
        meta_train(learner, pool, out_dir=str(tmp_path / "free"), resume=True, clip_grad_norm=clip, **kw)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "1"])
def test_clip_grad_norm_must_be_a_positive_finite_number(tmp_path, bad):
    _, pool, learner = cosmixture_learner("fomaml")
    with pytest.raises(ValueError, match=f"argument 'clip_grad_norm' must be a positive finite number, got {bad!r}"):
        meta_train(learner, pool, meta_steps=1, out_dir=str(tmp_path), meta_batch=2, progress=False,
                   clip_grad_norm=bad)
    assert not os.path.exists(tmp_path / "config.json")


def test_a_learner_stop_keeps_its_type_and_numbers_through_meta_train(tmp_path, monkeypatch):
    """AdjointUnstable (keyword-only constructor) came out of meta_train as a TypeError."""
    from amaml_ext import accuracy
    _, pool, learner = cosmixture_learner("fomaml")
    real, calls = learner.meta_grad, []

    def unstable(theta, batch):
        calls.append(1)
        if len(calls) == 2:
            raise accuracy.AdjointUnstable("adjoint_meta_grad", h=0.01, T=2.0, h_lambda=3.3, bound=2.0, adjoint="heun")
        return real(theta, batch)
    monkeypatch.setattr(learner, "meta_grad", unstable)
    with pytest.raises(accuracy.AdjointUnstable) as e:
        train.meta_train(learner, pool, meta_steps=4, out_dir=str(tmp_path), meta_batch=2, progress=False)
    assert str(e.value).startswith("meta_train stopped at meta-step 2 (method fomaml")
    assert "past the scheme's stability bound 2" in str(e.value) and "1 meta-steps before it" in str(e.value)
    assert e.value.h_lambda == 3.3 and train.load_checkpoint(str(tmp_path))["step"] == 1
