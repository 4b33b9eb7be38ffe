"""Limit paging: a guest that cannot work ballooned under its limit is tried held there
by the host, kept so only if it measures better, and never when that could double
page."""

from __future__ import annotations

import dataclasses

import pytest

from balloonist.model import GuestView, MemoryPressure
from balloonist.policy.demand import DemandPolicy
from balloonist.policy.limitpaging import (
    BACKOFF_S,
    KEEP_GAIN,
    MEASURE_PERIODS,
    NEAR_EXCESS_BYTES,
    NEAR_TRIAL_STALL,
    SETTLE_PERIODS,
    TRIAL_AFTER,
    TRIAL_PERIODS,
    LimitPaging,
    Mode,
    _Guest,
    worth_trying,
)
from balloonist.units import MIB

from .snapshots import guest, snapshot


def _at_limit(
    *,
    stall: float = 0.99,
    swap_mib: int | None = 20,
    free_mib: int = 0,
    balloon_mib: int = 60,
    cappable: bool = True,
    max_mib: int | None = 76,
    memory_mib: int = 140,
    allocated_mib: int = 76,
) -> GuestView:
    """A 140 MiB guest held at a 76 MiB limit (by default), stalling ``stall`` of its
    time, ``swap_mib`` in its own swap."""
    view = guest(
        "g",
        memory_mib=memory_mib,
        max_mib=max_mib,
        register_mib=balloon_mib,
        allocated_mib=allocated_mib,
        free_mib=free_mib,
    )
    sample = dataclasses.replace(
        view.sample,
        swap_used_bytes=None if swap_mib is None else swap_mib * MIB,
        host_cappable=cappable,
    )
    return dataclasses.replace(view, sample=sample, pressure=MemoryPressure(1000.0, stall))


def _interval_stall(view: GuestView) -> float:
    """The last interval's stall, where the view has one; else the smoothed one."""
    p = view.pressure
    assert p is not None
    now = p.stall_fraction_now
    return now if now is not None else (p.stall_fraction or 0.0)


def _run(paging: LimitPaging, view: GuestView, start_s: float, periods: int) -> frozenset[str]:
    capped: frozenset[str] = frozenset()
    for k in range(periods):
        stall = view.pressure.stall_fraction or 0.0  # type: ignore[union-attr]
        capped = paging.update(start_s + k, [view], [stall], [_interval_stall(view)])
    return capped


def _capped(stall: float, swap_mib: int = 20) -> GuestView:
    """The guest host-capped: its balloon deflated, memory to spare, ``stall``."""
    return _at_limit(stall=stall, balloon_mib=0, free_mib=40, swap_mib=swap_mib)


def test_a_guest_thrashing_at_its_limit_is_tried_host_capped_and_kept_if_it_works_better() -> None:
    paging = LimitPaging()
    assert _run(paging, _at_limit(), 0.0, TRIAL_AFTER - 1) == frozenset()
    assert _run(paging, _at_limit(), TRIAL_AFTER - 1, 1) == {"g"}
    assert paging.mode("g") is Mode.TRIAL
    # the trial's first periods, still refilling, do not count; its last ones do
    _run(paging, _capped(0.999), TRIAL_AFTER, TRIAL_PERIODS - MEASURE_PERIODS)
    assert _run(paging, _capped(0.98), 100.0, MEASURE_PERIODS) == {"g"}
    assert paging.mode("g") is Mode.CAPPED
    assert _run(paging, _capped(0.1), 200.0, 50) == {"g"}  # it stays


def test_a_trial_that_does_not_pay_ends_and_is_tried_again_after_a_doubling_backoff() -> None:
    paging = LimitPaging()
    _run(paging, _at_limit(), 0.0, TRIAL_AFTER)
    assert _run(paging, _capped(0.995), TRIAL_AFTER, TRIAL_PERIODS) == frozenset()
    assert paging.mode("g") is Mode.BALLOONED
    failed_s = TRIAL_AFTER + TRIAL_PERIODS - 1
    # ballooned again and thrashing, but not tried before the backoff is over
    assert _run(paging, _at_limit(), failed_s + 1, int(BACKOFF_S) - 1) == frozenset()
    assert _run(paging, _at_limit(), failed_s + BACKOFF_S, 1) == {"g"}
    second_s = failed_s + BACKOFF_S + TRIAL_PERIODS
    _run(paging, _capped(0.995), failed_s + BACKOFF_S + 1, TRIAL_PERIODS)
    assert _run(paging, _at_limit(), second_s + 1, int(2 * BACKOFF_S) - 1) == frozenset()
    assert _run(paging, _at_limit(), second_s + 2 * BACKOFF_S, 1) == {"g"}


