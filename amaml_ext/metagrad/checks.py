"""Argument checks of :func:`amaml_ext.adjoint_meta_grad` (each names the argument, what it
expects and what it got)."""

import math
import numbers
from typing import Tuple

import torch
from torch import nn

from .. import _checks, ode
from ..functional import param_shapes
from ..functional.model_checks import check_supported


def check_pair(name: str, pair, batched: bool):
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, torch.Tensor) for t in pair)):
        raise TypeError(f"argument '{name}' must be a pair (x, y) of tensors, got {type(pair).__name__}")
    x, y = pair
    if batched:
        if x.dim() < 2 or y.dim() < 1:
            raise ValueError(f"argument '{name}' must have a leading task dimension with batched=True, "
                             f"got x {tuple(x.shape)}, y {tuple(y.shape)}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"argument '{name}': x and y must have the same number of tasks, "
                             f"got {x.shape[0]} and {y.shape[0]}")
    sample_dim = 1 if batched else 0
    if x.dim() <= sample_dim or y.dim() <= sample_dim:
        raise ValueError(f"argument '{name}': x and y need a sample dimension, got x {tuple(x.shape)}, y {tuple(y.shape)}"
                         + (" (with batched=True: [tasks, samples, ...])" if batched else ""))
    if x.shape[sample_dim] != y.shape[sample_dim]:
        layout = (" (with batched=True dimension 0 indexes tasks and dimension 1 samples: is the data "
                  "batched?)" if batched else "")
        raise ValueError(f"argument '{name}': x and y must have the same number of samples, "
                         f"got {x.shape[sample_dim]} and {y.shape[sample_dim]}{layout}")
    return x, y


def check_solver_options(rtol, atol, max_steps, memory_budget) -> None:
    for name, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not 0 < v < 1:
            raise ValueError(f"argument '{name}' must be a number in (0, 1) (dopri5's tolerance), got {v!r}")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral)
                                  or max_steps < 1):
        raise ValueError(f"argument 'max_steps' must be a positive int (or None for the default), got {max_steps!r}")
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, numbers.Real)
                                      or not memory_budget >= 0):
        raise ValueError(f"argument 'memory_budget' must be a number of bytes >= 0 (or None), got {memory_budget!r}")


def check_pairing(solver: str, adjoint: str) -> None:
    """``adjoint="discrete"`` is the exact reverse of ``solver="euler"``'s steps and of nothing
    else: with another forward it is neither that method's gradient nor the flow's (7-13% off on
    the paper's MLP at h = 0.2), and no error estimate covers it."""
    if adjoint == "discrete" and solver != "euler":
        raise ValueError(f"argument 'adjoint': 'discrete' is the exact gradient of solver='euler' (T/h GD steps) "
                         f"and must be paired with it, got solver={solver!r}; for {solver!r} use a continuous "
                         "adjoint ('heun' or 'rk4'), which carries an error estimate")


def check_call(model, loss, theta, support, query, *, solver: str, adjoint: str, memory: str, batched: bool,
               compile, strict, refine, error_estimate, error_tol, memory_modes) -> Tuple[int, int, float]:
    """Validate everything but the grid; returns ``(d, batch, error_tol)``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"argument 'model' must be a torch.nn.Module, got {type(model).__name__}")
    check_supported(model)
    if not callable(loss):
        raise TypeError(f"argument 'loss' must be callable loss(pred, target), got {type(loss).__name__}")
    if not isinstance(theta, torch.Tensor):
        raise TypeError(f"argument 'theta' must be a torch.Tensor, got {type(theta).__name__}")
    d = sum(math.prod(s) for _, s in param_shapes(model))
    if d == 0:
        raise ValueError("argument 'model' has no trainable parameters (none with requires_grad=True): there is "
                         "nothing to adapt or meta-learn")
    if theta.dim() != 1 or theta.numel() != d:
        raise ValueError(f"argument 'theta' must have shape [{d}] (the model's parameter count), got {tuple(theta.shape)}")
    if theta.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"argument 'theta' must be float32 or float64, got {theta.dtype}")
    if theta.device.type == "meta":
        raise ValueError("argument 'theta' is on the 'meta' device, which holds no values: the inner run needs "
                         "real numbers; use 'cpu' or 'cuda'")
    for name, value, allowed in (("solver", solver, ode.FORWARD_METHODS), ("adjoint", adjoint, ode.ADJOINT_METHODS),
                                 ("memory", memory, memory_modes)):
        if value not in allowed:
            raise ValueError(f"argument '{name}' must be one of {allowed}, got {value!r}")
    check_pairing(solver, adjoint)
    xs, ys = check_pair("support", support, batched)
    xq, yq = check_pair("query", query, batched)
    for name, t in (("support x", xs), ("support y", ys), ("query x", xq), ("query y", yq)):
        if t.device.type != "meta":
            _checks.check_finite(name.split()[0], t, name, tasks_first=batched)
        if t.device != theta.device:
            raise ValueError(f"argument '{name.split()[0]}' ({name}) must be on theta's device {theta.device}, got {t.device}")
        if t.is_floating_point() and t.dtype != theta.dtype:
            raise ValueError(f"argument '{name.split()[0]}' ({name}) must have theta's dtype {theta.dtype}, got {t.dtype}")
    for p in list(model.parameters()) + list(model.buffers()):
        if p.device != theta.device:
            raise ValueError(f"argument 'model' must be on theta's device {theta.device}, has a tensor on {p.device}")
    batch = xs.shape[0] if batched else 1
    if batched and xq.shape[0] != batch:
        raise ValueError(f"arguments 'support' and 'query' must hold the same number of tasks, got {batch} and {xq.shape[0]}")
    if compile != "auto" and not isinstance(compile, bool):
        raise TypeError(f"argument 'compile' must be a bool, got {type(compile).__name__} ({compile!r}; 'auto' "
                        f"is also accepted: compile where it pays)")
    for name, v in (("strict", strict), ("refine", refine)):
        if not isinstance(v, bool):
            raise TypeError(f"argument '{name}' must be a bool, got {type(v).__name__}")
    if error_estimate not in (True, False, "drift", "richardson"):
        raise ValueError(f"argument 'error_estimate' must be True, False, 'drift' or 'richardson', "
                         f"got {error_estimate!r}")
    return d, batch, _checks.positive_real("error_tol", error_tol)
