"""Atomic file writes: a reader, or a crash, sees the old file or the new one, never a partial one."""

import io
import os
import tempfile

import torch

TMP_PREFIX = ".tmp-"
"""The prefix of the temporary files :func:`atomic_write_bytes` renames into place (one left
behind by a killed process is stale: :func:`amaml_ext.train.io.remove_stale_temp_files`)."""


def current_umask() -> int:
    """The process's umask (read from /proc where it can be, so as not to change it even
    briefly; else set and restored)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename:
    a reader (or a crash) sees either the old file or the new one, never a partial file. The
    file's mode follows the umask, as ``open(path, "w")`` would (``mkstemp`` makes it 0600).

    Raises:
        OSError: the directory cannot be written (the temporary file is removed).

    Example:
        >>> import os, tempfile
        >>> from amaml_ext.train import atomic_write_bytes
        >>> tmp = tempfile.TemporaryDirectory(); path = os.path.join(tmp.name, "notes.txt")
        >>> atomic_write_bytes(path, b"hello")
        >>> with open(path, "rb") as f:
        ...     f.read(), os.listdir(tmp.name)
        (b'hello', ['notes.txt'])
        >>> tmp.cleanup()
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def torch_bytes(obj) -> bytes:
    """``torch.save(obj)`` into bytes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