def test_a_trial_after_a_backoff_is_measured_against_the_stall_just_before_it() -> None:
    paging = LimitPaging()
    _run(paging, _at_limit(), 0.0, TRIAL_AFTER)
    _run(paging, _capped(0.995), TRIAL_AFTER, TRIAL_PERIODS)  # fails: backoff
    failed_s = TRIAL_AFTER + TRIAL_PERIODS - 1
    calm_s = failed_s + BACKOFF_S - TRIAL_AFTER  # the backoff's last periods, and its end
    _run(paging, _at_limit(stall=0.98), failed_s + 1, int(calm_s - failed_s - 1))
    state = paging._guests["g"]
    assert len(state.stalls) == TRIAL_AFTER  # a long backoff keeps no more
    assert _run(paging, _at_limit(stall=0.999), calm_s, TRIAL_AFTER + 1) == {"g"}
    assert state.ballooned_stall == pytest.approx(0.999)


def _thrashing_now(smoothed: float, swap_mib: int = 20) -> GuestView:
    """The guest at its limit missing every reference this period, while its smoothed
    stall still climbs to ``smoothed``."""
    view = _at_limit(stall=smoothed, swap_mib=swap_mib)
    assert view.pressure is not None
    return dataclasses.replace(
        view, pressure=dataclasses.replace(view.pressure, stall_fraction_now=0.99)
    )


def test_a_guest_thrashing_by_its_own_stall_is_tried_before_its_smoothed_one_shows_it() -> None:
    paging = LimitPaging()
    capped: frozenset[str] = frozenset()
    for k in range(TRIAL_AFTER):
        capped = _run(paging, _thrashing_now(0.5 + 0.08 * k), float(k), 1)
    assert capped == {"g"}
    assert paging._guests["g"].ballooned_stall == pytest.approx(0.99)


def test_a_guest_whose_footprint_would_outgrow_its_limit_within_a_trial_waits() -> None:
    paging = LimitPaging()
    # 80 to 95 MiB, 3 MiB a period: each would fit, but not what a trial would end
    # with (45 MiB more, of which its 76 MiB limit would hold too little)
    growing = [_thrashing_now(0.99, swap_mib=4 + 3 * k) for k in range(TRIAL_AFTER + 1)]
    for k, view in enumerate(growing):
        assert _run(paging, view, float(k), 1) == frozenset()
    # once it has stopped growing, it is tried
    steady = _thrashing_now(0.99, swap_mib=4 + 3 * TRIAL_AFTER)
    start_s = float(TRIAL_AFTER + 1)
    assert _run(paging, steady, start_s, SETTLE_PERIODS + TRIAL_AFTER) == {"g"}


@pytest.mark.parametrize(
    "view",
    [
        _at_limit(swap_mib=70),  # 76 held + 70 swapped: deflated, it would have to evict
        _at_limit(swap_mib=40),  # 76 held + 40 swapped: the host would keep too little
        _at_limit(swap_mib=None),  # its footprint is unknown
        _at_limit(cappable=False),  # the host cannot page it
        _at_limit(max_mib=None),  # no limit: the balloon holds it for the host alone
        # short, but working, and 20 MiB past its limit: the host's victims would be
        # the workload's own pages, and the balloon's choice of victims wins
        _at_limit(stall=0.5),
    ],
    ids=[
        "footprint",
        "far-past-the-limit",
        "no-swap-figure",
        "not-cappable",
        "no-limit",
        "not-thrashing",
    ],
)
def test_a_guest_is_never_tried_where_it_could_double_page_or_gains_little(
    view: GuestView,
) -> None:
    paging = LimitPaging()
    assert _run(paging, view, 0.0, 5 * TRIAL_AFTER) == frozenset()


def test_a_guest_thrashing_at_what_a_full_host_gives_it_is_tried_as_at_a_limit() -> None:
    # no limit, but held at the 76 MiB its shares gave it last period
    unlimited = _at_limit(max_mib=None)
    paging = LimitPaging()
    capped: frozenset[str] = frozenset()
    for k in range(TRIAL_AFTER):
        capped = paging.update(float(k), [unlimited], [0.99], [0.99], [76 * MIB])
    assert capped == {"g"}
    # given its whole memory again, it has no ceiling to hold: back to its balloon
    assert paging.update(float(TRIAL_AFTER), [unlimited], [0.99], [0.99], [140 * MIB]) == (
        frozenset()
    )
    assert paging.mode("g") is Mode.BALLOONED


