"""What the compiled extension was built with, and what this process runs with."""

from typing import Any, Dict

import torch

from .core import C as _C


def build_info() -> Dict[str, Any]:
    """Build and runtime facts of the extension.

    Returns:
        dict: ``torch_version`` (torch the extension was compiled against),
        ``torch_runtime_version`` (torch imported now), ``cuda`` (CUDA kernels compiled in),
        ``cuda_archs`` (list of compiled architectures, e.g. ``["8.0", "9.0"]``),
        ``cuda_version`` (CUDA of the build, or None) and ``cuda_available`` (a GPU usable now).

    Example:
        >>> import amaml_ext
        >>> sorted(amaml_ext.build_info())[:3]
        ['cuda', 'cuda_archs', 'cuda_available']
    """
    raw = dict(_C.build_info())
    archs = [a for a in raw.get("cuda_archs", "").split(";") if a]
    return {
        "torch_version": raw["torch_version"],
        "torch_runtime_version": torch.__version__,
        "cuda": bool(raw["cuda"]),
        "cuda_archs": archs,
        "cuda_version": raw.get("cuda_version") or None,
        "cuda_available": torch.cuda.is_available(),
    }
