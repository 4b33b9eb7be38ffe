"""The last minutes of a running daemon, for charts: a bounded ring of compact points,
one per published :class:`~balloonist.daemon.status.Status`.

A Status holds everything about a period; a chart needs a few sizes per guest. Keeping
Status objects for ten minutes of 200 guests would cost about a hundred MiB, so a
point keeps only the charted figures, as tuples in the order of ``names`` (which is
shared between points while the set of guests stays the same).

The daemon's loop appends (``record``); servers read from their own threads
(``since``); one lock guards the ring.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Final

from balloonist.daemon.status import Status

#: Points kept: ten minutes at the default 1 s period, "the last minutes" an operator
#: looks back on; older points fall off.
HISTORY_POINTS: Final = 600


@dataclass(frozen=True, slots=True)
class HistoryPoint:
    """One period's charted figures; every per-guest tuple is in the order of ``names``."""

    version: int
    time_s: float
    host_memory_bytes: int
    host_free_bytes: int
    host_state: str
    host_cpus: int | None
    names: tuple[str, ...]
    allocated_bytes: tuple[int, ...]
    allocation_target_bytes: tuple[int, ...]
    balloon_bytes: tuple[int, ...]
    balloon_target_bytes: tuple[int, ...]
    working_set_bytes: tuple[int, ...]
    #: Processors, None for a guest whose processors are not shared.
    online_vcpus: tuple[int | None, ...]
    allocation_target_cpus: tuple[int | None, ...]


#: The per-guest series a point carries, as named in GuestStatus and the API.
GUEST_SERIES: Final = (
    "allocated_bytes",
    "allocation_target_bytes",
    "balloon_bytes",
    "balloon_target_bytes",
    "working_set_bytes",
    "online_vcpus",
    "allocation_target_cpus",
)


def point_of(status: Status, names: tuple[str, ...] | None = None) -> HistoryPoint:
    """The point for ``status``; ``names`` is reused when it lists the same guests."""
    own = tuple(g.name for g in status.guests)
    if names != own:
        names = own
    guests = status.guests
    return HistoryPoint(
        version=status.version,
        time_s=status.time_s,
        host_memory_bytes=status.host.memory_bytes,
        host_free_bytes=status.host.free_bytes,
        host_state=status.host.state,
        host_cpus=status.host.cpus,
        names=names,
        allocated_bytes=tuple(g.allocated_bytes for g in guests),
        allocation_target_bytes=tuple(g.allocation_target_bytes for g in guests),
        balloon_bytes=tuple(g.balloon_bytes for g in guests),
        balloon_target_bytes=tuple(g.balloon_target_bytes for g in guests),
        working_set_bytes=tuple(g.working_set_bytes for g in guests),
        online_vcpus=tuple(None if g.cpu is None else g.cpu.online_vcpus for g in guests),
        allocation_target_cpus=tuple(
            None if g.cpu is None else g.cpu.allocation_target_cpus for g in guests
        ),
    )


class History:
    """The newest ``capacity`` points, oldest first."""

    def __init__(self, capacity: int = HISTORY_POINTS) -> None:
        if capacity < 1:
            raise ValueError(f"a history keeps at least one point, not {capacity}")
        self._points: deque[HistoryPoint] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def record(self, status: Status) -> None:
        with self._lock:
            last = self._points[-1] if self._points else None
            if last is not None and status.version <= last.version:
                raise ValueError(f"status version {status.version} is not after {last.version}")
            self._points.append(point_of(status, last.names if last is not None else None))

    def since(self, version: int = 0) -> tuple[HistoryPoint, ...]:
        """The points newer than ``version``, oldest first (all of them for 0)."""
        with self._lock:
            points = tuple(self._points)
        # Versions increase along the ring: skip the old ones from the left.
        start = next((i for i, p in enumerate(points) if p.version > version), len(points))
        return points[start:]


__all__ = ["GUEST_SERIES", "HISTORY_POINTS", "History", "HistoryPoint", "point_of"]
