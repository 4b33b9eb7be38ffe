"""Workload descriptions: which guest pages a workload references, and when.

A guest's workload is a plan of phases; a plain workload is a plan with one phase at
time 0. The reference generators themselves run inside the simulator's compiled loop
(:mod:`balloonist.sim.engine`); this module only describes them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class WorkloadKind(enum.IntEnum):
    """Codes shared with the compiled loop; do not renumber."""

    IDLE = 0  # references nothing
    UNIFORM = 1  # every page of the working set equally likely
    ZIPF = 2  # page of rank r with probability ~ 1 / r**skew
    SCAN = 3  # sequential sweeps over the working set (LRU's worst case)


@dataclass(frozen=True)
class Workload:
    kind: WorkloadKind
    working_set_pages: int = 0
    skew: float = 1.0  # zipf only
    offset_pages: int = 0  # where the working set starts in the guest's virtual pages
    ramp_s: float = 0.0  # grow linearly to the full working set over this long

    @property
    def end_pages(self) -> int:
        return self.offset_pages + self.working_set_pages


@dataclass(frozen=True)
class Phase:
    at_s: float
    workload: Workload
    #: When the phase begins, the guest frees every page outside its working set, as
    #: a process that exits or shrinks its heap does (``WorkloadPlan.freed_ranges``).
    frees: bool = False


@dataclass(frozen=True)
class WorkloadPlan:
    phases: tuple[Phase, ...]

    def __post_init__(self) -> None:
        if not self.phases or self.phases[0].at_s != 0.0:
            raise ValueError("a workload plan must start with a phase at 0 s")
        times = [p.at_s for p in self.phases]
        if times != sorted(times) or len(set(times)) != len(times):
            raise ValueError("workload phases must be in strictly increasing time order")

    @classmethod
    def single(cls, workload: Workload) -> WorkloadPlan:
        return cls((Phase(0.0, workload),))

    @property
    def virtual_pages(self) -> int:
        """Size of the guest's virtual page space the plan touches."""
        return max(p.workload.end_pages for p in self.phases)

    def dead_ranges(self, index: int) -> list[tuple[int, int]]:
        """The virtual pages no phase from ``index`` on references, as [start, end)
        ranges: what the plan will never touch again once phase ``index`` begins."""
        live = sorted(
            (p.workload.offset_pages, p.workload.end_pages)
            for p in self.phases[index:]
            if p.workload.kind is not WorkloadKind.IDLE and p.workload.working_set_pages > 0
        )
        dead: list[tuple[int, int]] = []
        at = 0
        for start, end in live:
            if start > at:
                dead.append((at, start))
            at = max(at, end)
        if at < self.virtual_pages:
            dead.append((at, self.virtual_pages))
        return dead

    def freed_ranges(self, index: int) -> list[tuple[int, int]]:
        """The virtual pages outside phase ``index``'s working set, as [start, end)
        ranges: what the guest frees when that phase begins, if it ``frees``. An idle
        phase keeps its ``working_set`` (a process that holds memory it does not use).
        """
        w = self.phases[index].workload
        ranges = [(0, w.offset_pages), (w.end_pages, self.virtual_pages)]
        return [(start, end) for start, end in ranges if start < end]

    def at(self, time_s: float) -> Workload:
        current = self.phases[0].workload
        for phase in self.phases:
            if phase.at_s <= time_s:
                current = phase.workload
        return current

    def active_pages_at(self, time_s: float) -> int:
        """How much of the working set at ``time_s`` is in use (0 when idle).

        A phase with ``ramp_s`` grows linearly from where the previous phase left off
        (nothing, for the first phase or one elsewhere in memory) to its full size; the
        simulator's guests grow the same way (``GuestMemory.active_pages``).
        """
        index = 0
        for i, phase in enumerate(self.phases):
            if phase.at_s <= time_s:
                index = i
        w = self.phases[index].workload
        if w.kind is WorkloadKind.IDLE:
            return 0
        if w.ramp_s <= 0.0:
            return w.working_set_pages
        start_pages = 0
        if index > 0:
            before = self.phases[index - 1].workload
            if before.offset_pages == w.offset_pages:
                start_pages = min(before.working_set_pages, w.working_set_pages)
        fraction = min(1.0, max(0.0, (time_s - self.phases[index].at_s) / w.ramp_s))
        return max(1, start_pages + int((w.working_set_pages - start_pages) * fraction))
