"""Atomic file writes: a temporary file in the same folder, flushed, then os.replace.

A reader (or a crash) sees either the old file or the whole new one, never half of it.
``atomic_write_text`` / ``atomic_write_bytes`` for data in memory, ``atomic_open`` for
writers that want a file object (``PIL.Image.save``, ``np.save``, ``json.dump``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text", "free_space"]

_UMASK = os.umask(0o022)  # read the process umask once (set it straight back)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file next to `path`; on a clean exit fsync it and os.replace onto path.

    On an exception the temporary file is removed and `path` is left as it was.
    """
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_open: mode must be 'w', 'wt' or 'wb', got {mode!r}")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to path atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write text to path atomically."""
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)


def free_space(path: str | os.PathLike) -> str:
    """Free space on the disk holding path (or its nearest existing parent): '1.20 GiB free'."""
    path = Path(path)
    for p in (path, *path.parents):
        try:
            return f"{shutil.disk_usage(p).free / 2**30:.2f} GiB free"
        except OSError:
            continue
    return "free space unknown"
