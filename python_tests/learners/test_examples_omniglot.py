"""examples/higher_maml_omniglot.py (higher's MAML-on-Omniglot script, on our loader) and its
port to AdjointLearner, examples/port_higher_maml_omniglot.py: the port is a diff of at most 5
lines, its docstring shows that diff, and on a tiny synthetic Omniglot the port's meta-gradient
is unrolled MAML's (a plain autograd reference here; higher's own script where higher is
installed, as in .venv-peers). Likewise learn2learn's loop (examples/learn2learn_maml_omniglot.py)
and its port, at most 8 lines, where learn2learn's source package is found (.venv-peers/src)."""

import argparse
import ast
import difflib
import functools
import importlib.util
import os
import sys
import textwrap

import pytest
import torch
from torch.nn import functional as F

from amaml_ext.data import images

from helpers import F64, make_omniglot

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")
HIGHER = os.path.join(EXAMPLES, "higher_maml_omniglot.py")
PORT = os.path.join(EXAMPLES, "port_higher_maml_omniglot.py")
L2L = os.path.join(EXAMPLES, "learn2learn_maml_omniglot.py")
L2L_PORT = os.path.join(EXAMPLES, "port_learn2learn_maml_omniglot.py")
PAIRS = {"higher": (HIGHER, PORT, 5), "learn2learn": (L2L, L2L_PORT, 8)}   # the port's bound: its docstring's count


# ---- the diff ----------------------------------------------------------------------------------

def code_lines(path):
    """The file's lines below its module docstring (the diff's convention: docstrings differ)."""
    text = open(path).read()
    doc = ast.parse(text).body[0]
    assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant), f"{path} has no module docstring"
    return text.splitlines()[doc.end_lineno:]


def code_diff(a=HIGHER, b=PORT):
    """Unified diff (2 lines of context) of the two files' code, without the file header lines
    and with the hunk headers shortened to ``@@``: what the port's docstring shows."""
    out = difflib.unified_diff(code_lines(a), code_lines(b), os.path.basename(a), os.path.basename(b), n=2,
                               lineterm="")
    return ["@@" if line.startswith("@@") else line for line in list(out)[2:]]


def changed(diff):
    """(lines removed, lines added) of a diff from :func:`code_diff`."""
    return sum(line.startswith("-") for line in diff), sum(line.startswith("+") for line in diff)


def docstring_diff(path=PORT):
    """The diff block of the port's docstring: the indented lines from the first ``@@`` on, dedented."""
    doc = ast.get_docstring(ast.parse(open(path).read()), clean=False)
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "@@")
    block = []
    for line in lines[start:]:
        if line and not line.startswith("    "):
            break
        block.append(line)
    while block and not block[-1].strip():
        block.pop()
    return textwrap.dedent("\n".join(block)).splitlines()


@pytest.mark.parametrize("peer", sorted(PAIRS))
def test_the_port_is_a_diff_of_a_few_lines(peer):
    base, port, bound = PAIRS[peer]
    removed, added = changed(code_diff(base, port))
    assert removed + added <= bound, "\n".join(code_diff(base, port))
    assert added >= 1 and removed >= 1
    assert f"The diff, {removed + added} lines ({removed} removed, {added} added" in open(port).read()


def test_the_diff_counter_sees_a_change(tmp_path):
    """The count can fail: one more changed line in a copy of the port is counted."""
    text = open(PORT).read().replace("n_train_iter = args.train_iter", "n_train_iter = args.train_iter + 0")
    copy = tmp_path / "port.py"
    copy.write_text(text)
    assert sum(changed(code_diff(HIGHER, str(copy)))) == sum(changed(code_diff())) + 2


@pytest.mark.parametrize("peer", sorted(PAIRS))
def test_the_docstring_shows_the_real_diff(peer):
    base, port, _ = PAIRS[peer]
    real = [line.rstrip() for line in code_diff(base, port)]
    while real and not real[-1]:
        real.pop()
    assert [line.rstrip() for line in docstring_diff(port)] == real, "\n".join(code_diff(base, port))


# ---- running it on a tiny Omniglot ---------------------------------------------------------------

