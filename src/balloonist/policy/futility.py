"""Which thrashing guests more memory barely helps.

A guest whose working set is a uniform set or a scan larger than anything it can get
does little more work with more memory short of the whole set: each page it gains
removes one miss in every hundred or so. Its stall claims memory all the same, and
under the demand policy a stalled guest makes the host *contended*: the others' demand
follows their recent working set, so a guest between two busy phases loses its set
to it, and faults it back when its next phase starts (suite-6-6: a periodic 129 MiB
set lost to a 163 MiB uniform set that never fit; the uniform guest went from 12 to
70 k references a second, the periodic one lost a third of its million).

A guest is *futile* while it thrashes and has been seen, in the same episode, settled
(``SETTLED_PERIODS`` at about one size) at ``FUTILE_GROWTH`` more than it holds now
while working less than ``FUTILE_GAIN`` more of its time than it does now. Work is
measured as the share of time not stalled (PSI or major faults, as the stall is). An
episode starts when the guest first thrashes and ends once it has been quiet
``THRASH_PERIODS`` periods in a row (a new phase may fit); what it did at its peak is
forgotten ``FUTILE_MEMORY_S`` after it was last there. The first time a guest grows it
is not futile: the policy learns that only by giving it the memory once.

Pure: ``update`` takes the period's views and stall fractions and returns the names
of the futile guests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from balloonist.model import GuestView
from balloonist.policy.loadcontrol import QUIET_STALL, THRASH_PERIODS, THRASH_STALL

__all__ = ["FUTILE_GAIN", "FUTILE_GROWTH", "FUTILE_MEMORY_S", "SETTLED_PERIODS", "Futility"]

#: Held this share more than now...
FUTILE_GROWTH: Final = 0.25
#: ...and worked less than this share of its time more than now.
FUTILE_GAIN: Final = 0.10
#: A guest's stall counts for what it holds once it has held about that much for this
#: many periods: the smoothed stall lags a change in either direction (a guest being
#: squeezed from a size that fitted stalls while it still holds it).
SETTLED_PERIODS: Final = 3
#: What a guest did at its peak is forgotten this long after it was last there: its
#: working set may have changed since, and a guest never given the memory again
#: could not show it.
FUTILE_MEMORY_S: Final = 45.0


@dataclass
class _Episode:
    """The most a guest held settled in its episode, and the least it stalled
    there."""

    peak_bytes: int = 0
    peak_stall: float = 1.0
    peak_s: float = 0.0  # when it was last settled at the peak


@dataclass
class Futility:
    """Each thrashing guest's episode, and whether it is futile now (see the module
    docstring)."""

    _episodes: dict[str, _Episode] = field(default_factory=dict)
    _quiet: dict[str, int] = field(default_factory=dict)  # periods quiet in a row
    _held: dict[str, int] = field(default_factory=dict)  # held at the last period
    _settled: dict[str, int] = field(default_factory=dict)  # periods settled in a row

    def update(
        self, time_s: float, views: Sequence[GuestView], stalls: Sequence[float]
    ) -> frozenset[str]:
        """The futile guests after this period; ``stalls`` is each guest's stall."""
        futile: set[str] = set()
        for view, stall in zip(views, stalls, strict=True):
            name, held = view.name, view.sample.allocated_bytes
            self._quiet[name] = self._quiet.get(name, 0) + 1 if stall < QUIET_STALL else 0
            before = self._held.get(name, -1)
            near = abs(held - before) <= _NEAR_PEAK * max(before, 1)
            self._settled[name] = self._settled.get(name, 0) + 1 if near else 0
            self._held[name] = held
            episode = self._episodes.get(name)
            if episode is None:
                if stall < THRASH_STALL:
                    continue
                episode = self._episodes[name] = _Episode(peak_s=time_s)
            elif self._quiet[name] >= THRASH_PERIODS:
                del self._episodes[name]
                continue
            elif time_s - episode.peak_s > FUTILE_MEMORY_S:
                episode.peak_bytes, episode.peak_stall = 0, 1.0  # the workload may have moved
            if stall >= THRASH_STALL and self._futile(episode, held, stall):
                futile.add(name)
            if self._settled[name] >= SETTLED_PERIODS:
                self._observe(episode, time_s, held, stall)
        present = {v.name for v in views}
        for table in (self._episodes, self._quiet, self._held, self._settled):
            for gone in [n for n in table if n not in present]:
                del table[gone]
        return frozenset(futile)

    @staticmethod
    def _futile(episode: _Episode, held_bytes: int, stall: float) -> bool:
        # Never seen settled (no peak yet) says nothing, even of a guest holding none.
        seen = episode.peak_bytes > 0
        bigger = seen and episode.peak_bytes >= (1.0 + FUTILE_GROWTH) * held_bytes
        gained = (1.0 - episode.peak_stall) - (1.0 - stall)
        return bigger and gained < FUTILE_GAIN

    @staticmethod
    def _observe(episode: _Episode, time_s: float, held_bytes: int, stall: float) -> None:
        """A settled period: a new peak starts its stall afresh, and at the peak
        (within a page cache's wobble) the least stall is kept."""
        if held_bytes > episode.peak_bytes * (1.0 + _NEAR_PEAK):
            episode.peak_bytes, episode.peak_stall, episode.peak_s = held_bytes, stall, time_s
        elif held_bytes >= episode.peak_bytes * (1.0 - _NEAR_PEAK):
            episode.peak_bytes = max(episode.peak_bytes, held_bytes)
            episode.peak_stall = min(episode.peak_stall, stall)
            episode.peak_s = time_s


#: Holding within this share of a size counts as holding it: settled at it from one
#: period to the next, or at the peak (a page cache's wobble).
_NEAR_PEAK: Final = 0.03
