"""The oracle: an upper bound on what any policy can get out of the simulated host.

It knows the whole schedule -- every guest's workload plan, ramps included -- and each
guest's exact miss-ratio curve for its own replacement algorithm
(:mod:`balloonist.sim.curves`: analytic where that is exact, measured on the engine's
reference stream where it is not). It runs in the simulator's instant move mode
(``MoveModel.INSTANT``): each period's allocation is applied at once and for free,
every guest has a balloon, and the whole host may be given out (no free target).

Each period it picks the allocations that maximise the guests' summed modelled
throughput over that period and the ``LOOKAHEAD_S`` after it -- the mean over the
period's slices and one sample a period ahead, with the workload and active
working-set size each runs with -- by dynamic programming over a grid of sizes
(``host / GRID_STEPS`` apart), then tops up with what the grid's rounding left. A
guest holding ``m`` resident workload pages makes
``1 / (reference_s + miss(m) * (guest_swap_in_s + guest_swap_out_s))`` references per
second in steady state: every miss swaps one page in and evicts one. Memory that
would raise no guest's steady-state throughput is still given out (first to the
guests already holding it): it spares evictions when a working set moves. A size
above what a guest holds is charged the time it takes to read its set back from its
swap (``Refill``): the steady state values a set held and one to be faulted back alike.
Taking pages from a guest that will read them again only after the look-ahead (an
idle guest that wakes later) is charged that read, spread over the time until it
wakes (``Lending``).

A guest may instead be left without a balloon and capped by the host, which pages it
at random (``CurveBook.host_miss_ratio``, at the host's swap costs), where its own
memory holds its working set. That can be worth more than a balloon: random victims
keep part of a scan where the guest's own algorithm keeps none, and they take the
kernel's pages too, which the workload never faults back, so the whole allocation
ends up holding the workload. A bound must be able to do whatever a policy such as
``host-swap`` or ``proxmox`` does, so each period the oracle takes, for each guest its
scope allows (``HostPaging``: only a guest that can never hold its set ballooned, or
any) and size, whichever way models higher over the period itself. The steady state
misses host paging's transient, so the runner runs the schedule under each scope,
the balloon-only one included, and keeps the best (``sim/runner.py``). A wider scope
follows the narrower one's plan in a period where it would host-page no guest the
narrower one may not.

``oracle-fair`` is the same with the sharing rule as a constraint: no guest's modelled
throughput in any period falls below ``FAIR_FRACTION`` of what it would make with the
``static`` policy's share-proportional allocation.

``docs/oracle.md`` explains what this bounds and what it does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from balloonist.errors import ConfigError
from balloonist.model import Decision, GuestTarget, Mechanisms, Snapshot
from balloonist.policy.shares import equilibrium_bytes
from balloonist.sim.curves import CurveBook
from balloonist.sim.scenario import Costs, SimGuest
from balloonist.sim.valuation import (
    TIE_TOLERANCE,
    FloatArray,
    GuestValues,
    HostPaging,
    Lending,
    ModeValues,
    Refill,
    Slice,
    Wakes,
    limit_pages,
    priced,
    throughput_refs_per_s,
)
from balloonist.units import PAGE_SIZE_BYTES, pages_to_bytes

__all__ = [
    "FAIR_FRACTION",
    "GRID_STEPS",
    "LOOKAHEAD_S",
    "OraclePolicy",
    "best_choices",
    "throughput_refs_per_s",
]

#: Grid steps across host memory: 4 MiB on a 2 GiB host, 96 MiB on a 48 GiB one; the
#: top-up after the DP recovers what rounding to the grid loses at a working set's edge.
GRID_STEPS: Final = 512
#: How far past each period its sizes are valued. The steady-state model prices neither
#: what a guest loses when its cache goes to another for a period (it faults the pages
#: back one miss at a time, over far longer: on suite-5-46 a zipf guest raided for one
#: period took 20 s to refill, and ``mom`` beat a myopic bound by 5 %), nor a size
#: that pays only until the working set outgrows it again (suite-5-96). 10 s spans
#: the suite's ramps and a refill; the page in ``docs/oracle.md`` gives the figures.
LOOKAHEAD_S: Final = 10.0
#: The sharing rule: no guest below this share of its throughput under ``static``.
FAIR_FRACTION: Final = 0.9


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
        near = total >= (top - TIE_TOLERANCE * np.maximum(np.abs(top), 1.0))[:, None]
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


#: What a period's choice depends on: host size, slices, what each guest holds and what
#: it holds in its swap, and what lending its pages costs.
_SolveKey = tuple[
    int, tuple[tuple[Slice, ...], ...], tuple[int, ...], tuple[int, ...], tuple[Lending, ...]
]


def _ahead_s(
    time_s: float, period_s: float, lookahead_s: float, until_s: float | None
) -> list[float]:
    """The look-ahead's sample times: one a period, after this one, within the run."""
    times: list[float] = []
    at_s = time_s + period_s
    end_s = time_s + lookahead_s if until_s is None else min(time_s + lookahead_s, until_s)
    while at_s < end_s:
        times.append(at_s)
        at_s += period_s
    return times


