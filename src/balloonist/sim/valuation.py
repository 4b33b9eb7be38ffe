"""What memory is worth to a guest, as the oracle models it (``sim/oracle.py``).

A guest holding ``m`` resident workload pages makes
``1 / (reference_s + miss(m) * (swap_in_s + swap_out_s))`` references per second in
steady state, from its own swap when ballooned and from the host's when the host pages
it; the miss ratio comes from the exact curves of :mod:`balloonist.sim.curves`. A size
is valued over a period's slices and over those and the look-ahead's, and priced
against what the guest holds now (:func:`priced`). The oracle decides; this module only
values, for one host size at a time (:meth:`GuestValues.for_host`).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from balloonist.sim.curves import CurveBook
from balloonist.sim.scenario import Costs, SimGuest
from balloonist.sim.workload import Workload
from balloonist.units import PAGE_SIZE_BYTES

__all__ = [
    "NO_LENDING",
    "TIE_TOLERANCE",
    "FloatArray",
    "GuestValues",
    "HostPaging",
    "IntArray",
    "Lending",
    "ModeValues",
    "Options",
    "Refill",
    "Slice",
    "Wakes",
    "limit_pages",
    "priced",
    "throughput_refs_per_s",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Relative tolerance under which two totals count as equal; the DP then prefers the
#: smaller allocation, so memory that buys nothing stays with whoever holds it.
TIE_TOLERANCE: Final = 1e-9

#: One slice of a period, as a guest runs it: its workload and active working set.
Slice = tuple[Workload, int]


class HostPaging(enum.Enum):
    """Which guests the oracle may leave to the host's paging instead of a balloon.

    The steady state values each way; what it misses is the switch (the host's random
    victims take a while to find the kernel's pages, and a balloon inflated again
    evicts), so no scope is the best one on every host (``sim/runner.py`` runs each
    and keeps the best).
    """

    NEVER = "never"
    #: Only a guest that can never hold its working set ballooned: its limit, or the
    #: host less the others' floors, keeps it below.
    CONFINED = "confined"
    #: Any guest, wherever the steady state values it higher over the period: a guest
    #: that could hold its set ballooned, but only by taking what another needs, gains
    #: its kernel's pages for its set.
    ANYWHERE = "anywhere"


def throughput_refs_per_s(
    miss_ratio: npt.ArrayLike, costs: Costs, *, host_paged: bool = False
) -> FloatArray:
    """Steady-state references per second of a busy guest at ``miss_ratio``: each miss
    reads a page back and writes a victim out, from the guest's swap or the host's."""
    if host_paged:
        fault_s = costs.host_swap_in_s + costs.host_swap_out_s
    else:
        fault_s = costs.guest_swap_in_s + costs.guest_swap_out_s
    return 1.0 / (costs.reference_s + np.asarray(miss_ratio, dtype=np.float64) * fault_s)


def priced(
    now: FloatArray,
    window: FloatArray,
    now_held: FloatArray,
    window_held: FloatArray,
    kept: FloatArray | float = 1.0,
) -> FloatArray:
    """A size's worth to a guest: its value this period at what it holds, plus the
    change to that size as the period and the look-ahead each price it, whichever is
    lower. A gain counts in full only if it lasts past the period, and a loss counts
    in full if it lasts past it: a cache raided for one period is faulted back over
    many. Where the two agree, this is the period's own value. ``kept``: the share of
    the look-ahead's gain left once the guest has read its set back (:class:`Refill`)."""
    return now_held + np.minimum(now - now_held, (window - window_held) * kept)


