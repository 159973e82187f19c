"""The meta-gradient benchmark's problems (docs/benchmarks.md, Methods).

* ``cosmixture``: ``amaml_ext.models.mlp(width=32)`` (2-32-32-1 tanh) on CosMixture tasks of
  100 support and 100 query points, mean squared error.
* ``conv4``: ``amaml_ext.models.Conv4`` (``channels`` wide, BatchNorm in training mode) on
  20-way 1-shot tasks of random 28x28 images, ``query_shots`` query images per class,
  cross-entropy.

Task b of a meta-batch is drawn from seed ``seed + 1 + b``; the model is initialised after
``torch.manual_seed(seed)``.
"""

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from amaml_ext import flatten_params, models
from amaml_ext.functional import functional_module

from ..common.problems import cosmixture_task, flat_loss, random_image_task, stack_tasks

MODELS = ("cosmixture", "conv4")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class MetaGradProblem:
    """A model, its loss, the flat initial parameters ``theta [d]``, the task data
    (``support``/``query`` = ``(x, y)``, with a leading task dimension B for a meta-batch) and
    the inner loop: step ``h`` (``T = K h``), dopri5 tolerances. The autograd baselines
    evaluate ``module``, the copy ``adjoint_meta_grad`` evaluates
    (``amaml_ext.functional.functional_module``: BatchNorm keeps no running statistics), so
    that every method differentiates the same function."""

    name: str
    model: nn.Module
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    theta: torch.Tensor
    support: Tuple[torch.Tensor, torch.Tensor]
    query: Tuple[torch.Tensor, torch.Tensor]
    info: Dict[str, Any] = field(default_factory=dict)
    h: float = 0.01
    rtol: float = 1e-6
    atol: float = 1e-8
    jacobian_vectorize: bool = False

    def __post_init__(self):
        self.module = functional_module(self.model)

    @property
    def d(self) -> int:
        return self.theta.numel()

    @property
    def tasks(self) -> int:
        return int(self.info.get("tasks", 1))

    @property
    def batched(self) -> bool:
        return self.tasks > 1

    @property
    def u0(self) -> torch.Tensor:
        """The initial state: theta ``[d]``, or ``[B, d]`` (theta per task) for a meta-batch."""
        th = self.theta.detach()
        return th.expand(self.tasks, -1).clone() if self.batched else th.clone()

    def T(self, K: int) -> float:
        return K * self.h

    def loss_at(self, u: torch.Tensor, data) -> torch.Tensor:
        """The loss at ``u``; for a meta-batch the sum of the per-task losses."""
        return flat_loss(self.model, self.module, self.loss, u, data, self.batched)

    def train_loss(self, u: torch.Tensor) -> torch.Tensor:
        return self.loss_at(u, self.support)

    def val_grad(self, u: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            leaf = u.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.loss_at(leaf, self.query), leaf)
        return g

    def task(self, b: int) -> "MetaGradProblem":
        """Task b of a meta-batch as a one-task problem (for the one-task-at-a-time baselines)."""
        pick = lambda pair: tuple(t[b] for t in pair)  # noqa: E731
        return dataclasses.replace(self, support=pick(self.support), query=pick(self.query),
                                   info=dict(self.info, tasks=1))

    def to(self, dtype) -> "MetaGradProblem":
        """The same problem in another dtype (model, theta and data cast)."""
        cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
        return dataclasses.replace(self, model=copy.deepcopy(self.model).to(dtype), theta=self.theta.to(dtype),
                                   support=tuple(map(cast, self.support)), query=tuple(map(cast, self.query)),
                                   info=dict(self.info))


def build_problem(args, dtype=None) -> MetaGradProblem:
    """The problem the command-line options ``args`` describe (``--model``, ``--tasks``, ...)."""
    dtype = dtype or DTYPES[args.dtype]
    device, seed, tasks = args.device, args.seed, args.tasks
    torch.manual_seed(seed)
    if args.model == "cosmixture":
        n_support = n_query = 100
        model = models.mlp(width=32).to(device=device, dtype=dtype)
        drawn = [cosmixture_task(seed + 1 + b, n_support, n_query, dtype, device) for b in range(tasks)]
        A, w, phi = drawn[0][2]
        info = {"model": "MLP 2-32-32-1 tanh", "task": "CosMixture",
                "support": n_support, "query": n_query, "A": A, "w": w, "phi": phi, "loss": "mse"}
        loss = F.mse_loss
    elif args.model == "conv4":
        ways, channels, query_shots = 20, args.channels, args.query_shots
        model = models.Conv4(ways=ways, channels=channels).to(device=device, dtype=dtype).train()
        drawn = [random_image_task(seed + 1 + b, ways=ways, shots=1, query_shots=query_shots, dtype=dtype,
                                   device=device) for b in range(tasks)]
        info = {"model": f"Conv4 ({channels} ch, BatchNorm train mode)", "task": f"{ways}-way 1-shot 28x28 random",
                "support": ways, "query": ways * query_shots, "query_shots": query_shots,
                "channels": channels, "loss": "cross_entropy"}
        loss = F.cross_entropy
    else:
        raise ValueError(f"unknown model {args.model!r}, expected one of {MODELS}")
    if tasks == 1:
        support, query = drawn[0][0], drawn[0][1]
    else:
        support, query = stack_tasks([t[0] for t in drawn]), stack_tasks([t[1] for t in drawn])
    theta = flatten_params(model)
    info["d"] = theta.numel()
    info["tasks"] = tasks
    return MetaGradProblem(args.model, model, loss, theta, support, query, info, h=args.h, rtol=args.rtol,
                           atol=args.atol, jacobian_vectorize=args.jacobian_vectorize)


class GradFlow(nn.Module):
    """du/dt = -grad L(u) as a torchdiffeq right-hand side (no parameters: the task data are
    constants). With ``u`` requiring grad (inside odeint_adjoint's backward pass), the
    gradient is built with its graph, so that torchdiffeq's VJP is an HVP."""

    def __init__(self, problem: MetaGradProblem):
        super().__init__()
        self.p = problem
        self.nfe = 0

    def forward(self, t, u):
        self.nfe += 1
        with torch.enable_grad():
            create = u.requires_grad
            leaf = u if create else u.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.p.train_loss(leaf), leaf, create_graph=create)
        return -g
