"""Argument checks shared by the package, written once. Each raises a ``ValueError`` (``TypeError``
where the kind is wrong) naming the argument, what it expects and what it got."""

import math
import numbers
import os
import sys
from typing import Optional, Tuple

import numpy as np
import torch


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` made by the caller of this function point
    at the user's line: the first frame outside amaml_ext (and outside torch, whose autograd
    machinery sits between ``gradient_flow`` and its Function), however deep the library's own
    call chain is. Fixed stacklevels broke each time a frame was added."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith((_PACKAGE, _TORCH)):
        frame, level = frame.f_back, level + 1
    return level


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


def tolerances(rtol, atol) -> Tuple[float, float]:
    """An adaptive solver's ``rtol`` and ``atol``: each a finite number in (0, 1). The one rule,
    for :func:`amaml_ext.ode.solve_forward` and the meta-gradient alike."""
    out = []
    for name, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not 0 < v < 1:
            raise ValueError(f"argument '{name}' must be a number in (0, 1) (dopri5's tolerance), got {v!r}")
        out.append(float(v))
    return out[0], out[1]


def path(name: str, v) -> str:
    """A non-empty ``str`` or ``os.PathLike``."""
    if isinstance(v, bool) or not isinstance(v, (str, os.PathLike)) or not os.fspath(v):
        raise ValueError(f"argument '{name}' must be a path (str or os.PathLike), got {v!r}")
    return os.fspath(v)


def choice(name: str, v, allowed) -> None:
    """``v`` is one of ``allowed`` (shown as given: pass ``sorted(...)`` or ``list(...)``)."""
    if v not in allowed:
        raise ValueError(f"argument '{name}' must be one of {allowed}, got {v!r}")


def check_theta(theta, n: int, what: str = "the model's parameter count") -> torch.Tensor:
    """``theta``: a float32/float64 tensor of shape ``[n]`` with finite values (the one check of
    theta, for the meta-gradient, the learners and meta-testing)."""
    if not isinstance(theta, torch.Tensor):
        raise TypeError(f"argument 'theta' must be a torch.Tensor of shape [{n}] ({what}), got {type(theta).__name__}")
    if theta.dim() != 1 or theta.numel() != n:
        raise ValueError(f"argument 'theta' must have shape [{n}] ({what}), got {tuple(theta.shape)}")
    if theta.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"argument 'theta' must be float32 or float64, got {theta.dtype}")
    if theta.device.type == "meta":
        raise ValueError("argument 'theta' is on the 'meta' device, which holds no values: the inner run needs "
                         "real numbers; use 'cpu' or 'cuda'")
    check_finite("theta", theta)
    return theta


def _first_bad(t: torch.Tensor) -> Tuple[int, float, int]:
    """``(flat index, value, count)`` of the non-finite entries of ``t`` (only called when it has some)."""
    bad = ~torch.isfinite(t.detach()).reshape(-1)
    i = int(bad.nonzero()[0])
    return i, float(t.detach().reshape(-1)[i]), int(bad.sum())


def check_finite(name: str, t: torch.Tensor, part: Optional[str] = None, tasks_first: bool = False) -> None:
    """``t`` (a floating tensor; others pass) holds only finite values. ``part`` names the piece of
    the argument (``"support x"``); ``tasks_first``: dimension 0 indexes tasks, and the message
    names the first task that holds a non-finite value."""
    if not t.is_floating_point() or bool(torch.isfinite(t).all()):
        return
    i, value, count = _first_bad(t)
    what = f"argument '{name}'" + (f" ({part})" if part else "")
    if tasks_first and t.dim() >= 1 and t.shape[0] > 0:
        rows = (~torch.isfinite(t.detach())).reshape(t.shape[0], -1).any(1)
        task, others = int(rows.nonzero()[0]), int(rows.sum()) - 1
        where = f" at task {task}" + (f" (and {others} other task{'s' if others > 1 else ''})" if others else "")
    else:
        where = f" at index {i}"
    why = " (one NaN or inf in the data makes every gradient of its task NaN)" if part else ""
    raise ValueError(f"{what} holds non-finite values{where}: {count} of {t.numel()} entries (e.g. {value}); "
                     f"expected finite numbers{why}")
