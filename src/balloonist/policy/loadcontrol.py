"""Load control: when several guests thrash at once, let them take turns.

Denning's working-set principle: a host whose active working sets add up to more than
its memory does least work by spreading memory so that every one of them thrashes.
A thrashing guest's throughput is convex in its memory (each page it gains removes
misses that cost a hundred references each), so the same memory given to one of them
at a time does far more work than all of them at once. When two or more guests with
a balloon have each stalled on memory for at least ``THRASH_STALL`` of the time for
``THRASH_PERIODS`` periods in a row, one of them (the one with the least service so
far per share) gets a *turn*: the others in turn are held at their reservations and
it may grow as far as it needs. A turn lasts ``TURN_S`` seconds scaled by the guest's
shares over the thrashing guests' mean, then passes on; turns stop when fewer than two
guests thrash. Shares still decide: a guest's turns are longer in proportion.

A holder that still thrashes once its memory has stopped growing does not fit even
with everything the turn gives it: its turn ends there, and it comes last for turns
until it leaves the group. A turn whose holder fits is renewed while every other
guest in the group is one that does not fit: passing the turn would only make both
thrash (suite-3-47: a 333 MiB scan with 7.6x the shares could never fit the 197 MiB
host, and its turns held back a guest that 53 MiB made a hundred times faster).

A guest whose footprint -- what it holds and what it has written to its own swap --
is more than ``OUTSIZED_FRACTION`` of the most it could ever hold (its limit, or the
host's memory less the others' reservations) is known not to fit without a turn: it
goes among those that do not fit as it would after one. On suite-9-113 a 2743 MiB
scan on a 2336 MiB host, 1835 MiB held and 923 MiB swapped, took a 10 s turn before
it was found not to fit, while a 1024 MiB scan that fits waited at its reservation
for most of its 26 s phase. The 10 % spares a guest whose swap still holds a few
pages its set no longer uses.

Pure: the state is the turn and each guest's counters; ``update`` takes the period's
views and returns which guests are held back and which one has the turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from balloonist.model import GuestView
from balloonist.policy.limitpaging import footprint_bytes
from balloonist.units import MIB

__all__ = [
    "GROWN_BYTES",
    "OUTGROWN_FRACTION",
    "OUTSIZED_FRACTION",
    "QUIET_STALL",
    "THRASH_PERIODS",
    "THRASH_STALL",
    "TURN_S",
    "LoadControl",
    "Turns",
    "outsized",
]

#: A guest stalled this share of its time does less than half the work it could.
THRASH_STALL: Final = 0.5
#: ...for this many periods in a row: not a working set that is moving in.
THRASH_PERIODS: Final = 5
#: A guest whose footprint (held and swapped) is more than this share of the most it
#: could hold cannot fit (:func:`outsized`).
OUTSIZED_FRACTION: Final = 1.1
#: A guest stalled less than this is quiet: idle, or fitting where it is.
QUIET_STALL: Final = 0.05
#: A quiet holder whose recent working set is below this share of what it holds has
#: outgrown its turn (:meth:`LoadControl._outgrown`).
OUTGROWN_FRACTION: Final = 0.5
#: A holder whose memory grew by less than this in a period did not grow (a real
#: guest's count moves by a few pages).
GROWN_BYTES: Final = 1 * MIB
#: A turn at mean shares: long enough that moving a working set in and out (a few
#: seconds per 100 MiB at swap speeds) is a small part of it.
TURN_S: Final = 30.0


@dataclass(frozen=True)
class Turns:
    """This period's decision: who has the turn, and who is held back."""

    holder: str | None = None
    held_back: frozenset[str] = frozenset()


