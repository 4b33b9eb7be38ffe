"""Host-level reclaim over fakes: in HARD and LOW, a VM whose balloon does not work is
capped through its cgroup, a step a period, never below its minimum, never a
cooperating VM unless the policy holds it to its limit, and the cap is lifted once the
host recovers. No cgroups touched."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from balloonist.cgroup import CgroupVersion, MemoryCgroup, MemoryHierarchy
from balloonist.daemon.counters import FailureCounter
from balloonist.daemon.host_reclaim import (
    DEFAULT_STEP_BYTES,
    SWAP_HEADROOM,
    SysCgroups,
    next_cap_bytes,
)
from balloonist.daemon.service import Daemon
from balloonist.host import HostMemInfo
from balloonist.model import HostHeld
from balloonist.units import GIB, MIB
from tests.daemon.fakes import FakeCgroup, FakeCgroups, FakeMemoryHost, FakeVm, make, record
from tests.fakes import HoldsAtLimit
from tests.test_cgroup import fake_proc

#: A host with swap for the VMs' pages to go to.
SWAPPY = HostMemInfo(8 * GIB, 6 * GIB, 4 * GIB, 4 * GIB)
OVERHEAD = 100 * MIB
MIN = 256 * MIB
STALL_S = 3.0


def _host(
    tmp_path: Path, *, stuck_speed: int = 0, cgroups: FakeCgroups | None = None
) -> tuple[Daemon, dict[str, FakeVm], FakeCgroups]:
    """Two 2 GiB guests that each use 1.8 GiB on a 3 GiB budget (the host is LOW):
    ``busy`` balloons; ``stuck``'s balloon never moves."""
    vms = {
        "busy": FakeVm(2 * GIB, 2 * GIB, used=1800 * MIB),
        "stuck": FakeVm(2 * GIB, 2 * GIB, used=1800 * MIB, speed=stuck_speed),
    }
    groups = cgroups or FakeCgroups(
        {
            "busy": FakeCgroup("busy", usage=2 * GIB + OVERHEAD),
            "stuck": FakeCgroup("stuck", usage=2 * GIB + OVERHEAD),
        }
    )
    memory_host = FakeMemoryHost(
        {pid: HostHeld(2 * GIB + OVERHEAD, guest_ram_bytes=2 * GIB) for pid in (1000, 1001)}
    )
    daemon = make(
        tmp_path,
        vms,
        host=SWAPPY,
        memory_host=memory_host,
        cgroups=groups,
        daemon_table={"stall_timeout_s": STALL_S},
    )
    return daemon, vms, groups


def test_a_vm_whose_balloon_does_not_move_is_paged_by_the_host_in_steps(tmp_path: Path) -> None:
    daemon, _, groups = _host(tmp_path)
    stuck, busy = groups.by_name["stuck"], groups.by_name["busy"]
    for _ in range(40):
        daemon.step()
    status = daemon.status()
    assert status is not None and status.host.state in ("hard", "low")
    view = status.guest("stuck")
    assert view is not None and not view.cooperative
    # Capped, a step at a time, never below its minimum and QEMU's own memory.
    caps = [c for c in stuck.caps if c is not None]
    assert caps and stuck.cap is not None and stuck.swapped > 0
    steps = [a - b for a, b in zip([2 * GIB + OVERHEAD, *caps], caps, strict=False)]
    assert max(steps) <= DEFAULT_STEP_BYTES
    assert min(caps) >= MIN + OVERHEAD
    assert stuck.cap < 2 * GIB  # it went below what its balloon holds: the policy gave it less
    # Shown: the cap and the swap, next to what the host counts.
    assert view.host is not None
    assert (view.host.cap_bytes, view.host.swapped_bytes) == (stuck.cap, stuck.swapped)
    # The cooperating guest is never capped.
    assert busy.caps == []


def test_a_cooperating_vm_is_never_capped(tmp_path: Path) -> None:
    daemon, _, groups = _host(tmp_path, stuck_speed=1 << 40)
    for _ in range(40):
        daemon.step()
    assert all(g.caps == [] for g in groups.by_name.values())


