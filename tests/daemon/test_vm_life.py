"""A managed VM's life moves only along the arrows drawn in ``daemon/vm_life.py``."""

from __future__ import annotations

import pytest

from balloonist.daemon.pacing import AvailableNow, Bounds
from balloonist.daemon.vm_life import ManagedVm, VmFailures, VmLife
from balloonist.errors import StateError
from balloonist.qemu.qmp import GuestStats
from tests.daemon.fakes import record

L = VmLife


def vm_at(*path: VmLife) -> ManagedVm:
    vm = ManagedVm(record("g"))
    for life in path:
        vm.move_to(life)
    return vm


@pytest.mark.parametrize(
    "path",
    [
        (L.CONNECTED, L.SAMPLED, L.CONNECTED, L.SAMPLED),  # period after period
        (L.RECONNECTING, L.RECONNECTING, L.CONNECTED),  # the socket comes back
        (L.CONNECTED, L.SAMPLED, L.RECONNECTING, L.CONNECTED),  # a send failed
        (L.CONNECTED, L.BROKEN, L.GONE),  # no balloon device, then removed
        (L.GONE,),  # removed before it was asked
    ],
)
def test_the_allowed_moves(path: tuple[VmLife, ...]) -> None:
    assert vm_at(*path).life is path[-1]


@pytest.mark.parametrize(
    ("path", "to"),
    [
        ((), L.SAMPLED),  # figures from a VM never connected
        ((L.RECONNECTING,), L.SAMPLED),  # figures without reconnecting first
        ((L.CONNECTED, L.BROKEN), L.CONNECTED),  # a broken VM is left alone
        ((L.GONE,), L.CONNECTED),  # nothing comes back from GONE
        ((L.GONE,), L.BROKEN),
    ],
)
def test_any_other_move_is_a_bug_and_says_which(path: tuple[VmLife, ...], to: VmLife) -> None:
    vm = vm_at(*path)
    before = vm.life
    with pytest.raises(StateError) as caught:
        vm.move_to(to)
    assert (caught.value.state, caught.value.to) == (before, to)
    assert vm.life is before  # a refused move changes nothing


def test_only_a_vm_sampled_this_period_counts_as_sampled_and_connected() -> None:
    assert [(vm.sampled, vm.connected) for vm in (vm_at(), vm_at(L.CONNECTED))] == [
        (False, False),
        (False, True),
    ]
    assert (vm_at(L.CONNECTED, L.SAMPLED).sampled, vm_at(L.RECONNECTING).connected) == (
        True,
        False,
    )


def test_failures_add_up_field_by_field() -> None:
    total = VmFailures(1, 2, 3, 4) + VmFailures(10, 20, 30, 40)
    assert total == VmFailures(11, 22, 33, 44)
    assert total.as_counters() == {
        "backend_errors_transient": 11,
        "backend_errors_fatal": 22,
        "stalls": 33,
        "agent_rejected": 44,
    }


def test_growth_is_measured_between_fresh_reports_and_kept_while_none_comes() -> None:
    mib = 1 << 20
    vm = ManagedVm(record("g"))
    bounds = Bounds(min_bytes=0, max_bytes=1 << 30)

    def observe(update_s: int, available_mib: int, actual_mib: int) -> float | None:
        stats = GuestStats(update_s, total_bytes=1 << 30, available_bytes=available_mib * mib)
        vm.observe(actual_mib * mib, stats, bounds, stall_timeout_s=10.0)
        return vm.fresh_sample(1.0, None).use_growth_bytes_per_s

    assert observe(10, 500, 800) == 0.0  # its first report: nothing known yet
    assert observe(11, 400, 800) == 100 * mib  # it used 100 MiB in 1 s
    # Its balloon deflates by 200 MiB; the statistics are a period behind, so the
    # same report comes again. The rate measured stays: no report says otherwise,
    # and the memory given is not read as use (it was, before the guest's reports
    # decided growth: QEMU's size is fresh, its free figure a period stale).
    assert observe(11, 400, 1000) == 100 * mib
    assert observe(12, 600, 1000) == 0.0  # the report shows the memory given, unused
    stats = GuestStats(13, total_bytes=1 << 30)  # no available figure: not reported
    vm.observe(1000 * mib, stats, bounds, stall_timeout_s=10.0)
    assert vm.fresh_sample(1.0, None).use_growth_bytes_per_s is None


