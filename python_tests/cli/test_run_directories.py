"""The command's run directories (issue 23, items 9-13, 18, 19): settings and lengths that do not
match a run, two processes on one directory, options checked before anything is written, an
unwritable evaluation, file modes, and temporary files left by a killed write."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch
from torch.nn import functional as F

from amaml_ext import learners, tasks, train
from amaml_ext._io import atomic_write_bytes
from amaml_ext.cli import main
from amaml_ext.train.io import LOCK, RunLocked

from helpers import ROOT, mlp, small_run
TINY = ["--task", "cosmixture", "--pool-size", "6", "--meta-batch", "2", "--inner-steps", "2", "--maml-steps", "2",
        "--checkpoint-every", "2", "--quiet"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def _train(out, steps=2, method="fomaml", *extra):
    return ["train", "--method", method, "--meta-steps", str(steps), "--out", out, *TINY, *extra]


def _refused(argv, capsys, *, code=2):
    """Run the command, which must end with exit status ``code``; its stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == code, str(e.value)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _files(d):
    """Every file under ``d`` (relative path -> bytes); {} if it does not exist."""
    found = {}
    for root, _, names in os.walk(d):
        for n in names:
            path = os.path.join(root, n)
            found[os.path.relpath(path, d)] = open(path, "rb").read()
    return found


# ---- item 9: compare with other settings into the same --out -----------------------------------

def test_compare_refuses_runs_made_with_other_settings(tmp_path, capsys):
    out = str(tmp_path / "cmp")
    args = lambda steps, *extra: (["compare", "--methods", "fomaml,maml1", "--meta-steps", steps, "--test-steps", "2",  # noqa: E731
                                   "--out", out] + TINY + list(extra))
    assert main(args("2")) == 0
    before = _files(out)
    err = _refused(args("2", "--inner-lr", "0.05"), capsys)
    assert "'inner_lr': (0.01, 0.05)" in err and "another --out" in err
    err = _refused(args("1"), capsys)
    assert "already done 2 meta-steps, more than the 1 asked for" in err
    assert _files(out) == before                     # nothing retrained or rewritten
    assert "(step 0.01)" in open(os.path.join(out, "compare.md")).read()


# ---- item 10: one run directory, two processes ---------------------------------------------------

_HOLD = ("import sys; from amaml_ext.train.io import lock_run_dir; lock_run_dir(sys.argv[1]); "
         "print('locked', flush=True); sys.stdin.readline()")


@contextmanager
def _held_by_another_process(path):
    """A second process holding the lock of the run directory ``path`` until the block ends."""
    p = subprocess.Popen([sys.executable, "-c", _HOLD, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env=ENV, cwd=ROOT)
    try:
        assert p.stdout.readline().strip() == "locked"
        yield p
    finally:
        p.kill()
        p.wait()


@pytest.mark.slow
def test_a_second_train_into_a_running_one_is_refused_naming_it(tmp_path, capsys):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "amaml_ext"] + _train(out, 100000)
    cmd[cmd.index("--checkpoint-every") + 1] = "100000"
    p = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        while not os.path.exists(os.path.join(out, "config.json")) and p.poll() is None:
            time.sleep(0.05)                 # the first run holds its directory: config.json is written
        assert p.poll() is None, p.stderr.read()
        before = _files(out)
        err = _refused(_train(out, 3), capsys)
        assert f"in use by another process (pid {p.pid} on " in err and "train --method fomaml" in err
        assert json.load(open(os.path.join(out, "config.json")))["meta_steps"] == 100000
        assert _files(out) == before
    finally:
        p.send_signal(signal.SIGKILL)        # dies holding the lock: its lock file stays behind
        p.communicate()
    assert str(p.pid) in open(os.path.join(out, LOCK)).read()
    assert main(_train(out, 2)) == 0         # a dead holder does not block
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "config.json", "metrics.csv", "theta.pt"]


