"""The simulated host: machine memory, host swap, one VMM and guest OS per guest.

``SimMachine`` is the simulator's adapter for the scheduler's ``Hypervisor`` port.
Each guest runs the real :class:`~balloonist.driver.BalloonDriver`, bound to the
simulated guest OS through ``SimGuestKernel`` and to its VMM through
``SimBalloonChannel``: the same driver code that runs in real guests.

Time within a period: the balloon drivers step once at its start (their page
allocation and any swapping it forces cost the guest time), then the period is cut
into slices. Before each slice the guests with free page reporting hand the host the
free pages they have held long enough, and the host grants each guest a cap on the
machine pages it may hold, so the caps never add up to more than host memory; within
the slice the guest's workload runs in the compiled loop until its time is used up.

A scenario with ``host.cpus`` also shares processors (``sim/cpu_balloon.py``): once
the memory slices are done, the guests' CPU balloons step and the host's processors
run the same period (``sim/cpu.py``). Memory and processors do not interact (a
guest's memory workload runs at its own pace whatever its vCPUs get), so the order
within the period changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from balloonist.driver import BalloonDriver, UnitRange
from balloonist.errors import GuestProtocolError, SimulationError, Violation
from balloonist.model import Decision, GuestSample, GuestSpec, HostReading
from balloonist.rate import AdaptiveRate, RateLimits
from balloonist.sim import engine as e
from balloonist.sim.cpu_balloon import SimCpus
from balloonist.sim.guest_memory import I64, GuestMemory, cost_table
from balloonist.sim.host_control import HostControl, Targets
from balloonist.sim.instant import InstantMover, MoveModel
from balloonist.sim.scenario import VIRTIO_MEM_BLOCK_PAGES, Scenario
from balloonist.units import PAGE_SIZE_BYTES, bytes_to_pages

#: A balloon allocation may spend at most this share of a driver period making the
#: guest swap before the guest OS reports failure (Linux's balloon allocates with
#: __GFP_NORETRY for the same reason: fail rather than stall the guest).
RECLAIM_BUDGET_FRACTION = 0.25


def _ranges_to_frames(ranges: Sequence[UnitRange]) -> I64:
    """Every frame of ``ranges``, in order (one numpy pass: a balloon holds many ranges)."""
    if not ranges:
        return np.empty(0, dtype=np.int64)
    starts = np.fromiter((r.start for r in ranges), dtype=np.int64, count=len(ranges))
    counts = np.fromiter((r.count for r in ranges), dtype=np.int64, count=len(ranges))
    # frame k of the output is its range's start plus k less the frames before that range
    before = np.cumsum(counts) - counts
    frames: I64 = np.repeat(starts - before, counts) + np.arange(int(counts.sum()))
    return frames


def _ranges_of(frames: I64) -> list[UnitRange]:
    """``ranges_from_units`` for a frame array: sorted, duplicates dropped, maximal runs."""
    if frames.size == 0:
        return []
    # Sorting and dropping repeats beats np.unique, which hashes first (a balloon
    # allocation is tens of thousands of frames, every period on a busy host).
    pages = np.sort(frames)
    pages = pages[np.concatenate(([True], pages[1:] != pages[:-1]))]
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = pages[np.concatenate(([0], breaks))].tolist()
    ends = pages[np.concatenate((breaks - 1, [pages.size - 1]))].tolist()
    return [UnitRange(start, end - start + 1) for start, end in zip(starts, ends, strict=True)]


class SimGuestKernel:
    """The driver's ``GuestKernel`` port onto the simulated guest OS."""

    def __init__(self, mem: GuestMemory, machine: SimMachine) -> None:
        self._mem = mem
        self._machine = machine

    def allocate_units(self, count: int) -> list[UnitRange]:
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
            m.stamp,
            m.oldest,
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

    def free_units(self, ranges: Sequence[UnitRange]) -> None:
        m = self._mem
        if e.balloon_free(_ranges_to_frames(ranges), m.st, m.p2v, m.free) < 0:
            raise SimulationError(f"{m.spec.name}: driver freed frames it did not hold")
        m.time_debt_s += m.costs[e.C_BALLOON_PAGE] * sum(r.count for r in ranges)