def test_the_cap_is_lifted_once_the_host_recovers(tmp_path: Path) -> None:
    daemon, _, groups = _host(tmp_path)
    stuck = groups.by_name["stuck"]
    for _ in range(40):
        daemon.step()
    assert stuck.cap is not None
    daemon.state.remove("busy")  # the other VM goes: 2 GiB of a 3 GiB budget is held
    for _ in range(5):
        daemon.step()
    status = daemon.status()
    assert status is not None and status.host.state in ("high", "soft")
    assert stuck.cap is None and stuck.caps[-1] is None


def test_a_vm_without_a_cgroup_of_its_own_is_left_alone(tmp_path: Path) -> None:
    busy = FakeCgroup("busy", usage=2 * GIB + OVERHEAD)
    daemon, _, _ = _host(tmp_path, cgroups=FakeCgroups({"busy": busy}))
    for _ in range(40):
        daemon.step()
    status = daemon.status()
    assert status is not None
    view = status.guest("stuck")
    assert view is not None and view.host is not None and view.host.cap_bytes is None
    assert busy.caps == []


def test_a_cap_the_kernel_refuses_is_counted_and_tried_again(tmp_path: Path) -> None:
    daemon, _, groups = _host(tmp_path)
    stuck = groups.by_name["stuck"]
    stuck.refuse = True
    for _ in range(40):
        daemon.step()
    status = daemon.status()
    assert status is not None
    errors = status.counters[FailureCounter.HOST_PAGING_ERRORS]
    assert errors >= 2  # once a period while it refuses
    stuck.refuse = False
    daemon.step()
    assert stuck.cap is not None


def test_host_paging_off_never_caps(tmp_path: Path) -> None:
    groups = FakeCgroups({"stuck": FakeCgroup("stuck", usage=2 * GIB + OVERHEAD)})
    vms = {
        "busy": FakeVm(2 * GIB, 2 * GIB, used=1800 * MIB),
        "stuck": FakeVm(2 * GIB, 2 * GIB, used=1800 * MIB, speed=0),
    }
    daemon = make(
        tmp_path,
        vms,
        host=SWAPPY,
        cgroups=groups,
        daemon_table={"stall_timeout_s": STALL_S, "host_paging": False},
    )
    for _ in range(40):
        daemon.step()
    assert groups.by_name["stuck"].caps == []


@given(
    goal=st.integers(0, 8 * GIB),
    usage=st.integers(0, 8 * GIB),
    step=st.integers(1, GIB),
    swap_free=st.integers(0, 8 * GIB),
)
def test_a_cap_falls_by_a_step_at_most_into_the_swap_there_is(
    goal: int, usage: int, step: int, swap_free: int
) -> None:
    cap = next_cap_bytes(goal, usage, step_bytes=step, swap_free_bytes=swap_free)
    assert cap >= goal
    assert usage - cap <= step
    assert usage - cap <= swap_free * SWAP_HEADROOM
    if goal < usage and swap_free * SWAP_HEADROOM >= step:
        assert cap == max(goal, usage - step)  # as far as it may go


def test_the_real_host_finds_a_vm_s_own_cgroup_and_never_a_shared_one(tmp_path: Path) -> None:
    mount = tmp_path / "memory"
    hierarchy = MemoryHierarchy(mount, CgroupVersion.V1)
    domain = mount / "machine" / "qemu-1-web"
    domain.mkdir(parents=True)
    proc = fake_proc(tmp_path, 4242, "4:memory:/machine/qemu-1-web\n")
    host = SysCgroups(hierarchy, proc)
    adopted = replace(record("web"), pid=4242)
    (domain / "cgroup.procs").write_text("4242\n")
    found = host.cgroup(adopted)
    assert isinstance(found, MemoryCgroup) and found.path == domain
    (domain / "cgroup.procs").write_text("4242\n99\n")  # shared with another process
    assert host.cgroup(adopted) is None
    assert host.cgroup(replace(adopted, pid=None)) is None  # no process known
    # A VM balloonist started uses the cgroup it recorded.
    started = replace(record("db"), pid=7, cgroup=str(mount / "balloonist" / "db"))
    assert host.cgroup(started) == MemoryCgroup(mount / "balloonist" / "db", CgroupVersion.V1)


