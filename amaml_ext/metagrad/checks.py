"""Argument checks of :func:`amaml_ext.adjoint_meta_grad` (each names the argument, what it
expects and what it got)."""

from typing import Tuple

import torch
from torch import nn

from .. import _checks
from ..functional import param_count, param_shapes
from ..functional.model_checks import check_supported
from .options import MetaGradOptions


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


def check_call(model, loss, theta, support, query, options: MetaGradOptions) -> Tuple[int, int]:
    """Validate the model, the loss, theta and the data of a call (its options were checked when
    built); returns ``(d, batch)``."""
    batched = options.batched
    if not isinstance(model, nn.Module):
        raise TypeError(f"argument 'model' must be a torch.nn.Module, got {type(model).__name__}")
    check_supported(model)
    if not callable(loss):
        raise TypeError(f"argument 'loss' must be callable loss(pred, target), got {type(loss).__name__}")
    d = param_count(param_shapes(model))
    if d == 0:
        raise ValueError("argument 'model' has no trainable parameters (none with requires_grad=True): there is "
                         "nothing to adapt or meta-learn")
    _checks.check_theta(theta, d)
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
    return d, batch
