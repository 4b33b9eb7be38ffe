"""One simulated guest's memory: every page's state, its workload's tables, its phase.

The arrays are what the compiled loop (``sim/engine.py``) works on; this class owns
them and the per-guest figures the host reads between slices.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from balloonist.model import CpuSample, GuestSample, HostHeld
from balloonist.sim import engine as e
from balloonist.sim.scenario import Costs, SimGuest
from balloonist.sim.workload import Workload, WorkloadKind
from balloonist.units import PAGE_SIZE_BYTES

I64 = npt.NDArray[np.int64]


def cost_table(c: Costs) -> npt.NDArray[np.float64]:
    """The scenario's costs as the compiled loop indexes them (``engine.C_*``)."""
    table = np.zeros(e.N_COSTS, dtype=np.float64)
    table[e.C_REF] = c.reference_s
    table[e.C_MINOR] = c.guest_minor_fault_s
    table[e.C_SWAP_IN] = c.guest_swap_in_s
    table[e.C_SWAP_OUT] = c.guest_swap_out_s
    table[e.C_HOST_ALLOC] = c.host_alloc_s
    table[e.C_HOST_SWAP_IN] = c.host_swap_in_s
    table[e.C_HOST_SWAP_OUT] = c.host_swap_out_s
    table[e.C_BALLOON_PAGE] = c.balloon_page_s
    table[e.C_PAGE_REPORT] = c.free_page_report_s
    return table