def test_a_cap_someone_else_set_is_never_raised_and_is_put_back(tmp_path: Path) -> None:
    # A libvirt domain with a memtune hard limit: its cgroup has a cap when found.
    found = 2 * GIB
    groups = FakeCgroups({"stuck": FakeCgroup("stuck", usage=2 * GIB, cap=found)})
    daemon, _, _ = _host(tmp_path, cgroups=groups)
    stuck = groups.by_name["stuck"]
    for _ in range(40):
        daemon.step()
    assert stuck.cap is not None and stuck.cap < found
    assert all(c is not None and c <= found for c in stuck.caps)
    daemon.state.remove("busy")  # the host recovers
    for _ in range(5):
        daemon.step()
    assert stuck.cap == found  # put back, not lifted to nothing
    status = daemon.status()
    assert status is not None
    view = status.guest("stuck")
    assert view is not None and view.host is not None and view.host.cap_bytes is None


def test_a_cap_left_in_a_cgroup_of_ours_by_a_killed_daemon_is_lifted(tmp_path: Path) -> None:
    left = 700 * MIB
    groups = FakeCgroups({"stuck": FakeCgroup("stuck", usage=left, cap=left)})
    vms = {"stuck": FakeVm(2 * GIB, 2 * GIB, used=500 * MIB)}
    daemon = make(tmp_path, vms, host=SWAPPY, cgroups=groups, budget="6GiB", cgroup_of_ours=True)
    daemon.step()
    assert groups.by_name["stuck"].cap is None


# -- limit paging: a cooperating VM the policy holds to its limit ---------------------------

#: What the policy holds ``busy`` to: below the 2.1 GiB its cgroup holds, above its minimum.
CAPPED_AT = 1 * GIB


def _capping(daemon: Daemon) -> HoldsAtLimit:
    policy = HoldsAtLimit(daemon.scheduler.policy, "busy", CAPPED_AT)
    daemon.scheduler.policy = policy
    return policy


def test_a_cooperating_vm_held_to_its_limit_is_paged_by_the_host_with_its_balloon_deflated(
    tmp_path: Path,
) -> None:
    daemon, vms, groups = _host(tmp_path, stuck_speed=1 << 40)  # both balloons work
    busy = groups.by_name["busy"]
    policy = _capping(daemon)
    for _ in range(40):
        daemon.step()
    # Capped a step a period down to its allocation plus QEMU's own memory, and no
    # further; the other VM is not.
    caps = [c for c in busy.caps if c is not None]
    assert caps == busy.caps and caps
    steps = [a - b for a, b in zip([2 * GIB + OVERHEAD, *caps], caps, strict=False)]
    assert max(steps) <= DEFAULT_STEP_BYTES
    assert busy.cap == CAPPED_AT + OVERHEAD and busy.swapped > 0
    assert groups.by_name["stuck"].caps == []
    # Its balloon register asks for all its memory: the host, not the balloon, holds it.
    assert vms["busy"].target == 2 * GIB
    # Both could be capped: each has a cgroup of its own, and the host has swap.
    last = policy.seen[-1]
    assert all(v.sample.host_cappable for v in last.guests)
    policy.holding = False
    daemon.step()
    assert busy.cap is None  # lifted at once


def test_only_a_vm_with_a_cgroup_of_its_own_on_a_host_with_swap_can_be_capped(
    tmp_path: Path,
) -> None:
    busy = FakeCgroup("busy", usage=2 * GIB + OVERHEAD)
    daemon, _, _ = _host(tmp_path, cgroups=FakeCgroups({"busy": busy}))
    policy = _capping(daemon)
    for _ in range(3):
        daemon.step()
    cappable = {v.name: v.sample.host_cappable for v in policy.seen[-1].guests}
    assert cappable == {"busy": True, "stuck": False}
    no_swap = make(
        tmp_path / "no-swap",
        {"busy": FakeVm(2 * GIB, 2 * GIB, used=1800 * MIB)},
        host=HostMemInfo(8 * GIB, 6 * GIB, 0, 0),
        memory_host=FakeMemoryHost({1000: HostHeld(2 * GIB + OVERHEAD, guest_ram_bytes=2 * GIB)}),
        cgroups=FakeCgroups({"busy": FakeCgroup("busy", usage=2 * GIB + OVERHEAD)}),
    )
    policy = _capping(no_swap)
    for _ in range(3):
        no_swap.step()
    assert not policy.seen[-1].guests[0].sample.host_cappable
