"""Omniglot (Lake et al. 2015) as a :class:`FewShotImages`: characters x rotations as classes."""

import os
import random
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ... import _checks
from ..files import DataFileError
from ..root import data_root
from .cache import _CACHE_VERSION, digest, load_cache, save_cache
from .fewshot import FewShotImages
from . import sources as _sources
from .sources import RESAMPLE, open_source, resample_filter

_OMNIGLOT_SOURCES = ("images_background", "images_evaluation")


class Omniglot(FewShotImages):
    """Omniglot (Lake et al. 2015): 1,623 handwritten characters of 50 alphabets, 20 drawings each.

    Args:
        root: the data root holding ``omniglot/``; default ``$AMAML_DATA_ROOT``.
        image_size: side of the resized images (28).
        rotations: rotations in degrees (multiples of 90, counter-clockwise), each a class per
            character; ``(0,)`` for no class augmentation.
        class_split: ``"shuffled"`` (MAML's seeded shuffle of all characters, ``n_train`` for
            training) or ``"background"`` (``images_background`` trains, ``images_evaluation`` tests).
        n_train: characters for meta-training, validation included (default 1200; ``"shuffled"`` only).
        n_val: of these, the last ``n_val`` form a ``"val"`` split (0: no ``"val"`` split).
        split_seed: seed of the character shuffle (1, as MAML).
        invert: ``True`` (MAML): ``1 - v / 255`` so strokes are 1 and the background 0.
        resample: Pillow filter for the resize: ``"lanczos"``, ``"bilinear"``, ``"bicubic"`` or
            ``"nearest"`` (binary images; what MAML's script effectively did).
        cache_dir: optional folder for a ``.pt`` cache of the decoded images (not the repository).

    Attributes: ``characters`` (names ``images_background/<Alphabet>/<character>``),
    ``num_characters``, ``images_per_class`` (20), ``num_classes`` (characters x rotations),
    ``split_characters`` / ``split_classes`` (per split), ``sources`` (``"zip"``/``"folder"`` per
    source), ``raw_images`` (uint8 ``[characters, drawings, size, size]``, the file's polarity).

    Raises:
        FileNotFoundError: the root, ``omniglot/`` or a source does not exist, naming it.
        ValueError: a bad argument; ``DataFileError`` (a ValueError): an unreadable image or zip,
            or characters with different numbers of drawings, naming the file.

    Example:
        >>> import os, tempfile
        >>> from PIL import Image
        >>> from amaml_ext.tasks import Omniglot
        >>> tmp = tempfile.TemporaryDirectory()
        >>> for src in ("images_background", "images_evaluation"):     # 3 characters x 2 drawings each
        ...     for c in range(1, 4):
        ...         d = os.path.join(tmp.name, "omniglot", src, "Alpha", f"character{c:02d}")
        ...         os.makedirs(d)
        ...         for j in (1, 2):
        ...             Image.new("1", (105, 105), j % 2).save(os.path.join(d, f"{c:02d}_{j:02d}.png"))
        >>> om = Omniglot(tmp.name, rotations=(0, 90), class_split="background")
        >>> om.num_characters, om.images_per_class, om.split_classes
        (6, 2, {'train': 6, 'test': 6})
        >>> b = om.sample("train", n_tasks=2, ways=3, shots=1, query_shots=1, seed=0)
        >>> b.support[0].shape, b.support[1][0]          # x [B, N*K, 1, 28, 28], labels 0..N-1
        (torch.Size([2, 3, 1, 28, 28]), tensor([0, 1, 2]))
        >>> tmp.cleanup()
    """

    default_ways, default_shots, default_query_shots = 20, 1, 1

    def __init__(self, root=None, *, image_size: int = 28, rotations: Sequence[int] = (0, 90, 180, 270),
                 class_split: str = "shuffled", n_train: Optional[int] = None, n_val: int = 0, split_seed: int = 1,
                 invert: bool = True, resample: str = "lanczos", cache_dir=None):
        self.image_size = _checks.integer("image_size", image_size)
        rot = tuple(rotations) if isinstance(rotations, (list, tuple)) else None
        if (not rot or any(isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r % 90 for r in rot)
                or len({int(r) % 360 for r in rot}) != len(rot)):
            raise ValueError(f"argument 'rotations' must be a non-empty list of distinct multiples of 90 (degrees), "
                             f"got {rotations!r}")
        self.rotations = tuple(int(r) for r in rot)
        self._rot_k = torch.tensor([(r // 90) % 4 for r in self.rotations])
        if class_split not in ("shuffled", "background"):
            raise ValueError(f"argument 'class_split' must be 'shuffled' or 'background', got {class_split!r}")
        self.class_split = class_split
        if class_split == "background" and n_train is not None:
            raise ValueError(f"argument 'n_train' must be None with class_split='background' (the background "
                             f"characters are the training set), got {n_train!r}")
        if n_train is not None:
            _checks.integer("n_train", n_train)
        self.n_val = _checks.integer("n_val", n_val, lo=0)
        _checks.seed("split_seed", split_seed)
        if not isinstance(invert, bool):
            raise ValueError(f"argument 'invert' must be a bool, got {invert!r}")
        self.invert = invert
        if resample not in RESAMPLE:
            raise ValueError(f"argument 'resample' must be one of {list(RESAMPLE)}, got {resample!r}")
        self.resample = resample
        cache_dir = None if cache_dir is None else _checks.path("cache_dir", cache_dir)

        self.root = data_root(root)
        self.folder = os.path.join(self.root, "omniglot")
        if not os.path.isdir(self.folder):
            raise FileNotFoundError(f"Omniglot folder {self.folder!r} does not exist: expected "
                                    f"{self.folder}/images_background(.zip) and {self.folder}/images_evaluation(.zip)")
        self._load(cache_dir)
        self._make_splits(n_train, int(split_seed))

    # -- loading
    def _load(self, cache_dir: Optional[str]) -> None:
        sources = [open_source(self.folder, p) for p in _OMNIGLOT_SOURCES]
        try:
            self.sources = {s.prefix: s.kind for s in sources}
            names, files, fingerprint = [], [], []
            self.source_characters: Dict[str, int] = {}
            for s in sources:
                chars = s.list()
                self.source_characters[s.prefix] = len(chars)
                for (alpha, char) in sorted(chars):
                    entries = sorted(chars[(alpha, char)])
                    name = f"{s.prefix}/{alpha}/{char}"
                    if not entries:
                        raise DataFileError(f"Omniglot character {name!r} ({s.kind} {s.path!r}) holds no PNG")
                    names.append(name)
                    files.append((s, [e[0] for e in entries]))
                    fingerprint.append([name, [[os.path.basename(e[0]), list(e[1])] for e in entries]])
            counts = {len(f) for _, f in files}
            if len(counts) != 1:
                per = {}
                for n, (_, f) in zip(names, files):
                    per.setdefault(len(f), n)
                raise DataFileError("Omniglot characters must all have the same number of drawings; found "
                                    + ", ".join(f"{k} (e.g. {v!r})" for k, v in sorted(per.items())))
            P = counts.pop()
            S = self.image_size
            key = digest([_CACHE_VERSION, "omniglot", S, self.resample, fingerprint])
            cache = None if cache_dir is None else os.path.join(cache_dir, f"omniglot_{S}px_{self.resample}_{key[:16]}.pt")
            obj = None if cache is None else load_cache(cache, key)
            if obj is not None and obj.get("names") == names and tuple(obj["images"].shape) == (len(names), P, S, S) \
                    and obj["images"].dtype == torch.uint8:
                images = obj["images"]
            else:
                filt = resample_filter(self.resample)
                arr = np.empty((len(names), P, S, S), dtype=np.uint8)
                for i, (s, fs) in enumerate(files):
                    for j, f in enumerate(fs):
                        arr[i, j] = _sources.decode(s.read(f), S, "L", filt, f"{f!r} in {s.path!r}" if s.kind == "zip" else repr(f))
                images = torch.from_numpy(arr)
                if cache is not None:
                    save_cache(cache, {"version": _CACHE_VERSION, "key": key, "names": names, "images": images})
        finally:
            for s in sources:
                s.close()
        self.characters: List[str] = names
        self.raw_images: torch.Tensor = images
        self.images_per_class = P
        self.image_shape = (1, self.image_size, self.image_size)
        self.cache_file = cache

    def _make_splits(self, n_train: Optional[int], split_seed: int) -> None:
        n = len(self.characters)
        nb = self.source_characters["images_background"]
        if self.class_split == "shuffled":
            n_train = 1200 if n_train is None else n_train
            if n_train >= n:
                raise ValueError(f"argument 'n_train' must be less than the number of characters ({n}) so that "
                                 f"test characters remain, got {n_train}")
            order = list(range(n))
            random.Random(split_seed).shuffle(order)
            train, test = order[:n_train], order[n_train:]
        else:
            train, test = list(range(nb)), list(range(nb, n))
            n_train = nb
        if self.n_val >= len(train):
            raise ValueError(f"argument 'n_val' must be less than the number of training characters "
                             f"({len(train)}), got {self.n_val}")
        self.n_train = n_train
        split_chars = {"train": train[:len(train) - self.n_val]}
        if self.n_val:
            split_chars["val"] = train[len(train) - self.n_val:]
        split_chars["test"] = test
        self._split_chars = {s: torch.tensor(v, dtype=torch.long) for s, v in split_chars.items()}
        self.splits = tuple(split_chars)

    # -- reporting
    @property
    def num_characters(self) -> int:
        """Characters read (all sources)."""
        return len(self.characters)

    @property
    def split_characters(self) -> Dict[str, int]:
        """Characters per split."""
        return {s: len(v) for s, v in self._split_chars.items()}

    def _n_classes(self, split):
        return len(self._split_chars[split]) * len(self.rotations)

    def _class_names(self, split):
        return [f"{self.characters[c]}/rot{r}" for c in self._split_chars[split].tolist() for r in self.rotations]

    def _gather(self, split, classes, images):
        R = len(self.rotations)
        chars = self._split_chars[split][classes // R]
        ks = self._rot_k[classes % R]
        x = self.raw_images[chars[:, None], images]  # [M, J, S, S]
        for k in ks.unique().tolist():
            if k:
                m = ks == k
                x[m] = torch.rot90(x[m], k, dims=(-2, -1))
        return x.unsqueeze(2)

    def __repr__(self):
        return (f"Omniglot(root={self.root!r}, characters={self.num_characters}, images_per_class="
                f"{self.images_per_class}, rotations={self.rotations}, class_split={self.class_split!r}, "
                f"split_classes={self.split_classes})")


# ----------------------------------------------------------------------------------------------
# Mini-ImageNet


