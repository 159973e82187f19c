"""The model -> function layer: an ``nn.Module``, a loss and task data as functions of a flat
parameter vector, which is all the solvers see.

Modules: :mod:`.task_functions` (:class:`TaskFunctions`: the gradient, HVP and validation
callbacks; :func:`flatten_params` / :func:`unflatten_params`), :mod:`.model_state` (the per-call
structural copy of the model, its constants and its fingerprint), :mod:`.model_checks` (what a
model must satisfy, checked once per fingerprint), :mod:`.compiled` (``torch.compile``-d
callbacks per fingerprint) and :mod:`.compile_policy` (where compiling pays and is safe).

The rule of this layer: it knows torch modules and ``torch.func``, never a solver, a scheme or
a learner.
"""

from .compile_policy import compile_pays, compile_refusal, resolve_compile
from .model_checks import LossFn, LossValueError, NondeterministicModelWarning
from .model_state import functional_module, param_count, param_shapes
from .task_functions import TaskFunctions, flatten_params, second_order, unflatten_params

__all__ = ["LossFn", "LossValueError", "NondeterministicModelWarning", "TaskFunctions", "compile_pays",
           "compile_refusal", "flatten_params", "functional_module", "param_count", "param_shapes", "resolve_compile", "second_order",
           "unflatten_params"]
