"""Compatibility module: :func:`adjoint_meta_grad` lives in :mod:`amaml_ext.metagrad`."""

from .metagrad.adjoint import MetaGradResult, adjoint_meta_grad  # noqa: F401
from .metagrad.plan import MEMORY_MODES  # noqa: F401

__all__ = ["MEMORY_MODES", "MetaGradResult", "adjoint_meta_grad"]
