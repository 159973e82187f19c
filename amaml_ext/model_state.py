"""What a call reads of the user's model, and when: nothing about a model is kept between calls
that a change to it could make stale, and no call mutates anything another call uses.

* :func:`functional_module`: a private copy of the model's *structure* (modules, attributes,
  hooks; 0.2 ms for the paper's MLP, 0.7 ms for a 64-channel Conv4) made anew at every call (every :class:`~amaml_ext.functional.TaskFunctions`), sharing
  the model's tensors without copying them. ``torch.func.functional_call`` swaps parameters on
  the module it is given, in place; on a per-call copy, two threads calling on one model do not
  see each other's parameters, and a plain attribute changed (``net.temperature = 4``) or a
  submodule replaced (``net[1] = nn.Sigmoid()``) after a first call is seen by the next.
* :func:`constants`: the frozen parameters and buffers, read from the user's model at every call.
* :func:`fingerprint`: a hashable summary of everything of a model that defines its function
  apart from its tensors' values (module types, each module's own ``training`` flag, plain
  attributes, hooks, parameter and buffer shapes); the compiled callbacks, whose compilation
  takes seconds, are kept per fingerprint, so a changed model gets its own.
"""

import copy
import itertools
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Dict, Hashable, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils.parametrizations import _WeightNorm
from torch.nn.utils.weight_norm import WeightNorm

_NORM = nn.modules.batchnorm._NormBase      # BatchNorm*d, InstanceNorm*d, SyncBatchNorm


def _norm_except(v: torch.Tensor, dim: int) -> torch.Tensor:
    """``torch.norm_except_dim(v, 2, dim)`` in plain ops (whose double backward is right)."""
    if dim == -1 or v.dim() == 0:
        return v.norm()
    dims = [i for i in range(v.dim()) if i != dim % v.dim()]
    return v.norm(2, dim=dims, keepdim=True) if dims else v.abs()


class _PlainWeightNorm(_WeightNorm):
    """``parametrizations.weight_norm``'s parametrization in plain ops: torch's fused
    ``_weight_norm`` has a wrong double backward (``gradgradcheck`` fails on torch 2.14), which
    every second-order meta-gradient goes through."""

    def forward(self, weight_g, weight_v):
        return weight_v * (weight_g / _norm_except(weight_v, self.dim))


class _PlainWeightNormHook(WeightNorm):
    """The old-style ``torch.nn.utils.weight_norm`` hook in plain ops (see :class:`_PlainWeightNorm`)."""

    def compute_weight(self, module):
        g, v = getattr(module, self.name + "_g"), getattr(module, self.name + "_v")
        return v * (g / _norm_except(v, self.dim))


class _Unwrapped(nn.Module):
    """Stands in the private copy for a wrapper module that a functional call cannot take
    (``nn.DataParallel``; ``torch.compile``'s ``OptimizedModule``, whose compiled forward holds
    the user's module): calls the wrapped module, copied, eagerly under the same attribute
    name, so the parameter names are the user's."""

    def __init__(self, attr: str, inner: nn.Module):
        super().__init__()
        self._attr = attr
        self.add_module(attr, inner)

    def forward(self, *args, **kwargs):
        return getattr(self, self._attr)(*args, **kwargs)


def _wrapped(m: nn.Module) -> Optional[str]:
    """The attribute under which a wrapper module ``m`` holds the user's module, or None."""
    if isinstance(m, nn.DataParallel):
        return "module"
    optimized = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    if optimized is not None and isinstance(m, optimized.OptimizedModule):
        return "_orig_mod"
    return None


