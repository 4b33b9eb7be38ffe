"""libvirt's domain events, as the daemon follows them.

libvirt tells a client when a domain is defined, started, shut down, destroyed,
crashed, migrated away or undefined. The daemon's source still lists the running
domains every period (that is what it manages), but the events say *why* a domain
came or went, so the log reads "web: stopped: crashed" rather than a failed call.
Events come on libvirt's event-loop thread; :class:`DomainEvents` hands them to the
daemon's thread. (Balloon-change events are not used: the daemon reads each balloon's
size every period with the guest's statistics, in the same call.)
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from typing import Any, Final

#: The most events kept between two periods: a storm of them must not grow memory.
MAX_PENDING: Final = 1024

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
        self.dropped = 0  # events lost to MAX_PENDING

    def lifecycle(self, name: str, words: str) -> None:
        with self._lock:
            if len(self._pending) == MAX_PENDING:
                self.dropped += 1
            self._pending.append((name, words))

    def take(self) -> list[tuple[str, str]]:
        """The lifecycle events since the last call, oldest first."""
        with self._lock:
            taken = list(self._pending)
            self._pending.clear()
        return taken


__all__ = ["MAX_PENDING", "DomainEvents", "lifecycle_words"]
