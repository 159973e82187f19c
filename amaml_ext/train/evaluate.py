"""Meta-testing: adapt from a learned initialisation on new tasks and score the query sets; the
per-task metrics and the confidence intervals reported with them."""

import math
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .. import _checks
from .._checks import check_theta
from ..data.batch import TaskBatch
from ..functional import TaskFunctions, param_count, param_shapes
from ..learners.checks import check_tasks, diverged
from .distributed import Distributed

#: the normal quantile of a two-sided 95% interval (``mean ± Z95 * std / sqrt(n)``)
Z95 = 1.96


def half_width(std: float, n: int, z: float = Z95) -> float:
    """Half-width ``z * std / sqrt(n)`` of the confidence interval of a mean over ``n`` values.

    Example:
        >>> half_width(0.5, 100)
        0.098
    """
    return z * std / math.sqrt(n)


def nrmse(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Normalised RMSE per task: ``||pred - y|| / ||y||`` over each task's points
    (``[B, k, 1]`` -> ``[B]``); with ``mask`` (``[B, k]`` bool) over the marked points only.

    Example:
        >>> import torch
        >>> y = torch.tensor([[[3.0], [4.0]]])                   # one task, two points: ||y|| = 5
        >>> nrmse(torch.zeros_like(y), y), nrmse(y + 1, y, mask=torch.tensor([[True, False]]))
        (tensor([1.]), tensor([0.3333]))
    """
    err, ref = (pred - target).pow(2), target.pow(2)
    if mask is not None:
        m = mask.reshape(mask.shape + (1,) * (pred.dim() - mask.dim())).to(err.dtype)
        err, ref = err * m, ref * m
    dims = tuple(range(1, pred.dim()))
    return err.sum(dims).sqrt() / ref.sum(dims).sqrt().clamp_min(1e-30)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Classification accuracy per task (``[B, k, classes]``, ``[B, k]`` -> ``[B]``); with
    ``mask`` (``[B, k]`` bool) over the marked points only.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]]])     # predicts 0, 1, 0
        >>> accuracy(logits, torch.tensor([[0, 1, 1]]))
        tensor([0.6667], dtype=torch.float64)
    """
    hit = (logits.argmax(-1) == labels).to(torch.float64)
    if mask is None:
        return hit.mean(-1)
    m = mask.to(torch.float64)
    return (hit * m).sum(-1) / m.sum(-1).clamp_min(1)


METRICS_FNS = {"nrmse": nrmse, "accuracy": accuracy}
"""The query metrics of :func:`meta_test` by name."""


def meta_test(model: torch.nn.Module, loss, theta: torch.Tensor, tasks: TaskBatch, *, steps: int,
              lr: float = 0.01, record_every: int = 1, metric: str = "nrmse",
              chunk: int = 100, adapt_mask: Optional[torch.Tensor] = None,
              distributed=None) -> Dict[str, List[float]]:
    """Adapt from ``theta`` on every task's support set with ``steps`` plain GD steps of ``lr``
    and record the query ``metric`` after every ``record_every`` steps.

    Args:
        model: the model.
        loss: the inner loss ``loss(pred, target)``.
        theta: the learned initialisation ``[d]`` (cast to the data's dtype).
        tasks: the test tasks, a :class:`~amaml_ext.tasks.TaskBatch`; the metric is taken over the
            real points of ``tasks.query_mask`` when there is one.
        steps: test GD steps (0: theta itself).
        lr: their step size.
        record_every: steps between records (the last step is always recorded).
        metric: ``"nrmse"`` or ``"accuracy"`` (:data:`METRICS_FNS`).
        chunk: tasks adapted at a time (batched).
        adapt_mask: ``[d]`` 0/1, adapting only the marked parameters (ANIL: the head).
        distributed: True or a :class:`Distributed`: each rank adapts its contiguous share of the
            tasks, the per-task values are gathered in task order, every rank returns the same.

    Returns:
        ``{"metric", "step": [...], "mean": [...], "std": [...], "ci95": [...], "final": [per-task
        value]}`` (std over tasks, population; ``ci95 = Z95 std / sqrt(tasks)``, ``Z95 = 1.96``).

    Raises:
        ValueError: bad arguments (theta not ``[d]`` or not finite, tasks of another device, an
            unknown ``metric``, ...); :class:`~amaml_ext.learners.InnerLoopDiverged` when the test
            steps diverge.

    Example:
        >>> import torch, amaml_ext
        >>> from amaml_ext import models, tasks, train
        >>> net = models.mlp(width=8)
        >>> test = tasks.CosMixture(shots=10, val=10).pool(3, seed=1).all(dtype=torch.float32)
        >>> r = train.meta_test(net, torch.nn.functional.mse_loss, amaml_ext.flatten_params(net), test, steps=4,
        ...                     record_every=2)
        >>> r["metric"], r["step"], len(r["mean"]), len(r["final"])
        ('nrmse', [0, 2, 4], 3, 3)
    """
    steps = _checks.integer("steps", steps, lo=0)
    _checks.choice("metric", metric, sorted(METRICS_FNS))
    chunk = _checks.integer("chunk", chunk)
    record_every = _checks.integer("record_every", record_every)
    check_theta(theta, param_count(param_shapes(model)))
    check_tasks(tasks, theta, same_dtype=False, masked=True)     # theta is cast to the data's dtype
    recorded = [s for s in range(steps + 1) if s % record_every == 0 or s == steps]
    group = Distributed.resolve(distributed)
    if group is None:
        values = _per_task(model, loss, theta, tasks, recorded, lr, METRICS_FNS[metric], chunk, adapt_mask)
    else:
        a, b = group.span(tasks.size)
        mine = _per_task(model, loss, theta, tasks.select(slice(a, b)), recorded, lr, METRICS_FNS[metric], chunk,
                         adapt_mask)
        values = group.gather_rows(mine, tasks.size, "the gather of meta-test results").cpu()
    _check_adapted(values, steps, lr)        # after the gather: every rank raises alike
    out = {"metric": metric, "step": recorded, "mean": [], "std": [], "ci95": []}
    for e in values.t():
        sd = float(e.std(unbiased=False))
        out["mean"].append(float(e.mean()))
        out["std"].append(sd)
        out["ci95"].append(half_width(sd, e.numel()))
    out["final"] = values[:, -1].tolist()
    return out


def _per_task(model, loss, theta, tasks: TaskBatch, recorded: List[int], lr: float, score, chunk: int,
              adapt_mask) -> torch.Tensor:
    """The metric of every task after each recorded step: ``[tasks, len(recorded)]``."""
    per_task: List[List[torch.Tensor]] = [[] for _ in recorded]
    for a in range(0, tasks.size, chunk):
        part = tasks.select(slice(a, a + chunk))
        fns = TaskFunctions(model, loss, part.support, part.query, batched=True)
        floating = [t.dtype for t in (*part.support, *part.query) if t.is_floating_point()]
        u = theta.detach().to(floating[0] if floating else theta.dtype).expand(part.size, -1).clone()
        fns.check_model(u, caller="meta_test", random_ok=True)

        def value():
            with torch.no_grad():
                return score(fns.predictions(u, part.query[0]), part.query[1], part.query_mask)

        k = 0
        if recorded[0] == 0:
            per_task[0].append(value())
            k = 1
        with torch.no_grad():
            for s in range(1, recorded[-1] + 1):
                g = fns.grad(u)
                u = u - lr * (g if adapt_mask is None else g * adapt_mask.to(g))
                if k < len(recorded) and s == recorded[k]:
                    per_task[k].append(value())
                    k += 1
        lost = ~torch.isfinite(u).all(1)          # diverged: NaN at the last record (accuracy would not show it)
        if bool(lost.any()):
            per_task[-1][-1] = torch.where(lost.to(per_task[-1][-1].device), float("nan"), per_task[-1][-1])
    if tasks.size == 0:
        return torch.zeros(0, len(recorded), dtype=torch.float64 if score is accuracy else tasks.support[0].dtype)
    return torch.stack([torch.cat(vals) for vals in per_task], 1)


def _check_adapted(values: torch.Tensor, steps: int, lr) -> None:
    """The per-task metrics ``[tasks, records]`` are finite (theta and the data were checked
    finite; a task whose adapted parameters are not holds NaN): else the test-time GD diverged."""
    rate = f"lr={lr:g}" if isinstance(lr, (int, float)) else "lr (per parameter)"
    diverged(f"meta_test(steps={steps}, {rate})", [("query metric (or the adapted parameters)", values)],
             per_task=values, advice=f"lower the test step size ({rate}) or the number of test steps ({steps})")


def confidence_interval(accuracies, z: float = Z95) -> Tuple[float, float]:
    """``(mean, z * std / sqrt(n))`` over per-task accuracies: the 95% confidence interval reported
    for few-shot benchmarks (``std`` with ``ddof=0``, i.e. ``np.std``, as MAML's evaluation code).

    Raises:
        ValueError: no values, non-numbers or non-finite values, or a non-positive ``z``.

    Example:
        >>> confidence_interval([0.5, 0.7, 0.6, 0.6])
        (0.6, 0.06929646455628165)
    """
    if isinstance(accuracies, torch.Tensor):
        accuracies = accuracies.detach().cpu().double().numpy()
    try:
        a = np.asarray(accuracies, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"argument 'accuracies' must be a sequence of numbers, got {accuracies!r}") from e
    if a.size == 0:
        raise ValueError("argument 'accuracies' must hold at least one value, got an empty sequence")
    if not np.isfinite(a).all():
        raise ValueError(f"argument 'accuracies' must be finite, got {a[~np.isfinite(a)][:3].tolist()} among its values")
    z = _checks.positive("z", z)
    return float(a.mean()), float(half_width(a.std(), a.size, z))


# ----------------------------------------------------------------------------------------------
# a fixed, indexable set of episodes (for meta_train / meta_test)
