"""The ``torch.compile``-d model callbacks (``compile=True``): ``torch.func.grad`` of the summed
training loss and forward-over-reverse ``jvp(grad)`` for the HVP, kept per model as it is (its
:func:`~amaml_ext.functional.model_state.fingerprint`), loss and batching; when they are used is
:mod:`amaml_ext.functional.compile_policy`'s."""

import itertools
import threading
import types
import warnings
import weakref
from typing import Dict, Optional

import torch
from torch import nn

from .model_checks import LossFn, checked_loss
from .model_state import _unflatten_shapes, fingerprint, functional_module, param_shapes


def _own_code(fn, name: str):
    """``fn`` with a code object of its own: dynamo keeps compiled code, and counts recompilations
    against its limit of 8, per code object, so with the code shared by every model the ninth
    model of a process silently ran eagerly (13x slower per HVP for the paper's MLP)."""
    return types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name, fn.__defaults__, fn.__closure__)


_COMPILED_COUNT = itertools.count()


_JVP_DECOMPOSITIONS = threading.Lock()


def _load_jvp_decompositions() -> None:
    """torch registers its forward-mode decompositions when forward-mode AD is first used (the
    compiled HVP's ``jvp``), scripting each with ``torch.jit.script``, which warns that it is
    deprecated: a FutureWarning about torch's own code in every run that compiles. Load them
    once per process here with that one warning silenced (anything else still warns)."""
    import sys
    with _JVP_DECOMPOSITIONS:
        if "torch._decomp.decompositions_for_jvp" in sys.modules:
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
            import torch._decomp.decompositions_for_jvp  # noqa: F401


class CompiledCallbacks:
    """``torch.compile``-d gradient and HVP of the summed training loss for one (model as it is
    now, loss, batched) combination; the task data and the model's constants are arguments, so
    new tasks of the same shapes reuse the compiled code. They run on a private copy of the
    model made for them, which nothing mutates. Compiled calls are serialised by one lock (a
    compilation, and the dynamo setting it runs under, are process-wide)."""

    def __init__(self, model: nn.Module, loss: LossFn, batched: bool, keep):
        _load_jvp_decompositions()
        shapes = list(param_shapes(model))
        module = functional_module(model, fused_batch_norm=False)   # their HVP is forward-mode
        self.keep = keep        # the objects the cache key names by identity (model_state.fingerprint)

        # the constants (buffers, frozen parameters) are arguments: read from the model per call
        def task_loss(flat_u, consts, x, y):
            params = _unflatten_shapes(shapes, flat_u)
            return checked_loss(loss, torch.func.functional_call(module, (params, consts), (x,)), y)

        def loss_sum(u, consts, x, y):
            if batched:
                return torch.func.vmap(task_loss, in_dims=(0, None, 0, 0))(u, consts, x, y).sum()
            return task_loss(u, consts, x, y).sum()

        grad = torch.func.grad(loss_sum)

        def grad_entry(u, consts, x, y):
            return grad(u, consts, x, y)

        def hvp(u, v, consts, x, y):  # (gradient, HVP): the primal of the jvp is the gradient at u
            return torch.func.jvp(lambda w: grad(w, consts, x, y), (u,), (v,))

        n = next(_COMPILED_COUNT)
        self.grad = torch.compile(_own_code(grad_entry, f"amaml_grad_{n}"), dynamic=False)
        self.hvp = torch.compile(_own_code(hvp, f"amaml_hvp_{n}"), dynamic=False)
        self.failed: Optional[str] = None


_COMPILED: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, CompiledCallbacks]]" = weakref.WeakKeyDictionary()
_COMPILED_LOCK = threading.Lock()
COMPILED_CALL_LOCK = threading.Lock()
"""Held around every compiled call: one compilation at a time, whatever the thread."""
_COMPILED_PER_MODEL = 4      # versions of one model kept compiled (a changed model compiles anew)


def compiled_callbacks(model: nn.Module, loss: LossFn, batched: bool, fp=None) -> CompiledCallbacks:
    """The compiled callbacks of ``model`` as it is now (its :func:`fingerprint`), ``loss`` and
    ``batched``: reused while none of them changes, compiled anew when one does."""
    key, keep = fingerprint(model) if fp is None else fp
    key = (key, loss, batched)
    with _COMPILED_LOCK:
        per_model = _COMPILED.setdefault(model, {})
        if key in per_model:
            per_model[key] = per_model.pop(key)         # most recently used last
        else:
            per_model[key] = CompiledCallbacks(model, loss, batched, keep)
            while len(per_model) > _COMPILED_PER_MODEL:
                per_model.pop(next(iter(per_model)))
        return per_model[key]
