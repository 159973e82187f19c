"""Models of the paper's experiments.

* :func:`mlp`: the regression net of Sec. 5.1: ``in -> width -> width -> 1`` with tanh
  (width 32 or 40).
* :class:`Conv4`: the standard few-shot classifier: 4 x [conv 3x3, BatchNorm, ReLU, max-pool 2]
  and a linear head (Vinyals et al. 2016; Finn et al. 2017); ``activation="gelu", pool="avg"``
  gives the smooth variant whose gradient flow the continuous adjoint can follow.

    >>> net = mlp(width=32)
    >>> sum(p.numel() for p in net.parameters())
    1185
"""

from torch import nn

__all__ = ["mlp", "Conv4", "ACTIVATIONS", "POOLS", "MODELS", "make_model"]

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "elu": nn.ELU, "softplus": nn.Softplus, "tanh": nn.Tanh}
"""Conv4 activations; all but ``relu`` are smooth."""
POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}
"""Conv4 pooling; ``avg`` is smooth, ``max`` is not."""


def mlp(in_dim: int = 2, width: int = 32, out_dim: int = 1, depth: int = 2) -> nn.Sequential:
    """The paper's regression MLP: ``depth`` tanh hidden layers of ``width`` units.

    Args:
        in_dim: input features (2 for the synthetic families).
        width: units per hidden layer (the paper: 32 or 40).
        out_dim: outputs.
        depth: hidden layers.

    Returns:
        nn.Sequential: ``Linear, Tanh`` ``depth`` times, then ``Linear(width, out_dim)``;
        float32, torch's default initialisation (seed with ``torch.manual_seed``).

    Raises:
        ValueError: an argument is not a positive int.

    Example:
        >>> import torch
        >>> net = mlp(in_dim=2, width=32)
        >>> sum(p.numel() for p in net.parameters())
        1185
        >>> net(torch.zeros(5, 2)).shape
        torch.Size([5, 1])
    """
    for arg, v in (("in_dim", in_dim), ("width", width), ("out_dim", out_dim), ("depth", depth)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"argument '{arg}' must be a positive int, got {v!r}")
    layers, d = [], in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.Tanh()]
        d = width
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class Conv4(nn.Module):
    """4 x [conv 3x3 (padding 1), BatchNorm2d, activation, pool 2] + Linear(ways).

    ``image_size`` 28 (Omniglot) gives a 1x1 feature map, 84 (MiniImageNet) 5x5. The default
    (``activation="relu", pool="max"``) is the standard net; its gradient field jumps, so only
    the exact mode (``solver="euler", adjoint="discrete"``) differentiates its inner training
    correctly. ``activation="gelu"`` (or ``elu``, ``softplus``, ``tanh``) with ``pool="avg"`` is
    smooth: the continuous adjoint converges on it (at a step h within the stability bound).

    Args:
        ways: classes (outputs).
        in_channels: image channels (Omniglot 1, Mini-ImageNet 3).
        channels: filters of every conv layer (64 standard; 32 for Mini-ImageNet in MAML).
        image_size: side of the square input images, at least 16.
        activation: a key of :data:`ACTIVATIONS`.
        pool: a key of :data:`POOLS`.

    Raises:
        ValueError: an argument is not a positive int, ``image_size < 16``, or an unknown
            ``activation`` or ``pool``.

    Example:
        >>> import torch
        >>> net = Conv4(ways=5, channels=8, activation="gelu", pool="avg")
        >>> net(torch.zeros(2, 1, 28, 28)).shape       # [N, C, H, W] -> logits [N, ways]
        torch.Size([2, 5])
    """

    def __init__(self, ways: int = 5, in_channels: int = 1, channels: int = 64, image_size: int = 28,
                 activation: str = "relu", pool: str = "max"):
        super().__init__()
        for arg, v in (("ways", ways), ("in_channels", in_channels), ("channels", channels),
                       ("image_size", image_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"argument '{arg}' must be a positive int, got {v!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"argument 'activation' must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if pool not in POOLS:
            raise ValueError(f"argument 'pool' must be one of {sorted(POOLS)}, got {pool!r}")
        if image_size < 16:
            raise ValueError(f"argument 'image_size' must be at least 16 (four 2x2 max-pools), got {image_size}")
        layers, c = [], in_channels
        for _ in range(4):
            layers += [nn.Conv2d(c, channels, 3, padding=1), nn.BatchNorm2d(channels), ACTIVATIONS[activation](),
                       POOLS[pool](2)]
            c = channels
        self.features = nn.Sequential(*layers)
        side = image_size
        for _ in range(4):
            side //= 2
        self.head = nn.Linear(channels * side * side, ways)

    def forward(self, x):
        """``x [N, in_channels, image_size, image_size]`` -> logits ``[N, ways]``."""
        return self.head(self.features(x).flatten(1))


MODELS = ("mlp32", "mlp40")
"""The regression models by name (:func:`make_model`)."""


def make_model(name: str) -> nn.Module:
    """A regression model by name: ``"mlp32"`` or ``"mlp40"`` (:func:`mlp` of that width).

    Raises:
        ValueError: ``name`` is not in :data:`MODELS`.

    Example:
        >>> make_model("mlp40")[0]
        Linear(in_features=2, out_features=40, bias=True)
    """
    if name == "mlp32":
        return mlp(width=32)
    if name == "mlp40":
        return mlp(width=40)
    raise ValueError(f"argument 'model' must be one of {MODELS}, got {name!r}")
