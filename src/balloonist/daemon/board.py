"""What a running daemon shows: the newest period's status, the last minutes of them,
the failure counters, and a summary in the log now and then.

The status is a frozen snapshot swapped in by reference, so servers in other threads
read the old one or the new one, never half of each.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Final

from balloonist.daemon.counters import Counts, FailureCounter
from balloonist.daemon.history import History, HistoryPoint
from balloonist.daemon.ksm_control import KsmStatus
from balloonist.daemon.mechanisms import Freed, freed_between
from balloonist.daemon.status import PolicyStatus, Status, status_from_cycle
from balloonist.scheduler import Cycle
from balloonist.units import format_size

log = logging.getLogger("balloonist.daemon")

#: A period's summary is logged at most this often (wall seconds): enough to watch a
#: daemon work, not a line per period at a period of a second or less.
LOG_EVERY_S: Final = 5.0
#: Guests named in that summary; the rest are counted.
LOG_GUESTS: Final = 6


class StatusBoard:
    """Statuses and history; everything but the readers belongs to the loop's thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._status: Status | None = None
        self._history = History()
        self._version = 0
        self.skipped = 0  # periods whose cycle failed
        self._uncooperative: Counter[str] = Counter()  # times each guest turned so
        self._was_cooperative: dict[str, bool] = {}
        self._logged_at = -math.inf
        self._freed = Freed()

    def status(self) -> Status | None:
        return self._status

    def history(self, since_version: int = 0) -> Sequence[HistoryPoint]:
        return self._history.since(since_version)

    def publish(
        self,
        cycle: Cycle | None,
        policy: PolicyStatus,
        counters: Mapping[FailureCounter, int],
        guest_counters: Mapping[str, Mapping[FailureCounter, int]],
        ksm: KsmStatus | None = None,
    ) -> None:
        """The period's status, with the backend's failure counters and the board's,
        and the host's page sharing (``ksm``) where the daemon runs it."""
        if cycle is not None:
            self._count_uncooperative(cycle)
        totals: Counts = {
            FailureCounter.CYCLES_SKIPPED: self.skipped,
            FailureCounter.UNCOOPERATIVE: sum(self._uncooperative.values()),
            **counters,
        }
        if cycle is not None:
            per_guest: dict[str, Counts] = {
                name: {FailureCounter.UNCOOPERATIVE: self._uncooperative[name], **each}
                for name, each in guest_counters.items()
            }
            status = status_from_cycle(
                cycle,
                version=self._version + 1,
                policy=policy,
                counters=totals,
                guest_counters=per_guest,
                ksm=ksm,
            )
        elif self._status is not None:
            status = replace(
                self._status, version=self._version + 1, policy=policy, counters=totals, ksm=ksm
            )
        else:
            return  # nothing seen yet
        status = self._with_freed(status)
        self._version += 1
        self._status = status  # one reference swap: readers see the old or the new
        self._history.record(status)

    def _with_freed(self, status: Status) -> Status:
        """The status with what the host got back since the last one, where it counts
        what the VMs hold (``daemon/mechanisms.py``)."""
        if not any(g.host is not None for g in status.guests):
            return status
        if (previous := self._status) is not None:
            self._freed = self._freed.then(freed_between(previous.guests, status.guests))
        return replace(status, freed=self._freed)

    def _count_uncooperative(self, cycle: Cycle) -> None:
        for view in cycle.snapshot.guests:
            cooperative = view.sample.cooperative
            if not cooperative and self._was_cooperative.get(view.name, True):
                self._uncooperative[view.name] += 1
            self._was_cooperative[view.name] = cooperative

    def log_period(self, periods: int) -> None:
        """A line on the newest status, at most every LOG_EVERY_S."""
        now = self._clock()
        status = self._status
        if status is None or now - self._logged_at < LOG_EVERY_S:
            return
        self._logged_at = now
        guests = ", ".join(
            f"{g.name} {format_size(g.allocated_bytes)} "
            f"(target {format_size(g.allocation_target_bytes)})"
            for g in status.guests[:LOG_GUESTS]
        )
        more = len(status.guests) - LOG_GUESTS
        log.info(
            "period %d, t=%.0fs: host %s, free %s; %s%s",
            periods,
            status.time_s,
            status.host.state,
            format_size(status.host.free_bytes),
            guests or "no guests",
            f", +{more} more" if more > 0 else "",
        )


__all__ = ["LOG_EVERY_S", "LOG_GUESTS", "StatusBoard"]
