"""Atomic writes: write a temporary file in the target's folder, then rename it over the target.

A reader (or a crash) never sees a half-written file; a failed write leaves the old file intact.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_write(path: Path):
    """Yields a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; the file should get the usual permissions
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def ensure_writable(folder: Path, fix: str, keep: bool = True) -> Path:
    """Create ``folder`` and write a probe file there, so a read-only or impossible output folder is one
    line before any work is done, not a traceback after an epoch. ``keep=False``: remove again the folders the
    probe created (they appear with the first file written there, so a failed start leaves none behind)."""
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise UserError(f"{folder}: cannot write there ({exc.strerror or type(exc).__name__}); {fix}") from None
    if not keep:
        for made in created:  # innermost first
            made.rmdir()
    return folder