def test_a_report_older_than_the_balloons_step_is_read_against_the_size_it_was_made_at() -> None:
    mib = 1 << 20
    vm = ManagedVm(record("g"))
    bounds = Bounds(min_bytes=0, max_bytes=1 << 30, available_floor_bytes=64 * mib)

    def observe(update_s: int, available_mib: int, actual_mib: int) -> None:
        stats = GuestStats(update_s, total_bytes=1 << 30, available_bytes=available_mib * mib)
        vm.observe(actual_mib * mib, stats, bounds, stall_timeout_s=10.0)

    observe(10, 163, 448)  # 285 MiB in use
    assert vm.observed_bytes == 285 * mib
    # Its balloon took 90 MiB; the guest has not reported since. Read against the new
    # size, the old report would say 195 MiB in use and 99 MiB to spare above the floor.
    observe(10, 163, 358)
    assert vm.available is not None and vm.available.high_bytes == 73 * mib
    assert vm.observed_bytes == 285 * mib
    assert vm.next_target_bytes(291 * mib, now_s=1.0) == 349 * mib  # 64 MiB left it
    vm.sent(349 * mib)
    # A new report, made some time since the reading of 358 MiB: it may predate the
    # step to 349, so the guest may have only 61 MiB. It is held, and not given any.
    observe(11, 70, 349)
    assert vm.available == AvailableNow(low_bytes=61 * mib, high_bytes=70 * mib)
    # its use is read at the larger size it had: 358 - 70 (at 349 it would be 279)
    assert vm.observed_bytes == 288 * mib
    assert vm.next_target_bytes(291 * mib, now_s=2.0) is None  # 349 again: not resent
    assert vm.fresh_sample(1.0, None).available_short_bytes == 0


def test_a_reports_free_memory_is_read_less_what_the_balloon_may_have_taken_since() -> None:
    # The policy reads a guest's use as its size now less its free memory, so the free
    # figure of a report older than an inflation must not count the pages it took.
    mib = 1 << 20
    vm = ManagedVm(record("g"))
    bounds = Bounds(min_bytes=0, max_bytes=1 << 30)

    def free_mib(update_s: int, reported_mib: int, actual_mib: int) -> float | None:
        stats = GuestStats(
            update_s,
            total_bytes=1 << 30,
            free_bytes=reported_mib * mib,
            available_bytes=(reported_mib + 20) * mib,
        )
        vm.observe(actual_mib * mib, stats, bounds, stall_timeout_s=10.0)
        free = vm.fresh_sample(1.0, None).free_bytes
        return None if free is None else free / mib

    assert free_mib(10, 300, 500) == 300  # 200 MiB in use
    assert free_mib(10, 300, 400) == 200  # inflated by 100 since: still 200 in use
    # A new report, made after the reading of 400 or after the one of 350 now: the
    # least it may have free is its figure less the 50 MiB taken since the first.
    assert free_mib(11, 160, 350) == 110  # its use read at 240 MiB: 400 - 160, the most
    assert free_mib(11, 160, 450) == 210  # deflated since: the 100 given is free
    # A guest that reports no available figure: its free figure as read.
    stats = GuestStats(12, total_bytes=1 << 30, free_bytes=70 * mib)
    vm.observe(450 * mib, stats, bounds, stall_timeout_s=10.0)
    assert vm.fresh_sample(1.0, None).free_bytes == 70 * mib
