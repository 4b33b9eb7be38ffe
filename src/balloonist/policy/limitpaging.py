"""Limits the host holds: a guest that cannot work ballooned under its ceiling is held
to it by host paging instead, where that measures better.

A guest's *ceiling* is the most machine memory it may have now: its limit (``max``),
or what the policy gave it last period where that is less (a full host, split by
shares). The balloon holds it there by taking pages inside the guest, whose own
replacement then picks its victims among what its kernel leaves. For most working
sets that is the better way: the guest knows what it uses, while the host pages
blind and pays more per fault. But a working set just past what the ceiling leaves
may keep nothing under the guest's algorithm (a scan one page larger than its memory
misses every reference under LRU). The host, capping the guest at the same ceiling
with its balloon deflated, pages at random: random victims keep part of a scan, and
they take the kernel's cold pages too, so the whole ceiling holds the workload. ESX
holds limits by swapping as well as ballooning, and the oracle weighs the same choice
(``sim/oracle.py``). A ceiling set by shares is held the same way: the host being
full, the guest pages either way, and the question is only whose victims serve it
better.

The choice is measured, not guessed. A guest is *tried* host-capped when, for
``TRIAL_AFTER`` periods in a row, it held its ceiling and stalled on memory (by its
smoothed stall or each period's own), and its whole footprint (what it holds and what it
wrote to its own swap), grown for a trial's length at its recent pace, fits its memory
with ``FIT_MARGIN`` to spare, room to grow, or ``SETTLED_FIT_MARGIN`` once the footprint
has settled (``SETTLE_PERIODS`` within ``SETTLED_FOOTPRINT`` of itself), room for its
jitter (deflated, it then never has to evict, so it never writes out a page the host
paged: no double paging) and its ceiling holds ``LIMIT_HOLDS`` of it (the host's random
victims keep about the share of a footprint its cap holds; a scan far past the ceiling
gains little). How much it must stall depends on how far past its ceiling it is:
``TRIAL_STALL`` (it keeps nothing of what it touches) in general, but only
``NEAR_TRIAL_STALL`` where its ceiling is its limit, its footprint is at most
``NEAR_EXCESS_BYTES`` past it, and its stall and footprint have settled
(``SETTLE_PERIODS``; the stall by either its smoothed figure or each period's own); such
a guest is tried as soon as it has settled, the settling being its wait. That close to
its limit, what the host must page is no more than the kernel's cold pages, which the
balloon cannot give the workload and the host's victims find in time, so the whole limit
holds the workload whatever its pattern; further past it, the host's victims are the
workload's own pages, chosen blind. A guest whose set is still moving in, or whose stall
still rises, would be measured against a baseline it has not reached. If its work time
(1 - stall) over the last ``MEASURE_PERIODS`` of the ``TRIAL_PERIODS`` trial is at least
``KEEP_GAIN`` of what it was before, it stays capped: going back costs more than a near
draw, since the balloon inflating again makes the guest evict, and some of its victims
are pages the host paged. If it worked clearly less, its balloon comes back, and it is
tried again only after a backoff that doubles each time. A capped guest follows its
allocation (the host pages it down when the policy gives it less) and goes back to its
balloon when it writes pages out to its own swap (it grew past its memory: its victims
may be pages the host paged, and the balloon stops that in one move), or when it no
longer can be capped (it has no ceiling below its memory, the host lost its swap, the
balloon stopped cooperating).

Pure: ``update`` takes the period's views, stall fractions (smoothed, and each period's
own) and ceilings, and returns the guests the host holds this period; each guest's state
is a :class:`Mode` with checked transitions.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from balloonist.model import GuestView
from balloonist.units import MIB

__all__ = [
    "BACKOFF_S",
    "EVICTED_BYTES",
    "FIT_MARGIN",
    "KEEP_GAIN",
    "LIMIT_HOLDS",
    "MEASURE_PERIODS",
    "NEAR_EXCESS_BYTES",
    "NEAR_TRIAL_STALL",
    "SETTLED_FIT_MARGIN",
    "SETTLED_FOOTPRINT",
    "SETTLED_STALL",
    "SETTLE_PERIODS",
    "TRIAL_AFTER",
    "TRIAL_PERIODS",
    "TRIAL_STALL",
    "LimitPaging",
    "Mode",
]

#: A guest stalled this share of its time at its limit misses nearly every reference
#: (a miss costs ~120 references at the simulator's costs): its replacement keeps
#: nothing of what it touches, which the host's random victims can beat. One that
#: misses a third (a uniform set half again its limit) misses as many under the
#: host: a draw at best, and going back pages twice (suite-4-89 at 0.9). At 0.5 for
#: every guest, failed trials' ways back paged twice on 4 of seed 5's hosts and 8 of
#: seed 6's. Either stall counts, the smoothed one or the period's own: the smoothed
#: figure (2 s half-life) reaches 0.98 only about 11 s after a guest begins to miss
#: every reference (suite-7-30: a CLOCK scan that outgrew its 120 MiB limit missed
#: every reference from its 47th second and was tried at its 64th, where the host
#: paging it had kept about a quarter of its work meanwhile).
TRIAL_STALL: Final = 0.98
#: A guest whose footprint is at most this far past its limit is tried at a lower
#: stall: what the host must page is then no more than what a small guest's kernel
#: keeps and never touches (the simulator's guests keep 16 MiB; a real Linux guest
#: keeps more). Suite-5-92: a skewed set 3 MiB under a 165 MiB limit, 13 MiB past it
#: with the kernel, stalled 0.39 ballooned and 0.26 capped (+22 % for the host).
#: Held to a share of the footprint instead (90 %), a 3 GiB guest 53 MiB past its
#: limit was tried and failed (suite-7-44: a skewed set, whose hot pages the host's
#: blind victims hit), and its way back paged twice...
NEAR_EXCESS_BYTES: Final = 16 * MIB
NEAR_TRIAL_STALL: Final = 0.3
#: ...once, over this many periods, its stall moved by at most ``SETTLED_STALL`` and
#: its footprint by at most ``SETTLED_FOOTPRINT`` of itself. A trial started while a
#: set still moves in (suite-6-17: a scan still loading) or against a stall still
#: rising (suite-6-60: its baseline 0.44, its settled stall 0.47) failed, and paged
#: twice on the way back. The stall is settled when either its smoothed figure or
#: each period's own is: the smoothed one (2 s half-life) moved less than 0.05 over 6
#: periods only about 12 s after a guest began to thrash (suite-5-70: a zipf set
#: 16 MiB past its limit thrashed at a steady 88 % stall from its 4th second, and was
#: tried at its 18th while ``TRIAL_AFTER`` periods were asked on top), while a FIFO
#: guest's own stall swings by 0.2 from period to period for good, and only the
#: smoothed one settles (suite-1-122). Once settled, it is tried at once, against the
#: mean of its settled periods' own stalls.
SETTLE_PERIODS: Final = 6
SETTLED_STALL: Final = 0.05
SETTLED_FOOTPRINT: Final = 0.01
#: ...for this many periods in a row: not a working set moving in.
TRIAL_AFTER: Final = 5
#: A trial long enough for the balloon to deflate, the guest to read its pages back
#: and the host to find the kernel's cold pages...
TRIAL_PERIODS: Final = 15
#: ...measured over its last periods, once that has settled.
MEASURE_PERIODS: Final = 5
#: Capped, the guest must work at least this many times as much as it did ballooned.
#: A near draw stays: going back pages twice (suite-6-38, tried while the lower
#: stall applied where the limit held 90 % of the footprint: a uniform set 8 % past
#: its limit stalled 0.898 ballooned and 0.909 capped).
KEEP_GAIN: Final = 0.9
#: The share of its memory a guest's footprint must leave free to be tried: room for
#: a working set that still grows...
FIT_MARGIN: Final = 0.05
#: ...or, once its footprint has settled, room for the footprint's own jitter while
#: settled (twice ``SETTLED_FOOTPRINT``), near its limit or not. Found near the limit
#: (suite-7-74: a periodic uniform set whose footprint left 4.4 % free); then past it
#: (suite-9-101: a 248 MiB CLOCK scan held at a 245 MiB limit in a 277 MiB guest, its
#: footprint settled at 264 MiB, 4.7 % free, thrashed ballooned through its 36 s
#: burst: 4 k references a second over the run, where host-swap paging it made 64 k).
SETTLED_FIT_MARGIN: Final = 0.02
#: The share of its footprint its ceiling must hold to be tried: the host's random
#: victims keep about that share of what it touches, so a scan a third past its
#: limit misses a quarter of its references capped where ballooned it misses all,
#: and does about four times the work. Below, the gain is small and slow to show,
#: and a failed trial pages twice on the way back (suite-2-40: a CLOCK scan 1.6x its
#: limit did about as little capped).
LIMIT_HOLDS: Final = 0.75
#: A guest whose swap grew by more than this in a period wrote pages out.
EVICTED_BYTES: Final = 1 * MIB
#: A guest holding this close to its ceiling holds it.
AT_CEILING_BYTES: Final = 4 * MIB
#: The first wait before a failed trial is tried again; it doubles each time.
BACKOFF_S: Final = 60.0


class Mode(enum.Enum):
    """How a guest's ceiling is held."""

    BALLOONED = "ballooned"  # by its balloon (the default)
    TRIAL = "trial"  # by the host, while measuring whether that is better
    CAPPED = "capped"  # by the host: the trial showed it works better

    @property
    def host_capped(self) -> bool:
        return self is not Mode.BALLOONED


