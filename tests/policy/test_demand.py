"""The demand policy: demand met, shares deciding contention, the host partitioned by
balloons, and its invariants on random hosts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balloonist.model import (
    Decision,
    GuestView,
    HostHeld,
    HostState,
    HostTruth,
    MemoryPressure,
    Snapshot,
)
from balloonist.policy.demand import (
    STALL_THRESHOLD,
    DemandPolicy,
    _Guests,
    defer_squeezes,
    demand_bytes,
    interval_stall_fraction,
    lead_bytes,
    registers_bytes,
    stall_fraction,
    water_fill,
)
from balloonist.policy.growth import UseGrowth
from balloonist.units import MIB, PAGE_SIZE_BYTES

from .snapshots import allocations_mib, balloons_mib, guest, snapshot


class _Fresh:
    """A new policy for every decision: the policy keeps state across periods (load
    control), and these tests each judge one period on its own."""

    def decide(self, snap: Snapshot) -> Decision:
        return DemandPolicy(margin_fraction=0.0).decide(snap)  # the whole host: round numbers


POLICY = _Fresh()


def stalled(view: GuestView, fraction: float = 0.5) -> GuestView:
    return dataclasses.replace(view, pressure=MemoryPressure(1000.0, fraction))


def calm(view: GuestView) -> GuestView:
    return dataclasses.replace(view, pressure=MemoryPressure(0.0, 0.0))


def test_demand_that_fits_is_met_and_the_rest_left_where_it_is_held() -> None:
    a = calm(guest("a", memory_mib=600, working_set_mib=300, register_mib=100))
    b = calm(guest("b", memory_mib=600, working_set_mib=200, register_mib=300))
    d = POLICY.decide(snapshot(a, b, host_mib=1000, free_mib=200))
    alloc = allocations_mib(d)
    assert alloc[0] >= 300 * 1.1 and alloc[1] >= 200 * 1.1  # working set and headroom
    # Nobody needs what they hold beyond it: a keeps its 500, b its 300.
    assert alloc == [500, 300 + 200]  # what is left over goes by shares, up to max


def test_a_stalled_guest_takes_what_an_idle_guest_no_longer_uses() -> None:
    busy = stalled(guest("busy", memory_mib=1000, working_set_mib=500, register_mib=500))
    idle = calm(guest("idle", memory_mib=1000, working_set_mib=0, register_mib=500))
    d = POLICY.decide(snapshot(busy, idle, host_mib=1000, free_mib=0))
    alloc = allocations_mib(d)
    assert alloc[1] <= 10  # only the contended headroom is left to the idle guest
    assert alloc[0] == 1000 - alloc[1]
    # Its balloon inflates at once; busy's deflates only into memory free now (none).
    assert balloons_mib(d) == [500, 1000 - alloc[1]]


def test_shares_decide_when_every_guest_needs_more() -> None:
    big = stalled(guest("big", memory_mib=1000, shares=3000, register_mib=500))
    small = stalled(guest("small", memory_mib=1000, shares=1000, register_mib=500))
    d = POLICY.decide(snapshot(big, small, host_mib=1000))
    assert allocations_mib(d) == [750, 250]


def test_a_growing_guest_deflates_only_into_free_memory() -> None:
    grows = stalled(guest("grows", memory_mib=1000, working_set_mib=300, register_mib=700))
    idle = calm(guest("idle", memory_mib=1000, register_mib=300))
    d = POLICY.decide(snapshot(grows, idle, host_mib=1000, free_mib=100))
    # It may reach 1000 - 10 (idle's headroom), but only 100 MiB are free now.
    assert balloons_mib(d)[0] == 700 - 100


def test_memory_the_host_counts_free_is_free_to_deflate_into() -> None:
    # The balloons leave 100 MiB free, but the host counts 400 MiB free: the idle
    # guest gave pages back (free page reporting) without a balloon move.
    grows = stalled(guest("grows", memory_mib=1000, working_set_mib=300, register_mib=700))
    idle = calm(guest("idle", memory_mib=1000, register_mib=300))
    snap = snapshot(grows, idle, host_mib=1000, free_mib=100)
    for counted_free_mib, balloon_mib in ((400, 700 - 400), (50, 700 - 100)):
        truth = HostTruth(
            1000 * MIB, (1000 - counted_free_mib) * MIB, 8000 * MIB, counted_free_mib * MIB
        )
        host = dataclasses.replace(snap.host, truth=truth)
        d = POLICY.decide(dataclasses.replace(snap, host=host))
        # ...and where the host counts less free than the balloons say, the balloons' word holds
        assert balloons_mib(d)[0] == balloon_mib


def test_small_inflations_wait_unless_that_breaks_the_partition_and_deflations_go() -> None:
    views = [guest(name, memory_mib=1000, register_mib=500) for name in ("a", "b")]
    guests = _Guests.of(views)

    def registers(allocations_mib: list[int], available_mib: int) -> list[float]:
        allocations = np.array(allocations_mib, dtype=np.int64) * MIB
        out = registers_bytes(guests, allocations, 0, 0, available_mib * MIB)
        return [r / MIB for r in out.tolist()]

    assert registers([498, 500], 1000) == [500, 500]  # 2 MiB less: not worth a move
    assert registers([498, 500], 999) == [502, 500]  # ...unless the host is promised twice
    assert registers([480, 500], 1000) == [520, 500]  # beyond the dead band
    # No free memory: a cannot grow yet, and waits for b, whose small inflation is made.
    assert registers([501, 499], 1000) == [500, 501]
    free = registers_bytes(guests, np.array([501, 499]) * MIB, 10 * MIB, 0, 1000 * MIB)
    assert (free // MIB).tolist() == [499, 501]  # with room a grows at once, however little,
    # and b must then make room, however little


def test_a_guest_the_host_holds_counts_for_what_it_may_grow_to_in_the_partition() -> None:
    # "held" has no balloon the policy moves (none here; a guest the host holds counts
    # the same) and holds 500 MiB of the 502 it was given; "a" was given 2 MiB less
    # than it holds, inside the dead band.
    a = guest("a", memory_mib=1000, register_mib=500)
    held = guest("held", memory_mib=1000, balloon=False, allocated_mib=500)
    guests = _Guests.of([a, held])
    allocations = np.array([498, 502], dtype=np.int64) * MIB
    out = registers_bytes(guests, allocations, 0, 0, 1000 * MIB)
    # Left where it is, "a"'s balloon would promise the host twice once "held" grows
    # into its allocation: "a" inflates now (suite-5-98: a guest over its target by a
    # dead band's worth was blocked for whole periods while the host was LOW).
    assert (out // MIB).tolist() == [502, 0]


def test_stall_time_is_preferred_and_faults_stand_in_for_it() -> None:
    g = guest("g")
    assert stall_fraction(g) == 0.0  # no rates yet
    assert stall_fraction(dataclasses.replace(g, pressure=MemoryPressure(10.0, 0.3))) == 0.3
    faults_only = dataclasses.replace(g, pressure=MemoryPressure(1000.0, None))
    assert 0.0 < stall_fraction(faults_only) < 1.0


def test_while_memory_is_contended_others_are_judged_by_their_recent_working_set() -> None:
    busy = stalled(guest("busy", working_set_mib=900))
    quiet = dataclasses.replace(
        calm(guest("quiet", working_set_mib=600)), recent_working_set_bytes=100 * MIB
    )
    assert demand_bytes([busy, quiet])[1] < 120 * MIB
    assert demand_bytes([calm(busy), quiet])[1] > 600 * MIB  # nobody stalls: no hurry


def test_only_guests_a_balloon_cannot_serve_are_host_paged() -> None:
    coop = stalled(guest("coop", memory_mib=1000, register_mib=200))
    rogue = calm(guest("rogue", memory_mib=1000, balloon=False, working_set_mib=100))
    for state in HostState:
        d = POLICY.decide(snapshot(coop, rogue, host_mib=1000, state=state))
        assert d.mechanisms.host_paging is (state.rank >= HostState.HARD.rank)
        assert d.targets[1].balloon_bytes == 0  # no driver: no register
        assert not d.mechanisms.host_paging_ballooned  # the cooperating guest is never paged
    all_coop = POLICY.decide(snapshot(coop, calm(guest("b")), host_mib=1000, state=HostState.LOW))
    assert not all_coop.mechanisms.host_paging


# -- invariants on random hosts ----------------------------------------------------------


@st.composite
def hosts(draw: st.DrawFn) -> tuple[Snapshot, DemandPolicy]:
    n = draw(st.integers(1, 8))
    views = []
    for i in range(n):
        memory = draw(st.integers(64, 4096))
        limit = draw(st.integers(16, memory))
        reservation = draw(st.integers(0, limit)) if draw(st.booleans()) else 0
        register = draw(st.integers(0, memory))
        view = guest(
            f"g{i}",
            memory_mib=memory,
            working_set_mib=draw(st.integers(0, memory)),
            shares=draw(st.integers(1, 8)) * 1000,
            min_mib=reservation,
            max_mib=limit,
            balloon=draw(st.booleans()) or i == 0,
            register_mib=register,
        )
        stall = draw(st.sampled_from([None, 0.0, 0.02, STALL_THRESHOLD, 0.9]))
        if stall is not None:
            view = dataclasses.replace(view, pressure=MemoryPressure(0.0, stall))
        views.append(view)
    reserved = sum(v.spec.min_bytes for v in views) // MIB
    host = draw(st.integers(max(64, reserved), 16384))
    state = draw(st.sampled_from(list(HostState)))
    free = draw(st.integers(0, host))
    margin = draw(st.sampled_from([0.0, 0.02, 0.1]))
    return snapshot(*views, host_mib=host, free_mib=free, state=state), DemandPolicy(
        margin_fraction=margin
    )


@settings(max_examples=300, deadline=None)
@given(hosts())
def test_bounds_hold_and_the_host_is_never_promised_twice(
    case: tuple[Snapshot, DemandPolicy],
) -> None:
    snap, policy = case
    d = policy.decide(snap)
    allocations = []
    for view, target in zip(snap.guests, d.targets, strict=True):
        spec = view.spec
        register = target.balloon_bytes
        if not spec.balloon:
            assert register == 0
            allocations.append(target.allocation_bytes)
            continue
        assert 0 <= register <= spec.memory_bytes
        assert spec.memory_bytes - register <= spec.limit_bytes  # the limit holds always
        assert spec.min_bytes <= target.allocation_bytes <= spec.limit_bytes
        assert register <= spec.memory_bytes - spec.min_bytes  # never below the reservation
        allocations.append(target.allocation_bytes)
    reserved = sum(v.spec.min_bytes for v in snap.guests)
    available = snap.host.memory_bytes - int(snap.host.memory_bytes * policy.margin_fraction)
    if reserved <= available:
        assert sum(allocations) <= available


@settings(max_examples=300, deadline=None)
@given(hosts())
def test_no_guest_gets_less_than_its_demand_or_its_share(
    case: tuple[Snapshot, DemandPolicy],
) -> None:
    snap, policy = case
    d = policy.decide(snap)
    guests = snap.guests
    shares = np.array([float(g.spec.shares) for g in guests])
    mins = np.array([g.spec.min_bytes for g in guests], dtype=np.int64)
    maxes = np.array([g.spec.limit_bytes for g in guests], dtype=np.int64)
    available = snap.host.memory_bytes - int(snap.host.memory_bytes * policy.margin_fraction)
    if int(mins.sum()) > available:
        return
    static = water_fill(shares, mins, maxes, available)
    wanted = np.clip(demand_bytes(guests), mins, maxes)
    slack = len(guests) * PAGE_SIZE_BYTES  # whole-page rounding
    for g, target, want, share in zip(guests, d.targets, wanted, static, strict=True):
        assert target.allocation_bytes >= min(int(want), int(share)) - slack, g.name


def test_a_guest_that_stops_stalling_lets_go_at_once() -> None:
    g = guest("g")
    stopped = MemoryPressure(1000.0, 0.6, major_faults_per_s_now=0.0, stall_fraction_now=0.0)
    assert stall_fraction(dataclasses.replace(g, pressure=stopped)) == 0.0
    noisy = MemoryPressure(1000.0, 0.6, major_faults_per_s_now=900.0, stall_fraction_now=0.4)
    assert stall_fraction(dataclasses.replace(g, pressure=noisy)) == 0.6  # not a stop
    faults_stopped = MemoryPressure(1000.0, None, major_faults_per_s_now=0.0)
    assert stall_fraction(dataclasses.replace(g, pressure=faults_stopped)) == 0.0


def test_the_last_intervals_stall_is_its_own_where_the_guest_reports_it() -> None:
    g = guest("g")
    assert interval_stall_fraction(g) == 0.0  # no rates yet
    rising = MemoryPressure(1000.0, 0.3, major_faults_per_s_now=900.0, stall_fraction_now=0.8)
    assert interval_stall_fraction(dataclasses.replace(g, pressure=rising)) == 0.8
    faults_now = MemoryPressure(1000.0, None, major_faults_per_s_now=5000.0)
    assert interval_stall_fraction(dataclasses.replace(g, pressure=faults_now)) == (
        pytest.approx(0.5)
    )
    smoothed_only = MemoryPressure(1000.0, 0.3)
    assert interval_stall_fraction(dataclasses.replace(g, pressure=smoothed_only)) == 0.3


def test_a_guest_not_short_whose_use_and_set_grow_leads_by_its_next_seconds() -> None:
    names = ("ramps", "drifts", "fast", "stalls", "slow", "still")
    views = [guest(n, memory_mib=200, register_mib=80) for n in names]
    guests = _Guests.of(views)  # each uses the 120 MiB it may hold
    unstalled = np.array([True, True, True, False, True, True])
    use = np.array([2.0, 2.0, 100.0, 2.0, 1.0, 0.2]) * MIB  # bytes a second
    working = np.array([2.0, 0.0, 100.0, 2.0, 0.5, 0.2]) * MIB
    lead = lead_bytes(guests, unstalled, use, working) / MIB
    # 3 s at 2 MiB/s; a drifting set (its size stays) none; a fast one 16 MiB at most;
    # a guest that stalls asks by its stall instead; a slow grower 3 s at its slower
    # rate; one that barely moves (under LEAD_BYTES_PER_S) none
    assert lead.tolist() == [126, 0, 136, 0, 121.5, 0]


def _ramping(time_s: float, used_mib: int, set_growth_mib: int) -> GuestView:
    """A quiet guest at the edge of the 120 MiB its balloon leaves it."""
    view = calm(guest("ramps", memory_mib=200, register_mib=80, allocated_mib=used_mib))
    return dataclasses.replace(
        view,
        working_set_bytes=used_mib * MIB,
        recent_working_set_bytes=(110 + set_growth_mib * int(time_s)) * MIB,
    )


@pytest.mark.parametrize(
    ("set_growth_mib", "ahead"),
    [(2, True), (0, False)],  # growing 2 MiB/s; a set that drifts, its size the same
    ids=["ramps", "drifts"],
)
def test_a_guest_growing_into_its_last_pages_gets_more_before_it_stalls(
    set_growth_mib: int, ahead: bool
) -> None:
    busy = stalled(guest("busy", memory_mib=400, register_mib=120), 0.9)  # wants it all
    policy = DemandPolicy()
    policy.decide(snapshot(_ramping(0.0, 116, set_growth_mib), busy, host_mib=400))
    d = policy.decide(snapshot(_ramping(1.0, 118, set_growth_mib), busy, host_mib=400, time_s=1.0))
    ramps_mib = d.by_name()["ramps"].allocation_bytes / MIB
    # 3 s ahead at 2 MiB/s, past the 120 MiB it may hold; no more than that otherwise
    assert (ramps_mib >= 118 + 6) if ahead else (ramps_mib <= 120)


def test_pages_in_use_are_taken_only_where_no_surplus_covers_them() -> None:
    views = [
        guest("holds", memory_mib=1000, register_mib=500),  # holds 500
        guest("spare", memory_mib=1000, register_mib=900),  # holds 100
        guest("grows", memory_mib=1000, register_mib=800),  # holds 200
    ]
    guests = _Guests.of(views)
    allocations = np.array([300, 400, 300]) * MIB  # holds: -200; spare: +300
    wanted = np.array([300, 150, 300]) * MIB  # spare wants 150: 250 of it is surplus
    out = defer_squeezes(guests, allocations, wanted) // MIB
    assert out.tolist() == [500, 200, 300]  # holds keeps all, paid from spare's surplus
    assert int(out.sum()) == int(allocations.sum() // MIB)  # the partition holds
    less = defer_squeezes(guests, allocations, np.array([300, 300, 300]) * MIB) // MIB
    assert less.tolist() == [400, 300, 300]  # a surplus of 100 defers 100 of the 200
    # Pages the guest reports free are not spared: holds has 150 of its 500 free.
    views[0] = guest("holds", memory_mib=1000, register_mib=500, free_mib=150)
    part = defer_squeezes(_Guests.of(views), allocations, wanted) // MIB
    assert part.tolist() == [350, 350, 300]


def test_a_guest_that_reports_no_free_memory_is_not_spared_what_the_host_never_held() -> None:
    # The daemon's failed CI run: an agent guest (it reports MemAvailable, not free
    # memory) was still whole when the first decision squeezed the other guest.
    # Counted as all in use, the agent's 384 MiB were spared for good, paid for by
    # the other's surplus. The host holds only 100 MiB of its RAM: the rest was never
    # touched, so it is not in use, and the two idle guests end level.
    agent = calm(guest("agent", memory_mib=384, working_set_mib=40))
    plain = calm(guest("plain", memory_mib=384, working_set_mib=40, register_mib=220, free_mib=100))
    unknown = allocations_mib(POLICY.decide(snapshot(agent, plain, host_mib=560, free_mib=0)))
    assert unknown == [384, 176]  # without the host's count: the status quo
    touched = dataclasses.replace(
        agent,
        sample=dataclasses.replace(
            agent.sample, host=HostHeld(held_bytes=130 * MIB, guest_ram_bytes=100 * MIB)
        ),
    )
    assert allocations_mib(POLICY.decide(snapshot(touched, plain, host_mib=560, free_mib=0))) == [
        280,
        280,
    ]
    # Pages KSM merged, or in the host's swap, are in use though the RAM's count misses
    # them: with 300 MiB of them the agent is spared again.
    merged = dataclasses.replace(
        touched,
        sample=dataclasses.replace(
            touched.sample,
            host=HostHeld(
                130 * MIB, 100 * MIB, ksm_merged_bytes=200 * MIB, swapped_bytes=100 * MIB
            ),
        ),
    )
    assert allocations_mib(POLICY.decide(snapshot(merged, plain, host_mib=560, free_mib=0))) == [
        384,
        176,
    ]


def test_a_guest_that_grew_once_gives_its_peak_back_when_nobody_wants_it() -> None:
    # Two QEMU guests: "held" is what each may use (memory less balloon), whatever it
    # touches. busy grew to 500 and freed most of it again; idle holds 300 and uses
    # little. Nobody wants the memory, so it goes back by shares: busy must not keep
    # its peak just because idle does not need the rest.
    busy = calm(guest("busy", memory_mib=512, working_set_mib=50, register_mib=12, free_mib=420))
    idle = calm(guest("idle", memory_mib=512, working_set_mib=20, register_mib=212, free_mib=250))
    d = POLICY.decide(snapshot(busy, idle, host_mib=800, free_mib=0))
    assert allocations_mib(d) == [400, 400]


def test_a_guest_short_of_available_memory_now_is_rescued_from_idle_memory_at_once() -> None:
    # burst holds 300 and its averages still say 40; it reports 100 short of its floor
    # this period. idle holds 700 and uses 100. Without the rescue burst waits; with it
    # it wants what it lacks and a step (16), taken from idle's unused memory.
    burst = calm(guest("burst", memory_mib=1000, working_set_mib=40, register_mib=700))
    burst = dataclasses.replace(
        burst, sample=dataclasses.replace(burst.sample, available_short_bytes=100 * MIB)
    )
    idle = calm(guest("idle", memory_mib=1000, working_set_mib=100, register_mib=300))
    host = snapshot(burst, idle, host_mib=1000, free_mib=0)
    assert allocations_mib(DemandPolicy(margin_fraction=0.0, rescue=False).decide(host)) == [
        300,
        700,
    ]
    assert allocations_mib(POLICY.decide(host)) == [300 + 100 + 16, 700 - 116]
    # A burst still under way: it used 60 MiB in the last interval, so it wants that
    # much more again, for the periods the memory takes to reach it.
    going = dataclasses.replace(
        burst,
        sample=dataclasses.replace(
            burst.sample, available_short_bytes=100 * MIB, available_fall_bytes=60 * MIB
        ),
    )
    assert allocations_mib(POLICY.decide(snapshot(going, idle, host_mib=1000, free_mib=0))) == [
        300 + 100 + 60 + 16,
        700 - 176,
    ]
    # A MiB or two short is a guest the pacing holds at its floor, not a burst.
    held = dataclasses.replace(
        burst,
        sample=dataclasses.replace(
            burst.sample, available_short_bytes=2 * MIB, available_fall_bytes=2 * MIB
        ),
    )
    assert allocations_mib(POLICY.decide(snapshot(held, idle, host_mib=1000, free_mib=0))) == [
        300,
        700,
    ]


def _grows(in_use_mib: int) -> GuestView:
    """A calm guest that may use 600 of its 1000 MiB and uses ``in_use_mib``."""
    return calm(
        guest(
            "grows",
            memory_mib=1000,
            working_set_mib=in_use_mib,
            register_mib=400,
            free_mib=600 - in_use_mib,
        )
    )


def _idle() -> GuestView:
    """A calm guest that may use 400 of its 1000 MiB and uses 50."""
    return calm(guest("idle", memory_mib=1000, working_set_mib=50, register_mib=600, free_mib=350))


def test_a_guest_still_growing_keeps_the_memory_it_grows_into() -> None:
    # grows may use 600 and uses 300, then 332: 32 MiB/s. idle may use 400 and uses
    # 50. Led by the working set alone, grows is cut to 500 and the 100 taken go to
    # idle, which does not use them; grows would stall within 6 s and win them back.
    idle = _idle()
    policy = DemandPolicy(margin_fraction=0.0)
    first = policy.decide(snapshot(_grows(300), idle, host_mib=1000, free_mib=0, time_s=0.0))
    assert allocations_mib(first) == [500, 500]  # nothing known of its growth yet
    # The same period to a policy with no history: cut to 500.
    fresh = POLICY.decide(snapshot(_grows(332), idle, host_mib=1000, free_mib=0, time_s=1.0))
    assert allocations_mib(fresh) == [500, 500]
    growing = policy.decide(snapshot(_grows(332), idle, host_mib=1000, free_mib=0, time_s=1.0))
    assert allocations_mib(growing) == [600, 400]  # it keeps its 600 (3 s reach: 428)
    stopped = policy.decide(snapshot(_grows(332), idle, host_mib=1000, free_mib=0, time_s=2.0))
    assert allocations_mib(stopped) == [500, 500]
    # The runway is not demand: a guest that stalls now is served first. needy holds
    # 400 and stalls; it takes all that grows does not demand: what grows uses and
    # its lead (3 s of its growth, at most 16 MiB), not the runway's 16 s.
    needy = stalled(guest("needy", memory_mib=1000, working_set_mib=400, register_mib=600))
    policy.decide(snapshot(_grows(300), needy, host_mib=1000, free_mib=0, time_s=3.0))
    contended = policy.decide(snapshot(_grows(332), needy, host_mib=1000, free_mib=0, time_s=4.0))
    assert allocations_mib(contended) == [332 + 16, 1000 - 332 - 16]
    # with no history (no growth seen), its working set and the contended headroom
    alone = POLICY.decide(snapshot(_grows(332), needy, host_mib=1000, free_mib=0, time_s=4.0))
    assert allocations_mib(alone)[0] < 332 + 16


def test_a_guest_that_reports_its_growth_is_led_by_its_reports() -> None:
    # The daemon measures a real guest's growth between its own reports, net of its
    # balloon's moves; the policy's own measure (use between decisions) would read a
    # deflation whose free figure is not reported yet as growth.
    def grows(in_use_mib: int, reported_mib_per_s: float) -> GuestView:
        view = calm(
            guest(
                "grows",
                memory_mib=1000,
                working_set_mib=300,
                register_mib=400,
                free_mib=600 - in_use_mib,
            )
        )
        sample = dataclasses.replace(view.sample, use_growth_bytes_per_s=reported_mib_per_s * MIB)
        return dataclasses.replace(view, sample=sample)

    idle = _idle()
    policy = DemandPolicy(margin_fraction=0.0)
    assert allocations_mib(
        policy.decide(snapshot(grows(300, 0.0), idle, host_mib=1000, free_mib=0, time_s=0.0))
    ) == [500, 500]
    # In use rose by 32 MiB (to the policy's eye), but its reports say it did not grow.
    still = policy.decide(snapshot(grows(332, 0.0), idle, host_mib=1000, free_mib=0, time_s=1.0))
    assert allocations_mib(still) == [500, 500]
    # Its reports say it grows at 32 MiB/s: it keeps its runway.
    growing = policy.decide(snapshot(grows(332, 32), idle, host_mib=1000, free_mib=0, time_s=2.0))
    assert allocations_mib(growing) == [600, 400]


def test_a_guest_growing_fast_reaches_past_its_allowance_into_memory_nobody_uses() -> None:
    # grows may use 600 and uses 300, then 500: 200 MiB/s, faster than a decision a
    # second can follow. Its reach is what it would touch in the next 3 s (1100 MiB,
    # at most its 1000): it may take what the other guest does not use.
    def after_a_second(other: GuestView) -> list[float]:
        policy = DemandPolicy(margin_fraction=0.0)
        policy.decide(snapshot(_grows(300), other, host_mib=1000, free_mib=0, time_s=0.0))
        return allocations_mib(
            policy.decide(snapshot(_grows(500), other, host_mib=1000, free_mib=0, time_s=1.0))
        )

    # idle uses 50 of its 400 and keeps that and its headroom (10 % and 8 MiB)
    idle = _idle()
    assert after_a_second(idle) == [1000 - 63, 63]
    # busy uses all of its 400: none of it is free to reach into
    busy = calm(guest("busy", memory_mib=1000, working_set_mib=400, register_mib=600, free_mib=0))
    assert after_a_second(busy) == [600, 400]
    # a policy that has not seen it grow does not reach past what it may use now
    unseen = POLICY.decide(snapshot(_grows(500), idle, host_mib=1000, free_mib=0))
    assert allocations_mib(unseen)[0] <= 600


def test_growth_is_use_gained_per_second_and_nothing_for_the_unknown() -> None:
    growth = UseGrowth()
    names = ["a", "b"]
    first = growth.update(10.0, names, np.array([100, 100]) * MIB)
    assert first.tolist() == [0.0, 0.0]
    later = growth.update(12.0, ["a", "b", "new"], np.array([140, 90, 500]) * MIB)
    assert (later / MIB).tolist() == [20.0, 0.0, 0.0]  # b fell: not growing; new: unknown
    assert growth.update(12.0, names, np.array([200, 200]) * MIB).tolist() == [0.0, 0.0]


def test_a_quiet_guest_wants_no_more_than_it_may_hold() -> None:
    # Its working set says 600 MiB but its balloon lets it use 400: were it short,
    # it would stall, so the rest of its estimate is not demand.
    held_in = calm(guest("held", memory_mib=1000, working_set_mib=600, register_mib=600))
    assert demand_bytes([held_in])[0] == 400 * MIB
    room = calm(guest("room", memory_mib=1000, working_set_mib=300, register_mib=600))
    assert demand_bytes([room])[0] == int(300 * MIB * 1.1) + 8 * MIB  # headroom fits
    # suite-1-135: an idle guest's slow average no longer takes pages from a guest
    # that fits by a few MiB and uses every one of them.
    fits = calm(guest("fits", memory_mib=1000, working_set_mib=900, register_mib=100))
    idle = calm(guest("idle", memory_mib=1000, working_set_mib=200, register_mib=900))
    assert allocations_mib(POLICY.decide(snapshot(fits, idle, host_mib=1000))) == [900, 100]


def test_a_guest_stalling_a_little_keeps_what_it_uses_not_all_it_may_hold() -> None:
    # A step it got while it stalled and did not fill goes back (suite-2-28).
    def view(allocated_mib: int) -> GuestView:
        g = guest(
            "g", memory_mib=1000, working_set_mib=300, register_mib=200, allocated_mib=allocated_mib
        )
        return stalled(g, 0.02)

    assert demand_bytes([view(500)])[0] == 500 * MIB
    assert demand_bytes([view(800)])[0] == 800 * MIB  # it uses all it may hold
    assert demand_bytes([view(100)])[0] == int(300 * MIB * 1.1) + 8 * MIB  # less than it sees


def test_the_default_margin_holds_back_half_a_percent_of_the_host() -> None:
    views = [stalled(guest(n, memory_mib=1000, register_mib=500)) for n in "ab"]
    d = DemandPolicy().decide(snapshot(*views, host_mib=1000))
    assert sum(t.allocation_bytes for t in d.targets) == 995 * MIB


def test_a_quiet_guest_without_a_balloon_wants_no_more_than_it_uses() -> None:
    # suite-10-56: a guest without a balloon and 5.7x the shares held its 117 MiB
    # zipf set in 133 MiB and was allotted its headroom over that. Nothing stops it
    # taking memory when it needs it, and it never touched that, so the memory sat
    # free while a ballooned guest 4 MiB short thrashed.
    plain = calm(
        guest(
            "plain",
            memory_mib=216,
            working_set_mib=117,
            shares=5700,
            balloon=False,
            allocated_mib=133,
        )
    )
    assert demand_bytes([plain])[0] == 133 * MIB
    other = calm(guest("other", memory_mib=100, working_set_mib=20))
    assert allocations_mib(POLICY.decide(snapshot(plain, other, host_mib=163))) == [133, 30]
