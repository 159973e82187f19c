"""The API reference (docs/sphinx, ``make docs``) covers every public name: each has a docstring,
each function and class a runnable example (``>>>``, run as a doctest by ``make docs``), and each
is listed by an autodoc directive on its module's page. The public names are the ``__all__`` of
``amaml_ext`` (its lazy exports included) and of the documented subpackages, plus the lazy table
of :mod:`amaml_ext.tasks` (docs/sphinx/public_api.py)."""

import importlib
import importlib.util
import inspect
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPHINX = os.path.join(ROOT, "docs", "sphinx")

_spec = importlib.util.spec_from_file_location("public_api", os.path.join(SPHINX, "public_api.py"))
public_api = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(public_api)

DIRECTIVE = re.compile(r"^\.\. (auto\w+|currentmodule|module)::\s*(\S+)", re.M)


def _public():
    return [(m, n) for m in public_api.PAGES for n in public_api.public_names(m)]


def _documented(page: str):
    """The dotted names ``page`` documents with autodoc directives (resolved against its
    ``currentmodule``)."""
    with open(os.path.join(SPHINX, page)) as f:
        text = f.read()
    out, current = set(), ""
    for directive, target in DIRECTIVE.findall(text):
        if directive in ("currentmodule", "module", "automodule"):      # each sets the current module
            current = target
        if directive in ("currentmodule", "module"):
            continue
        if directive == "automodule" or "." in target:
            out.add(target)
        else:
            out.add(f"{current}.{target}" if current else target)
    return out


def _all_documented():
    return set().union(*(_documented(p) for p in public_api.PAGES.values()))


def _missing_docs(module: str, name: str):
    """What the public name ``module.name`` lacks: a docstring, an example."""
    obj = getattr(importlib.import_module(module), name)
    kind = public_api.kind(obj)
    if kind == "data":
        return [] if public_api.attribute_doc(module, name) else ["a docstring (a string after the assignment)"]
    doc = public_api.own_doc(obj)
    if doc is None:
        return ["a docstring"]
    if kind in ("class", "function") and ">>>" not in doc:
        return ["an example (>>>)"]
    return []


def _missing_method_docs(cls):
    """The public methods and properties of ``cls`` and its ``amaml_ext`` bases without a docstring
    (their own or the one they override)."""
    out = []
    for klass in cls.__mro__:
        if not klass.__module__.startswith("amaml_ext"):
            continue
        for attr, value in vars(klass).items():
            if attr.startswith("_") or not (inspect.isfunction(value) or isinstance(value, (property, classmethod,
                                                                                            staticmethod))):
                continue
            if not inspect.getdoc(getattr(cls, attr) if not isinstance(value, property) else value):
                out.append(f"{klass.__module__}.{klass.__qualname__}.{attr}")
    return sorted(set(out))


def test_the_public_names_are_listed():
    names = _public()
    assert len(names) > 100, len(names)
    for m in public_api.PAGES:
        importlib.import_module(m)       # every documented module imports (amaml_ext.accuracy does not: it is
    assert ("amaml_ext", "accuracy") in names   # the attribute naming amaml_ext.metagrad.accuracy)


@pytest.mark.parametrize("module", sorted(public_api.PAGES))
def test_every_public_name_has_a_docstring_and_an_example(module):
    missing = {f"{module}.{n}": what for n in public_api.public_names(module) for what in [_missing_docs(module, n)]
               if what}
    assert not missing, f"public names without docs: {missing}"


@pytest.mark.parametrize("module", sorted(public_api.PAGES))
def test_public_methods_have_docstrings(module):
    mod = importlib.import_module(module)
    classes = [getattr(mod, n) for n in public_api.public_names(module)]
    classes = [c for c in classes if inspect.isclass(c) and c.__module__.startswith("amaml_ext")]
    missing = sorted({m for c in classes for m in _missing_method_docs(c)})
    assert not missing, f"public methods without a docstring: {missing}"


@pytest.mark.parametrize("module", sorted(public_api.PAGES))
def test_every_public_name_is_on_its_page(module):
    """Listed by a directive on the module's own page (a re-exported name with ``:no-index:`` where
    another page holds its entry); a public subpackage by its ``automodule`` on some page."""
    page = _documented(public_api.PAGES[module])
    everywhere = _all_documented()
    missing = []
    for n in public_api.public_names(module):
        obj = getattr(importlib.import_module(module), n)
        if public_api.kind(obj) == "module":
            if obj.__name__ not in everywhere:
                missing.append(f"{n} (automodule:: {obj.__name__})")
        elif f"{module}.{n}" not in page:
            missing.append(n)
    assert not missing, f"{public_api.PAGES[module]} does not list {missing}"


def test_the_pages_list_only_public_names():
    """No directive names something that is gone (a renamed function would leave its entry behind,
    which autodoc reports only as a warning)."""
    known = {f"{m}.{n}" for m, n in _public()} | set(public_api.PAGES)
    known |= {getattr(importlib.import_module(m), n).__name__ for m, n in _public()
              if public_api.kind(getattr(importlib.import_module(m), n)) == "module"}
    stale = sorted(_all_documented() - known)
    assert not stale, stale


def test_the_checks_fail_on_an_undocumented_name(monkeypatch):
    """The checks can fail: a function without its docstring, or without an example, is reported."""
    ode = importlib.import_module("amaml_ext.ode")
    monkeypatch.setattr(ode.solve_forward, "__doc__", None)
    assert _missing_docs("amaml_ext.ode", "solve_forward") == ["a docstring"]
    monkeypatch.setattr(ode.solve_forward, "__doc__", "Solve it.")
    assert _missing_docs("amaml_ext.ode", "solve_forward") == ["an example (>>>)"]
