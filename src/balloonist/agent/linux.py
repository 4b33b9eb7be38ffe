"""``LinuxKernel``: the driver's ``GuestKernel`` port on a real Linux guest, from user space.

A balloon page is a page of an anonymous private mapping that the agent pins:

1. ``mmap`` at most ``CHUNK_PAGES`` at a time, so one failure wastes at most one chunk
   and a chunk can be unmapped as soon as all its pages are freed;
2. ``madvise(MADV_NOHUGEPAGE)`` before any page exists: 4 KiB pages only, so
   khugepaged never collapses (and so moves) them;
3. ``mlock`` in ``LOCK_STEP_PAGES`` pieces, which faults the pages in; an out-of-memory
   failure keeps the pieces pinned before it and gives back the rest;
4. write the agent's token (one per agent process) at offset 0 and the page's frame
   number (PFN, 8 bytes little-endian) at offset 8 of every page. The host checks both
   before it frees a page's memory, so a page no longer ours (freed, migrated) never
   matches;
5. the PFNs come from ``/proc/self/pagemap`` (bit 63 present, bits 0-54 the PFN).
   Without CAP_SYS_ADMIN the kernel shows PFN 0: that is a ``PagemapError``.

``free_pages`` takes any sub-range of what was handed out (the driver splits ranges):
it zeroes token and PFN first (a stale host check can then never match), then
``munlock`` and ``madvise(MADV_DONTNEED)``, and unmaps a chunk whose pages are all
free. Ordinary out-of-memory never raises: ``allocate_pages`` returns fewer pages.

``prepare_host`` tunes the guest once at start: the OOM killer takes the agent first
(its memory then returns to the guest), and compaction must not migrate mlocked pages,
which would make reported PFNs wrong.

Stdlib only, Python 3.9; Linux only.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import resource
import sys
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from balloonist.driver import PageRange, ranges_from_pages
from balloonist.errors import FatalBackendError

log = logging.getLogger("balloonist.agent")

PAGE_SIZE_BYTES = mmap.PAGESIZE
_WORDS_PER_PAGE = PAGE_SIZE_BYTES // 8
#: 64 MiB per mapping: small enough that one failed chunk wastes little, large enough
#: that a 1 GiB step is 16 mappings, not thousands.
CHUNK_PAGES = (64 << 20) // PAGE_SIZE_BYTES
#: mlock in 2 MiB pieces: a failure keeps what was pinned before it.
LOCK_STEP_PAGES = (2 << 20) // PAGE_SIZE_BYTES
TOKEN_OFFSET_BYTES = 0
PFN_OFFSET_BYTES = 8

_PAGEMAP_PRESENT = 1 << 63
_PAGEMAP_PFN_MASK = (1 << 55) - 1
#: What mmap/mlock return when memory (or RLIMIT_MEMLOCK) runs out: a short allocation.
_OUT_OF_MEMORY = frozenset({errno.ENOMEM, errno.EAGAIN})

PAGEMAP_PATH = Path("/proc/self/pagemap")
PROC_PATH = Path("/proc")


class PagemapError(FatalBackendError):
    """The frame numbers of our own pages cannot be read (not root, or no pagemap)."""


class MemoryLock(Protocol):
    """mlock/munlock: 0 on success, else the errno. A port, so tests can make mlock fail."""

    def mlock(self, address: int, length_bytes: int) -> int: ...

    def munlock(self, address: int, length_bytes: int) -> int: ...


class Libc:
    """The two libc calls the stdlib lacks, typed. ``madvise`` is ``mmap.madvise``."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)  # the process's own libc, no lookup
        self._mlock = libc.mlock
        self._munlock = libc.munlock
        for fn in (self._mlock, self._munlock):
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            fn.restype = ctypes.c_int

    def mlock(self, address: int, length_bytes: int) -> int:
        """0, or the errno."""
        return 0 if self._mlock(address, length_bytes) == 0 else ctypes.get_errno()

    def munlock(self, address: int, length_bytes: int) -> int:
        return 0 if self._munlock(address, length_bytes) == 0 else ctypes.get_errno()


class _Chunk:
    """One mapping; pages ``[0, pinned_pages)`` were handed out, ``live_pages`` still are."""

    __slots__ = ("address", "live_pages", "mm")

    def __init__(self, mm: mmap.mmap, address: int, live_pages: int) -> None:
        self.mm = mm
        self.address = address
        self.live_pages = live_pages


def _address_of(mm: mmap.mmap) -> int:
    # from_buffer exports the mmap's buffer; drop it at once, or close() raises BufferError.
    view = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def _little_endian(words: array[int]) -> array[int]:
    if sys.byteorder == "big":
        words = array("Q", words)
        words.byteswap()
    return words


def raise_memlock_limit() -> None:
    """RLIMIT_MEMLOCK to unlimited; without CAP_IPC_LOCK mlock would stop at it."""
    unlimited = resource.RLIM_INFINITY
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (unlimited, unlimited))
        return
    except (ValueError, OSError):
        pass  # no CAP_SYS_RESOURCE (a container): the soft limit can still go up to the hard
    _soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise RLIMIT_MEMLOCK: %s", exc)
    if hard != unlimited:
        # Harmless with CAP_IPC_LOCK (root), which mlock checks before the limit.
        log.debug("RLIMIT_MEMLOCK stays at %d bytes", hard)


