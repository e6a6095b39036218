"""Atomic file writes: a temporary file beside the target, flushed to disk, then renamed over it.

A reader sees the old file or the new one, never half of one, and a crash or Ctrl-C mid-write
leaves the old file. The temporary file is created with mode 0666 less the umask, as ``open``
would create the target (``mkstemp``'s 0600 would survive the rename).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def _temporary(path: Path) -> Path:
    """A fresh name beside ``path`` (same folder, so the rename never crosses file systems)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def write(path: str | Path, fill: Callable, binary: bool = False) -> None:
    """Create ``path`` (and its folder) atomically; ``fill(f)`` writes the content to the open file."""
    path = Path(path)
    tmp = _temporary(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_file(path: str | Path, export: Callable[[Path], object]) -> None:
    """Create ``path`` (and its folder) atomically from a writer that takes a file name, not an open
    file (``torch.profiler``'s ``export_chrome_trace``): ``export(tmp)`` writes the temporary file."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        export(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
