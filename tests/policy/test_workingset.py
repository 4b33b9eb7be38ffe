"""The working-set estimator: rises fast, falls slowly, stays within what it saw."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balloonist.policy.workingset import EstimateState, EstimatorParams, update_estimate
from balloonist.units import MIB

# Explicit half-lives, so the numbers below do not move when the defaults are tuned.
DEFAULTS = EstimatorParams(fast_halflife_s=5.0, slow_halflife_s=60.0)


def feed(
    start: EstimateState | None,
    observed_bytes: int,
    periods: int,
    period_s: float = 1.0,
    params: EstimatorParams = DEFAULTS,
) -> EstimateState:
    state = start
    for _ in range(periods):
        state = update_estimate(state, observed_bytes, period_s, params)
    assert state is not None
    return state


def test_first_observation_seeds_both_averages() -> None:
    state = update_estimate(None, 300 * MIB, 1.0, DEFAULTS)
    assert state == EstimateState(300 * MIB, 300 * MIB)
    assert state.estimate_bytes == 300 * MIB


def test_rises_to_half_within_the_fast_half_life() -> None:
    idle = update_estimate(None, 0, 1.0, DEFAULTS)
    after = feed(idle, 1000 * MIB, periods=5)  # 5 s = one fast half-life
    assert after.estimate_bytes == pytest.approx(500 * MIB, abs=1)
    assert after.fast_bytes > after.slow_bytes


def test_falls_to_half_only_after_the_slow_half_life() -> None:
    busy = update_estimate(None, 1000 * MIB, 1.0, DEFAULTS)
    assert feed(busy, 0, periods=5).estimate_bytes > 900 * MIB  # 5 s in: still ~94 %
    after = feed(busy, 0, periods=60)  # 60 s = one slow half-life
    assert after.estimate_bytes == pytest.approx(500 * MIB, abs=1)
    assert after.slow_bytes > after.fast_bytes


def test_rising_is_faster_than_falling() -> None:
    def periods_to_cross_half(start: int, target: int) -> int:
        state = update_estimate(None, start, 1.0, DEFAULTS)
        for n in range(1, 1000):
            state = update_estimate(state, target, 1.0, DEFAULTS)
            if abs(state.estimate_bytes - target) <= abs(start - target) / 2:
                return n
        raise AssertionError("never crossed")

    assert periods_to_cross_half(0, 1000 * MIB) == 5
    assert periods_to_cross_half(1000 * MIB, 0) == 60


def test_period_length_does_not_change_the_time_constant() -> None:
    idle = update_estimate(None, 0, 1.0, DEFAULTS)
    one_s = feed(idle, 1000 * MIB, periods=10, period_s=1.0)
    half_s = feed(idle, 1000 * MIB, periods=20, period_s=0.5)
    assert one_s.estimate_bytes == pytest.approx(half_s.estimate_bytes, abs=1)


def test_default_falls_slower_than_it_rises() -> None:
    params = EstimatorParams()
    assert params.fast_halflife_s < params.slow_halflife_s


@pytest.mark.parametrize(("fast", "slow"), [(0.0, 60.0), (10.0, 5.0), (-1.0, 60.0)])
def test_half_lives_must_be_positive_and_ordered(fast: float, slow: float) -> None:
    with pytest.raises(ValueError, match="half-lives"):
        EstimatorParams(fast_halflife_s=fast, slow_halflife_s=slow)


observations = st.lists(st.integers(0, 2**40), min_size=1, max_size=50)


@given(observations, st.sampled_from([0.1, 1.0, 5.0, 30.0]))
def test_estimate_stays_within_the_observations(seen: list[int], period_s: float) -> None:
    state = None
    for observed in seen:
        state = update_estimate(state, observed, period_s, DEFAULTS)
    assert state is not None
    assert min(seen) - 1 <= state.estimate_bytes <= max(seen) + 1


@given(st.integers(0, 2**40), st.integers(0, 2**40), st.integers(1, 200))
def test_estimate_moves_monotonically_towards_a_constant_input(
    start: int, target: int, periods: int
) -> None:
    state = update_estimate(None, start, 1.0, DEFAULTS)
    previous = state.estimate_bytes
    for _ in range(periods):
        state = update_estimate(state, target, 1.0, DEFAULTS)
        now = state.estimate_bytes
        if target >= start:
            assert previous <= now <= target
        else:
            assert target <= now <= previous
        previous = now