def load(path, name):
    """Import an example by path (they import ``omniglot_nshot`` from examples/, as scripts do)."""
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_db(root, dtype, task_num=2):
    """5-way 1-shot tasks with 3 query images per class, from an 8-character synthetic Omniglot."""
    nshot = load(os.path.join(EXAMPLES, "omniglot_nshot.py"), "omniglot_nshot")
    return nshot.OmniglotNShot(images.Omniglot(root, n_train=5), batchsz=task_num, n_way=5, k_shot=1, k_query=3,
                               seed=3, test_batches=1, dtype=dtype)


def first_meta_grad(mod, root, state, inner_lr=0.4, n_inner_iter=3):
    """The first meta-step's gradient (net's ``.grad``) of the script ``mod``'s train loop, in
    float64 from the weights ``state``."""
    net = mod.make_net(5).to(F64)
    net.load_state_dict(state)
    inner_opt = torch.optim.SGD(net.parameters(), lr=inner_lr)
    meta_opt = torch.optim.SGD(net.parameters(), lr=0.0)        # leaves the weights and their .grad
    args = argparse.Namespace(train_iter=1, n_inner_iter=n_inner_iter)
    log = []
    mod.train(tiny_db(root, F64), net, inner_opt, meta_opt, 0, log, args)
    assert len(log) == 1 and log[0]["mode"] == "train"
    return [p.grad.clone() for p in net.parameters()], log[0]["loss"]


def unrolled_meta_grad(mod, root, state, inner_lr=0.4, n_inner_iter=3):
    """The same gradient by plain autograd: GD steps with ``create_graph`` through
    ``functional_call`` (the net in train mode: batch statistics), summed over the tasks."""
    net = mod.make_net(5).to(F64)
    net.load_state_dict(state)
    x_spt, y_spt, x_qry, y_qry = tiny_db(root, F64).next()
    names = [n for n, _ in net.named_parameters()]
    for i in range(x_spt.size(0)):
        fast = dict(net.named_parameters())
        for _ in range(n_inner_iter):
            loss = F.cross_entropy(torch.func.functional_call(net, fast, (x_spt[i],)), y_spt[i])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: fast[n] - inner_lr * g for n, g in zip(names, grads)}
        F.cross_entropy(torch.func.functional_call(net, fast, (x_qry[i],)), y_qry[i]).backward()
    return [p.grad.clone() for p in net.parameters()]


@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("omniglot")
    make_omniglot(root)
    return root


def start_state(mod):
    torch.manual_seed(0)
    return {k: v.to(F64) for k, v in mod.make_net(5).state_dict().items()}


def worst(got, want):
    """The largest error of a parameter's gradient, relative to the norm of the whole gradient
    (the conv biases' gradients are 0 up to rounding: BatchNorm in train mode removes them)."""
    total = torch.cat([w.reshape(-1) for w in want]).norm()
    return max(float((g - w).norm() / total) for g, w in zip(got, want))


def test_the_port_meta_gradient_is_unrolled_maml(omniglot_root):
    port = load(PORT, "port_higher_maml_omniglot")
    state = start_state(port)
    got, _ = first_meta_grad(port, omniglot_root, state)
    assert worst(got, unrolled_meta_grad(port, omniglot_root, state)) < 1e-12
    assert worst(got, unrolled_meta_grad(port, omniglot_root, state, n_inner_iter=2)) > 1e-3   # one step fewer
    assert worst(got, unrolled_meta_grad(port, omniglot_root, state, inner_lr=0.41)) > 1e-3


def test_the_port_meta_gradient_equals_higher_script(omniglot_root):
    pytest.importorskip("higher")
    port, ours = load(PORT, "port_higher_maml_omniglot"), load(HIGHER, "higher_maml_omniglot")
    state = start_state(port)
    got, loss_port = first_meta_grad(port, omniglot_root, state)
    want, loss_higher = first_meta_grad(ours, omniglot_root, state)
    assert loss_port == pytest.approx(loss_higher, rel=1e-12)
    assert worst(got, want) < 1e-12


