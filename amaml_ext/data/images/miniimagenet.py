"""Mini-ImageNet (Vinyals et al. 2016; Ravi & Larochelle's class splits) as a :class:`FewShotImages`."""

import csv
import io
import os
from typing import Dict, List, Tuple

import numpy as np
import torch

from ... import _checks
from ..files import DataFileError, decode_text, read_bytes
from ..root import data_root
from .cache import _CACHE_VERSION, digest, load_cache, save_cache
from .fewshot import FewShotImages
from . import sources as _sources
from .sources import RESAMPLE, resample_filter

_MINI_SPLITS = ("train", "val", "test")


def _read_split_csv(path: str) -> List[Tuple[str, str]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Mini-ImageNet split file {path!r} does not exist (expected the Ravi & Larochelle "
                                f"CSV with header 'filename,label')")
    what = "the Ravi & Larochelle CSV with header 'filename,label'"
    text = decode_text(read_bytes(path, what), path, what)
    rows = list(csv.reader(io.StringIO(text, newline="")))
    rows = [(i, [c.strip() for c in r]) for i, r in enumerate(rows, start=1) if any(c.strip() for c in r)]
    if not rows or rows[0][1] != ["filename", "label"]:
        raise DataFileError(f"Mini-ImageNet split file {path!r} must start with the header 'filename,label', "
                            f"got {','.join(rows[0][1]) if rows else 'an empty file'!r}")
    out, seen = [], set()
    for i, r in rows[1:]:
        if len(r) != 2 or not r[0] or not r[1]:
            raise DataFileError(f"{path!r} line {i}: expected 'filename,label', got {','.join(r)!r}")
        if r[0] in seen:
            raise DataFileError(f"{path!r} line {i}: image {r[0]!r} is listed twice")
        seen.add(r[0])
        out.append((r[0], r[1]))
    if not out:
        raise DataFileError(f"Mini-ImageNet split file {path!r} lists no images")
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

    Raises:
        FileNotFoundError: the root, a split CSV or an image does not exist, naming it.
        ValueError: a bad argument; ``DataFileError`` (a ValueError): a malformed CSV or an
            unreadable image, naming the file (and line).

    Example:
        >>> import os, tempfile
        >>> from PIL import Image
        >>> from amaml_ext.tasks import MiniImageNet
        >>> tmp = tempfile.TemporaryDirectory(); images = os.path.join(tmp.name, "miniimagenet", "images")
        >>> os.makedirs(images)
        >>> for split, labels in (("train", "abc"), ("val", "de"), ("test", "fg")):   # 2 images per class
        ...     with open(os.path.join(tmp.name, "miniimagenet", split + ".csv"), "w") as f:
        ...         _ = f.write("filename,label\\n")
        ...         for label in labels:
        ...             for k in (0, 1):
        ...                 Image.new("RGB", (100, 90), (200 * k, 50, 50)).save(os.path.join(images, f"{label}{k}.jpg"))
        ...                 _ = f.write(f"{label}{k}.jpg,{label}\\n")
        >>> mini = MiniImageNet(tmp.name, image_size=16)
        >>> mini.split_classes, mini.images_per_class
        ({'train': 3, 'val': 2, 'test': 2}, 2)
        >>> mini.sample("train", ways=2, shots=1, query_shots=1, seed=0).support[0].shape   # RGB, channels first
        torch.Size([1, 2, 3, 16, 16])
        >>> tmp.cleanup()
    """

    splits = _MINI_SPLITS
    default_ways, default_shots, default_query_shots = 5, 1, 15
    invert = False

    def __init__(self, root=None, *, image_size: int = 84, resample: str = "lanczos", cache_dir=None,
                 preload: bool = False):
        self.image_size = _checks.integer("image_size", image_size)
        if resample not in RESAMPLE:
            raise ValueError(f"argument 'resample' must be one of {list(RESAMPLE)}, got {resample!r}")
        self.resample = resample
        self.cache_dir = None if cache_dir is None else _checks.path("cache_dir", cache_dir)
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
                    raise DataFileError(f"class {label!r} is in both {label_split[label]}.csv and {split}.csv: "
                                        f"the splits must have disjoint classes")
                if fname in file_split:
                    raise DataFileError(f"image {fname!r} is listed in both {file_split[fname]}.csv and {split}.csv")
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
            raise DataFileError("Mini-ImageNet classes must all have the same number of images; found "
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
            key = digest([_CACHE_VERSION, "miniimagenet", split, S, self.resample, fp])
            cache = os.path.join(self.cache_dir, f"miniimagenet_{split}_{S}px_{self.resample}_{key[:16]}.pt")
            obj = load_cache(cache, key)
            self.cache_files[split] = cache
        if obj is not None and tuple(obj["images"].shape) == shape and obj["images"].dtype == torch.uint8:
            data = obj["images"]
        else:
            filt = resample_filter(self.resample)
            arr = np.empty((len(files), self.images_per_class, S, S, 3), dtype=np.uint8)
            for i, fs in enumerate(files):
                for j, f in enumerate(fs):
                    arr[i, j] = _sources.decode(read_bytes(f, "a Mini-ImageNet image"), S, "RGB", filt, repr(f))
            data = torch.from_numpy(arr).permute(0, 1, 4, 2, 3).contiguous()
            if cache is not None:
                save_cache(cache, {"version": _CACHE_VERSION, "key": key, "images": data})
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
