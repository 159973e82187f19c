"""nn.Module + loss + task data -> functions of a flat parameter vector.

The solver works on a flat state ``u`` of shape ``[d]`` (one task) or ``[B, d]`` (B tasks).
:class:`TaskFunctions` turns the user's model into the three callbacks A-MAML needs:

* ``grad(u)``: gradient of the training (support) loss, ``[d]`` or ``[B, d]``;
* ``hvp(u, v)``: Hessian-vector product of the training loss;
* ``value_and_grad_val(u)``: validation (query) loss per task and its gradient.

The model's parameters are replaced by views into ``u`` through
``torch.func.functional_call``; the user's module is never mutated. B tasks are evaluated
together by ``torch.func.vmap`` over the functional forward, and differentiated with
autograd (the per-task losses are summed; tasks do not interact, so the gradient of the
sum with respect to ``u[b]`` is task b's gradient).

HVPs use double backward. A Heun (or RK4) adjoint step evaluates two HVPs at the same
stored state, and consecutive steps share a state, so the linearisation (the gradient with
its graph) of the last state is kept and reused: ``N + 1`` linearisations serve ``2N`` HVPs.
docs/design.md records the measurements behind this choice.
"""

import copy
import math
import weakref
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def param_shapes(model: nn.Module) -> Sequence[Tuple[str, torch.Size]]:
    """(name, shape) of every parameter, in ``model.named_parameters()`` order."""
    return [(name, p.shape) for name, p in model.named_parameters()]


def flatten_params(model: nn.Module) -> torch.Tensor:
    """The model's parameters as one flat vector ``[d]`` (a copy, detached), in
    ``model.named_parameters()`` order.

    Example::

        >>> m = torch.nn.Linear(3, 2)
        >>> flatten_params(m).shape
        torch.Size([8])
    """
    params = [p.detach().reshape(-1) for p in model.parameters()]
    if not params:
        raise ValueError("argument 'model' has no parameters")
    return torch.cat(params)


def unflatten_params(model: nn.Module, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Views of ``flat`` (``[d]``, or ``[..., d]``) shaped like each parameter, keyed by name.

    Inverse of :func:`flatten_params`: ``unflatten_params(m, flatten_params(m))`` equals
    ``dict(m.named_parameters())`` in values. Raises ValueError if ``flat`` has the wrong length.
    """
    shapes = param_shapes(model)
    d = sum(math.prod(s) for _, s in shapes)
    if flat.shape[-1] != d:
        raise ValueError(f"argument 'theta' must have {d} entries (the model's parameter count), "
                         f"got {flat.shape[-1]} (shape {tuple(flat.shape)})")
    out, i = {}, 0
    batch = flat.shape[:-1]
    for name, shape in shapes:
        n = math.prod(shape)
        out[name] = flat[..., i:i + n].reshape(*batch, *shape)
        i += n
    return out


_FUNCTIONAL_COPIES: "weakref.WeakKeyDictionary[nn.Module, Tuple[bool, nn.Module]]" = weakref.WeakKeyDictionary()


def functional_module(model: nn.Module) -> nn.Module:
    """A private copy of ``model`` safe for functional, vmapped evaluation.

    In training mode, BatchNorm normalises with batch statistics and would update its running
    statistics in place, which neither vmap nor a side-effect-free gradient allows. The copy's
    BatchNorm layers keep no running statistics, which leaves the training-mode output
    unchanged. In eval mode the running statistics are used as constants. The user's module is
    never changed; copies are cached per module and mode.
    """
    cached = _FUNCTIONAL_COPIES.get(model)
    if cached is not None and cached[0] == model.training:
        return cached[1]
    clone = copy.deepcopy(model)
    if model.training:
        for m in clone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean = None
                m.running_var = None
                m.num_batches_tracked = None
                m.track_running_stats = False
    _FUNCTIONAL_COPIES[model] = (model.training, clone)
    return clone


class TaskFunctions:
    """Training-loss gradient, HVP and validation gradient of ``model`` on a task or a batch
    of tasks, as functions of a flat parameter state.

    Args:
        model: any ``nn.Module``; architecture and buffers are used, parameters come from ``u``.
        loss: ``loss(pred, target) -> scalar`` (mean over the task's samples).
        support, query: ``(x, y)``; with ``batched=True`` every tensor has a leading task
            dimension B.
        batched: whether states are ``[B, d]``.
    """

    def __init__(self, model: nn.Module, loss: LossFn, support, query, batched: bool = False):
        self.model = model
        self.module = functional_module(model)
        self.loss = loss
        self.support = support
        self.query = query
        self.batched = batched
        self.names = [name for name, _ in param_shapes(model)]
        self.buffers = {k: v for k, v in self.module.named_buffers()}
        self.grad_evals = 0
        self.hvp_evals = 0
        self.linearisations = 0
        self._lin_key = None
        self._lin: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    # -- losses ---------------------------------------------------------------------------

    def _task_loss(self, flat_u: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        params = unflatten_params(self.model, flat_u)
        pred = torch.func.functional_call(self.module, (params, self.buffers), (x,))
        return self.loss(pred, y)

    def losses(self, u: torch.Tensor, data) -> torch.Tensor:
        """Per-task loss: ``[]`` for one task, ``[B]`` for a batch."""
        x, y = data
        if self.batched:
            return torch.func.vmap(self._task_loss)(u, x, y)
        return self._task_loss(u, x, y)

    # -- derivatives ------------------------------------------------------------------------

    def grad(self, u: torch.Tensor) -> torch.Tensor:
        """Gradient of the training loss at ``u`` (``[d]`` or ``[B, d]``)."""
        self.grad_evals += 1
        with torch.enable_grad():
            leaf = u.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.losses(leaf, self.support).sum(), leaf)
        return g

    def hvp(self, u: torch.Tensor, v: torch.Tensor, key=None) -> torch.Tensor:
        """Hessian of the training loss at ``u`` times ``v``.

        ``key`` identifies the state (e.g. its grid time): two calls with the same key reuse
        one linearisation (gradient with graph) instead of rebuilding it.
        """
        self.hvp_evals += 1
        if key is None or key != self._lin_key or self._lin is None:
            self.linearisations += 1
            with torch.enable_grad():
                leaf = u.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(self.losses(leaf, self.support).sum(), leaf, create_graph=True)
            self._lin, self._lin_key = (leaf, g), key
        leaf, g = self._lin
        (hv,) = torch.autograd.grad(g, leaf, v, retain_graph=True)
        return hv

    def release(self) -> None:
        """Drop the cached linearisation (its graph holds activations)."""
        self._lin, self._lin_key = None, None

    def value_and_grad_val(self, u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Validation loss per task and its gradient at ``u``."""
        with torch.enable_grad():
            leaf = u.detach().requires_grad_(True)
            per_task = self.losses(leaf, self.query)
            (g,) = torch.autograd.grad(per_task.sum(), leaf)
        return per_task.detach(), g
