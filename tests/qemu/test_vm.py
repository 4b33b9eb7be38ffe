"""Real QEMU guests under TCG: the balloon reaches its target, the guest feels it, and
the failure modes give clear errors. Marked ``vm``; CI runs them.

Thresholds:
- TARGET_TIMEOUT_S: QMP ``balloon`` 512 -> 256 MiB completes in about 1 s under TCG on
  this kind of machine; 30 s leaves room for a loaded host without hiding a stall.
- MIN_EFFECT: the guest must lose at least 90 % of the ballooned memory from its own
  view; the rest is slack for what the kernel allocates or frees meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from balloonist.errors import FatalBackendError, TransientBackendError
from balloonist.qemu import launcher
from balloonist.qemu.assets import GuestAssets
from balloonist.qemu.qmp import BalloonQMP
from balloonist.units import MIB

from .conftest import boot, meminfo_kib, serial_lines, wait_for_line

pytestmark = pytest.mark.vm

TARGET_TIMEOUT_S = 30.0
MIN_EFFECT = 0.9
BALLOONED_KIB = 256 * 1024


def _mem_line_after(record: launcher.VMRecord, index: int) -> dict[str, int]:
    return meminfo_kib(wait_for_line(record, r"^BALLOONIST-MEM ", 30.0, after=index))


async def _balloon_to(record: launcher.VMRecord, guest_bytes: int) -> float:
    async with BalloonQMP(Path(record.qmp_socket), name=record.name) as qmp:
        await qmp.set_target(guest_bytes)
        return await qmp.wait_actual(guest_bytes, timeout_s=TARGET_TIMEOUT_S)


def test_balloon_reaches_target_and_the_guest_loses_the_memory(
    state: launcher.StateDir, guest_assets: GuestAssets
) -> None:
    record = boot(state, guest_assets, "g1", work="64@0")
    before = _mem_line_after(record, len(serial_lines(record)) - 1)
    seconds = asyncio.run(_balloon_to(record, 256 * MIB))
    assert seconds < TARGET_TIMEOUT_S
    # wait for a meminfo line printed after the balloon got there
    mark = len(serial_lines(record))
    after = _mem_line_after(record, mark)
    # With deflate-on-oom (our default) Linux keeps ballooned pages in MemTotal and
    # takes them out of MemFree/MemAvailable instead.
    assert before["MemAvailable"] - after["MemAvailable"] >= MIN_EFFECT * BALLOONED_KIB
    # deflate gives it back
    asyncio.run(_balloon_to(record, 512 * MIB))
    mark = len(serial_lines(record))
    restored = _mem_line_after(record, mark)
    assert restored["MemAvailable"] - after["MemAvailable"] >= MIN_EFFECT * BALLOONED_KIB
    # the workload kept running throughout
    assert wait_for_line(record, r"BALLOONIST-WORK .*resident_mib=64", 30.0, after=mark)


async def _balloon_watching_events(record: launcher.VMRecord, guest_bytes: int) -> list[int]:
    """Set a target and collect BALLOON_CHANGE sizes until one reports it reached."""
    seen: list[int] = []
    async with (
        BalloonQMP(Path(record.qmp_socket), name=record.name) as qmp,
        qmp.balloon_changes() as changes,
    ):
        await qmp.set_target(guest_bytes)

        async def until_reached() -> None:
            async for actual in changes:
                seen.append(actual)
                if actual == guest_bytes:
                    return

        await asyncio.wait_for(until_reached(), TARGET_TIMEOUT_S)
    return seen


def test_without_deflate_on_oom_memtotal_drops_and_events_report_it(
    state: launcher.StateDir, guest_assets: GuestAssets
) -> None:
    record = boot(state, guest_assets, "g2", deflate_on_oom=False)
    before = _mem_line_after(record, len(serial_lines(record)) - 1)
    seen = asyncio.run(_balloon_watching_events(record, 256 * MIB))
    # The driver inflates in batches; QEMU reports each new size, shrinking to the target.
    assert seen[-1] == 256 * MIB
    assert all(256 * MIB <= size < 512 * MIB for size in seen)
    assert seen == sorted(seen, reverse=True)
    after = _mem_line_after(record, len(serial_lines(record)))
    assert before["MemTotal"] - after["MemTotal"] >= MIN_EFFECT * BALLOONED_KIB


def test_guest_stats_are_read_and_bounded(
    state: launcher.StateDir, guest_assets: GuestAssets
) -> None:
    record = boot(state, guest_assets, "g3")

    async def stats() -> int | None:
        async with BalloonQMP(Path(record.qmp_socket), name=record.name) as qmp:
            await qmp.enable_stats(1)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                s = await qmp.guest_stats()
                if s.total_bytes is not None and s.available_bytes is not None:
                    assert s.available_bytes <= s.total_bytes <= 512 * MIB
                    return s.total_bytes
                await asyncio.sleep(0.5)
            return None

    total = asyncio.run(stats())
    assert total is not None and total > 256 * MIB


def test_a_vm_without_a_balloon_device_is_a_clear_error(
    state: launcher.StateDir, guest_assets: GuestAssets
) -> None:
    record = boot(state, guest_assets, "noballoon", balloon=False)
    with pytest.raises(FatalBackendError, match="no balloon device"):
        asyncio.run(_balloon_to(record, 256 * MIB))


def test_dropped_connection_is_transient_and_reconnecting_works(
    state: launcher.StateDir, guest_assets: GuestAssets
) -> None:
    record = boot(state, guest_assets, "g4")

    async def scenario() -> int:
        qmp = BalloonQMP(Path(record.qmp_socket), name=record.name)
        await qmp.connect()
        await qmp._client.disconnect()  # the connection goes away under us
        with pytest.raises(TransientBackendError):
            await qmp.actual_bytes()
        async with BalloonQMP(Path(record.qmp_socket), name=record.name) as again:
            return await again.actual_bytes()

    assert asyncio.run(scenario()) == 512 * MIB


def test_a_killed_qemu_is_transient_and_shows_as_gone(
    state: launcher.StateDir, guest_assets: GuestAssets
) -> None:
    record = boot(state, guest_assets, "g5")
    assert record.pid is not None
    os.kill(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while record.running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not record.running()
    with pytest.raises(TransientBackendError):
        asyncio.run(_balloon_to(record, 256 * MIB))
