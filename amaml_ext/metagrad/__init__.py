"""The A-MAML meta-gradient: argument checks (:mod:`.checks`), the plan of grid, phases and
memory (:mod:`.plan`), the forward and adjoint passes (:mod:`.passes`), and
:func:`adjoint_meta_grad` tying them together (:mod:`.adjoint`); :func:`gradient_flow`, the same
solve as an autograd operation (:mod:`.flow`, :mod:`.gradient_flow`)."""

from .adjoint import MetaGradResult, adjoint_meta_grad
from .gradient_flow import gradient_flow
from .plan import MEMORY_MODES

__all__ = ["MEMORY_MODES", "MetaGradResult", "adjoint_meta_grad", "gradient_flow"]
