"""LinuxKernel for real, on this host (root): mmap + mlock + pagemap, a few MiB at a time.

The same code runs inside guests; here the "guest" is the test process itself. VmLck in
/proc/self/status is the kernel's own count of our locked memory."""

from __future__ import annotations

import ctypes
import errno
import mmap
import re
import shutil
import subprocess
import sys
from array import array
from collections.abc import Iterator
from pathlib import Path

import pytest

from balloonist.agent.linux import (
    CHUNK_PAGES,
    PAGE_SIZE_BYTES,
    Libc,
    LinuxKernel,
    _mark,
    page_mark,
    prepare_host,
)
from balloonist.driver import UnitRange, count_units

pytestmark = pytest.mark.root(reason="needs Linux and root (pagemap PFNs)")

TOKEN = "0123456789abcdef"
TOKEN_BYTES = bytes.fromhex(TOKEN)
MIB_PAGES = (1 << 20) // PAGE_SIZE_BYTES


def locked_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    match = re.search(r"^VmLck:\s+(\d+) kB$", status, re.MULTILINE)
    assert match is not None
    return int(match.group(1)) * 1024


@pytest.fixture
def kernel() -> Iterator[LinuxKernel]:
    k = LinuxKernel(TOKEN)
    yield k
    k.close()


def frames_of(ranges: list[UnitRange]) -> list[int]:
    return [pfn for r in ranges for pfn in range(r.start, r.end)]


def test_allocated_pages_are_pinned_marked_and_have_real_frame_numbers(
    kernel: LinuxKernel,
) -> None:
    before = locked_bytes()
    ranges = kernel.allocate_units(8 * MIB_PAGES)
    frames = frames_of(ranges)
    assert len(frames) == len(set(frames)) == 8 * MIB_PAGES
    assert 0 not in frames
    assert locked_bytes() - before == 8 << 20
    for pfn in frames:  # every byte of every page: what the host checks
        assert kernel.read_page(pfn) == page_mark(TOKEN_BYTES, pfn)


