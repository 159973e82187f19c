"""nn.Module + loss + task data -> functions of a flat parameter vector.

The solver works on a flat state ``u``, ``[d]`` (one task) or ``[B, d]`` (B tasks).
:class:`TaskFunctions` gives A-MAML's callbacks: ``grad(u)`` and ``hvp(u, v)`` of the training
(support) loss, ``value_and_grad_val(u)`` of the validation (query) loss per task. Parameters
are views into ``u`` through ``torch.func.functional_call`` on a private copy of the model made
per call (:mod:`amaml_ext.functional.model_state`); the user's module is never mutated. B tasks are
evaluated together by ``torch.func.vmap`` (one at a time where vmap cannot) and differentiated
with autograd. HVPs use double backward; the linearisation of the last state is kept, so
``N + 1`` linearisations serve a Heun adjoint's ``2N`` HVPs (docs/design.md).

``compile=True``: ``torch.compile``-d ``torch.func.grad`` and forward-over-reverse ``jvp(grad)``,
4-6x faster per call for small models after a one-off compilation of seconds (per model as it
is, loss and input shapes); a failed compilation warns and falls back to eager.
"""

import contextlib
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .._checks import user_stacklevel
from .compile_policy import compile_refusal, resolve_compile
from .compiled import COMPILED_CALL_LOCK, compiled_callbacks
from .model_checks import (LossFn, LossValueError, NondeterministicModelWarning,  # noqa: F401 (re-exported)
                           backward_hooked, check_model, check_supported, checked_loss, differentiable,
                           first_line, one_task_at_a_time)
from .model_state import (_unflatten_shapes, cast_constants, constants, fingerprint,  # noqa: F401 (re-exported)
                          functional_module, param_count, param_shapes)

SAVED_TENSOR_OVERHEAD = 2560
"""Bytes counted per tensor a kept linearisation saves, on top of its storage: what its
autograd node, tensor object and the allocator's fragmentation cost. Measured on the CPU as the
growth of peak resident memory per kept linearisation (issue 25): 2.4 KiB a saved tensor on the
CosMixture MLP (25 small tensors, 68 KiB of storage, 126 KiB in all); 1% of Conv4's."""

def flatten_params(model: nn.Module) -> torch.Tensor:
    """The model's trainable parameters as one flat vector ``[d]`` (a copy, detached), in
    ``model.named_parameters()`` order (those with ``requires_grad=False`` left out): the
    ``theta`` of :func:`amaml_ext.adjoint_meta_grad` and the learners.

    Raises:
        ValueError: the model has no trainable parameters.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(3, 2)
        >>> flatten_params(m).shape
        torch.Size([8])
    """
    params = [p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]
    if not params:
        frozen = sum(1 for _ in model.parameters())
        raise ValueError("argument 'model' has no trainable parameters" +
                         (f" (its {frozen} parameters all have requires_grad=False)" if frozen else ""))
    return torch.cat(params)


def unflatten_params(model: nn.Module, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Views of ``flat`` (``[d]``, or ``[..., d]``) shaped like each parameter, keyed by name.

    Inverse of :func:`flatten_params`: ``unflatten_params(m, flatten_params(m))`` equals
    ``dict(m.named_parameters())`` in values; the dict suits ``torch.func.functional_call``.

    Raises:
        ValueError: ``flat``'s last dimension is not the model's trainable parameter count.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(3, 2)
        >>> p = unflatten_params(m, torch.arange(8.0))
        >>> p["weight"].shape, p["bias"]
        (torch.Size([2, 3]), tensor([6., 7.]))
        >>> torch.func.functional_call(m, p, (torch.ones(1, 3),))
        tensor([[ 9., 19.]])
    """
    shapes = param_shapes(model)
    d = param_count(shapes)
    if flat.shape[-1] != d:
        raise ValueError(f"argument 'theta' must have {d} entries (the model's parameter count), "
                         f"got {flat.shape[-1]} (shape {tuple(flat.shape)})")
    return _unflatten_shapes(shapes, flat)


def second_order():
    """Context for computations that are differentiated twice (HVPs, unrolled MAML): scaled
    dot-product attention takes its math backend, whose backward is differentiable (the fused
    CPU/flash kernels have no double backward: nn.TransformerEncoderLayer would fail)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.MATH)


def _dropout_in_training(model: nn.Module) -> Sequence[str]:
    return [name or type(model).__name__ for name, m in model.named_modules()
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0]


