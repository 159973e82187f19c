"""What a call reads of the user's model, and when: nothing about a model is kept between calls
that a change to it could make stale, and no call mutates anything another call uses.

* :func:`functional_module`: a private copy of the model's *structure* (modules, attributes,
  hooks; 0.16 ms for the paper's MLP, 0.65 ms for a 64-channel Conv4: benchmarks/call_overhead.py)
  made anew at every call (every :class:`~amaml_ext.functional.TaskFunctions`), sharing
  the model's tensors without copying them. ``torch.func.functional_call`` swaps parameters on
  the module it is given, in place; on a per-call copy, two threads calling on one model do not
  see each other's parameters, and a plain attribute changed (``net.temperature = 4``) or a
  submodule replaced (``net[1] = nn.Sigmoid()``) after a first call is seen by the next.
* :func:`constants`: the frozen parameters and buffers, read from the user's model at every call.
* :func:`fingerprint`: a hashable summary of everything of a model that defines its function
  apart from its tensors' values (module types and their methods, each module's own
  ``training`` flag, plain attributes, hooks, parameter and buffer shapes); the compiled
  callbacks, whose compilation takes seconds, and the verdicts of :mod:`amaml_ext.functional.model_checks`
  are kept per fingerprint, so a changed model gets its own.
"""

import copy
import functools
import itertools
import math
import types
from collections import OrderedDict
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils.parametrizations import _WeightNorm
from torch.nn.utils.weight_norm import WeightNorm

from ..ops.batch_norm import batch_norm_train

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


def param_shapes(model: nn.Module) -> Sequence[Tuple[str, torch.Size]]:
    """(name, shape) of every trainable parameter (``requires_grad=True``), in
    ``model.named_parameters()`` order: what theta covers. Frozen parameters are used as they
    are and never adapted or meta-trained."""
    return [(name, p.shape) for name, p in model.named_parameters() if p.requires_grad]


def param_count(shapes: Sequence[Tuple[str, torch.Size]]) -> int:
    """d, the number of entries of theta, from :func:`param_shapes` (the one place it is summed)."""
    return sum(math.prod(s) for _, s in shapes)


