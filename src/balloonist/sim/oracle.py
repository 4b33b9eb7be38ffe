"""The oracle: the best static allocation for the workloads running right now.

Used as the upper bound in experiments. The oracle is handed the scenario's guests, so
it knows each guest's workload plan, replacement algorithm and kernel size; at each
decision it takes the workloads active at the snapshot's time, turns them into
throughput curves with :mod:`balloonist.sim.mrc`, and picks the allocations that
maximise the guests' summed throughput (references per simulated second) within the
host's memory less a free target, by dynamic programming over a grid of sizes (a
guest's grid steps up from its floor -- reservation, and never below its kernel -- and
ends exactly at its limit or at its kernel plus whole working set, whichever is less).

What it bounds: every *allocation* decision a policy could make with perfect, instant
knowledge of each guest's miss-ratio curve -- no estimation lag, no sampling noise, no
guessing which phase comes next. A policy that beats it by more than transients
explain is a sign the simulator and the curves disagree.

What it is not: an upper bound on everything. It still pays the simulator's real
transitions: balloons inflate and deflate at the paced rate, a guest faults in its new
working set after a phase change, and the guest's own replacement algorithm picks the
victims. It also optimises steady state phase by phase, not the whole run (it will not,
say, pre-load a guest before its phase starts), and it weighs all guests equally,
ignoring shares. Throughput of a guest holding ``m`` resident workload pages is
modelled as ``1 / (reference_s + miss(m) * (guest_swap_in_s + guest_swap_out_s))``;
an idle guest has none and is left at its floor.

The host state and the working-set estimate in the snapshot are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from balloonist.errors import ConfigError
from balloonist.model import Decision, GuestTarget, Mechanisms, Snapshot
from balloonist.sim.mrc import miss_ratio_curve
from balloonist.sim.scenario import Costs, Replacement, SimGuest
from balloonist.sim.workload import Workload, WorkloadKind
from balloonist.units import MIB, PAGE_SIZE_BYTES, bytes_to_pages, pages_to_bytes

__all__ = [
    "DEFAULT_FREE_TARGET_FRACTION",
    "DEFAULT_GRANULARITY_BYTES",
    "OraclePolicy",
    "best_choices",
    "throughput_refs_per_s",
]

FloatArray = npt.NDArray[np.float64]

#: Grid step of the search: 512 steps on a 2 GiB host, small enough to find a working
#: set's edge to within 1 % of a typical guest, coarse enough to decide in milliseconds.
DEFAULT_GRANULARITY_BYTES: Final = 4 * MIB
#: Memory the oracle leaves free: ESX's "high" threshold, so the host stays in its
#: no-reclamation state while the balloons do all the work.
DEFAULT_FREE_TARGET_FRACTION: Final = 0.06
#: Relative tolerance under which two totals count as equal; the DP then prefers the
#: smaller allocation, so memory that buys nothing stays free.
_TIE_TOLERANCE: Final = 1e-9


@dataclass(frozen=True, eq=False)
class _Options:
    """One guest's choices: allocation ``floor + extra_pages[k]`` costs ``k`` grid steps."""

    floor_pages: int
    extra_pages: npt.NDArray[np.int64]
    throughput: FloatArray


def throughput_refs_per_s(
    workload: Workload,
    replacement: Replacement,
    costs: Costs,
    resident_pages: npt.ArrayLike,
) -> FloatArray:
    """Modelled steady-state throughput with ``resident_pages`` of the workload in memory."""
    curve = miss_ratio_curve(workload, resident_pages, replacement)
    if workload.kind is WorkloadKind.IDLE:
        return np.zeros_like(curve.miss_ratio)
    fault_s = costs.guest_swap_in_s + costs.guest_swap_out_s
    return 1.0 / (costs.reference_s + curve.miss_ratio * fault_s)


def best_choices(values: Sequence[FloatArray], capacity: int) -> tuple[tuple[int, ...], float]:
    """Pick one option per item, option ``k`` costing ``k`` units, to maximise the total.

    ``values[i][k]`` is item ``i``'s value with ``k`` units; any shape (non-concave,
    non-monotone). Returns the chosen ``k`` per item (their sum at most ``capacity``)
    and the total. Of near-equal totals the one with fewer units for the later items
    wins. Cost ``O(capacity * sum_i len(values[i]))``, vectorised per item.
    """
    if capacity < 0:
        raise ValueError(f"capacity must not be negative, got {capacity}")
    # best[c]: the highest total of the items so far using at most c units.
    best = np.zeros(capacity + 1)
    picks: list[npt.NDArray[np.intp]] = []
    for item in values:
        if len(item) == 0:
            raise ValueError("every item needs at least one option")
        top_k = min(len(item) - 1, capacity)
        padded = np.concatenate((np.full(top_k, -np.inf), best))
        # total[c, k] = best[c - k] + item[k]; -inf where k > c
        total = sliding_window_view(padded, top_k + 1)[:, ::-1] + item[: top_k + 1]
        top = total.max(axis=1)
        near = total >= (top - _TIE_TOLERANCE * np.maximum(np.abs(top), 1.0))[:, None]
        pick = np.argmax(near, axis=1)
        best = total[np.arange(capacity + 1), pick]
        picks.append(pick)
    chosen: list[int] = []
    left = capacity
    for pick in reversed(picks):
        k = int(pick[left])
        chosen.append(k)
        left -= k
    return tuple(reversed(chosen)), float(best[capacity])


