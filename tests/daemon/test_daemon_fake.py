"""The daemon over fake VM ports: failures are contained, targets are safe, restarts are
gentle, config errors are one line. No QEMU."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest

from balloonist.daemon.counters import FailureCounter
from balloonist.daemon.pacing import HOST_RATE_LIMITS
from balloonist.daemon.service import Daemon, load_config
from balloonist.daemon.vm_figures import (
    available_fall_bytes,
    observed_demand_bytes,
    use_growth_bytes_per_s,
)
from balloonist.daemon.vm_life import VmLife
from balloonist.errors import ConfigError, TransientBackendError
from balloonist.host import HostMemInfo, parse_meminfo
from balloonist.model import HostHeld
from balloonist.policy.demand import DEFAULT_MARGIN_FRACTION
from balloonist.qemu.qmp import GuestStats
from balloonist.units import GIB, MIB, PAGE_SIZE_BYTES
from tests.daemon.fakes import HOST, FakeMemoryHost, FakeVm, make


def test_memory_moves_to_the_guest_that_uses_it_and_targets_stay_in_bounds(
    tmp_path: Path,
) -> None:
    vms = {
        "busy": FakeVm(2 * GIB, 2 * GIB, used=1800 * MIB),
        "idle": FakeVm(2 * GIB, 2 * GIB, used=100 * MIB),
    }
    daemon = make(tmp_path, vms)
    for _ in range(60):
        daemon.step()
    assert vms["busy"].actual > vms["idle"].actual + 512 * MIB
    assert vms["busy"].actual + vms["idle"].actual <= 3 * GIB + 64 * MIB
    for vm in vms.values():
        assert all(256 * MIB <= t <= 2 * GIB for t in vm.targets)


def test_the_status_shows_what_the_host_counts_each_guest_holds(tmp_path: Path) -> None:
    vms = {"web": FakeVm(2 * GIB, 2 * GIB), "db": FakeVm(GIB, GIB)}
    counted = HostHeld(held_bytes=700 * MIB, guest_ram_bytes=600 * MIB)
    memory_host = FakeMemoryHost({1000: counted})  # web's QEMU; db's cannot be read
    daemon = make(tmp_path, vms, memory_host=memory_host)
    daemon.step()
    status = daemon.status()
    assert status is not None
    web, db = status.guest("web"), status.guest("db")
    assert web is not None and web.host == counted and web.host.overhead_bytes == 100 * MIB
    assert db is not None and db.host is None
    assert (1000, 2 * GIB, None) in memory_host.asked


def test_the_host_state_is_by_the_host_s_own_count_where_there_is_one(tmp_path: Path) -> None:
    # The balloons leave nothing free of the 3 GiB budget; the host counts 1 GiB held.
    counted = FakeMemoryHost({1000: HostHeld(600 * MIB), 1001: HostHeld(400 * MIB)})
    states = {}
    for name, memory_host in (("counted", counted), ("balloons", None)):
        vms = {"web": FakeVm(2 * GIB, 2 * GIB), "db": FakeVm(GIB, GIB)}
        daemon = make(tmp_path / name, vms, budget="3GiB", memory_host=memory_host)
        daemon.step()
        status = daemon.status()
        assert status is not None
        states[name] = status.host.state
    assert states == {"counted": "high", "balloons": "low"}


def test_a_restart_starts_from_where_the_guests_are(tmp_path: Path) -> None:
    # Over budget at start: the policy wants memory back, but a (re)started daemon may
    # only take one paced step from where each guest is, never jump to the target.
    vms = {"a": FakeVm(2 * GIB, 1200 * MIB), "b": FakeVm(2 * GIB, 900 * MIB)}
    before = {name: vm.actual for name, vm in vms.items()}
    daemon = make(tmp_path, vms, budget="1GiB")
    daemon.step()
    first_step = HOST_RATE_LIMITS.min_units * PAGE_SIZE_BYTES
    assert any(vm.targets for vm in vms.values())  # it did act
    for name, vm in vms.items():
        if vm.targets:
            assert before[name] - first_step <= vm.targets[0] <= before[name]


def test_a_host_short_of_memory_of_its_own_makes_the_guests_give_some_back(
    tmp_path: Path,
) -> None:
    # Within budget (2 of 4 GiB held) but the host has less available than the policy's
    # margin: the VMs share 2 GiB and a little, less than they hold with the margin free.
    held = 2 * GIB
    short = HostMemInfo(8 * GIB, int(held * DEFAULT_MARGIN_FRACTION) // 2, 0, 0)
    for host, reclaims in ((HOST, False), (short, True)):
        vms = {name: FakeVm(held // 2, held // 2, used=100 * MIB) for name in ("a", "b")}
        daemon = make(tmp_path / str(reclaims), vms, budget="4GiB", host=host)
        for _ in range(10):
            daemon.step()
        shrunk = any(vm.actual < held // 2 for vm in vms.values())
        assert shrunk == reclaims


def test_transient_failure_reconnects_and_fatal_leaves_the_others_managed(
    tmp_path: Path,
) -> None:
    vms = {
        "flaky": FakeVm(2 * GIB, 2 * GIB, fail_next=2),
        "broken": FakeVm(2 * GIB, 2 * GIB, fatal=True),
        "fine": FakeVm(2 * GIB, 2 * GIB),
    }
    daemon = make(tmp_path, vms, budget="4GiB")

    def lives() -> dict[str, VmLife]:
        return {name: view.life for name in vms if (view := daemon.hv.view(name)) is not None}

    assert set(lives().values()) == {VmLife.NEW}
    daemon.step()
    assert lives() == {
        "flaky": VmLife.RECONNECTING,
        "broken": VmLife.BROKEN,
        "fine": VmLife.SAMPLED,
    }
    for _ in range(9):
        daemon.step()
    assert vms["flaky"].connects == 3 and vms["flaky"].targets  # reconnected, then managed
    assert not vms["broken"].targets
    assert vms["fine"].targets
    assert lives() == {"flaky": VmLife.SAMPLED, "broken": VmLife.BROKEN, "fine": VmLife.SAMPLED}


def test_a_vm_removed_from_the_state_dir_is_dropped(tmp_path: Path) -> None:
    vms = {"a": FakeVm(2 * GIB, 2 * GIB), "b": FakeVm(2 * GIB, 2 * GIB)}
    daemon = make(tmp_path, vms)
    daemon.step()
    daemon.state.remove("a")
    daemon.step()
    assert daemon.hv.managed() == ["b"]


def test_demand_counts_used_memory_and_pages_read_back() -> None:
    stats = GuestStats(1, total_bytes=2 * GIB, available_bytes=1 * GIB)
    # deflate-on-oom: total stays 2 GiB, the guest has 1.5 GiB; 0.5 GiB in use + 10 pages
    assert observed_demand_bytes(1536 * MIB, 2 * GIB, stats, new_faults=10) == 512 * MIB + 40960
    # 24 MiB short of its available floor: that much more
    short = observed_demand_bytes(1536 * MIB, 2 * GIB, stats, 0, short_bytes=24 * MIB)
    assert short == 536 * MIB
    assert observed_demand_bytes(1536 * MIB, 2 * GIB, GuestStats(1), 0) is None


def _report(update_s: int, available_mib: int) -> GuestStats:
    """A 1 GiB guest's statistics, made at ``update_s``, with ``available_mib`` available."""
    return GuestStats(update_s, total_bytes=GIB, available_bytes=available_mib * MIB)


