"""The A-MAML meta-gradient: argument checks (:mod:`.checks`), the plan of grid, phases and
memory (:mod:`.plan`), the forward and adjoint passes (:mod:`.passes`), and
:func:`adjoint_meta_grad` tying them together (:mod:`.adjoint`)."""

from .adjoint import MetaGradResult, adjoint_meta_grad
from .plan import MEMORY_MODES

__all__ = ["MEMORY_MODES", "MetaGradResult", "adjoint_meta_grad"]
