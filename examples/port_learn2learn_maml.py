"""learn2learn's MAML loop on sine regression, ported to amaml_ext.AdjointLearner.

The loop is learn2learn's documented one (``examples/maml_sine.py`` / the README's "MAML"
snippet). The port changes three lines: the wrapper, and ``clone()`` + K ``adapt`` calls become
one ``adapt(x, y)``:

    -maml = l2l.algorithms.MAML(model, lr=inner_lr, first_order=False)
    +maml = amaml_ext.AdjointLearner(model, F.mse_loss, T=steps * inner_lr, h=inner_lr,
    +                                solver="euler", adjoint="discrete")
     opt = torch.optim.Adam(maml.parameters(), meta_lr)
     for iteration in range(iterations):
         opt.zero_grad()
         for task in range(meta_batch):
             xs, ys, xq, yq = sample_task()
    -        learner = maml.clone()
    -        for _ in range(steps):
    -            learner.adapt(F.mse_loss(learner(xs), ys))
    +        learner = maml.adapt(xs, ys)
             (F.mse_loss(learner(xq), yq) / meta_batch).backward()
         opt.step()

With ``solver="euler", adjoint="discrete"`` the meta-gradient is learn2learn's (second-order MAML
over ``steps`` GD steps) without the autograd graph of the inner loop, so ``steps`` can be in the
thousands. Run: ``python examples/port_learn2learn_maml.py [--iterations 300] [--steps 10]``.
"""

import argparse
import math

import torch
from torch import nn
from torch.nn import functional as F

import amaml_ext


def sine_task(g: torch.Generator, shots: int = 10):
    """A sine wave ``A sin(x - phi)``, ``A ~ U[0.1, 5]``, ``phi ~ U[0, pi]``, ``x ~ U[-5, 5]``:
    ``shots`` support and ``shots`` query points."""
    amp = 0.1 + 4.9 * torch.rand((), generator=g)
    phase = math.pi * torch.rand((), generator=g)
    x = 10 * torch.rand(2 * shots, 1, generator=g) - 5
    y = amp * torch.sin(x - phase)
    return x[:shots], y[:shots], x[shots:], y[shots:]


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def train(iterations: int = 300, steps: int = 10, inner_lr: float = 0.01, meta_lr: float = 1e-3,
          meta_batch: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = make_model()
    maml = amaml_ext.AdjointLearner(model, F.mse_loss, T=steps * inner_lr, h=inner_lr, solver="euler",
                                    adjoint="discrete")
    opt = torch.optim.Adam(maml.parameters(), meta_lr)
    history = []
    for iteration in range(iterations):
        opt.zero_grad()
        total = 0.0
        for _ in range(meta_batch):
            xs, ys, xq, yq = sine_task(g)
            learner = maml.adapt(xs, ys)
            loss = F.mse_loss(learner(xq), yq) / meta_batch
            loss.backward()
            total += loss.item()
        opt.step()
        history.append(total)
        if iteration % 50 == 0 or iteration == iterations - 1:
            print(f"iteration {iteration:4d}: query MSE after {steps} steps {total:.3f}")
    return model, history


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--steps", type=int, default=10, help="inner GD steps")
    args = ap.parse_args()
    train(args.iterations, args.steps)
