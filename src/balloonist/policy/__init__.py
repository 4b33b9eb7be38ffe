"""Resource-scheduling policies: pure functions from a :class:`Snapshot` to a :class:`Decision`.

A policy never does I/O, never sleeps and never reads a clock: the snapshot carries
the time. State a policy needs across periods (the host free-memory state, working-set
averages) is kept by the scheduler's collect stage and handed in through the snapshot.
"""

from __future__ import annotations

from typing import Final, Protocol

from balloonist.model import Decision, Snapshot

#: The policy used when none is named: the scenario's, the daemon's, the demo's
#: (``balloonist.policy.demand``). Kept here, away from numpy, for light importers.
DEFAULT_POLICY: Final = "demand"


class Policy(Protocol):
    """Decides each guest's allocation and balloon target for one period."""

    @property
    def name(self) -> str: ...

    def decide(self, snapshot: Snapshot) -> Decision: ...
