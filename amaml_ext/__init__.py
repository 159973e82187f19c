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
from .functional import flatten_params, unflatten_params
from .accuracy import AdjointAccuracyError, AdjointAccuracyWarning
from .meta_grad import MetaGradResult, adjoint_meta_grad
from . import learners, models, tasks, train

__all__ = ["AdjointAccuracyError", "AdjointAccuracyWarning", "MetaGradResult", "adjoint_meta_grad", "accuracy", "build_info", "flatten_params", "learners", "models",
           "ode", "ops", "tasks", "train", "unflatten_params"]
__version__ = "0.1.0"
