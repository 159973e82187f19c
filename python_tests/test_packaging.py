"""`pip install .` ships every subpackage of amaml_ext (a subpackage missing from the packaging
config imports fine from the source tree, where the tests run, and fails only once installed)."""

import os
import tomllib

from setuptools import find_packages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_subpackage_is_packaged():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        cfg = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]
    shipped = set(find_packages(ROOT, include=cfg["include"]))
    on_disk = {os.path.relpath(d, ROOT).replace(os.sep, ".")
               for d, _, files in os.walk(os.path.join(ROOT, "amaml_ext")) if "__init__.py" in files}
    assert "amaml_ext.data.images" in on_disk
    assert on_disk <= shipped, f"not packaged: {sorted(on_disk - shipped)}"


# --- plain `pip install .` (issue 26): the in-tree build backend builds against the target's torch

import shutil
import subprocess
import sys
import zipfile
from importlib import metadata

import pytest
import torch

BACKEND = os.path.join(ROOT, "build_backend")


def _backend(python, env=None):
    """get_requires_for_build_wheel() and target_torch() of the backend, run by ``python``."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import amaml_build as b; "
            "print(json.dumps([b.get_requires_for_build_wheel(), b.target_torch()]))")
    out = subprocess.run([python, "-c", code, BACKEND], capture_output=True, text=True, check=True, env=env)
    import json
    return json.loads(out.stdout.splitlines()[-1]), out.stderr


def test_pyproject_names_the_in_tree_backend_and_no_torch_to_build_with():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        bs = tomllib.load(f)["build-system"]
    assert bs["build-backend"] == "amaml_build" and bs["backend-path"] == ["build_backend"]
    assert not any(r.split("=")[0].split(">")[0].strip() == "torch" for r in bs["requires"]), bs["requires"]


def test_the_backend_requires_no_torch_where_the_target_has_one():
    (requires, found), _ = _backend(sys.executable)
    assert requires == []
    assert found is not None and found[0] == metadata.version("torch")


def test_the_backend_requires_torch_in_an_environment_without_one(tmp_path):
    """A fresh venv without torch (setuptools copied beside it, nothing else): torch is required."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    import _distutils_hack
    import setuptools
    site = tmp_path / "site"
    for mod in (setuptools, _distutils_hack):
        shutil.copytree(os.path.dirname(mod.__file__), site / mod.__name__)
    env = dict(os.environ, PYTHONPATH=str(site))
    (requires, found), err = _backend(str(venv / "bin" / "python"), env)
    assert found is None
    assert requires == ["torch>=2.13"], requires
    assert "no torch in the target environment" in err


@pytest.mark.slow
def test_plain_pip_wheel_builds_against_the_installed_torch_and_imports(tmp_path):
    """``pip wheel .`` with build isolation (the plain form), CPU kernels only to keep it short:
    the backend takes this environment's torch (no torch collected into the build environment),
    and the wheel, unpacked beside nothing else, imports without a warning and computes."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if f.startswith(("amaml_ext/", "csrc/", "build_backend/")) or "/" not in f:
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), src / f)
    env = dict(os.environ, AMAML_EXT_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(tmp_path / "dist"),
                          str(src)], capture_output=True, text=True, env=env)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert f"building against the target environment's torch {metadata.version('torch')} " in log
    collected = [ln for ln in log.splitlines() if ln.strip().lower().startswith(("collecting torch", "downloading torch"))]
    assert not collected, collected
    (wheel,) = (tmp_path / "dist").glob("amaml_ext-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
    check = ("import torch, amaml_ext; i = amaml_ext.build_info(); "
             "assert i['torch_version'] == torch.__version__.split('+')[0], i; "
             "m = torch.nn.Linear(2, 1); x = torch.randn(8, 2); y = torch.randn(8, 1); "
             "th = amaml_ext.flatten_params(m); "
             "r = amaml_ext.adjoint_meta_grad(m, torch.nn.functional.mse_loss, th, 0.1, support=(x, y), "
             "query=(x, y), h=0.05, solver='euler', adjoint='discrete'); "
             "assert bool(torch.isfinite(r.grad).all()); print('ok')")
    out = subprocess.run([sys.executable, "-W", "error", "-c", check], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_a_core_that_does_not_load_says_to_rebuild_against_this_torch():
    """A ``_C`` built against another torch fails to load (a missing libc10_cuda.so, an undefined
    symbol): the error names the torch installed here and the rebuild command."""
    code = ("import sys; sys.modules['amaml_ext._C'] = None\n"
            "try:\n    import amaml_ext.ops.core\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "does not load with the torch installed here" in out and torch.__version__ in out, out
    assert "pip install ." in out, out