def test_the_port_runs_two_meta_steps_and_logs(omniglot_root, tmp_path, monkeypatch):
    """``main`` end to end on the tiny set (its 8 characters: 5 for training): 2 meta-steps, a
    test, the JSON log with the peak memory."""
    import json
    port = load(PORT, "port_higher_maml_omniglot")
    monkeypatch.setattr(images, "Omniglot", functools.partial(images.Omniglot, n_train=5))
    out = tmp_path / "log.json"
    net, log = port.main(["--data_root", str(omniglot_root), "--k_qry", "3", "--task_num", "2", "--epochs", "1",
                          "--train_iter", "2", "--test_iter", "1", "--n_inner_iter", "2", "--log", str(out)])
    assert [r["mode"] for r in log] == ["train", "train", "test"]
    assert [r["step"] for r in log] == [1, 2, 2]
    saved = json.loads(out.read_text())
    assert saved["log"] == json.loads(json.dumps(log)) and saved["info"]["label"] == "port_higher_maml_omniglot.py"
    assert saved["memory"]["ru_maxrss_mib"] > 0
    assert all(0 <= r["acc"] <= 100 for r in log)


# ---- learn2learn's loop ----------------------------------------------------------------------------

def l2l_first_meta_grad(mod, root, state, fast_lr=0.5, steps=2, tasks=2):
    """The meta-gradient of ``tasks`` training tasks of the script ``mod``'s loop (its ``maml``
    as its ``main`` builds it, its ``fast_adapt``), in float64 from the weights ``state``."""
    import learn2learn as l2l
    shim = load(os.path.join(EXAMPLES, "l2l_omniglot_shim.py"), "l2l_omniglot_shim")
    before = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        taskset = shim.TaskSet(images.Omniglot(root, n_train=5), "train", 5, 2, 10, seed=0)
        model = l2l.vision.models.OmniglotFC(28 ** 2, 5)
        model.load_state_dict(state)
        loss = torch.nn.CrossEntropyLoss(reduction="mean")
        if "port" in mod.__name__:
            import amaml_ext
            maml = amaml_ext.AdjointLearner(model, torch.nn.CrossEntropyLoss(), T=steps * fast_lr, h=fast_lr,
                                            solver="euler", adjoint="discrete")
            maml.clone = lambda: maml
        else:
            maml = l2l.algorithms.MAML(model, lr=fast_lr, first_order=False)
        for _ in range(tasks):
            error, _ = mod.fast_adapt(taskset.sample(), maml.clone(), loss, steps, 1, 5, "cpu")
            error.backward()
    finally:
        torch.set_default_dtype(before)
    return [p.grad.clone() for p in model.parameters()]


@pytest.fixture
def l2l():
    """learn2learn through the examples' shim (skip where its source package is not found);
    its modules are taken out of ``sys.modules`` afterwards."""
    before = set(sys.modules)
    try:
        load(os.path.join(EXAMPLES, "l2l_omniglot_shim.py"), "l2l_omniglot_shim")
        import learn2learn
        yield learn2learn
    except ImportError as e:
        pytest.skip(str(e))
    finally:
        for name in set(sys.modules) - before:
            if name.startswith("learn2learn") or name == "l2l_omniglot_shim":
                del sys.modules[name]


def test_the_learn2learn_port_meta_gradient_equals_learn2learn(omniglot_root, l2l):
    port, ours = load(L2L_PORT, "port_learn2learn_maml_omniglot"), load(L2L, "learn2learn_maml_omniglot")
    torch.manual_seed(0)
    state = {k: v.to(F64) for k, v in l2l.vision.models.OmniglotFC(28 ** 2, 5).state_dict().items()}
    got = l2l_first_meta_grad(port, omniglot_root, state)
    assert worst(got, l2l_first_meta_grad(ours, omniglot_root, state)) < 1e-12
    assert worst(got, l2l_first_meta_grad(ours, omniglot_root, state, steps=1)) > 1e-3    # one step fewer


def test_the_log_comparison_finds_the_largest_difference(tmp_path):
    nshot = load(os.path.join(EXAMPLES, "omniglot_nshot.py"), "omniglot_nshot")
    a = [{"step": s, "mode": "train", "acc": 50.0 + s, "loss": 1.0} for s in (1, 2, 3)]
    b = [dict(r, acc=r["acc"] + (2.5 if r["step"] == 2 else 0.0)) for r in a]
    paths = [str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    nshot.dump(a, paths[0], label="a")
    nshot.dump(b, paths[1], label="b")
    lines = nshot.compare(paths)
    assert lines[-1].startswith("train: max |accuracy difference| 2.5000 points over 3 steps (1 differ)"), lines
