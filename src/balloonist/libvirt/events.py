"""libvirt's domain events, as the daemon follows them.

libvirt tells a client when a domain is defined, started, shut down, destroyed,
crashed, migrated away or undefined. The daemon's source still lists the running
domains every period (that is what it manages), but the events say *why* a domain
came or went, so the log reads "web: stopped: crashed" rather than a failed call.

Balloon-change events report each balloon's size as it moves (QEMU sends them at most
once a second, and always the last one). The daemon reads the size every period
anyway; what the events add is the order of the moves, so a balloon that had come to
rest at balloonist's target and then moved away from it is seen for what it is: a
move balloonist did not ask for (``virsh setmem``, or the guest deflating it on OOM);
see :class:`~balloonist.libvirt.port.DomainBalloon`.

Events come on libvirt's event-loop thread; :class:`DomainEvents` hands them to the
daemon's thread.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from typing import Any, Final

#: The most events kept between two periods: a storm of them must not grow memory.
MAX_PENDING: Final = 1024
#: Balloon sizes kept per domain between two reads of them (the newest win).
MAX_BALLOON_MOVES: Final = 64

# libvirt's lifecycle event and detail names (stable across versions), in words.
_LIFECYCLE: Final[Mapping[str, tuple[str, Mapping[str, str]]]] = {
    "DEFINED": ("defined", {}),
    "UNDEFINED": ("undefined", {}),
    "STARTED": (
        "started",
        {"MIGRATED": "migrated in", "RESTORED": "restored", "FROM_SNAPSHOT": "from a snapshot"},
    ),
    "STOPPED": (
        "stopped",
        {
            "SHUTDOWN": "shut down",
            "DESTROYED": "destroyed",
            "CRASHED": "crashed",
            "MIGRATED": "migrated away",
            "SAVED": "saved",
            "FAILED": "failed",
            "FROM_SNAPSHOT": "for a snapshot",
        },
    ),
    "CRASHED": ("crashed", {}),
}


def lifecycle_words(lib: Any, event: int, detail: int) -> str | None:
    """A lifecycle event in words ("stopped: crashed"), or None for events the
    daemon does not care about (paused, resumed, power management)."""
    for name, (word, details) in _LIFECYCLE.items():
        if getattr(lib, f"VIR_DOMAIN_EVENT_{name}", None) != event:
            continue
        for detail_name, detail_word in details.items():
            if getattr(lib, f"VIR_DOMAIN_EVENT_{name}_{detail_name}", None) == detail:
                return f"{word}: {detail_word}"
        return word
    return None


class DomainEvents:
    """Events collected on libvirt's thread, taken on the daemon's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: deque[tuple[str, str]] = deque(maxlen=MAX_PENDING)
        self._balloons: dict[str, deque[int]] = {}  # name -> sizes in KiB, oldest first
        self.dropped = 0  # events lost to MAX_PENDING or MAX_BALLOON_MOVES

    def lifecycle(self, name: str, words: str) -> None:
        with self._lock:
            if len(self._pending) == MAX_PENDING:
                self.dropped += 1
            self._pending.append((name, words))

    def balloon(self, name: str, actual_kib: int) -> None:
        with self._lock:
            moves = self._balloons.get(name)
            if moves is None:
                if len(self._balloons) >= MAX_PENDING:
                    self.dropped += 1
                    return
                moves = self._balloons[name] = deque(maxlen=MAX_BALLOON_MOVES)
            elif len(moves) == MAX_BALLOON_MOVES:
                self.dropped += 1
            moves.append(actual_kib)

    def balloon_moves(self, name: str) -> list[int]:
        """The sizes (KiB) ``name``'s balloon was reported at since the last call,
        oldest first."""
        with self._lock:
            moves = self._balloons.pop(name, None)
        return [] if moves is None else list(moves)

    def take(self) -> list[tuple[str, str]]:
        """The lifecycle events since the last call, oldest first."""
        with self._lock:
            taken = list(self._pending)
            self._pending.clear()
        return taken


__all__ = ["MAX_BALLOON_MOVES", "MAX_PENDING", "DomainEvents", "lifecycle_words"]
