"""Host-side pacing and the safety rules on every target (no QEMU)."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from balloonist.daemon.pacing import (
    HOST_RATE_LIMITS,
    AvailableNow,
    Bounds,
    GuestPacer,
    safe_target,
)
from balloonist.units import MIB, PAGE_SIZE_BYTES

BOUNDS = Bounds(min_bytes=128 * MIB, max_bytes=1024 * MIB, available_floor_bytes=64 * MIB)
STEP0 = HOST_RATE_LIMITS.min_units * PAGE_SIZE_BYTES
GROW = HOST_RATE_LIMITS.increase_units * PAGE_SIZE_BYTES


def test_first_target_is_where_the_guest_is() -> None:
    pacer = GuestPacer.starting_at(1024 * MIB, BOUNDS)
    assert pacer.commanded_bytes == 1024 * MIB


def test_inflation_moves_in_growing_steps_while_the_guest_keeps_up() -> None:
    pacer = GuestPacer.starting_at(1024 * MIB, BOUNDS)
    actual = 1024 * MIB
    targets = []
    for t in range(4):
        target = pacer.step(256 * MIB, actual, available=None, now_s=float(t))
        targets.append(target)
        actual = target  # the guest reaches every step
    steps = [1024 * MIB - targets[0]] + [a - b for a, b in itertools.pairwise(targets)]
    assert steps == [STEP0, STEP0 + GROW, STEP0 + 2 * GROW, STEP0 + 3 * GROW]


def test_a_guest_that_falls_behind_gets_smaller_steps_then_is_uncooperative() -> None:
    pacer = GuestPacer.starting_at(1024 * MIB, BOUNDS, stall_timeout_s=5.0)
    actual = 1024 * MIB
    for t in range(3):  # keeps up, the rate grows
        actual = pacer.step(256 * MIB, actual, None, float(t))
    grown = pacer.rate.step_units
    stuck = actual
    for t in range(3, 12):  # the balloon stops moving
        pacer.step(256 * MIB, stuck, None, float(t))
    assert pacer.rate.step_units < grown
    assert not pacer.cooperative
    # not counted on: held where it is, and it stays uncooperative
    for t in range(12, 14):
        assert pacer.step(256 * MIB, stuck, None, float(t)) == stuck
        assert not pacer.cooperative
    # one stall timeout later it is probed with the smallest step; reaching it counts
    probe = pacer.step(256 * MIB, stuck, None, 20.0)
    assert stuck - probe == HOST_RATE_LIMITS.min_units * PAGE_SIZE_BYTES
    pacer.step(256 * MIB, probe, None, 21.0)
    assert pacer.cooperative


def test_a_step_the_guest_is_still_working_on_is_not_taken_back() -> None:
    pacer = GuestPacer.starting_at(1024 * MIB, BOUNDS)
    actual = 1024 * MIB
    for t in range(3):  # keeps up, the rate grows
        actual = pacer.step(256 * MIB, actual, None, float(t))
    asked = pacer.step(256 * MIB, actual, None, 3.0)
    # it gets a quarter of the way: its rate is cut, but the target stays where it was
    slow = actual - (actual - asked) // 4
    assert pacer.step(256 * MIB, slow, None, 4.0) == asked
    assert pacer.rate.step_units * PAGE_SIZE_BYTES < actual - asked
    # once there, the next step is the smaller one
    after = pacer.step(256 * MIB, asked, None, 5.0)
    assert asked - after == pacer.rate.step_units * PAGE_SIZE_BYTES or after == 256 * MIB
    # a guest that grew on its own (it deflated) is paced from its size again
    grown = pacer.step(256 * MIB, asked + 64 * MIB, None, 6.0)
    assert grown == asked + 64 * MIB - pacer.rate.step_units * PAGE_SIZE_BYTES


def test_deflation_is_not_paced() -> None:
    pacer = GuestPacer.starting_at(256 * MIB, BOUNDS)
    assert pacer.step(1024 * MIB, 256 * MIB, None, 0.0) == 1024 * MIB


def test_never_below_the_available_floor() -> None:
    # the guest has 100 MiB available: at most 36 MiB may go
    assert safe_target(128 * MIB, 512 * MIB, AvailableNow.exactly(100 * MIB), BOUNDS) == 476 * MIB


def test_the_floor_counts_the_least_the_guest_may_have_and_never_deflates_by_itself() -> None:
    # 100 MiB available by its report, maybe 80 MiB since its balloon's last step
    maybe = AvailableNow(low_bytes=80 * MIB, high_bytes=100 * MIB)
    assert safe_target(128 * MIB, 512 * MIB, maybe, BOUNDS) == 496 * MIB
    # maybe 40 MiB: held where it is; a wish to give is still given
    short = AvailableNow(low_bytes=40 * MIB, high_bytes=100 * MIB)
    assert safe_target(128 * MIB, 512 * MIB, short, BOUNDS) == 512 * MIB
    assert safe_target(600 * MIB, 512 * MIB, short, BOUNDS) == 600 * MIB


@given(
    wanted=st.integers(0, 4096 * MIB),
    actual=st.integers(0, 1024 * MIB),
    available=st.none()
    | st.tuples(st.integers(0, 1024 * MIB), st.integers(0, 1024 * MIB)).map(
        lambda pair: AvailableNow(min(pair), max(pair))
    ),
    lo=st.integers(0, 512),
    hi=st.integers(512, 1024),
)
def test_safe_targets_stay_within_min_and_max(
    wanted: int, actual: int, available: AvailableNow | None, lo: int, hi: int
) -> None:
    bounds = Bounds(lo * MIB, hi * MIB)
    target = safe_target(wanted, actual, available, bounds)
    assert bounds.min_bytes <= target <= bounds.max_bytes
    assert target % PAGE_SIZE_BYTES == 0
    # the floor gives way only to min and max (a guest above its max is brought down)
    if available is not None and target < actual and bounds.min_bytes < target < bounds.max_bytes:
        spare = max(0, available.low_bytes - bounds.available_floor_bytes)
        assert actual - target <= spare + PAGE_SIZE_BYTES
    # and it never deflates past the wish by itself
    if target > max(wanted, actual):
        assert target == bounds.min_bytes


@given(st.lists(st.tuples(st.integers(0, 2048), st.integers(0, 1024)), min_size=1, max_size=40))
def test_every_paced_target_is_safe(moves: list[tuple[int, int]]) -> None:
    pacer = GuestPacer.starting_at(1024 * MIB, BOUNDS)
    for t, (wanted_mib, actual_mib) in enumerate(moves):
        target = pacer.step(wanted_mib * MIB, actual_mib * MIB, None, float(t))
        assert BOUNDS.min_bytes <= target <= BOUNDS.max_bytes
