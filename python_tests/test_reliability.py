"""Defects found when the library was tried as a new user would: each of these returned a wrong
result silently, crashed, or lost work before it was fixed."""

import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import amaml_ext
from amaml_ext import adjoint_meta_grad, flatten_params, learners, tasks, train, unflatten_params

from helpers import F64, mlp, rel, stack_tasks


def data(seed, n=12):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g, dtype=F64) * 2 - 1
    return x, torch.sin(2 * x[:, :1]) + x[:, 1:]


def unrolled(model, loss, theta, support, query, steps, lr):
    """Autograd through `steps` GD steps of the model as it is now (frozen parameters and
    buffers read from it)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    consts = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    consts.update(dict(model.named_buffers()))

    def f(u, x):
        params, i = {}, 0
        for n in names:
            p = dict(model.named_parameters())[n]
            params[n] = u[i:i + p.numel()].view_as(p)
            i += p.numel()
        return torch.func.functional_call(model, (params, consts), (x,))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    th = theta.clone().requires_grad_(True)
    u = th
    with sdpa_kernel(SDPBackend.MATH):     # double backward through attention needs the math kernel
        for _ in range(steps):
            (g,) = torch.autograd.grad(loss(f(u, support[0]), support[1]), u, create_graph=True)
            u = u - lr * g
        (grad,) = torch.autograd.grad(loss(f(u, query[0]), query[1]), th)
    return grad


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp(width=8, depth=1)
        self.register_buffer("scale", torch.tensor(1.0, dtype=F64))

    def forward(self, x):
        return self.net(x) * self.scale


EXACT = dict(h=0.1, solver="euler", adjoint="discrete")


@pytest.mark.parametrize("compile", [False, True])
def test_buffer_changed_between_calls_is_seen(compile):
    m = Scaled()
    s, q = data(0), data(1)
    theta = flatten_params(m)
    adjoint_meta_grad(m, F.mse_loss, theta, 0.5, support=s, query=q, compile=compile, **EXACT)
    m.scale.fill_(2.5)                                       # in place
    r = adjoint_meta_grad(m, F.mse_loss, theta, 0.5, support=s, query=q, compile=compile, **EXACT)
    assert rel(r.grad, unrolled(m, F.mse_loss, theta, s, q, 5, 0.1)) < 1e-10
    m.scale = torch.tensor(0.5, dtype=F64)                   # reassigned
    r = adjoint_meta_grad(m, F.mse_loss, theta, 0.5, support=s, query=q, compile=compile, **EXACT)
    assert rel(r.grad, unrolled(m, F.mse_loss, theta, s, q, 5, 0.1)) < 1e-10


def test_batchnorm_eval_running_stats_updated_between_calls():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).double().eval()
    s, q = data(0), data(1)
    theta = flatten_params(m)
    adjoint_meta_grad(m, F.mse_loss, theta, 0.5, support=s, query=q, **EXACT)
    m.train()
    with torch.no_grad():
        for _ in range(5):
            m(torch.randn(16, 2, dtype=F64) * 3 + 1)        # the user updates the running statistics
    m.eval()
    r = adjoint_meta_grad(m, F.mse_loss, theta, 0.5, support=s, query=q, **EXACT)
    assert rel(r.grad, unrolled(m, F.mse_loss, theta, s, q, 5, 0.1)) < 1e-10


def test_frozen_parameters_are_constants():
    m = mlp(width=8, depth=1)
    m[0].weight.requires_grad_(False)
    theta = flatten_params(m)
    assert theta.numel() == 8 + 8 + 1                           # bias of layer 0 and layer 2
    views = unflatten_params(m, theta)
    assert list(views) == ["0.bias", "2.weight", "2.bias"]
    s, q = data(0), data(1)
    r = adjoint_meta_grad(m, F.mse_loss, theta, 0.5, support=s, query=q, **EXACT)
    assert rel(r.grad, unrolled(m, F.mse_loss, theta, s, q, 5, 0.1)) < 1e-10
    with torch.no_grad():
        m[0].weight.mul_(2)                                     # frozen weights changed: seen
    r2 = adjoint_meta_grad(m, F.mse_loss, theta, 0.5, support=s, query=q, **EXACT)
    assert rel(r2.grad, unrolled(m, F.mse_loss, theta, s, q, 5, 0.1)) < 1e-10
    # every learner follows the same rule
    xs, ys = stack_tasks(data(i) for i in range(3))
    batch = tasks.TaskBatch((xs, ys), (xs, ys))
    for name in ("maml", "fomaml", "reptile", "imaml", "amaml"):
        step = learners.make_learner(name, m, F.mse_loss, inner_steps=3, maml_steps=3, inner_lr=0.1).meta_grad(theta, batch)
        assert step.grad.shape == theta.shape
    all_frozen = nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        flatten_params(all_frozen)


def test_loss_must_be_a_scalar_and_sets_non_empty():
    m = mlp(width=4, depth=1)
    theta = flatten_params(m)
    s, q = data(0), data(1)
    per_sample = lambda p, y: F.mse_loss(p, y, reduction="none")  # noqa: E731
    with pytest.raises(ValueError, match=r"scalar.*shape \(12, 1\)"):
        adjoint_meta_grad(m, per_sample, theta, 0.5, support=s, query=q)
    with pytest.raises(ValueError, match="scalar torch.Tensor, got float"):
        adjoint_meta_grad(m, lambda p, y: 1.0, theta, 0.5, support=s, query=q)
    with pytest.raises(ValueError, match="floating-point"):
        adjoint_meta_grad(m, lambda p, y: torch.tensor(1), theta, 0.5, support=s, query=q)
    empty = (s[0][:0], s[1][:0])
    with pytest.raises(ValueError, match="'support' is empty"):
        adjoint_meta_grad(m, F.mse_loss, theta, 0.5, support=empty, query=q)
    with pytest.raises(ValueError, match="'query' is empty"):
        adjoint_meta_grad(m, F.mse_loss, theta, 0.5, support=s, query=empty)


def test_dropout_in_training_mode_warns_naming_the_module():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 1)).double()
    s, q = data(0), data(1)
    with pytest.warns(RuntimeWarning, match=r"dropout in training mode \(2\).*eval"):
        adjoint_meta_grad(m, F.mse_loss, flatten_params(m), 0.5, support=s, query=q, **EXACT)
    m.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adjoint_meta_grad(m, F.mse_loss, flatten_params(m), 0.5, support=s, query=q, **EXACT)


def test_diverging_inner_run_stops_with_checkpoint(tmp_path):
    m = mlp(width=8, depth=1, dtype=None)
    pool = tasks.CosMixture(10, 10).pool(4, seed=0)
    learner = learners.make_learner("maml", m, F.mse_loss, maml_steps=3, inner_lr=1e6)
    with pytest.raises(FloatingPointError, match="meta-step 1 .*not finite.*0 meta-steps before it"):
        train.meta_train(learner, pool, meta_steps=5, out_dir=str(tmp_path), meta_batch=2, progress=False)
    assert train.load_checkpoint(str(tmp_path))["step"] == 0


def _train_cmd(out, steps):
    return [sys.executable, "-m", "amaml_ext", "train", "--task", "cosmixture", "--method", "maml",
            "--maml-steps", "5", "--meta-steps", str(steps), "--checkpoint-every", "100000", "--quiet",
            "--out", out]


def test_sigterm_saves_a_checkpoint_and_resume_is_exact(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cut, full = str(tmp_path / "cut"), str(tmp_path / "full")
    cmd = _train_cmd(cut, 100000)
    cmd[cmd.index("--checkpoint-every") + 1] = "3"
    p = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not os.path.exists(os.path.join(cut, "checkpoint.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)                                       # the loop runs (its handler is installed)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert "SIGTERM" in err and "--resume" in err
    done = train.load_checkpoint(cut)["step"]
    assert done >= 3
    assert f"after meta-step {done};" in err                   # saved at the signal, not only at checkpoints
    # resume to done + 3 steps equals an uninterrupted run of done + 3 steps
    subprocess.run(_train_cmd(cut, done + 3) + ["--resume"], env=env, check=True, capture_output=True)
    subprocess.run(_train_cmd(full, done + 3), env=env, check=True, capture_output=True)
    assert torch.equal(torch.load(os.path.join(cut, "theta.pt")), torch.load(os.path.join(full, "theta.pt")))


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


def test_compile_refused_on_torch_2_13(monkeypatch):
    from amaml_ext import functional
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    m = Scaled()
    s, q = data(0), data(1)
    with pytest.warns(RuntimeWarning, match="2.13.0.*segfaults"):
        r = adjoint_meta_grad(m, F.mse_loss, flatten_params(m), 0.5, support=s, query=q, compile=True, **EXACT)
    assert r.stats["compiled"] is False
    monkeypatch.setattr(torch, "__version__", "2.14.1")
    assert functional.compile_refusal() is None


def test_transformer_encoder_layer_works():
    torch.manual_seed(0)

    class TF(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, dtype=F64)
            self.head = nn.Linear(8, 1, dtype=F64)

        def forward(self, x):
            return self.head(self.enc(x).mean(1))
    m = TF()
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(6, 4, 8, generator=g, dtype=F64), torch.randn(6, 1, generator=g, dtype=F64))
    q = (torch.randn(6, 4, 8, generator=g, dtype=F64), torch.randn(6, 1, generator=g, dtype=F64))
    theta = flatten_params(m)
    r = adjoint_meta_grad(m, F.mse_loss, theta, 0.2, support=s, query=q, h=0.05, solver="euler", adjoint="discrete")
    assert rel(r.grad, unrolled(m, F.mse_loss, theta, s, q, 4, 0.05)) < 1e-10
    xs, ys = s[0].unsqueeze(0).expand(2, -1, -1, -1), s[1].unsqueeze(0).expand(2, -1, -1)
    step = learners.make_learner("maml", m, F.mse_loss, maml_steps=2, inner_lr=0.05).meta_grad(
        theta, tasks.TaskBatch((xs, ys), (xs, ys)))
    assert torch.isfinite(step.grad).all()


def _small_run(tmp_path, steps=2):
    out = str(tmp_path / "run")
    cmd = ["train", "--task", "cosmixture", "--method", "fomaml", "--inner-steps", "2", "--meta-steps", str(steps),
           "--quiet", "--out", out]
    from amaml_ext import cli
    assert cli.main(cmd) == 0
    return out, cmd


@pytest.mark.parametrize("name,content", [("checkpoint.pt", b"PK\x03\x04trunc"), ("checkpoint.pt", b""),
                                          ("config.json", b"{not json"), ("theta.pt", b"garbage")])
def test_damaged_run_files_are_named_and_left_alone(tmp_path, name, content):
    from amaml_ext import cli
    out, cmd = _small_run(tmp_path)
    path = os.path.join(out, name)
    with open(path, "wb") as f:
        f.write(content)
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    run = (lambda: cli.main(["evaluate", "--run", out, "--quiet"])) if name == "theta.pt" else \
        (lambda: cli.main(cmd[:-2] + ["--meta-steps", "4", "--out", out, "--resume"]))
    with pytest.raises(SystemExit, match=f"{name}.*unreadable"):
        run()
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before


def test_checkpoint_missing_keys_or_wrong_size(tmp_path):
    out, cmd = _small_run(tmp_path)
    path = os.path.join(out, "checkpoint.pt")
    ck = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in ck.items() if k != "optimizer"}, path)
    with pytest.raises(train.UnreadableRunFile, match="lacks \\['optimizer'\\]"):
        train.load_checkpoint(out)
    torch.save(dict(ck, theta=torch.zeros(7)), path)
    from amaml_ext import cli
    with pytest.raises(SystemExit, match=r"theta of shape \(7,\).*another model"):
        cli.main(cmd[:-2] + ["--meta-steps", "4", "--out", out, "--resume"])


def test_unwritable_run_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    m = mlp(seed=None, width=4, depth=1, dtype=None)
    learner = learners.make_learner("fomaml", m, F.mse_loss, inner_steps=2)
    with pytest.raises(ValueError, match="argument 'out_dir': cannot write"):
        train.meta_train(learner, tasks.CosMixture(10, 10).pool(4, seed=0), meta_steps=1,
                         out_dir=str(blocker / "run"), meta_batch=2, progress=False)


def test_solver_option_and_model_errors():
    m = mlp(width=4, depth=1)
    theta = flatten_params(m)
    s, q = data(0), data(1)
    for kw, match in ((dict(rtol=0.0), "rtol"), (dict(atol=-1e-8), "atol"), (dict(rtol=5.0), "rtol"),
                      (dict(max_steps=0), "max_steps"), (dict(memory_budget=-1), "memory_budget")):
        with pytest.raises(ValueError, match=match):
            adjoint_meta_grad(m, F.mse_loss, theta, 0.5, support=s, query=q, **kw)
    with pytest.raises(ValueError, match="no trainable parameters"):
        adjoint_meta_grad(nn.Tanh(), F.mse_loss, torch.zeros(0, dtype=F64), 0.5, support=s, query=q)


def test_float32_per_task_horizons_accepted():
    m = mlp(width=4, depth=1)
    xs, ys = stack_tasks(data(i) for i in range(3))
    kw = dict(support=(xs, ys), query=(xs, ys), batched=True, h=0.1, solver="euler", adjoint="discrete")
    T32 = torch.tensor([0.3, 0.7, 1.1], dtype=torch.float32)
    a = adjoint_meta_grad(m, F.mse_loss, flatten_params(m), T32, **kw)
    b = adjoint_meta_grad(m, F.mse_loss, flatten_params(m), torch.tensor([0.3, 0.7, 1.1], dtype=F64), **kw)
    assert torch.equal(a.grad, b.grad)
    c = adjoint_meta_grad(m, F.mse_loss, flatten_params(m)[:].clone(), torch.tensor(0.3, dtype=torch.float32),
                          support=(xs[0], ys[0]), query=(xs[0], ys[0]), h=0.1, solver="euler", adjoint="discrete")
    assert rel(c.grad, b.grad[0]) < 1e-12


def test_import_warns_when_built_against_another_torch(monkeypatch):
    monkeypatch.setattr(amaml_ext, "build_info", lambda: {"torch_version": "2.9.0"})
    with pytest.warns(RuntimeWarning, match="built against torch 2.9.0"):
        amaml_ext._check_build_torch()


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


def test_help_shows_defaults_and_evaluate_plots(tmp_path, capsys):
    from amaml_ext import cli
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    assert "(default: 0.01)" in text and "``" not in text
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "``" not in capsys.readouterr().out
    out, _ = _small_run(tmp_path)
    assert cli.main(["evaluate", "--run", out, "--quiet"]) == 0
    assert os.path.getsize(os.path.join(out, "eval.png")) > 1000


def test_anil_adapts_only_the_head():
    m = mlp(width=6, depth=1)
    theta = flatten_params(m)
    mask = learners.head_mask(m)
    assert mask.tolist() == [0.0] * 18 + [1.0] * 7                 # "2.weight", "2.bias"
    xs, ys = stack_tasks(data(i) for i in range(2))
    xq, yq = stack_tasks(data(i + 5) for i in range(2))
    step = learners.make_learner("anil", m, F.mse_loss, maml_steps=3, inner_lr=0.1).meta_grad(
        theta, tasks.TaskBatch((xs, ys), (xq, yq)))
    # reference: per task, autograd through 3 head-only GD steps (body constant inside, but in the graph)
    ref = torch.zeros_like(theta)
    for b in range(2):
        th = theta.clone().requires_grad_(True)
        body, head = th[:18], th[18:]
        def f(h_, x):
            return torch.func.functional_call(m, unflatten_params(m, torch.cat([body, h_])), (x,))
        for _ in range(3):
            (g,) = torch.autograd.grad(F.mse_loss(f(head, xs[b]), ys[b]), head, create_graph=True)
            head = head - 0.1 * g
        (gb,) = torch.autograd.grad(F.mse_loss(f(head, xq[b]), yq[b]), th)
        ref += gb / 2
    assert rel(step.grad, ref) < 1e-10
    assert step.grad[:18].abs().sum() > 0                           # the body is meta-learned
    with pytest.raises(ValueError, match="head"):
        learners.head_mask(m, head="nothing")


def test_anil_through_the_command(tmp_path):
    from amaml_ext import cli
    out = str(tmp_path / "anil")
    assert cli.main(["train", "--task", "cosmixture", "--method", "anil", "--maml-steps", "2", "--meta-steps", "2",
                     "--quiet", "--out", out]) == 0
    assert cli.main(["evaluate", "--run", out, "--quiet", "--test-steps", "3"]) == 0


def test_batched_flag_with_unbatched_data_says_so():
    m = mlp(width=4, depth=1)
    s, q = data(0), data(1)
    with pytest.raises(ValueError, match="is the data batched"):
        adjoint_meta_grad(m, F.mse_loss, flatten_params(m), 0.5, support=s, query=q, batched=True)