@dataclass(frozen=True)
class Refill:
    """What faulting a guest's own evicted pages back costs it over the look-ahead.

    The steady state prices a size as if the guest already held it. A guest given
    more than it holds reads its working set's evicted pages back from its swap first,
    one miss at a time, at ``guest_swap_in_s`` each; a set that grows into new memory
    costs only first touches. Without the charge two guests' scans valued alike
    looked equal whichever held the host: on suite-10-126 the bound took 80 MiB from
    a scan that held its set, to give a growing one a few seconds, and the first
    spent 2 s faulting its set back (three policies beat the bound by up to 2 %).
    """

    held_pages: int  # what the guest holds now
    swapped_pages: int  # what it holds in its own swap: the most it can read back
    set_pages: int  # its kernel and the period's largest active set: past it, no refill
    #: A page's read as a share of the window valued: ``guest_swap_in_s / window_s``.
    share_per_page: float

    def kept(self, pages: IntArray) -> FloatArray:
        """The share of the window's gain from holding ``pages`` left after the
        refill: while it reads its set back the guest makes what it made before."""
        faults = np.clip(np.minimum(pages, self.set_pages) - self.held_pages, 0, self.swapped_pages)
        refill_share: FloatArray = np.minimum(faults * self.share_per_page, 1.0)
        return 1.0 - refill_share


@dataclass(frozen=True)
class Lending:
    """What taking pages a guest will read again past the look-ahead costs it.

    An idle guest's cache is worth nothing over a look-ahead that ends before it
    wakes, so the bound lent it to others, and the guest faulted it all back when it
    woke: on suite-11-70 a periodic guest idle for 17 s at a time lost 155 MiB to a
    thrashing neighbour's small gain and spent 4 s reading it back on every wake
    (every peer, which kept it, beat the bound by 17 %). A page lent is read back at
    the wake however soon it is returned, so the charge is that read, at the
    guest's rate then, spread over the time until it wakes: the least it costs a
    second, if lent for all that time.
    """

    need_pages: int  # what the period and look-ahead value: below it, they price the loss
    keep_pages: int  # what it holds now and reads again when it wakes: past it, no charge
    #: The charge per page taken, in references a second:
    #: ``guest_swap_in_s * rate at the wake / seconds until it``.
    refs_per_s_per_page: float

    def cost(self, pages: IntArray) -> FloatArray:
        """The charge for holding ``pages``, in references a second."""
        taken = np.clip(self.keep_pages - np.maximum(pages, self.need_pages), 0, None)
        charge: FloatArray = taken * self.refs_per_s_per_page
        return charge


#: No charge for taking a guest's pages: it reads none of them again past the look-ahead.
NO_LENDING: Final = Lending(need_pages=0, keep_pages=0, refs_per_s_per_page=0.0)


def limit_pages(guest: SimGuest) -> int:
    return guest.spec.limit_bytes // PAGE_SIZE_BYTES  # a limit rounds down


@dataclass(frozen=True, eq=False)
class Options:
    """One guest's choices: allocation ``floor + extra_pages[k]`` costs ``k`` grid steps
    and models ``now[k]`` over the period, ``window[k]`` over it and the look-ahead."""

    floor_pages: int
    extra_pages: IntArray
    now: FloatArray
    window: FloatArray


class ModeValues:
    """A guest's modelled throughput at sizes, one way, remembered.

    It depends on the guest, the slices, the sizes and the way only, not on the host or
    the other guests, so a bound's schedules share one (``sim/runner.py``): on the same
    snapshot they value the same sizes.
    """

    def __init__(self, costs: Costs, curves: CurveBook) -> None:
        self.costs = costs
        self._curves = curves
        self._known: dict[tuple[str, tuple[Slice, ...], bool, bytes], FloatArray] = {}

    def value(
        self, guest: SimGuest, slices: tuple[Slice, ...], pages: IntArray, *, host_paged: bool
    ) -> FloatArray:
        """Mean modelled throughput over ``slices``, holding ``pages`` one way."""
        pages = np.asarray(pages, dtype=np.int64)
        key = (guest.name, slices, host_paged, pages.tobytes())
        known = self._known.get(key)
        if known is None:
            known = self._value(guest, slices, pages, host_paged)
            known.flags.writeable = False  # shared: no caller may change it
            self._known[key] = known
        return known

    def _value(
        self, guest: SimGuest, slices: tuple[Slice, ...], pages: IntArray, host_paged: bool
    ) -> FloatArray:
        # The host's random victims take the kernel's pages too, and the workload never
        # faults them back: in the steady state the whole allocation holds the workload.
        resident = pages if host_paged else np.maximum(pages - guest.kernel_pages, 0)
        total = np.zeros(resident.shape)
        for workload, active in slices:
            if active > 0:
                if host_paged:
                    miss = self._curves.host_miss_ratio(workload, active, resident)
                else:
                    miss = self._curves.miss_ratio(workload, active, guest.replacement, resident)
                total += throughput_refs_per_s(miss, self.costs, host_paged=host_paged)
        return total / len(slices)


