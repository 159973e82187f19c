"""Task families, the meta-training loop (checkpoints, resume) and the amaml-ext command."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from amaml_ext import flatten_params, models, tasks, unflatten_params
from amaml_ext import learners as L
from amaml_ext.cli import main
from amaml_ext.train import RunConfigMismatch, meta_test, meta_train, nrmse, task_indices


# ---- task families --------------------------------------------------------------------------

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


def test_task_indices_depend_only_on_seed_and_step():
    a = task_indices(0, 5, 100, 5)
    assert torch.equal(a, task_indices(0, 5, 100, 5)) and len(set(a.tolist())) == 5
    assert not torch.equal(a, task_indices(0, 6, 100, 5))


# ---- meta-training: checkpoints and resume ----------------------------------------------------

def _setup(method="amaml"):
    torch.manual_seed(0)
    net = models.mlp(width=8)
    pool = tasks.CosMixture(10, 10).pool(8, seed=0)
    learner = L.make_learner(method, net, F.mse_loss, inner_steps=5, maml_steps=2, solver="rk4") \
        if method == "amaml" else L.make_learner(method, net, F.mse_loss, inner_steps=5, maml_steps=2)
    return net, pool, learner


@pytest.mark.parametrize("method", ["amaml", "imaml"])
def test_resume_equals_uninterrupted(tmp_path, method):
    net, pool, learner = _setup(method)
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
    _, pool, learner = _setup("fomaml")
    with pytest.raises(ValueError, match="argument 'meta_batch' must be at most the pool size 8, got 9"):
        meta_train(learner, pool, meta_steps=2, out_dir=str(tmp_path), meta_batch=9, progress=False)
    with pytest.raises(ValueError, match="argument 'meta_steps' must be a positive int, got 0"):
        meta_train(learner, pool, meta_steps=0, out_dir=str(tmp_path), progress=False)


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


# ---- the command ------------------------------------------------------------------------------

TINY = ["--task", "cosmixture", "--pool-size", "6", "--meta-batch", "2", "--inner-steps", "4",
        "--maml-steps", "2", "--checkpoint-every", "2", "--quiet"]


def test_command_train_resume_evaluate(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--method", "amaml", "--solver", "rk4", "--meta-steps", "3", "--seed", "1",
                 "--out", out] + TINY) == 0
    theta = torch.load(os.path.join(out, "theta.pt"))
    assert theta.dim() == 1 and theta.numel() == 1185
    with pytest.raises(SystemExit, match="already holds a run; add --resume"):
        main(["train", "--method", "amaml", "--solver", "rk4", "--meta-steps", "5", "--seed", "1", "--out", out] + TINY)
    assert main(["train", "--method", "amaml", "--solver", "rk4", "--meta-steps", "5", "--seed", "1",
                 "--out", out, "--resume"] + TINY) == 0
    ck = torch.load(os.path.join(out, "checkpoint.pt"))
    assert ck["step"] == 5 and len(ck["metrics"]) == 5
    # resuming 3 -> 5 equals an uninterrupted 5-step run
    out2 = str(tmp_path / "run5")
    main(["train", "--method", "amaml", "--solver", "rk4", "--meta-steps", "5", "--seed", "1", "--out", out2] + TINY)
    assert torch.equal(torch.load(os.path.join(out, "theta.pt")), torch.load(os.path.join(out2, "theta.pt")))
    assert main(["evaluate", "--run", out, "--test-steps", "3", "--quiet"]) == 0
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert ev["step"] == [0, 1, 2, 3] and ev["test_tasks"] == 6 and ev["method"] == "amaml"


def test_command_compare_writes_plot_and_table(tmp_path, capsys):
    out = str(tmp_path / "cmp")
    args = ["compare", "--methods", "amaml,maml1,reptile", "--solver", "euler", "--adjoint", "discrete",
            "--meta-steps", "2", "--out", out, "--test-steps", "4"] + TINY
    assert main(args) == 0
    for f in ("compare.png", "compare.md", "compare.json"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    table = open(os.path.join(out, "compare.md")).read()
    for label in ("A-MAML", "MAML-1", "Reptile"):
        assert f"| {label} |" in table
    res = json.load(open(os.path.join(out, "compare.json")))
    assert set(res["curves"]) == {"amaml", "maml1", "reptile"}
    # a second call finds the runs trained and only re-evaluates
    before = os.path.getmtime(os.path.join(out, "amaml", "checkpoint.pt"))
    capsys.readouterr()
    assert main([a for a in args if a != "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "amaml: already trained" in said and "reptile: already trained" in said
    assert os.path.getmtime(os.path.join(out, "amaml", "checkpoint.pt")) == before


@pytest.mark.parametrize("argv,message", [
    (["train", "--method", "maml3", "--out", "x"], "argument --method: invalid choice: 'maml3'"),
    (["train", "--method", "maml", "--out", "x", "--meta-steps", "0"], "argument --meta-steps: expected a positive integer, got '0'"),
    (["train", "--method", "maml", "--out", "x", "--inner-lr", "-1"], "argument --inner-lr: expected a positive finite number, got '-1'"),
    (["compare", "--methods", "amaml,foo", "--out", "x"], "argument --methods: expected a comma-separated subset"),
    (["train", "--method", "maml", "--out", "x", "--task", "sine"], "argument --task: invalid choice: 'sine'"),
])
def test_command_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_command_reports_unusable_device_and_directories(tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device: 'cuda' requested but no CUDA device is available"):
            main(["train", "--method", "maml", "--out", str(tmp_path / "r"), "--device", "cuda"] + TINY)
    with pytest.raises(SystemExit, match="--device: expected cpu, cuda or cuda:N, got 'gpu0'"):
        main(["train", "--method", "maml", "--out", str(tmp_path / "r"), "--device", "gpu0"] + TINY)
    with pytest.raises(SystemExit, match="--meta-batch: must be at most --pool-size 6, got 7"):
        main(["train", "--method", "maml", "--meta-steps", "1", "--out", str(tmp_path / "r")] + TINY + ["--meta-batch", "7"])
    with pytest.raises(SystemExit, match="has no config.json"):
        main(["evaluate", "--run", str(tmp_path)])


def test_python_dash_m_runs_the_command():
    r = subprocess.run([sys.executable, "-m", "amaml_ext", "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "compare" in r.stdout and "train" in r.stdout


# ---- the command on real-data task families (fixtures in the original formats) ----------------

def test_command_compare_on_a_movielens_fixture(tmp_path):
    d = tmp_path / "data" / "ml-100k"
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    stars = torch.randint(1, 6, (120, 100), generator=g)
    lines = [f"{u + 1}\t{i + 1}\t{int(stars[u, i])}\t88125{u:03d}{i:02d}" for u in range(120) for i in range(100)]
    (d / "u.data").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "cmp")
    assert main(["compare", "--task", "movielens-100k", "--data-root", str(tmp_path / "data"), "--methods",
                 "amaml,fomaml", "--solver", "euler", "--adjoint", "discrete", "--meta-steps", "2",
                 "--inner-steps", "3", "--out", out, "--quiet"]) == 0
    cfg = json.load(open(os.path.join(out, "amaml", "config.json")))
    assert cfg["kind"] == "ratings" and cfg["setting"] == "10shot-15val" and cfg["model"] == "mlp40"
    theta = torch.load(os.path.join(out, "amaml", "theta.pt"))
    assert theta.numel() == 100 * 40 + 40 + 40 * 40 + 40 + 40 + 1  # one-hot of 100 items -> MLP 2x40
    ev = json.load(open(os.path.join(out, "fomaml", "eval.json")))
    assert ev["test_tasks"] == 100 and ev["metric"] == "nrmse"
    assert "resample" not in cfg
    r = str(tmp_path / "resampled")
    assert main(["train", "--task", "movielens-100k", "--data-root", str(tmp_path / "data"), "--method", "fomaml",
                 "--inner-steps", "2", "--meta-steps", "2", "--resample", "--out", r, "--quiet"]) == 0
    assert json.load(open(os.path.join(r, "config.json")))["resample"] is True
    with pytest.raises(SystemExit, match="argument --resample: only for the rating tasks, not --task cosmixture"):
        main(["train", "--method", "maml", "--resample", "--out", str(tmp_path / "y")] + TINY)
    with pytest.raises(SystemExit, match="--setting: --task movielens-100k takes one of"):
        main(["train", "--task", "movielens-100k", "--setting", "50shot-50val", "--method", "maml", "--out", out])
    with pytest.raises(SystemExit, match="--task movielens-100k: .*u.data"):
        main(["train", "--task", "movielens-100k", "--data-root", str(tmp_path / "nowhere"), "--method", "maml",
              "--meta-steps", "1", "--out", str(tmp_path / "x"), "--quiet"])


def test_command_compare_on_an_omniglot_fixture(tmp_path, monkeypatch):
    from helpers import make_omniglot
    from amaml_ext.data import images
    from amaml_ext.train import benchmarks
    make_omniglot(str(tmp_path))
    # the fixture has 8 characters, not 1,623: train on 6 of them (the real default is 1,200)
    monkeypatch.setitem(benchmarks._DATASETS, ("omniglot", None), images.Omniglot(str(tmp_path), n_train=6))
    out = str(tmp_path / "cmp")
    assert main(["compare", "--task", "omniglot", "--methods", "amaml,maml1", "--solver", "euler", "--adjoint",
                 "discrete", "--channels", "4", "--ways", "3", "--meta-steps", "2", "--inner-steps", "2",
                 "--pool-size", "7", "--out", out, "--quiet"]) == 0
    ev = json.load(open(os.path.join(out, "amaml", "eval.json")))
    assert ev["metric"] == "accuracy" and ev["test_tasks"] == 7 and 0 <= ev["mean"][-1] <= 1
    assert "% |" in open(os.path.join(out, "compare.md")).read()
    with pytest.raises(SystemExit, match="--setting: not used by --task omniglot"):
        main(["train", "--task", "omniglot", "--setting", "10shot-15val", "--method", "maml", "--out", out])
    with pytest.raises(SystemExit, match="--ways/--shots/--query-shots: only for the image tasks"):
        main(["train", "--task", "cosmixture", "--ways", "5", "--method", "maml", "--out", out])


def test_resume_across_devices_and_json_config(tmp_path):
    """The device string (``cuda`` alone, ``cuda:0`` under torchrun) and the compile mode may change
    on resume; a config with tuples resumes (config.json turns them into lists); a config that is
    not JSON-able is refused up front."""
    _, pool, learner = _setup("fomaml")
    out = str(tmp_path / "r")
    kw = dict(meta_batch=2, progress=False, out_dir=out)
    meta_train(learner, pool, meta_steps=1, config={"device": "cuda", "hidden": (4, 4)}, **kw)
    meta_train(learner, pool, meta_steps=2, config={"device": "cuda:0", "hidden": (4, 4)}, resume=True, **kw)
    with pytest.raises(ValueError, match="argument 'config' must be JSON-able"):
        meta_train(learner, pool, meta_steps=3, config={"f": object()}, resume=True, **kw)


def test_meta_test_rejects_a_bad_record_every():
    net, pool, _ = _setup("fomaml")
    theta = flatten_params(net)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match=f"argument 'record_every' must be a positive int, got {bad}"):
            meta_test(net, F.mse_loss, theta, pool.all(dtype=torch.float32), steps=2, record_every=bad)