class GuestMemory:
    """All per-page state of one simulated guest, plus its workload tables."""

    #: From how many pages in use the reference loop draws ahead and prefetches; only
    #: speed depends on it (see ``engine.run_guest``).
    draw_ahead_min_pages: int = e.DRAW_AHEAD_MIN_PAGES

    def __init__(self, guest: SimGuest, index: int, seed: int, costs: npt.NDArray[np.float64]):
        self.guest = guest
        self.spec = guest.spec
        self.index = index  # its place among the host's guests
        frames = guest.memory_pages
        vpages = max(1, guest.plan.virtual_pages)
        self.frames = frames
        self.v2p = np.full(vpages, -1, dtype=np.int32)
        self.vswap = np.zeros(vpages, dtype=np.int8)
        self.p2v = np.full(frames, e.FREE, dtype=np.int32)
        self.pstate = np.zeros(frames, dtype=np.int8)
        self.stamp, self.oldest = e.order_arrays(frames, int(guest.replacement))
        self.refbit = np.zeros(frames, dtype=np.int8)
        self.sampled = np.zeros(frames, dtype=np.int8)
        self.free = np.zeros(frames, dtype=np.int32)
        # Free page reporting: when each frame went free still backed (seconds), for
        # reporting guests only; the others carry an empty array and pay nothing.
        self.reporting_delay_s = guest.free_page_reporting_delay_s
        self.freed_at = np.zeros(frames if self.reporting_delay_s is not None else 0)
        self._report_pending = False  # frames went free backed since the last report
        self.st = np.zeros(e.N_SCALARS, dtype=np.int64)
        self.st[e.S_STAMP] = 1  # stamp 0 means "not in the resident order"
        # Seeded per guest so one guest's stream never depends on another's.
        mixed = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) % 2**64
        self.rng = np.array([mixed or 1], dtype=np.uint64)
        self.costs = costs
        # The kernel boots into the lowest frames and keeps them; the rest are free,
        # handed out lowest first, and not yet backed by machine memory.
        kernel = guest.kernel_pages
        self.p2v[:kernel] = e.KERNEL
        self.pstate[:kernel] = e.MAPPED
        self.st[e.S_MAPPED] = kernel
        free = np.arange(frames - 1, kernel - 1, -1, dtype=np.int32)
        self.free[: free.size] = free
        self.st[e.S_NFREE] = free.size
        self.register_pages = 0
        self.time_debt_s = 0.0
        self.balloon_swap_outs = 0  # pages written out to serve balloon allocations
        self.sample_picked = 0
        self.observed_pages: int | None = None  # set when a sampling window closes
        self._tables: dict[int, npt.NDArray[np.float64]] = {}
        self._phase = -1
        self.workload = guest.plan.phases[0].workload

    @property
    def phase_index(self) -> int:
        return self._phase

    @property
    def mapped_pages(self) -> int:
        return int(self.st[e.S_MAPPED])

    @property
    def reported_pages(self) -> int:
        """Machine pages free page reporting has returned to the host so far."""
        return int(self.st[e.S_REPORTED])

    def discard(self, ranges: Iterable[tuple[int, int]], time_s: float) -> int:
        """The guest frees virtual pages ``ranges`` ([start, end) each) at ``time_s``,
        as a process that frees its memory: their frames go on its free list, still
        backed, and their swap slots are released. Returns the frames freed."""
        freed = 0
        for start, end in ranges:
            freed += int(
                e.discard_pages(
                    start, end, self.st, self.v2p, self.vswap, self.p2v, self.stamp,
                    int(self.guest.replacement), self.free, self.freed_at, time_s,
                )
            )  # fmt: skip
        if freed and self.reporting_delay_s is not None:
            self._report_pending = True
        return freed

    def report_free_pages(self, host: I64, time_s: float) -> int:
        """Free page reporting at ``time_s``, a slice boundary: the guest reports the
        frames that have been free and backed for its delay, the host discards their
        memory, and the guest pays ``free_page_report_s`` each, as time debt (the
        reporting thread's work). Returns the frames reported; a guest without
        reporting, or with nothing freed since, reports nothing and costs nothing."""
        if self.reporting_delay_s is None or not self._report_pending:
            return 0
        reported, waiting = e.report_free_pages(
            time_s, self.reporting_delay_s, self.st, self.pstate, self.free, self.freed_at, host
        )
        self._report_pending = waiting > 0
        self.time_debt_s += reported * float(self.costs[e.C_PAGE_REPORT])
        return int(reported)

    def memory_stall_s(self) -> float:
        """Seconds this guest's workload has waited on memory so far, as PSI counts
        them: pages read back from its swap or the host's, the pages its own faults
        had to write out first, to its swap or the host's (Linux counts direct reclaim
        as a memory stall; a vCPU waits just the same for the host's), and
        the time it could not run at all for want of a frame or a machine page (a
        real guest would be thrashing or hung there). A first touch, served from
        zeroed memory, is no stall; nor are the writes the balloon's own allocations
        force, which the workload does not wait for."""
        st, c = self.st, self.costs
        reclaim = int(st[e.S_GUEST_SWAP_OUT]) - self.balloon_swap_outs
        return float(
            st[e.S_MAJOR] * c[e.C_SWAP_IN]
            + st[e.S_HOST_SWAP_IN] * c[e.C_HOST_SWAP_IN]
            + reclaim * c[e.C_SWAP_OUT]
            + st[e.S_HOST_RECLAIM] * c[e.C_HOST_SWAP_OUT]
            + st[e.S_STALLED_NS] * 1e-9
        )

    def next_sample_window(self, sample_pages: int) -> None:
        """Close the working-set sampling window (its estimate is then ready for the
        next sample) and pick ``sample_pages`` random pages to watch in the next."""
        if self.sample_picked:
            touched = int(e.count_touched(self.sampled))
            self.observed_pages = round(touched / self.sample_picked * self.mapped_pages)
        self.sample_picked = int(
            e.mark_samples(sample_pages, self.st, self.pstate, self.p2v, self.sampled, self.rng)
        )

    def sample(
        self,
        inflate_rate_bytes_per_s: float | None,
        cpu: CpuSample | None,
        *,
        host_cappable: bool = False,
    ) -> GuestSample:
        """What the host observes of the guest now; a closed window's estimate is
        handed over once. ``host_cappable``: the host has swap to page it with."""
        observed = None
        if self.observed_pages is not None:
            observed = self.observed_pages * PAGE_SIZE_BYTES
            self.observed_pages = None
        so_far = None
        if self.sample_picked:
            touched = int(e.count_touched(self.sampled))
            so_far = round(touched / self.sample_picked * self.mapped_pages) * PAGE_SIZE_BYTES
        return GuestSample(
            name=self.spec.name,
            allocated_bytes=self.mapped_pages * PAGE_SIZE_BYTES,
            balloon_bytes=int(self.st[e.S_BALLOON]) * PAGE_SIZE_BYTES,
            balloon_target_bytes=self.register_pages * PAGE_SIZE_BYTES,
            active_bytes_observed=observed,
            active_bytes_so_far=so_far,
            free_bytes=int(self.st[e.S_NFREE]) * PAGE_SIZE_BYTES,
            major_faults=int(self.st[e.S_MAJOR]),
            memory_stall_s=self.memory_stall_s(),
            inflate_rate_bytes_per_s=inflate_rate_bytes_per_s,
            cpu=cpu,
            host=self._host_held(),
            swap_used_bytes=int(self.st[e.S_SWAP_USED]) * PAGE_SIZE_BYTES,
            host_cappable=host_cappable,
        )

    def _host_held(self) -> HostHeld | None:
        """What the host holds for the guest, as a real host counts it, for a guest
        with free page reporting: its machine-backed frames (``allocated_bytes`` too;
        with reporting both fall below what the balloon leaves the guest). None for
        the others, whose samples stay as they were."""
        if self.reporting_delay_s is None:
            return None
        held = self.mapped_pages * PAGE_SIZE_BYTES
        return HostHeld(held_bytes=held, guest_ram_bytes=held)

    def set_phase(self, time_s: float) -> bool:
        """Enter the phase of the plan that runs at ``time_s``; True if it changed. A
        phase that ``frees`` drops every page outside its working set as it begins."""
        plan = self.guest.plan
        index = 0
        for i, phase in enumerate(plan.phases):
            if phase.at_s <= time_s:
                index = i
        if index != self._phase:
            self._phase = index
            self.workload = plan.phases[index].workload
            self.st[e.S_SCAN_POS] = 0
            if plan.phases[index].frees:
                self.discard(plan.freed_ranges(index), time_s)
            return True
        return False

    def tables(self) -> npt.NDArray[np.float64]:
        """The alias table for the current zipf phase (an empty one for other kinds)."""
        w = self.workload
        if w.kind is not WorkloadKind.ZIPF:
            return _EMPTY_TABLE
        cached = self._tables.get(self._phase)
        if cached is None:
            cached = zipf_alias(w)
            self._tables[self._phase] = cached
        return cached

    def active_pages(self, time_s: float) -> int:
        """How much of the current working set is in use at ``time_s``.

        A phase with ``ramp_s`` grows linearly from where the previous phase left off
        (nothing, for the first phase or one elsewhere in memory) to its full size.
        """
        w = self.workload
        if w.ramp_s <= 0.0:
            return w.working_set_pages
        phases = self.guest.plan.phases
        start_pages = 0
        if self._phase > 0:
            before = phases[self._phase - 1].workload
            if before.offset_pages == w.offset_pages:
                start_pages = min(before.working_set_pages, w.working_set_pages)
        fraction = min(1.0, max(0.0, (time_s - phases[self._phase].at_s) / w.ramp_s))
        return max(1, start_pages + int((w.working_set_pages - start_pages) * fraction))

    def run(self, budget_s: float, lim: I64, host: I64, time_s: float) -> float:
        w = self.workload
        alias = self.tables()
        used: float = e.run_guest(
            budget_s,
            lim,
            self.st,
            self.v2p,
            self.vswap,
            self.p2v,
            self.pstate,
            self.stamp,
            self.oldest,
            self.refbit,
            self.sampled,
            self.free,
            self.rng,
            host,
            self.costs,
            int(self.guest.replacement),
            self.guest.swap_pages,
            int(w.kind),
            w.working_set_pages,
            self.active_pages(time_s),
            w.offset_pages,
            alias,
            self.draw_ahead_min_pages,
        )
        return used


_EMPTY_TABLE = np.zeros((1, 2), dtype=np.float64)


def zipf_alias(w: Workload) -> npt.NDArray[np.float64]:
    """The zipf working set's alias table: per rank, (probability, alias rank).

    One row per rank so a draw reads one cache line, not one in each of two arrays;
    an alias rank is a whole number below 2**53, exact as a float.
    """
    ranks = np.arange(1, w.working_set_pages + 1, dtype=np.float64)
    weights = ranks**-w.skew
    prob = np.zeros(w.working_set_pages, dtype=np.float64)
    alias = np.zeros(w.working_set_pages, dtype=np.int64)
    e.build_alias(weights, prob, alias)
    table = np.empty((w.working_set_pages, 2), dtype=np.float64)
    table[:, 0] = prob
    table[:, 1] = alias
    return table


__all__ = ["I64", "GuestMemory", "cost_table", "zipf_alias"]
