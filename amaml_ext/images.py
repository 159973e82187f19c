"""Few-shot image classification task families of the paper (Sec. 5.4): Omniglot and Mini-ImageNet.

The paper follows the standard protocol of MAML / iMAML (Finn et al. 2017; Rajeswaran et al.
2019; Vinyals et al. 2016): Omniglot 20-way 1-shot and Mini-ImageNet 5-way 1-shot with the
:class:`~amaml_ext.models.Conv4` net. A dataset object decodes the images once into a uint8
tensor in memory and draws N-way K-shot tasks as a :class:`~amaml_ext.tasks.TaskBatch`:

    >>> om = Omniglot("/data")                       # or root=None: $AMAML_DATA_ROOT
    >>> b = om.sample("train", n_tasks=16, ways=20, shots=1, query_shots=1, seed=0)
    >>> b.support[0].shape, b.support[1].shape       # x [B, N*K, 1, 28, 28], y [B, N*K] int64
    (torch.Size([16, 20, 1, 28, 28]), torch.Size([16, 20]))

Data layout (``root`` is the data root, default ``$AMAML_DATA_ROOT``; nothing is copied):

* ``root/omniglot/images_background`` and ``root/omniglot/images_evaluation``: each either the
  released zip (``images_background.zip``, members
  ``images_background/<Alphabet>/characterNN/XXXX_YY.png``) or the unpacked folder
  (``images_background/<Alphabet>/characterNN/XXXX_YY.png``). When both exist the zip is read.
* ``root/miniimagenet/{train,val,test}.csv`` (Ravi & Larochelle 2017, header ``filename,label``)
  and ``root/miniimagenet/images/`` holding ``<filename>`` (flat, as released) or
  ``<label>/<filename>``.

Preprocessing:

* Omniglot: each PNG (105x105, 1-bit) is converted to 8-bit greyscale and resized to
  ``image_size`` (28) with Pillow's Lanczos filter (``resample="lanczos"``: anti-aliased grey
  levels). Note that MAML's resize script calls ``resize(..., LANCZOS)`` on the 1-bit image, for
  which Pillow silently uses nearest-neighbour; ``resample="nearest"`` reproduces those binary
  images exactly. Pixels are floats in [0, 1], **inverted** as in MAML (``1 - v / 255``:
  strokes are 1, background 0); ``invert=False`` keeps the file's polarity (strokes 0).
* Classes are characters times rotations: each of ``rotations`` (default 0, 90, 180, 270 degrees,
  counter-clockwise, ``torch.rot90`` on the resized image) makes a new class (Santoro et al. 2016;
  Vinyals et al. 2016), so 1,623 characters give 6,492 classes. The split is by *character*: all
  rotations of a character are in the same split.
* Split ``class_split="shuffled"`` (default; MAML's): the 1,623 characters of both folders, in
  sorted order (background first, then evaluation; alphabet; character), are shuffled with
  ``random.Random(split_seed).shuffle`` (MAML calls ``random.seed(1); random.shuffle(...)``; its
  list comes from ``os.listdir`` so its exact order can't be reproduced); the first ``n_train``
  (1,200) characters are for meta-training (4,800 classes), the rest (423 characters, 1,692
  classes) for meta-test. ``n_val`` > 0 moves the last ``n_val`` of the ``n_train`` characters
  to a ``"val"`` split (MAML: ``n_val=100``). ``class_split="background"`` is Lake et al.'s
  split: ``images_background`` (964 characters, 30 alphabets) for training, ``images_evaluation``
  (659 characters, 20 alphabets) for test.
* Mini-ImageNet: images converted to RGB and resized to ``image_size`` x ``image_size`` (84)
  with Lanczos, like Ravi & Larochelle's script (the aspect ratio is not kept); floats in [0, 1],
  channels first. The three CSVs are the train/val/test class splits (64/16/20 classes, 600
  images each). A split's images are decoded the first time it is used (``preload=True``: at
  construction); the train split takes ~0.8 GB as uint8.

Sampling (:meth:`FewShotImages.sample`): for each task, ``ways`` distinct classes of the split
in a random order (the order is the labels: label ``i`` is the ``i``-th drawn class, so labels are
randomly permuted per task), and for each class ``shots + query_shots`` distinct images of its
``images_per_class``: the first ``shots`` go to the support set, the others to the query set.
The support is class-major: ``y = [0]*K + [1]*K + ...``. Everything is drawn on the CPU from a
``torch.Generator`` (``seed=`` or ``generator=``), so a seed gives the same tasks everywhere.

``cache_dir`` (optional, never inside the repository: the data terms forbid copies there) keeps the
decoded uint8 tensors in a ``.pt`` file keyed by the files' names, sizes and CRCs / mtimes and the
preprocessing settings; the next construction loads it instead of decoding again.

:func:`confidence_interval` gives the mean and the 95% half-width over test-task accuracies.
"""

