"""What a VM's QEMU process holds, as the host counts it (``qemu/host_memory.py``): the
smaps parser on hand-written text, and the reader on this test process's own memory,
where a region the size of a "guest" is touched in part, so the figure it must find
is known."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from balloonist.model import HostHeld
from balloonist.qemu.host_memory import parse_smaps, read_host_held
from balloonist.units import KIB, MIB

GUEST = 64 * MIB


def mapping(start: int, size: int, perms: str, path: str, pss_kib: int) -> str:
    return (
        f"{start:x}-{start + size:x} {perms} 00000000 00:00 0          {path}\n"
        f"Size:           {size // KIB} kB\n"
        f"Rss:            {pss_kib} kB\n"
        f"Pss:            {pss_kib} kB\n"
        f"Pss_Anon:       {pss_kib} kB\n"
    )


def test_the_guest_s_ram_is_the_mapping_of_its_size_the_rest_is_qemu_s() -> None:
    text = (
        mapping(0x1000_0000, 4 * MIB, "r-xp", "/usr/bin/qemu-system-x86_64", 3000)
        + mapping(0x2000_0000, 1024 * MIB, "rwxp", "", 50_000)  # TCG's code buffer
        + mapping(0x7000_0000, GUEST, "rw-p", "", 40_000)  # the guest's RAM
        + mapping(0x8000_0000, GUEST, "r--p", "", 7)  # read-only: not RAM
    )
    held = parse_smaps(text, GUEST)
    assert held == HostHeld(held_bytes=93_007 * KIB, guest_ram_bytes=40_000 * KIB)
    assert held.overhead_bytes == 53_007 * KIB


def test_an_agent_vm_s_ram_is_its_file() -> None:
    text = mapping(0x7000_0000, GUEST, "rw-s", "/dev/shm/vm.ram", 9000) + mapping(
        0x9000_0000, GUEST, "rw-p", "", 5
    )
    held = parse_smaps(text, GUEST, "/dev/shm/vm.ram")
    assert held.guest_ram_bytes == 9000 * KIB and held.held_bytes == 9005 * KIB


def test_without_a_mapping_of_the_guest_s_size_only_the_whole_is_known() -> None:
    held = parse_smaps(mapping(0x7000_0000, 32 * MIB, "rw-p", "", 100) + "Pss: junk\n", GUEST)
    assert held == HostHeld(held_bytes=100 * KIB, guest_ram_bytes=None)
    assert held.overhead_bytes is None


def test_a_process_that_is_gone_is_none(tmp_path: Path) -> None:
    assert read_host_held(4_000_000, GUEST, proc=tmp_path) is None


def test_what_ksm_merged_comes_from_ksm_stat_where_the_kernel_has_it(tmp_path: Path) -> None:
    smaps = mapping(0x1000_0000, GUEST, "rw-p", "", 40_000)
    for pid, ksm_stat in ((10, "ksm_merging_pages 256\nksm_process_profit 900000\n"), (11, None)):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "smaps").write_text(smaps)
        if ksm_stat is not None:
            (tmp_path / str(pid) / "ksm_stat").write_text(ksm_stat)
    merged = read_host_held(10, GUEST, proc=tmp_path)
    assert merged is not None
    assert (merged.ksm_merged_bytes, merged.ksm_saved_bytes) == (MIB, 900_000)
    assert merged.held_bytes == 40_000 * KIB
    older = read_host_held(11, GUEST, proc=tmp_path)  # a kernel before 6.1
    assert older is not None and older.ksm_merged_bytes is None and older.ksm_saved_bytes is None


def test_this_process_s_own_memory_is_counted_to_the_page() -> None:
    """An anonymous region the size of a guest, a quarter touched; then a shared file
    mapping (an agent VM's RAM) with half touched."""
    ram = mmap.mmap(-1, GUEST, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # 4 KiB pages: a transparent huge page would round the touched part up to 2 MiB
    ram.madvise(mmap.MADV_NOHUGEPAGE)
    try:
        for offset in range(0, GUEST // 4, mmap.PAGESIZE):
            ram[offset] = 1
        held = read_host_held(os.getpid(), GUEST)
        assert held is not None and held.guest_ram_bytes == GUEST // 4, held
        assert held.held_bytes > GUEST // 4  # and this Python's own memory
    finally:
        ram.close()
    path = Path("/dev/shm") / f"balloonist-test-{os.getpid()}.ram"
    try:
        with path.open("w+b") as file:
            file.truncate(GUEST)
            shared = mmap.mmap(file.fileno(), GUEST, flags=mmap.MAP_SHARED)
            try:
                for offset in range(0, GUEST // 2, mmap.PAGESIZE):
                    shared[offset] = 1
                held = read_host_held(os.getpid(), GUEST, str(path))
                assert held is not None and held.guest_ram_bytes == GUEST // 2, held
            finally:
                shared.close()
    finally:
        path.unlink(missing_ok=True)
