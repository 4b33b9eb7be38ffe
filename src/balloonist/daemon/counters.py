"""The failure modes a daemon counts, each a counter of its own.

``Status.counters`` (the daemon's) and ``GuestStatus.counters`` (one guest's) map
these to counts, cumulative since the daemon started; a backend reports only the
ones that can happen to it. The names are the API's keys and, after
``balloonist_`` (``balloonist_guest_`` per guest), the metrics' names.
"""

from __future__ import annotations

import enum


class FailureCounter(enum.StrEnum):
    CYCLES_SKIPPED = "cycles_skipped"
    UNCOOPERATIVE = "uncooperative"
    TRANSIENT_ERRORS = "backend_errors_transient"
    FATAL_ERRORS = "backend_errors_fatal"
    STALLS = "stalls"
    AGENT_REJECTED = "agent_rejected"
    BALLOON_FAILURES = "balloon_alloc_failures"
    KSM_ERRORS = "ksm_errors"
    HOST_PAGING_ERRORS = "host_paging_errors"

    @property
    def meaning(self) -> str:
        """What one count is, for people (the metrics' help)."""
        return _MEANINGS[self]


_MEANINGS = {
    FailureCounter.CYCLES_SKIPPED: "A period whose cycle failed (the daemon's only).",
    FailureCounter.UNCOOPERATIVE: "A guest turned uncooperative, whatever the cause.",
    FailureCounter.TRANSIENT_ERRORS: "A QMP or agent request failed; retried next period.",
    FailureCounter.FATAL_ERRORS: "A QMP or agent request failed for good; the VM is left alone.",
    FailureCounter.STALLS: "The pacer found a balloon that stopped following its target.",
    FailureCounter.AGENT_REJECTED: "An agent message refused for breaking the protocol.",
    FailureCounter.BALLOON_FAILURES: "A simulated balloon allocation that came back short.",
    FailureCounter.KSM_ERRORS: "Reading or setting the host's KSM failed (the daemon's only).",
    FailureCounter.HOST_PAGING_ERRORS: "Reading or capping a VM's memory cgroup failed.",
}

#: A set of counts, as Status and GuestStatus carry them.
Counts = dict[FailureCounter, int]

__all__ = ["Counts", "FailureCounter"]