import csv
import hashlib
import io
import json
import math
import os
import random
import warnings
import zipfile
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from .tasks import TaskBatch

__all__ = ["FewShotImages", "Omniglot", "MiniImageNet", "TaskIndex", "confidence_interval", "data_root",
           "ENV_ROOT"]

#: the environment variable holding the default data root
ENV_ROOT = "AMAML_DATA_ROOT"
_CACHE_VERSION = 1
_OMNIGLOT_SOURCES = ("images_background", "images_evaluation")
_MINI_SPLITS = ("train", "val", "test")
_RESAMPLE = ("lanczos", "bilinear", "bicubic", "nearest")


# ----------------------------------------------------------------------------------------------
# helpers


def _check_int(name: str, v, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        what = "a positive int" if lo == 1 else f"an int >= {lo}"
        raise ValueError(f"argument '{name}' must be {what}, got {v!r}")
    return int(v)


def _check_path(name: str, v) -> str:
    if isinstance(v, bool) or not isinstance(v, (str, os.PathLike)) or not os.fspath(v):
        raise ValueError(f"argument '{name}' must be a path (str or os.PathLike), got {v!r}")
    return os.fspath(v)


def data_root(root=None) -> str:
    """``root`` if given, else ``$AMAML_DATA_ROOT``; an existing folder, else a clear error."""
    if root is None:
        root = os.environ.get(ENV_ROOT) or None
        if root is None:
            raise ValueError(f"argument 'root' was not given and the environment variable {ENV_ROOT} is not set: "
                             f"pass root=<the folder holding omniglot/ and miniimagenet/> or set {ENV_ROOT}")
        origin = f"{ENV_ROOT}={root!r}"
    else:
        root = _check_path("root", root)
        origin = f"root={root!r}"
    if not os.path.exists(root):
        raise FileNotFoundError(f"data root {origin} does not exist (expected a folder holding omniglot/ "
                                f"and/or miniimagenet/)")
    if not os.path.isdir(root):
        raise ValueError(f"data root {origin} is not a folder")
    return root


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover
        raise ImportError("amaml_ext.images needs Pillow to decode images: pip install Pillow") from e
    return Image


def _resample_filter(name: str):
    Image = _pil()
    return {"lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
            "nearest": Image.NEAREST}[name]


def _decode(data: bytes, size: int, mode: str, resample, what: str) -> np.ndarray:
    """Bytes of an image file -> uint8 array [size, size] (mode "L") or [size, size, 3] ("RGB")."""
    Image = _pil()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert(mode)
            if im.size != (size, size):
                im = im.resize((size, size), resample)
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ValueError(f"cannot decode image {what}: {type(e).__name__}: {e}") from e


def _load_cache(path: str, key: str):
    if not os.path.isfile(path):
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or obj.get("version") != _CACHE_VERSION or obj.get("key") != key:
            raise ValueError("stale or foreign cache file")
        return obj
    except Exception as e:
        warnings.warn(f"ignoring unreadable image cache {path!r} ({e}); decoding the images again")
        return None


def _save_cache(path: str, obj: dict) -> None:
    from .train import atomic_write_bytes
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


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
        ways = _check_int("ways", ways)
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
        B = _check_int("n_tasks", n_tasks)
        N = _check_int("ways", self.default_ways if ways is None else ways)
        K = _check_int("shots", self.default_shots if shots is None else shots)
        Q = _check_int("query_shots", self.default_query_shots if query_shots is None else query_shots, lo=0)
        C, P = self._n_classes(split), self.images_per_class
        if N > C:
            raise ValueError(f"argument 'ways' must be at most the number of classes of split {split!r} ({C}), got {N}")
        if K + Q > P:
            raise ValueError(f"arguments 'shots' + 'query_shots' must be at most images_per_class ({P}), "
                             f"got {K} + {Q} = {K + Q}")
        if seed is not None and generator is not None:
            raise ValueError("give at most one of the arguments 'seed' and 'generator', got both")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
                raise ValueError(f"argument 'seed' must be an int, got {seed!r}")
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


class _ZipSource:
    """``<prefix>.zip`` with members ``<prefix>/<Alphabet>/<character>/<file>.png``."""

    def __init__(self, path: str, prefix: str):
        self.path, self.prefix, self.kind = path, prefix, "zip"
        try:
            self.zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"{path!r} is not a readable zip file ({e}); expected the released Omniglot "
                             f"{prefix}.zip") from e

    def list(self):
        chars: Dict[Tuple[str, str], List[Tuple[str, Tuple]]] = {}
        other_tops = set()
        for info in self.zf.infolist():
            parts = [p for p in info.filename.split("/") if p]
            if info.is_dir() or not parts or any(p.startswith(".") or p == "__MACOSX" for p in parts):
                continue
            if parts[0] != self.prefix:
                other_tops.add(parts[0])
                continue
            if not parts[-1].lower().endswith(".png"):
                continue
            if len(parts) != 4:
                raise ValueError(f"unexpected member {info.filename!r} in {self.path!r}: expected PNGs at "
                                 f"{self.prefix}/<Alphabet>/<character>/<file>.png")
            chars.setdefault((parts[1], parts[2]), []).append((info.filename, (info.file_size, info.CRC)))
        if not chars:
            found = f" (its top-level entries: {sorted(other_tops)[:5]})" if other_tops else ""
            raise ValueError(f"no PNGs at {self.prefix}/<Alphabet>/<character>/<file>.png in zip {self.path!r}{found}")
        return chars

    def read(self, name: str) -> bytes:
        return self.zf.read(name)

    def close(self):
        self.zf.close()


