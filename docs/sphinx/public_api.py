"""What the API reference covers, shared by ``conf.py`` and ``python_tests/test_api_reference.py``.

* :data:`PAGES`: each documented module and its page under ``docs/sphinx/api/``;
* :func:`public_names`: a module's public names (its ``__all__``, plus the lazy export table
  ``_LAZY`` of :mod:`amaml_ext.tasks`, whose datasets are imported on first use);
* :func:`attribute_doc`: the docstring of a constant (``NAME = ...`` followed by a string, or
  preceded by ``#:`` comments), looked up in every loaded ``amaml_ext`` module that holds the same
  object, so a constant re-exported by a package (``amaml_ext.ode.ORDERS``, defined in
  ``amaml_ext.ode.schemes``) is documented by the text beside its definition.

``amaml_ext.accuracy`` is the module :mod:`amaml_ext.metagrad.accuracy` (a lazy attribute of the
package, not an importable ``amaml_ext/accuracy.py``), so its page documents it under that name.
"""

import importlib
import inspect
import sys
from typing import Dict, List, Optional

PAGES: Dict[str, str] = {
    "amaml_ext": "api/amaml_ext.rst",
    "amaml_ext.ode": "api/ode.rst",
    "amaml_ext.metagrad": "api/metagrad.rst",
    "amaml_ext.metagrad.accuracy": "api/accuracy.rst",
    "amaml_ext.learners": "api/learners.rst",
    "amaml_ext.models": "api/models.rst",
    "amaml_ext.tasks": "api/tasks.rst",
    "amaml_ext.train": "api/train.rst",
    "amaml_ext.ops": "api/ops.rst",
}
"""Documented module -> its page (relative to ``docs/sphinx``)."""


def public_names(module_name: str) -> List[str]:
    """The public names of ``module_name``: ``__all__`` and the lazy table ``_LAZY`` if any."""
    module = importlib.import_module(module_name)
    names = list(getattr(module, "__all__", None) or [])
    if not names:
        raise ValueError(f"{module_name} has no __all__: its public names are undefined")
    return names + [n for n in getattr(module, "_LAZY", {}) if n not in names]


def kind(obj) -> str:
    """``"module"``, ``"class"``, ``"function"`` or ``"data"``."""
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        return "class"
    if callable(obj):
        return "function"
    return "data"


def own_doc(obj) -> Optional[str]:
    """The docstring written for ``obj`` (a module, class or function): a class's own, not one
    inherited or the signature a dataclass makes up when it has none."""
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__")
        if doc and doc.startswith(obj.__name__ + "(") and hasattr(obj, "__dataclass_fields__"):
            return None
    else:
        doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if doc and doc.strip() else None


_ANALYZED: Dict[str, Dict] = {}


def _attr_docs(module_name: str) -> Dict:
    if module_name not in _ANALYZED:
        from sphinx.pycode import ModuleAnalyzer
        try:
            _ANALYZED[module_name] = ModuleAnalyzer.for_module(module_name).find_attr_docs()
        except Exception:  # noqa: BLE001  (no source: a compiled module)
            _ANALYZED[module_name] = {}
    return _ANALYZED[module_name]


def attribute_doc(module_name: str, name: str) -> Optional[str]:
    """The docstring of the constant ``module_name.name``: beside its assignment in that module,
    or in another ``amaml_ext`` module that holds the same object (the one it was imported from)."""
    obj = getattr(importlib.import_module(module_name), name)
    candidates = [(module_name, name)]
    for other, mod in sorted(sys.modules.items()):
        if mod is None or not (other == "amaml_ext" or other.startswith("amaml_ext.")) or other == module_name:
            continue
        candidates += [(other, attr) for attr, value in list(vars(mod).items()) if value is obj]
    for other, attr in candidates:
        lines = _attr_docs(other).get(("", attr))
        if lines and "".join(lines).strip():
            return "\n".join(lines).strip()
    return None