class SimBalloonChannel:
    """The driver's ``BalloonChannel`` port: the balloon register and the VMM."""

    def __init__(self, mem: GuestMemory, machine: SimMachine) -> None:
        self._mem = mem
        self._machine = machine

    def read_target_units(self) -> int:
        return self._mem.register_pages

    def report_locked(self, ranges: Sequence[UnitRange]) -> None:
        m = self._mem
        freed = e.vmm_reclaim(_ranges_to_frames(ranges), m.st, m.p2v, m.pstate, self._machine.host)
        if freed < 0:
            # The VMM checks every frame against its own map: a report is never trusted.
            raise GuestProtocolError(
                f"{m.spec.name}: balloon reported frames it does not hold",
                violation=Violation.BAD_PAGES,
            )

    def report_unlocked(self, ranges: Sequence[UnitRange]) -> None:
        m = self._mem
        frames = _ranges_to_frames(ranges)
        if frames.size and (
            frames.min() < 0 or frames.max() >= m.frames or np.any(m.p2v[frames] != e.BALLOON)
        ):
            raise GuestProtocolError(
                f"{m.spec.name}: balloon released frames it did not hold",
                violation=Violation.BAD_PAGES,
            )


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
        self.costs = cost_table(scenario.costs)
        self.guests = [
            GuestMemory(g, i, scenario.seed, self.costs) for i, g in enumerate(scenario.guests)
        ]
        kernel_total = sum(g.guest.kernel_pages for g in self.guests)
        if kernel_total > self.host_pages:
            raise SimulationError("the guests' kernels alone do not fit in host memory")
        self.host[e.H_FREE] = self.host_pages - kernel_total
        self._control = HostControl(self.guests, self.host, self.costs)
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
        self._targets = Targets.at_limits(
            self.limit_pages, np.array([m.frames for m in self.guests], dtype=np.int64)
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
            raise ValueError(f"{spec.name}: only min_cpus, max_cpus and cpu_shares may change")
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
        return driver.size_units

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
            rate = None if driver is None else driver.rate.step_units * per_period
            cpu = None if self.cpus is None else self.cpus.sample(m.spec.name)
            out.append(m.sample(rate, cpu, host_cappable=self.host_swap_pages > 0))
        return out

    def apply(self, decision: Decision) -> None:
        by_name = decision.by_name()
        alloc = self._targets.allocation_pages.copy()
        balloons = self._targets.balloon_pages.copy()
        capped = self._targets.host_capped.copy()
        for i, m in enumerate(self.guests):
            target = by_name.get(m.spec.name)
            if target is None:
                continue
            alloc[i] = bytes_to_pages(target.allocation_bytes)
            balloons[i] = bytes_to_pages(target.balloon_bytes)
            capped[i] = target.host_capped and self.host_swap_pages > 0
            if decision.mechanisms.balloon and m.spec.balloon:
                m.register_pages = _register_pages(m, bytes_to_pages(target.balloon_bytes))
        self._targets = Targets(alloc, decision.mechanisms, balloons, capped)
        if self.cpus is not None:
            self.cpus.apply(by_name)

    # -- time -------------------------------------------------------------------------

    def free_pages(self) -> int:
        return int(self.host[e.H_FREE])

    def limits_for(self, m: GuestMemory) -> I64:
        """(cap, min, reserve, pageable) for one guest, as the compiled loop takes them."""
        return self._control.limits(m.index)

    def advance(self, period_s: float) -> None:
        """Run every guest for one period of simulated time."""
        self._sample_window()
        self._enter_phases(self.time_s)
        self._set_limits()
        if self._mover is not None:
            self._mover.step(self._targets.balloon_pages, self.host, self._control.all_limits)
        for driver in self.drivers:
            if driver is not None:
                driver.step()
        slices = self.scenario.slices_per_period
        slice_s = period_s / slices
        n = len(self.guests)
        for k in range(slices):
            now = self.time_s + k * slice_s
            self._enter_phases(now)
            self._control.take_reported(now)
            blocked = self._set_limits()
            self._control.page_out(self._targets, slice_s, self._slice_start)
            # Rotate who runs first so no guest always gets first pick of free memory.
            self._slice_start = (self._slice_start + 1) % max(1, n)
            for j in range(n):
                i = (self._slice_start + j) % n
                m = self.guests[i]
                budget = slice_s - m.time_debt_s
                if blocked[i] or budget <= 0.0:
                    m.time_debt_s = max(0.0, m.time_debt_s - slice_s)
                    continue
                used = m.run(budget, self._control.limits(i), self.host, now)
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
                self._mover.discard_dead(i, m.phase_index, time_s)

    def _sample_window(self) -> None:
        """Close the working-set sampling window if it is over, and open the next.

        Like ESX, the VMM watches a few random pages for a whole window of several
        periods: a guest that is thrashing makes few references per second, and a
        one-period window would mistake it for an idle one.
        """
        every = self.scenario.ws_sample_periods
        if self._periods_run % every:
            return
        for m in self.guests:
            m.next_sample_window(self.scenario.ws_sample_pages)

    def _set_limits(self) -> npt.NDArray[np.bool_]:
        return self._control.set_limits(self._targets, self.limit_pages, self.min_pages)

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


def _register_pages(m: GuestMemory, balloon_pages: int) -> int:
    """What a guest's register asks for a balloon of ``balloon_pages``: never the
    frames its kernel holds; a virtio-mem guest unplugs whole blocks, so it keeps no
    more than it was asked to."""
    if m.guest.virtio_mem:
        balloon_pages = -(-balloon_pages // VIRTIO_MEM_BLOCK_PAGES) * VIRTIO_MEM_BLOCK_PAGES
    return min(balloon_pages, m.frames - m.guest.kernel_pages)
