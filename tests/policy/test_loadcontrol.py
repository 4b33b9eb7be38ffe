"""Load control: thrashing guests take turns, by shares, and only while two or more
thrash."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from balloonist.model import GuestView, MemoryPressure
from balloonist.policy.demand import DemandPolicy, stall_fraction
from balloonist.policy.loadcontrol import THRASH_PERIODS, TURN_S, LoadControl, Turns
from balloonist.units import MIB

from .snapshots import allocations_mib, guest, snapshot


def _stalling(view: GuestView, fraction: float) -> GuestView:
    return dataclasses.replace(view, pressure=MemoryPressure(1000.0, fraction))


def _run(
    control: LoadControl,
    views: list[GuestView] | Callable[[float], list[GuestView]],
    start_s: float,
    periods: int,
) -> Turns:
    """``periods`` one-second periods from ``start_s``; ``views`` may be given per time."""
    turns = Turns()
    for k in range(periods):
        now = views(start_s + k) if callable(views) else views
        turns = control.update(start_s + k, now, [stall_fraction(v) for v in now])
    return turns


def _growing(name: str, shares: int) -> Callable[[float], GuestView]:
    """A guest that thrashes while its memory grows by 2 MiB a second: one that a turn
    still helps."""
    return lambda t: _stalling(guest(name, shares=shares, allocated_mib=100 + 2 * int(t)), 0.9)


def test_turns_start_only_once_two_guests_have_thrashed_for_a_while() -> None:
    control = LoadControl()
    a, b = (_stalling(guest(n), 0.9) for n in "ab")
    calm = _stalling(guest("c"), 0.0)
    assert _run(control, [a, b, calm], 0.0, THRASH_PERIODS - 1) == Turns()
    turns = _run(control, [a, b, calm], THRASH_PERIODS - 1, 1)
    assert turns == Turns("a", frozenset({"b"}))  # the calm guest is left alone


def test_one_thrashing_guest_alone_gets_no_turns() -> None:
    control = LoadControl()
    views = [_stalling(guest("a"), 0.9), _stalling(guest("b"), 0.2)]
    assert _run(control, views, 0.0, 3 * THRASH_PERIODS) == Turns()


def test_turns_pass_on_by_shares_and_stop_when_the_others_go_quiet() -> None:
    control = LoadControl()
    big = _growing("big", 3000)
    small = _stalling(guest("small", shares=1000), 0.9)

    def both(t: float) -> list[GuestView]:
        return [big(t), small]

    first = _run(control, both, 0.0, THRASH_PERIODS)
    assert first.holder == "big"  # ties on service go by name
    started_s = THRASH_PERIODS - 1
    # big holds 1.5x the mean turn (its shares over the group's mean), then small
    length_s = TURN_S * 3000 / 2000
    assert _run(control, both, started_s + 1, int(length_s) - 1).holder == "big"
    assert _run(control, both, started_s + length_s, 1).holder == "small"
    # small goes idle during its turn (a holder that fits looks the same: it keeps its
    # turn); when the turn ends, small is quiet, leaves the group, and turns stop
    idle = _stalling(guest("small", shares=1000), 0.0)
    small_s = TURN_S * 1000 / 2000
    during = _run(control, lambda t: [big(t), idle], started_s + length_s + 1, int(small_s) - 1)
    assert during.holder == "small"
    after = _run(control, lambda t: [big(t), idle], started_s + length_s + small_s, 1)
    assert after == Turns()


def test_the_holder_grows_while_the_others_fall_back_to_their_reservations() -> None:
    policy = DemandPolicy(margin_fraction=0.0)
    views = [
        _stalling(guest(n, memory_mib=1000, working_set_mib=500, register_mib=500, min_mib=50), 0.9)
        for n in "ab"
    ]
    for k in range(THRASH_PERIODS):
        decision = policy.decide(snapshot(*views, host_mib=1000, time_s=float(k)))
    a, b = allocations_mib(decision)
    assert b == 50  # held back to its reservation
    assert a == 950  # the holder may take the rest


def test_a_holder_whose_working_set_shrank_gives_up_its_turn_and_one_that_fits_keeps_it() -> None:
    # suite-1-173: the holder's phase ended 3 s into a 48 s turn, and the guest held
    # back at its kernel made nothing for the rest of the run.
    def quiet(recent_mib: int, window_mib: int | None) -> GuestView:
        view = _stalling(guest("big", shares=3000, register_mib=200), 0.0)  # holds 800
        window = None if window_mib is None else window_mib * MIB
        sample = dataclasses.replace(view.sample, active_bytes_observed=window)
        return dataclasses.replace(view, sample=sample, recent_working_set_bytes=recent_mib * MIB)

    # By its recent working set, or by its last closed window's count while the fast
    # average still remembers the phase that ended.
    for recent_mib, window_mib, holder in (
        (780, None, "big"),
        (780, 790, "big"),
        (300, None, None),
        (780, 300, None),
    ):
        control = LoadControl()
        big = _stalling(guest("big", shares=3000), 0.9)
        small = _stalling(guest("small", shares=1000), 0.9)
        assert _run(control, [big, small], 0.0, THRASH_PERIODS).holder == "big"
        # quiet for as long as it takes to be counted quiet, well within its turn
        after = _run(
            control, [quiet(recent_mib, window_mib), small], THRASH_PERIODS, THRASH_PERIODS
        )
        assert after.holder == holder, (recent_mib, window_mib)
        if holder is None:
            # quiet as long as that, big also left the group: no turns for one guest
            assert after == Turns()


def test_a_holder_that_thrashes_at_all_its_turn_gives_it_loses_the_turn_to_one_that_fits() -> None:
    # suite-3-47: a 333 MiB scan with 7.6x the shares could never fit the 197 MiB
    # host, and its turns held back a guest that 53 MiB made a hundred times faster.
    control = LoadControl()
    big = _stalling(guest("big", shares=3000), 0.9)  # its memory does not grow
    small = _stalling(guest("small", shares=1000), 0.9)
    assert _run(control, [big, small], 0.0, THRASH_PERIODS).holder == "big"
    # the first period of the turn marks what it holds; then THRASH_PERIODS stuck there
    assert _run(control, [big, small], THRASH_PERIODS, THRASH_PERIODS).holder == "big"
    start_s = 2.0 * THRASH_PERIODS
    assert _run(control, [big, small], start_s, 1) == Turns("small", frozenset({"big"}))
    # small fits with its turn; when the turn runs out it is renewed, since the only
    # other guest in the group does not fit
    fits = _stalling(guest("small", shares=1000), 0.0)
    small_s = TURN_S * 1000 / 2000
    later = _run(control, [big, fits], start_s + 1, int(3 * small_s))
    assert later == Turns("small", frozenset({"big"}))


@pytest.mark.parametrize(
    ("swapped_mib", "available_mib", "holder"),
    [
        (900, 2300, "small"),  # 1800 + 900 MiB is more than 1.1 x 2300 - 100
        (400, 2300, "big"),  # 2200 MiB might fit: it gets its turn to find out
        (900, None, "big"),  # nothing to judge by: its turn tells
        (None, 2300, "big"),  # its swap unknown
    ],
)
def test_a_guest_whose_footprint_outsizes_the_host_gets_no_turn(
    swapped_mib: int | None, available_mib: int | None, holder: str
) -> None:
    # suite-9-113: a scan that could never fit the host took a turn before it was
    # found not to, while one that fits waited at its reservation.
    big = _stalling(guest("big", memory_mib=3000, shares=3000, allocated_mib=1800), 0.9)
    swapped = None if swapped_mib is None else swapped_mib * MIB
    big = dataclasses.replace(big, sample=dataclasses.replace(big.sample, swap_used_bytes=swapped))
    small = _stalling(guest("small", shares=1000, min_mib=100), 0.9)
    control = LoadControl()
    available = None if available_mib is None else available_mib * MIB
    for k in range(THRASH_PERIODS):
        turns = control.update(float(k), [big, small], [0.9, 0.9], available)
    assert turns.holder == holder


def test_a_holder_that_has_stopped_stalling_keeps_what_it_uses_and_the_rest_goes_back() -> None:
    policy = DemandPolicy(margin_fraction=0.0)

    def views(a_stall: float) -> list[GuestView]:
        a = guest("a", working_set_mib=300, register_mib=650, min_mib=50)  # uses 350
        b = guest("b", working_set_mib=500, register_mib=500, min_mib=50)
        return [_stalling(a, a_stall), _stalling(b, 0.9)]

    for k in range(THRASH_PERIODS):
        decision = policy.decide(snapshot(*views(0.9), host_mib=1000, time_s=float(k)))
    assert allocations_mib(decision) == [950, 50]  # a has the turn and may take it all
    decision = policy.decide(snapshot(*views(0.0), host_mib=1000, time_s=THRASH_PERIODS))
    # a keeps what it uses (350 MiB); the rest is shared by shares, so b, held back,
    # gets what a does not use
    assert allocations_mib(decision) == [500, 500]
