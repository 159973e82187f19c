"""Meta-training on torch.distributed (gloo, CPU): processes started here on localhost, each job
under a deadline so that a failure cannot hang the suite.

One job per world size (1, 2, 3) runs every scenario: A-MAML and MAML (meta-batch 5: uneven over
2 and 3 ranks), a meta-test, a run stopped halfway (resumed by the next world size) and, for 2
ranks, a SIGTERM to one rank. Separate processes check that a dead rank ends the job."""

import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn import functional as F

from amaml_ext import learners as L
from amaml_ext import flatten_params, models, tasks
from amaml_ext.train import meta_test, meta_train
from amaml_ext.train.distributed import Distributed

from helpers import ROOT

pytestmark = pytest.mark.slow      # it starts processes: make test-quick leaves this file out

STEPS, HALF, BATCH = 3, 2, 5
JOB_DEADLINE = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem(method: str):
    torch.manual_seed(0)
    net = models.mlp(width=8).double()
    fam = tasks.make_family("cosmixture", 5, 5)
    train, test = tasks.train_test_pools(fam, 8, 7, seed=0)
    if method == "amaml":
        learner = L.make_learner("amaml", net, F.mse_loss, inner_steps=5, solver="rk4", compile=False)
    else:
        learner = L.make_learner(method, net, F.mse_loss, inner_steps=5, maml_steps=2)
    return learner, train, test


def _train(method, out, steps=STEPS, distributed=True, resume=False, on_step=None):
    learner, pool, _ = _problem(method)
    return meta_train(learner, pool, meta_steps=steps, out_dir=out, meta_batch=BATCH, lr=1e-2, seed=1,
                      dtype=torch.float64, progress=False, distributed=distributed, resume=resume,
                      checkpoint_every=1, on_step=on_step)