def functional_module(model: nn.Module) -> nn.Module:
    """A private copy of ``model`` safe for functional, vmapped evaluation, made anew per call.

    The copy shares every parameter and buffer tensor of ``model`` (no data is copied) and copies
    the rest: the module objects, their attributes and hooks, each module's own ``training``
    flag. A BatchNorm (or InstanceNorm) layer in training mode normalises with batch statistics
    and would update its running statistics in place, which neither vmap nor a side-effect-free
    gradient allows: in the copy such a layer keeps no running statistics, which leaves its
    training-mode output unchanged. Wrappers (``nn.DataParallel``, ``torch.compile``'s
    ``OptimizedModule``) are replaced by the module they wrap, run eagerly; weight norm (both
    APIs) is computed in plain ops, as torch's fused kernel has a wrong double backward. A BatchNorm layer in eval mode (``net[1].eval()`` inside a training ``net``
    included) uses its running statistics, read from ``model`` at every call. The user's module
    is never changed.
    """
    shared = {id(t): t for _, t in itertools.chain(model.named_parameters(remove_duplicate=False),
                                                   model.named_buffers(remove_duplicate=False))}
    try:
        clone = _copy_module(model, shared)
    except Exception as e:  # noqa: BLE001  (any object the copy cannot take)
        raise TypeError(f"argument 'model' ({type(model).__name__}) cannot be used: a functional call needs a "
                        f"structural copy of it (copy.deepcopy), which failed with {type(e).__name__}: {e}") from e
    for m in clone.modules():
        if type(m) is _WeightNorm:
            m.__class__ = _PlainWeightNorm
        for i, hook in m._forward_pre_hooks.items():
            if type(hook) is WeightNorm:
                m._forward_pre_hooks[i] = _PlainWeightNormHook(hook.name, hook.dim)
        if isinstance(m, _NORM) and m.training:
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
            m.track_running_stats = False
    return clone


