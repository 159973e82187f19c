"""Reading the released data files: :class:`DataFileError`, raised for a file that is there but
damaged or not what it should be (naming the file, the zip member, and what is wrong), and the
reads that turn the standard library's errors (``zlib.error``, ``BadZipFile``, ``OSError``,
``UnicodeDecodeError``) into it."""

import zipfile
import zlib

#: what a damaged zip member raises while it is read (a corrupt deflate stream, a bad CRC or
#: local header, a truncated stream, an unreadable file)
ZIP_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError)


class DataFileError(ValueError):
    """A data file that exists but cannot be read as what it should hold (damaged, truncated, not
    text, malformed). A ``ValueError``, as the command's data errors: ``amaml-ext`` shows the
    message without a traceback."""


def open_zip(path: str, what: str, reason: str = "is not a readable zip file") -> zipfile.ZipFile:
    """``zipfile.ZipFile(path)``; a damaged or truncated archive raises :class:`DataFileError`."""
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataFileError(f"{path!r} {reason} ({e}); expected {what}") from None


def read_member(zf: zipfile.ZipFile, member: str, path: str, what: str) -> bytes:
    """The bytes of ``member`` of the open zip ``zf`` (read from ``path``); a damaged member
    raises :class:`DataFileError` naming both."""
    try:
        return zf.read(member)
    except ZIP_READ_ERRORS as e:
        kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
        raise DataFileError(f"{path!r}: member {member!r} is damaged and cannot be read ({kind}: {e}); "
                            f"expected {what} (the archive is corrupt or truncated: download it again)") from None


def read_bytes(path: str, what: str) -> bytes:
    """The bytes of the file ``path``; an unreadable one raises :class:`DataFileError`
    (a missing one ``FileNotFoundError``)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise DataFileError(f"cannot read {path!r} ({e.strerror or e}); expected {what}") from None


def decode_text(data: bytes, path: str, what: str) -> str:
    """UTF-8 text (a byte-order mark is dropped); bytes that are not UTF-8 raise
    :class:`DataFileError` naming the line and the byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataFileError(f"{path!r} is not UTF-8 text: byte {data[e.start:e.start + 1]!r} at line {line} "
                            f"({e.reason}); expected {what}") from None

