"""Giving the host the memory behind pages an agent holds, by punching holes in guest RAM.

An agent VM's RAM is a shared file in a tmpfs (see :mod:`balloonist.qemu.launcher`).
The in-guest agent pins pages and reports their guest page frame numbers (PFNs); the
host maps each PFN to its offset in the file and punches a hole there, which frees the
page on the host. The guest keeps the page mapped: if it ever touches it again, it
reads zeros, and a write gets a fresh page.

A guest is not trusted, so before freeing a page the host checks that the page says it
is one the agent holds: the agent fills every page it holds with its mark, its session
token (8 bytes) over and over, all 4096 bytes, but for bytes 8-16, which hold the page's
own PFN (8 bytes, little-endian) (:func:`page_mark`). The host checks every byte: a
page that differs anywhere was never the agent's, or has been reused and written
since, and is left alone; a reused page not yet written anywhere holds nothing anyone
needs. This does not make a lying guest harmless to itself (between the check and the
punch the guest could write to the page, and lose what it wrote), but it cannot make
the host free a page the guest did not mark; and the daemon checks and punches with
the guest's vCPUs paused (docs/agent-protocol.md, rule 2), which leaves an honest
guest nothing to lose.

Frame numbers map to file offsets with the layout of QEMU's ``pc`` (i440fx) machine,
which the launcher gives every agent VM: RAM below 4 GiB ends at ``low_bytes``; the
rest is mapped from 4 GiB up; everything else (the PCI hole, beyond RAM) is no RAM.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

from balloonist.driver import UnitRange
from balloonist.errors import FatalBackendError, GuestProtocolError, Violation

PAGE_BYTES: Final = 4096
#: QEMU's default ``max-ram-below-4g`` for pc: 3.5 GiB. RAM of this size or more is split.
PC_MAX_LOW_BYTES: Final = 0xE000_0000
#: Where a split puts the top of low RAM on machine types with ``gigabyte_align`` (every
#: pc-i440fx since 1.7; hw/i386/pc_piix.c, pc_init1).
PC_SPLIT_LOW_BYTES: Final = 0xC000_0000
#: RAM above the split starts at 4 GiB.
HIGH_BASE_BYTES: Final = 1 << 32
HIGH_BASE_PFN: Final = HIGH_BASE_BYTES // PAGE_BYTES
#: The agent's mark fills a page it holds: the token, the PFN, then the token repeated.
TOKEN_BYTES: Final = 8
#: The part of the mark that differs from page to page: the token, then the PFN.
MARK_HEAD_BYTES: Final = TOKEN_BYTES + 8
#: Pages checked per read of the RAM file (1 MiB).
READ_PAGES: Final = 256

_FALLOC_FL_KEEP_SIZE: Final = 0x01
_FALLOC_FL_PUNCH_HOLE: Final = 0x02


def pc_low_ram_bytes(ram_bytes: int) -> int:
    """How much of ``ram_bytes`` QEMU's pc machine maps below 4 GiB."""
    return PC_SPLIT_LOW_BYTES if ram_bytes >= PC_MAX_LOW_BYTES else ram_bytes


@dataclass(frozen=True)
class RamLayout:
    """Where guest RAM sits in guest-physical memory, and where each page is in the file."""

    ram_bytes: int
    low_bytes: int

    @classmethod
    def pc(cls, ram_bytes: int) -> RamLayout:
        if ram_bytes <= 0 or ram_bytes % PAGE_BYTES:
            raise ValueError(f"guest RAM must be a positive number of pages, got {ram_bytes}")
        return cls(ram_bytes, pc_low_ram_bytes(ram_bytes))

    @property
    def low_pages(self) -> int:
        return self.low_bytes // PAGE_BYTES

    @property
    def high_pages(self) -> int:
        return (self.ram_bytes - self.low_bytes) // PAGE_BYTES

    def pfn_to_offset_bytes(self, pfn: int) -> int:
        """The file offset of guest frame ``pfn``; GuestProtocolError if it is not RAM."""
        return self.range_offset_bytes(UnitRange(pfn, 1))

    def offset_to_pfn(self, offset_bytes: int) -> int:
        """The guest frame at file offset ``offset_bytes`` (page-aligned, inside the file)."""
        if offset_bytes % PAGE_BYTES or not 0 <= offset_bytes < self.ram_bytes:
            raise ValueError(f"not a page offset in guest RAM: {offset_bytes}")
        page = offset_bytes // PAGE_BYTES
        return page if page < self.low_pages else HIGH_BASE_PFN + page - self.low_pages

    def range_offset_bytes(self, pages: UnitRange) -> int:
        """The file offset of the first page of ``pages``, which must lie in one RAM region.

        The region's pages are contiguous in the file, so the range is ``pages.count``
        pages from there.
        """
        if pages.start < 0 or pages.count <= 0:
            raise GuestProtocolError(
                f"bad page range {pages.start}+{pages.count}", violation=Violation.BAD_PAGES
            )
        if pages.end <= self.low_pages:
            return pages.start * PAGE_BYTES
        high_end = HIGH_BASE_PFN + self.high_pages
        if pages.start >= HIGH_BASE_PFN and pages.end <= high_end:
            return self.low_bytes + (pages.start - HIGH_BASE_PFN) * PAGE_BYTES
        raise GuestProtocolError(
            f"pages {pages.start:#x}+{pages.count} are not guest RAM ({self.describe()})",
            violation=Violation.BAD_PAGES,
        )

    def describe(self) -> str:
        """The guest's RAM as frame ranges, for error messages."""
        text = f"RAM is frames 0x0-{self.low_pages:#x}"
        if self.high_pages:
            text += f" and {HIGH_BASE_PFN:#x}-{HIGH_BASE_PFN + self.high_pages:#x}"
        return text