class GuestValues:
    """The guests' modelled throughput at any size, on one host size at a time.

    ``slices`` passed to its methods are a period's ``slices_per_period`` slices,
    followed by the look-ahead's samples if any.
    """

    def __init__(
        self, modes: ModeValues, *, slices_per_period: int, host_paging: HostPaging
    ) -> None:
        self._modes = modes
        self._slices = slices_per_period
        self._host_paging = host_paging
        self._options: dict[tuple[str, int, int, tuple[Slice, ...], int], Options] = {}
        self._ceilings_for = -1  # the host size _ceiling_pages is for
        self._ceiling_pages: dict[str, int] = {}

    def for_host(self, host_pages: int, guests: Sequence[SimGuest], floors: Sequence[int]) -> None:
        """Value for a host of ``host_pages`` whose guests hold at least ``floors``.

        What each guest could hold at most is its limit, or the host less the others'
        floors. Host paging is judged against it (:meth:`may_host_page`), so the
        options valued for another host size go.
        """
        if host_pages == self._ceilings_for:
            return
        self._ceilings_for, self._options = host_pages, {}
        self._ceiling_pages = {
            g.name: min(limit_pages(g), host_pages - (sum(floors) - floor))
            for g, floor in zip(guests, floors, strict=True)
        }

    def values(
        self, guest: SimGuest, slices: tuple[Slice, ...], pages: IntArray
    ) -> tuple[FloatArray, FloatArray]:
        """Holding ``pages``: the mean modelled throughput over the period's own slices,
        and over those and the look-ahead's."""
        now = self.mean_value(guest, slices[: self._slices], pages)
        if len(slices) == self._slices:
            return now, now
        return now, self.mean_value(guest, slices, pages)

    def mean_value(self, guest: SimGuest, slices: tuple[Slice, ...], pages: IntArray) -> FloatArray:
        """Mean modelled throughput over ``slices``, holding ``pages``, the better way:
        ballooned, or host-paged where the guest may be."""
        ballooned = self.mode_value(guest, slices, pages, host_paged=False)
        if not self.may_host_page(guest, slices):
            return ballooned
        return np.maximum(ballooned, self.mode_value(guest, slices, pages, host_paged=True))

    def host_paged(self, guest: SimGuest, slices: tuple[Slice, ...], pages: int) -> bool:
        """Whether ``pages`` serve the guest better host-paged than ballooned."""
        if not self.may_host_page(guest, slices):
            return False
        at = np.array([pages], dtype=np.int64)
        ballooned = float(self.mode_value(guest, slices, at, host_paged=False)[0])
        paged = float(self.mode_value(guest, slices, at, host_paged=True)[0])
        return paged > ballooned * (1.0 + TIE_TOLERANCE)

    def may_host_page(self, guest: SimGuest, slices: tuple[Slice, ...]) -> bool:
        """The scope allows the guest (:class:`HostPaging`), it has work, and its own
        memory holds its working set (else it would page too, and one layer of paging
        is all the model knows). Where a guest cannot hold its set ballooned, a scan
        larger than its memory keeps nothing under the guest's CLOCK and part of it
        under the host's random victims; elsewhere host paging gains the kernel's
        pages, once the random victims have found them."""
        demand = max(active for _, active in slices)
        if (
            self._host_paging is HostPaging.NEVER
            or demand == 0
            or guest.memory_pages - guest.kernel_pages < demand
        ):
            return False
        confined = self._ceiling_pages[guest.name] < guest.kernel_pages + demand
        return confined or self._host_paging is HostPaging.ANYWHERE

    def mode_value(
        self, guest: SimGuest, slices: tuple[Slice, ...], pages: IntArray, *, host_paged: bool
    ) -> FloatArray:
        """Mean modelled throughput over ``slices``, holding ``pages`` one way."""
        return self._modes.value(guest, slices, pages, host_paged=host_paged)

    def top_pages(
        self, guest: SimGuest, slices: tuple[Slice, ...], floor_pages: int, keep_pages: int = 0
    ) -> int:
        """Memory past the largest active working set buys nothing, in the period and
        the look-ahead, nor past what it holds and will read again (``Lending``): the
        grid stops there."""
        demand = max(active for _, active in slices)
        top = max(guest.kernel_pages + demand, keep_pages)
        return max(floor_pages, min(limit_pages(guest), top))

    def options(
        self,
        guest: SimGuest,
        slices: tuple[Slice, ...],
        floor_pages: int,
        step_pages: int,
        keep_pages: int = 0,
    ) -> Options:
        """The guest's grid of sizes from ``floor_pages`` and their values, cached."""
        key = (guest.name, floor_pages, step_pages, slices, keep_pages)
        cached = self._options.get(key)
        if cached is None:
            span = self.top_pages(guest, slices, floor_pages, keep_pages) - floor_pages
            steps = -(-span // step_pages)  # ceil: the last step may be partial
            extra = np.minimum(np.arange(steps + 1, dtype=np.int64) * step_pages, span)
            now, window = self.values(guest, slices, floor_pages + extra)
            cached = Options(floor_pages, extra, now, window)
            self._options[key] = cached
        return cached


class Wakes:
    """Each guest's active set a period apart over the whole run: when it next needs
    more than a window values, and what lending its cache until then costs it."""

    def __init__(
        self,
        guests: Sequence[SimGuest],
        values: GuestValues,
        *,
        period_s: float,
        until_s: float | None,
        swap_in_s: float,
    ) -> None:
        """``until_s``: the run's end (None: unknown, and nothing is charged)."""
        self._values = values
        self._swap_in_s = swap_in_s
        self._timeline_s = np.arange(0.0, until_s if until_s is not None else 0.0, period_s)
        self._active_pages = {
            g.name: np.array([g.plan.active_pages_at(t) for t in self._timeline_s], dtype=np.int64)
            for g in guests
        }

    def lending(
        self,
        guest: SimGuest,
        slices: tuple[Slice, ...],
        held_pages: int,
        time_s: float,
        window_end_s: float,
    ) -> Lending:
        """What taking the pages ``guest`` holds past what ``slices`` value costs it,
        where it reads them again later in the run: when its active set next outgrows
        the window's (from ``window_end_s``), the overlap of that set with the last one
        it used (what its cache holds) is read back."""
        need_pages = guest.kernel_pages + max(active for _, active in slices)
        if held_pages <= need_pages:
            return NO_LENDING
        timeline_s, active = self._timeline_s, self._active_pages[guest.name]
        later = (timeline_s >= window_end_s) & (guest.kernel_pages + active > need_pages)
        used = np.flatnonzero((timeline_s <= time_s) & (active > 0))
        if not later.any() or len(used) == 0:
            return NO_LENDING
        wake, last = int(np.argmax(later)), int(used[-1])
        wake_s = float(timeline_s[wake])
        wakes_with = (guest.plan.at(wake_s), int(active[wake]))
        last_used = (guest.plan.at(float(timeline_s[last])), int(active[last]))
        keep_pages = min(held_pages, guest.kernel_pages + _overlap_pages(last_used, wakes_with))
        if keep_pages <= need_pages:
            return NO_LENDING
        at_wake = self._values.mode_value(
            guest, (wakes_with,), np.array([keep_pages], dtype=np.int64), host_paged=False
        )
        return Lending(
            need_pages=need_pages,
            keep_pages=keep_pages,
            refs_per_s_per_page=self._swap_in_s * float(at_wake[0]) / (wake_s - time_s),
        )


def _overlap_pages(used: Slice, wakes_with: Slice) -> int:
    """How many pages of one active set lie in another (each from its offset)."""
    (a, a_pages), (b, b_pages) = used, wakes_with
    start = max(a.offset_pages, b.offset_pages)
    end = min(a.offset_pages + a_pages, b.offset_pages + b_pages)
    return max(0, end - start)