@pytest.mark.slow
def test_compare_evaluate_and_meta_train_refuse_a_directory_in_use(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(_train(run)) == 0
    cmp = str(tmp_path / "cmp")
    with _held_by_another_process(run) as p:
        err = _refused(["evaluate", "--run", run, "--quiet"], capsys)
        assert f"pid {p.pid}" in err
        assert not os.path.exists(os.path.join(run, "eval.json"))
        learner = learners.make_learner("fomaml", mlp(width=4, depth=1, dtype=None), F.mse_loss, inner_steps=2)
        with pytest.raises(RunLocked, match=f"pid {p.pid}"):
            train.meta_train(learner, tasks.CosMixture(10, 10).pool(4, seed=0), meta_steps=1, out_dir=run,
                             meta_batch=2, progress=False, resume=True)
    with _held_by_another_process(os.path.join(cmp, "maml1")) as p:
        err = _refused(["compare", "--methods", "fomaml,maml1", "--meta-steps", "2", "--out", cmp] + TINY, capsys)
        assert f"pid {p.pid}" in err
        assert not os.path.exists(os.path.join(cmp, "fomaml", "checkpoint.pt"))   # refused before any training


# ---- item 11: resume to fewer meta-steps than done ----------------------------------------------

def test_resume_with_fewer_meta_steps_is_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(_train(out, 3)) == 0
    before = _files(out)
    err = _refused(_train(out, 2, "fomaml", "--resume"), capsys)
    assert "already done 3 meta-steps, more than the 2 asked for" in err and "--meta-steps" in err
    assert _files(out) == before
    learner = learners.make_learner("fomaml", mlp(width=4, depth=1, dtype=None), F.mse_loss, inner_steps=2)
    pool = tasks.CosMixture(10, 10).pool(4, seed=0)
    kw = dict(out_dir=str(tmp_path / "py"), meta_batch=2, progress=False)
    train.meta_train(learner, pool, meta_steps=3, **kw)
    with pytest.raises(train.RunConfigMismatch, match="'meta_steps'.*already done 3 meta-steps"):
        train.meta_train(learner, pool, meta_steps=1, resume=True, **kw)
    assert json.load(open(tmp_path / "py" / "config.json"))["meta_steps"] == 3


# ---- item 12: options checked before anything is written ----------------------------------------

@pytest.mark.parametrize("extra,env,option", [
    (["--method", "amaml", "--rtol", "2"], None, "--rtol"),
    (["--method", "amaml", "--atol", "1.5"], None, "--atol"),
    (["--method", "amaml-t", "--solver", "euler", "--adjoint", "discrete"], None, "--adjoint"),
    (["--method", "amaml-sgd", "--refine"], None, "--refine"),
    (["--method", "maml", "--inner-lr", "1e6"], None, "--inner-lr"),
    pytest.param(["--method", "amaml", "--inner-lr", "1e6"], None, "--inner-lr",
                 marks=pytest.mark.slow),                                  # dopri5: many tiny steps first
    (["--method", "amaml", "--inner-lr", "1e6", "--solver", "euler", "--adjoint", "discrete"], None, "--inner-lr"),
    (["--method", "amaml"], "maybe", "AMAML_EXT_COMPILE"),
])
def test_bad_options_are_refused_before_any_file(tmp_path, capsys, monkeypatch, extra, env, option):
    if env is not None:
        monkeypatch.setenv("AMAML_EXT_COMPILE", env)
    out = str(tmp_path / "run")
    argv = ["train", "--meta-steps", "2", "--out", out] + TINY + extra
    lines = _refused(argv, capsys).strip().splitlines()
    assert option in lines[-1]
    assert len(lines) == 1 or lines[-1].startswith("amaml-ext train: error:")   # ours, or argparse's (with usage)
    assert _files(out) == {}
    cmp = str(tmp_path / "cmp")                      # compare: refused before the first method is trained
    methods = "fomaml," + extra[1]
    argv = ["compare", "--methods", methods, "--meta-steps", "2", "--out", cmp] + TINY + extra[2:]
    assert option in _refused(argv, capsys)
    assert _files(cmp) == {}


@pytest.mark.slow
def test_a_bad_environment_value_ends_the_process_with_status_2_and_one_line(tmp_path):
    out = str(tmp_path / "run")
    r = subprocess.run([sys.executable, "-m", "amaml_ext"] + _train(out, 2, "amaml"), cwd=ROOT, capture_output=True,
                       text=True, env=dict(ENV, AMAML_EXT_COMPILE="maybe"))
    assert r.returncode == 2
    assert r.stderr.strip() == ("amaml-ext: environment variable AMAML_EXT_COMPILE must be auto, on or off, "
                                "got 'maybe'")
    assert not os.path.exists(out)


# ---- item 13: evaluate where eval.json cannot be written ---------------------------------------

def _no_meta_test(monkeypatch):
    def meta_test(*args, **kwargs):
        raise AssertionError("the meta-test ran before the run directory was checked")
    monkeypatch.setattr(importlib.import_module("amaml_ext.cli.runs"), "meta_test", meta_test)


def test_evaluate_checks_eval_json_can_be_written_before_the_meta_test(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    assert main(_train(out)) == 0
    _no_meta_test(monkeypatch)
    os.mkdir(os.path.join(out, "eval.json"))          # in the way of the file (fails for root too)
    err = _refused(["evaluate", "--run", out, "--quiet"], capsys)
    assert "argument --run: cannot write eval.json, eval.png into" in err and "eval.json is a directory" in err
    os.rmdir(os.path.join(out, "eval.json"))
    access = os.access
    run_dir = os.path.realpath(out)
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if (os.path.realpath(p) == run_dir and mode
                                                                        & os.W_OK) else access(p, mode, **kw))
    err = _refused(["evaluate", "--run", out, "--quiet"], capsys)
    assert "argument --run: cannot write eval.json" in err and "permission denied" in err
    assert not os.path.exists(os.path.join(out, "eval.json"))


# ---- item 18: file modes follow the umask ------------------------------------------------------

@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_run_files_follow_the_umask(tmp_path, umask, mode):
    out = str(tmp_path / "run")
    old = os.umask(umask)
    try:
        assert main(_train(out)) == 0
        assert main(["evaluate", "--run", out, "--quiet", "--test-steps", "1"]) == 0
        atomic_write_bytes(str(tmp_path / "one"), b"x")
    finally:
        os.umask(old)
    names = sorted(os.listdir(out))
    assert names == ["checkpoint.pt", "config.json", "eval.json", "eval.png", "metrics.csv", "theta.pt"]
    assert {n: oct(os.stat(os.path.join(out, n)).st_mode & 0o777) for n in names} == {n: oct(mode) for n in names}
    assert os.stat(tmp_path / "one").st_mode & 0o777 == mode


# ---- item 19: temporary files of a killed write ------------------------------------------------

def test_stale_temporary_files_are_removed_when_a_run_starts(tmp_path):
    out = str(tmp_path / "run")
    assert main(_train(out)) == 0
    stale = [os.path.join(out, n) for n in (".tmp-abc123", ".tmp-probe-x")]

    def leave():
        for s in stale:
            with open(s, "wb") as f:
                f.write(b"half a checkpoint")
    leave()
    assert main(_train(out, 3, "fomaml", "--resume")) == 0
    assert not any(os.path.exists(s) for s in stale)
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["step"] == 3
    leave()
    assert main(["evaluate", "--run", out, "--quiet", "--test-steps", "1"]) == 0
    assert not any(os.path.exists(s) for s in stale)
    cmp = str(tmp_path / "cmp")
    os.makedirs(os.path.join(cmp, "fomaml"))
    stale = [os.path.join(cmp, ".tmp-1"), os.path.join(cmp, "fomaml", ".tmp-2")]
    leave()
    assert main(["compare", "--methods", "fomaml", "--meta-steps", "2", "--test-steps", "1", "--out", cmp] + TINY) == 0
    assert not any(os.path.exists(s) for s in stale)
    assert sorted(os.listdir(cmp)) == ["compare.json", "compare.md", "compare.png", "fomaml"]


# ---- the trial's D9 and evaluate's errors ----------------------------------------------------------

@pytest.mark.slow
def test_interrupted_compare_says_to_run_the_same_command_again(tmp_path):
    out = str(tmp_path / "cmp")
    cmd = [sys.executable, "-m", "amaml_ext", "compare", "--methods", "fomaml", "--meta-steps", "100000",
           "--test-steps", "2", "--out", out] + TINY
    # SIGINT as a terminal's Ctrl-C delivers it: a test run started in the background (``cmd &``,
    # nohup) ignores SIGINT, the child would inherit that, and Python keeps an inherited SIG_IGN
    p = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not os.path.exists(os.path.join(out, "fomaml", "checkpoint.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "run the same command again to continue" in err and "--resume" not in err and "resume=True" not in err


def test_evaluate_with_a_non_finite_theta_or_a_diverging_meta_test_ends_in_one_line(tmp_path, capsys, monkeypatch):
    run = str(tmp_path / "run")
    assert main(_train(run, 1)) == 0
    theta = torch.load(os.path.join(run, "theta.pt"))
    torch.save(torch.full_like(theta, float("nan")), os.path.join(run, "theta.pt"))
    err = _refused(["evaluate", "--run", run, "--test-steps", "2", "--quiet"], capsys, code=2)
    assert "non-finite" in err and run in err
    torch.save(theta, os.path.join(run, "theta.pt"))
    cli_main = importlib.import_module("amaml_ext.cli.main")

    def diverging(*args, **kwargs):     # meta_test's own detection: test_learners_reliability.py
        raise learners.InnerLoopDiverged("meta_test: the inner loop diverged on task 3")
    monkeypatch.setattr(cli_main, "evaluate_run", diverging)
    err = _refused(["evaluate", "--run", run, "--test-steps", "2", "--quiet"], capsys, code=1)
    assert "diverged on task 3" in err


@pytest.mark.parametrize("edit,match", [
    (lambda c: dict(c, method="nope"), r"'method' is 'nope', not one of"),
    (lambda c: dict(c, dtype="float16"), r"'dtype' is 'float16', not one of"),
    (lambda c: {k: v for k, v in c.items() if k != "inner_lr"}, r"it lacks inner_lr"),
])
def test_evaluate_names_a_damaged_config(tmp_path, capsys, edit, match):
    run = str(tmp_path / "run")
    assert main(_train(run, 1)) == 0
    path = os.path.join(run, "config.json")
    damaged = json.dumps(edit(json.load(open(path))))
    open(path, "w").write(damaged)
    err = _refused(["evaluate", "--run", run, "--test-steps", "2", "--quiet"], capsys)
    assert "config.json (the run's settings) is damaged" in err and __import__("re").search(match, err)
    assert open(path).read() == damaged                      # left as it is


def test_resume_without_config_is_refused(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(_train(run, 2)) == 0
    os.remove(os.path.join(run, "config.json"))
    err = _refused(_train(run, 4, "reptile", "--resume"), capsys)
    assert "has a checkpoint but no config.json" in err
    assert not os.path.exists(os.path.join(run, "config.json"))


@pytest.mark.parametrize("extra,option", [
    (["--method", "maml", "--solver", "dopri5"], "--solver"),
    (["--method", "fomaml", "--compile", "on"], "--compile"),
    (["--method", "maml", "--imaml-lambda", "2"], "--imaml-lambda"),
    (["--method", "maml1", "--maml-steps", "3"], "--maml-steps"),
    (["--method", "fomaml", "--chan", "8"], "--channels"),                    # a prefix, as argparse takes it
    (["--method", "amaml", "--solver", "euler", "--adjoint", "discrete", "--error-tol", "0.1"], "--error-tol"),
])
def test_options_no_method_uses_are_named(tmp_path, capsys, extra, option):
    out = str(tmp_path / "run")
    argv = ["train", "--task", "cosmixture", "--meta-steps", "1", "--pool-size", "6", "--meta-batch", "2",
            "--inner-steps", "2", "--out", out, "--quiet"] + extra
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"amaml-ext: warning: argument {option} is not used" in err and "ignored" in err
    assert main(["train", "--task", "cosmixture", "--method", "fomaml", "--meta-steps", "1", "--pool-size", "6",
                 "--meta-batch", "2", "--inner-steps", "2", "--out", str(tmp_path / "quiet"), "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("name,content", [("checkpoint.pt", b"PK\x03\x04trunc"), ("checkpoint.pt", b""),
                                          ("config.json", b"{not json"), ("theta.pt", b"garbage")])
def test_damaged_run_files_are_named_and_left_alone(tmp_path, name, content):
    from amaml_ext import cli
    out, cmd = small_run(tmp_path)
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
    out, cmd = small_run(tmp_path)
    path = os.path.join(out, "checkpoint.pt")
    ck = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in ck.items() if k != "optimizer"}, path)
    with pytest.raises(train.UnreadableRunFile, match="lacks \\['optimizer'\\]"):
        train.load_checkpoint(out)
    torch.save(dict(ck, theta=torch.zeros(7)), path)
    from amaml_ext import cli
    with pytest.raises(SystemExit, match=r"theta of shape \(7,\).*another model"):
        cli.main(cmd[:-2] + ["--meta-steps", "4", "--out", out, "--resume"])
