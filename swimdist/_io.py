"""Paths and atomic writes: the one place that knows local paths from fsspec URLs.

``write_atomic`` is how every file swimdist produces is written (models, status, metrics,
store metadata, checkpoints, locks' records, predictions): a reader sees the old file or the
whole new one, never a part, and a crash never leaves a half-written file in its place.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import IO

__all__ = ["is_url", "local_path", "write_atomic", "write_bytes_atomic", "write_text_atomic"]


def is_url(path) -> bool:
    """True for an fsspec URL other than a plain local path or ``file://``."""
    return "://" in str(path) and not str(path).startswith("file://")


def local_path(path) -> str:
    """``path`` without a ``file://`` prefix."""
    p = str(path)
    return p[len("file://"):] if p.startswith("file://") else p


def write_atomic(path: str, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(binary file)`` so that ``path`` ends up holding all of it or is unchanged.

    Local paths: a temporary file beside ``path``, flushed and fsynced, then ``os.replace``
    over it (atomic on POSIX and Windows). fsspec URLs: one object written in one call
    (object stores replace whole objects atomically).
    """
    if is_url(path):
        import fsspec

        with fsspec.open(str(path), "wb") as f:
            write(f)
        return
    path = local_path(path)
    if os.path.isdir(path):
        from .exceptions import StoreError

        raise StoreError(f"{path!r} is a directory; give the path of a file in it (e.g. "
                         f"{os.path.join(path, 'model.npz')!r}).")
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`write_atomic`)."""
    write_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`write_atomic`)."""
    write_bytes_atomic(path, text.encode())
