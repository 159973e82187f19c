"""The options of a meta-gradient as one object, built and checked once at every front door
(:func:`~amaml_ext.adjoint_meta_grad`, :func:`~amaml_ext.gradient_flow`, the A-MAML learners at
construction, the command before any file is written). Below the front doors only the object
travels; every option is checked in exactly one place: the ``__post_init__`` of its part.

    >>> from amaml_ext.metagrad import MetaGradOptions
    >>> opts = MetaGradOptions.build(solver="euler", adjoint="discrete", h=0.05)
    >>> opts.solver.h, opts.adjoint_scheme.exact_for
    (0.05, 'euler')
    >>> MetaGradOptions.build(rtol=5.0)
    Traceback (most recent call last):
    ...
    ValueError: argument 'rtol' must be a number in (0, 1) (dopri5's tolerance), got 5.0
"""

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

from .. import _checks, ode

MEMORY_MODES = ("auto", "linearise", "store", "checkpoint")
"""The values of the ``memory`` option (:class:`MemoryOptions`)."""
ERROR_ESTIMATES = (True, False, "drift", "richardson")


@dataclass(frozen=True)
class SolverOptions:
    """The grid and the schemes: ``h`` the grid spacing (the GD step of ``euler``), ``solver`` a
    forward and ``adjoint`` an adjoint method of :mod:`amaml_ext.ode.schemes`, dopri5's ``rtol``,
    ``atol`` and step budget ``max_steps`` (None: :func:`~amaml_ext.ode.default_max_steps`).

    Raises:
        ValueError: a non-positive ``h``, an unknown method, a ``discrete`` adjoint after another
            solver than ``euler``, tolerances outside (0, 1), or a bad ``max_steps``.

    Example:
        >>> from amaml_ext.metagrad import SolverOptions
        >>> SolverOptions(h=0.05, solver="rk4").steps_budget(20)
        1000
        >>> SolverOptions(solver="rk4", adjoint="discrete")
        Traceback (most recent call last):
        ...
        ValueError: argument 'adjoint': 'discrete' is the exact gradient of solver='euler' ...
    """

    h: float = 0.01
    solver: str = "dopri5"
    adjoint: str = "heun"
    rtol: float = 1e-6
    atol: float = 1e-8
    max_steps: Optional[int] = None

    def __post_init__(self):
        object.__setattr__(self, "h", _checks.positive_real("h", self.h))
        _checks.choice("solver", self.solver, ode.FORWARD_METHODS)
        _checks.choice("adjoint", self.adjoint, ode.ADJOINT_METHODS)
        ode.check_pairing(self.solver, self.adjoint)
        rtol, atol = _checks.tolerances(self.rtol, self.atol)
        object.__setattr__(self, "rtol", rtol)
        object.__setattr__(self, "atol", atol)
        if self.max_steps is not None:
            if not _checks.is_int(self.max_steps) or self.max_steps < 1:
                raise ValueError(f"argument 'max_steps' must be a positive int (or None for the default), "
                                 f"got {self.max_steps!r}")
            object.__setattr__(self, "max_steps", int(self.max_steps))

    def steps_budget(self, n: int) -> int:
        """The adaptive forward's step budget for ``n`` grid intervals."""
        return ode.default_max_steps(n) if self.max_steps is None else self.max_steps


@dataclass(frozen=True)
class MemoryOptions:
    """What the forward keeps, from the most memory to the least: ``"linearise"`` every grid state
    and the linearisations (gradients with their graphs) of as many steps as fit in
    ``memory_budget`` (their size measured on the first step; the adjoint then recomputes only
    the rest: a forward whose evaluations are all at grid states, ``euler``, eager callbacks;
    else it is ``"store"``), ``"store"`` every grid state, ``"checkpoint"`` about ``2 sqrt(N)``
    (recomputing segments). ``"auto"`` (the default) takes the fastest that fits the budget:
    ``"linearise"`` where the states fit, else ``"checkpoint"``. ``memory_budget`` in bytes (None:
    :func:`~amaml_ext.metagrad.plan.default_budget`, half the free GPU memory or a quarter of the
    RAM). The gradient is the same whatever the plan, to float rounding.

    Raises:
        ValueError: a ``memory`` not in :data:`MEMORY_MODES`, or a negative ``memory_budget``.

    Example:
        >>> from amaml_ext.metagrad import MemoryOptions
        >>> MemoryOptions(memory="checkpoint", memory_budget=2 ** 20).memory
        'checkpoint'
    """

    memory: str = "auto"
    memory_budget: Optional[float] = None

    def __post_init__(self):
        _checks.choice("memory", self.memory, MEMORY_MODES)
        b = self.memory_budget
        if b is not None and (isinstance(b, bool) or not isinstance(b, numbers.Real) or not b >= 0):
            raise ValueError(f"argument 'memory_budget' must be a number of bytes >= 0 (or None), got {b!r}")


