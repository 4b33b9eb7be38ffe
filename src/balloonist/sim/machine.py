"""The simulated host: machine memory, host swap, one VMM and guest OS per guest.

``SimMachine`` is the simulator's adapter for the scheduler's ``Hypervisor`` port.
Each guest runs the real :class:`~balloonist.driver.BalloonDriver`, bound to the
simulated guest OS through ``SimGuestKernel`` and to its VMM through
``SimBalloonChannel``: the same driver code that runs in real guests.

Time within a period: the balloon drivers step once at its start (their page
allocation and any swapping it forces cost the guest time), then the period is cut
into slices. Before each slice the host grants each guest a cap on the machine pages
it may hold, so the caps never add up to more than host memory; within the slice
the guest's workload runs in the compiled loop until its time is used up.

A scenario with ``host.cpus`` also shares processors (``sim/cpu_balloon.py``): once
the memory slices are done, the guests' CPU balloons step and the host's processors
run the same period (``sim/cpu.py``). Memory and processors do not interact (a
guest's memory workload runs at its own pace whatever its vCPUs get), so the order
within the period changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from balloonist.driver import BalloonDriver, PageRange
from balloonist.errors import GuestProtocolError, SimulationError, Violation
from balloonist.model import Decision, GuestSample, GuestSpec, HostReading, Mechanisms
from balloonist.rate import AdaptiveRate, RateLimits
from balloonist.sim import engine as e
from balloonist.sim.cpu_balloon import SimCpus
from balloonist.sim.instant import InstantMover, MoveModel
from balloonist.sim.scenario import Scenario, SimGuest
from balloonist.sim.workload import Workload, WorkloadKind
from balloonist.units import PAGE_SIZE_BYTES, bytes_to_pages

I64 = npt.NDArray[np.int64]

#: A balloon allocation may spend at most this share of a driver period making the
#: guest swap before the guest OS reports failure (Linux's balloon allocates with
#: __GFP_NORETRY for the same reason: fail rather than stall the guest).
RECLAIM_BUDGET_FRACTION = 0.25


def _ranges_to_frames(ranges: Sequence[PageRange]) -> I64:
    """Every frame of ``ranges``, in order (one numpy pass: a balloon holds many ranges)."""
    if not ranges:
        return np.empty(0, dtype=np.int64)
    starts = np.fromiter((r.start for r in ranges), dtype=np.int64, count=len(ranges))
    counts = np.fromiter((r.count for r in ranges), dtype=np.int64, count=len(ranges))
    # frame k of the output is its range's start plus k less the frames before that range
    before = np.cumsum(counts) - counts
    frames: I64 = np.repeat(starts - before, counts) + np.arange(int(counts.sum()))
    return frames


def _ranges_of(frames: I64) -> list[PageRange]:
    """``ranges_from_pages`` for a frame array: sorted, duplicates dropped, maximal runs."""
    pages = np.unique(frames)
    if pages.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = pages[np.concatenate(([0], breaks))].tolist()
    ends = pages[np.concatenate((breaks - 1, [pages.size - 1]))].tolist()
    return [PageRange(start, end - start + 1) for start, end in zip(starts, ends, strict=True)]


class GuestMemory:
    """All per-page state of one simulated guest, plus its workload tables."""

    def __init__(self, guest: SimGuest, index: int, seed: int, costs: npt.NDArray[np.float64]):
        self.guest = guest
        self.spec = guest.spec
        frames = guest.memory_pages
        vpages = max(1, guest.plan.virtual_pages)
        self.frames = frames
        self.v2p = np.full(vpages, -1, dtype=np.int32)
        self.vswap = np.zeros(vpages, dtype=np.int8)
        self.p2v = np.full(frames, e.FREE, dtype=np.int32)
        self.pstate = np.zeros(frames, dtype=np.int8)
        self.prev = np.full(frames, -1, dtype=np.int32)
        self.nxt = np.full(frames, -1, dtype=np.int32)
        self.refbit = np.zeros(frames, dtype=np.int8)
        self.sampled = np.zeros(frames, dtype=np.int8)
        self.free = np.zeros(frames, dtype=np.int32)
        self.st = np.zeros(e.N_SCALARS, dtype=np.int64)
        self.st[e.S_HEAD] = -1
        self.st[e.S_TAIL] = -1
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

    def memory_stall_s(self) -> float:
        """Seconds this guest's workload has waited on memory so far, as PSI counts
        them: pages read back from its swap or the host's, the pages its own faults
        had to write out first (Linux counts direct reclaim as a memory stall), and
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
            + st[e.S_STALLED_NS] * 1e-9
        )

    def set_phase(self, time_s: float) -> bool:
        """Enter the phase of the plan that runs at ``time_s``; True if it changed."""
        index = 0
        for i, phase in enumerate(self.guest.plan.phases):
            if phase.at_s <= time_s:
                index = i
        if index != self._phase:
            self._phase = index
            self.workload = self.guest.plan.phases[index].workload
            self.st[e.S_SCAN_POS] = 0
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
            self.prev,
            self.nxt,
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