class _DirSource:
    """A folder ``<prefix>/<Alphabet>/<character>/<file>.png``."""

    def __init__(self, path: str, prefix: str):
        # tolerate a doubly nested unzip: images_background/images_background/<Alphabet>/...
        inner = os.path.join(path, prefix)
        entries = [e for e in os.listdir(path) if not e.startswith(".") and e != "__MACOSX"]
        if entries == [prefix] and os.path.isdir(inner):
            path = inner
        self.path, self.prefix, self.kind = path, prefix, "folder"

    def list(self):
        chars: Dict[Tuple[str, str], List[Tuple[str, Tuple]]] = {}
        visible = lambda d: sorted((e for e in os.scandir(d) if not e.name.startswith(".") and e.name != "__MACOSX"),  # noqa: E731
                                    key=lambda e: e.name)
        alphabets = [e for e in visible(self.path) if e.is_dir()]
        for e in visible(self.path):
            if e.is_file() and e.name.lower().endswith(".png"):
                raise ValueError(f"unexpected PNG {e.path!r}: expected PNGs at {self.path}/<Alphabet>/<character>/<file>.png")
        if not alphabets:
            raise ValueError(f"Omniglot folder {self.path!r} holds no alphabet folders: expected "
                             f"{self.path}/<Alphabet>/<character>/<file>.png")
        for a in alphabets:
            subs = visible(a.path)
            for e in subs:
                if e.is_file() and e.name.lower().endswith(".png"):
                    raise ValueError(f"unexpected PNG {e.path!r}: expected PNGs at "
                                     f"{self.path}/<Alphabet>/<character>/<file>.png")
            char_dirs = [e for e in subs if e.is_dir()]
            if not char_dirs:
                raise ValueError(f"alphabet folder {a.path!r} holds no character folders")
            for c in char_dirs:
                files = []
                for f in visible(c.path):
                    if f.is_dir():
                        raise ValueError(f"unexpected folder {f.path!r}: expected PNGs at "
                                         f"{self.path}/<Alphabet>/<character>/<file>.png")
                    if f.name.lower().endswith(".png"):
                        st = f.stat()
                        files.append((f.path, (st.st_size, st.st_mtime_ns)))
                chars[(a.name, c.name)] = files
        return chars

    def read(self, name: str) -> bytes:
        with open(name, "rb") as f:
            return f.read()

    def close(self):
        pass