def test_a_guest_below_what_it_was_given_is_not_held_at_it() -> None:
    # still growing into the 100 MiB it was given (it holds 76): not thrashing there
    paging = LimitPaging()
    views, stalls = [_at_limit(max_mib=None)], [0.99]
    for k in range(5 * TRIAL_AFTER):
        assert paging.update(float(k), views, stalls, stalls, [100 * MIB]) == frozenset()


def _near(stall: float, swap_mib: int = 4) -> GuestView:
    """The guest just past its limit: 76 held and 4 MiB swapped, its footprint 4 MiB
    past its limit (less than a kernel keeps cold)."""
    return _at_limit(stall=stall, swap_mib=swap_mib)


def test_a_guest_just_past_its_limit_is_tried_at_a_lower_stall_once_it_has_settled() -> None:
    paging = LimitPaging()
    near = _near(NEAR_TRIAL_STALL + 0.1)
    # settled after SETTLE_PERIODS: the settling was its wait, so it is tried then
    first_s = SETTLE_PERIODS - 1
    assert _run(paging, near, 0.0, first_s) == frozenset()
    assert _run(paging, near, first_s, 1) == {"g"}
    assert paging.mode("g") is Mode.TRIAL


@pytest.mark.parametrize(
    ("smoothed", "own"),
    [
        # its smoothed stall still climbs towards the 0.8 it stalls every period
        (
            [0.8 * (1.0 - 0.5 ** ((k + 1) / 2.0)) for k in range(SETTLE_PERIODS)],
            [0.8] * SETTLE_PERIODS,
        ),
        # a FIFO guest's own stall swings for good around the smoothed 0.8
        ([0.8] * SETTLE_PERIODS, [0.7, 0.9] * (SETTLE_PERIODS // 2)),
    ],
    ids=["own-settled-first", "smoothed-settled-only"],
)
def test_a_guest_just_past_its_limit_settles_by_either_stall(
    smoothed: list[float], own: list[float]
) -> None:
    assert SETTLE_PERIODS % 2 == 0
    paging = LimitPaging()
    capped: frozenset[str] = frozenset()
    for k, (stall, now) in enumerate(zip(smoothed, own, strict=True)):
        view = _near(stall)
        assert view.pressure is not None
        view = dataclasses.replace(
            view, pressure=dataclasses.replace(view.pressure, stall_fraction_now=now)
        )
        capped = _run(paging, view, float(k), 1)
    assert capped == {"g"}  # tried, and measured against its periods' own mean
    assert paging._guests["g"].ballooned_stall == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("stalls", "swaps_mib"),
    [
        ([0.3 + 0.02 * k for k in range(20)], [4] * 20),  # its stall still rises
        ([0.5] * 20, [4 + k for k in range(20)]),  # its set still moves in
    ],
    ids=["stall-rising", "footprint-growing"],
)
def test_a_guest_just_past_its_limit_that_has_not_settled_waits_for_the_full_stall(
    stalls: list[float], swaps_mib: list[int]
) -> None:
    paging = LimitPaging()
    for k, (stall, swap_mib) in enumerate(zip(stalls, swaps_mib, strict=True)):
        assert _run(paging, _near(stall, swap_mib), float(k), 1) == frozenset()


@pytest.mark.parametrize(
    ("capped_stall", "kept"),
    [(0.45, True), (0.55, False)],  # work 0.55 and 0.45 of 0.6 ballooned
)
def test_a_trial_that_comes_near_its_ballooned_work_is_kept(
    capped_stall: float, kept: bool
) -> None:
    assert (1.0 - 0.45) >= KEEP_GAIN * 0.6 > (1.0 - 0.55)
    paging = LimitPaging()
    _run(paging, _near(0.4), 0.0, SETTLE_PERIODS)
    assert paging.mode("g") is Mode.TRIAL
    _run(paging, _capped(capped_stall, swap_mib=4), 100.0, TRIAL_PERIODS)
    assert paging.mode("g") is (Mode.CAPPED if kept else Mode.BALLOONED)


@pytest.mark.parametrize(("swap_mib", "tried"), [(4, True), (7, False)])
def test_a_settled_guest_just_past_its_limit_needs_less_room_to_spare(
    swap_mib: int, tried: bool
) -> None:
    # an 84 MiB guest: 80 MiB of footprint leaves 4.8 % of it free (under FIT_MARGIN,
    # over SETTLED_FIT_MARGIN); 83 MiB leaves 1.2 %, under both
    view = _at_limit(stall=0.5, swap_mib=swap_mib, balloon_mib=8, memory_mib=84)
    paging = LimitPaging()
    assert (_run(paging, view, 0.0, SETTLE_PERIODS + TRIAL_AFTER) == {"g"}) is tried
    # the same 80 MiB footprint, judged with the full margin (a guest unsettled or far
    # past its limit), leaves too little to spare
    assert not worth_trying(_at_limit(swap_mib=4, balloon_mib=8, memory_mib=84), 76 * MIB)


def test_a_settled_footprint_far_past_its_limit_needs_only_room_for_its_jitter() -> None:
    # suite-9-101: a 96 MiB footprint in a 100 MiB guest held at a 76 MiB limit, 20 MiB
    # past it (not near), leaves 4 % of its memory free: under FIT_MARGIN, over
    # SETTLED_FIT_MARGIN. Room to grow is for a footprint that still moves.
    view = _at_limit(memory_mib=100, balloon_mib=24, swap_mib=20)
    assert (96 - 76) * MIB > NEAR_EXCESS_BYTES
    assert not worth_trying(view, 76 * MIB, settled=False)
    assert worth_trying(view, 76 * MIB, settled=True)
    paging = LimitPaging()
    # once it has settled, TRIAL_AFTER thrashing periods start the trial
    assert _run(paging, view, 0.0, SETTLE_PERIODS + TRIAL_AFTER - 2) == frozenset()
    assert _run(paging, view, 100.0, 1) == {"g"}


def test_a_capped_guest_that_writes_to_its_swap_goes_back_to_its_balloon() -> None:
    paging = LimitPaging()
    _run(paging, _at_limit(), 0.0, TRIAL_AFTER)
    _run(paging, _capped(0.1), TRIAL_AFTER, TRIAL_PERIODS)
    assert paging.mode("g") is Mode.CAPPED
    # its memory full, free memory low: still capped while it evicts nothing
    full = _at_limit(stall=0.1, balloon_mib=0, free_mib=1, swap_mib=20)
    assert _run(paging, full, 100.0, 10) == {"g"}
    # it wrote 2 MiB out: it grew past its memory
    assert _run(paging, _capped(0.1, swap_mib=22), 110.0, 1) == frozenset()
    assert paging.mode("g") is Mode.BALLOONED


def test_a_trial_guest_whose_balloon_is_still_deflating_is_judged_by_its_work_only() -> None:
    paging = LimitPaging()
    _run(paging, _at_limit(swap_mib=20), 0.0, TRIAL_AFTER)
    # its balloon still holds pages, so evictions are the balloon's: not the guest growing
    deflating = _at_limit(balloon_mib=30, swap_mib=30)
    assert _run(paging, deflating, TRIAL_AFTER, 3) == {"g"}


def test_modes_change_only_along_the_allowed_transitions() -> None:
    state = _Guest()
    with pytest.raises(ValueError, match="ballooned to capped"):
        state.to(Mode.CAPPED)


def test_the_demand_policy_deflates_a_capped_guests_balloon_and_asks_the_host_to_hold_it() -> None:
    policy = DemandPolicy()
    other = guest("h", memory_mib=400, working_set_mib=100, allocated_mib=200)
    decision = None
    for k in range(TRIAL_AFTER):
        decision = policy.decide(snapshot(_at_limit(), other, host_mib=400, time_s=float(k)))
    assert decision is not None
    target = decision.by_name()["g"]
    assert target.host_capped
    assert target.balloon_bytes == 0
    assert target.allocation_bytes <= 76 * MIB  # the limit holds: the host holds it
    assert not decision.by_name()["h"].host_capped


def test_the_demand_policy_holds_a_guest_thrashing_at_its_share_by_the_host() -> None:
    # no limits: a full host's shares hold "g" where it thrashes, its balloon following
    policy = DemandPolicy()
    other = guest("h", memory_mib=400, working_set_mib=250, allocated_mib=250)
    held_mib = 150
    target = None
    for k in range(3 * TRIAL_AFTER):
        view = _at_limit(
            max_mib=None, memory_mib=300, balloon_mib=300 - held_mib, allocated_mib=held_mib
        )
        decision = policy.decide(snapshot(view, other, host_mib=420, time_s=float(k)))
        target = decision.by_name()["g"]
        if target.host_capped:
            break
        held_mib = target.allocation_bytes // MIB  # its balloon reaches its register
    assert target is not None and target.host_capped
    assert target.balloon_bytes == 0
    assert target.allocation_bytes // MIB == held_mib  # the host holds it at its share
