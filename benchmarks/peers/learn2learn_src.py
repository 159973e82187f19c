"""learn2learn's MAML without building learn2learn.

learn2learn 0.2.0's source package compiles Cython extensions (its data samplers) and does not
build on Python 3.11, and no wheel exists for it. Its MAML (``learn2learn/algorithms/maml.py``,
with ``base_learner.py`` and ``clone_module``/``update_module`` from ``learn2learn/utils``) is
pure Python, so the benchmark loads those files from the unpacked source package, with empty
``learn2learn`` and ``learn2learn.algorithms`` packages in front of them (their ``__init__``
files import the compiled parts and are not run).

Where to find the source: ``$LEARN2LEARN_SRC`` (the unpacked ``learn2learn-X.Y.Z`` folder),
else the newest ``learn2learn-*`` under ``src/`` of the running venv (``make peers-env`` puts it
there) or of :data:`DEFAULT_ROOT`. An importable ``learn2learn`` (installed the usual way) is
used as it is.
"""

import importlib
import os
import sys
import types
from pathlib import Path
from typing import Optional, Tuple

from ..common.children import REPO

DEFAULT_ROOT = REPO / ".venv-peers"


def source_dir() -> Optional[Path]:
    """The unpacked source package (the folder holding ``learn2learn/``), or None."""
    env = os.environ.get("LEARN2LEARN_SRC")
    if env:
        return Path(env)
    for root in (Path(sys.prefix) / "src", DEFAULT_ROOT / "src"):
        found = sorted(root.glob("learn2learn-*/learn2learn/algorithms/maml.py"))
        if found:
            return found[-1].parents[2]
    return None


def _version_of(src: Path) -> str:
    try:
        for line in (src / "PKG-INFO").read_text().splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return src.name.rpartition("-")[2]


def _stub_package(name: str, path: Path) -> None:
    mod = types.ModuleType(name)
    mod.__path__ = [str(path)]
    mod.__file__ = None
    sys.modules[name] = mod


def load_maml() -> Tuple[type, str]:
    """``(learn2learn.algorithms.maml.MAML, "version (how loaded)")``; ImportError if neither an
    installed learn2learn nor its source package is found."""
    loaded = sys.modules.get("learn2learn.algorithms.maml")
    if loaded is not None:
        return loaded.MAML, getattr(loaded, "_amaml_bench_version", "loaded")
    try:
        import learn2learn  # noqa: F401  (a working install, e.g. on another Python)
        from learn2learn.algorithms.maml import MAML
        return MAML, f"{learn2learn.__version__} (installed)"
    except ImportError:
        for name in [m for m in sys.modules if m == "learn2learn" or m.startswith("learn2learn.")]:
            del sys.modules[name]
    src = source_dir()
    if src is None or not (src / "learn2learn" / "algorithms" / "maml.py").is_file():
        raise ImportError("learn2learn's source package not found: run `make peers-env` or set LEARN2LEARN_SRC "
                          "to the unpacked learn2learn-X.Y.Z folder")
    root = src / "learn2learn"
    _stub_package("learn2learn", root)
    _stub_package("learn2learn.algorithms", root / "algorithms")
    maml = importlib.import_module("learn2learn.algorithms.maml")
    maml._amaml_bench_version = f"{_version_of(src)} (algorithms/maml.py loaded from the source package)"
    return maml.MAML, maml._amaml_bench_version