def test_marking_fills_the_given_pages_and_nothing_past_them() -> None:
    # Any number of pages (the token is doubled across them), any frame numbers.
    frames = array("Q", [7, 1 << 54, 3, *range(1000, 1034)])  # 37 pages
    pages = len(frames) + 3
    mm = mmap.mmap(-1, pages * PAGE_SIZE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        _mark(mm, TOKEN_BYTES, frames)
        for index in range(pages):
            page = mm[index * PAGE_SIZE_BYTES : (index + 1) * PAGE_SIZE_BYTES]
            if index < len(frames):
                assert page == page_mark(TOKEN_BYTES, frames[index]), index
            else:  # past the pinned pages (given back after a short mlock): untouched
                assert page == bytes(PAGE_SIZE_BYTES), index
        _mark(mm, bytes(8), array("Q"))  # nothing pinned: nothing written
        assert mm[:PAGE_SIZE_BYTES] == page_mark(TOKEN_BYTES, frames[0])
    finally:
        mm.close()


def test_freeing_a_sub_range_unlocks_exactly_those_pages(kernel: LinuxKernel) -> None:
    before = locked_bytes()
    frames = frames_of(kernel.allocate_units(4 * MIB_PAGES))
    # free the middle half, cutting through whatever ranges the kernel gave
    middle = frames[MIB_PAGES : 3 * MIB_PAGES]
    kernel.free_units([UnitRange(pfn, 1) for pfn in middle])
    assert locked_bytes() - before == 2 << 20
    assert kernel.held_pages == 2 * MIB_PAGES
    kept = frames[:MIB_PAGES] + frames[3 * MIB_PAGES :]
    assert all(kernel.read_page(pfn) == page_mark(TOKEN_BYTES, pfn) for pfn in kept)
    kernel.free_units([UnitRange(pfn, 1) for pfn in kept])
    assert locked_bytes() == before
    assert kernel.mappings == 0


def test_a_large_request_is_split_into_chunks_and_unmapped_when_all_freed(
    kernel: LinuxKernel,
) -> None:
    ranges = kernel.allocate_units(CHUNK_PAGES + 10)
    assert count_units(ranges) == CHUNK_PAGES + 10
    assert kernel.mappings == 2
    kernel.free_units(ranges)
    assert kernel.mappings == 0 and kernel.held_pages == 0


class MarkCheckingLock(Libc):
    """Real munlock, after recording whether the pages still hold their marks."""

    def __init__(self) -> None:
        super().__init__()
        self.pages_at_munlock: list[bytes] = []

    def munlock(self, address: int, length_bytes: int) -> int:
        for offset in range(0, length_bytes, PAGE_SIZE_BYTES):
            self.pages_at_munlock.append(ctypes.string_at(address + offset, PAGE_SIZE_BYTES))
        return super().munlock(address, length_bytes)


def test_freeing_leaves_the_marks_in_place() -> None:
    # Freeing is munlock, then MADV_DONTNEED: up to munlock the pages must be untouched
    # (writing to a page the host has punched would make the host back it again).
    before = locked_bytes()
    spy = MarkCheckingLock()
    kernel = LinuxKernel(TOKEN, memory_lock=spy)
    try:
        frames = frames_of(kernel.allocate_units(MIB_PAGES))
        marks = [page_mark(TOKEN_BYTES, pfn) for pfn in frames]
        spy.pages_at_munlock.clear()
        kernel.free_units([UnitRange(pfn, 1) for pfn in frames[::2]])
        kernel.free_units([UnitRange(pfn, 1) for pfn in frames[1::2]])
        assert sorted(spy.pages_at_munlock) == sorted(marks)
        assert locked_bytes() == before and kernel.mappings == 0 and kernel.held_pages == 0
    finally:
        kernel.close()


class FailingLock(Libc):
    """Real mlock until ``budget_bytes`` are locked, then ENOMEM like a guest out of memory."""

    def __init__(self, budget_bytes: int) -> None:
        super().__init__()
        self.budget_bytes = budget_bytes

    def mlock(self, address: int, length_bytes: int) -> int:
        if length_bytes > self.budget_bytes:
            return errno.ENOMEM
        self.budget_bytes -= length_bytes
        return super().mlock(address, length_bytes)


def test_out_of_memory_returns_the_pages_pinned_so_far_and_gives_back_the_rest() -> None:
    before = locked_bytes()
    kernel = LinuxKernel(TOKEN, memory_lock=FailingLock(budget_bytes=3 << 20))
    try:
        ranges = kernel.allocate_units(16 * MIB_PAGES)
        # mlock goes in 2 MiB pieces: the first piece fits, the second does not
        assert count_units(ranges) == 2 * MIB_PAGES
        assert locked_bytes() - before == 2 << 20
        assert all(
            kernel.read_page(pfn) == page_mark(TOKEN_BYTES, pfn) for pfn in frames_of(ranges)
        )
        assert kernel.allocate_units(MIB_PAGES * 2) == []  # 1 MiB of budget left: too little
        assert locked_bytes() - before == 2 << 20
        kernel.free_units(ranges)
        assert locked_bytes() == before
        assert kernel.mappings == 0
    finally:
        kernel.close()


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_without_cap_sys_admin_frame_numbers_read_as_zero_and_fail_clearly() -> None:
    # A root process without CAP_SYS_ADMIN: pagemap shows pages present with PFN 0.
    script = (
        "import re\n"
        "from balloonist.agent.linux import LinuxKernel, PagemapError\n"
        f"k = LinuxKernel({TOKEN!r})\n"
        "try:\n"
        "    k.allocate_units(256)\n"
        "except PagemapError as exc:\n"
        "    print('refused:', exc)\n"
        "status = open('/proc/self/status').read()\n"
        "print('locked:', re.search(r'VmLck:\\s+(\\d+)', status).group(1), k.mappings)\n"
    )
    result = subprocess.run(
        ["setpriv", "--bounding-set=-sys_admin", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "refused:" in result.stdout and "CAP_SYS_ADMIN" in result.stdout, result
    assert "locked: 0 0" in result.stdout  # the chunk was unlocked and unmapped


def test_freeing_pages_it_does_not_hold_is_a_bug(kernel: LinuxKernel) -> None:
    ranges = kernel.allocate_units(4)
    with pytest.raises(RuntimeError):
        kernel.free_units([UnitRange(ranges[0].start, 1), UnitRange(ranges[0].start, 1)])
    with pytest.raises(RuntimeError):
        kernel.free_units([UnitRange(1, 1)])
    assert kernel.held_pages == 4  # a refused free changes nothing


def test_the_token_must_be_16_lowercase_hex_digits() -> None:
    for bad in ("0123", "0123456789ABCDEF", "0123456789abcdeg"):
        with pytest.raises(ValueError):
            LinuxKernel(bad)


def test_close_releases_everything(kernel: LinuxKernel) -> None:
    before = locked_bytes()
    kernel.allocate_units(2 * MIB_PAGES)
    kernel.close()
    assert locked_bytes() == before


def test_prepare_host_sets_both_knobs_and_restores_compaction(tmp_path: Path) -> None:
    (tmp_path / "self").mkdir()
    (tmp_path / "sys/vm").mkdir(parents=True)
    (tmp_path / "self/oom_score_adj").write_text("0\n")
    compact = tmp_path / "sys/vm/compact_unevictable_allowed"
    compact.write_text("1\n")
    tuning = prepare_host(tmp_path)
    assert (tmp_path / "self/oom_score_adj").read_text() == "1000\n"
    assert compact.read_text() == "0\n"
    tuning.restore()
    assert compact.read_text() == "1\n"


def test_prepare_host_goes_on_when_it_cannot_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prepare_host(tmp_path / "missing").restore()
    assert "oom_score_adj" in caplog.text
    assert "compact_unevictable_allowed" in caplog.text