def page_mark(token: bytes, pfn: int) -> bytes:
    """All of page ``pfn`` while the agent holds it: token, PFN (8 bytes LE), then the
    token again and again to the end of the page (510 more times).

    The agent (stdlib only, it cannot import this) has its own copy,
    ``balloonist.agent.linux.page_mark``; a test checks that the two agree.
    """
    if len(token) != TOKEN_BYTES:
        raise ValueError(f"a token is {TOKEN_BYTES} bytes, got {len(token)}")
    return token + pfn.to_bytes(8, "little") + _mark_tail(token)


def _mark_tail(token: bytes) -> bytes:
    """The rest of any page's mark, from ``MARK_HEAD_BYTES``: the token, repeated."""
    return token * ((PAGE_BYTES - MARK_HEAD_BYTES) // TOKEN_BYTES)


class GuestRam:
    """An agent VM's RAM file, opened for checking and punching. Close it when done."""

    def __init__(self, path: Path, ram_bytes: int) -> None:
        self.path = path
        self.layout = RamLayout.pc(ram_bytes)
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise FatalBackendError(f"guest RAM {path}: {exc.strerror}") from None
        size_bytes = os.fstat(self._fd).st_size
        if size_bytes != ram_bytes:
            os.close(self._fd)
            raise FatalBackendError(
                f"guest RAM {path} is {size_bytes} bytes, not the VM's {ram_bytes}"
            )

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> GuestRam:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def check(self, ranges: Iterable[UnitRange]) -> None:
        """GuestProtocolError unless every range is guest RAM, each within one region."""
        for pages in ranges:
            self.layout.range_offset_bytes(pages)

    def punch(self, ranges: Sequence[UnitRange], token: bytes) -> int:
        """Free the host memory behind every page of ``ranges`` that is exactly the agent's
        mark (:func:`page_mark`, all 4096 bytes); returns how many pages were freed.

        All ranges are checked before any page is touched. Pages that differ anywhere
        (reused and written by the guest, or already holes, which read as zeros) are
        left as they are.
        """
        if len(token) != TOKEN_BYTES:
            raise ValueError(f"a token is {TOKEN_BYTES} bytes, got {len(token)}")
        self.check(ranges)
        freed_pages = 0
        for pages in ranges:
            base = self.layout.range_offset_bytes(pages)
            for first, count in self._marked_runs(pages, base, token):
                self._punch_hole(base + first * PAGE_BYTES, count * PAGE_BYTES)
                freed_pages += count
        return freed_pages

    def _marked_runs(self, pages: UnitRange, base: int, token: bytes) -> Iterator[tuple[int, int]]:
        """(first index, count) of each run of consecutive marked pages in ``pages``."""
        buffer = bytearray(min(pages.count, READ_PAGES) * PAGE_BYTES)  # reused for each read
        tail = _mark_tail(token)  # the same in every page: built once
        run_start = -1
        for first in range(0, pages.count, READ_PAGES):
            count = min(READ_PAGES, pages.count - first)
            self._read_into(buffer, count * PAGE_BYTES, base + first * PAGE_BYTES)
            for i in range(first, first + count):
                # The whole page, in two parts: the head (token, then this page's PFN, as in
                # page_mark), and the tail, which is the same for every page. startswith at
                # an offset compares in place (memcmp), without a copy.
                at = (i - first) * PAGE_BYTES
                head = token + (pages.start + i).to_bytes(8, "little")
                if buffer.startswith(head, at) and buffer.startswith(tail, at + MARK_HEAD_BYTES):
                    if run_start < 0:
                        run_start = i
                elif run_start >= 0:
                    yield run_start, i - run_start
                    run_start = -1
        if run_start >= 0:
            yield run_start, pages.count - run_start

    def _read_into(self, buffer: bytearray, length_bytes: int, offset_bytes: int) -> None:
        """Fill ``buffer[:length_bytes]`` from the file at ``offset_bytes``."""
        done = 0
        with memoryview(buffer) as view:
            while done < length_bytes:
                try:
                    got = os.preadv(self._fd, [view[done:length_bytes]], offset_bytes + done)
                except OSError as exc:
                    raise FatalBackendError(f"guest RAM {self.path}: {exc.strerror}") from None
                if got == 0:
                    raise FatalBackendError(f"guest RAM {self.path}: shorter than the VM's RAM")
                done += got

    def _punch_hole(self, offset_bytes: int, length_bytes: int) -> None:
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _fallocate(self._fd, mode, offset_bytes, length_bytes) != 0:
            code = ctypes.get_errno()
            raise FatalBackendError(f"guest RAM {self.path}: punching a hole: {os.strerror(code)}")

    def allocated_bytes(self) -> int:
        """Host memory the guest's RAM uses now (the file's allocated blocks)."""
        return os.fstat(self._fd).st_blocks * 512

    def hole_pages(self, ranges: Iterable[UnitRange]) -> int:
        """How many pages of ``ranges`` are holes now: memory the host verifiably has back."""
        holes_bytes = 0
        for pages in ranges:
            start = self.layout.range_offset_bytes(pages)
            holes_bytes += self._hole_bytes(start, start + pages.count * PAGE_BYTES)
        return holes_bytes // PAGE_BYTES

    def _hole_bytes(self, start: int, end: int) -> int:
        """Bytes of [start, end) in holes, walking the file's data with SEEK_DATA/SEEK_HOLE."""
        total = 0
        pos = start
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no data after pos
                    raise FatalBackendError(f"guest RAM {self.path}: {exc.strerror}") from None
                data = end
            data = min(data, end)
            total += data - pos
            if data >= end:
                break
            pos = os.lseek(self._fd, data, os.SEEK_HOLE)
        return total


_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int
