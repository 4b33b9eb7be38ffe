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

The same loop serves the CPU balloon (the patent's claims 11 and 19), where what the
driver holds is vCPUs taken offline, so it counts in *units*: a unit is a page frame
for a memory balloon and a vCPU for a CPU balloon; the port that binds a driver says
which.

Stdlib only: this module runs inside guests.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from balloonist.rate import AdaptiveRate


@dataclass(frozen=True)
class UnitRange:
    """``count`` contiguous units (page frames, or vCPU numbers) starting at ``start``."""

    start: int
    count: int

    @property
    def end(self) -> int:
        return self.start + self.count


def ranges_from_units(units: Iterable[int]) -> list[UnitRange]:
    """Collapse unit numbers (duplicates ignored) into sorted, maximal contiguous ranges."""
    ranges: list[UnitRange] = []
    run_start = run_end = -1
    for unit in sorted(set(units)):
        if unit == run_end:
            run_end += 1
            continue
        if run_start >= 0:
            ranges.append(UnitRange(run_start, run_end - run_start))
        run_start, run_end = unit, unit + 1
    if run_start >= 0:
        ranges.append(UnitRange(run_start, run_end - run_start))
    return ranges


def count_units(ranges: Iterable[UnitRange]) -> int:
    return sum(r.count for r in ranges)


class GuestKernel(Protocol):
    """The guest OS's allocator of the driver's unit (its page allocator, or its CPU
    hotplug), as a driver sees it."""

    def allocate_units(self, count: int) -> list[UnitRange]:
        """Allocate and pin up to ``count`` units; fewer means the OS could not (failure)."""
        ...

    def free_units(self, ranges: Sequence[UnitRange]) -> None:
        """Unpin and give the units back to the OS."""
        ...


class BalloonChannel(Protocol):
    """The balloon register and the report path to the VMM."""

    def read_target_units(self) -> int: ...

    def report_locked(self, ranges: Sequence[UnitRange]) -> None: ...

    def report_unlocked(self, ranges: Sequence[UnitRange]) -> None: ...


class Action(enum.Enum):
    IDLE = "idle"
    INFLATE = "inflate"
    DEFLATE = "deflate"


@dataclass(frozen=True)
class StepResult:
    action: Action
    target_units: int
    size_units: int  # balloon size after the step
    requested_units: int
    moved_units: int

    @property
    def failed(self) -> bool:
        return self.action is Action.INFLATE and self.moved_units < self.requested_units


#: Deflation is not paced by the rate controller: freeing units cannot fail and costs the
#: guest nothing, and a guest that needs its memory back should not wait. It is still
#: bounded per step so one step never walks an unbounded list.
MAX_DEFLATE_UNITS_PER_STEP = 1 << 20


class BalloonDriver:
    def __init__(
        self, kernel: GuestKernel, channel: BalloonChannel, rate: AdaptiveRate | None = None
    ) -> None:
        self._kernel = kernel
        self._channel = channel
        self.rate = rate or AdaptiveRate()
        self._held: list[UnitRange] = []  # a stack: deflate gives back the newest first
        self._size_units = 0

    @property
    def size_units(self) -> int:
        return self._size_units

    @property
    def held(self) -> tuple[UnitRange, ...]:
        return tuple(self._held)

    def step(self) -> StepResult:
        """One pass of the loop. Never sleeps; the caller owns time."""
        target = max(0, self._channel.read_target_units())
        if target > self._size_units:
            return self._inflate(target)
        if target < self._size_units:
            return self._deflate(target)
        return StepResult(Action.IDLE, target, self._size_units, 0, 0)

    def _inflate(self, target: int) -> StepResult:
        wanted = min(target - self._size_units, self.rate.step_units)
        obtained = self._kernel.allocate_units(wanted)
        got = count_units(obtained)
        if got > wanted:  # a kernel port bug; never hold more than asked for
            raise RuntimeError(f"guest kernel returned {got} pages for a request of {wanted}")
        if obtained:
            self._channel.report_locked(obtained)
            self._held.extend(obtained)
            self._size_units += got
        self.rate.record(requested=wanted, obtained=got)
        return StepResult(Action.INFLATE, target, self._size_units, wanted, got)

    def _deflate(self, target: int) -> StepResult:
        wanted = min(self._size_units - target, MAX_DEFLATE_UNITS_PER_STEP)
        released = self._pop(wanted)
        # Tell the VMM before the OS can reuse the pages (virtio's MUST_TELL_HOST order):
        # the host must stop treating them as reclaimed before the guest writes to them.
        self._channel.report_unlocked(released)
        self._kernel.free_units(released)
        return StepResult(Action.DEFLATE, target, self._size_units, wanted, wanted)

    def release_all(self) -> None:
        """Give every unit back (driver unload, or a reset that drops all state)."""
        if self._size_units:
            released = self._pop(self._size_units)
            self._channel.report_unlocked(released)
            self._kernel.free_units(released)

    def _pop(self, units: int) -> list[UnitRange]:
        released: list[UnitRange] = []
        remaining = units
        while remaining > 0:
            last = self._held[-1]
            if last.count <= remaining:
                self._held.pop()
                released.append(last)
                remaining -= last.count
            else:
                keep = last.count - remaining
                self._held[-1] = UnitRange(last.start, keep)
                released.append(UnitRange(last.start + keep, remaining))
                remaining = 0
        self._size_units -= units
        return released
