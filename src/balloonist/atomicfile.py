"""Files written whole or not at all, and still there after a crash.

``write_atomic`` writes a temporary file in the same directory, fsyncs it, renames it
over the target and fsyncs the directory: a reader (or a process restarted after a
crash, SIGKILL or power loss) sees the old content or the new, never a mix, and once
the call returns the new content is on disk.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_leftovers(path: Path) -> list[Path]:
    """Remove the temporaries of ``path`` that a writer killed mid-write left behind.

    Only for a file with one writer, called before it writes: the names are ours
    (``.NAME.`` and mkstemp's suffix), and no write can be under way.
    """
    leftovers = sorted(path.parent.glob(f".{path.name}.*"))
    for tmp in leftovers:
        tmp.unlink(missing_ok=True)
    return leftovers


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (its entry lives in the directory)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["fsync_dir", "remove_leftovers", "write_atomic"]
