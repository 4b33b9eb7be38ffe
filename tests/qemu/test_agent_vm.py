"""Real guests for the user-level agent, under TCG: Python in a guest whose root is the
host's filesystem over 9p, the agent VM's RAM file and virtio-serial port, and the host
freeing the memory behind pages a guest pinned and marked (without the agent: a small
script, ``guest_lock_pages.py``, does what it would). Marked ``vm``; CI runs them.

Thresholds and timeouts:
- BOOT_TIMEOUT_S (conftest): READY takes about 7 s under TCG here, with or without 9p.
- RUN_TIMEOUT_S: a Python program started by init prints its first line about 2 s after
  READY; locking and marking LOCKED_MIB takes a few seconds more under TCG. 120 s leaves
  room for a loaded CI host without hiding a hang.
- MIN_FREED: at least 90 % of the locked memory must leave the RAM file. Every locked
  page is marked, so anything less means frames were mapped to the wrong offsets or
  pages moved; the slack is for pages the guest kernel migrates despite mlock.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

import pytest

from balloonist.agent.protocol import PORT_NAME
from balloonist.driver import UnitRange
from balloonist.qemu import launcher
from balloonist.qemu.assets import GuestAssets, host_python
from balloonist.qemu.reclaim import PAGE_BYTES, GuestRam
from balloonist.units import MIB

from .conftest import BOOT_TIMEOUT_S, boot, guest_visible, serial_lines, wait_for_line

pytestmark = pytest.mark.vm

RUN_TIMEOUT_S = 120.0
LOCKED_MIB = 96
MIN_FREED = 0.9
GUEST_SCRIPT = Path(__file__).with_name("guest_lock_pages.py")


def test_a_host_root_guest_runs_the_hosts_python(
    state: launcher.StateDir, guest_assets: GuestAssets
) -> None:
    started = time.monotonic()
    record = boot(state, guest_assets, "py", memory_mib=384, run=(host_python(), "-m", "platform"))
    booted_s = time.monotonic() - started
    # platform names the kernel Python runs on: the guest's, not the host's
    line = wait_for_line(record, rf"^Linux-{re.escape(guest_assets.kernel_version)}", RUN_TIMEOUT_S)
    ran_s = time.monotonic() - started
    assert wait_for_line(record, r"^BALLOONIST-RUN-EXIT 0$", RUN_TIMEOUT_S)
    print(f"9p guest READY after {booted_s:.1f} s; Python printed {line!r} after {ran_s:.1f} s")


def test_an_agent_vm_has_its_ram_file_and_serial_port(
    state: launcher.StateDir, guest_assets: GuestAssets
) -> None:
    record = boot(state, guest_assets, "ag", memory_mib=256, agent=True)
    assert record.agent and record.ram_file is not None and record.agent_socket is not None
    ram_file = Path(record.ram_file)
    assert ram_file.parent == launcher.RAM_DIR
    assert ram_file.stat().st_size == 256 * MIB
    assert ram_file.stat().st_blocks * 512 >= 4 * MIB  # at least the kernel QEMU loaded
    assert state.load("ag") == record  # the new fields survive vm.json
    # init lists the ports it linked: /sys/class/virtio-ports/vport*/name in the guest
    assert wait_for_line(record, rf"^BALLOONIST-PORT vport\d+p\d+ {re.escape(PORT_NAME)}$", 5.0)
    with socket.socket(socket.AF_UNIX) as host_end:
        host_end.connect(record.agent_socket)
    launcher.stop_vm(state, "ag")
    assert not ram_file.exists()


def _read_line(sock: socket.socket, timeout_s: float) -> bytes:
    deadline = time.monotonic() + timeout_s
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no line from the guest in {timeout_s} s (got {len(data)} bytes)")
        sock.settimeout(left)
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise AssertionError("the guest's port closed")
        data += chunk
    return data.split(b"\n", 1)[0]


def test_the_host_frees_the_memory_behind_marked_pages(
    state: launcher.StateDir, guest_assets: GuestAssets
) -> None:
    token = os.urandom(8)
    request = guest_assets.start_request(
        "lock",
        384 * MIB,
        accel="tcg",
        agent=True,
        run=(
            host_python(),
            str(guest_visible(GUEST_SCRIPT)),
            str(LOCKED_MIB),
            token.hex(),
            PORT_NAME,
        ),
    )
    record = launcher.start_vm(state, request)
    assert record.agent_socket is not None and record.ram_file is not None
    with socket.socket(socket.AF_UNIX) as port:
        # connect before the guest writes: QEMU drops what a port sends with no one there
        port.connect(record.agent_socket)
        wait_for_line(record, "BALLOONIST-READY", BOOT_TIMEOUT_S)
        report = json.loads(_read_line(port, RUN_TIMEOUT_S))
        assert report["token"] == token.hex()
        ranges = [UnitRange(start, count) for start, count in report["ranges"]]
        locked_pages = sum(r.count for r in ranges)
        assert locked_pages == LOCKED_MIB * MIB // PAGE_BYTES
        with GuestRam(Path(record.ram_file), record.memory_bytes) as ram:
            before_bytes = ram.allocated_bytes()
            freed_pages = ram.punch(ranges, token)
            after_bytes = ram.allocated_bytes()
            assert freed_pages >= MIN_FREED * locked_pages
            assert before_bytes - after_bytes >= MIN_FREED * locked_pages * PAGE_BYTES
            assert ram.hole_pages(ranges) >= freed_pages
            # the guest runs on, and leaves the pinned pages alone
            wait_for_line(record, r"^BALLOONIST-MEM ", 30.0, after=len(serial_lines(record)))
            assert ram.hole_pages(ranges) >= freed_pages
        print(
            f"locked {locked_pages} pages in {len(ranges)} ranges; freed {freed_pages}; "
            f"RAM file {before_bytes // MIB} -> {after_bytes // MIB} MiB"
        )
        # the guest reads zeros exactly where the host punched
        port.sendall(b"punched\n")
        zeroed = wait_for_line(record, r"^GUEST-LOCK zeroed=", RUN_TIMEOUT_S)
        assert zeroed == f"GUEST-LOCK zeroed={freed_pages} of={locked_pages}"
