"""The amaml-ext command: train, resume, evaluate and compare, its argument errors, python -m,
compare on fixtures of the real-data task families, SIGTERM, --help, ANIL."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from amaml_ext import train
from amaml_ext.cli import main

from helpers import small_run


TINY = ["--task", "cosmixture", "--pool-size", "6", "--meta-batch", "2", "--inner-steps", "4",
        "--maml-steps", "2", "--checkpoint-every", "2", "--quiet"]


@pytest.mark.slow
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


@pytest.mark.slow
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
    (["compare", "--out", "x", "--clip-grad-norm", "0"], "argument --clip-grad-norm: expected a positive finite number, got '0'"),
])
def test_command_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_clip_grad_norm_reaches_the_run_and_compare_holds_runs_to_it(tmp_path, capsys):
    out = str(tmp_path / "cmp")
    args = ["compare", "--methods", "maml", "--meta-steps", "2", "--test-steps", "1", "--out", out] + TINY
    assert main(args + ["--clip-grad-norm", "1e-3"]) == 0
    run = os.path.join(out, "maml")
    assert json.load(open(os.path.join(run, "config.json")))["clip_grad_norm"] == 1e-3
    rows = [r.split(",") for r in open(os.path.join(run, "metrics.csv")).read().splitlines()]
    col = rows[0].index("clipped")
    assert [r[col] for r in rows[1:]] == ["1", "1"]        # MAML's meta-gradients here are far above 1e-3
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:                   # the same runs without clipping: refused
        main(args)
    assert e.value.code == 2 and "clip_grad_norm" in capsys.readouterr().err


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


@pytest.mark.slow
def test_python_dash_m_runs_the_command():
    r = subprocess.run([sys.executable, "-m", "amaml_ext", "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "compare" in r.stdout and "train" in r.stdout


# ---- the command on real-data task families (fixtures in the original formats) ----------------

@pytest.mark.slow
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


@pytest.mark.slow
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


def _train_cmd(out, steps):
    return [sys.executable, "-m", "amaml_ext", "train", "--task", "cosmixture", "--method", "maml",
            "--maml-steps", "5", "--meta-steps", str(steps), "--checkpoint-every", "100000", "--quiet",
            "--out", out]


@pytest.mark.slow
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


def test_help_shows_defaults_and_evaluate_plots(tmp_path, capsys):
    from amaml_ext import cli
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    assert "(default: 0.01)" in text and "``" not in text
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "``" not in capsys.readouterr().out
    out, _ = small_run(tmp_path)
    assert cli.main(["evaluate", "--run", out, "--quiet"]) == 0
    assert os.path.getsize(os.path.join(out, "eval.png")) > 1000


def test_anil_through_the_command(tmp_path):
    from amaml_ext import cli
    out = str(tmp_path / "anil")
    assert cli.main(["train", "--task", "cosmixture", "--method", "anil", "--maml-steps", "2", "--meta-steps", "2",
                     "--quiet", "--out", out]) == 0
    assert cli.main(["evaluate", "--run", out, "--quiet", "--test-steps", "3"]) == 0
