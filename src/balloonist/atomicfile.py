"""Files written whole or not at all, and still there after a crash.

``staged`` hands out a new file in the same directory, and when the body is done
fsyncs it, renames it over the target and fsyncs the directory: a reader (or a process
restarted after a crash, SIGKILL or power loss) sees the old content or the new, never
a mix, and once the block ends the new content is on disk. ``write_atomic`` is that for
a text. Files balloonist writes whole go through here; whole directories (a report, the
suite's page) are staged and renamed where they are written.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staged(path: Path, *, mode: int = 0o600) -> Iterator[Path]:
    """A new, empty file beside ``path`` (``mode`` less the umask) for the body to
    write by name, as zipapp and matplotlib do; it replaces ``path`` when the body
    returns and is removed if the body raises."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))  # never reuse a file
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, text: str, *, mode: int = 0o600) -> None:
    with staged(path, mode=mode) as tmp:
        tmp.write_text(text, encoding="utf-8")


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


__all__ = ["fsync_dir", "remove_leftovers", "staged", "write_atomic"]
