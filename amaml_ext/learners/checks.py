"""What every learner checks before it trains, written once (A-MAML included) and used by
meta-testing too: theta's kind, shape, dtype and values; the task data's shapes, dtype, device
and values; and :class:`InnerLoopDiverged`, raised when finite theta and data gave non-finite
numbers. Each error names the argument, what it expects and what it got; the finiteness checks
cost one ``torch.isfinite(...).all()`` per tensor."""

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .._checks import check_finite, check_theta  # noqa: F401  (the learners' checks use them; re-exported)
from ..data.batch import TaskBatch

FLOAT_DTYPES = (torch.float32, torch.float64)


class InnerLoopDiverged(FloatingPointError, ValueError):
    """Finite theta and finite data gave non-finite parameters, losses or meta-gradients: the
    inner loop diverged (its step size, number of steps or horizon is too large for the loss).
    A ``ValueError`` like the learners' other refusals, and a ``FloatingPointError`` like
    ``meta_train``'s stop on a non-finite meta-step. The message names the learner, the tasks
    and what to lower.

    Example:
        >>> import torch, amaml_ext
        >>> from amaml_ext import learners, models, tasks
        >>> net = models.mlp(width=8)
        >>> batch = tasks.CosMixture(shots=10, val=10).pool(2, seed=0).all(dtype=torch.float32)
        >>> learners.MAML(net, torch.nn.functional.mse_loss, inner_lr=1e3, steps=50).meta_grad(
        ...     amaml_ext.flatten_params(net), batch)
        Traceback (most recent call last):
        ...
        amaml_ext.learners.checks.InnerLoopDiverged: MAML(steps=50, inner_lr=1000).meta_grad: the inner loop diverged ...
    """


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every entry of every tensor is finite: one ``isfinite(...).all()`` per tensor; on a
    GPU one synchronisation for them all (on the CPU stacking the flags costs more than it saves)."""
    flags = [torch.isfinite(t.detach()).all() for t in tensors if t.is_floating_point() and t.numel()]
    if not flags:
        return True
    if flags[0].device.type == "cpu":
        return all(bool(f) for f in flags)
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all())


def check_model_device(model: nn.Module, theta: torch.Tensor) -> None:
    """The model's parameters and buffers live on theta's device."""
    for p in list(model.parameters()) + list(model.buffers()):
        if p.device != theta.device:
            raise ValueError(f"argument 'model' must be on theta's device {theta.device}, has a tensor on {p.device} "
                             f"(move it with model.to(theta.device))")


def check_pairs(name: str, pairs: Sequence[Tuple[str, object]], theta: torch.Tensor, batched: bool,
                same_dtype: bool = True, finite: bool = True) -> None:
    """Task data ``pairs`` (``[("support", (x, y)), ...]``) of argument ``name``: tensors with a task
    dimension (``batched``) and a sample dimension, x and y of a set with as many samples, every set
    with as many tasks, on theta's device, floating ones of theta's dtype (``same_dtype``) and
    finite (``finite``)."""
    tasks, floating = None, []
    for part, pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, torch.Tensor) for t in pair)):
            raise TypeError(f"argument '{name}' ({part}) must be a pair (x, y) of tensors, got {type(pair).__name__}")
        x, y = pair
        lead = 2 if batched else 1
        if x.dim() < lead or y.dim() < lead or x.shape[lead - 1] != y.shape[lead - 1]:
            layout = "[tasks, samples, ...]" if batched else "[samples, ...]"
            raise ValueError(f"argument '{name}' ({part}): x and y must be {layout} with as many samples, got "
                             f"x {tuple(x.shape)}, y {tuple(y.shape)}")
        if batched:
            if tasks is None:
                tasks = (part, x.shape[0])
            elif x.shape[0] != tasks[1]:
                raise ValueError(f"argument '{name}' ({part}) must hold as many tasks as the {tasks[0]} set "
                                 f"({tasks[1]}), got {x.shape[0]}")
        for which, t in (("x", x), ("y", y)):
            label = f"{part} {which}"
            if t.device != theta.device:
                raise ValueError(f"argument '{name}' ({label}) must be on theta's device {theta.device}, got "
                                 f"{t.device}")
            if same_dtype and t.is_floating_point() and t.dtype != theta.dtype:
                raise ValueError(f"argument '{name}' ({label}) must have theta's dtype {theta.dtype}, got {t.dtype} "
                                 f"(cast the data, e.g. tasks.to(dtype={theta.dtype}), or theta)")
            if t.is_floating_point():
                floating.append((label, t))
    if finite and not all_finite([t for _, t in floating]):
        for label, t in floating:
            check_finite(name, t, label, tasks_first=batched)


def check_tasks(tasks, theta: torch.Tensor, name: str = "tasks", same_dtype: bool = True,
                masked: bool = False) -> TaskBatch:
    """``tasks``: a :class:`TaskBatch` whose data :func:`check_pairs` accepts; padded query sets
    (a ``query_mask``) only with ``masked`` (meta-testing)."""
    if not isinstance(tasks, TaskBatch):
        raise TypeError(f"argument '{name}' must be an amaml_ext.tasks.TaskBatch, got {type(tasks).__name__}")
    if tasks.query_mask is not None and not masked:
        raise ValueError(f"argument '{name}' must have same-size query sets (query_mask None) to meta-train on, "
                         f"got padded query sets with a query_mask of shape {tuple(tasks.query_mask.shape)} "
                         "(a test pool: meta-train on the training pool)")
    check_pairs(name, (("support", tasks.support), ("query", tasks.query)), theta, True, same_dtype)
    return tasks


def diverged(who: str, values: Sequence[Tuple[str, torch.Tensor]], per_task: Optional[torch.Tensor] = None,
             advice: str = "lower the inner step size or the number of inner steps", offset: int = 0,
             total: Optional[int] = None) -> None:
    """Raise :class:`InnerLoopDiverged` if any of ``values`` (``[(what, tensor)]``, computed from
    finite theta and data) is not finite. ``per_task`` (``[B]`` or ``[B, ...]``) names the tasks:
    row ``b`` is task ``offset + b`` of ``total`` (default B)."""
    if all_finite([v for _, v in values]):
        return
    bad = [what for what, v in values if not bool(torch.isfinite(v).all())]
    where = ""
    if per_task is not None and per_task.dim() >= 1 and per_task.shape[0] > 0:
        rows = (~torch.isfinite(per_task.detach())).reshape(per_task.shape[0], -1).any(1)
        if bool(rows.any()):
            first, n = int(rows.nonzero()[0]), int(rows.sum())
            of = per_task.shape[0] if total is None else total
            where = f" on task {offset + first}" + (f" (and {n - 1} more)" if n > 1 else "") + f" of {of}"
    raise InnerLoopDiverged(f"{who}: the inner loop diverged{where}: the {' and the '.join(bad)} "
                            f"{'is' if len(bad) == 1 else 'are'} not finite although theta and the data are; {advice}")
