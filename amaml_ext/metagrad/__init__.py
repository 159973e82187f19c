"""The A-MAML meta-gradient: its options as one object (:mod:`.options`), argument checks (:mod:`.checks`), the plan of grid, phases and
memory (:mod:`.plan`), the forward and adjoint passes (:mod:`.passes`), and
:func:`adjoint_meta_grad` tying them together (:mod:`.adjoint`); :func:`gradient_flow`, the same
solve as an autograd operation (:mod:`.flow`, :mod:`.gradient_flow`), both thin wrappers of
one core solve (:mod:`.core`); how far a continuous adjoint can be trusted (:mod:`.accuracy`).

The rule of this layer: it sees the model only through :mod:`amaml_ext.functional` and the
solvers only through :mod:`amaml_ext.ode`; the options travel as one
:class:`MetaGradOptions`, checked where it is built."""

from . import accuracy
from .accuracy import AdjointAccuracyError, AdjointAccuracyWarning
from .adjoint import MetaGradResult, adjoint_meta_grad
from .gradient_flow import gradient_flow
from .options import AccuracyOptions, MemoryOptions, MetaGradOptions, SolverOptions
from .plan import MEMORY_MODES

__all__ = ["AccuracyOptions", "AdjointAccuracyError", "AdjointAccuracyWarning", "MEMORY_MODES", "MemoryOptions",
           "MetaGradOptions", "MetaGradResult", "SolverOptions", "accuracy",
           "adjoint_meta_grad", "gradient_flow"]
