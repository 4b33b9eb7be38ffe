"""virtio-mem on a real guest under TCG (``vm``): the daemon resizes a guest through its
hot-pluggable region, growing and shrinking it, never past its min (its boot memory)
or its max. (Bad ``--virtio-mem`` sizes: tests/qemu/test_vmcli.py.)

Thresholds:
- BOOT_MIB, REGION_MIB: 256 MiB to boot with, up to 512 MiB more to plug.
- GROWN_DEADLINE_S: plugging 512 MiB took 0.07 s by hand under TCG; the daemon
  deflates unpaced, so the guest is whole within a few periods. 30 s.
- SHRUNK_DEADLINE_S: unplugging is paced like an inflation (16 MiB a period at
  first, then faster); by hand 512 -> 128 MiB took 1.1 s. 60 s.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from balloonist.daemon.control import GuestChange
from balloonist.daemon.service import Daemon, DaemonConfig
from balloonist.qemu import launcher
from balloonist.qemu.assets import GuestAssets
from balloonist.units import MIB

from .conftest import boot, guest_status, stepper

pytestmark = pytest.mark.vm

BOOT_MIB = 256
REGION_MIB = 512
GROWN_DEADLINE_S = 30.0
SHRUNK_DEADLINE_S = 60.0
SHRUNK_MAX = 384 * MIB


def _plugged_bytes(daemon: Daemon, name: str) -> int:
    return guest_status(daemon, name).allocated_bytes - BOOT_MIB * MIB


def test_the_daemon_grows_and_shrinks_a_virtio_mem_guest_within_its_bounds(
    state: launcher.StateDir, guest_assets: GuestAssets
) -> None:
    boot(
        state,
        guest_assets,
        "vmem",
        memory_mib=BOOT_MIB,
        work="100@0",
        virtio_mem_bytes=REGION_MIB * MIB,
    )
    record = state.load("vmem")
    assert (record.memory_bytes, record.min_bytes) == (
        (BOOT_MIB + REGION_MIB) * MIB,
        BOOT_MIB * MIB,
    )
    sent: list[tuple[int, int, int]] = []  # (max in effect, period, target)
    held: list[int] = []  # its size by QEMU, each period
    limit = [record.max_bytes]
    config = DaemonConfig.model_validate({"daemon": {"budget": "2GiB"}, "ksm": {"mode": "off"}})
    daemon = Daemon(config, state, on_target=lambda _, b: sent.append((limit[0], len(held), b)))
    run_until = stepper(daemon)

    def plugged(wanted: Callable[[int], bool]) -> Callable[[], bool]:
        def check() -> bool:
            held.append(guest_status(daemon, "vmem").allocated_bytes)
            return wanted(held[-1] - BOOT_MIB * MIB)

        return check

    try:
        # The host has room: the guest is given all it may have, and plugs it.
        run_until(plugged(lambda b: b == REGION_MIB * MIB), GROWN_DEADLINE_S)
        assert _plugged_bytes(daemon, "vmem") == REGION_MIB * MIB
        # Its max lowered: the daemon unplugs down to it.
        daemon.change_guest("vmem", GuestChange(max_bytes=SHRUNK_MAX))
        limit[0] = SHRUNK_MAX
        run_until(plugged(lambda b: b <= SHRUNK_MAX - BOOT_MIB * MIB), SHRUNK_DEADLINE_S)
        # QEMU's count of plugged blocks: the guest's driver unplugged them.
        assert _plugged_bytes(daemon, "vmem") == SHRUNK_MAX - BOOT_MIB * MIB
    finally:
        daemon.close()
    # Never below its boot memory or above its size; once its max is lowered, each
    # target is a paced step down from where the guest was in that period (a step it
    # did not finish in time is not asked again in full: the next is from where it
    # got to), never a plug, and the last is the max.
    assert all(BOOT_MIB * MIB <= t <= record.memory_bytes for _, _, t in sent), sent
    after = [(period, t) for max_bytes, period, t in sent if max_bytes == SHRUNK_MAX]
    assert after and after[-1][1] == SHRUNK_MAX
    assert all(SHRUNK_MAX <= t <= held[period] for period, t in after), (after, held)