class SimGuestKernel:
    """The driver's ``GuestKernel`` port onto the simulated guest OS."""

    def __init__(self, mem: GuestMemory, machine: SimMachine) -> None:
        self._mem = mem
        self._machine = machine

    def allocate_pages(self, count: int) -> list[PageRange]:
        m = self._mem
        out = np.empty(count, dtype=np.int64)
        swap_outs_before = int(m.st[e.S_GUEST_SWAP_OUT])
        got, spent = e.balloon_allocate(
            count,
            RECLAIM_BUDGET_FRACTION * self._machine.period_s,
            out,
            m.st,
            m.v2p,
            m.vswap,
            m.p2v,
            m.pstate,
            m.prev,
            m.nxt,
            int(m.guest.replacement),
            m.rng,
            self._machine.host,
            self._machine.limits_for(m),
            m.guest.swap_pages,
            m.costs,
            m.free,
            m.refbit,
        )
        m.time_debt_s += spent
        m.balloon_swap_outs += int(m.st[e.S_GUEST_SWAP_OUT]) - swap_outs_before
        return _ranges_of(out[:got])

    def free_pages(self, ranges: Sequence[PageRange]) -> None:
        m = self._mem
        if e.balloon_free(_ranges_to_frames(ranges), m.st, m.p2v, m.free) < 0:
            raise SimulationError(f"{m.spec.name}: driver freed frames it did not hold")
        m.time_debt_s += m.costs[e.C_BALLOON_PAGE] * sum(r.count for r in ranges)


class SimBalloonChannel:
    """The driver's ``BalloonChannel`` port: the balloon register and the VMM."""

    def __init__(self, mem: GuestMemory, machine: SimMachine) -> None:
        self._mem = mem
        self._machine = machine

    def read_target_pages(self) -> int:
        return self._mem.register_pages

    def report_locked(self, ranges: Sequence[PageRange]) -> None:
        m = self._mem
        freed = e.vmm_reclaim(_ranges_to_frames(ranges), m.st, m.p2v, m.pstate, self._machine.host)
        if freed < 0:
            # The VMM checks every frame against its own map: a report is never trusted.
            raise GuestProtocolError(
                f"{m.spec.name}: balloon reported frames it does not hold",
                violation=Violation.BAD_PAGES,
            )

    def report_unlocked(self, ranges: Sequence[PageRange]) -> None:
        m = self._mem
        frames = _ranges_to_frames(ranges)
        if frames.size and (
            frames.min() < 0 or frames.max() >= m.frames or np.any(m.p2v[frames] != e.BALLOON)
        ):
            raise GuestProtocolError(
                f"{m.spec.name}: balloon released frames it did not hold",
                violation=Violation.BAD_PAGES,
            )


