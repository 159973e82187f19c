"""What every call pays to read the user's model afresh (issue 23): the per-call structural copy
(``model_state.functional_module``) beside ``copy.deepcopy`` with the tensors shared (what it
replaced), the model's fingerprint, and both against one A-MAML meta-step (exact mode, 5 tasks)
of the same model, all in one process.

    python -m benchmarks.call_overhead [--repeats 30]
"""

import argparse
import copy
import itertools
import warnings

import torch
from torch.nn import functional as F

from amaml_ext import flatten_params, learners, models
from amaml_ext.functional.compile_policy import compile_refusal
from amaml_ext.data import TaskBatch
from amaml_ext.functional.model_state import fingerprint, functional_module

from .common.timing import median_time


def _deepcopy_sharing_tensors(model):
    memo = {id(t): t for _, t in itertools.chain(model.named_parameters(remove_duplicate=False),
                                                 model.named_buffers(remove_duplicate=False))}
    return copy.deepcopy(model, memo)


def _problems():
    mlp = models.mlp(width=40, depth=2)
    x = torch.rand(5, 50, 2) * 2 - 1
    yield "MLP 2-40-40-1", mlp, TaskBatch(support=(x, torch.cos(3 * x[..., :1])), query=(x, torch.sin(x[..., :1]))), \
        F.mse_loss, compile_refusal() is None
    conv = models.Conv4(ways=20, in_channels=1, channels=64, image_size=28)
    xi = torch.randn(5, 20, 1, 28, 28)
    yi = torch.arange(20).repeat(5, 1)
    yield "Conv4 64ch, 20-way 1-shot", conv, TaskBatch(support=(xi, yi), query=(xi, yi)), F.cross_entropy, False


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    warnings.simplefilter("ignore")
    print("| model | structural copy | deepcopy (tensors shared) | fingerprint | A-MAML meta-step K=5 | K=20 |")
    print("|---|---|---|---|---|---|")
    for name, model, batch, loss, compile in _problems():
        theta = flatten_params(model)
        row = [median_time(lambda: f(model), "cpu", args.repeats, 3) * 1e3
               for f in (functional_module, _deepcopy_sharing_tensors, fingerprint)]
        for K in (5, 20):
            learner = learners.AMAML(model, loss, T=K * 0.01, h=0.01, solver="euler", adjoint="discrete",
                                     compile=compile)
            row.append(median_time(lambda: learner.meta_grad(theta, batch), "cpu", max(3, args.repeats // 5), 2) * 1e3)
        label = f"{name}{' (compiled)' if compile else ''}"
        print(f"| {label} | {row[0]:.2f} ms | {row[1]:.2f} ms | {row[2]:.2f} ms | {row[3]:.1f} ms | {row[4]:.1f} ms |")


if __name__ == "__main__":
    main()
