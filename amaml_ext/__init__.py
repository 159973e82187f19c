"""amaml_ext: Adjoint MAML (Li et al., AISTATS 2023) as a PyTorch C++/CUDA extension.

Layers (see docs/design.md): the compiled core ``amaml_ext._C`` (fused ops registered as
``torch.ops.amaml_ext.*`` and the C++ solver drivers), the generic ODE API
:mod:`amaml_ext.ode`, and the meta-learning layers built on it: :func:`adjoint_meta_grad`,
:mod:`amaml_ext.learners` (A-MAML and the baselines), :mod:`amaml_ext.tasks`,
:mod:`amaml_ext.models`, :mod:`amaml_ext.train` and the ``amaml-ext`` command
(:mod:`amaml_ext.cli`).
"""

import torch  # noqa: F401  (first: loads libc10/libtorch that _C links against)

from . import _C  # noqa: F401  (loads and registers torch.ops.amaml_ext.*)
from . import accuracy, ops, ode
from ._build import build_info
from .functional import NondeterministicModelWarning, flatten_params, unflatten_params
from .accuracy import AdjointAccuracyError, AdjointAccuracyWarning
from .metagrad import MetaGradResult, adjoint_meta_grad, gradient_flow
from .adjoint_learner import AdaptedModel, AdjointLearner
from . import learners, models, tasks, train

__all__ = ["AdaptedModel", "AdjointLearner", "AdjointAccuracyError", "AdjointAccuracyWarning", "MetaGradResult",
           "NondeterministicModelWarning", "accuracy", "adjoint_meta_grad",
           "build_info", "flatten_params", "gradient_flow", "learners", "models", "ode", "ops", "tasks", "train",
           "unflatten_params"]
__version__ = "0.1.0"


def _check_build_torch() -> None:
    """Warn when the extension was compiled against another torch than the one running: the
    C++ ABI of torch changes between minor versions (crashes or wrong symbols)."""
    import warnings
    info = build_info()
    built, running = info["torch_version"], torch.__version__.split("+")[0]
    if built.split(".")[:2] != running.split(".")[:2]:
        warnings.warn(f"amaml_ext was built against torch {built} but torch {running} is running; rebuild it "
                      f"against this torch: pip install --no-build-isolation --force-reinstall --no-deps .",
                      RuntimeWarning, stacklevel=2)


_check_build_torch()
