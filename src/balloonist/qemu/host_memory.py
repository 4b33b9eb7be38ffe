"""How much of the host's memory a VM really holds, read on the host from its QEMU
process's ``/proc/PID/smaps``.

A balloon says how much memory a guest may use; the host's own accounting says how
much it holds, and the two differ: a page the guest never touched, or gave back (a
balloon page, a page returned by free page reporting), is not held, and neither is
the part of a KSM-merged page that other VMs account for; QEMU's own memory (its
code, heap, device state, under TCG its translation cache) is held on top.

Every figure is a *proportional* set size (``Pss``): a page shared by n processes
counts 1/n to each, so pages KSM merged across VMs add up, over the VMs, to what the
host holds once. The guest's RAM is the mapping of exactly the guest's memory size:
anonymous for a VM QEMU gives private RAM, the RAM file for an agent VM (shared,
file-backed RAM). What is not that mapping is QEMU's overhead. A mapping of that
size may be missing (RAM split into several blocks, hugepages, a VM not started by
balloonist): the guest's RAM is then not told apart, and only the whole is known.

What KSM merged of the process's pages, and what that saved, come from
``/proc/PID/ksm_stat`` (Linux 6.1+; the saving from 6.4).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Final

from balloonist.ksm import parse_ksm_stat
from balloonist.model import HostHeld
from balloonist.units import KIB, PAGE_SIZE_BYTES

PROC: Final = Path("/proc")

#: A mapping's first line: "start-end perms offset dev inode [path]".
_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+\s*(.*)$")


def parse_smaps(text: str, memory_bytes: int, ram_file: str | None = None) -> HostHeld:
    """What the process whose ``smaps`` is ``text`` holds, and of that the guest's RAM:
    the mapping of ``memory_bytes`` that is anonymous and writable, or is ``ram_file``."""
    held_kib = 0
    ram_kib: int | None = None
    current_is_ram = False
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header is not None:
            start, end, perms, path = header.groups()
            size = int(end, 16) - int(start, 16)
            backing = path.strip()
            current_is_ram = size == memory_bytes and (
                backing == ram_file if ram_file is not None else backing == "" and "w" in perms
            )
            continue
        if line.startswith("Pss:"):
            kib = _kib(line)
            held_kib += kib
            if current_is_ram:
                ram_kib = (ram_kib or 0) + kib
    return HostHeld(
        held_bytes=held_kib * KIB,
        guest_ram_bytes=None if ram_kib is None else ram_kib * KIB,
    )


def _kib(line: str) -> int:
    """``Pss:   1234 kB`` -> 1234; 0 for a line the kernel never writes."""
    fields = line.split()
    if len(fields) != 3 or fields[2] != "kB" or not fields[1].isdigit():
        return 0
    return int(fields[1])


def read_host_held(
    pid: int, memory_bytes: int, ram_file: str | None = None, proc: Path = PROC
) -> HostHeld | None:
    """:func:`parse_smaps` of process ``pid``, with what KSM did for it where the kernel
    says; None if it is gone or not readable."""
    try:
        text = (proc / str(pid) / "smaps").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    held = parse_smaps(text, memory_bytes, ram_file)
    try:
        ksm = parse_ksm_stat((proc / str(pid) / "ksm_stat").read_text(errors="replace"))
    except OSError:
        return held  # a kernel before 6.1, or the process just ended
    return replace(
        held,
        ksm_merged_bytes=ksm.merging_pages * PAGE_SIZE_BYTES,
        ksm_saved_bytes=ksm.profit_bytes,
    )


__all__ = ["PROC", "parse_smaps", "read_host_held"]
