"""Atomic file writes: a file is either the complete new version or the old one, never half-written.

Every output and cache entry goes through here: write to a temporary file in the same folder (so the
rename stays on one filesystem), then ``os.replace`` it over the target. A killed process leaves at most
a hidden ``.<name>-*.tmp`` file, never a truncated result.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path next to ``path``; on normal exit it replaces ``path``, on error it is removed.

    ``suffix`` matters for writers that infer the format from the name (matplotlib's ``savefig``).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", suffix=suffix, dir=target.parent)
    os.close(fd)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; results get the usual permissions
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
    return Path(path)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (a PNG, for instance); returns the path."""
    with replacing(path, suffix=Path(path).suffix or ".tmp") as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return Path(path)
