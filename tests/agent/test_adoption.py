"""Adoption of pages held before a session: reported from the top down, within budget,
and never reported as known once popped while still unknown."""

from __future__ import annotations

from balloonist.agent.adoption import Adoption, merge
from balloonist.driver import UnitRange

# The driver's stack, bottom first: 10 + 5 + 20 pages.
HELD = [UnitRange(100, 10), UnitRange(500, 5), UnitRange(900, 20)]


def test_touching_ranges_merge_and_come_out_sorted() -> None:
    assert merge([UnitRange(10, 2), UnitRange(5, 5), UnitRange(20, 1)]) == [
        UnitRange(5, 7),
        UnitRange(20, 1),
    ]


def test_old_pages_are_adopted_from_the_top_down_a_budget_at_a_time() -> None:
    adoption = Adoption()
    adoption.begin(15)  # the bottom two ranges were held before the session
    assert adoption.next_batch(HELD, budget_ranges=1) == [UnitRange(500, 5)]
    assert adoption.unreported_pages == 10
    assert adoption.next_batch(HELD, budget_ranges=1) == [UnitRange(100, 10)]
    assert adoption.unreported_pages == 0
    assert adoption.next_batch(HELD, budget_ranges=5) == []


def test_a_range_across_the_mark_is_adopted_only_below_it() -> None:
    adoption = Adoption()
    adoption.begin(12)  # 10 pages of the first range and 2 of the second
    assert adoption.next_batch(HELD, budget_ranges=0) == []  # no budget, nothing sent
    # The lowest 2 pages of the second range, then the whole first one.
    assert adoption.next_batch(HELD, budget_ranges=4) == [UnitRange(100, 10), UnitRange(500, 2)]
    assert adoption.unreported_pages == 0


def test_popped_pages_the_host_never_heard_of_are_not_reported_as_known() -> None:
    adoption = Adoption()
    adoption.begin(15)
    # The driver pops the top 20 (known: pushed in this session) and 5 more: the
    # 5 were below the mark, so the host never heard of them.
    known, unknown = adoption.known_part([UnitRange(900, 20), UnitRange(500, 5)], 10)
    assert known == [UnitRange(900, 20)] and unknown == 5
    assert adoption.unreported_pages == 10
    # A split range: its upper 6 frames go, all below the mark, so all unknown.
    known, unknown = adoption.known_part([UnitRange(104, 6)], 4)
    assert known == [] and unknown == 6 and adoption.unreported_pages == 4


def test_a_popped_range_across_the_mark_is_known_only_above_it() -> None:
    adoption = Adoption()
    adoption.begin(12)  # the mark is 2 pages into the second range
    known, unknown = adoption.known_part([UnitRange(900, 20), UnitRange(500, 5)], 10)
    assert known == [UnitRange(900, 20), UnitRange(502, 3)] and unknown == 0
    assert adoption.unreported_pages == 10
