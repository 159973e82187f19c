"""Argument checks shared by the package, written once. Each raises a ``ValueError`` (``TypeError``
where the kind is wrong) naming the argument, what it expects and what it got."""

import math
import numbers
import os

import numpy as np
import torch


def is_int(v) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, bool)


def integer(name: str, v, lo: int = 1) -> int:
    """``v`` as an int ``>= lo`` (``lo = 1``: a positive int)."""
    if not is_int(v) or v < lo:
        what = "a positive int" if lo == 1 else f"an int >= {lo}"
        raise ValueError(f"argument '{name}' must be {what}, got {v!r}")
    return int(v)


def seed(name: str, v) -> int:
    """Any int (a seed)."""
    if not is_int(v):
        raise ValueError(f"argument '{name}' must be an int, got {v!r}")
    return int(v)


def positive(name: str, v, integer: bool = False):
    """A positive finite number (``integer=True``: a positive int)."""
    ok = isinstance(v, numbers.Integral) if integer else isinstance(v, numbers.Real)
    if isinstance(v, bool) or not ok or not math.isfinite(float(v)) or v <= 0:
        kind = "a positive int" if integer else "a positive finite number"
        raise ValueError(f"argument '{name}' must be {kind}, got {v!r}")
    return int(v) if integer else float(v)


def positive_real(name: str, v) -> float:
    """A real number (or a one-element tensor) that is finite and > 0; ``TypeError`` for another kind."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise TypeError(f"argument '{name}' must be a real number, got a tensor of shape {tuple(v.shape)}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"argument '{name}' must be a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"argument '{name}' must be finite and > 0, got {v}")
    return v


def path(name: str, v) -> str:
    """A non-empty ``str`` or ``os.PathLike``."""
    if isinstance(v, bool) or not isinstance(v, (str, os.PathLike)) or not os.fspath(v):
        raise ValueError(f"argument '{name}' must be a path (str or os.PathLike), got {v!r}")
    return os.fspath(v)


def choice(name: str, v, allowed) -> None:
    """``v`` is one of ``allowed`` (shown as given: pass ``sorted(...)`` or ``list(...)``)."""
    if v not in allowed:
        raise ValueError(f"argument '{name}' must be one of {allowed}, got {v!r}")
