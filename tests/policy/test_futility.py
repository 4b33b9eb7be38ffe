"""Futility: a thrashing guest that more memory barely helped does not take memory
from a guest between two busy phases."""

from __future__ import annotations

import dataclasses

from balloonist.model import GuestView, MemoryPressure
from balloonist.policy.demand import DemandPolicy, stall_fraction
from balloonist.policy.futility import FUTILE_MEMORY_S, SETTLED_PERIODS, Futility
from balloonist.policy.loadcontrol import THRASH_PERIODS

from .snapshots import allocations_mib, guest, snapshot


def _held(name: str, held_mib: int, stall: float) -> GuestView:
    view = guest(name, memory_mib=400, allocated_mib=held_mib, working_set_mib=held_mib)
    return dataclasses.replace(view, pressure=MemoryPressure(1000.0, stall))


def _futile_after(futility: Futility, steps: list[tuple[int, float]]) -> bool:
    """Whether guest ``a`` is futile after one period at each (held MiB, stall)."""
    futile = frozenset[str]()
    for t, (held, stall) in enumerate(steps):
        view = _held("a", held, stall)
        futile = futility.update(float(t), [view], [stall_fraction(view)])
    return "a" in futile


def test_a_guest_that_thrashed_settled_at_far_more_is_futile() -> None:
    big = [(160, 0.9)] * (SETTLED_PERIODS + 1)
    assert _futile_after(Futility(), [*big, (100, 0.95)])
    # Not at a size near the one it was seen at, nor before it was seen big.
    assert not _futile_after(Futility(), [*big, (140, 0.95)])
    assert not _futile_after(Futility(), [(100, 0.95)] * 5)


def test_a_guest_never_seen_settled_is_not_futile_even_holding_nothing() -> None:
    # Its episode has no peak yet: 0 MiB is not "25 % more" than the 0 it holds.
    assert not _futile_after(Futility(), [(0, 0.9)])
    assert not _futile_after(Futility(), [(0, 0.9)] * 5)


def test_a_guest_that_worked_more_where_it_held_more_is_not_futile() -> None:
    # At 160 MiB it stalled 0.55 of its time: 40 % more work than at 100 MiB.
    assert not _futile_after(Futility(), [(160, 0.55)] * (SETTLED_PERIODS + 1) + [(100, 0.95)])


def test_a_size_held_while_squeezed_does_not_count() -> None:
    # Squeezed from 160 MiB in steps: the lagging stall at each size says nothing.
    squeezed = [(160 - 15 * k, 0.9) for k in range(5)]
    assert not _futile_after(Futility(), [*squeezed, (100, 0.95)])


def test_a_quiet_spell_ends_the_episode() -> None:
    big = [(160, 0.9)] * (SETTLED_PERIODS + 1)
    quiet = [(100, 0.0)] * THRASH_PERIODS
    assert not _futile_after(Futility(), big + quiet + [(100, 0.95)])


def test_what_a_guest_did_at_its_peak_is_forgotten_in_time() -> None:
    big = [(160, 0.9)] * (SETTLED_PERIODS + 1)
    assert _futile_after(Futility(), big + [(100, 0.95)] * int(FUTILE_MEMORY_S - 1))
    assert not _futile_after(Futility(), big + [(100, 0.95)] * int(FUTILE_MEMORY_S + 1))


def _idle_between_phases() -> GuestView:
    """A guest between two busy phases: its slow average still holds its 140 MiB set,
    its recent working set is empty."""
    view = guest("idle", memory_mib=400, allocated_mib=150, working_set_mib=140, shares=2000)
    return dataclasses.replace(view, recent_working_set_bytes=0)


def test_a_futile_guest_leaves_a_guest_between_phases_its_set() -> None:
    def decide(policy: DemandPolicy, time_s: float, held_mib: int) -> list[float]:
        views = (_idle_between_phases(), _held("uniform", held_mib, 0.95))
        return allocations_mib(policy.decide(snapshot(*views, host_mib=300, time_s=time_s)))

    seen = DemandPolicy()
    for t in range(SETTLED_PERIODS + 1):
        decide(seen, float(t), 200)  # it thrashed at 200 MiB...
    after = decide(seen, 10.0, 100)  # ...and now thrashes at 100
    fresh = decide(DemandPolicy(), 10.0, 100)
    # A guest whose stall answers memory takes the idle one's set (its recent working
    # set is empty); the futile one leaves it its slow average's set and headroom.
    assert fresh[0] < 140
    assert after[0] >= 140
    assert after[1] <= 150