def _open_source(folder: str, prefix: str):
    zpath, dpath = os.path.join(folder, prefix + ".zip"), os.path.join(folder, prefix)
    if os.path.isfile(zpath):
        return _ZipSource(zpath, prefix)
    if os.path.isdir(dpath):
        return _DirSource(dpath, prefix)
    raise FileNotFoundError(f"Omniglot's {prefix} is missing: expected the zip {zpath!r} or the unpacked folder "
                            f"{dpath!r} (with {prefix}/<Alphabet>/<character>/<file>.png)")


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
    """

    default_ways, default_shots, default_query_shots = 20, 1, 1

    def __init__(self, root=None, *, image_size: int = 28, rotations: Sequence[int] = (0, 90, 180, 270),
                 class_split: str = "shuffled", n_train: Optional[int] = None, n_val: int = 0, split_seed: int = 1,
                 invert: bool = True, resample: str = "lanczos", cache_dir=None):
        self.image_size = _check_int("image_size", image_size)
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
            _check_int("n_train", n_train)
        self.n_val = _check_int("n_val", n_val, lo=0)
        if isinstance(split_seed, bool) or not isinstance(split_seed, (int, np.integer)):
            raise ValueError(f"argument 'split_seed' must be an int, got {split_seed!r}")
        if not isinstance(invert, bool):
            raise ValueError(f"argument 'invert' must be a bool, got {invert!r}")
        self.invert = invert
        if resample not in _RESAMPLE:
            raise ValueError(f"argument 'resample' must be one of {list(_RESAMPLE)}, got {resample!r}")
        self.resample = resample
        cache_dir = None if cache_dir is None else _check_path("cache_dir", cache_dir)

        self.root = data_root(root)
        self.folder = os.path.join(self.root, "omniglot")
        if not os.path.isdir(self.folder):
            raise FileNotFoundError(f"Omniglot folder {self.folder!r} does not exist: expected "
                                    f"{self.folder}/images_background(.zip) and {self.folder}/images_evaluation(.zip)")
        self._load(cache_dir)
        self._make_splits(n_train, int(split_seed))

    # -- loading
    def _load(self, cache_dir: Optional[str]) -> None:
        sources = [_open_source(self.folder, p) for p in _OMNIGLOT_SOURCES]
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
                        raise ValueError(f"Omniglot character {name!r} ({s.kind} {s.path!r}) holds no PNG")
                    names.append(name)
                    files.append((s, [e[0] for e in entries]))
                    fingerprint.append([name, [[os.path.basename(e[0]), list(e[1])] for e in entries]])
            counts = {len(f) for _, f in files}
            if len(counts) != 1:
                per = {}
                for n, (_, f) in zip(names, files):
                    per.setdefault(len(f), n)
                raise ValueError("Omniglot characters must all have the same number of drawings; found "
                                 + ", ".join(f"{k} (e.g. {v!r})" for k, v in sorted(per.items())))
            P = counts.pop()
            S = self.image_size
            key = _digest([_CACHE_VERSION, "omniglot", S, self.resample, fingerprint])
            cache = None if cache_dir is None else os.path.join(cache_dir, f"omniglot_{S}px_{self.resample}_{key[:16]}.pt")
            obj = None if cache is None else _load_cache(cache, key)
            if obj is not None and obj.get("names") == names and tuple(obj["images"].shape) == (len(names), P, S, S) \
                    and obj["images"].dtype == torch.uint8:
                images = obj["images"]
            else:
                filt = _resample_filter(self.resample)
                arr = np.empty((len(names), P, S, S), dtype=np.uint8)
                for i, (s, fs) in enumerate(files):
                    for j, f in enumerate(fs):
                        arr[i, j] = _decode(s.read(f), S, "L", filt, f"{f!r} in {s.path!r}" if s.kind == "zip" else repr(f))
                images = torch.from_numpy(arr)
                if cache is not None:
                    _save_cache(cache, {"version": _CACHE_VERSION, "key": key, "names": names, "images": images})
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
        return len(self.characters)

    @property
    def split_characters(self) -> Dict[str, int]:
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


def _read_split_csv(path: str) -> List[Tuple[str, str]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Mini-ImageNet split file {path!r} does not exist (expected the Ravi & Larochelle "
                                f"CSV with header 'filename,label')")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    rows = [(i, [c.strip() for c in r]) for i, r in enumerate(rows, start=1) if any(c.strip() for c in r)]
    if not rows or rows[0][1] != ["filename", "label"]:
        raise ValueError(f"Mini-ImageNet split file {path!r} must start with the header 'filename,label', "
                         f"got {','.join(rows[0][1]) if rows else 'an empty file'!r}")
    out, seen = [], set()
    for i, r in rows[1:]:
        if len(r) != 2 or not r[0] or not r[1]:
            raise ValueError(f"{path!r} line {i}: expected 'filename,label', got {','.join(r)!r}")
        if r[0] in seen:
            raise ValueError(f"{path!r} line {i}: image {r[0]!r} is listed twice")
        seen.add(r[0])
        out.append((r[0], r[1]))
    if not out:
        raise ValueError(f"Mini-ImageNet split file {path!r} lists no images")
    return out


class MiniImageNet(FewShotImages):
    """Mini-ImageNet (Vinyals et al. 2016) with Ravi & Larochelle's class splits.

    Args:
        root: the data root holding ``miniimagenet/{train,val,test}.csv`` and
            ``miniimagenet/images/``; default ``$AMAML_DATA_ROOT``.
        image_size: side of the resized RGB images (84).
        resample: Pillow filter: ``"lanczos"`` (as Ravi & Larochelle's script), ``"bilinear"``,
            ``"bicubic"`` or ``"nearest"``.
        cache_dir: optional folder for per-split ``.pt`` caches of the decoded images.
        preload: decode all splits now (default: each split on first use).

    Attributes: ``split_classes`` (64/16/20), ``images_per_class`` (600), ``num_classes`` (100),
    ``labels[split]`` (the WordNet ids, sorted: class ``i`` of a split is ``labels[split][i]``).
    """

    splits = _MINI_SPLITS
    default_ways, default_shots, default_query_shots = 5, 1, 15
    invert = False

    def __init__(self, root=None, *, image_size: int = 84, resample: str = "lanczos", cache_dir=None,
                 preload: bool = False):
        self.image_size = _check_int("image_size", image_size)
        if resample not in _RESAMPLE:
            raise ValueError(f"argument 'resample' must be one of {list(_RESAMPLE)}, got {resample!r}")
        self.resample = resample
        self.cache_dir = None if cache_dir is None else _check_path("cache_dir", cache_dir)
        if not isinstance(preload, bool):
            raise ValueError(f"argument 'preload' must be a bool, got {preload!r}")
        self.root = data_root(root)
        self.folder = os.path.join(self.root, "miniimagenet")
        if not os.path.isdir(self.folder):
            raise FileNotFoundError(f"Mini-ImageNet folder {self.folder!r} does not exist: expected "
                                    f"{self.folder}/train.csv, val.csv, test.csv and {self.folder}/images/")
        self.image_folder = os.path.join(self.folder, "images")
        if not os.path.isdir(self.image_folder):
            raise FileNotFoundError(f"Mini-ImageNet image folder {self.image_folder!r} does not exist (expected "
                                    f"images/<filename> as listed in the split CSVs)")
        self.image_shape = (3, self.image_size, self.image_size)
        flat = {e.name for e in os.scandir(self.image_folder) if e.is_file()}
        self.labels: Dict[str, List[str]] = {}
        self._files: Dict[str, List[List[str]]] = {}
        label_split, file_split = {}, {}
        for split in self.splits:
            csv_path = os.path.join(self.folder, f"{split}.csv")
            by_label: Dict[str, List[str]] = {}
            for fname, label in _read_split_csv(csv_path):
                if label in label_split and label_split[label] != split:
                    raise ValueError(f"class {label!r} is in both {label_split[label]}.csv and {split}.csv: "
                                     f"the splits must have disjoint classes")
                if fname in file_split:
                    raise ValueError(f"image {fname!r} is listed in both {file_split[fname]}.csv and {split}.csv")
                label_split[label], file_split[fname] = split, split
                if fname in flat:
                    path = os.path.join(self.image_folder, fname)
                else:
                    path = os.path.join(self.image_folder, label, fname)
                    if not os.path.isfile(path):
                        raise FileNotFoundError(f"image {fname!r} (class {label!r}, listed in {csv_path!r}) not "
                                                f"found: expected {os.path.join(self.image_folder, fname)!r} or {path!r}")
                by_label.setdefault(label, []).append(path)
            self.labels[split] = sorted(by_label)
            self._files[split] = [sorted(by_label[lab]) for lab in self.labels[split]]
        counts = {}
        for split in self.splits:
            for lab, fs in zip(self.labels[split], self._files[split]):
                counts.setdefault(len(fs), f"{lab!r} in {split}.csv")
        if len(counts) != 1:
            raise ValueError("Mini-ImageNet classes must all have the same number of images; found "
                             + ", ".join(f"{k} (e.g. {v})" for k, v in sorted(counts.items())))
        self.images_per_class = counts.popitem()[0]
        self._data: Dict[str, torch.Tensor] = {}
        self.cache_files: Dict[str, str] = {}
        if preload:
            for split in self.splits:
                self.load(split)

    def load(self, split: str) -> torch.Tensor:
        """Decode (or read from the cache) the split's images: uint8 ``[classes, P, 3, S, S]``."""
        split = self._check_split(split)
        if split in self._data:
            return self._data[split]
        S, files = self.image_size, self._files[split]
        shape = (len(files), self.images_per_class, 3, S, S)
        cache = obj = None
        if self.cache_dir is not None:
            fp = []
            for lab, fs in zip(self.labels[split], files):
                for f in fs:
                    st = os.stat(f)
                    fp.append([lab, os.path.relpath(f, self.image_folder), st.st_size, st.st_mtime_ns])
            key = _digest([_CACHE_VERSION, "miniimagenet", split, S, self.resample, fp])
            cache = os.path.join(self.cache_dir, f"miniimagenet_{split}_{S}px_{self.resample}_{key[:16]}.pt")
            obj = _load_cache(cache, key)
            self.cache_files[split] = cache
        if obj is not None and tuple(obj["images"].shape) == shape and obj["images"].dtype == torch.uint8:
            data = obj["images"]
        else:
            filt = _resample_filter(self.resample)
            arr = np.empty((len(files), self.images_per_class, S, S, 3), dtype=np.uint8)
            for i, fs in enumerate(files):
                for j, f in enumerate(fs):
                    with open(f, "rb") as fh:
                        arr[i, j] = _decode(fh.read(), S, "RGB", filt, repr(f))
            data = torch.from_numpy(arr).permute(0, 1, 4, 2, 3).contiguous()
            if cache is not None:
                _save_cache(cache, {"version": _CACHE_VERSION, "key": key, "images": data})
        self._data[split] = data
        return data

    def _n_classes(self, split):
        return len(self.labels[split])

    def _class_names(self, split):
        return self.labels[split]

    def _gather(self, split, classes, images):
        return self.load(split)[classes[:, None], images]

    def __repr__(self):
        return (f"MiniImageNet(root={self.root!r}, split_classes={self.split_classes}, "
                f"images_per_class={self.images_per_class}, image_size={self.image_size})")


# ----------------------------------------------------------------------------------------------


def confidence_interval(accuracies, z: float = 1.96) -> Tuple[float, float]:
    """``(mean, z * std / sqrt(n))`` over per-task accuracies: the 95% confidence interval reported
    for few-shot benchmarks (``std`` with ``ddof=0``, i.e. ``np.std``, as MAML's evaluation code)."""
    if isinstance(accuracies, torch.Tensor):
        accuracies = accuracies.detach().cpu().double().numpy()
    try:
        a = np.asarray(accuracies, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"argument 'accuracies' must be a sequence of numbers, got {accuracies!r}") from e
    if a.size == 0:
        raise ValueError("argument 'accuracies' must hold at least one value, got an empty sequence")
    if not np.isfinite(a).all():
        raise ValueError(f"argument 'accuracies' must be finite, got {a[~np.isfinite(a)][:3].tolist()} among its values")
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not math.isfinite(z) or z <= 0:
        raise ValueError(f"argument 'z' must be a positive finite number, got {z!r}")
    return float(a.mean()), float(z * a.std() / math.sqrt(a.size))


# ----------------------------------------------------------------------------------------------
# a fixed, indexable set of episodes (for meta_train / meta_test)


class EpisodePool:
    """``size`` N-way K-shot episodes of one split, episode ``i`` drawn from a generator seeded
    by ``(seed, i)``: indexable like :class:`amaml_ext.tasks.TaskPool` (``len``, ``batch(index,
    device=, dtype=)``, ``all()``) without holding the images of every episode, and the same
    episodes on every run, so a resumed meta-training run sees the same tasks. A huge ``size``
    (the default) makes it a stream of fresh episodes."""

    def __init__(self, dataset: FewShotImages, split: str = "train", *, size: int = 10 ** 9, ways: Optional[int] = None,
                 shots: Optional[int] = None, query_shots: Optional[int] = None, seed: int = 0):
        self.family = dataset
        self.split = dataset._check_split(split)
        self.size = _check_int("size", size)
        self.ways = _check_int("ways", dataset.default_ways if ways is None else ways)
        self.shots = _check_int("shots", dataset.default_shots if shots is None else shots)
        self.query_shots = _check_int("query_shots", dataset.default_query_shots if query_shots is None
                                      else query_shots, lo=0)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"argument 'seed' must be an int, got {seed!r}")
        self.seed = int(seed)
        # validate ways/shots against the split now, not at the first batch
        dataset.sample(self.split, 1, self.ways, self.shots, self.query_shots, seed=0)

    def __len__(self) -> int:
        return self.size

    def batch(self, index, device=None, dtype=torch.float32) -> TaskBatch:
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.size):
            raise IndexError(f"episode index out of range 0..{self.size - 1}: {index.tolist()}")
        parts = [self.family.sample(self.split, 1, self.ways, self.shots, self.query_shots,
                                    seed=self.seed * 1_000_003 + int(i), dtype=dtype or torch.float32)
                 for i in index.tolist()]
        cat = lambda k, j: torch.cat([getattr(p, k)[j] for p in parts])  # noqa: E731
        b = TaskBatch((cat("support", 0), cat("support", 1)), (cat("query", 0), cat("query", 1)))
        return b.to(device=device) if device is not None else b

    def all(self, device=None, dtype=torch.float32) -> TaskBatch:
        return self.batch(torch.arange(self.size), device=device, dtype=dtype)
