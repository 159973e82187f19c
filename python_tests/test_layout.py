"""The package's layers (docs/design.md, "Layout"): imports run downwards only, and files and
functions stay small enough to read. These check the source tree, not behaviour."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "amaml_ext")

# what each part may not import (amaml_ext-relative module prefixes)
FORBIDDEN = {
    "data": ("train", "cli", "learners", "metagrad", "ode", "ops", "_C"),
    "metagrad": ("_C", "ops", "learners", "train", "cli", "data"),
    "ode": ("metagrad", "learners", "train", "cli", "data", "functional"),
    "learners": ("train", "cli"),
    "train": ("cli",),
    "models": ("data", "train", "cli", "learners", "metagrad"),
}
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


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_imports_run_downwards(part):
    bad = []
    for path, module in _modules():
        if module == part or module.startswith(part + "."):
            for m in _imports(path, module):
                if any(m == f or m.startswith(f + ".") for f in FORBIDDEN[part]):
                    bad.append(f"{module} imports {m}")
    assert not bad, bad


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
