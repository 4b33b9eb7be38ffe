"""Host-side reclaim on a real tmpfs file, no VM: the pc layout, the page mark and the
check of it, punching holes and measuring them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balloonist.agent import linux as agent_linux
from balloonist.driver import UnitRange, count_units
from balloonist.errors import FatalBackendError, GuestProtocolError
from balloonist.qemu.reclaim import (
    HIGH_BASE_PFN,
    PAGE_BYTES,
    READ_PAGES,
    GuestRam,
    RamLayout,
    page_mark,
    pc_low_ram_bytes,
)
from balloonist.units import GIB, MIB

from . import guest_lock_pages

TOKEN = bytes.fromhex("0123456789abcdef")
SHM = Path("/dev/shm")


# -- the layout ----------------------------------------------------------------------


def test_small_guests_are_all_low_memory() -> None:
    layout = RamLayout.pc(512 * MIB)
    assert layout.low_bytes == 512 * MIB and layout.high_pages == 0
    assert layout.pfn_to_offset_bytes(0) == 0
    assert layout.pfn_to_offset_bytes(1000) == 1000 * PAGE_BYTES
    last = 512 * MIB // PAGE_BYTES - 1
    assert layout.pfn_to_offset_bytes(last) == 512 * MIB - PAGE_BYTES
    for pfn in (last + 1, HIGH_BASE_PFN, -1):
        with pytest.raises(GuestProtocolError, match=r"not guest RAM|bad page range"):
            layout.pfn_to_offset_bytes(pfn)


def test_the_split_moves_to_3_gib_from_3_5_gib_of_ram() -> None:
    # hw/i386/pc_piix.c: below max-ram-below-4g (3.5 GiB) nothing is split; at or above
    # it, gigabyte_align puts the split at 3 GiB ("-m 4G -> 3072M low, 1024M high").
    assert pc_low_ram_bytes(3 * GIB + 512 * MIB - MIB) == 3 * GIB + 512 * MIB - MIB
    assert pc_low_ram_bytes(3 * GIB + 512 * MIB) == 3 * GIB
    layout = RamLayout.pc(4 * GIB)
    assert (layout.low_bytes, layout.high_pages) == (3 * GIB, GIB // PAGE_BYTES)
    low_top = 3 * GIB // PAGE_BYTES
    assert layout.pfn_to_offset_bytes(low_top - 1) == 3 * GIB - PAGE_BYTES
    assert layout.pfn_to_offset_bytes(HIGH_BASE_PFN) == 3 * GIB
    assert layout.pfn_to_offset_bytes(HIGH_BASE_PFN + 5) == 3 * GIB + 5 * PAGE_BYTES
    top = HIGH_BASE_PFN + GIB // PAGE_BYTES
    assert layout.pfn_to_offset_bytes(top - 1) == 4 * GIB - PAGE_BYTES
    for pfn in (low_top, HIGH_BASE_PFN - 1, top):  # the PCI hole, and beyond RAM
        with pytest.raises(GuestProtocolError, match="not guest RAM"):
            layout.pfn_to_offset_bytes(pfn)


def test_ranges_may_not_cross_the_hole_or_leave_ram() -> None:
    layout = RamLayout.pc(4 * GIB)
    low_top = 3 * GIB // PAGE_BYTES
    assert layout.range_offset_bytes(UnitRange(low_top - 4, 4)) == 3 * GIB - 4 * PAGE_BYTES
    bad = [
        UnitRange(low_top - 1, 2),  # into the hole
        UnitRange(HIGH_BASE_PFN - 1, 2),  # out of it
        UnitRange(low_top - 1, HIGH_BASE_PFN - low_top + 2),  # across it
        UnitRange(HIGH_BASE_PFN + GIB // PAGE_BYTES - 1, 2),  # past the top
        UnitRange(0, 0),
    ]
    for pages in bad:
        with pytest.raises(GuestProtocolError):
            layout.range_offset_bytes(pages)


@given(st.integers(min_value=16, max_value=64 * 1024).map(lambda mib: mib * MIB), st.data())
def test_offsets_and_frames_are_inverse(ram_bytes: int, data: st.DataObject) -> None:
    layout = RamLayout.pc(ram_bytes)
    offset = data.draw(st.integers(0, ram_bytes // PAGE_BYTES - 1)) * PAGE_BYTES
    pfn = layout.offset_to_pfn(offset)
    assert layout.pfn_to_offset_bytes(pfn) == offset
    # RAM below 4 GiB never reaches the hole; above, it starts at 4 GiB exactly
    assert pfn < layout.low_pages or pfn >= HIGH_BASE_PFN
    assert layout.low_bytes <= 0xE000_0000


# -- the mark ------------------------------------------------------------------------


@given(st.binary(min_size=8, max_size=8), st.integers(0, (1 << 55) - 1))
def test_host_agent_and_test_guest_agree_on_the_mark(token: bytes, pfn: int) -> None:
    mark = page_mark(token, pfn)
    assert len(mark) == PAGE_BYTES
    assert mark == token + pfn.to_bytes(8, "little") + token * 510
    assert mark[8:16] == pfn.to_bytes(8, "little")
    assert mark[:8] + mark[16:] == token * 511
    assert agent_linux.page_mark(token, pfn) == mark  # the agent's own copy
    assert guest_lock_pages.page_mark(token, pfn) == mark  # the VM test's guest script


def test_a_mark_needs_an_8_byte_token() -> None:
    for make in (page_mark, agent_linux.page_mark):
        with pytest.raises(ValueError, match="token"):
            make(b"short", 1)


# -- punching a real file ------------------------------------------------------------


@pytest.fixture
def ram_file() -> Iterator[Path]:
    if not SHM.is_dir():
        pytest.skip("no /dev/shm")
    path = SHM / f"balloonist-test-{os.getpid()}.ram"
    yield path
    path.unlink(missing_ok=True)


def _page(head: bytes, offset: int) -> bytes:
    """``head``, then the rest of the page filled with a byte that depends on ``offset``."""
    return head + bytes([offset // PAGE_BYTES % 251]) * (PAGE_BYTES - len(head))


def _make_ram(path: Path, ram_bytes: int, pages: dict[int, bytes]) -> None:
    """A sparse file of ``ram_bytes`` with each page of ``pages`` (offset -> head) written."""
    with path.open("wb") as fh:
        fh.truncate(ram_bytes)
        for offset, head in pages.items():
            fh.seek(offset)
            fh.write(_page(head, offset))


def test_marked_pages_are_punched_and_the_rest_survive(ram_file: Path) -> None:
    ram_bytes = 16 * MIB

    def tampered(pfn: int, at: int) -> bytes:
        """The mark of ``pfn`` but for one byte: reused, and written once."""
        page = bytearray(page_mark(TOKEN, pfn))
        page[at] ^= 0xFF
        return bytes(page)

    ranges = [UnitRange(100, 42), UnitRange(200, 20), UnitRange(300, 2)]
    asked = count_units(ranges)
    marked = set(range(100, 140)) | set(range(200, 220)) | {300}
    unmarked = {  # among marked pages, each breaking a run
        140: b"\0" * 16,  # zeros: never the agent's
        141: page_mark(TOKEN, 141)[:8] + b"garbage!",  # right token, wrong frame
        202: tampered(202, 0),  # in the token before the frame number
        204: tampered(204, 15),  # in the frame number
        205: page_mark(bytes(8), 205),  # another token
        207: tampered(207, 16),  # just after the frame number
        208: page_mark(TOKEN, 208)[:16],  # the first 16 bytes right, the rest not
        210: tampered(210, 3000),  # far from the start
        212: tampered(212, PAGE_BYTES - 1),  # the very last byte
        214: TOKEN * (PAGE_BYTES // 8),  # all token, no frame number
        216: (TOKEN + (216).to_bytes(8, "little")) * (PAGE_BYTES // 16),  # an older mark
        301: page_mark(TOKEN, 300),  # a copy of another page's mark
    }
    pages = {pfn: page_mark(TOKEN, pfn) for pfn in marked - unmarked.keys()} | unmarked
    _make_ram(ram_file, ram_bytes, {pfn * PAGE_BYTES: head for pfn, head in pages.items()})
    with GuestRam(ram_file, ram_bytes) as ram:
        before = ram.allocated_bytes()
        assert before == len(pages) * PAGE_BYTES
        assert ram.hole_pages(ranges) == asked - len(pages)  # a few pages asked are unwritten
        freed = ram.punch(ranges, TOKEN)
        assert freed == len(marked - unmarked.keys())
        assert ram.allocated_bytes() == before - freed * PAGE_BYTES
        assert ram.hole_pages(ranges) == asked - len(unmarked)
        assert ram.punch(ranges, TOKEN) == 0  # holes read as zeros: nothing more to free
    content = ram_file.read_bytes()
    assert len(content) == ram_bytes
    for pfn in range(ram_bytes // PAGE_BYTES):
        page = content[pfn * PAGE_BYTES : (pfn + 1) * PAGE_BYTES]
        if pfn in unmarked:
            assert page == _page(unmarked[pfn], pfn * PAGE_BYTES), pfn
        else:  # punched, or never written
            assert page == bytes(PAGE_BYTES), pfn


def test_long_ranges_are_read_in_pieces_and_runs_cross_them(ram_file: Path) -> None:
    ram_bytes = 16 * MIB
    first, count = 50, 2 * READ_PAGES + 7  # three reads, the last short
    # unmarked pages at each read's edges; the run from READ_PAGES + 4 crosses a read
    kept = {first + i for i in (0, 5, READ_PAGES - 1, READ_PAGES, READ_PAGES + 3, count - 1)}
    pages = {
        pfn * PAGE_BYTES: b"\0" * 16 if pfn in kept else page_mark(TOKEN, pfn)
        for pfn in range(first, first + count)
    }
    _make_ram(ram_file, ram_bytes, pages)
    with GuestRam(ram_file, ram_bytes) as ram:
        assert ram.punch([UnitRange(first, count)], TOKEN) == count - len(kept)
        assert ram.allocated_bytes() == len(kept) * PAGE_BYTES
    content = ram_file.read_bytes()
    for pfn in range(first, first + count):
        page = content[pfn * PAGE_BYTES : (pfn + 1) * PAGE_BYTES]
        assert page == (_page(b"\0" * 16, pfn * PAGE_BYTES) if pfn in kept else bytes(PAGE_BYTES))


def test_high_memory_pages_are_found_above_the_split(ram_file: Path) -> None:
    ram_bytes = 4 * GIB  # sparse: only the pages written take memory
    pfns = [HIGH_BASE_PFN, HIGH_BASE_PFN + 1, 3 * GIB // PAGE_BYTES - 1]
    offsets = [3 * GIB, 3 * GIB + PAGE_BYTES, 3 * GIB - PAGE_BYTES]  # where QEMU keeps them
    _make_ram(
        ram_file, ram_bytes, {o: page_mark(TOKEN, p) for o, p in zip(offsets, pfns, strict=True)}
    )
    with GuestRam(ram_file, ram_bytes) as ram:
        assert ram.allocated_bytes() == 3 * PAGE_BYTES
        ranges = [UnitRange(HIGH_BASE_PFN, 2), UnitRange(pfns[2], 1)]
        assert ram.punch(ranges, TOKEN) == 3
        assert ram.allocated_bytes() == 0
        assert ram.hole_pages(ranges) == 3


def test_a_range_outside_ram_frees_nothing(ram_file: Path) -> None:
    ram_bytes = 16 * MIB
    _make_ram(ram_file, ram_bytes, {10 * PAGE_BYTES: page_mark(TOKEN, 10)})
    with GuestRam(ram_file, ram_bytes) as ram:
        with pytest.raises(GuestProtocolError, match="not guest RAM"):
            ram.punch([UnitRange(10, 1), UnitRange(ram_bytes // PAGE_BYTES, 1)], TOKEN)
        assert ram.allocated_bytes() == PAGE_BYTES  # checked all before punching any
        with pytest.raises(ValueError, match="token"):
            ram.punch([UnitRange(10, 1)], b"short")


def test_a_file_of_the_wrong_size_or_none_is_refused(ram_file: Path) -> None:
    with pytest.raises(FatalBackendError, match="guest RAM"):
        GuestRam(ram_file, 16 * MIB)
    _make_ram(ram_file, 8 * MIB, {})
    with pytest.raises(FatalBackendError, match="not the VM's"):
        GuestRam(ram_file, 16 * MIB)
