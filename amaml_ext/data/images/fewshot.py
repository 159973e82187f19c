"""The base class of the image datasets: class splits and N-way K-shot task sampling."""

import math
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from ... import _checks
from ..batch import TaskBatch


class TaskIndex(NamedTuple):
    """Which images a :class:`TaskBatch` holds (``sample(..., return_index=True)``).

    ``classes [B, N]``: the split's class indices (label ``i`` of task ``b`` is class
    ``classes[b, i]``); ``support [B, N, K]`` and ``query [B, N, Q]``: image indices within each
    class (``0 .. images_per_class - 1``)."""

    classes: torch.Tensor
    support: torch.Tensor
    query: torch.Tensor


# ----------------------------------------------------------------------------------------------
# base class


class FewShotImages:
    """A labelled image set split into class sets, from which N-way K-shot tasks are drawn.

    Subclasses set ``splits``, ``image_shape`` (C, H, W), ``images_per_class``, the defaults
    ``default_ways/shots/query_shots`` and implement ``_n_classes(split)``, ``_class_names(split)``
    and ``_gather(split, classes [M], images [M, J]) -> uint8 [M, J, C, H, W]``."""

    splits: Tuple[str, ...] = ()
    image_shape: Tuple[int, int, int] = (1, 1, 1)
    images_per_class: int = 0
    invert: bool = False
    default_ways, default_shots, default_query_shots = 5, 1, 15

    # -- to implement
    def _n_classes(self, split: str) -> int:  # pragma: no cover
        raise NotImplementedError

    def _class_names(self, split: str) -> List[str]:  # pragma: no cover
        raise NotImplementedError

    def _gather(self, split: str, classes: torch.Tensor, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    # -- reporting
    def _check_split(self, split) -> str:
        if split not in self.splits:
            raise ValueError(f"argument 'split' must be one of {list(self.splits)}, got {split!r}")
        return split

    @property
    def split_classes(self) -> Dict[str, int]:
        """Number of classes of each split."""
        return {s: self._n_classes(s) for s in self.splits}

    @property
    def num_classes(self) -> int:
        """Number of classes over all splits (Omniglot: characters x rotations)."""
        return sum(self.split_classes.values())

    def class_names(self, split: str) -> List[str]:
        """Names of the split's classes, in class-index order."""
        return list(self._class_names(self._check_split(split)))

    def num_tasks(self, split: str, ways: int) -> int:
        """Number of distinct ``ways``-class sets of the split (``comb(classes, ways)``; label
        orders and image choices not counted)."""
        ways = _checks.integer("ways", ways)
        return math.comb(self._n_classes(self._check_split(split)), ways)

    def _to_float(self, u8: torch.Tensor, dtype) -> torch.Tensor:
        x = u8.to(dtype).div_(255.0)
        return torch.sub(1.0, x) if self.invert else x

    def class_images(self, split: str, index: int, dtype=torch.float32) -> torch.Tensor:
        """All ``images_per_class`` images of class ``index`` of ``split``: ``[P, C, H, W]``
        floats in [0, 1], exactly as :meth:`sample` returns them."""
        split = self._check_split(split)
        n = self._n_classes(split)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < n:
            raise ValueError(f"argument 'index' must be an int in [0, {n}) (the classes of split {split!r}), "
                             f"got {index!r}")
        u8 = self._gather(split, torch.tensor([int(index)]), torch.arange(self.images_per_class)[None])
        return self._to_float(u8[0], dtype)

    # -- sampling
    def sample(self, split: str = "train", n_tasks: int = 1, ways: Optional[int] = None,
               shots: Optional[int] = None, query_shots: Optional[int] = None, seed: Optional[int] = None,
               generator: Optional[torch.Generator] = None, device=None, dtype=torch.float32,
               return_index: bool = False):
        """``n_tasks`` N-way K-shot tasks of ``split`` as a :class:`TaskBatch`.

        ``support = (x [B, N*K, C, H, W], y [B, N*K])``, ``query = (x [B, N*Q, C, H, W],
        y [B, N*Q])``; ``y`` is int64 in ``0 .. N-1``, each label exactly K (Q) times, class-major.
        ``ways``/``shots``/``query_shots`` default to the dataset's ``default_*`` (Omniglot 20/1/1,
        Mini-ImageNet 5/1/15). The draws come from ``generator`` (a CPU ``torch.Generator``), or
        a fresh one seeded with ``seed``, or torch's global generator when neither is given.
        ``return_index=True`` returns ``(batch, TaskIndex)``."""
        split = self._check_split(split)
        B = _checks.integer("n_tasks", n_tasks)
        N = _checks.integer("ways", self.default_ways if ways is None else ways)
        K = _checks.integer("shots", self.default_shots if shots is None else shots)
        Q = _checks.integer("query_shots", self.default_query_shots if query_shots is None else query_shots, lo=0)
        C, P = self._n_classes(split), self.images_per_class
        if N > C:
            raise ValueError(f"argument 'ways' must be at most the number of classes of split {split!r} ({C}), got {N}")
        if K + Q > P:
            raise ValueError(f"arguments 'shots' + 'query_shots' must be at most images_per_class ({P}), "
                             f"got {K} + {Q} = {K + Q}")
        if seed is not None and generator is not None:
            raise ValueError("give at most one of the arguments 'seed' and 'generator', got both")
        if seed is not None:
            _checks.seed("seed", seed)
            generator = torch.Generator().manual_seed(int(seed))
        elif generator is not None:
            if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
                raise ValueError(f"argument 'generator' must be a CPU torch.Generator, got {generator!r}")
        # a uniform random order of the split's classes (float64 keys: no ties in practice; stable
        # sort: deterministic even then), of which the first N are the task's labels 0..N-1
        classes = torch.rand(B, C, generator=generator, dtype=torch.float64).argsort(dim=1, stable=True)[:, :N]
        images = torch.rand(B, N, P, generator=generator, dtype=torch.float64).argsort(dim=2, stable=True)[..., :K + Q]
        u8 = self._gather(split, classes.reshape(-1), images.reshape(B * N, K + Q))
        x = self._to_float(u8, dtype).reshape(B, N, K + Q, *self.image_shape)
        labels = torch.arange(N, dtype=torch.long)
        xs = x[:, :, :K].reshape(B, N * K, *self.image_shape)
        xq = x[:, :, K:].reshape(B, N * Q, *self.image_shape)
        ys = labels.repeat_interleave(K).expand(B, N * K).clone()
        yq = labels.repeat_interleave(Q).expand(B, N * Q).clone()
        batch = TaskBatch((xs, ys), (xq, yq))
        if device is not None:
            batch = batch.to(device=device)
        if return_index:
            return batch, TaskIndex(classes, images[..., :K].clone(), images[..., K:].clone())
        return batch


# ----------------------------------------------------------------------------------------------
# Omniglot

