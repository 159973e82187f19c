"""What several test files share: the repository root, the devices to run on, the relative error,
small seeded models and regression tasks, autograd through unrolled GD steps, a small run of the
command, a small learner on CosMixture and Omniglot files in the original format. Fixtures and
hooks stay in conftest.py. Tests in every folder import this as ``helpers``: pytest puts
python_tests/ on sys.path when it loads the conftest.py beside it."""

import io
import os
from typing import Iterable, Optional, Tuple

import torch

from amaml_ext import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The repository root (python_tests/..)."""

F64 = torch.float64

EXACT = dict(h=0.1, solver="euler", adjoint="discrete")
"""The exact mode: T = K h gives MAML's gradient through K GD steps of size h."""

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
"""For ``@pytest.mark.parametrize("device", DEVICES)``: the CPU, and CUDA where one is visible."""


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ``||a - b|| / ||b||`` (2-norm over all entries)."""
    return float((a - b).norm() / b.norm())


def mlp(seed: Optional[int] = 0, width: int = 16, depth: int = 2,
        dtype: Optional[torch.dtype] = F64) -> torch.nn.Sequential:
    """:func:`amaml_ext.models.mlp` (2 inputs, ``depth`` tanh layers of ``width``, 1 output)
    initialised after ``torch.manual_seed(seed)`` (``seed=None``: from the global generator as it
    stands), in ``dtype`` (``None``: float32, as built)."""
    if seed is not None:
        torch.manual_seed(seed)
    net = models.mlp(width=width, depth=depth)
    return net if dtype is None else net.to(dtype)


def small_conv4(channels: int = 4, ways: int = 3) -> models.Conv4:
    """:class:`amaml_ext.models.Conv4` (4 x conv3x3-BN-ReLU-maxpool) for 1-channel 16x16 images,
    narrow for tests; float32, initialised from the global generator."""
    return models.Conv4(ways=ways, in_channels=1, channels=channels, image_size=16)


def regression_task(seed: int, n: int = 20, dtype: torch.dtype = F64,
                    device="cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` points ``x`` uniform in [-1, 1]^2 (seeded), ``y = cos(3 x_1) + x_2^2 / 2``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g, dtype=dtype) * 2 - 1
    y = torch.cos(3 * x[:, :1]) + 0.5 * x[:, 1:] ** 2
    return x.to(device), y.to(device)


def stack_tasks(sets: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-task ``(x, y)`` sets stacked into one batched ``(x [B, ...], y [B, ...])``."""
    xs, ys = zip(*sets)
    return torch.stack(xs), torch.stack(ys)


def data(seed, n=12):
    """``n`` points ``x`` uniform in [-1, 1]^2 (seeded), ``y = sin(2 x_1) + x_2``, float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g, dtype=F64) * 2 - 1
    return x, torch.sin(2 * x[:, :1]) + x[:, 1:]


def unrolled(model, loss, theta, support, query, steps, lr):
    """Autograd through `steps` GD steps of the model as it is now (frozen parameters and
    buffers read from it)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    consts = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    consts.update(dict(model.named_buffers()))

    def f(u, x):
        params, i = {}, 0
        for n in names:
            p = dict(model.named_parameters())[n]
            params[n] = u[i:i + p.numel()].view_as(p)
            i += p.numel()
        return torch.func.functional_call(model, (params, consts), (x,))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    th = theta.clone().requires_grad_(True)
    u = th
    with sdpa_kernel(SDPBackend.MATH):     # double backward through attention needs the math kernel
        for _ in range(steps):
            (g,) = torch.autograd.grad(loss(f(u, support[0]), support[1]), u, create_graph=True)
            u = u - lr * g
        (grad,) = torch.autograd.grad(loss(f(u, query[0]), query[1]), th)
    return grad


def small_run(tmp_path, steps=2):
    """``amaml-ext train`` (FOMAML on CosMixture, ``steps`` meta-steps) into ``tmp_path/run``:
    returns the run directory and the command's arguments."""
    out = str(tmp_path / "run")
    cmd = ["train", "--task", "cosmixture", "--method", "fomaml", "--inner-steps", "2", "--meta-steps", str(steps),
           "--quiet", "--out", out]
    from amaml_ext import cli
    assert cli.main(cmd) == 0
    return out, cmd


def cosmixture_learner(method="amaml"):
    """A seeded ``models.mlp(width=8)``, a CosMixture pool of 8 tasks and a learner ``method``
    for it (5 inner steps; A-MAML with the rk4 solver): ``(net, pool, learner)``."""
    from torch.nn import functional as F

    from amaml_ext import learners as L
    from amaml_ext import tasks
    torch.manual_seed(0)
    net = models.mlp(width=8)
    pool = tasks.CosMixture(10, 10).pool(8, seed=0)
    learner = L.make_learner(method, net, F.mse_loss, inner_steps=5, maml_steps=2, solver="rk4") \
        if method == "amaml" else L.make_learner(method, net, F.mse_loss, inner_steps=5, maml_steps=2)
    return net, pool, learner


# ---- Omniglot in its original format -----------------------------------------------------------

# (source, alphabet, number of characters): 5 background + 3 evaluation characters
OMNI_LAYOUT = [("images_background", "Alpha", 3), ("images_background", "Beta", 2),
               ("images_evaluation", "Gamma", 3)]
DRAWINGS = 4


def png_1bit(ink) -> bytes:
    """A 1-bit PNG like Omniglot's: white background (1), black strokes (0) where ``ink``."""
    import numpy as np
    from PIL import Image
    im = Image.fromarray(np.where(ink, 0, 255).astype(np.uint8)).convert("1")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def make_omniglot(root, zipped=True, src=28, drawings=DRAWINGS, seed=0, layout=OMNI_LAYOUT, pattern=None):
    """Write ``root/omniglot/images_{background,evaluation}`` (zips or folders). Returns
    ``{character name: bool ink [drawings, src, src]}``; every drawing is a distinct random pattern
    (or ``pattern(i, j)``)."""
    import zipfile

    import numpy as np
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "omniglot")
    os.makedirs(folder, exist_ok=True)
    truth, files = {}, {}
    cid = 0
    for source, alpha, n in layout:
        for c in range(1, n + 1):
            cid += 1
            name = f"{source}/{alpha}/character{c:02d}"
            inks = np.stack([rng.random((src, src)) < 0.3 if pattern is None else pattern(cid, j)
                             for j in range(drawings)])
            truth[name] = inks
            for j in range(drawings):
                files[f"{name}/{cid:04d}_{j + 1:02d}.png"] = png_1bit(inks[j])
    for source in ("images_background", "images_evaluation"):
        mine = {k: v for k, v in files.items() if k.startswith(source + "/")}
        if zipped:
            with zipfile.ZipFile(os.path.join(folder, source + ".zip"), "w", zipfile.ZIP_DEFLATED) as z:
                dirs = sorted({k.rsplit("/", i)[0] + "/" for k in mine for i in (1, 2, 3)})
                for d in dirs:
                    z.writestr(d, b"")
                for k in sorted(mine):
                    z.writestr(k, mine[k])
                z.writestr("__MACOSX/._junk", b"junk")  # clutter that must be ignored
        else:
            for k, v in mine.items():
                path = os.path.join(folder, k)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(v)
            with open(os.path.join(folder, source, ".DS_Store"), "wb") as f:
                f.write(b"clutter")
    return truth
