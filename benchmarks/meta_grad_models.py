"""Models and tasks for ``bench_meta_grad.py`` (time and peak memory of one meta-gradient).

Two settings from the paper (Li et al., AISTATS 2023):

* ``cosmixture`` (Sec. 5.1/5.2): an MLP 2 -> 32 -> 32 -> 1 with tanh, one CosMixture task,
  ``y = -0.1 sum_i A cos(w x_i + phi) - sum_i x_i^2`` with ``x in [-1, 1]^2``,
  ``A in [0.1, 1]``, ``w in [0.5 pi, 2 pi]``, ``phi in [3, 6]``; 100 support and 100 query
  points (the 100shot-100val setting of the memory/time figures), mean squared error.
* ``conv4`` (Sec. 5.4): 4 x [conv3x3 (C channels, padding 1), BatchNorm2d, ReLU,
  MaxPool2d(2)] then Linear(C, ways) on 1 x 28 x 28 images (28 -> 14 -> 7 -> 3 -> 1), one
  20-way 1-shot task of random images (support: 20 images, one per class; query:
  ``query_shots`` images per class), cross-entropy, BatchNorm in training mode (batch
  statistics, as in MAML).

``build(...)`` returns a :class:`Setting` with the model, the loss, the flat initial parameters
and the task. ``stateless_copy(model)`` is the copy the autograd baselines evaluate
functionally: BatchNorm layers there keep no running statistics, which leaves the training-mode
output unchanged and avoids in-place buffer updates inside the differentiated function.
"""

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Tuple

import torch

from amaml_ext.functional import functional_module
from torch import nn
from torch.nn import functional as F

MODELS = ("cosmixture", "conv4")


# ---- CosMixture -----------------------------------------------------------------------------

def cosmixture_mlp(width: int = 32) -> nn.Module:
    """MLP 2 -> width -> width -> 1 with tanh (the paper's regression net)."""
    return nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, 1))


def cosmixture_params(generator: torch.Generator) -> Tuple[float, float, float]:
    """(A, w, phi) drawn uniformly from the paper's ranges."""
    u = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
    A = 0.1 + 0.9 * u[0]
    w = 0.5 * math.pi + 1.5 * math.pi * u[1]
    phi = 3.0 + 3.0 * u[2]
    return A, w, phi


def cosmixture_function(x: torch.Tensor, A: float, w: float, phi: float) -> torch.Tensor:
    """f(x) = -0.1 sum_i A cos(w x_i + phi) - sum_i x_i^2, x: [n, 2] -> [n, 1]."""
    return (-0.1 * (A * torch.cos(w * x + phi)).sum(1, keepdim=True)
            - (x ** 2).sum(1, keepdim=True))


def cosmixture_task(seed: int, n_support: int = 100, n_query: int = 100,
                    dtype=torch.float32, device="cpu"):
    """One CosMixture task: (support, query, (A, w, phi)); x uniform in [-1, 1]^2, disjoint
    draws for support and query."""
    g = torch.Generator().manual_seed(seed)
    A, w, phi = cosmixture_params(g)
    x = torch.rand(n_support + n_query, 2, generator=g, dtype=torch.float64) * 2 - 1
    y = cosmixture_function(x, A, w, phi)
    x, y = x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)
    support = (x[:n_support].contiguous(), y[:n_support].contiguous())
    query = (x[n_support:].contiguous(), y[n_support:].contiguous())
    return support, query, (A, w, phi)


# ---- Conv4 ------------------------------------------------------------------------------------

class Conv4(nn.Module):
    """4 x [conv3x3, BatchNorm2d, ReLU, MaxPool2d(2)] + Linear (the few-shot conv net)."""

    def __init__(self, channels: int = 64, ways: int = 20, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        layers, c_in, side = [], in_channels, image_size
        for _ in range(4):
            layers += [nn.Conv2d(c_in, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c_in, side = channels, side // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels * side * side, ways)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def conv4_task(seed: int, ways: int = 20, shots: int = 1, query_shots: int = 1, image_size: int = 28,
               dtype=torch.float32, device="cpu"):
    """One N-way K-shot task of random images (standard normal pixels): support
    ``ways * shots`` images, query ``ways * query_shots`` images, labels 0..ways-1."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(ways * shots, 1, image_size, image_size, generator=g, dtype=torch.float64)
    xq = torch.randn(ways * query_shots, 1, image_size, image_size, generator=g, dtype=torch.float64)
    ys = torch.arange(ways).repeat(shots)
    yq = torch.arange(ways).repeat(query_shots)
    to = dict(device=device, dtype=dtype)
    return (xs.to(**to), ys.to(device)), (xq.to(**to), yq.to(device))


# ---- settings ---------------------------------------------------------------------------------

@dataclass
class Setting:
    name: str
    model: nn.Module
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    theta: torch.Tensor
    support: Tuple[torch.Tensor, torch.Tensor]
    query: Tuple[torch.Tensor, torch.Tensor]
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def d(self) -> int:
        return self.theta.numel()


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _stack_tasks(tasks):
    """[(x, y), ...] -> (x [B, ...], y [B, ...])."""
    return tuple(torch.stack([t[i] for t in tasks]) for i in range(2))


def build(name: str, *, dtype=torch.float32, device="cpu", seed: int = 0, channels: int = 64,
          ways: int = 20, query_shots: int = 1, n_support: int = 100, n_query: int = 100,
          tasks: int = 1) -> Setting:
    """The model, loss, initial parameters and ``tasks`` task(s) of setting ``name`` (see module
    doc). With ``tasks > 1`` (a meta-batch) every data tensor has a leading task dimension and
    task b is drawn with seed ``seed + 1 + b``; ``info["tasks"]`` records the count."""
    torch.manual_seed(seed)
    if name == "cosmixture":
        model = cosmixture_mlp().to(device=device, dtype=dtype)
        drawn = [cosmixture_task(seed + 1 + b, n_support, n_query, dtype, device) for b in range(tasks)]
        A, w, phi = drawn[0][2]
        info = {"model": "MLP 2-32-32-1 tanh", "task": "CosMixture",
                "support": n_support, "query": n_query, "A": A, "w": w, "phi": phi, "loss": "mse"}
        loss = F.mse_loss
    elif name == "conv4":
        model = Conv4(channels=channels, ways=ways).to(device=device, dtype=dtype).train()
        drawn = [conv4_task(seed + 1 + b, ways=ways, shots=1, query_shots=query_shots, dtype=dtype, device=device)
                 for b in range(tasks)]
        info = {"model": f"Conv4 ({channels} ch, BatchNorm train mode)", "task": f"{ways}-way 1-shot 28x28 random",
                "support": ways, "query": ways * query_shots, "query_shots": query_shots,
                "channels": channels, "loss": "cross_entropy"}
        loss = F.cross_entropy
    else:
        raise ValueError(f"unknown model {name!r}, expected one of {MODELS}")
    if tasks == 1:
        support, query = drawn[0][0], drawn[0][1]
    else:
        support, query = _stack_tasks([t[0] for t in drawn]), _stack_tasks([t[1] for t in drawn])
    theta = flat_params(model)
    info["d"] = theta.numel()
    info["tasks"] = tasks
    return Setting(name, model, loss, theta, support, query, info)


def stateless_copy(model: nn.Module) -> nn.Module:
    """A copy whose BatchNorm layers use batch statistics and keep no running statistics:
    the same copy adjoint_meta_grad evaluates (amaml_ext.functional.functional_module), so the
    baselines and ours run the same function."""
    return functional_module(model)