def test_the_fall_of_available_memory_is_what_the_guest_used_not_what_its_balloon_took() -> None:
    before = _report(10, 300)
    # a burst used 200 MiB while its balloon took nothing
    assert available_fall_bytes(before, 512 * MIB, _report(11, 100), 512 * MIB) == 200 * MIB
    # 50 of a 120 MiB fall were its balloon's inflation
    assert available_fall_bytes(before, 512 * MIB, _report(11, 180), 462 * MIB) == 70 * MIB
    # available rose (its balloon deflated, or it freed memory): no fall
    assert available_fall_bytes(before, 512 * MIB, _report(11, 400), 612 * MIB) == 0
    # the same report again says nothing new, however the balloon moved
    assert available_fall_bytes(before, 512 * MIB, _report(10, 300), 300 * MIB) == 0
    assert available_fall_bytes(None, 0, _report(11, 100), 512 * MIB) == 0
    assert available_fall_bytes(before, 512 * MIB, GuestStats(11), 512 * MIB) is None


def test_growth_in_use_is_measured_between_reports_net_of_the_balloon() -> None:
    report = _report(10, 300)
    # 200 MiB used over the 2 s between the reports
    assert use_growth_bytes_per_s(report, 512 * MIB, _report(12, 100), 512 * MIB) == 100 * MIB
    # 60 of an 80 MiB fall were its balloon's inflation: 20 MiB over 1 s
    assert use_growth_bytes_per_s(report, 512 * MIB, _report(11, 220), 452 * MIB) == 20 * MIB
    # Deflated by 200 MiB after the report was made: the new report may not show the
    # memory given yet, but a size that grew is never read as the guest's use.
    assert use_growth_bytes_per_s(report, 512 * MIB, _report(11, 300), 712 * MIB) == 0.0
    assert use_growth_bytes_per_s(None, 0, _report(11, 100), 512 * MIB) == 0.0


