"""The checks of a user's model that only looking at it, or evaluating it, can make: what a
functional call cannot take (:func:`check_supported`), and, once per unchanged model (its
:func:`~amaml_ext.functional.model_state.fingerprint`), a forward that reads the user's own parameters
past theta, changes its buffers in place, is random, cuts the graph, or computes another
gradient under ``torch.func.vmap`` than under plain autograd (:func:`check_model`)."""

import warnings
import weakref
from typing import Callable, List

import torch
from torch import nn

from .._checks import user_stacklevel
from .model_state import cast_constants

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class LossValueError(ValueError):
    """The loss function returned something other than a floating-point scalar tensor."""


def checked_loss(loss: LossFn, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``loss(pred, y)``, checked to be a floating-point scalar tensor (one task's mean loss)."""
    out = loss(pred, y)
    if not isinstance(out, torch.Tensor):
        raise LossValueError(f"argument 'loss' must return a scalar torch.Tensor, got {type(out).__name__} "
                             "(a Python number has no gradient)")
    if not out.is_floating_point():
        raise LossValueError(f"argument 'loss' must return a floating-point scalar tensor, got dtype {out.dtype}")
    if out.dim() != 0:
        raise LossValueError(f"argument 'loss' must return a scalar (one task's mean loss), got a tensor of shape "
                             f"{tuple(out.shape)}; with reduction='none' reduce it first (e.g. reduction='mean')")
    return out


class NondeterministicModelWarning(RuntimeWarning):
    """The model's training loss changes between two evaluations at the same parameters
    (dropout in training mode, random noise in the forward): the gradient flow, its adjoint and
    every A-MAML meta-gradient are then undefined. Also issued when the forward changes buffers
    in place (then every call works on copies of them). Turned into a ValueError where a caller
    is strict.

    Example:
        >>> import torch, warnings
        >>> import amaml_ext
        >>> class Noisy(torch.nn.Linear):
        ...     def forward(self, x):
        ...         return super().forward(x) + 0.1 * torch.randn(x.shape[0], 1)
        >>> net, x = Noisy(1, 1), torch.randn(8, 1)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = amaml_ext.adjoint_meta_grad(net, torch.nn.functional.mse_loss, amaml_ext.flatten_params(net),
        ...                                     0.1, support=(x, x), query=(x, x), h=0.05, solver="euler",
        ...                                     adjoint="discrete")
        >>> [w.category.__name__ for w in caught]
        ['NondeterministicModelWarning']
    """


def differentiable(total: torch.Tensor, what: str) -> torch.Tensor:
    """``total`` (a loss of the flat state), checked to depend on it: else the loss or the
    model's forward cut the graph, and autograd's own message would not say so."""
    if not total.requires_grad:
        raise ValueError(f"the {what} loss does not depend on the model's parameters: argument 'loss' or the "
                         "model's forward cuts the graph (.detach(), torch.no_grad(), .item(), .numpy(), "
                         "an integer result such as argmax), so it has no gradient to train or meta-train with")
    return total


def check_supported(model: nn.Module) -> None:
    """Refuse what a functional call of ``model`` cannot take, naming it: trainable complex
    parameters (theta is real), sparse gradients (``nn.Embedding(sparse=True)``), tensors on the
    ``meta`` device (no values)."""
    for name, p in model.named_parameters():
        if p.is_complex() and p.requires_grad:
            raise TypeError(f"argument 'model' has a complex trainable parameter {name!r} ({p.dtype}): theta, "
                            "the flow and its adjoint are real; split it into real and imaginary parts")
        if p.device.type == "meta":
            raise ValueError(f"argument 'model' has parameter {name!r} on the 'meta' device, which holds no "
                             "values: move the model to 'cpu' or 'cuda' (model.to_empty(device=...) and load "
                             "the weights)")
    for name, m in model.named_modules():
        if (getattr(m, "sparse", False) is True and isinstance(m, (nn.Embedding, nn.EmbeddingBag))
                and m.weight.requires_grad):
            raise ValueError(f"argument 'model' has {name or type(m).__name__} ({type(m).__name__}) with "
                             "sparse=True: its sparse gradients have no second derivative; use sparse=False")


def backward_hooked(model: nn.Module) -> List[str]:
    """Names of the submodules with backward hooks, which ``torch.func`` (vmap, grad) skips."""
    return [name or type(model).__name__ for name, m in model.named_modules()
            if m._backward_hooks or m._backward_pre_hooks]


_CHECKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def check_model(fns, u: torch.Tensor, strict: bool, caller: str, random_ok: bool = False) -> None:
    """What only evaluating the model can show, checked on one task at ``u`` (with copies of the
    buffers, so the user's are not touched), once per unchanged model:

    * the training loss does not depend on theta (the loss or the forward cuts the graph):
      ValueError (before any compiled call, which a graph-less loss can crash);
    * the forward reads the user's own trainable parameters other than through the module tree
      (a hook or closure that holds the model: ``net[0].weight`` in a forward hook), where theta
      never reaches them: ValueError, naming them;
    * the forward changes buffers in place (a counter, ``spectral_norm``'s power iteration in
      training mode): this call and every later one work on copies of them, so the user's model
      is never changed; :class:`NondeterministicModelWarning` (ValueError with ``strict``);
    * the forward is random (:func:`check_same_loss`; not with ``random_ok``: unrolled MAML's
      gradient of a random forward is a valid stochastic estimate), unless dropout was named;
    * batched: the gradient of task 0 under ``torch.func.vmap`` differs from plain autograd's (a
      tensor hook registered inside the forward, which vmap skips): the tasks are evaluated one
      at a time from then on, with a RuntimeWarning.

    ``fns`` is the call's :class:`~amaml_ext.functional.TaskFunctions`."""
    key, keep = fns.fingerprint
    key = (key, fns.batched, fns.loss, random_ok, fns._compiled is not None)
    cached = _CHECKED.get(fns.model)
    if cached is not None and cached.key == key and cached.alive():
        _mutated_buffers(fns, cached.mutated, strict, caller, cached.changes)
        _apply(fns, cached.per_task, cached.compile_ok)
        return
    x, y = fns.support
    u_all = u
    if fns.batched:                 # one task is enough to see any of these, and cheaper
        u, x, y = u[0], x[0], y[0]
    copies = {k: v.clone() for k, v in cast_constants(fns.buffers, u.dtype).items()}
    versions = {k: v._version for k, v in copies.items()}
    trainable = [(n, p) for n, p in fns.model.named_parameters() if p.requires_grad]
    with torch.enable_grad():
        leaf = u.detach().requires_grad_(True)
        a = fns._task_loss(leaf, x, y, copies)
        b = fns._task_loss(u.detach().requires_grad_(True), x, y, copies).detach()   # the same code path as a
        grads = torch.autograd.grad(a, [leaf] + [p for _, p in trainable], allow_unused=True) if a.requires_grad else [None]
    if grads[0] is None:
        differentiable(a.detach(), "training")
    used = [n for (n, _), g in zip(trainable, grads[1:]) if g is not None]
    if used:
        raise ValueError(f"{caller}: the model's forward (or argument 'loss') reads the model's own trainable "
                         f"parameters {', '.join(used[:3])}{', ...' if len(used) > 3 else ''} other than through "
                         "its modules (a hook or closure that holds the model, e.g. net[0].weight in a forward hook): "
                         "theta, which replaces the parameters module by module, never reaches them, so the gradients "
                         "would be wrong. Read parameters through the module the code runs in (a hook's `module` "
                         "argument).")
    mutated = sorted(k for k, v in copies.items() if v._version != versions[k])
    changes = bool(mutated) and bool(_differ(a.detach(), b).any())          # the buffers change the function itself
    _mutated_buffers(fns, mutated, strict, caller, changes)
    if not (changes or fns.dropout or random_ok or check_same_loss(a.detach(), b, False, strict, caller)):
        return                      # a random forward is checked (and warned of) again
    if fns.batched and not mutated and fns.per_task is None:
        _vmap_agrees(fns, leaf, x, y, copies, grads[0])
    compile_ok = _compiled_agrees(fns, u_all, (x, y), copies, grads[0], caller) if fns._compiled is not None else True
    _CHECKED[fns.model] = _Verdict(key, keep, mutated, changes, fns.per_task, compile_ok)


class _Verdict:
    """What :func:`check_model` found for a model as it was (its fingerprint ``key``). The
    objects the key names by identity are held by weak reference where they allow it (a strong
    one would keep a model alive whose hooks close over it): a verdict whose objects died is
    stale (their identities may have been reused)."""

    def __init__(self, key, keep, mutated, changes, per_task, compile_ok):
        self.key, self.mutated, self.changes, self.per_task, self.compile_ok = key, mutated, changes, per_task, compile_ok
        self.refs, self.strong = [], []
        for obj in keep:
            try:
                self.refs.append(weakref.ref(obj))
            except TypeError:
                self.strong.append(obj)

    def alive(self) -> bool:
        return all(r() is not None for r in self.refs)


def _apply(fns, per_task, compile_ok) -> None:
    fns.per_task = fns.per_task or per_task
    if not compile_ok:
        fns._compiled = None


def _differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Where two evaluations of a loss differ by more than a relative 1e-4 (nondeterministic GPU
    reductions pass, random forwards do not)."""
    return ~((a - b).abs() <= 1e-4 * torch.maximum(a.abs(), b.abs()) + torch.finfo(a.dtype).tiny)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two gradients (or HVPs) agree: to 1e-8 in float64, 1e-3 in float32 (vmap's and compiled
    kernels may sum in another order); a non-finite reference counts as agreeing."""
    tol = 1e-8 if b.dtype == torch.float64 else 1e-3
    return not bool(torch.isfinite(b).all()) or float((a - b).norm()) <= tol * float(b.norm())


def one_task_at_a_time(fns, reason: str) -> None:
    """Evaluate ``fns``'s tasks one at a time from now on, saying why (a RuntimeWarning)."""
    fns.per_task = reason
    warnings.warn(f"amaml_ext: the model's tasks are evaluated one at a time (slower): {reason}", RuntimeWarning,
                  stacklevel=user_stacklevel())


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _refuse_or_warn(msg: str, strict: bool) -> None:
    if strict:
        raise ValueError(msg)
    warnings.warn(msg, NondeterministicModelWarning, stacklevel=user_stacklevel())


def _compiled_agrees(fns, u: torch.Tensor, task, copies, g_plain: torch.Tensor, caller: str) -> bool:
    """The compiled gradient and HVP against plain autograd's at ``u`` (task 0, ``task`` = its
    ``(x, y)``): where they differ (a tensor hook in the forward, which torch.func skips) the
    eager callbacks are used."""
    from torch.nn.attention import SDPBackend, sdpa_kernel   # attention's math kernel: differentiable twice
    v = g_plain.detach()
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        w = u[0].detach().requires_grad_(True) if fns.batched else u.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(fns._task_loss(w, *task, copies), w, create_graph=True)
        (hv_plain,) = torch.autograd.grad(g, w, v)
    out = fns._compiled_call("hvp", u.detach(), torch.stack([v] + [torch.zeros_like(v)] * (u.shape[0] - 1))
                             if fns.batched else v)
    if out is None or fns._compiled is None:
        return fns._compiled is not None
    g_c, hv_c = (out[0][0], out[1][0]) if fns.batched else out
    if _close(g_c, g_plain) and _close(hv_c, hv_plain):
        return True
    fns._compiled = None
    warnings.warn(f"amaml_ext: {caller}: the compiled callbacks compute another gradient or HVP than plain autograd "
                  "(a tensor hook inside the forward?); using the eager ones", RuntimeWarning, stacklevel=user_stacklevel())
    return False


def _vmap_agrees(fns, leaf: torch.Tensor, x, y, copies, g_plain: torch.Tensor) -> None:
    """Task 0's gradient under vmap against plain autograd's ``g_plain``: where they differ (a
    tensor hook inside the forward), or vmap cannot differentiate the forward, the tasks are
    evaluated one at a time."""
    try:
        with torch.enable_grad():
            w = leaf.detach()[None].requires_grad_(True)
            (g,) = torch.autograd.grad(torch.func.vmap(lambda *a: fns._task_loss(*a, copies))(w, x[None], y[None]).sum(), w)
    except Exception as e:  # noqa: BLE001  (vmap cannot run it, e.g. a transformer's fused eval path)
        one_task_at_a_time(fns, f"torch.func.vmap cannot differentiate its forward ({type(e).__name__}: "
                                f"{first_line(e)})")
        return
    if not _close(g[0], g_plain):
        one_task_at_a_time(fns, "torch.func.vmap computes another gradient than plain autograd (a tensor hook inside "
                                "the forward?)")


def _mutated_buffers(fns, names: List[str], strict: bool, caller: str, changes: bool = True) -> None:
    """The forward changes the buffers ``names`` in place: ``fns`` works on copies of them (the
    user's are never changed); where that changes the function (``changes``: two evaluations at
    one point differ), warn (raise with ``strict``)."""
    if not names:
        return
    fns.buffers = {k: v.clone() if k in names else v for k, v in fns.buffers.items()}
    fns._cast = {}
    if not changes:
        return
    msg = (f"{caller}: the model's forward changes its buffer(s) {', '.join(names[:3])} in place (a counter, "
           "spectral_norm's power iteration in training mode, ...): the function being trained changes at every "
           "evaluation, so the flow and its adjoint are not those of one function. Every call works on copies of "
           "them (the model's own are never changed); put such modules in eval mode.")
    _refuse_or_warn(msg, strict)


def check_same_loss(a: torch.Tensor, b: torch.Tensor, batched: bool, strict: bool, caller: str) -> bool:
    """Two evaluations ``a``, ``b`` of the training loss at the same point (per task) must agree
    to a relative 1e-4 (nondeterministic GPU reductions pass, random forwards do not); else warn
    (:class:`NondeterministicModelWarning`) or, with ``strict``, raise ValueError. Returns
    whether they agree."""
    bad = _differ(a, b)
    if not bool(bad.any()):
        return True
    i = int(bad.reshape(-1).nonzero()[0])
    x, y = a.reshape(-1)[i], b.reshape(-1)[i]
    rel = float((x - y).abs() / torch.maximum(x.abs(), y.abs()).clamp_min(torch.finfo(a.dtype).tiny))
    msg = (f"{caller}: the model's training loss is not deterministic: two evaluations at the same "
           f"parameters gave {a.reshape(-1)[i].item():.6g} and {b.reshape(-1)[i].item():.6g} (relative "
           f"difference {rel:.2g}{f', task {i}' if batched else ''}). Randomness in the forward "
           "(F.dropout(x, p, self.training), torch.rand, noise layers) makes the gradient flow and its "
           "adjoint undefined, and the meta-gradient meaningless. Make the forward deterministic "
           "(model.eval(), a fixed mask, or noise drawn outside the model).")
    _refuse_or_warn(msg, strict)
    return False
