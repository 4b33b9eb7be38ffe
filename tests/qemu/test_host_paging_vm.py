"""Host paging on real guests under TCG (``vm``): a guest whose balloon driver never
loaded is brought toward its target through its memory cgroup while the host is short,
and the host swaps its pages; a cooperating guest beside it is never capped; the cap
is lifted once the host recovers. And a cooperating guest the policy holds at its
limit by the host's paging (limit paging) is capped with its balloon deflated.

Thresholds:
- BUDGET: two 384 MiB guests each touch 250 MiB; their QEMUs hold about 350 MiB each,
  so a 400 MiB budget leaves the host LOW by its own count.
- STALL_S: how long a balloon may not move before the daemon calls it uncooperative.
- SWAPPED_BYTES: the policy splits the budget between the two, so the guest without a
  driver is given about 200 MiB of the 250 its workload touches plus its kernel; at
  least 32 MiB of its pages must end up in the host's swap.
- CAP_DEADLINE_S: boots aside, the stall takes STALL_S and each period lowers the cap
  by 64 MiB at most; 90 s of periods.
- LIFT_DEADLINE_S: once the other guest stops, the host is HIGH again within a period
  or two; 20 s.
- HELD_MIB: what limit paging's test holds a guest touching 250 MiB to, so that at
  least SWAPPED_BYTES of its pages go to the host's swap.
- QEMU_OWN_BYTES: the cap is the allocation plus what QEMU holds besides the guest's
  RAM, 27-35 MiB for a 384 MiB TCG guest here; the cap must be within 64 MiB above.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from balloonist.cgroup import CgroupVersion, MemoryCgroup
from balloonist.daemon.mechanisms import Mechanism
from balloonist.daemon.service import Daemon, DaemonConfig
from balloonist.qemu import launcher
from balloonist.qemu.assets import GuestAssets
from balloonist.swapfile import swap_file
from balloonist.units import MIB
from tests.fakes import HoldsAtLimit

from .conftest import boot, guest_status, stepper, stop_guests, wait_for_line

pytestmark = [pytest.mark.vm, pytest.mark.root(reason="memory cgroups and swapon need root")]

BUDGET = "400MiB"
STALL_S = 5.0
SWAPPED_BYTES = 32 * MIB
CAP_DEADLINE_S = 90.0
LIFT_DEADLINE_S = 20.0
SWAP_MIB = 512
WORK = "250@0"
HELD_MIB = 160
QEMU_OWN_BYTES = 64 * MIB


@pytest.fixture
def host_swap(tmp_path: Path, state: launcher.StateDir) -> Iterator[Path]:
    """A swap file for the host, on for the test only. The guests of ``state`` are
    stopped, and their RAM files dropped, before it goes: swapoff would have to read
    their pages in it back, and it once failed to (exit 2, out of memory, a CI run
    at stop 35, with the guest's cap already lifted)."""
    with swap_file(tmp_path, SWAP_MIB * MIB) as path:
        try:
            yield path
        finally:
            stop_guests(state)


def _cgroup(state: launcher.StateDir, name: str) -> MemoryCgroup:
    recorded = state.load(name).cgroup
    assert recorded is not None, f"{name} was not started in a cgroup of its own"
    path = Path(recorded)
    version = CgroupVersion.V2 if (path / "memory.high").exists() else CgroupVersion.V1
    return MemoryCgroup(path, version)


def test_a_guest_without_its_balloon_driver_is_paged_by_the_host_while_it_is_short(
    state: launcher.StateDir, guest_assets: GuestAssets, host_swap: Path
) -> None:
    boot(state, guest_assets, "stuck", memory_mib=384, work=WORK, balloon_driver=False)
    boot(state, guest_assets, "coop", memory_mib=384, work=WORK)
    for name in ("stuck", "coop"):
        wait_for_line(state.load(name), r"ws_mib=250 resident_mib=250", 60.0)
    stuck, coop = _cgroup(state, "stuck"), _cgroup(state, "coop")
    config = DaemonConfig.model_validate(
        {"daemon": {"budget": BUDGET, "stall_timeout_s": STALL_S}, "ksm": {"mode": "off"}}
    )
    daemon = Daemon(config, state)
    caps: list[int] = []
    try:
        deadline = time.monotonic() + CAP_DEADLINE_S
        while time.monotonic() < deadline and (stuck.swapped_bytes() or 0) < SWAPPED_BYTES:
            daemon.step()
            # The cooperating guest is never capped: by the status and by its cgroup.
            assert coop.limit_bytes() is None
            coop_host = guest_status(daemon, "coop").host
            assert coop_host is not None and coop_host.cap_bytes is None
            cap = stuck.limit_bytes()
            if cap is not None:
                caps.append(cap)
            daemon.idle(1.0)
        daemon.step()  # a status shows the cap and swap as the period before left them
        status = daemon.status()
        assert status is not None
        assert status.host.state in ("hard", "low"), status.host.state
        view = guest_status(daemon, "stuck")
        assert not view.cooperative
        swapped = stuck.swapped_bytes() or 0
        assert swapped >= SWAPPED_BYTES, (swapped, caps)
        # Its pages are in the host's swap file, and the status shows cap and swap.
        used_kib = int(Path("/proc/swaps").read_text().split(str(host_swap))[1].split()[2])
        assert used_kib * 1024 >= SWAPPED_BYTES
        assert view.host is not None and view.host.cap_bytes in caps
        assert view.host.swapped_bytes is not None and view.host.swapped_bytes >= SWAPPED_BYTES
        # Never below its minimum (0 here) plus QEMU's own memory.
        assert min(caps) > (view.host.overhead_bytes or 0)
        assert coop.swapped_bytes() == 0  # the other guest's memory is untouched
        # ...and the daemon puts what the host got back from it down to host paging.
        assert status.freed is not None and status.freed.total_bytes[Mechanism.HOST_PAGING] > 0
        # The host recovers once the other guest stops: the cap is lifted.
        launcher.stop_vm(state, "coop")
        assert not coop.path.exists()  # vm stop removes the cgroup it made
        deadline = time.monotonic() + LIFT_DEADLINE_S
        while time.monotonic() < deadline and stuck.limit_bytes() is not None:
            daemon.step()
            daemon.idle(1.0)
        assert stuck.limit_bytes() is None
        daemon.step()
        lifted = guest_status(daemon, "stuck").host
        assert lifted is not None and lifted.cap_bytes is None
    finally:
        daemon.close()


def test_a_cooperating_guest_held_at_its_limit_is_paged_by_the_host_with_its_balloon_deflated(
    state: launcher.StateDir, guest_assets: GuestAssets, host_swap: Path
) -> None:
    boot(state, guest_assets, "held", memory_mib=384, work=WORK)
    wait_for_line(state.load("held"), r"ws_mib=250 resident_mib=250", 60.0)
    held = _cgroup(state, "held")
    config = DaemonConfig.model_validate({"daemon": {"budget": "2GiB"}, "ksm": {"mode": "off"}})
    daemon = Daemon(config, state)
    policy = HoldsAtLimit(daemon.scheduler.policy, "held", HELD_MIB * MIB)
    daemon.scheduler.policy = policy

    def held_there() -> bool:
        """Capped at what the policy holds it to plus QEMU's own memory, and that much
        in the host's swap. QEMU's memory is measured again every period (it moved
        by 8 MiB between two runs here), so the cap is checked against a band."""
        cap = held.limit_bytes()
        swapped = held.swapped_bytes() or 0
        on_goal = cap is not None and HELD_MIB * MIB < cap <= HELD_MIB * MIB + QEMU_OWN_BYTES
        return on_goal and swapped >= SWAPPED_BYTES

    try:
        assert stepper(daemon)(held_there, CAP_DEADLINE_S), held.limit_bytes()
        view = guest_status(daemon, "held")
        # The host may page it: a cgroup of its own and a host with swap.
        assert policy.seen[-1].guests[0].sample.host_cappable
        assert view.cooperative
        assert view.host is not None and view.host.cap_bytes is not None
        # Its balloon, deflated, leaves the guest all its memory: the host pages it.
        assert view.balloon_bytes == 0 and view.allocated_bytes == 384 * MIB
        policy.holding = False
        daemon.step()
        assert held.limit_bytes() is None  # lifted at once
    finally:
        daemon.close()
