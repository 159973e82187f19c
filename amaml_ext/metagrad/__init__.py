"""The A-MAML meta-gradient: argument checks (:mod:`.checks`), the plan of grid, phases and
memory (:mod:`.plan`), the forward and adjoint passes (:mod:`.passes`), and
:func:`adjoint_meta_grad` tying them together (:mod:`.adjoint`); :func:`gradient_flow`, the same
solve as an autograd operation (:mod:`.flow`, :mod:`.gradient_flow`); how far a continuous
adjoint can be trusted (:mod:`.accuracy`)."""

from . import accuracy
from .accuracy import AdjointAccuracyError, AdjointAccuracyWarning
from .adjoint import MetaGradResult, adjoint_meta_grad
from .gradient_flow import gradient_flow
from .plan import MEMORY_MODES

__all__ = ["AdjointAccuracyError", "AdjointAccuracyWarning", "MEMORY_MODES", "MetaGradResult", "accuracy",
           "adjoint_meta_grad", "gradient_flow"]
