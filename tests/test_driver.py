"""The balloon driver loop against fake ports: pacing, failure back-off, deflate order."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balloonist.driver import (
    Action,
    BalloonDriver,
    UnitRange,
    count_units,
    ranges_from_units,
)
from balloonist.rate import AdaptiveRate, RateLimits
from tests.fakes import FakeKernel


class FakeChannel:
    def __init__(self, target: int = 0) -> None:
        self.target = target
        self.locked: set[int] = set()
        self.events: list[str] = []

    def read_target_units(self) -> int:
        return self.target

    def report_locked(self, ranges: Sequence[UnitRange]) -> None:
        for r in ranges:
            pages = set(range(r.start, r.end))
            assert not pages & self.locked, "a page was reported locked twice"
            self.locked |= pages
        self.events.append("locked")

    def report_unlocked(self, ranges: Sequence[UnitRange]) -> None:
        for r in ranges:
            pages = set(range(r.start, r.end))
            assert pages <= self.locked, "unlocked a page that was never locked"
            self.locked -= pages
        self.events.append("unlocked")


LIMITS = RateLimits(min_units=10, max_units=100, increase_units=20, divisor=2.0)


def test_inflation_is_paced_by_the_rate_and_grows_on_success() -> None:
    kernel, channel = FakeKernel(1000), FakeChannel(target=500)
    driver = BalloonDriver(kernel, channel, AdaptiveRate(LIMITS))
    sizes = [driver.step().size_units for _ in range(5)]
    # 10, then +30, +50, +70, +90: the rate grows by 20 after every full step
    assert sizes == [10, 40, 90, 160, 250]
    assert kernel.calls == [10, 30, 50, 70, 90]
    assert len(channel.locked) == 250


def test_allocation_failure_divides_the_rate_and_retries_next_step() -> None:
    kernel, channel = FakeKernel(1000), FakeChannel(target=500)
    driver = BalloonDriver(kernel, channel, AdaptiveRate(LIMITS))
    for _ in range(4):
        driver.step()
    assert driver.rate.step_units == 90
    kernel.limit = 5  # the guest OS can only give 5 pages now
    result = driver.step()
    assert result.failed and result.moved_units == 5
    assert driver.rate.step_units == 45
    driver.step()
    assert driver.rate.step_units == 22
    kernel.limit = None
    result = driver.step()
    assert not result.failed and result.moved_units == 22


def test_rate_never_leaves_its_bounds() -> None:
    rate = AdaptiveRate(LIMITS)
    for _ in range(50):
        rate.on_success()
    assert rate.step_units == LIMITS.max_units
    for _ in range(50):
        rate.on_failure()
    assert rate.step_units == LIMITS.min_units


def test_deflate_tells_the_host_before_freeing_and_returns_newest_first() -> None:
    kernel, channel = FakeKernel(100), FakeChannel(target=30)
    driver = BalloonDriver(kernel, channel, AdaptiveRate(RateLimits(min_units=30, max_units=30)))
    driver.step()
    channel.target = 10
    result = driver.step()
    assert result.action is Action.DEFLATE and result.size_units == 10
    assert channel.events == ["locked", "unlocked"]
    assert driver.held == (UnitRange(0, 10),)
    assert channel.locked == set(range(10))


def test_idle_when_at_target() -> None:
    driver = BalloonDriver(FakeKernel(10), FakeChannel(target=0))
    assert driver.step().action is Action.IDLE


def test_release_all_returns_every_page() -> None:
    kernel, channel = FakeKernel(100), FakeChannel(target=50)
    driver = BalloonDriver(kernel, channel, AdaptiveRate(RateLimits(min_units=50, max_units=50)))
    driver.step()
    driver.release_all()
    assert driver.size_units == 0 and not channel.locked and len(kernel.free) == 100


def test_a_kernel_that_returns_too_much_is_a_bug() -> None:
    class Greedy(FakeKernel):
        def allocate_units(self, count: int) -> list[UnitRange]:
            return [UnitRange(0, count + 1)]

    driver = BalloonDriver(Greedy(100), FakeChannel(target=50))
    with pytest.raises(RuntimeError):
        driver.step()


@given(st.lists(st.integers(0, 5000), max_size=300))
def test_ranges_cover_exactly_the_pages(pages: list[int]) -> None:
    ranges = ranges_from_units(pages)
    covered = [p for r in ranges for p in range(r.start, r.end)]
    assert covered == sorted(set(pages))
    assert count_units(ranges) == len(set(pages))
    # maximal runs: consecutive ranges never touch
    assert all(a.end < b.start for a, b in itertools.pairwise(ranges))


@given(st.lists(st.integers(0, 400), min_size=1, max_size=40))
def test_any_sequence_of_targets_keeps_driver_and_host_in_agreement(targets: list[int]) -> None:
    kernel, channel = FakeKernel(400), FakeChannel()
    driver = BalloonDriver(kernel, channel, AdaptiveRate(LIMITS))
    for target in targets:
        channel.target = target
        driver.step()
        held = {p for r in driver.held for p in range(r.start, r.end)}
        assert held == channel.locked
        assert len(held) == driver.size_units
        assert not held & set(kernel.free)
