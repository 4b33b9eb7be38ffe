"""The host's own ways of getting memory back, on real guests under TCG (``vm``): free
page reporting and page sharing (KSM), as the daemon sees and drives them.

Thresholds:
- FREED_BYTES: the guest frees 200 MiB; the host's count must fall by 150 MiB of it.
  Free page reporting returns blocks of at least 2 MiB only, and the guest keeps some
  freed pages on its per-CPU lists, so not all 200 come back.
- FREED_WITHIN_S: the guest's page reporting runs 2 s after pages are freed; by hand
  the host's count fell within about 3 s. 10 s, from the moment the guest says it
  freed them (its console line, printed within a second of the free).
- FILL_MIB: each guest fills this much with identical pages, about 60 % of its memory.
- BUDGET_OVER_HELD: the budget is what the two VMs hold once filled, plus 10 %, so
  about 9 % of it is free by the host's count: below KSM's start threshold (20 %).
  Merging two 150 MiB fills frees far more than it takes to cross the stop threshold
  (30 %), so the daemon must also stop KSM again.
- MERGED_BYTES: going from about 9 % to 30 % free of a budget of about 600 MiB takes
  merging about 125 MiB (a run here stopped at 129 MiB merged); half of that.
- KSM_DEADLINE_S: ksmd scans about 40 k pages/s at that start; the two guests hold
  about 100 k pages, and a page is merged on its second scan: seconds. 120 s.
- KSM_AGREE: every period, each VM's merged pages in the daemon's status lie between
  its ``/proc/PID/ksm_stat`` read just before and just after the period.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from balloonist.daemon.ksm_control import KsmMode, KsmStatus
from balloonist.daemon.mechanisms import Mechanism
from balloonist.daemon.service import Daemon, DaemonConfig
from balloonist.ksm import KSM_ROOT, KsmKnobs, SysKernelKsm, parse_ksm_stat
from balloonist.qemu import launcher
from balloonist.qemu.assets import GuestAssets
from balloonist.units import MIB, PAGE_SIZE_BYTES

from .conftest import boot, guest_status, guest_visible, serial_lines, wait_for_line
from .test_daemon_vm import pss_bytes

pytestmark = [pytest.mark.vm, pytest.mark.root(reason="KSM's knobs need root")]

FREED_BYTES = 150 * MIB
FREED_WITHIN_S = 10.0
FILL_MIB = 150
BUDGET_OVER_HELD = 1.10
KSM_DEADLINE_S = 120.0
MERGED_BYTES = 64 * MIB
FILL = Path(__file__).with_name("guest_fill.sh")


@pytest.fixture
def host_ksm() -> Iterator[SysKernelKsm]:
    """The host's KSM, stopped at the kernel's defaults for the test, put back after."""
    ksm = SysKernelKsm(KSM_ROOT)
    if not ksm.available():
        pytest.fail("this kernel has no KSM")
    found = ksm.knobs()
    ksm.set_knobs(KsmKnobs(0, 100, 20))
    yield ksm
    ksm.set_knobs(found)


def _merged_bytes(pid: int) -> int:
    text = Path(f"/proc/{pid}/ksm_stat").read_text()
    return parse_ksm_stat(text).merging_pages * PAGE_SIZE_BYTES


def _ksm(daemon: Daemon) -> KsmStatus:
    status = daemon.status()
    assert status is not None and status.ksm is not None
    return status.ksm


def test_memory_a_guest_frees_goes_back_to_the_host_without_a_balloon_move(
    state: launcher.StateDir, guest_assets: GuestAssets
) -> None:
    boot(state, guest_assets, "g", memory_mib=512, work="200@0,0@25")
    sent: list[tuple[str, int]] = []
    config = DaemonConfig.model_validate({"daemon": {"budget": "1GiB"}, "ksm": {"mode": "off"}})
    daemon = Daemon(config, state, on_target=lambda name, b: sent.append((name, b)))
    try:
        wait_for_line(state.load("g"), r"ws_mib=200 resident_mib=200", 60.0)
        daemon.step()
        guest = guest_status(daemon, "g")
        assert guest.host is not None
        before, actual_before = guest.host.held_bytes, guest.allocated_bytes
        lines = len(serial_lines(state.load("g")))
        wait_for_line(state.load("g"), r"ws_mib=0 resident_mib=0", 60.0, after=lines)
        freed_at = time.monotonic()
        held = before
        while time.monotonic() - freed_at < FREED_WITHIN_S and before - held < FREED_BYTES:
            daemon.idle(0.5)
            daemon.step()
            guest = guest_status(daemon, "g")
            assert guest.host is not None
            held = guest.host.held_bytes
        assert before - held >= FREED_BYTES, (before, held)
        # The balloon did not move for it, and nothing was inflated to take it.
        assert guest.allocated_bytes == actual_before
        assert all(target >= actual_before for _, target in sent), sent
        # ...and the daemon puts it down to the guest's reporting.
        status = daemon.status()
        assert status is not None and status.freed is not None
        assert status.freed.total_bytes[Mechanism.REPORTING] >= FREED_BYTES
        assert status.freed.total_bytes[Mechanism.BALLOONING] == 0
    finally:
        daemon.close()


def test_the_daemon_runs_ksm_when_memory_is_short_and_stops_it_once_merged(
    state: launcher.StateDir, guest_assets: GuestAssets, host_ksm: SysKernelKsm
) -> None:
    fill = guest_visible(FILL)
    for name in ("a", "b"):
        boot(state, guest_assets, name, memory_mib=256, run=("/bin/sh", str(fill), str(FILL_MIB)))
    for name in ("a", "b"):
        wait_for_line(state.load(name), f"BALLOONIST-FILLED {FILL_MIB}", 90.0)
    pids = {name: state.load(name).pid for name in ("a", "b")}
    assert all(pid is not None for pid in pids.values())
    held = sum(pss_bytes(pid) or 0 for pid in pids.values())
    budget_mib = int(held * BUDGET_OVER_HELD) // MIB
    config = DaemonConfig.model_validate({"daemon": {"budget": f"{budget_mib}MiB"}})
    daemon = Daemon(config, state)
    started = stopped = False
    try:
        deadline = time.monotonic() + KSM_DEADLINE_S
        while time.monotonic() < deadline and not stopped:
            merged_before = {n: _merged_bytes(pid) for n, pid in pids.items() if pid}
            daemon.step()
            merged_after = {n: _merged_bytes(pid) for n, pid in pids.items() if pid}
            status = daemon.status()
            assert status is not None and status.ksm is not None
            assert status.ksm.mode is KsmMode.MANAGING, status.ksm
            knobs = status.ksm.knobs
            assert knobs is not None
            started = started or knobs.running
            stopped = started and not knobs.running
            for guest in status.guests:  # KSM_AGREE
                assert guest.host is not None and guest.host.ksm_merged_bytes is not None
                low, high = sorted((merged_before[guest.name], merged_after[guest.name]))
                assert low <= guest.host.ksm_merged_bytes <= high, (guest.name, low, high)
            daemon.idle(1.0)
        assert started, "the daemon never started KSM"
        assert stopped, "the daemon did not stop KSM once merging had freed memory"
        assert host_ksm.knobs().run == 0
        status = daemon.status()
        assert status is not None and status.host.truth is not None
        assert status.host.truth.free_fraction > config.ksm.stop_above_free
        merged = sum(g.host.ksm_merged_bytes or 0 for g in status.guests if g.host)
        assert merged >= MERGED_BYTES, merged
        # The daemon puts what the VMs' RAM fell by down to sharing.
        assert status.freed is not None
        assert status.freed.total_bytes[Mechanism.SHARING] > 0, status.freed
    finally:
        daemon.close()
    assert host_ksm.knobs() == KsmKnobs(0, 100, 20)  # put back as found


def test_an_administrator_s_own_ksm_is_left_alone(
    state: launcher.StateDir, host_ksm: SysKernelKsm
) -> None:
    # No VMs: all of the budget is free, so a daemon managing KSM would stop it.
    config = DaemonConfig.model_validate({"daemon": {"budget": "1GiB"}})
    own = KsmKnobs(1, 123, 37)
    host_ksm.set_knobs(own)
    daemon = Daemon(config, state)
    try:
        for _ in range(3):
            daemon.step()
        ksm = _ksm(daemon)
        assert ksm.mode is KsmMode.LEFT_ALONE
        assert "already running" in (ksm.reason or "")
    finally:
        daemon.close()
    assert host_ksm.knobs() == own
    # Taken over, then changed by hand: balloonist stops writing from then on.
    host_ksm.set_knobs(KsmKnobs(0, 100, 20))
    daemon = Daemon(config, state)
    try:
        daemon.step()
        assert _ksm(daemon).mode is KsmMode.MANAGING
        changed = KsmKnobs(0, 77, 20)
        host_ksm.set_knobs(changed)
        daemon.step()
        ksm = _ksm(daemon)
        assert ksm.mode is KsmMode.LEFT_ALONE
        assert "changed outside balloonist" in (ksm.reason or "")
    finally:
        daemon.close()
    assert host_ksm.knobs() == changed
