"""The adaptive (AIMD) rate: additive increase, multiplicative decrease, clamped."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balloonist.rate import AdaptiveRate, RateLimits, TokenBucket

SMALL = RateLimits(min_units=10, max_units=100, increase_units=30, divisor=2.0)


def rates_after(rate: AdaptiveRate, outcomes: str) -> list[int]:
    """Apply 's' (success) / 'f' (failure) steps; the rate after each."""
    out = []
    for outcome in outcomes:
        rate.on_success() if outcome == "s" else rate.on_failure()
        out.append(rate.step_units)
    return out


def test_starts_at_min() -> None:
    assert AdaptiveRate(SMALL).step_units == 10
    assert AdaptiveRate().step_units == RateLimits().min_units


def test_grows_additively_and_clamps_at_max() -> None:
    assert rates_after(AdaptiveRate(SMALL), "sssss") == [40, 70, 100, 100, 100]


def test_divides_on_failure_and_clamps_at_min() -> None:
    assert rates_after(AdaptiveRate(SMALL), "sssffff") == [40, 70, 100, 50, 25, 12, 10]


def test_recovers_additively_after_a_cut() -> None:
    assert rates_after(AdaptiveRate(SMALL), "sssfss") == [40, 70, 100, 50, 80, 100]


def test_record_classifies_steps() -> None:
    rate = AdaptiveRate(SMALL)
    rate.record(requested=10, obtained=10)
    assert (rate.step_units, rate.successes, rate.failures) == (40, 1, 0)
    rate.record(requested=40, obtained=39)  # short by one page: a failure
    assert (rate.step_units, rate.successes, rate.failures) == (20, 1, 1)
    rate.record(requested=0, obtained=0)  # nothing attempted: no news
    assert (rate.step_units, rate.successes, rate.failures) == (20, 1, 1)


def test_reset_returns_to_min_and_keeps_counters() -> None:
    rate = AdaptiveRate(SMALL)
    rates_after(rate, "sss")
    rate.reset()
    assert rate.step_units == 10
    assert rate.successes == 3


def test_default_limits_are_valid_and_ordered() -> None:
    limits = RateLimits()
    assert 1 <= limits.min_units <= limits.max_units
    assert limits.increase_units > 0
    assert limits.divisor > 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_units": 0}, "at least one unit"),
        ({"min_units": 10, "max_units": 5}, "below min"),
        ({"increase_units": -1}, "increase"),
        ({"divisor": 1.0}, "divisor"),
    ],
)
def test_bad_limits_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RateLimits(**kwargs)  # type: ignore[arg-type]


limits = st.builds(
    lambda lo, span, inc, div: RateLimits(lo, lo + span, inc, div),
    st.integers(1, 10_000),
    st.integers(0, 100_000),
    st.integers(0, 10_000),
    st.floats(1.01, 16.0),
)


@given(limits, st.lists(st.booleans(), max_size=200))
def test_rate_follows_aimd_within_bounds(lim: RateLimits, outcomes: list[bool]) -> None:
    rate = AdaptiveRate(lim)
    for success in outcomes:
        before = rate.step_units
        if success:
            rate.on_success()
            assert rate.step_units == min(lim.max_units, before + lim.increase_units)
        else:
            rate.on_failure()
            assert rate.step_units == max(lim.min_units, int(before / lim.divisor))
        assert lim.min_units <= rate.step_units <= lim.max_units
    assert rate.successes == sum(outcomes)
    assert rate.failures == len(outcomes) - sum(outcomes)


def test_a_token_bucket_refuses_when_empty_and_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate_per_s=2.0, burst=3, now_s=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.25)  # half a token
    assert bucket.take(0.5)
    assert bucket.take(100.0) and bucket.tokens == 2.0  # never above the burst
    bucket.refill(50.0)  # a clock that steps back adds nothing
    assert bucket.tokens == 2.0


def test_spending_a_token_bucket_may_take_it_below_zero() -> None:
    bucket = TokenBucket(rate_per_s=1.0, burst=1, now_s=0.0)
    bucket.spend()
    bucket.spend()
    assert bucket.tokens == -1.0
    assert not bucket.take(1.5)  # 0.5 after refilling
