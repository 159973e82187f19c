"""Reading Omniglot's released files (a zip or the unpacked folder) and decoding images with
Pillow; a damaged file raises :class:`~amaml_ext.data.files.DataFileError` naming it."""

import io
import os
from typing import Dict, List, Tuple

import numpy as np

from ..files import DataFileError, open_zip, read_bytes, read_member

#: Pillow resampling filters accepted by the datasets' ``resample`` argument
RESAMPLE = ("lanczos", "bilinear", "bicubic", "nearest")


def pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover
        raise ImportError("amaml_ext.data.images needs Pillow to decode images: pip install Pillow") from e
    return Image


def resample_filter(name: str):
    Image = pil()
    return {"lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
            "nearest": Image.NEAREST}[name]


def decode(data: bytes, size: int, mode: str, resample, what: str) -> np.ndarray:
    """Bytes of an image file -> uint8 array [size, size] (mode "L") or [size, size, 3] ("RGB")."""
    Image = pil()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert(mode)
            if im.size != (size, size):
                im = im.resize((size, size), resample)
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise DataFileError(f"cannot decode image {what}: {type(e).__name__}: {e}") from e



class ZipSource:
    """``<prefix>.zip`` with members ``<prefix>/<Alphabet>/<character>/<file>.png``."""

    def __init__(self, path: str, prefix: str):
        self.path, self.prefix, self.kind = path, prefix, "zip"
        self.what = f"the released Omniglot {prefix}.zip (PNGs at {prefix}/<Alphabet>/<character>/<file>.png)"
        self.zf = open_zip(path, self.what)

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
                raise DataFileError(f"unexpected member {info.filename!r} in {self.path!r}: expected PNGs at "
                                    f"{self.prefix}/<Alphabet>/<character>/<file>.png")
            chars.setdefault((parts[1], parts[2]), []).append((info.filename, (info.file_size, info.CRC)))
        if not chars:
            found = f" (its top-level entries: {sorted(other_tops)[:5]})" if other_tops else ""
            raise DataFileError(f"no PNGs at {self.prefix}/<Alphabet>/<character>/<file>.png in zip "
                                f"{self.path!r}{found}")
        return chars

    def read(self, name: str) -> bytes:
        return read_member(self.zf, name, self.path, "a PNG of " + self.what)

    def close(self):
        self.zf.close()


class DirSource:
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
                raise DataFileError(f"unexpected PNG {e.path!r}: expected PNGs at "
                                    f"{self.path}/<Alphabet>/<character>/<file>.png")
        if not alphabets:
            raise DataFileError(f"Omniglot folder {self.path!r} holds no alphabet folders: expected "
                                f"{self.path}/<Alphabet>/<character>/<file>.png")
        for a in alphabets:
            subs = visible(a.path)
            for e in subs:
                if e.is_file() and e.name.lower().endswith(".png"):
                    raise DataFileError(f"unexpected PNG {e.path!r}: expected PNGs at "
                                        f"{self.path}/<Alphabet>/<character>/<file>.png")
            char_dirs = [e for e in subs if e.is_dir()]
            if not char_dirs:
                raise DataFileError(f"alphabet folder {a.path!r} holds no character folders")
            for c in char_dirs:
                files = []
                for f in visible(c.path):
                    if f.is_dir():
                        raise DataFileError(f"unexpected folder {f.path!r}: expected PNGs at "
                                            f"{self.path}/<Alphabet>/<character>/<file>.png")
                    if f.name.lower().endswith(".png"):
                        st = f.stat()
                        files.append((f.path, (st.st_size, st.st_mtime_ns)))
                chars[(a.name, c.name)] = files
        return chars

    def read(self, name: str) -> bytes:
        return read_bytes(name, f"an Omniglot PNG of {self.path}/<Alphabet>/<character>/<file>.png")

    def close(self):
        pass


def open_source(folder: str, prefix: str):
    zpath, dpath = os.path.join(folder, prefix + ".zip"), os.path.join(folder, prefix)
    if os.path.isfile(zpath):
        return ZipSource(zpath, prefix)
    if os.path.isdir(dpath):
        return DirSource(dpath, prefix)
    raise FileNotFoundError(f"Omniglot's {prefix} is missing: expected the zip {zpath!r} or the unpacked folder "
                            f"{dpath!r} (with {prefix}/<Alphabet>/<character>/<file>.png)")