class LinuxKernel:
    """Pins anonymous pages with mlock; see the module docstring."""

    def __init__(
        self,
        token_hex: str,
        *,
        pagemap_path: Path = PAGEMAP_PATH,
        memory_lock: MemoryLock | None = None,
    ) -> None:
        self._token_word = 0
        self._set_token(token_hex)
        raise_memlock_limit()
        self._libc = memory_lock or Libc()
        self._pagemap_path = pagemap_path
        try:
            self._pagemap_fd = os.open(pagemap_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise PagemapError(f"cannot open {pagemap_path}: {exc.strerror}") from exc
        self._chunks: dict[int, _Chunk] = {}
        self._next_chunk_id = 0
        # pfn -> chunk_id * CHUNK_PAGES + page index: one int per page, not a tuple, since
        # a large balloon holds millions of pages.
        self._slots: dict[int, int] = {}

    def _set_token(self, token_hex: str) -> None:
        if len(token_hex) != 16 or any(c not in "0123456789abcdef" for c in token_hex):
            raise ValueError("token must be 16 lowercase hex digits")
        # As a native word whose bytes in memory are exactly bytes.fromhex(token_hex).
        self._token_word = int.from_bytes(bytes.fromhex(token_hex), sys.byteorder)

    @property
    def held_pages(self) -> int:
        return len(self._slots)

    @property
    def mappings(self) -> int:
        return len(self._chunks)

    def read_marks(self, pfn: int) -> tuple[bytes, int]:
        """The token bytes and the frame number written in a held page (what the host checks)."""
        chunk_id, index = divmod(self._slots[pfn], CHUNK_PAGES)
        start = index * PAGE_SIZE_BYTES
        mm = self._chunks[chunk_id].mm
        token = mm[start + TOKEN_OFFSET_BYTES : start + TOKEN_OFFSET_BYTES + 8]
        frame = mm[start + PFN_OFFSET_BYTES : start + PFN_OFFSET_BYTES + 8]
        return token, int.from_bytes(frame, "little")

    def probe(self) -> None:
        """Pin one page and free it: fails at start, clearly, where it would fail later."""
        ranges = self.allocate_pages(1)
        if not ranges:
            raise FatalBackendError("cannot pin even one page with mlock (run as root)")
        self.free_pages(ranges)

    # -- GuestKernel -----------------------------------------------------------------

    def allocate_pages(self, count: int) -> list[PageRange]:
        frames: list[int] = []
        while len(frames) < count:
            wanted = min(count - len(frames), CHUNK_PAGES)
            got = self._allocate_chunk(wanted)
            frames.extend(got)
            if len(got) < wanted:
                break  # out of memory: the driver halves its rate and comes back later
        return ranges_from_pages(frames)

    def free_pages(self, ranges: Sequence[PageRange]) -> None:
        frames = [pfn for r in ranges for pfn in range(r.start, r.end)]
        if len(set(frames)) != len(frames) or any(pfn not in self._slots for pfn in frames):
            raise RuntimeError("free_pages: pages this kernel port does not hold (a driver bug)")
        by_chunk: dict[int, list[int]] = {}
        for pfn in frames:
            chunk_id, index = divmod(self._slots.pop(pfn), CHUNK_PAGES)
            by_chunk.setdefault(chunk_id, []).append(index)
        for chunk_id, indices in by_chunk.items():
            chunk = self._chunks[chunk_id]
            for run in ranges_from_pages(indices):
                self._release(chunk, run.start, run.count)
            chunk.live_pages -= len(indices)
            if chunk.live_pages == 0:
                del self._chunks[chunk_id]
                chunk.mm.close()  # munmap

    def close(self) -> None:
        """Unmap everything (tokens zeroed first) and close pagemap; for shutdown."""
        for chunk in self._chunks.values():
            with memoryview(chunk.mm) as raw, raw.cast("Q") as words:
                words[:] = array("Q", bytes(len(words) * 8))  # no token survives us
            chunk.mm.close()
        self._chunks.clear()
        self._slots.clear()
        if self._pagemap_fd >= 0:
            os.close(self._pagemap_fd)
            self._pagemap_fd = -1

    # -- internals -------------------------------------------------------------------

    def _allocate_chunk(self, pages: int) -> list[int]:
        length = pages * PAGE_SIZE_BYTES
        try:
            mm = mmap.mmap(
                -1,
                length,
                flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
        except OSError as exc:
            if exc.errno in _OUT_OF_MEMORY:
                return []
            raise FatalBackendError(f"mmap of {length} bytes: {exc.strerror}") from exc
        try:
            return self._pin(mm, pages)
        except BaseException:
            mm.close()  # munmap also unlocks
            raise

    def _pin(self, mm: mmap.mmap, pages: int) -> list[int]:
        # Before the first fault, or the kernel may back the mapping with huge pages.
        mm.madvise(mmap.MADV_NOHUGEPAGE)
        address = _address_of(mm)
        pinned = 0
        while pinned < pages:
            step = min(LOCK_STEP_PAGES, pages - pinned)
            start, length = address + pinned * PAGE_SIZE_BYTES, step * PAGE_SIZE_BYTES
            err = self._libc.mlock(start, length)
            if err:
                # mlock marks the range locked before it faults pages in: undo that too.
                self._libc.munlock(start, length)
                if err not in _OUT_OF_MEMORY:
                    raise FatalBackendError(f"mlock: {os.strerror(err)}")
                break
            pinned += step
        if pinned == 0:
            mm.close()
            return []
        if pinned < pages:  # the failed piece may have faulted some pages in
            tail = pinned * PAGE_SIZE_BYTES
            mm.madvise(mmap.MADV_DONTNEED, tail, len(mm) - tail)
        frames = self._frames(address, pinned)
        if any(pfn in self._slots for pfn in frames):
            raise PagemapError("a frame number was handed out twice (KSM merging our pages?)")
        with memoryview(mm) as raw, raw.cast("Q") as words:
            end = pinned * _WORDS_PER_PAGE
            words[TOKEN_OFFSET_BYTES // 8 : end : _WORDS_PER_PAGE] = (
                array("Q", [self._token_word]) * pinned
            )
            words[PFN_OFFSET_BYTES // 8 : end : _WORDS_PER_PAGE] = _little_endian(frames)
        chunk_id = self._next_chunk_id
        self._next_chunk_id += 1
        self._chunks[chunk_id] = _Chunk(mm, address, pinned)
        base = chunk_id * CHUNK_PAGES
        for index, pfn in enumerate(frames):
            self._slots[pfn] = base + index
        return list(frames)

    def _frames(self, address: int, pages: int) -> array[int]:
        """PFNs of ``pages`` pinned pages from ``address``, from /proc/self/pagemap."""
        offset = (address // PAGE_SIZE_BYTES) * 8
        data = b""
        while len(data) < pages * 8:
            part = os.pread(self._pagemap_fd, pages * 8 - len(data), offset + len(data))
            if not part:
                raise PagemapError(f"{self._pagemap_path}: short read")
            data += part
        entries = array("Q")
        entries.frombytes(data)
        if any(not entry & _PAGEMAP_PRESENT for entry in entries):
            raise PagemapError("a pinned page is not present in pagemap")
        frames = array("Q", (entry & _PAGEMAP_PFN_MASK for entry in entries))
        if not all(frames):
            raise PagemapError(
                f"{self._pagemap_path} shows frame number 0: reading PFNs needs CAP_SYS_ADMIN"
                " (run the agent as root)"
            )
        return frames

    def _release(self, chunk: _Chunk, first: int, count: int) -> None:
        with memoryview(chunk.mm) as raw, raw.cast("Q") as words:
            base, end = first * _WORDS_PER_PAGE, (first + count) * _WORDS_PER_PAGE
            zeros = array("Q", bytes(count * 8))
            # Zero token and PFN first, so a host check still in flight cannot match.
            words[base + TOKEN_OFFSET_BYTES // 8 : end : _WORDS_PER_PAGE] = zeros
            words[base + PFN_OFFSET_BYTES // 8 : end : _WORDS_PER_PAGE] = zeros
        start, length = chunk.address + first * PAGE_SIZE_BYTES, count * PAGE_SIZE_BYTES
        err = self._libc.munlock(start, length)
        if err:
            raise FatalBackendError(f"munlock: {os.strerror(err)}")
        chunk.mm.madvise(mmap.MADV_DONTNEED, first * PAGE_SIZE_BYTES, length)


class HostTuning:
    """What ``prepare_host`` changed, so a clean exit can put it back."""

    def __init__(self, proc_path: Path, compact_unevictable_before: str | None) -> None:
        self._proc_path = proc_path
        self._compact_unevictable_before = compact_unevictable_before

    def restore(self) -> None:
        before = self._compact_unevictable_before
        if before is not None and before != "0":
            _write_proc(self._proc_path / "sys/vm/compact_unevictable_allowed", before)


def prepare_host(proc_path: Path = PROC_PATH) -> HostTuning:
    """Make the guest safe for a user-level balloon; log, but go on, if it refuses.

    - ``oom_score_adj`` 1000: under memory pressure the OOM killer takes the agent
      first, and the balloon's memory returns to the guest;
    - ``compact_unevictable_allowed`` 0: compaction must not migrate mlocked pages,
      which would make the PFNs reported to the host wrong.
    """
    _write_proc(proc_path / "self/oom_score_adj", "1000")
    compact = proc_path / "sys/vm/compact_unevictable_allowed"
    try:
        before: str | None = compact.read_text(encoding="ascii").strip()[:8]
    except OSError:
        before = None
    _write_proc(compact, "0")
    return HostTuning(proc_path, before)


def _write_proc(path: Path, value: str) -> None:
    try:
        path.write_text(value + "\n", encoding="ascii")
    except OSError as exc:
        log.warning("cannot set %s to %s: %s", path, value, exc.strerror or exc)
