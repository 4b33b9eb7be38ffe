"""A swap file for the host, on for as long as a ``with`` block runs.

Host paging (a VM's cgroup capped below what it holds, :mod:`balloonist.cgroup`) needs
swap to page to. ``balloonist doctor`` says when a host has none; the VM benches and
tests that page a guest bring a file of their own, made here: written out (``swapon``
refuses a file with holes), readable by root alone, and switched off and removed
after.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from balloonist.errors import HostCommandError
from balloonist.units import MIB

__all__ = ["swap_file"]

FILE_NAME = "host.swap"


@contextlib.contextmanager
def swap_file(directory: Path, size_bytes: int) -> Iterator[Path]:
    """Swap of ``size_bytes`` (whole MiB) in ``directory``, on for the block.

    Whoever holds pages in it must be gone before the block ends: ``swapoff`` reads
    every swapped page back into memory, and fails (out of memory) where they do not
    fit. If it fails the file stays, still on, and the error says so."""
    if size_bytes <= 0 or size_bytes % MIB:
        raise ValueError(f"swap size {size_bytes} bytes is not a positive number of MiB")
    path = directory / FILE_NAME
    try:
        with path.open("wb") as f:
            for _ in range(size_bytes // MIB):
                f.write(bytes(MIB))
        path.chmod(0o600)
        _run(["mkswap", str(path)])
        _run(["swapon", str(path)])
    except BaseException:  # not on: nothing to leave behind
        path.unlink(missing_ok=True)
        raise
    try:
        yield path
    finally:
        _run(["swapoff", str(path)])
        path.unlink()


def _run(command: list[str]) -> None:
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        raise HostCommandError(tuple(command), said=exc.stderr.strip()) from None
    except OSError as exc:
        raise HostCommandError(tuple(command), said=str(exc)) from None