_ALLOWED: Final = {
    Mode.BALLOONED: {Mode.TRIAL},
    Mode.TRIAL: {Mode.BALLOONED, Mode.CAPPED},
    Mode.CAPPED: {Mode.BALLOONED},
}


@dataclass(frozen=True)
class _Period:
    """One period of a guest, as settling judges it."""

    stall: float  # smoothed
    interval_stall: float  # the period's own
    footprint_bytes: int


@dataclass
class _Guest:
    """One guest's state: its mode, the counts that decide the next, and its backoff."""

    mode: Mode = Mode.BALLOONED
    stalls: list[float] = field(default_factory=list)  # this mode's stall, per period
    ballooned_stall: float = 0.0  # the mean stall that started the trial
    swap_used_bytes: int = 0  # its swap at the last period
    retry_s: float = 0.0  # no trial before this time
    backoff_s: float = BACKOFF_S
    #: its last SETTLE_PERIODS periods, in any mode
    recent: deque[_Period] = field(default_factory=lambda: deque(maxlen=SETTLE_PERIODS))

    def settled(self) -> bool:
        """Its footprint, and its stall by either measure, held still over the last
        ``SETTLE_PERIODS``."""
        if not self.footprint_settled():
            return False

        def still(values: list[float]) -> bool:
            return max(values) - min(values) <= SETTLED_STALL

        return still([p.stall for p in self.recent]) or still(
            [p.interval_stall for p in self.recent]
        )

    def footprint_settled(self) -> bool:
        """Its footprint held still (within ``SETTLED_FOOTPRINT`` of itself) over the
        last ``SETTLE_PERIODS``."""
        if len(self.recent) < SETTLE_PERIODS:
            return False
        footprints = [p.footprint_bytes for p in self.recent]
        return max(footprints) - min(footprints) <= SETTLED_FOOTPRINT * footprints[-1]

    def footprint_growth_bytes(self) -> int:
        """How much its footprint would grow over a trial at the pace of its last periods.

        A trial is judged on the footprint it will end with: a scan still moving in
        past its limit fits when it first thrashes and not a trial later (suite-6-1:
        a 247 MiB scan growing 4 MiB/s past a 140 MiB limit, tried as soon as each
        period's own stall showed it thrashing, failed, and its way back paged
        twice; the smoothed stall's lag had kept it from a trial until the scan was
        too large for one)."""
        if len(self.recent) < 2:
            return 0
        per_period = (self.recent[-1].footprint_bytes - self.recent[0].footprint_bytes) / (
            len(self.recent) - 1
        )
        return max(0, int(per_period * TRIAL_PERIODS))

    def settled_stall(self) -> float:
        """The mean of its last periods' own stalls."""
        return sum(p.interval_stall for p in self.recent) / len(self.recent)

    def to(self, mode: Mode) -> None:
        if mode not in _ALLOWED[self.mode]:
            raise ValueError(f"limit paging cannot go from {self.mode.value} to {mode.value}")
        self.mode, self.stalls = mode, []


