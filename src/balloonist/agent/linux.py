"""``LinuxKernel``: the driver's ``GuestKernel`` port on a real Linux guest, from user space.

A balloon page is a page of an anonymous private mapping that the agent pins:

1. ``mmap`` at most ``CHUNK_PAGES`` at a time, so one failure wastes at most one chunk
   and a chunk can be unmapped as soon as all its pages are freed;
2. ``madvise(MADV_NOHUGEPAGE)`` before any page exists: 4 KiB pages only, so
   khugepaged never collapses (and so moves) them;
3. ``mlock`` in ``LOCK_STEP_PAGES`` pieces, which faults the pages in; an out-of-memory
   failure keeps the pieces pinned before it and gives back the rest;
4. read the pages' frame numbers (PFNs) from ``/proc/self/pagemap`` (bit 63 present,
   bits 0-54 the PFN). Without CAP_SYS_ADMIN the kernel shows PFN 0: that is a
   ``PagemapError``;
5. fill every page with its mark (``page_mark``): the agent's token (one per agent
   process, 8 bytes) repeated over all 4096 bytes, except bytes 8-16, which hold the
   page's PFN (8 bytes little-endian). The host frees a page's memory only if the
   whole page is still exactly that, so a page no longer ours (reused and written,
   migrated) never matches. The token part is the same in every page, so a chunk is
   filled with it in a few large copies and then only the PFNs are written, one 8-byte
   word per page, in one strided copy.

``free_units`` takes any sub-range of what was handed out (the driver splits ranges):
``munlock`` and ``madvise(MADV_DONTNEED)``, without writing to the pages (see
``_release``), and it unmaps a chunk whose pages are all free. Ordinary out-of-memory
never raises: ``allocate_units`` returns fewer pages.

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

from balloonist.driver import UnitRange, ranges_from_units
from balloonist.errors import FatalBackendError

log = logging.getLogger("balloonist.agent")

PAGE_SIZE_BYTES = mmap.PAGESIZE
#: 64 MiB per mapping: small enough that one failed chunk wastes little, large enough
#: that a 1 GiB step is 16 mappings, not thousands.
CHUNK_PAGES = (64 << 20) // PAGE_SIZE_BYTES
#: mlock in 2 MiB pieces: a failure keeps what was pinned before it.
LOCK_STEP_PAGES = (2 << 20) // PAGE_SIZE_BYTES
#: The mark that fills a page the agent holds: the token, repeated, but for the PFN at
#: bytes ``PFN_OFFSET_BYTES`` to ``PFN_OFFSET_BYTES + 8``.
TOKEN_BYTES = 8
PFN_OFFSET_BYTES = TOKEN_BYTES

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


def page_mark(token: bytes, pfn: int) -> bytes:
    """All of page ``pfn`` while the agent holds it: token, PFN (8 bytes LE), then the
    token again and again to the end of the page (510 more times in 4 KiB).

    The host's own copy is ``balloonist.qemu.reclaim.page_mark`` (the agent is stdlib
    only and cannot import it); a test checks that the two agree byte for byte.
    ``_mark`` writes it to many pages at once.
    """
    if len(token) != TOKEN_BYTES:
        raise ValueError(f"a token is {TOKEN_BYTES} bytes, got {len(token)}")
    rest = PAGE_SIZE_BYTES - PFN_OFFSET_BYTES - 8
    return token + pfn.to_bytes(8, "little") + token * (rest // TOKEN_BYTES)


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
        self._token = self._parse_token(token_hex)
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

    @staticmethod
    def _parse_token(token_hex: str) -> bytes:
        if len(token_hex) != 16 or any(c not in "0123456789abcdef" for c in token_hex):
            raise ValueError("token must be 16 lowercase hex digits")
        return bytes.fromhex(token_hex)

    @property
    def held_pages(self) -> int:
        return len(self._slots)

    @property
    def mappings(self) -> int:
        return len(self._chunks)

    def read_page(self, pfn: int) -> bytes:
        """The content of a held page: what the host checks against ``page_mark``."""
        chunk_id, index = divmod(self._slots[pfn], CHUNK_PAGES)
        start = index * PAGE_SIZE_BYTES
        return self._chunks[chunk_id].mm[start : start + PAGE_SIZE_BYTES]

    def probe(self) -> None:
        """Pin one page and free it: fails at start, clearly, where it would fail later."""
        ranges = self.allocate_units(1)
        if not ranges:
            raise FatalBackendError("cannot pin even one page with mlock (run as root)")
        self.free_units(ranges)

    # -- GuestKernel -----------------------------------------------------------------

    def allocate_units(self, count: int) -> list[UnitRange]:
        frames: list[int] = []
        while len(frames) < count:
            wanted = min(count - len(frames), CHUNK_PAGES)
            got = self._allocate_chunk(wanted)
            frames.extend(got)
            if len(got) < wanted:
                break  # out of memory: the driver halves its rate and comes back later
        return ranges_from_units(frames)

    def free_units(self, ranges: Sequence[UnitRange]) -> None:
        frames = [pfn for r in ranges for pfn in range(r.start, r.end)]
        if len(set(frames)) != len(frames) or any(pfn not in self._slots for pfn in frames):
            raise RuntimeError("free_units: pages this kernel port does not hold (a driver bug)")
        by_chunk: dict[int, list[int]] = {}
        for pfn in frames:
            chunk_id, index = divmod(self._slots.pop(pfn), CHUNK_PAGES)
            by_chunk.setdefault(chunk_id, []).append(index)
        for chunk_id, indices in by_chunk.items():
            chunk = self._chunks[chunk_id]
            for run in ranges_from_units(indices):
                self._release(chunk, run.start, run.count)
            chunk.live_pages -= len(indices)
            if chunk.live_pages == 0:
                del self._chunks[chunk_id]
                chunk.mm.close()  # munmap

    def close(self) -> None:
        """Unmap everything and close pagemap; for shutdown.

        Nothing is zeroed first, for the reasons in ``_release``: munmap gives the pages
        back like ``free_units`` does.
        """
        for chunk in self._chunks.values():
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
        _mark(mm, self._token, frames)
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
        # The pages go back with their marks in place; nothing is written to them, so a
        # page the host has punched stays a hole (writing would make the host back it
        # again). A stale host check (a `locked` report it has not handled yet) is still
        # safe: the host punches a page only if all 4096 bytes are still the mark, and
        # does so with the guest's vCPUs paused, so nothing changes between its check and
        # its punch. A page the kernel has reused and written anywhere no longer matches;
        # one freed, or reused but not yet written, holds nothing anyone needs, so the
        # host's hole (which reads as zeros) loses nothing. (MADV_DONTNEED discards the
        # pages of this private anonymous mapping, and the kernel zeroes a page before
        # it hands it to a process as user memory, so no one reads the mark either.)
        start, length = chunk.address + first * PAGE_SIZE_BYTES, count * PAGE_SIZE_BYTES
        err = self._libc.munlock(start, length)
        if err:
            raise FatalBackendError(f"munlock: {os.strerror(err)}")
        chunk.mm.madvise(mmap.MADV_DONTNEED, first * PAGE_SIZE_BYTES, length)


def _mark(mm: mmap.mmap, token: bytes, frames: array[int]) -> None:
    """Write ``page_mark(token, frames[i])`` to page ``i`` of ``mm``, for every frame.

    Pages past ``len(frames)`` are not touched (they may have been given back). No page
    is built in Python: the token is written to the first page, doubled across the rest
    with ``mmap.move`` (a memmove; no large temporary), and the PFNs go in with one
    strided copy of 8-byte words.
    """
    length = len(frames) * PAGE_SIZE_BYTES
    if not length:
        return
    mm[:PAGE_SIZE_BYTES] = token * (PAGE_SIZE_BYTES // TOKEN_BYTES)
    done = PAGE_SIZE_BYTES
    while done < length:
        step = min(done, length - done)
        mm.move(done, 0, step)
        done += step
    words_per_page = PAGE_SIZE_BYTES // 8
    first_word = PFN_OFFSET_BYTES // 8
    if sys.byteorder != "little":  # the mark's PFN is little-endian; array("Q") is native
        frames = array("Q", frames)
        frames.byteswap()
    with memoryview(mm) as raw, raw.cast("Q") as words:
        words[first_word : len(frames) * words_per_page : words_per_page] = frames


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
