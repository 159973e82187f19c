"""amaml_ext: Adjoint MAML (Li et al., AISTATS 2023) as a PyTorch C++/CUDA extension.

Layers, lowest first (docs/design.md, "Layout"; each imports only those below it):
:mod:`amaml_ext.ops` (the compiled core ``amaml_ext._C``, loaded there only, its fused ops and
their plain-PyTorch mirrors), :mod:`amaml_ext.ode` (the generic ODE API),
:mod:`amaml_ext.functional` (model -> functions of a flat parameter vector),
:mod:`amaml_ext.metagrad` (:func:`adjoint_meta_grad`, :func:`gradient_flow`, the accuracy
control), :mod:`amaml_ext.learners` (A-MAML, the baselines, :class:`AdjointLearner`),
:mod:`amaml_ext.train` (meta-training, meta-testing, the benchmark registry) and the
``amaml-ext`` command (:mod:`amaml_ext.cli`); beside them the task sources
(:mod:`amaml_ext.data`, also as :mod:`amaml_ext.tasks`) and :mod:`amaml_ext.models`.

Importing ``amaml_ext`` loads only the compiled core; every other name is imported on first use,
so ``import amaml_ext.ode`` loads no learner, trainer or dataset.
"""

import importlib

from .ops.build import build_info
from .ops.core import C as _C  # noqa: F401  (loads and registers torch.ops.amaml_ext.*)

__version__ = "0.1.0"

_SUBPACKAGES = ("data", "functional", "learners", "metagrad", "models", "ode", "ops", "tasks", "train", "cli")
_NAMES = {
    "adjoint_meta_grad": "metagrad", "gradient_flow": "metagrad", "MetaGradResult": "metagrad",
    "AdjointAccuracyError": "metagrad", "AdjointAccuracyWarning": "metagrad", "accuracy": "metagrad",
    "flatten_params": "functional", "unflatten_params": "functional", "NondeterministicModelWarning": "functional",
    "AdaptedModel": "learners", "AdjointLearner": "learners",
}

__all__ = sorted(["build_info", *_NAMES, *(p for p in _SUBPACKAGES if p != "cli")])


def __getattr__(name):
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def _check_build_torch() -> None:
    """Warn when the extension was compiled against another torch than the one running: the
    C++ ABI of torch changes between minor versions (crashes or wrong symbols)."""
    import warnings

    import torch
    info = build_info()
    built, running = info["torch_version"], torch.__version__.split("+")[0]
    if built.split(".")[:2] != running.split(".")[:2]:
        warnings.warn(f"amaml_ext was built against torch {built} but torch {running} is running; rebuild it "
                      f"against this torch: pip install --force-reinstall --no-deps .",
                      RuntimeWarning, stacklevel=2)


_check_build_torch()
