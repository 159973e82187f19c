"""The one module that loads the compiled core ``amaml_ext._C``: the fused ops it registers as
``torch.ops.amaml_ext.*`` and the C++ solver drivers (:mod:`amaml_ext.ode` reaches them through
``C``). torch is imported first: it loads the libc10/libtorch the extension links against."""

import torch  # noqa: F401  (first)

try:
    from .. import _C as C  # noqa: N812
except ImportError as e:  # built against another torch (a missing libc10_cuda.so, an undefined symbol), or not built
    raise ImportError(
        f"amaml_ext's compiled core (amaml_ext._C) does not load with the torch installed here "
        f"({torch.__version__}, {torch.__file__}): {e}. The extension must be compiled against the "
        f"torch it runs with; rebuild it in this environment: pip install . (or, in a clone, "
        f"pip install --no-build-isolation -e .).") from e

__all__ = ["C"]