def test_meminfo_is_parsed_in_bytes() -> None:
    info = parse_meminfo("MemTotal: 1024 kB\nMemAvailable: 512 kB\nSwapTotal: 0 kB\n")
    assert (info.total_bytes, info.available_bytes) == (1024 * 1024, 512 * 1024)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[daemon]\nbudget = "800"\n', "daemon.budget"),
        ("[daemon]\nperiodd = 1\n", "daemon.periodd"),
        ('[policy]\nname = "oracle"\n', "policy.name"),
        ("[vms.web]\nmin = 5\n", "vms.web.min"),
        ('[daemon]\nprocessors = "1-x"\n', "daemon.processors"),
        ('[daemon]\nprocessors = "3-1"\n', "daemon.processors"),
        ("[vms.web]\nmin_cpus = 0\n", "vms.web.min_cpus"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "host.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert where in str(err.value) and "host.toml" in str(err.value)


def test_host_toml_reads_the_former_cpu_names(tmp_path: Path) -> None:
    path = tmp_path / "host.toml"
    path.write_text("[vms.web]\ncpu_min = 2\ncpu_max = 3\n")
    table = load_config(path).vms["web"]
    assert (table.min_cpus, table.max_cpus) == (2, 3)


def test_the_status_shows_the_host_side_pacing_rate_per_second(tmp_path: Path) -> None:
    # A guest whose balloon moves 8 MiB per read misses its paced steps: the rate falls
    # to its floor; one that follows at once gets every step and the rate grows.
    vms = {"slow": FakeVm(2 * GIB, 2 * GIB, speed=8 * MIB), "quick": FakeVm(2 * GIB, 2 * GIB)}
    daemon = make(tmp_path, vms, budget="2GiB", period_s=0.5)
    for _ in range(8):
        daemon.step()
    status = daemon.status()
    assert status is not None
    rates = {g.name: g.inflate_rate_bytes_per_s for g in status.guests}
    floor_per_s = HOST_RATE_LIMITS.min_units * PAGE_SIZE_BYTES / 0.5
    assert rates["slow"] == floor_per_s
    assert rates["quick"] is not None and rates["quick"] > floor_per_s


#: Turns of the event loop a slow port's close takes: more than one period runs it for.
CLOSE_TURNS = 20


@dataclass
class SlowClosingVm(FakeVm):
    """A port whose close takes a few turns of the event loop, as a real one does, and
    whose requests fail while it is closed."""

    open: bool = False

    async def connect(self) -> None:
        await asyncio.sleep(0)
        await super().connect()
        self.open = True

    async def close(self) -> None:
        for _ in range(CLOSE_TURNS):
            await asyncio.sleep(0)
        self.open = False

    async def actual_bytes(self) -> int:
        if not self.open:
            raise TransientBackendError("fake: connection lost")
        return await super().actual_bytes()


def test_a_close_still_under_way_never_closes_the_next_connection(tmp_path: Path) -> None:
    # The first connect fails; its port's close starts and is still under way when the
    # next period connects again (no idle time between the periods).
    vm = SlowClosingVm(2 * GIB, 2 * GIB, fail_next=1)
    daemon = make(tmp_path, {"a": vm}, budget="4GiB")
    for _ in range(6):
        daemon.step()
    view = daemon.hv.view("a")
    assert view is not None and view.life is VmLife.SAMPLED
    assert vm.connects == 2  # one failure, then one connection that stays up
    status = daemon.status()
    assert status is not None and status.counters[FailureCounter.TRANSIENT_ERRORS] == 1


def _settled(tmp_path: Path) -> tuple[Daemon, FakeVm, int]:
    """A daemon whose guest ``a`` has had the same target for five periods: the host
    has room for both guests whole, so the policy leaves them their memory."""
    vms = {"a": FakeVm(2 * GIB, 2 * GIB, used=1500 * MIB), "b": FakeVm(2 * GIB, 2 * GIB)}
    daemon = make(tmp_path, vms, budget="5GiB")
    a, quiet = vms["a"], 0
    for _ in range(200):
        sent = len(a.targets)
        daemon.step()
        quiet = quiet + 1 if len(a.targets) == sent else 0
        if quiet == 5:
            break
    assert quiet == 5 and a.target is not None, a.targets
    return daemon, a, a.target


def test_a_balloon_inflated_behind_the_daemon_s_back_is_given_back_its_target(
    tmp_path: Path,
) -> None:
    daemon, a, target = _settled(tmp_path)
    sent = len(a.targets)
    a.target = target - 512 * MIB  # someone else inflates it (virsh setmem)
    daemon.step()  # the fake reaches that size as the daemon reads it
    assert a.targets[sent:] == [target]  # the policy still wants it whole: sent again
    daemon.step()
    assert a.actual == target