@dataclass(frozen=True)
class AccuracyOptions:
    """The accuracy control of a continuous adjoint (:mod:`amaml_ext.metagrad.accuracy`):
    ``error_estimate`` (True/"drift", "richardson" or False), ``error_tol``, ``strict`` (raise
    instead of warning) and ``refine`` (solve again on a finer grid past the tolerance).

    Raises:
        ValueError: an unknown ``error_estimate`` or a non-positive ``error_tol``.
        TypeError: ``strict`` or ``refine`` is not a bool.

    Example:
        >>> from amaml_ext.metagrad import AccuracyOptions
        >>> AccuracyOptions(error_estimate="richardson", error_tol=1e-3).strict
        False
    """

    error_estimate: Union[bool, str] = True
    error_tol: float = 1e-2
    strict: bool = False
    refine: bool = False

    def __post_init__(self):
        if self.error_estimate not in ERROR_ESTIMATES:
            raise ValueError(f"argument 'error_estimate' must be True, False, 'drift' or 'richardson', "
                             f"got {self.error_estimate!r}")
        object.__setattr__(self, "error_tol", _checks.positive_real("error_tol", self.error_tol))
        for name in ("strict", "refine"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise TypeError(f"argument '{name}' must be a bool, got {type(v).__name__}")


_PARTS = {"solver": SolverOptions, "memory": MemoryOptions, "accuracy": AccuracyOptions}
_OWNER = {f.name: part for part, cls in _PARTS.items() for f in dataclasses.fields(cls)}
_OWNER["memory"] = "memory"   # the field and its part share the name


@dataclass(frozen=True)
class MetaGradOptions:
    """Every option of a meta-gradient: ``solver`` (:class:`SolverOptions`), ``memory``
    (:class:`MemoryOptions`), ``accuracy`` (:class:`AccuracyOptions`), ``compile`` (True, False
    or ``"auto"``) and ``batched`` (states ``[B, d]``, data with a leading task dimension).

    :meth:`build` makes one from the flat keywords of :func:`~amaml_ext.adjoint_meta_grad`
    (``h``, ``solver``, ``rtol``, ``memory``, ``error_tol``, ...); :meth:`replace` changes some;
    :meth:`flat` gives them back.

    Raises:
        TypeError: a part of the wrong type, a non-bool ``batched`` or ``compile`` (but
            ``"auto"``), or an unknown flat keyword.

    Example:
        >>> from amaml_ext.metagrad import MetaGradOptions
        >>> opts = MetaGradOptions.build(h=0.05, memory="store")
        >>> opts.memory.memory, opts["h"], opts.replace(rtol=1e-3).solver.rtol
        ('store', 0.05, 0.001)
    """

    solver: SolverOptions = field(default_factory=SolverOptions)
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    accuracy: AccuracyOptions = field(default_factory=AccuracyOptions)
    compile: Union[bool, str] = False
    batched: bool = False

    def __post_init__(self):
        for part, cls in _PARTS.items():
            if not isinstance(getattr(self, part), cls):
                raise TypeError(f"MetaGradOptions.{part} must be a {cls.__name__}, got "
                                f"{type(getattr(self, part)).__name__}")
        if self.compile != "auto" and not isinstance(self.compile, bool):
            raise TypeError(f"argument 'compile' must be a bool, got {type(self.compile).__name__} "
                            f"({self.compile!r}; 'auto' is also accepted: compile where it pays)")
        if not isinstance(self.batched, bool):
            raise TypeError(f"argument 'batched' must be a bool, got {type(self.batched).__name__}")

    @staticmethod
    def names():
        """The flat option names :meth:`build` and :meth:`replace` accept."""
        return sorted(set(_OWNER) | {"compile", "batched"})

    @classmethod
    def build(cls, options: Optional["MetaGradOptions"] = None, caller: str = "MetaGradOptions.build",
              **flat) -> "MetaGradOptions":
        """``options`` (default: all defaults) with the flat keywords ``flat`` replaced."""
        if options is not None and not isinstance(options, MetaGradOptions):
            raise TypeError(f"argument 'options' must be an amaml_ext.metagrad.MetaGradOptions, got "
                            f"{type(options).__name__}")
        return (options or cls()).replace(caller=caller, **flat)

    def replace(self, caller: str = "MetaGradOptions.replace", **flat) -> "MetaGradOptions":
        """A copy with the flat keywords ``flat`` changed (each checked by its part)."""
        unknown = sorted(set(flat) - set(self.names()))
        if unknown:
            raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}; the options are "
                            f"{', '.join(self.names())}")
        parts: Dict[str, Any] = {}
        for part in _PARTS:
            mine = {k: v for k, v in flat.items() if _OWNER.get(k) == part}
            if mine:
                parts[part] = dataclasses.replace(getattr(self, part), **mine)
        top = {k: flat[k] for k in ("compile", "batched") if k in flat}
        return dataclasses.replace(self, **parts, **top) if parts or top else self

    def flat(self) -> Dict[str, Any]:
        """Every option as a flat keyword (the inverse of :meth:`build`)."""
        out = {f.name: getattr(getattr(self, part), f.name) for part in _PARTS
               for f in dataclasses.fields(_PARTS[part])}
        out.update(compile=self.compile, batched=self.batched)
        return out

    def __getitem__(self, name: str) -> Any:
        """An option by its flat name (``options["rtol"]``)."""
        if name not in self.names():
            raise KeyError(name)
        return self.flat()[name]

    def get(self, name: str, default: Any = None) -> Any:
        """An option by its flat name, or ``default`` for a name that is not an option."""
        return self[name] if name in self.names() else default

    def keys(self):
        """The flat option names: with ``__getitem__``, ``f(**options)`` passes them as keywords."""
        return self.names()

    @property
    def forward_scheme(self) -> ode.Scheme:
        """The :class:`~amaml_ext.ode.Scheme` of ``solver``."""
        return ode.FORWARD_SCHEMES[self.solver.solver]

    @property
    def adjoint_scheme(self) -> ode.Scheme:
        """The :class:`~amaml_ext.ode.Scheme` of ``adjoint``."""
        return ode.ADJOINT_SCHEMES[self.solver.adjoint]

    @property
    def estimate(self) -> Union[bool, str]:
        """The error estimate to run: the asked one where the adjoint has one, else False."""
        e = self.accuracy.error_estimate
        return e if e is not False and self.adjoint_scheme.error_estimate else False
