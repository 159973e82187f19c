"""The paper's benchmarks by name: each wires one task source to its pools, model, loss and metric,
and says which of the command's options it takes. The command (``amaml-ext``) reads everything
task-specific from here, so adding a benchmark is one entry in :data:`BENCHMARKS`.

    >>> b = BENCHMARKS["cosmixture"]
    >>> cfg = dict(b.config(setting="50shot-50val", model="mlp32", pool_size=100), task="cosmixture", pool_seed=0)
    >>> family, train_pool, test_pool = b.pools(cfg)    # the command adds task and pool_seed
    >>> net = b.model(cfg, family, train_pool)          # the paper's 2x32 tanh MLP
    >>> len(train_pool), sum(p.numel() for p in net.parameters())
    (100, 1185)
"""

from typing import Dict, Optional, Tuple

from torch import nn
from torch.nn import functional as F

from .. import models
from ..data import synthetic
from ..data.settings import RATING_SETTINGS


class Benchmark:
    """A task source with its model, loss and metric. ``config(**options)`` keeps the options that
    define a run of it (stored in the run's config.json), ``pools(cfg, root)`` gives
    ``(family, train_pool, test_pool)``, ``model(cfg, family, train_pool)`` a fresh network."""

    kind = ""
    metric = "nrmse"
    loss = staticmethod(F.mse_loss)
    settings: Tuple[str, ...] = ()        # the --setting values it takes (none: no --setting)
    default_setting: Optional[str] = None
    default_model: Optional[str] = None   # an MLP of models.MODELS; None: no --model (Conv4)
    default_pool_size: Optional[int] = None   # None: --pool-size is not used
    trains_on_pool_size = False           # --pool-size is the number of training tasks
    resample = False                      # takes --resample
    episodes = False                      # takes --ways / --shots / --query-shots
    measure = "Test nRMSE (mean ± std over the test tasks)"

    def __init__(self, name: str):
        self.name = name

    def config(self, **options) -> Dict:  # pragma: no cover
        raise NotImplementedError

    def pools(self, cfg: Dict, root: Optional[str] = None):  # pragma: no cover
        raise NotImplementedError

    def model(self, cfg: Dict, family, train_pool) -> nn.Module:
        width = 32 if cfg["model"] == "mlp32" else 40
        return models.mlp(in_dim=family.in_dim, width=width)


class SyntheticBenchmark(Benchmark):
    """A regression family of :mod:`amaml_ext.data.synthetic`: seeded train and test pools."""

    kind = "synthetic"
    settings = tuple(sorted(synthetic.SETTINGS))
    default_setting, default_model, default_pool_size = "50shot-50val", "mlp32", 100
    trains_on_pool_size = True

    def config(self, *, setting, model, pool_size, **_) -> Dict:
        shots, val = synthetic.SETTINGS[setting]
        return dict(setting=setting, shots=shots, val=val, model=model, pool_size=pool_size)

    def pools(self, cfg: Dict, root: Optional[str] = None):
        family = synthetic.make_family(cfg["task"], cfg["shots"], cfg["val"])
        train, test = synthetic.train_test_pools(family, cfg["pool_size"], cfg["pool_size"], seed=cfg["pool_seed"])
        return family, train, test


_DATASETS: Dict = {}


def _cached(key, make):
    """Real datasets are read (and decoded) once per process."""
    if key not in _DATASETS:
        _DATASETS[key] = make()
    return _DATASETS[key]


class RatingBenchmark(Benchmark):
    """A collaborative-filtering dataset of :mod:`amaml_ext.data.ratings`: one task per user."""

    kind = "ratings"
    default_setting, default_model = "10shot-15val", "mlp40"
    resample = True
    measure = "Test nRMSE on each test user's remaining ratings (mean ± std over the test tasks)"

    settings = tuple(sorted(RATING_SETTINGS))

    def config(self, *, setting, model, data_root=None, resample=False, **_) -> Dict:
        cfg = dict(setting=setting, model=model, data_root=data_root)
        if resample:          # only when set: runs made before the option existed still resume
            cfg["resample"] = True
        return cfg

    def pools(self, cfg: Dict, root: Optional[str] = None):
        from ..data.ratings import make_rating_dataset          # pandas loads on first use
        family = _cached((self.name, root), lambda: make_rating_dataset(self.name, root))
        train, test = family.pools(cfg["setting"], seed=cfg["pool_seed"], resample=cfg.get("resample", False))
        return family, train, test


class ImageBenchmark(Benchmark):
    """A few-shot image dataset of :mod:`amaml_ext.data.images` with the Conv4 net: seeded episodes."""

    kind = "images"
    metric = "accuracy"
    loss = staticmethod(F.cross_entropy)
    default_pool_size = 600
    episodes = True
    measure = "Test accuracy (mean ± 95% confidence interval over the test tasks)"

    def config(self, *, ways=None, shots=None, query_shots=None, channels=64, pool_size=600, data_root=None,
               activation="relu", pool="max", **_) -> Dict:
        cfg = dict(ways=ways, shots=shots, query_shots=query_shots, channels=channels, test_tasks=pool_size,
                   data_root=data_root)
        if (activation, pool) != ("relu", "max"):   # only when set: older runs still resume
            cfg.update(activation=activation, pool=pool)
        return cfg

    def pools(self, cfg: Dict, root: Optional[str] = None):
        from ..data import images                              # Pillow loads on first use
        make = images.Omniglot if self.name == "omniglot" else images.MiniImageNet
        family = _cached((self.name, root), lambda: make(root))
        kw = dict(ways=cfg["ways"], shots=cfg["shots"], query_shots=cfg["query_shots"])
        train = images.EpisodePool(family, "train", seed=cfg["pool_seed"], **kw)
        test = images.EpisodePool(family, "test", size=cfg["test_tasks"], seed=cfg["pool_seed"] + 1, **kw)
        return family, train, test

    def model(self, cfg: Dict, family, train_pool) -> nn.Module:
        c, side = family.image_shape[0], family.image_shape[-1]
        return models.Conv4(ways=train_pool.ways, in_channels=c, channels=cfg["channels"], image_size=side,
                            activation=cfg.get("activation", "relu"), pool=cfg.get("pool", "max"))


BENCHMARKS: Dict[str, Benchmark] = {
    **{name: SyntheticBenchmark(name) for name in synthetic.FAMILIES},
    **{name: RatingBenchmark(name) for name in ("movielens-100k", "movielens-1m", "jester")},
    **{name: ImageBenchmark(name) for name in ("omniglot", "miniimagenet")},
}