@dataclass
class LoadControl:
    """Whose turn it is among thrashing guests (see the module docstring).

    The group: guests that thrashed ``THRASH_PERIODS`` periods in a row join it; one
    that is not the holder leaves once it has been quiet (stalled less than
    ``QUIET_STALL``) as long, being idle or fitting even where it is held. Its own
    turn's quiet periods count: a holder quiet when its turn runs out leaves at once.
    Everyone in the group but the holder is held back, so a guest whose turn ended
    does not take its memory back from the next holder by shares. Turns stop when the
    group has fewer than two guests.
    """

    turn_s: float = TURN_S
    _group: set[str] = field(default_factory=set)
    _holder: str | None = None
    _started_s: float = 0.0
    _hot: dict[str, int] = field(default_factory=dict)  # periods thrashing in a row
    _quiet: dict[str, int] = field(default_factory=dict)  # periods quiet in a row
    _service_s: dict[str, float] = field(default_factory=dict)  # turn time per guest
    _window_bytes: dict[str, int] = field(default_factory=dict)  # last closed window's count
    _no_fit: set[str] = field(default_factory=set)  # thrashed at all their turn gave them
    _holder_peak_bytes: int = 0  # the most the holder has held in its turn
    _stuck: int = 0  # periods in a row the holder thrashed without growing
    _last_s: float | None = None

    def update(
        self,
        time_s: float,
        views: Sequence[GuestView],
        stalls: Sequence[float],
        available_bytes: int | None = None,
    ) -> Turns:
        """The turns after this period; ``stalls`` is each guest's stall fraction,
        ``available_bytes`` the memory the guests share (None: a guest is found not to
        fit only in its turn)."""
        elapsed = 0.0 if self._last_s is None else max(0.0, time_s - self._last_s)
        self._last_s = time_s
        present = {v.name: v for v in views}
        self._count(views, stalls)
        if self._holder is not None:
            self._service_s[self._holder] = self._service_s.get(self._holder, 0.0) + elapsed
            self._end_turn(time_s, present, {v.name: s for v, s in zip(views, stalls, strict=True)})
        self._group = {
            n
            for n in self._group | {n for n, k in self._hot.items() if k >= THRASH_PERIODS}
            if n in present and (n == self._holder or self._quiet.get(n, 0) < THRASH_PERIODS)
        }
        self._no_fit &= self._group  # one that left the group may fit next time
        if len(self._group) < 2:
            self._holder = None
            return Turns()
        if self._holder is None:
            if available_bytes is not None:
                self._no_fit |= {
                    n for n in self._group if outsized(present[n], views, available_bytes)
                }
            fitting = [present[n] for n in self._group if n not in self._no_fit]
            candidates = fitting or [present[n] for n in self._group]
            self._holder = min(candidates, key=self._priority).name
            self._started_s = time_s
            self._holder_peak_bytes, self._stuck = 0, 0
        return Turns(self._holder, frozenset(self._group - {self._holder}))

    def _end_turn(
        self, time_s: float, present: dict[str, GuestView], stalls: dict[str, float]
    ) -> None:
        """End the holder's turn if it is over (see the module docstring)."""
        assert self._holder is not None
        holder = present.get(self._holder)
        if holder is None or self._outgrown(holder):
            self._holder = None
        elif self._does_not_fit(holder, stalls[holder.name]):
            self._no_fit.add(holder.name)
            self._holder = None
        elif self._expired(time_s, present):
            others = self._group - {holder.name}
            if others and others <= self._no_fit:
                self._started_s = time_s  # nobody else can use the turn
            else:
                self._holder = None  # the turn is over: the holder rejoins the others

    def _does_not_fit(self, holder: GuestView, stall: float) -> bool:
        """The holder thrashed ``THRASH_PERIODS`` periods in a row while it held no
        more than it had held before in its turn: it got all it will get, and it is
        not enough."""
        held = holder.sample.allocated_bytes
        grew = held > self._holder_peak_bytes + GROWN_BYTES
        self._holder_peak_bytes = max(self._holder_peak_bytes, held)
        self._stuck = 0 if grew or stall < THRASH_STALL else self._stuck + 1
        return self._stuck >= THRASH_PERIODS

    def _count(self, views: Sequence[GuestView], stalls: Sequence[float]) -> None:
        hot, quiet = self._hot, self._quiet
        for v, stall in zip(views, stalls, strict=True):
            name, s = v.spec.name, stall if v.spec.balloon and v.sample.cooperative else 0.0
            hot[name] = hot.get(name, 0) + 1 if s >= THRASH_STALL else 0
            quiet[name] = quiet.get(name, 0) + 1 if s < QUIET_STALL else 0
        for v in views:
            if v.sample.active_bytes_observed is not None:
                self._window_bytes[v.spec.name] = v.sample.active_bytes_observed
        names = {v.spec.name for v in views}
        for table in (self._hot, self._quiet, self._window_bytes):
            for name in [n for n in table if n not in names]:
                del table[name]

    def _outgrown(self, holder: GuestView) -> bool:
        """The holder no longer needs its turn: quiet for ``THRASH_PERIODS`` and using
        less than ``OUTGROWN_FRACTION`` of what it holds (its working set shrank: a
        phase ended), by its recent working set or its last window's count. A holder
        quiet because the turn gave it its set uses all of it, and keeps its turn; one
        left holding the turn while it idles would hold the others back for nothing."""
        recent = holder.recent_working_set_bytes
        if recent is None or self._quiet.get(holder.name, 0) < THRASH_PERIODS:
            return False
        # The last closed window's count, where it is lower: the fast average still
        # remembers the phase that ended for a few half-lives (suite-1-173: a holder
        # whose working set fell from 190 to 62 MiB kept its turn 17 s more, while
        # the guest it held back stalled 90 % of the time).
        using = min(recent, self._window_bytes.get(holder.name, recent))
        return using < OUTGROWN_FRACTION * holder.sample.allocated_bytes

    def _priority(self, view: GuestView) -> tuple[float, str]:
        return (self._service_s.get(view.name, 0.0) / max(view.spec.shares, 1), view.name)

    def _expired(self, time_s: float, present: dict[str, GuestView]) -> bool:
        if self._holder is None:
            return True
        group = [present[n] for n in self._group if n in present]
        mean_shares = sum(v.spec.shares for v in group) / len(group)
        length_s = self.turn_s * present[self._holder].spec.shares / max(mean_shares, 1e-9)
        return time_s - self._started_s >= length_s


def outsized(view: GuestView, views: Sequence[GuestView], available_bytes: int) -> bool:
    """Whether ``view``'s footprint, what it holds and what it swapped, is more than
    ``OUTSIZED_FRACTION`` of the most it could hold: its limit, or ``available_bytes``
    less the other guests' reservations. Unknown without its swap figure."""
    if view.sample.swap_used_bytes is None:
        return False
    others = sum(v.spec.min_bytes for v in views if v.name != view.name)
    most = min(view.spec.limit_bytes, available_bytes - others)
    return footprint_bytes(view) > OUTSIZED_FRACTION * most
