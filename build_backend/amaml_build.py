"""The PEP 517 build backend of amaml_ext: setuptools', compiling against the torch of the
environment pip installs into.

A torch extension must be compiled against the torch it will run with: its ``_C`` links to that
torch's ``libc10``/``libtorch`` and uses its C++ ABI. With build isolation (plain ``pip install
.``), pip builds in a fresh environment holding only ``[build-system] requires``; a ``torch`` named
there is the newest on the index, not the user's (a CPU torch 2.13 user got a wheel built against
a CUDA torch 2.14 that could not be imported), and costs a second multi-GB torch.

This backend looks for torch in the target environment (the interpreter pip runs for; build
isolation hides its site-packages, but ``sysconfig`` still names them):

* found: torch is not added to the build requirements. The target's site-packages go on the end
  of ``sys.path`` (and ``PYTHONPATH``, for the build's own subprocesses), so ``setup.py`` imports
  and links against exactly that torch; the build environment's packages keep precedence. No torch
  is downloaded or installed.
* not found (an empty environment): the build requires ``torch`` as ``[project] dependencies``
  name it, pip installs it into the build environment, and the same release is installed to run
  (pip's cache serves the second copy; see README, Install).

``--no-build-isolation`` builds against the running environment's torch, as before. The
decision is printed to stderr (``pip -v`` shows it) and can be overridden: ``AMAML_EXT_BUILD_TORCH=
isolated`` always lets pip install torch into the build environment.
"""

import os
import site
import sys
import sysconfig
from importlib import metadata
from typing import List, Optional, Tuple

from setuptools import build_meta as _setuptools

__all__ = ["build_wheel", "build_sdist", "build_editable", "get_requires_for_build_wheel",
           "get_requires_for_build_sdist", "get_requires_for_build_editable", "prepare_metadata_for_build_wheel",
           "prepare_metadata_for_build_editable", "target_torch"]

TORCH_REQUIREMENT = "torch>=2.13"
"""What an empty environment's build installs; the same floor as ``[project] dependencies``."""


def _say(msg: str) -> None:
    print(f"amaml_ext build backend: {msg}", file=sys.stderr, flush=True)


def _torch_in_path(path: Optional[List[str]] = None) -> Optional[metadata.Distribution]:
    for dist in metadata.distributions(path=path) if path is not None else metadata.distributions():
        if (dist.metadata["Name"] or "").lower() == "torch":
            return dist
    return None


def target_torch() -> Optional[Tuple[str, str]]:
    """``(version, site-packages dir)`` of the torch the target interpreter imports: the first
    found in its purelib/platlib, then in its other site directories (``site.getsitepackages()``:
    a venv's base with ``--system-site-packages``), or None."""
    paths = sysconfig.get_paths()
    try:   # a venv made with --system-site-packages, or a conda base: torch may be in these
        more = site.getsitepackages()
    except AttributeError:  # pragma: no cover  (an embedded interpreter without site)
        more = []
    for site_dir in dict.fromkeys(p for p in (paths.get("platlib"), paths.get("purelib"), *more) if p):
        if os.path.isdir(os.path.join(site_dir, "torch")):
            dist = _torch_in_path([site_dir])
            if dist is not None:
                return dist.version, site_dir
    return None


def _use_target_torch() -> bool:
    """Make the target's torch importable here; False where the build must install one."""
    if os.environ.get("AMAML_EXT_BUILD_TORCH", "").lower() == "isolated":
        return _torch_in_path() is not None
    visible = _torch_in_path()
    found = target_torch()
    if found is None:
        return visible is not None
    version, site = found
    if visible is None:
        sys.path.append(site)
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), site) if p)
        _say(f"building against the target environment's torch {version} ({site}); no torch is downloaded")
    return True


_HAS_TORCH = _use_target_torch()


def _requires() -> List[str]:
    if _HAS_TORCH:
        return []
    _say(f"no torch in the target environment: the build environment installs {TORCH_REQUIREMENT}")
    return [TORCH_REQUIREMENT]


def get_requires_for_build_wheel(config_settings=None) -> List[str]:
    """The build's requirements beyond ``[build-system] requires``: torch only where the target
    environment has none (setuptools' own hook would run setup.py, which imports torch)."""
    return _requires()


def get_requires_for_build_editable(config_settings=None) -> List[str]:
    return _requires()


def get_requires_for_build_sdist(config_settings=None) -> List[str]:
    return _requires()


prepare_metadata_for_build_wheel = _setuptools.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = _setuptools.prepare_metadata_for_build_editable
build_wheel = _setuptools.build_wheel
build_editable = _setuptools.build_editable
build_sdist = _setuptools.build_sdist
