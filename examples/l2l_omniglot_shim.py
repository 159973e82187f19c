"""``import learn2learn as l2l`` where learn2learn does not install, for
``learn2learn_maml_omniglot.py`` and its port: import this module first.

learn2learn 0.2.0 does not build on Python 3.11 (its data samplers are Cython extensions; no
wheel exists). Its MAML (``algorithms/maml.py`` with ``base_learner.py`` and ``utils``) and its
models (``vision/models/cnn4.py``, which needs ``nn/misc.py`` and scipy) are pure Python: they are
loaded from the unpacked source package behind stub packages, as
``benchmarks/peers/learn2learn_src.py`` does for the peer benchmarks, and
``l2l.vision.benchmarks.get_tasksets("omniglot", ...)`` is answered by
:class:`amaml_ext.data.images.Omniglot` (the same preprocessing as learn2learn's: Lanczos to 28
px, strokes 1; MAML's seeded shuffle of the characters, 1,100 for training, 100 for
validation, 423 for test; rotations make classes, where learn2learn rotates a task's classes at
random). A task's ``sample()`` is ``(data [ways * samples, 1, 28, 28], labels)``, each class's
``samples`` images consecutive as learn2learn's, so its ``fast_adapt`` split (even indices adapt)
holds; task ``i`` of a split is the same in every run with the same seed.

The source package: ``$LEARN2LEARN_SRC`` (the unpacked ``learn2learn-X.Y.Z`` folder), else the
newest ``learn2learn-*`` under ``src/`` of the running venv or of the repository's
``.venv-peers`` (``make peers-env``). ImportError when none is found.
"""

import importlib.util
import os
import random
import sys
import types
from collections import namedtuple
from pathlib import Path

import torch

from amaml_ext.data.images import EpisodePool, Omniglot

REPO = Path(__file__).resolve().parents[1]
BenchmarkTasksets = namedtuple("BenchmarkTasksets", ("train", "validation", "test"))


def source_dir():
    env = os.environ.get("LEARN2LEARN_SRC")
    if env:
        return Path(env)
    for root in (Path(sys.prefix) / "src", REPO / ".venv-peers" / "src"):
        found = sorted(root.glob("learn2learn-*/learn2learn/algorithms/maml.py"))
        if found:
            return found[-1].parents[2]
    raise ImportError("learn2learn's source package not found: run `make peers-env` or set LEARN2LEARN_SRC to the "
                      "unpacked learn2learn-X.Y.Z folder")


def _package(name, path):
    mod = sys.modules.get(name)
    if mod is None:
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]
        sys.modules[name] = mod
        parent, _, leaf = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], leaf, mod)
    return mod


def _module(name, path):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        parent, _, leaf = name.rpartition(".")
        setattr(sys.modules[parent], leaf, mod)
    return sys.modules[name]


class TaskSet:
    """One split's tasks: ``sample()`` draws the next of ``num_tasks`` seeded episodes."""

    def __init__(self, dataset, split, ways, samples, num_tasks, seed):
        if samples % 2:
            raise ValueError(f"samples must be even (half adapt, half evaluate), got {samples}")
        self.pool = EpisodePool(dataset, split, size=num_tasks, ways=ways, shots=samples // 2,
                                query_shots=samples // 2, seed=seed)
        self.count = 0

    def sample(self):
        b = self.pool.batch(self.count % len(self.pool), dtype=torch.get_default_dtype())
        self.count += 1
        (xs, ys), (xq, yq) = b.support, b.query        # [1, N*K, ...], class-major, K = samples / 2
        # interleaved: a class's images consecutive, the even ones from the support set
        return torch.stack([xs[0], xq[0]], 1).flatten(0, 1), torch.stack([ys[0], yq[0]], 1).flatten()


def get_tasksets(name, train_ways=5, train_samples=10, test_ways=5, test_samples=10, num_tasks=-1, root=None,
                 seed=None, **kwargs):
    """learn2learn's ``get_tasksets`` for ``"omniglot"``, over amaml_ext's loader (``root``:
    the data root holding ``omniglot/``; ``None`` or learn2learn's default ``'~/data'``:
    ``$AMAML_DATA_ROOT``). The episodes' seed is drawn from Python's ``random`` (seeded by the
    script, as learn2learn's class shuffle is) unless given; images come in torch's default dtype."""
    seed = random.randrange(2 ** 31) if seed is None else seed
    if name != "omniglot":
        raise ValueError(f"only 'omniglot' is served here, got {name!r}")
    data = Omniglot(None if root in (None, "~/data") else root, n_val=100)
    size = num_tasks if num_tasks > 0 else 10 ** 9
    return BenchmarkTasksets(TaskSet(data, "train", train_ways, train_samples, size, seed),
                             TaskSet(data, "val", test_ways, test_samples, size, seed + 1),
                             TaskSet(data, "test", test_ways, test_samples, size, seed + 2))


def install():
    """Put ``learn2learn`` (stub packages), ``learn2learn.algorithms.MAML``,
    ``learn2learn.nn.Flatten``, ``learn2learn.vision.models`` (``cnn4.py``'s models) and
    ``learn2learn.vision.benchmarks.get_tasksets`` (:func:`get_tasksets`) into ``sys.modules``."""
    if getattr(sys.modules.get("learn2learn"), "_amaml_shim", False):
        return sys.modules["learn2learn"]
    src = source_dir() / "learn2learn"
    l2l = _package("learn2learn", src)
    l2l._amaml_shim = True
    l2l.__version__ = src.parent.name.rpartition("-")[2] + " (source package, pure-Python parts)"
    _package("learn2learn.algorithms", src / "algorithms")
    _module("learn2learn.algorithms.maml", src / "algorithms" / "maml.py")
    sys.modules["learn2learn.algorithms"].MAML = sys.modules["learn2learn.algorithms.maml"].MAML
    _package("learn2learn.nn", src / "nn")
    misc = _module("learn2learn.nn.misc", src / "nn" / "misc.py")
    sys.modules["learn2learn.nn"].Flatten = misc.Flatten
    _package("learn2learn.vision", src / "vision")
    models = _package("learn2learn.vision.models", src / "vision" / "models")
    cnn4 = _module("learn2learn.vision.models.cnn4", src / "vision" / "models" / "cnn4.py")
    for name in ("OmniglotFC", "OmniglotCNN", "ConvBase", "CNN4"):
        setattr(models, name, getattr(cnn4, name))
    benchmarks = types.ModuleType("learn2learn.vision.benchmarks")
    benchmarks.get_tasksets = get_tasksets
    sys.modules["learn2learn.vision.benchmarks"] = benchmarks
    sys.modules["learn2learn.vision"].benchmarks = benchmarks
    return l2l


install()
