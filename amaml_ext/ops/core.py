"""The one module that loads the compiled core ``amaml_ext._C``: the fused ops it registers as
``torch.ops.amaml_ext.*`` and the C++ solver drivers (:mod:`amaml_ext.ode` reaches them through
``C``). torch is imported first: it loads the libc10/libtorch the extension links against."""

import torch  # noqa: F401  (first)

from .. import _C as C  # noqa: N812

__all__ = ["C"]