def _unflatten_shapes(shapes: Sequence[Tuple[str, torch.Size]], flat: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Views of ``flat`` (``[..., d]``) shaped like ``shapes``, unchecked (also inside torch.compile)."""
    out, i = {}, 0
    batch = flat.shape[:-1]
    for name, shape in shapes:
        n = math.prod(shape)
        out[name] = flat[..., i:i + n].reshape(*batch, *shape)
        i += n
    return out


class _FusedBatchNorm1d(nn.BatchNorm1d):
    """A training-mode BatchNorm of the copy (batch statistics, no running ones) whose double
    backward is the fused op (:mod:`amaml_ext.ops.batch_norm`): the same output and first
    derivatives as aten's, second derivatives to rounding, 10x faster alone and 1.3-1.7x per HVP
    of a Conv4 (docs/benchmarks.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        return batch_norm_train(x, self.weight, self.bias, self.eps)


class _FusedBatchNorm2d(nn.BatchNorm2d):
    forward = _FusedBatchNorm1d.forward


class _FusedBatchNorm3d(nn.BatchNorm3d):
    forward = _FusedBatchNorm1d.forward


_FUSED_BN = {nn.BatchNorm1d: _FusedBatchNorm1d, nn.BatchNorm2d: _FusedBatchNorm2d, nn.BatchNorm3d: _FusedBatchNorm3d}
"""The exact BatchNorm types (a subclass may change the forward: it keeps aten's) and their fused
training-mode stand-ins."""


def functional_module(model: nn.Module, fused_batch_norm: bool = True) -> nn.Module:
    """A private copy of ``model`` safe for functional, vmapped evaluation, made anew per call.

    The copy shares every parameter and buffer tensor of ``model`` (no data is copied) and copies
    the rest: the module objects, their attributes and hooks, each module's own ``training``
    flag. A BatchNorm (or InstanceNorm) layer in training mode normalises with batch statistics
    and would update its running statistics in place, which neither vmap nor a side-effect-free
    gradient allows: in the copy such a layer keeps no running statistics, which leaves its
    training-mode output unchanged. Wrappers (``nn.DataParallel``, ``torch.compile``'s
    ``OptimizedModule``) are replaced by the module they wrap, run eagerly; weight norm (both
    APIs) is computed in plain ops, as torch's fused kernel has a wrong double backward. A BatchNorm layer in eval mode (``net[1].eval()`` inside a training ``net``
    included) uses its running statistics, read from ``model`` at every call. With
    ``fused_batch_norm`` a training-mode ``BatchNorm1d/2d/3d`` (that exact type) takes the fused
    double backward (not for the compiled callbacks: their HVP is forward-mode). The user's module
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
            if fused_batch_norm and type(m) in _FUSED_BN:
                m.__class__ = _FUSED_BN[type(m)]
    return clone


_ATOMIC = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _copy_module(m: nn.Module, memo: Dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(m, memo)`` with ``memo`` mapping every tensor to itself, 1.7-1.8x faster for
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
    # its dicts of parameters, buffers and submodules are new dicts: the same tensors, copied modules
    fields = {k: v if isinstance(v, _SHARED) else _copy_value(v, memo) for k, v in m.__dict__.items()}
    object.__setattr__(new, "__dict__", fields)
    return new


_SHARED = _ATOMIC + (torch.Tensor,)


def _copy_value(v: Any, memo: Dict[int, Any], depth: int = 0) -> Any:
    """An attribute value for the copy: tensors shared (a non-leaf one, e.g. activations kept in
    a dict, cannot be deep-copied), containers copied element by element, modules structurally,
    anything else deep-copied."""
    if isinstance(v, _SHARED):
        return v
    if isinstance(v, nn.Module):
        return _copy_module(v, memo)
    if depth <= 4 and type(v) in (list, tuple, dict, OrderedDict):
        if not v:                # most of a module's dicts (its hooks) are empty
            return type(v)()
        if isinstance(v, (list, tuple)):
            return type(v)([x if isinstance(x, _SHARED) else _copy_value(x, memo, depth + 1) for x in v])
        return type(v)([(k, x if isinstance(x, _SHARED) else _copy_value(x, memo, depth + 1)) for k, x in v.items()])
    return copy.deepcopy(v, memo)


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
_ROUTINES = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial)
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
    if isinstance(v, (set, frozenset)) and depth <= 4:
        return (type(v), tuple(sorted((_freeze(x, keep, depth + 1) for x in v), key=repr)))
    if isinstance(v, dict) and depth <= 4:
        return (type(v), tuple((_freeze(k, keep, depth + 1), _freeze(x, keep, depth + 1)) for k, x in v.items()))
    keep.append(v)
    if isinstance(v, nn.Parameter):       # a parameter's values come from theta or are read per call
        return ("parameter", id(v))
    if isinstance(v, torch.Tensor):
        return ("tensor", id(v), v._version)
    fields = getattr(v, "__dict__", None)
    if isinstance(fields, dict) and depth <= 4 and not isinstance(v, (nn.Module, type, *_ROUTINES)):
        return ("fields", id(v), _freeze(fields, keep, depth + 1))     # a callable object's fields too
    return ("object", id(v))


def _methods(cls: type, keep: List[Any]) -> Tuple[int, ...]:
    """The identities of the functions defined by ``cls`` and its bases below ``nn.Module``: a
    method patched on the class (``Act.forward = ...``) changes the fingerprint."""
    out = []
    for c in cls.__mro__:
        if c is nn.Module or c is object:
            break
        fns = [v for v in vars(c).values() if callable(v)]
        keep.extend(fns)
        out.extend(id(v) for v in fns)
    return tuple(out)


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
        out.append((name, id(type(m)), _methods(type(m), keep), m.training, attrs, params, bufs))
    return tuple(out), keep