def cappable(view: GuestView, ceiling_bytes: int) -> bool:
    """The host can hold the guest to its ceiling: it has one below its memory, a
    balloon that follows its register, and the host can page it; and it reports its
    swap, so its footprint can be checked."""
    s = view.sample
    return (
        view.spec.balloon
        and s.cooperative
        and s.host_cappable
        and s.swap_used_bytes is not None
        and ceiling_bytes < view.spec.memory_bytes
    )


def footprint_bytes(view: GuestView) -> int:
    """What the guest holds and what it wrote to its own swap."""
    return view.sample.allocated_bytes + (view.sample.swap_used_bytes or 0)


def worth_trying(
    view: GuestView, ceiling_bytes: int, *, settled: bool = False, growth_bytes: int = 0
) -> bool:
    """Its whole footprint, held and swapped, and ``growth_bytes`` more, fits its
    memory with the margin (the smaller one for a guest whose footprint has
    ``settled``), and its ceiling holds ``LIMIT_HOLDS`` of it."""
    footprint = footprint_bytes(view) + growth_bytes
    margin = SETTLED_FIT_MARGIN if settled else FIT_MARGIN
    return (
        footprint <= view.spec.memory_bytes * (1.0 - margin)
        and ceiling_bytes >= LIMIT_HOLDS * footprint
    )


