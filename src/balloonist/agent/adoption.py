"""Pages the balloon held before a session began, and which of them the host knows.

After ``welcome`` the agent reports every page it still holds as ``locked`` (the
protocol's rule 4), a budget's worth a step. Until then those pages sit at the bottom
of the driver's stack, unknown to the host; they are reported from the top down, so
deflation (which pops the top) meets known pages first. Pure bookkeeping over the
driver's stack. Stdlib only, Python 3.9.
"""

from __future__ import annotations

from collections.abc import Sequence

from balloonist.driver import UnitRange, count_units


def merge(ranges: list[UnitRange]) -> list[UnitRange]:
    """Sorted, with touching ranges joined (fewer ranges, fewer messages)."""
    merged: list[UnitRange] = []
    for r in sorted(ranges, key=lambda r: r.start):
        if merged and merged[-1].end == r.start:
            merged[-1] = UnitRange(merged[-1].start, merged[-1].count + r.count)
        else:
            merged.append(r)
    return merged


class Adoption:
    """The bottom ``unreported_pages`` of the driver's stack: held, unknown to the host."""

    def __init__(self) -> None:
        self.unreported_pages = 0

    def begin(self, size_pages: int) -> None:
        """A new session: the host knows none of what the balloon holds."""
        self.unreported_pages = size_pages

    def known_part(
        self, released: Sequence[UnitRange], size_after_pages: int
    ) -> tuple[list[UnitRange], int]:
        """The part of pages just popped off the stack that the host knows, and how
        many popped pages it never heard of.

        The driver pops from the top (newest first) and, splitting a range, releases
        its upper frames; ``size_after_pages`` is the stack's size after the pop.
        """
        unreported = self.unreported_pages
        top = size_after_pages + count_units(released)
        known: list[UnitRange] = []
        unknown_pages = 0
        for r in released:
            bottom = top - r.count
            if top > unreported:
                skip = max(0, unreported - bottom)  # the lowest ``skip`` frames: unknown
                known.append(UnitRange(r.start + skip, r.count - skip))
            else:
                unknown_pages += r.count
            top = bottom
        self.unreported_pages = min(unreported, size_after_pages)
        return known, unknown_pages

    def next_batch(self, held: Sequence[UnitRange], budget_ranges: int) -> list[UnitRange]:
        """Up to ``budget_ranges`` of the unknown pages, from the top down, now taken
        as known (the caller reports them as ``locked``)."""
        if not self.unreported_pages or not budget_ranges:
            return []
        below: list[tuple[int, UnitRange]] = []  # (stack position, range) under the mark
        position = 0
        for r in held:
            if position >= self.unreported_pages:
                break
            below.append((position, r))
            position += r.count
        adopted: list[UnitRange] = []
        for position, r in reversed(below):
            if len(adopted) == budget_ranges:
                break
            count = min(r.count, self.unreported_pages - position)
            adopted.append(UnitRange(r.start, count))
            self.unreported_pages = position
        return merge(adopted)