class OraclePolicy:
    """Allocations that maximise modelled total throughput, from the workloads themselves."""

    def __init__(
        self,
        guests: Sequence[SimGuest],
        costs: Costs,
        *,
        granularity_bytes: int = DEFAULT_GRANULARITY_BYTES,
        free_target_fraction: float = DEFAULT_FREE_TARGET_FRACTION,
    ) -> None:
        where = "policy oracle"
        if granularity_bytes <= 0:
            raise ConfigError(f"granularity must be positive, got {granularity_bytes}", where=where)
        self._step_pages = bytes_to_pages(granularity_bytes)  # SizeError if not whole pages
        if not 0.0 <= free_target_fraction < 1.0:
            raise ConfigError(
                f"free target fraction must be in [0, 1), got {free_target_fraction}", where=where
            )
        self._free_target_fraction = free_target_fraction
        self._costs = costs
        self._guests: dict[str, SimGuest] = {}
        for guest in guests:
            if guest.name in self._guests:
                raise ConfigError(f"duplicate guest name {guest.name!r}", where=where)
            self._guests[guest.name] = guest
        # Phases change only at given times, so decisions and per-guest curves repeat.
        self._decisions: dict[tuple[int, tuple[Workload, ...]], Decision] = {}
        self._options: dict[tuple[str, Workload, int], _Options] = {}

    @property
    def name(self) -> str:
        return "oracle"

    def decide(self, snapshot: Snapshot) -> Decision:
        for view in snapshot.guests:
            if view.name not in self._guests:
                raise ConfigError(
                    f"snapshot has guest {view.name!r}, which the oracle was not given",
                    where="policy oracle",
                )
        # Plan for every guest, even one missing from this snapshot: it still holds
        # memory, and leaving it out would hand that memory to the others twice.
        guests = tuple(self._guests.values())
        workloads = tuple(g.plan.at(snapshot.time_s) for g in guests)
        key = (snapshot.host.memory_bytes, workloads)
        plan = self._decisions.get(key)
        if plan is None:
            plan = self._solve(snapshot.host.memory_bytes, guests, workloads)
            self._decisions[key] = plan
        present = {view.name for view in snapshot.guests}
        if len(present) == len(plan.targets):
            return plan
        return Decision(
            targets=tuple(t for t in plan.targets if t.name in present),
            mechanisms=plan.mechanisms,
        )

    def _solve(
        self, host_memory_bytes: int, guests: Sequence[SimGuest], workloads: Sequence[Workload]
    ) -> Decision:
        host_pages = host_memory_bytes // PAGE_SIZE_BYTES
        budget_pages = int(host_memory_bytes * (1.0 - self._free_target_fraction)) // (
            PAGE_SIZE_BYTES
        )
        floors = [_floor_pages(g) for g in guests]
        if sum(floors) > budget_pages:
            # Kernels do not all fit under the free target: fall back to the reservations
            # alone, and let them eat into the free target if they must.
            floors = [min(_min_pages(g), _limit_pages(g)) for g in guests]
            if sum(floors) > host_pages:
                raise ConfigError(
                    "the guests' reservations add up to more than host memory",
                    where="policy oracle",
                )
            budget_pages = max(budget_pages, sum(floors))
        options = [
            self._guest_options(g, w, floor)
            for g, w, floor in zip(guests, workloads, floors, strict=True)
        ]
        capacity = min(
            (budget_pages - sum(floors)) // self._step_pages,
            sum(len(o.extra_pages) - 1 for o in options),
        )
        choices, _ = best_choices([o.throughput for o in options], capacity)
        targets = []
        for guest, option, k in zip(guests, options, choices, strict=True):
            allocation_bytes = pages_to_bytes(option.floor_pages + int(option.extra_pages[k]))
            targets.append(
                GuestTarget(
                    name=guest.name,
                    allocation_bytes=allocation_bytes,
                    balloon_bytes=guest.spec.memory_bytes - allocation_bytes,
                )
            )
        return Decision(
            targets=tuple(targets),
            mechanisms=Mechanisms(balloon=True, host_paging=False, block_over_target=False),
        )

    def _guest_options(self, guest: SimGuest, workload: Workload, floor_pages: int) -> _Options:
        key = (guest.name, workload, floor_pages)
        cached = self._options.get(key)
        if cached is not None:
            return cached
        demand_pages = 0 if workload.kind is WorkloadKind.IDLE else workload.working_set_pages
        # Memory past the whole working set buys nothing, so the grid stops there.
        top_pages = max(floor_pages, min(_limit_pages(guest), guest.kernel_pages + demand_pages))
        span_pages = top_pages - floor_pages
        steps = -(-span_pages // self._step_pages)  # ceil: the last step may be partial
        extra = np.minimum(np.arange(steps + 1, dtype=np.int64) * self._step_pages, span_pages)
        resident = np.maximum(floor_pages + extra - guest.kernel_pages, 0)
        throughput = throughput_refs_per_s(workload, guest.replacement, self._costs, resident)
        options = _Options(floor_pages, extra, throughput)
        self._options[key] = options
        return options


def _min_pages(guest: SimGuest) -> int:
    return -(-guest.spec.min_bytes // PAGE_SIZE_BYTES)  # a reservation rounds up


def _limit_pages(guest: SimGuest) -> int:
    return guest.spec.limit_bytes // PAGE_SIZE_BYTES  # a limit rounds down


def _floor_pages(guest: SimGuest) -> int:
    """The least a guest can hold: its reservation, and never less than its kernel."""
    return min(max(_min_pages(guest), guest.kernel_pages), _limit_pages(guest))