def check_data(name: str, pair, batched: bool) -> None:
    """Raise if a (x, y) pair holds no samples (the sample dimension is empty)."""
    x = pair[0]
    dim = 1 if batched else 0
    if x.dim() > dim and x.shape[dim] == 0:
        raise ValueError(f"argument '{name}' is empty: it holds no samples (x has shape {tuple(x.shape)}); "
                         f"the {name} set needs at least one")


@dataclass(frozen=True)
class Linearisation:
    """The training loss linearised at one state: its grid ``row`` (None: unnamed), the leaf
    ``leaf`` and the gradient ``g`` with its graph (both None after a compiled HVP, which keeps
    no graph), and ``grad``, the gradient itself (detached)."""

    row: Optional[int]
    leaf: Optional[torch.Tensor]
    g: Optional[torch.Tensor]
    grad: torch.Tensor


class TaskFunctions:
    """Training-loss gradient, HVP and validation gradient of ``model`` on a task or a batch
    of tasks, as functions of a flat parameter state.

    Args:
        model: any ``nn.Module``; architecture and buffers are used, parameters come from ``u``.
        loss: ``loss(pred, target) -> scalar`` (mean over the task's samples).
        support, query: ``(x, y)``; with ``batched=True`` every tensor has a leading task
            dimension B.
        batched: whether states are ``[B, d]``.
        compile: use ``torch.compile``-d ``grad`` and forward-over-reverse ``hvp`` (faster for
            small models after a one-off compilation; falls back to eager with a warning);
            ``"auto"``: where it pays (:func:`compile_pays`).
    """

    def __init__(self, model: nn.Module, loss: LossFn, support, query, batched: bool = False,
                 compile=False):
        check_supported(model)
        self.model = model
        self.module = functional_module(model)
        hooked = backward_hooked(model)
        self.per_task: Optional[str] = (f"vmap and torch.func skip the backward hooks of {', '.join(hooked[:3])}"
                                        if hooked and batched else None)
        self.loss = loss
        self.support = support
        self.query = query
        self.batched = batched
        self.names = [name for name, _ in param_shapes(model)]
        self.buffers = constants(model, self.module)
        self._fp = None
        self._cast: Dict[torch.dtype, Dict[str, torch.Tensor]] = {}
        for name, data in (("support", support), ("query", query)):
            check_data(name, data, batched)
        self.dropout = _dropout_in_training(model)
        if self.dropout:
            dropout = self.dropout
            warnings.warn(f"amaml_ext: the model has dropout in training mode ({', '.join(dropout[:3])}): its "
                          "training loss, and so the gradient flow, the adjoint and every meta-gradient, change "
                          "at random with each evaluation (two identical calls can differ by 100%). Put the model "
                          "in eval mode (model.eval()) or fix the mask (a deterministic module).",
                          NondeterministicModelWarning, stacklevel=user_stacklevel())
        self.grad_evals = 0
        self.hvp_evals = 0
        self.linearisations = 0
        self.param_vjps = 0
        self.last: Optional[Linearisation] = None
        self.kept: Dict[int, Linearisation] = {}     # made by the forward for the adjoint, by row
        like = next(iter(support))
        compile = resolve_compile(compile, model, like.device)
        refusal = compile_refusal() if compile else None
        if compile and hooked:
            refusal = f"the model has backward hooks ({', '.join(hooked[:3])}), which torch.func skips"
        if refusal is not None:
            warnings.warn(f"amaml_ext: {refusal}; using the eager callbacks", RuntimeWarning, stacklevel=user_stacklevel())
            compile = False
        self._compiled = compiled_callbacks(model, loss, batched, self.fingerprint) if compile else None

    def _compiled_call(self, name: str, *args) -> Optional[torch.Tensor]:
        """Run a compiled callback; on a compilation failure warn once and return None (eager)."""
        c = self._compiled
        if c is None or c.failed is not None or self.per_task is not None:   # vmapped code: not for these tasks
            return None
        # Forward-mode AD under inductor rejects primals that are views at an offset (a row of
        # the trajectory buffer): "Expected the output of forward differentiable view operations
        # to have the tangent have the same layout as primal". A copy of one state is cheap.
        args = tuple(a.clone() if a._is_view() or not a.is_contiguous() else a for a in args)
        try:
            # dynamo does not guard on module hooks: a model changed in any way (hooks included)
            # has another fingerprint, so other callbacks, with a code object of their own
            with COMPILED_CALL_LOCK, second_order():
                return getattr(c, name)(*args, self.constants(args[0].dtype), *self.support)
        except LossValueError:
            raise
        except Exception as e:  # noqa: BLE001  (any compiler failure: fall back to eager)
            c.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"amaml_ext: torch.compile of the model callbacks failed ({c.failed[:300]}); "
                          "using the eager callbacks", RuntimeWarning, stacklevel=user_stacklevel())
            return None

    @property
    def fingerprint(self):
        """The model's :func:`~amaml_ext.functional.model_state.fingerprint` ``(key, keep)`` as it was when
        this call began (one walk of the model per call)."""
        if self._fp is None:
            self._fp = fingerprint(self.model)
        return self._fp

    def constants(self, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
        """The model's frozen parameters and buffers, floating ones in ``dtype`` (the state's)."""
        if dtype not in self._cast:
            self._cast[dtype] = cast_constants(self.buffers, dtype)
        return self._cast[dtype]

    def check_model(self, u: torch.Tensor, strict: bool = False, caller: str = "adjoint_meta_grad",
                    random_ok: bool = False) -> None:
        """The checks of a model that only an evaluation can make (:func:`model_checks.check_model`):
        a forward that cuts the graph, reads the user's own parameters past theta, changes its
        buffers in place, is random, or differs under vmap. Once per unchanged model."""
        check_model(self, u, strict, caller, random_ok)

    @property
    def compiled(self) -> bool:
        """Whether the compiled callbacks are in use."""
        return self._compiled is not None and self._compiled.failed is None and self.per_task is None

    # -- losses ---------------------------------------------------------------------------

    def _task_loss(self, flat_u: torch.Tensor, x: torch.Tensor, y: torch.Tensor, consts=None) -> torch.Tensor:
        params = unflatten_params(self.model, flat_u)
        consts = self.constants(flat_u.dtype) if consts is None else consts
        pred = torch.func.functional_call(self.module, (params, consts), (x,))
        return checked_loss(self.loss, pred, y)

    def losses(self, u: torch.Tensor, data) -> torch.Tensor:
        """Per-task loss: ``[]`` for one task, ``[B]`` for a batch."""
        return self._over_tasks(self._task_loss, u, *data)

    def predictions(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The model's output at ``u`` on inputs ``x`` (per task when batched)."""
        def one(w, xb):
            return torch.func.functional_call(self.module, (unflatten_params(self.model, w), self.constants(w.dtype)),
                                              (xb,))
        return self._over_tasks(one, u, x)

    def _over_tasks(self, fn, u: torch.Tensor, *data):
        """``fn(u, *data)`` for one task; batched, vmapped, or one task at a time for a model that
        vmap cannot run (found at the first failure, with a warning) or would get wrong."""
        if not self.batched:
            return fn(u, *data)
        if self.per_task is None:
            try:
                return torch.func.vmap(fn)(u, *data)
            except (LossValueError, ValueError, TypeError):
                raise
            except Exception as e:  # noqa: BLE001  (vmap cannot run this forward: try task by task)
                out = torch.stack([fn(u[b], *(t[b] for t in data)) for b in range(u.shape[0])])
                one_task_at_a_time(self, f"torch.func.vmap cannot run its forward ({type(e).__name__}: "
                                         f"{first_line(e)})")
                return out
        return torch.stack([fn(u[b], *(t[b] for t in data)) for b in range(u.shape[0])])

    # -- derivatives ------------------------------------------------------------------------

    def grad(self, u: torch.Tensor) -> torch.Tensor:
        """Gradient of the training loss at ``u`` (``[d]`` or ``[B, d]``)."""
        self.grad_evals += 1
        if self._compiled is not None:
            g = self._compiled_call("grad", u)
            if g is not None:
                return g
        with torch.enable_grad():
            leaf = u.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(differentiable(self.losses(leaf, self.support).sum(), "training"), leaf)
        return g

    def hvp(self, u: torch.Tensor, v: torch.Tensor, row: Optional[int] = None) -> torch.Tensor:
        """Hessian of the training loss at ``u`` times ``v``.

        ``row`` names the state (its grid row): two calls with the same row reuse one
        linearisation (gradient with graph) instead of rebuilding it; None builds it anew.
        """
        self.hvp_evals += 1
        if self._compiled is not None:
            out = self._compiled_call("hvp", u, v)
            if out is not None:
                self.linearisations += 1  # each forward-over-reverse HVP linearises anew
                self.last = Linearisation(row, None, None, out[0])
                return out[1]
        lin = self.linearise(u, row)
        (hv,) = torch.autograd.grad(lin.g, lin.leaf, v, retain_graph=True)
        return hv

    def linearise(self, u: torch.Tensor, row: Optional[int] = None) -> "Linearisation":
        """The training-loss gradient at ``u`` with its graph, kept for the next calls with the
        same ``row`` (a new row, or None, builds it anew; one the forward kept is taken over)."""
        last = self.last
        if row is None or last is None or last.row != row or last.g is None:
            kept = self.kept.pop(row, None) if row is not None else None
            self.last = last = kept if kept is not None else self._linearised(u.detach(), row)
        return last

    def _linearised(self, leaf: torch.Tensor, row: Optional[int]) -> "Linearisation":
        self.linearisations += 1
        with torch.enable_grad(), second_order():
            leaf = leaf.requires_grad_(True)
            total = differentiable(self.losses(leaf, self.support).sum(), "training")
            (g,) = torch.autograd.grad(total, leaf, create_graph=True)
        return Linearisation(row, leaf, g, g.detach())

    def keep_linearisation(self, u: torch.Tensor, row: int, measure: bool = False) -> Tuple[torch.Tensor, int]:
        """The training-loss gradient at ``u`` (grid row ``row``, a forward's state), its
        linearisation kept for the adjoint's HVPs there (:meth:`linearise` takes it over), and
        with ``measure`` the bytes its graph holds (the tensors it saved that are not the model's
        constants or the data, plus :data:`SAVED_TENSOR_OVERHEAD` for each saved tensor), else 0.
        ``u`` is copied: the solver reuses its workspace."""
        self.grad_evals += 1
        sizes: Dict[int, int] = {}
        packs = [0]
        known = {t.untyped_storage().data_ptr() for t in (*self.support, *self.constants(u.dtype).values())} \
            if measure else set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            packs[0] += 1
            if ptr not in known:
                sizes[ptr] = t.untyped_storage().nbytes()
            # not ``t``: a saved output returned as itself holds its own grad_fn, a reference cycle
            # no collector frees (the first kept graph of every call leaked); autograd restores the
            # unpacked tensor's grad_fn itself
            return t.detach()
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if measure else contextlib.nullcontext()
        with hooks:
            lin = self._linearised(u.detach().clone(), row)
        self.kept[row] = lin
        return lin.grad, (sum(sizes.values()) + packs[0] * SAVED_TENSOR_OVERHEAD) if measure else 0

    def drop_kept(self, row: int) -> None:
        self.kept.pop(row, None)

    def param_vjp(self, w: torch.Tensor, params: Sequence[torch.Tensor], row: int) -> Tuple[torch.Tensor, ...]:
        """``d (grad L(u) . w) / d params`` at the state linearised last, at grid row ``row``: the
        training loss's dependence on tensors of its closure (``adjoint_params``). One backward
        pass through the kept linearisation, like an HVP; zeros for a tensor it does not use."""
        last = self.last
        if row is None or last is None or last.row != row or last.g is None:
            raise RuntimeError(f"TaskFunctions.param_vjp: no linearisation kept for row {row!r}")
        self.param_vjps += 1
        grads = torch.autograd.grad(last.g, list(params), w, retain_graph=True, allow_unused=True)
        return tuple(torch.zeros_like(p) if d is None else d for p, d in zip(params, grads))

    def release(self) -> None:
        """Drop the kept linearisations (their graphs hold activations)."""
        self.last = None
        self.kept.clear()

    def grad_at(self, row: Optional[int]) -> Optional[torch.Tensor]:
        """The training-loss gradient at the state of the last HVP, if it was made at grid row
        ``row`` (a by-product of its linearisation), else None."""
        last = self.last
        if row is None or last is None or last.row != row:
            return None
        return last.grad

    def value_and_grad_val(self, u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Validation loss per task and its gradient at ``u``."""
        with torch.enable_grad():
            leaf = u.detach().requires_grad_(True)
            per_task = self.losses(leaf, self.query)
            (g,) = torch.autograd.grad(differentiable(per_task.sum(), "validation"), leaf)
        return per_task.detach(), g