_ATOMIC = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _copy_module(m: nn.Module, memo: Dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(m, memo)`` with ``memo`` mapping every tensor to itself, 3-4x faster for
    plain modules: the module's own dictionaries of parameters and buffers are new dicts holding
    the same tensors, its submodules are copied the same way (a shared one once), plain values
    are kept and anything else is deep-copied. Modules with their own ``__deepcopy__`` and
    scripted modules take ``copy.deepcopy``."""
    got = memo.get(id(m))
    if got is not None:
        return got
    attr = _wrapped(m)
    if attr is not None:
        memo[id(m)] = _Unwrapped(attr, _copy_module(getattr(m, attr), memo))
        return memo[id(m)]
    if hasattr(type(m), "__deepcopy__") or isinstance(m, torch.jit.ScriptModule):
        return copy.deepcopy(m, memo)
    new = type(m).__new__(type(m))
    memo[id(m)] = new
    fields = {}
    for k, v in m.__dict__.items():
        if k in ("_parameters", "_buffers"):
            fields[k] = type(v)(v)
        elif k == "_modules":
            fields[k] = type(v)((n, None if c is None else _copy_module(c, memo)) for n, c in v.items())
        elif isinstance(v, _ATOMIC) or isinstance(v, torch.Tensor):
            fields[k] = v           # a plain tensor attribute (old weight_norm's computed weight) is shared
        elif type(v) in (dict, OrderedDict) and not v:
            fields[k] = type(v)()
        else:
            fields[k] = copy.deepcopy(v, memo)
    object.__setattr__(new, "__dict__", fields)
    return new


def constants(model: nn.Module, module: nn.Module) -> Dict[str, torch.Tensor]:
    """The tensors a functional call of ``module`` (the private copy of ``model``) takes from the
    user's ``model`` as they are *now*: its frozen parameters and its buffers (those the copy
    keeps: training-mode BatchNorm layers keep no running statistics). Read at every call, so a
    buffer or frozen weight changed between calls is seen."""
    kept = {name for name, _ in module.named_buffers()}
    out = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    out.update({name: b for name, b in model.named_buffers() if name in kept})
    return out


def cast_constants(consts: Dict[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """``consts`` with every floating tensor in ``dtype`` (theta's): a float64 theta on a float32
    model computes in float64 throughout, BatchNorm's running statistics and frozen weights
    included, as the trainable parameters (taken from theta) do. Integer buffers are kept."""
    return {k: v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v for k, v in consts.items()}


_PLAIN = _ATOMIC
_SKIP = ("_parameters", "_buffers", "_modules", "training")


def _freeze(v: Any, keep: List[Any], depth: int = 0) -> Hashable:
    """A hashable stand-in for an attribute value that is equal only if the value is the same:
    plain values by value, containers element by element, tensors by identity and version (an
    in-place change is a new version), functions and other objects by identity, or by their
    fields where they have some. Objects compared by identity go into ``keep``, which the cache
    holds with the key, so an identity is not reused by another object while it is cached."""
    if isinstance(v, _PLAIN):
        return (type(v), repr(v)) if isinstance(v, float) else v     # repr: nan == nan
    if isinstance(v, (tuple, list)) and depth <= 4:
        return (type(v), tuple(_freeze(x, keep, depth + 1) for x in v))
    if isinstance(v, dict) and depth <= 4:
        return (type(v), tuple((_freeze(k, keep, depth + 1), _freeze(x, keep, depth + 1)) for k, x in v.items()))
    keep.append(v)
    if isinstance(v, torch.Tensor):
        return ("tensor", id(v), v._version)
    fields = getattr(v, "__dict__", None)
    if isinstance(fields, dict) and depth <= 4 and not callable(v) and not isinstance(v, nn.Module):
        return ("fields", id(v), _freeze(fields, keep, depth + 1))
    return ("object", id(v))


def fingerprint(model: nn.Module) -> Tuple[Hashable, List[Any]]:
    """Everything of ``model`` that defines its function apart from its tensors' values, as a
    hashable key: for each module (in ``named_modules`` order, a shared one at each place) its
    name, type, own training flag, plain attributes and hooks, and the names, shapes, dtypes
    and ``requires_grad`` of its parameters and buffers. Returns ``(key, keep)``: ``keep`` holds
    the objects the key names by identity and must be kept as long as the key is."""
    keep: List[Any] = []
    out = []
    for name, m in model.named_modules(remove_duplicate=False):
        attrs = tuple((k, _freeze(v, keep)) for k, v in m.__dict__.items() if k not in _SKIP)
        params = tuple((k, None if p is None else (tuple(p.shape), p.dtype, p.requires_grad))
                       for k, p in m._parameters.items())
        bufs = tuple((k, None if b is None else (tuple(b.shape), b.dtype)) for k, b in m._buffers.items())
        keep.append(type(m))
        out.append((name, id(type(m)), m.training, attrs, params, bufs))
    return tuple(out), keep


class NondeterministicModelWarning(RuntimeWarning):
    """The model's training loss changes between two evaluations at the same parameters
    (dropout in training mode, random noise in the forward): the gradient flow, its adjoint and
    every A-MAML meta-gradient are then undefined."""


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
        if getattr(m, "sparse", False) is True and isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            raise ValueError(f"argument 'model' has {name or type(m).__name__} ({type(m).__name__}) with "
                             "sparse=True: its sparse gradients have no second derivative; use sparse=False")


def backward_hooked(model: nn.Module) -> List[str]:
    """Names of the submodules with backward hooks, which ``torch.func`` (vmap, grad) skips."""
    return [name or type(model).__name__ for name, m in model.named_modules()
            if m._backward_hooks or m._backward_pre_hooks]


_CHECKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def check_model(fns, u: torch.Tensor, strict: bool, caller: str) -> None:
    """What only evaluating the model can show, checked on one task at ``u`` (two evaluations,
    with copies of the buffers so the user's are not touched), once per unchanged model (its
    :func:`fingerprint`):

    * the forward reads the user's own trainable parameters other than through the module tree
      (a hook or closure that holds the model: ``net[0].weight`` in a forward hook), where theta
      never reaches them: ValueError, naming them;
    * the forward changes buffers in place (a counter, ``spectral_norm``'s power iteration in
      training mode): this call and every later one work on copies of them, so the user's model
      is never changed; :class:`NondeterministicModelWarning` (ValueError with ``strict``);
    * the forward is random (:func:`check_same_loss`), unless dropout modules were named already.

    ``fns`` is the call's :class:`~amaml_ext.functional.TaskFunctions`."""
    key, keep = fingerprint(fns.model)
    cached = _CHECKED.get(fns.model)
    if cached is not None and cached[0] == key:
        _mutated_buffers(fns, cached[1], strict, caller)
        return
    x, y = fns.support
    if fns.batched:                 # one task is enough to see any of these, and cheaper
        u, x, y = u[0], x[0], y[0]
    copies = {k: v.clone() for k, v in cast_constants(fns.buffers, u.dtype).items()}
    versions = {k: v._version for k, v in copies.items()}
    trainable = [(n, p) for n, p in fns.model.named_parameters() if p.requires_grad]
    with torch.enable_grad():
        a = fns._task_loss(u.detach(), x, y, copies)
        b = fns._task_loss(u.detach(), x, y, copies)
    if a.requires_grad and trainable:
        grads = torch.autograd.grad(a, [p for _, p in trainable], allow_unused=True)
        used = [n for (n, _), g in zip(trainable, grads) if g is not None]
        if used:
            raise ValueError(f"{caller}: the model's forward reads its own trainable parameters "
                             f"{', '.join(used[:3])}{', ...' if len(used) > 3 else ''} other than through its "
                             "modules (a hook or closure that holds the model, e.g. net[0].weight in a forward "
                             "hook): theta, which replaces the parameters module by module, never reaches them, so "
                             "the gradients would be wrong. Read parameters through the module the code runs in "
                             "(a hook's `module` argument).")
    mutated = sorted(k for k, v in copies.items() if v._version != versions[k])
    _mutated_buffers(fns, mutated, strict, caller)
    if mutated or fns.dropout or check_same_loss(a.detach(), b.detach(), False, strict, caller):
        _CHECKED[fns.model] = (key, mutated, keep)      # a random forward is checked (and warned of) again


def _mutated_buffers(fns, names: List[str], strict: bool, caller: str) -> None:
    """The forward changes the buffers ``names`` in place: warn (raise with ``strict``) and let
    ``fns`` work on copies of them."""
    if not names:
        return
    msg = (f"{caller}: the model's forward changes its buffer(s) {', '.join(names[:3])} in place (a counter, "
           "spectral_norm's power iteration in training mode, ...): the function being trained changes at every "
           "evaluation, so the flow and its adjoint are not those of one function. Every call works on copies of "
           "them (the model's own are never changed); put such modules in eval mode.")
    if strict:
        raise ValueError(msg)
    warnings.warn(msg, NondeterministicModelWarning, stacklevel=6)
    fns.buffers = {k: v.clone() if k in names else v for k, v in fns.buffers.items()}
    fns._cast = {}


def check_same_loss(a: torch.Tensor, b: torch.Tensor, batched: bool, strict: bool, caller: str) -> bool:
    """Two evaluations ``a``, ``b`` of the training loss at the same point (per task) must agree
    to a relative 1e-4 (nondeterministic GPU reductions pass, random forwards do not); else warn
    (:class:`NondeterministicModelWarning`) or, with ``strict``, raise ValueError. Returns
    whether they agree."""
    diff = (a - b).abs()
    scale = torch.maximum(a.abs(), b.abs())
    tiny = torch.finfo(a.dtype).tiny
    bad = ~(diff <= 1e-4 * scale + tiny)
    if not bool(bad.any()):
        return True
    i = int(bad.reshape(-1).nonzero()[0])
    rel = float(diff.reshape(-1)[i] / scale.reshape(-1)[i].clamp_min(tiny))
    msg = (f"{caller}: the model's training loss is not deterministic: two evaluations at the same "
           f"parameters gave {a.reshape(-1)[i].item():.6g} and {b.reshape(-1)[i].item():.6g} (relative "
           f"difference {rel:.2g}{f', task {i}' if batched else ''}). Randomness in the forward "
           "(F.dropout(x, p, self.training), torch.rand, noise layers) makes the gradient flow and its "
           "adjoint undefined, and the meta-gradient meaningless. Make the forward deterministic "
           "(model.eval(), a fixed mask, or noise drawn outside the model).")
    if strict:
        raise ValueError(msg)
    warnings.warn(msg, NondeterministicModelWarning, stacklevel=5)
    return False