@dataclass
class _Targets:
    allocation_pages: I64
    mechanisms: Mechanisms
    #: What the instant mover balloons each guest to (every guest, driver or not).
    balloon_pages: I64


class SimMachine:
    """The simulated host. Implements the scheduler's ``Hypervisor`` port.

    ``moves`` is how balloons reach their targets: paced by each guest's balloon driver
    (the default), or instantly and for free (``sim/instant.py``: the oracle's bound).
    """

    def __init__(self, scenario: Scenario, *, moves: MoveModel = MoveModel.PACED) -> None:
        self.scenario = scenario
        self.period_s = scenario.period_s
        self.time_s = 0.0
        self.host_pages = bytes_to_pages(
            scenario.host_memory_bytes - scenario.host_memory_bytes % PAGE_SIZE_BYTES
        )
        self.host_swap_pages = scenario.host_swap_bytes // PAGE_SIZE_BYTES
        self.host = np.zeros(e.N_HOST, dtype=np.int64)
        self.host[e.H_SWAP_FREE] = self.host_swap_pages
        c = scenario.costs
        self.costs = np.array(
            [
                c.reference_s,
                c.guest_minor_fault_s,
                c.guest_swap_in_s,
                c.guest_swap_out_s,
                c.host_alloc_s,
                c.host_swap_in_s,
                c.host_swap_out_s,
                c.balloon_page_s,
            ],
            dtype=np.float64,
        )
        self.guests = [
            GuestMemory(g, i, scenario.seed, self.costs) for i, g in enumerate(scenario.guests)
        ]
        kernel_total = sum(g.guest.kernel_pages for g in self.guests)
        if kernel_total > self.host_pages:
            raise SimulationError("the guests' kernels alone do not fit in host memory")
        self.host[e.H_FREE] = self.host_pages - kernel_total
        self._lims = {id(m): np.zeros(4, dtype=np.int64) for m in self.guests}
        self.limit_pages = np.array(
            [bytes_to_pages(g.spec.limit_bytes) for g in self.guests], dtype=np.int64
        )
        # Where each cap is headed after a live change of max (see set_spec).
        self._limit_goal_pages = self.limit_pages.copy()
        self.min_pages = np.array(
            [bytes_to_pages(g.spec.min_bytes) for g in self.guests], dtype=np.int64
        )
        self.drivers: list[BalloonDriver | None] = [
            BalloonDriver(
                SimGuestKernel(m, self), SimBalloonChannel(m, self), AdaptiveRate(scenario.rate)
            )
            if m.spec.balloon and moves is MoveModel.PACED
            else None
            for m in self.guests
        ]
        self._mover = InstantMover(self.guests) if moves is MoveModel.INSTANT else None
        self._targets = _Targets(
            allocation_pages=self.limit_pages.copy(),
            mechanisms=Mechanisms(balloon=True),
            balloon_pages=np.array([m.frames for m in self.guests], dtype=np.int64)
            - self.limit_pages,
        )
        self._slice_start = 0
        self._periods_run = 0
        #: The host's processors and the guests' CPU balloons, if the scenario has them.
        self.cpus = SimCpus(scenario) if scenario.host_cpus is not None else None

    # -- live changes and restarts (the daemon over the simulator) ---------------------

    def _index(self, name: str) -> int:
        for i, m in enumerate(self.guests):
            if m.spec.name == name:
                return i
        raise KeyError(name)

    def set_spec(self, spec: GuestSpec) -> None:
        """Change a running guest's min, max or shares (its memory and balloon stay).

        A lower max is the balloon's to enforce: the policy's register never lets a
        guest keep more than its max. The host's cap on the guest's machine memory
        follows the new max down only as the guest's memory falls below it, so no
        guest is ever over its cap the moment its max changes.
        """
        i = self._index(spec.name)
        m = self.guests[i]
        same_cpus = (spec.cpu is None) == (m.spec.cpu is None) and (
            spec.cpu is None
            or m.spec.cpu is None
            or (spec.cpu.vcpus, spec.cpu.balloon) == (m.spec.cpu.vcpus, m.spec.cpu.balloon)
        )
        if spec.memory_bytes != m.spec.memory_bytes or spec.balloon != m.spec.balloon:
            raise ValueError(f"{spec.name}: only min, max and shares may change")
        if not same_cpus:
            raise ValueError(f"{spec.name}: only cpu_min, cpu_max and cpu_shares may change")
        m.spec = spec
        if self.cpus is not None:
            self.cpus.set_spec(spec)
        self.min_pages[i] = bytes_to_pages(spec.min_bytes)
        self._limit_goal_pages[i] = bytes_to_pages(spec.limit_bytes)
        self._follow_limit_goals()

    def _follow_limit_goals(self) -> None:
        for i, m in enumerate(self.guests):
            goal = int(self._limit_goal_pages[i])
            now = int(self.limit_pages[i])
            if goal < now:
                goal = max(goal, min(now, m.mapped_pages))
            self.limit_pages[i] = goal

    def restore_balloon(self, name: str, *, balloon_pages: int, register_pages: int) -> int:
        """Before the first period: start a guest with ``balloon_pages`` already in its
        balloon and ``register_pages`` in its register, as a daemon resuming a saved
        state does. Returns the balloon's size (what fits beside the guest's kernel).
        """
        if self._periods_run:
            raise SimulationError("a balloon can only be restored before the first period")
        i = self._index(name)
        m = self.guests[i]
        driver = self.drivers[i]
        if driver is None:
            return 0
        room = m.frames - m.guest.kernel_pages
        pages = max(0, min(balloon_pages, room))
        if pages:
            # A freshly booted guest has the pages free: one unpaced step takes them,
            # through the same driver, kernel and VMM paths as any inflation.
            m.register_pages = pages
            self._set_limits()
            rate = driver.rate
            driver.rate = AdaptiveRate(RateLimits(pages, pages, 0))
            try:
                driver.step()
            finally:
                driver.rate = rate
            m.time_debt_s = 0.0
        m.register_pages = max(0, min(register_pages, room))
        self.check_host()
        return driver.size_pages

    # -- the Hypervisor port ------------------------------------------------------------

    def specs(self) -> Sequence[GuestSpec]:
        return [m.spec for m in self.guests]

    def read_host(self) -> HostReading:
        return HostReading(
            time_s=self.time_s,
            memory_bytes=self.host_pages * PAGE_SIZE_BYTES,
            free_bytes=self.free_pages() * PAGE_SIZE_BYTES,
            swap_bytes=self.host_swap_pages * PAGE_SIZE_BYTES,
            swap_used_bytes=(self.host_swap_pages - int(self.host[e.H_SWAP_FREE]))
            * PAGE_SIZE_BYTES,
            cpus=self.scenario.host_cpus,
        )

    def sample_guests(self) -> Sequence[GuestSample]:
        out = []
        # A driver steps once a period: its rate is in pages per period.
        per_period = PAGE_SIZE_BYTES / self.period_s
        for m, driver in zip(self.guests, self.drivers, strict=True):
            observed = None
            if m.observed_pages is not None:
                observed = m.observed_pages * PAGE_SIZE_BYTES
                m.observed_pages = None
            so_far = None
            if m.sample_picked:
                touched = int(e.count_touched(m.sampled))
                so_far = round(touched / m.sample_picked * m.mapped_pages) * PAGE_SIZE_BYTES
            out.append(
                GuestSample(
                    name=m.spec.name,
                    allocated_bytes=m.mapped_pages * PAGE_SIZE_BYTES,
                    balloon_bytes=int(m.st[e.S_BALLOON]) * PAGE_SIZE_BYTES,
                    balloon_target_bytes=m.register_pages * PAGE_SIZE_BYTES,
                    active_bytes_observed=observed,
                    active_bytes_so_far=so_far,
                    free_bytes=int(m.st[e.S_NFREE]) * PAGE_SIZE_BYTES,
                    major_faults=int(m.st[e.S_MAJOR]),
                    memory_stall_s=m.memory_stall_s(),
                    inflate_rate_bytes_per_s=(
                        None if driver is None else driver.rate.rate_pages * per_period
                    ),
                    cpu=None if self.cpus is None else self.cpus.sample(m.spec.name),
                )
            )
        return out

    def apply(self, decision: Decision) -> None:
        by_name = decision.by_name()
        alloc = self._targets.allocation_pages.copy()
        balloons = self._targets.balloon_pages.copy()
        for i, m in enumerate(self.guests):
            target = by_name.get(m.spec.name)
            if target is None:
                continue
            alloc[i] = bytes_to_pages(target.allocation_bytes)
            balloons[i] = bytes_to_pages(target.balloon_bytes)
            if decision.mechanisms.balloon and m.spec.balloon:
                balloon_pages = bytes_to_pages(target.balloon_bytes)
                # The register can never ask for the frames the guest kernel holds.
                m.register_pages = min(balloon_pages, m.frames - m.guest.kernel_pages)
        self._targets = _Targets(alloc, decision.mechanisms, balloons)
        if self.cpus is not None:
            self.cpus.apply(by_name)

    # -- time -------------------------------------------------------------------------

    def free_pages(self) -> int:
        return int(self.host[e.H_FREE])

    def limits_for(self, m: GuestMemory) -> I64:
        """(cap, min, reserve, pageable) for one guest, as the compiled loop takes them."""
        return self._lims[id(m)]

    def advance(self, period_s: float) -> None:
        """Run every guest for one period of simulated time."""
        self._sample_window()
        self._enter_phases(self.time_s)
        self._set_limits()
        if self._mover is not None:
            self._mover.step(
                self._targets.balloon_pages, self.host, [self._lims[id(m)] for m in self.guests]
            )
        for driver in self.drivers:
            if driver is not None:
                driver.step()
        slices = self.scenario.slices_per_period
        slice_s = period_s / slices
        n = len(self.guests)
        for k in range(slices):
            now = self.time_s + k * slice_s
            self._enter_phases(now)
            blocked = self._set_limits()
            self._host_paging(slice_s)
            # Rotate who runs first so no guest always gets first pick of free memory.
            self._slice_start = (self._slice_start + 1) % max(1, n)
            for j in range(n):
                i = (self._slice_start + j) % n
                m = self.guests[i]
                budget = slice_s - m.time_debt_s
                if blocked[i] or budget <= 0.0:
                    m.time_debt_s = max(0.0, m.time_debt_s - slice_s)
                    continue
                used = m.run(budget, self._lims[id(m)], self.host, now)
                m.time_debt_s = max(0.0, used - budget)
        if self.cpus is not None:
            self.cpus.advance(self.time_s, period_s)
        self.time_s += period_s
        self._periods_run += 1
        self._follow_limit_goals()
        self.check_host()

    def _enter_phases(self, time_s: float) -> None:
        for i, m in enumerate(self.guests):
            if m.set_phase(time_s) and self._mover is not None:
                self._mover.discard_dead(i, m.phase_index)

    def _sample_window(self) -> None:
        """Close the working-set sampling window if it is over, and open the next.

        Like ESX, the VMM watches a few random pages for a whole window of several
        periods: a guest that is thrashing makes few references per second, and a
        one-period window would mistake it for an idle one.
        """
        every = self.scenario.ws_sample_periods
        if self._periods_run % every:
            return
        n = self.scenario.ws_sample_pages
        for m in self.guests:
            if m.sample_picked:
                touched = int(e.count_touched(m.sampled))
                m.observed_pages = round(touched / m.sample_picked * m.mapped_pages)
            m.sample_picked = int(e.mark_samples(n, m.st, m.pstate, m.p2v, m.sampled, m.rng))

    def _set_limits(self) -> npt.NDArray[np.bool_]:
        """Per guest: the most machine pages it may hold, its min, and the free pages
        kept back for the other guests still below their reservations.

        Free machine memory is one pool that guests draw from as they touch pages; the
        host enforces a guest's allocation target as its cap only while it is allowed
        to page (HARD and LOW states, or a policy with no balloon), and blocks guests
        above target in LOW. Returns which guests are blocked this slice.
        """
        t = self._targets
        mapped = np.array([m.mapped_pages for m in self.guests], dtype=np.int64)
        target = t.allocation_pages
        cap = np.where(self._pageable(), np.minimum(target, self.limit_pages), self.limit_pages)
        deficit = np.clip(self.min_pages - mapped, 0, None)
        reserve = int(deficit.sum()) - deficit
        swappable = self._pageable(emergency=True)
        for i, m in enumerate(self.guests):
            lim = self._lims[id(m)]
            lim[0] = cap[i]
            lim[1] = self.min_pages[i]
            lim[2] = reserve[i]
            lim[3] = swappable[i]
        blocked: npt.NDArray[np.bool_] = (mapped > target) & t.mechanisms.block_over_target
        return blocked

    def _pageable(self, *, emergency: bool = False) -> npt.NDArray[np.bool_]:
        """Which guests the host may page this period (see ``Mechanisms``): to enforce
        their targets, or, in an ``emergency`` (no free page for a guest that touches
        one), to make room. A plain Linux host swaps anyone in an emergency; with
        ``host_paging_ballooned`` off the host never swaps a guest its balloon serves,
        which then waits for memory instead (a per-VM cgroup limit would do this)."""
        mech = self._targets.mechanisms
        ballooned = np.array([m.spec.balloon and mech.balloon for m in self.guests], dtype=np.bool_)
        allowed = (emergency or mech.host_paging) & (mech.host_paging_ballooned | ~ballooned)
        pageable: npt.NDArray[np.bool_] = np.broadcast_to(allowed, ballooned.shape).copy()
        return pageable

    def _host_paging(self, slice_s: float) -> None:
        """Proactive host paging of guests above target, at the host swap's bandwidth.

        The bandwidth is shared in rotating order, so no guest is always paged first.
        """
        if not self._targets.mechanisms.host_paging:
            return
        swap_out_s = float(self.costs[e.C_HOST_SWAP_OUT])
        budget = int(slice_s / swap_out_s) if swap_out_s > 0 else 1 << 30
        n = len(self.guests)
        pageable = self._pageable()
        for j in range(n):
            i = (self._slice_start + j) % n
            m = self.guests[i]
            if not pageable[i]:
                continue
            excess = m.mapped_pages - int(self._targets.allocation_pages[i])
            if excess > 0 and budget > 0:
                done = int(
                    e.host_page_out(min(excess, budget), m.st, m.p2v, m.pstate, m.rng, self.host)
                )
                budget -= done

    def check_host(self) -> None:
        """Host-level invariants; cheap enough to run every period."""
        free = self.host_pages - sum(m.mapped_pages for m in self.guests)
        if free < 0:
            raise SimulationError(f"guests hold {-free} machine pages more than the host has")
        if free != self.free_pages():
            raise SimulationError("the host's free-page count disagrees with the guests' maps")
        swapped = sum(int(m.st[e.S_HOST_SWAPPED]) for m in self.guests)
        if swapped + int(self.host[e.H_SWAP_FREE]) != self.host_swap_pages:
            raise SimulationError("host swap accounting is off")
        for i, m in enumerate(self.guests):
            if m.mapped_pages > max(int(self.limit_pages[i]), m.guest.kernel_pages):
                raise SimulationError(f"{m.spec.name} holds more machine memory than its limit")