def _job(rank: int, world: int, port: int, tmp: str) -> None:
    """Every scenario on one rank of a ``world``-rank job; results in ``tmp/<name>-w<world>-r<rank>.pt``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    from amaml_ext.train import loop
    written = []
    real_write = loop.atomic_write_bytes
    loop.atomic_write_bytes = lambda path, data: (written.append(path), real_write(path, data))[1]
    res = {}
    for method in ("amaml", "maml"):
        res[method] = _train(method, os.path.join(tmp, f"{method}-w{world}"))
    res["maml-groups"] = _train("maml", None, distributed=Distributed(tasks_per_call=2))   # groups 2 + 2 + 1
    learner, _, test = _problem("maml")
    res["test"] = meta_test(learner.model, F.mse_loss, res["maml"], test.all(dtype=torch.float64), steps=4, lr=0.05,
                            chunk=3, distributed=Distributed())
    half = os.path.join(tmp, "half")         # world 1 and 2 start it, the next world size resumes it
    if world < 3:
        _train("amaml", os.path.join(half, str(world)), steps=HALF)
    if world > 1:
        res["resumed"] = _train("amaml", os.path.join(half, str(world - 1)), resume=True)
    if world == 2:                            # rank 1 receives SIGTERM after step 1: both stop there
        def kill_self(step, row):
            if rank == 1 and step == 1:
                os.kill(os.getpid(), 15)
        try:
            _train("maml", os.path.join(tmp, "sigterm"), on_step=kill_self)
            res["sigterm"] = "finished"
        except KeyboardInterrupt as e:
            res["sigterm"] = str(e)
    res["written"] = written
    torch.save(res, os.path.join(tmp, f"res-w{world}-r{rank}.pt"))
    # as the command does: no rank tears the group down while another is still in it (a rank that
    # left first once aborted in gloo's teardown, "terminate called without an active exception")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    os._exit(0)        # done and saved: skip the interpreter's teardown of torch's C++ state


def _spawn(world: int, tmp: str) -> None:
    ctx = mp.start_processes(_job, args=(world, _free_port(), tmp), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + JOB_DEADLINE
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world}-rank job did not finish within {JOB_DEADLINE:g} s")


def _spawn_or_retry(world: int, tmp: str) -> None:
    """A job whose process died by a signal inside torch's C++ (not a Python error, which fails at
    once) runs again once, with a warning in the test summary; a second death fails the tests."""
    try:
        _spawn(world, tmp)
    except mp.ProcessExitedException as e:
        if e.signal_name is None:
            raise
        import shutil
        import warnings
        warnings.warn(f"the {world}-rank job lost a process to {e.signal_name}; running it again once")
        for name in (f"amaml-w{world}", f"maml-w{world}", os.path.join("half", str(world)), "sigterm"):
            shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)     # this world's own runs
        _spawn(world, tmp)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("dist"))
    for world in (1, 2, 3):
        _spawn_or_retry(world, tmp)
    return {(w, r): torch.load(os.path.join(tmp, f"res-w{w}-r{r}.pt"), weights_only=False)
            for w in (1, 2, 3) for r in range(w)} | {"tmp": tmp}


@pytest.mark.parametrize("method", ["amaml", "maml"])
def test_any_world_size_gives_the_same_theta_bit_for_bit(jobs, method):
    ref = jobs[(1, 0)][method]
    for w in (2, 3):                 # 5 tasks over 2 and 3 ranks: uneven splits
        for r in range(w):
            assert torch.equal(jobs[(w, r)][method], ref), (w, r)
    plain = _train(method, None, distributed=None)        # the single-process run: within rounding
    torch.testing.assert_close(ref, plain, rtol=1e-12, atol=1e-14)
    assert not torch.equal(ref, flatten_params(_problem(method)[0].model))     # it did train


def test_groups_of_tasks_per_call_are_independent_of_the_world_size(jobs):
    ref = jobs[(1, 0)]["maml-groups"]
    for w in (2, 3):
        for r in range(w):
            assert torch.equal(jobs[(w, r)]["maml-groups"], ref), (w, r)
    torch.testing.assert_close(ref, jobs[(1, 0)]["maml"], rtol=1e-12, atol=1e-14)


def test_resume_with_another_world_size_equals_the_uninterrupted_run(jobs):
    ref = jobs[(1, 0)]["amaml"]
    for w in (2, 3):
        for r in range(w):
            assert torch.equal(jobs[(w, r)]["resumed"], ref), (w, r)


def test_only_rank_0_writes(jobs):
    for w in (2, 3):
        assert jobs[(w, 0)]["written"] and all(not jobs[(w, r)]["written"] for r in range(1, w))
    run = os.path.join(jobs["tmp"], "maml-w3")
    assert sorted(os.listdir(run)) == ["checkpoint.pt", "config.json", "metrics.csv", "theta.pt"]


def test_distributed_meta_test_equals_the_single_process_one(jobs):
    learner, _, test = _problem("maml")
    plain = meta_test(learner.model, F.mse_loss, jobs[(1, 0)]["maml"], test.all(dtype=torch.float64), steps=4,
                      lr=0.05, chunk=3)
    for w in (1, 2, 3):
        for r in range(w):
            got = jobs[(w, r)]["test"]
            assert got["final"] == plain["final"] and got["mean"] == plain["mean"], (w, r)


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(jobs):
    for r in range(2):
        assert "terminated (SIGTERM) after meta-step 1" in jobs[(2, r)]["sigterm"]
    ck = torch.load(os.path.join(jobs["tmp"], "sigterm", "checkpoint.pt"), weights_only=True)
    assert ck["step"] == 1


_DYING = r"""
import os, sys, torch
from torch.nn import functional as F
sys.path[:0] = {tests!r}
from test_distributed import _problem
from amaml_ext.train import meta_train, init_distributed
init_distributed(timeout=20)
rank = int(os.environ["RANK"])
def die(step, row):
    if rank == 1 and step == 1:
        os._exit(3)
learner, pool, _ = _problem("maml")
meta_train(learner, pool, meta_steps=50, out_dir={out!r}, meta_batch=5, dtype=torch.float64, progress=False,
           distributed=True, on_step=die, checkpoint_every=1)
"""


def test_a_dead_rank_ends_the_job_with_an_error(tmp_path):
    port = _free_port()
    tests = [os.path.dirname(os.path.abspath(__file__)), os.path.join(ROOT, "python_tests")]   # and helpers.py
    code = _DYING.format(tests=tests, out=str(tmp_path / "run"))
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == 3
    assert procs[0].returncode not in (0, None)
    assert "DistributedError" in outs[0][1] and "another rank stopped" in outs[0][1], outs[0][1][-2000:]
    assert torch.load(str(tmp_path / "run" / "checkpoint.pt"), weights_only=True)["step"] >= 1


def test_the_command_under_torchrun(tmp_path):
    """``torchrun --nproc-per-node 2 -m amaml_ext train``: rank 0 alone prints and writes; the
    theta of the single-process command within rounding."""
    args = ["train", "--task", "cosmixture", "--method", "maml", "--meta-steps", "2", "--meta-batch", "3",
            "--inner-steps", "3", "--maml-steps", "2", "--pool-size", "6", "--dtype", "float64", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "amaml_ext"] + args + ["--out", str(tmp_path / "d")]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("wrote") == 1
    assert sorted(os.listdir(tmp_path / "d")) == ["checkpoint.pt", "config.json", "metrics.csv", "theta.pt"]
    from amaml_ext.cli import main
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    torch.testing.assert_close(torch.load(tmp_path / "d" / "theta.pt"), torch.load(tmp_path / "one" / "theta.pt"),
                               rtol=1e-12, atol=1e-14)
