"""The balloon driver: the patent's loop, written once against two ports.

    LOOP
        read the target balloon size from the balloon register
        IF target > size: allocate and pin pages through the guest OS, report them
        IF target < size: report pages as unlocked, then free them to the guest OS
        (the caller sleeps between steps)

``GuestKernel`` is how the driver gets pages from its OS (the simulator's guest, or
Linux through mmap/mlock in the agent); ``BalloonChannel`` is the register and the
report path to the VMM. Inflation is paced by :class:`~balloonist.rate.AdaptiveRate`:
a step that got fewer pages than it asked for counts as an allocation failure, cuts
the rate, and the driver waits for the next step so the guest OS can free memory.

Stdlib only: this module runs inside guests.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from balloonist.rate import AdaptiveRate


@dataclass(frozen=True)
class PageRange:
    """``count`` contiguous guest page frames starting at ``start``."""

    start: int
    count: int

    @property
    def end(self) -> int:
        return self.start + self.count


def ranges_from_pages(pages: Iterable[int]) -> list[PageRange]:
    """Collapse page frame numbers (duplicates ignored) into sorted, maximal contiguous ranges."""
    ranges: list[PageRange] = []
    run_start = run_end = -1
    for page in sorted(set(pages)):
        if page == run_end:
            run_end += 1
            continue
        if run_start >= 0:
            ranges.append(PageRange(run_start, run_end - run_start))
        run_start, run_end = page, page + 1
    if run_start >= 0:
        ranges.append(PageRange(run_start, run_end - run_start))
    return ranges


def count_pages(ranges: Iterable[PageRange]) -> int:
    return sum(r.count for r in ranges)


class GuestKernel(Protocol):
    """The guest OS's page allocator, as a driver sees it."""

    def allocate_pages(self, count: int) -> list[PageRange]:
        """Allocate and pin up to ``count`` pages; fewer means the OS could not (failure)."""
        ...

    def free_pages(self, ranges: Sequence[PageRange]) -> None:
        """Unpin and give the pages back to the OS."""
        ...


class BalloonChannel(Protocol):
    """The balloon register and the report path to the VMM."""

    def read_target_pages(self) -> int: ...

    def report_locked(self, ranges: Sequence[PageRange]) -> None: ...

    def report_unlocked(self, ranges: Sequence[PageRange]) -> None: ...


class Action(enum.Enum):
    IDLE = "idle"
    INFLATE = "inflate"
    DEFLATE = "deflate"


@dataclass(frozen=True)
class StepResult:
    action: Action
    target_pages: int
    size_pages: int  # balloon size after the step
    requested_pages: int
    moved_pages: int

    @property
    def failed(self) -> bool:
        return self.action is Action.INFLATE and self.moved_pages < self.requested_pages


#: Deflation is not paced by the rate controller: freeing pages cannot fail and costs the
#: guest nothing, and a guest that needs its memory back should not wait. It is still
#: bounded per step so one step never walks an unbounded list.
MAX_DEFLATE_PAGES_PER_STEP = 1 << 20


class BalloonDriver:
    def __init__(
        self, kernel: GuestKernel, channel: BalloonChannel, rate: AdaptiveRate | None = None
    ) -> None:
        self._kernel = kernel
        self._channel = channel
        self.rate = rate or AdaptiveRate()
        self._held: list[PageRange] = []  # a stack: deflate gives back the newest first
        self._size_pages = 0

    @property
    def size_pages(self) -> int:
        return self._size_pages

    @property
    def held(self) -> tuple[PageRange, ...]:
        return tuple(self._held)

    def step(self) -> StepResult:
        """One pass of the loop. Never sleeps; the caller owns time."""
        target = max(0, self._channel.read_target_pages())
        if target > self._size_pages:
            return self._inflate(target)
        if target < self._size_pages:
            return self._deflate(target)
        return StepResult(Action.IDLE, target, self._size_pages, 0, 0)

    def _inflate(self, target: int) -> StepResult:
        wanted = min(target - self._size_pages, self.rate.step_units)
        obtained = self._kernel.allocate_pages(wanted)
        got = count_pages(obtained)
        if got > wanted:  # a kernel port bug; never hold more than asked for
            raise RuntimeError(f"guest kernel returned {got} pages for a request of {wanted}")
        if obtained:
            self._channel.report_locked(obtained)
            self._held.extend(obtained)
            self._size_pages += got
        self.rate.record(requested=wanted, obtained=got)
        return StepResult(Action.INFLATE, target, self._size_pages, wanted, got)

    def _deflate(self, target: int) -> StepResult:
        wanted = min(self._size_pages - target, MAX_DEFLATE_PAGES_PER_STEP)
        released = self._pop(wanted)
        # Tell the VMM before the OS can reuse the pages (virtio's MUST_TELL_HOST order):
        # the host must stop treating them as reclaimed before the guest writes to them.
        self._channel.report_unlocked(released)
        self._kernel.free_pages(released)
        return StepResult(Action.DEFLATE, target, self._size_pages, wanted, wanted)

    def release_all(self) -> None:
        """Give every page back (driver unload, or a reset that drops all state)."""
        if self._size_pages:
            released = self._pop(self._size_pages)
            self._channel.report_unlocked(released)
            self._kernel.free_pages(released)

    def _pop(self, pages: int) -> list[PageRange]:
        released: list[PageRange] = []
        remaining = pages
        while remaining > 0:
            last = self._held[-1]
            if last.count <= remaining:
                self._held.pop()
                released.append(last)
                remaining -= last.count
            else:
                keep = last.count - remaining
                self._held[-1] = PageRange(last.start, keep)
                released.append(PageRange(last.start + keep, remaining))
                remaining = 0
        self._size_pages -= pages
        return released
