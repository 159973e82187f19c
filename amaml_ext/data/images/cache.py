"""An optional on-disk cache of decoded images: a ``.pt`` file keyed by the source files and the
preprocessing settings, written atomically; a stale or unreadable one is ignored with a warning."""

import hashlib
import json
import os
import warnings

import torch

from ..._io import atomic_write_bytes, torch_bytes

_CACHE_VERSION = 1


def load_cache(path: str, key: str):
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


def save_cache(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_bytes(path, torch_bytes(obj))


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()