def near_and_settled(view: GuestView, state: _Guest) -> bool:
    """Its footprint is at most ``NEAR_EXCESS_BYTES`` past its limit, and it and its
    stall have settled: it is tried at ``NEAR_TRIAL_STALL`` (and, settled, with
    ``SETTLED_FIT_MARGIN``, as every settled footprint is)."""
    near = footprint_bytes(view) - view.spec.limit_bytes <= NEAR_EXCESS_BYTES
    return near and state.settled()


@dataclass
class LimitPaging:
    """Which guests the host holds to their ceilings (see the module docstring)."""

    _guests: dict[str, _Guest] = field(default_factory=dict)

    def mode(self, name: str) -> Mode:
        state = self._guests.get(name)
        return Mode.BALLOONED if state is None else state.mode

    def update(
        self,
        time_s: float,
        views: Sequence[GuestView],
        stalls: Sequence[float],
        interval_stalls: Sequence[float],
        ceilings_bytes: Sequence[int] | None = None,
    ) -> frozenset[str]:
        """The guests host-capped this period; ``stalls`` is each guest's stall
        fraction, ``interval_stalls`` the last interval's alone (for settling),
        ``ceilings_bytes`` the most each may have now (its limit where not given)."""
        names = {v.name for v in views}
        for gone in [n for n in self._guests if n not in names]:
            del self._guests[gone]
        ceilings = ceilings_bytes or [v.spec.limit_bytes for v in views]
        for view, stall, now, ceiling in zip(views, stalls, interval_stalls, ceilings, strict=True):
            state = self._guests.setdefault(view.name, _Guest())
            if not cappable(view, ceiling):
                if state.mode.host_capped:
                    state.to(Mode.BALLOONED)
                state.stalls = []
                continue
            swap = view.sample.swap_used_bytes or 0
            evicted = swap > state.swap_used_bytes + EVICTED_BYTES
            state.swap_used_bytes = swap
            self._step(
                time_s, view, stall, state, evicted=evicted, interval_stall=now, ceiling=ceiling
            )
        return frozenset(n for n, s in self._guests.items() if s.mode.host_capped)

    def _step(
        self,
        time_s: float,
        view: GuestView,
        stall: float,
        state: _Guest,
        *,
        evicted: bool,
        interval_stall: float,
        ceiling: int,
    ) -> None:
        """One period of one guest that can be capped; ``evicted``: it wrote pages out
        to its swap in the period (judged once its balloon deflated, which is what
        ends the evictions it made)."""
        evicts = evicted and view.sample.balloon_bytes == 0
        state.recent.append(_Period(stall, interval_stall, footprint_bytes(view)))
        if state.mode is Mode.BALLOONED:
            at_ceiling = view.sample.allocated_bytes >= ceiling - AT_CEILING_BYTES
            # The near rule is for limits alone: a share moves with the others' needs.
            at_limit = at_ceiling and ceiling >= view.spec.limit_bytes
            near = at_limit and near_and_settled(view, state)
            stalled = max(stall, interval_stall)
            growth = 0 if near else state.footprint_growth_bytes()
            # FIT_MARGIN is room to grow: a footprint that has settled (as a near
            # guest's has) needs only room for its jitter, near its limit or not.
            thrashing = (
                at_ceiling
                and stalled >= (NEAR_TRIAL_STALL if near else TRIAL_STALL)
                and worth_trying(
                    view, ceiling, settled=state.footprint_settled(), growth_bytes=growth
                )
            )
            # The last TRIAL_AFTER periods only: the baseline is the settled stall
            # just before the trial, and a backoff does not grow the list.
            state.stalls = [*state.stalls, stalled][-TRIAL_AFTER:] if thrashing else []
            # A settled guest near its limit has waited out its settling already.
            if len(state.stalls) >= (1 if near else TRIAL_AFTER) and time_s >= state.retry_s:
                state.ballooned_stall = (
                    state.settled_stall() if near else sum(state.stalls) / len(state.stalls)
                )
                state.to(Mode.TRIAL)
        elif state.mode is Mode.TRIAL:
            state.stalls.append(stall)
            if evicts:
                self._fail(time_s, state)
            elif len(state.stalls) >= TRIAL_PERIODS:
                measured = state.stalls[-MEASURE_PERIODS:]
                work = 1.0 - sum(measured) / len(measured)
                if work >= KEEP_GAIN * (1.0 - state.ballooned_stall):
                    state.to(Mode.CAPPED)
                else:
                    self._fail(time_s, state)
        elif evicts:
            state.to(Mode.BALLOONED)

    @staticmethod
    def _fail(time_s: float, state: _Guest) -> None:
        state.to(Mode.BALLOONED)
        state.retry_s = time_s + state.backoff_s
        state.backoff_s *= 2.0