class OraclePolicy:
    """Allocations that maximise modelled total throughput, period by period."""

    def __init__(
        self,
        guests: Sequence[SimGuest],
        costs: Costs,
        *,
        period_s: float = 1.0,
        slices_per_period: int = 1,
        fair: bool = False,
        grid_steps: int = GRID_STEPS,
        modes: ModeValues | None = None,
        host_swap_pages: int = 0,
        host_paging: HostPaging = HostPaging.CONFINED,
        lookahead_s: float = LOOKAHEAD_S,
        until_s: float | None = None,
        narrower: OraclePolicy | None = None,
    ) -> None:
        """``host_swap_pages`` is the host's swap: without any, no guest is host-paged;
        with some, ``host_paging`` says which guests may be. In a period where this
        scope's plan host-pages no guest the ``narrower`` scope may not, the narrower
        one's plan decides (see :meth:`decide`).
        ``lookahead_s`` is how far past each period its sizes are valued, never past
        ``until_s``, the run's end. ``modes`` values the guests' sizes, for ``costs``;
        schedules of one scenario may share one (a fresh one measures its curves)."""
        where = "policy oracle"
        if grid_steps < 1 or slices_per_period < 1 or not period_s > 0.0:
            raise ConfigError("grid steps, slices and period must be positive", where=where)
        if not lookahead_s >= 0.0:
            raise ConfigError(f"look-ahead must not be negative, got {lookahead_s}", where=where)
        if modes is not None and modes.costs != costs:
            raise ConfigError("the shared valuations are for other costs", where=where)
        self._period_s = period_s
        self._swap_in_s = costs.guest_swap_in_s
        self._slices = slices_per_period
        self._lookahead_s = lookahead_s
        self._until_s = until_s
        self._fair = fair
        self._grid_steps = grid_steps
        self._values = GuestValues(
            modes if modes is not None else ModeValues(costs, CurveBook()),
            slices_per_period=slices_per_period,
            host_paging=host_paging if host_swap_pages > 0 else HostPaging.NEVER,
        )
        self._guests: dict[str, SimGuest] = {}
        for guest in guests:
            if guest.name in self._guests:
                raise ConfigError(f"duplicate guest name {guest.name!r}", where=where)
            self._guests[guest.name] = guest
        self._solved: dict[_SolveKey, tuple[int, ...]] = {}
        self._sharing = SharingRule(self._values)
        self._narrower = narrower
        self._wakes = Wakes(
            guests,
            self._values,
            period_s=period_s,
            until_s=until_s,
            swap_in_s=costs.guest_swap_in_s,
        )

    @property
    def name(self) -> str:
        return "oracle-fair" if self._fair else "oracle"

    def decide(self, snapshot: Snapshot) -> Decision:
        """The period's decision, this scope's own or the narrower one's."""
        for view in snapshot.guests:
            if view.name not in self._guests:
                raise ConfigError(
                    f"snapshot has guest {view.name!r}, which the oracle was not given",
                    where="policy oracle",
                )
        # Plan for every guest, even one missing from this snapshot: it still holds
        # memory, and leaving it out would hand that memory to the others twice.
        guests = tuple(self._guests.values())
        host_pages = snapshot.host.memory_bytes // PAGE_SIZE_BYTES
        times = [snapshot.time_s + k * self._period_s / self._slices for k in range(self._slices)]
        times += _ahead_s(snapshot.time_s, self._period_s, self._lookahead_s, self._until_s)
        # The period's slices, then the look-ahead's: sizes are valued over them all.
        slices = tuple(
            tuple((g.plan.at(t), g.plan.active_pages_at(t)) for t in times) for g in guests
        )
        floors = _floors(host_pages, guests)
        self._values.for_host(host_pages, guests, floors)
        held = {v.name: v.sample.allocated_bytes // PAGE_SIZE_BYTES for v in snapshot.guests}
        held_pages = tuple(held.get(g.name, 0) for g in guests)
        swapped = {
            v.name: (v.sample.swap_used_bytes or 0) // PAGE_SIZE_BYTES for v in snapshot.guests
        }
        swapped_pages = tuple(swapped.get(g.name, 0) for g in guests)
        # The window valued: the period and the look-ahead's periods.
        window_s = self._period_s * (1 + len(times) - self._slices)
        lendings = tuple(
            self._wakes.lending(g, s, h, snapshot.time_s, snapshot.time_s + window_s)
            for g, s, h in zip(guests, slices, held_pages, strict=True)
        )
        key = (host_pages, slices, held_pages, swapped_pages, lendings)
        pages = self._solved.get(key)
        if pages is None:
            refills = [
                self._refill(g, s, h, w, window_s)
                for g, s, h, w in zip(guests, slices, held_pages, swapped_pages, strict=True)
            ]
            pages = self._solve(host_pages, guests, slices, held_pages, refills, lendings, floors)
            self._solved[key] = pages
        pages = _hand_out_slack(pages, host_pages, guests, held)
        # Balloon or host paging is chosen for the period alone: it is chosen again every
        # period, and a guest left to the host before its set outgrows its ceiling has
        # its kernel's pages taken for nothing (suite-1-107 lost 1.7 % so).
        paged = [
            self._values.host_paged(g, s[: self._slices], p)
            for g, s, p in zip(guests, slices, pages, strict=True)
        ]
        if self._narrower is not None and self._narrower._may_host_page(
            host_pages, floors, [(g, s) for g, s, p in zip(guests, slices, paged, strict=True) if p]
        ):
            # A wider scope is for the periods where it host-pages a guest the narrower
            # may not. Elsewhere its plan differs from the narrower one's only by how
            # the look-ahead prices host paging to come, or by which of equal plans it
            # picks; following the narrower keeps their runs one (sim/lockstep.py).
            return self._narrower.decide(snapshot)
        present = set(held)
        targets = tuple(
            GuestTarget(
                g.name,
                pages_to_bytes(p),
                0 if by_host else g.spec.memory_bytes - pages_to_bytes(p),
            )
            for g, p, by_host in zip(guests, pages, paged, strict=True)
            if g.name in present
        )
        return Decision(
            targets, Mechanisms(balloon=True, host_paging=any(paged), block_over_target=False)
        )

    def _may_host_page(
        self,
        host_pages: int,
        floors: Sequence[int],
        paged: Sequence[tuple[SimGuest, tuple[Slice, ...]]],
    ) -> bool:
        """Whether this scope may leave each of ``paged``'s guests to the host in the
        period of its slices."""
        self._values.for_host(host_pages, tuple(self._guests.values()), floors)
        return all(self._values.may_host_page(g, s[: self._slices]) for g, s in paged)

    def _refill(
        self,
        guest: SimGuest,
        slices: tuple[Slice, ...],
        held_pages: int,
        swapped_pages: int,
        window_s: float,
    ) -> Refill:
        """What reading ``guest``'s evicted set back costs it, as a share of the
        ``window_s`` its sizes are valued over: the period and the look-ahead's periods."""
        return Refill(
            held_pages=held_pages,
            swapped_pages=swapped_pages,
            set_pages=guest.kernel_pages + max(active for _, active in slices[: self._slices]),
            share_per_page=self._swap_in_s / window_s,
        )

    def _solve(
        self,
        host_pages: int,
        guests: Sequence[SimGuest],
        slices: Sequence[tuple[Slice, ...]],
        held_pages: Sequence[int],
        refills: Sequence[Refill],
        lendings: Sequence[Lending],
        floors: Sequence[int],
    ) -> tuple[int, ...]:
        # What each guest's held size is worth, over the period and the look-ahead:
        # every size is priced against it.
        held = [
            self._values.values(g, s, np.array([h], dtype=np.int64))
            for g, s, h in zip(guests, slices, held_pages, strict=True)
        ]
        charges = list(zip(refills, lendings, strict=True))
        pages = self._best(host_pages, guests, slices, held, charges, floors)
        if self._fair:
            # The sharing rule as a constraint: where the best allocation keeps it
            # already, it is the best that keeps it, and oracle-fair decides as the
            # oracle does (their runs stay one, sim/lockstep.py).
            fair = self._sharing.floors(
                host_pages, guests, [s[: self._slices] for s in slices], floors
            )
            if any(p < f for p, f in zip(pages, fair, strict=True)):
                pages = self._best(host_pages, guests, slices, held, charges, fair)
        return pages

    def _best(
        self,
        host_pages: int,
        guests: Sequence[SimGuest],
        slices: Sequence[tuple[Slice, ...]],
        held: Sequence[tuple[FloatArray, FloatArray]],
        charges: Sequence[tuple[Refill, Lending]],
        floors: Sequence[int],
    ) -> tuple[int, ...]:
        """The allocations, each at least its floor, that model highest in all;
        ``held``: what each guest's held size is worth (``GuestValues.values``);
        ``charges``: what faulting its set back, and lending its pages, cost each."""
        step = max(1, host_pages // self._grid_steps)
        options = [
            self._values.options(g, s, floor, step, lending.keep_pages)
            for g, s, floor, (_, lending) in zip(guests, slices, floors, charges, strict=True)
        ]
        values = [
            _charged(o.floor_pages + o.extra_pages, o.now, o.window, at_held, charge)
            for o, at_held, charge in zip(options, held, charges, strict=True)
        ]
        capacity = min(
            (host_pages - sum(floors)) // step, sum(len(o.extra_pages) - 1 for o in options)
        )
        choices, _ = best_choices(values, max(capacity, 0))
        pages = [
            o.floor_pages + int(o.extra_pages[k]) for o, k in zip(options, choices, strict=True)
        ]
        return self._top_up(pages, host_pages, guests, slices, held, charges)

    def _top_up(
        self,
        pages: list[int],
        host_pages: int,
        guests: Sequence[SimGuest],
        slices: Sequence[tuple[Slice, ...]],
        held: Sequence[tuple[FloatArray, FloatArray]],
        charges: Sequence[tuple[Refill, Lending]],
    ) -> tuple[int, ...]:
        """Spend what the grid's rounding left, where it raises throughput most."""
        for _ in guests:
            left = host_pages - sum(pages)
            best_gain, best_i, best_pages = 0.0, -1, 0
            for i, (g, s) in enumerate(zip(guests, slices, strict=True)):
                top = self._values.top_pages(g, s, pages[i], charges[i][1].keep_pages)
                more = min(top, pages[i] + left)
                if more > pages[i]:
                    at = np.array([pages[i], more], dtype=np.int64)
                    now, then = _charged(at, *self._values.values(g, s, at), held[i], charges[i])
                    if then - now > best_gain * (1.0 + TIE_TOLERANCE):
                        best_gain, best_i, best_pages = float(then - now), i, more
            if best_i < 0:
                break
            pages[best_i] = best_pages
        return tuple(pages)


class SharingRule:
    """The sharing rule's floors: no guest below ``FAIR_FRACTION`` of its modelled
    throughput at the ``static`` policy's allocation (shares, no tax, no working sets;
    ``static`` balloons, so its guests are never host-paged)."""

    def __init__(self, values: GuestValues) -> None:
        self._values = values
        self._static: dict[int, tuple[int, ...]] = {}

    def floors(
        self,
        host_pages: int,
        guests: Sequence[SimGuest],
        slices: Sequence[tuple[Slice, ...]],
        floors: Sequence[int],
    ) -> list[int]:
        """Each guest's least allocation, at least its floor, that keeps the rule over
        the period's ``slices``."""
        return [
            max(floor, self._fair_floor(g, s, floor, st))
            for g, s, floor, st in zip(
                guests, slices, floors, self._static_pages(host_pages, guests), strict=True
            )
        ]

    def _static_pages(self, host_pages: int, guests: Sequence[SimGuest]) -> tuple[int, ...]:
        cached = self._static.get(host_pages)
        if cached is None:
            allocations = equilibrium_bytes(
                np.array([g.spec.shares for g in guests], dtype=np.float64),
                np.zeros(len(guests)),
                np.array([g.spec.min_bytes for g in guests], dtype=np.int64),
                np.array([g.spec.limit_bytes for g in guests], dtype=np.int64),
                available_bytes=host_pages * PAGE_SIZE_BYTES,
                tax_rate=0.0,
            )
            cached = tuple(int(a) // PAGE_SIZE_BYTES for a in allocations)
            self._static[host_pages] = cached
        return cached

    def _fair_floor(
        self, guest: SimGuest, slices: tuple[Slice, ...], floor_pages: int, static_pages: int
    ) -> int:
        """The least allocation giving ``FAIR_FRACTION`` of the static one's throughput."""
        at_static = np.array([static_pages])
        goal = FAIR_FRACTION * float(
            self._values.mode_value(guest, slices, at_static, host_paged=False)[0]
        )
        low, high = floor_pages, max(floor_pages, static_pages)  # value rises with pages
        while low < high:
            mid = (low + high) // 2
            if float(self._values.mean_value(guest, slices, np.array([mid]))[0]) >= goal:
                high = mid
            else:
                low = mid + 1
        return low


def _charged(
    pages: npt.NDArray[np.int64],
    now: FloatArray,
    window: FloatArray,
    held: tuple[FloatArray, FloatArray],
    charge: tuple[Refill, Lending],
) -> FloatArray:
    """Sizes ``pages``' worth (:func:`priced`), less what reading its set back, or
    lending pages it will read again, costs the guest."""
    refill, lending = charge
    return priced(now, window, *held, refill.kept(pages)) - lending.cost(pages)


def _hand_out_slack(
    pages: tuple[int, ...], host_pages: int, guests: Sequence[SimGuest], held: dict[str, int]
) -> tuple[int, ...]:
    """Give out the memory no guest's modelled throughput gains from.

    It gains in transitions: a guest whose working set moves fills free frames instead
    of evicting. So it goes first to the guests already holding it (nothing of theirs is
    evicted for nothing), then evenly, each up to its limit; none is left unallocated.
    """
    out = list(pages)
    left = host_pages - sum(out)
    for i, g in enumerate(guests):
        keep = min(held.get(g.name, 0), limit_pages(g)) - out[i]
        if keep > 0 and left > 0:
            out[i] += min(keep, left)
            left -= min(keep, left)
    room = [max(limit_pages(g) - p, 0) for g, p in zip(guests, out, strict=True)]
    for rank, i in enumerate(sorted(range(len(out)), key=lambda j: room[j])):
        give = min(room[i], left // (len(out) - rank))  # water-fill: the smallest room first
        out[i] += give
        left -= give
    return tuple(out)


def _floors(host_pages: int, guests: Sequence[SimGuest]) -> list[int]:
    """The least each guest holds: its floor (reservation and kernel), or where the
    kernels do not all fit, its reservation alone."""
    floors = [_floor_pages(g) for g in guests]
    if sum(floors) > host_pages:
        floors = [min(_min_pages(g), limit_pages(g)) for g in guests]
        if sum(floors) > host_pages:
            raise ConfigError(
                "the guests' reservations add up to more than host memory",
                where="policy oracle",
            )
    return floors


def _min_pages(guest: SimGuest) -> int:
    return -(-guest.spec.min_bytes // PAGE_SIZE_BYTES)  # a reservation rounds up


def _floor_pages(guest: SimGuest) -> int:
    """The least a guest can hold: its reservation, and never less than its kernel."""
    return min(max(_min_pages(guest), guest.kernel_pages), limit_pages(guest))
