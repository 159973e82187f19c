"""The package's layers (docs/design.md, "Layout"): imports run downwards only, and files and
functions stay small enough to read. These check the source tree, not behaviour."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "amaml_ext")

# The layers (docs/design.md, "Layout"): what each part of the package may import besides itself
# (amaml_ext-relative module prefixes; the root package, which loads only the compiled core
# through ops, is importable from everywhere). Each layer's rule is in its package docstring.
ALLOWED = {
    "_checks": (),
    "_io": (),
    "models": (),
    "ops": ("_C",),
    "ode": ("ops", "_checks"),
    "data": ("_checks", "_io"),
    "tasks": ("data",),
    "functional": ("_checks", "ops"),
    "metagrad": ("ode", "functional", "_checks"),
    "learners": ("metagrad", "functional", "ode", "data", "_checks"),
    "train": ("learners", "metagrad", "functional", "ode", "data", "models", "_checks", "_io"),
    "cli": ("train", "learners", "metagrad", "functional", "ode", "data", "models", "_checks", "_io"),
}
ROOT_MODULES = {"", "__main__"}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 90


def _modules():
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, PKG)[:-3].replace(os.sep, ".")
                yield path, rel[:-len(".__init__")] if rel.endswith("__init__") else rel


def _imports(path, module):
    """The amaml_ext modules ``path`` imports, as dotted names relative to amaml_ext."""
    tree = ast.parse(open(path).read())
    package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target + "." + a.name if target else a.name for a in node.names]
                out += [target] + names if target else names
            elif node.module and node.module.startswith("amaml_ext"):
                out.append(node.module[len("amaml_ext."):])
        elif isinstance(node, ast.Import):
            out += [a.name[len("amaml_ext."):] for a in node.names if a.name.startswith("amaml_ext.")]
    return [m for m in out if m]


def test_the_checker_sees_relative_imports():
    found = _imports(os.path.join(PKG, "data", "images", "cache.py"), "data.images.cache")
    assert "_io" in found or any(m.startswith("_io") for m in found)


def _part(module: str) -> str:
    return module.split(".")[0]


def test_every_part_has_a_rule():
    parts = {_part(m) for _, m in _modules()} - ROOT_MODULES
    assert parts == set(ALLOWED) - {"_C"}, sorted(parts ^ (set(ALLOWED) - {"_C"}))


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_imports_run_downwards(part):
    bad = []
    for path, module in _modules():
        if _part(module) == part:
            for m in _imports(path, module):
                if _part(m) not in (part, *ALLOWED[part]):
                    bad.append(f"{module} imports {m}")
    assert not bad, bad


def _below(part: str) -> set:
    """``part`` and every part it may reach, directly or through another."""
    out, todo = set(), [part]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo += ALLOWED.get(p, ())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("part", sorted(set(ALLOWED) - {"_C", "cli"}))
def test_importing_a_layer_loads_no_higher_one(part):
    """At run time, not only in the source: importing a layer (a fresh interpreter) loads no module
    of a layer above it, through ``__init__`` files or lazy names."""
    code = (f"import sys, amaml_ext.{part}; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('amaml_ext.'))))")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    allowed = _below(part) | _below("ops")          # the root package loads the compiled core
    loaded = [m[len("amaml_ext."):] for m in out.stdout.split()]
    above = sorted(m for m in loaded if _part(m) not in allowed)
    assert not above, f"import amaml_ext.{part} loads {above}"


def test_modules_and_functions_are_small():
    long_modules, long_functions = [], []
    for path, module in _modules():
        text = open(path).read()
        if text.count("\n") > MAX_MODULE_LINES:
            long_modules.append((module, text.count("\n")))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append((f"{module}.{node.name}", n))
    assert not long_modules, long_modules
    assert not long_functions, long_functions
