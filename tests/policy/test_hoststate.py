"""Host free-memory states: fall at once, climb one state at a time past a higher bar."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balloonist.model import HostState
from balloonist.policy.hoststate import StateThresholds, next_host_state

HIGH, SOFT, HARD, LOW = HostState.HIGH, HostState.SOFT, HostState.HARD, HostState.LOW


def run(free_fractions: Iterable[float], start: HostState = HIGH) -> list[HostState]:
    """The state after each period, as the scheduler would fold them."""
    states: list[HostState] = []
    state = start
    for free in free_fractions:
        state = next_host_state(state, free)
        states.append(state)
    return states


def test_falls_through_each_threshold() -> None:
    assert run([0.10, 0.05, 0.035, 0.015, 0.005]) == [HIGH, HIGH, SOFT, HARD, LOW]


def test_falls_straight_to_low() -> None:
    assert run([0.005]) == [LOW]


def test_climbs_one_state_per_period() -> None:
    # Plenty free again: LOW -> HARD -> SOFT -> HIGH, never skipping a state.
    assert run([0.5, 0.5, 0.5, 0.5], start=LOW) == [HARD, SOFT, HIGH, HIGH]


def test_hysteresis_holds_soft_until_free_passes_the_high_threshold() -> None:
    # Entered SOFT below 4 %; 5 % and exactly 6 % are not enough to leave it.
    assert run([0.035, 0.05, 0.06, 0.0601]) == [SOFT, SOFT, SOFT, HIGH]


def test_hysteresis_holds_hard_until_free_passes_the_soft_threshold() -> None:
    assert run([0.015, 0.03, 0.04, 0.041, 0.05, 0.061]) == [HARD, HARD, HARD, SOFT, SOFT, HIGH]


def test_a_threshold_itself_does_not_count_as_below() -> None:
    assert run([0.04]) == [HIGH]
    assert run([0.02], start=SOFT) == [SOFT]
    assert run([0.01], start=HARD) == [HARD]


def test_flapping_around_a_threshold_does_not_flap_the_state() -> None:
    assert run([0.039, 0.041, 0.039, 0.041, 0.039]) == [SOFT] * 5


def test_custom_thresholds() -> None:
    t = StateThresholds(high=0.3, soft=0.2, hard=0.1, low=0.05)
    assert next_host_state(HIGH, 0.15, t) is SOFT
    assert next_host_state(SOFT, 0.25, t) is SOFT
    assert next_host_state(SOFT, 0.31, t) is HIGH


@pytest.mark.parametrize(
    "values",
    [(0.06, 0.04, 0.02, 0.0), (0.04, 0.06, 0.02, 0.01), (1.0, 0.04, 0.02, 0.01)],
)
def test_thresholds_must_be_ordered(values: tuple[float, float, float, float]) -> None:
    high, soft, hard, low = values
    with pytest.raises(ValueError, match="thresholds"):
        StateThresholds(high=high, soft=soft, hard=hard, low=low)


fractions = st.floats(0.0, 1.0, allow_nan=False)


@given(st.sampled_from(list(HostState)), fractions)
def test_never_climbs_more_than_one_state(previous: HostState, free: float) -> None:
    assert next_host_state(previous, free).rank >= previous.rank - 1


@given(st.sampled_from(list(HostState)), fractions)
def test_falls_to_the_level_free_memory_is_under(previous: HostState, free: float) -> None:
    level = LOW if free < 0.01 else HARD if free < 0.02 else SOFT if free < 0.04 else HIGH
    state = next_host_state(previous, free)
    if level.rank >= previous.rank:
        assert state is level
    else:
        assert level.rank <= state.rank < previous.rank or state is previous


@given(st.sampled_from(list(HostState)), fractions)
def test_constant_free_memory_settles_within_three_periods(start: HostState, free: float) -> None:
    states = run([free] * 5, start=start)
    assert states[3] == states[4]
