"""Pieces of the real-VM path that need no QEMU: the initramfs writer, guest stats checks."""

from __future__ import annotations

import stat
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balloonist.errors import FatalBackendError
from balloonist.qemu.assets import CpioEntry, write_cpio
from balloonist.qemu.qmp import MAX_GUEST_FIGURE, parse_guest_stats


def read_cpio(data: bytes) -> list[tuple[str, int, bytes, int, int]]:
    """A minimal newc reader, to check what write_cpio wrote."""
    out: list[tuple[str, int, bytes, int, int]] = []
    pos = 0
    while True:
        header = data[pos : pos + 110]
        assert header[:6] == b"070701"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos : pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert pos == len(data)
            return out
        out.append((name, mode, body, rmaj, rmin))


def test_cpio_round_trip() -> None:
    entries = [
        CpioEntry.directory("bin"),
        CpioEntry.file("init", b"#!/bin/sh\necho hi\n", mode=0o755),
        CpioEntry.file("bin/odd", b"x" * 5),
        CpioEntry.char_device("dev/console", major=5, minor=1),
    ]
    back = read_cpio(write_cpio(entries))
    assert [b[0] for b in back] == ["bin", "init", "bin/odd", "dev/console"]
    assert stat.S_ISDIR(back[0][1])
    assert back[1][2] == b"#!/bin/sh\necho hi\n" and back[1][1] & 0o777 == 0o755
    assert back[2][2] == b"xxxxx"
    assert stat.S_ISCHR(back[3][1]) and back[3][3:] == (5, 1)


def test_guest_stats_take_only_bounded_integers() -> None:
    reply = {
        "stats": {
            "stat-total-memory": 512 << 20,
            "stat-available-memory": -1,  # never reported
            "stat-free-memory": "lots",
            "stat-major-faults": True,
            "stat-swap-in": MAX_GUEST_FIGURE + 1,
        },
        "last-update": 17,
    }
    s = parse_guest_stats(reply)
    assert s.total_bytes == 512 << 20
    assert s.available_bytes is None and s.free_bytes is None
    assert s.major_faults is None and s.swap_in_pages is None
    assert s.last_update_s == 17


def test_swap_figures_arrive_in_bytes_and_count_pages() -> None:
    """The virtio spec (and Linux's driver) report swap-in/out in bytes, faults as
    counts; a guest that swapped in 3 pages has 3 pages, not 12288, of swap-ins."""
    reply = {"stats": {"stat-swap-in": 3 * 4096, "stat-swap-out": 5 * 4096 + 100}}
    s = parse_guest_stats(reply)
    assert (s.swap_in_pages, s.swap_out_pages) == (3, 5)


scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
stat_keys = st.sampled_from(["stat-total-memory", "stat-free-memory", "stat-swap-in", "junk"])


@given(
    st.one_of(
        scalars,
        st.fixed_dictionaries(
            {},
            optional={
                "stats": scalars | st.dictionaries(stat_keys, scalars, max_size=4),
                "last-update": scalars,
            },
        ),
    )
)
def test_any_reply_parses_to_bounded_figures_or_none(reply: Any) -> None:
    if not isinstance(reply, dict):
        with pytest.raises(FatalBackendError):
            parse_guest_stats(reply)
        return
    s = parse_guest_stats(reply)
    for value in vars(s).values():
        assert value is None or (isinstance(value, int) and 0 <= value <= MAX_GUEST_FIGURE)
