"""How operators steer a running daemon: the one seam between the daemon's loop and
everything that serves it (REST API, metrics, dashboard, CLI).

Servers read the newest :class:`~balloonist.daemon.status.Status` and the last minutes
of them as compact points for charts (:mod:`balloonist.daemon.history`). Changes go
the other way through :class:`Controller`: they are validated at once (a bad one
raises :class:`~balloonist.errors.ConfigError` and changes nothing) and take effect at
the start of the next period, in the loop's thread. The daemon implements it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from balloonist.daemon.history import HistoryPoint
from balloonist.daemon.status import Status


@dataclass(frozen=True)
class GuestChange:
    """A live change to one guest's spec; None leaves a field as it is."""

    min_bytes: int | None = None
    max_bytes: int | None = None
    shares: int | None = None
    #: Processors, for a guest whose processors are shared.
    min_cpus: int | None = None
    max_cpus: int | None = None
    cpu_shares: int | None = None


class Controller(Protocol):
    """The running daemon, as its servers see it."""

    def status(self) -> Status | None:
        """The newest period's status; None before the first period."""
        ...

    def history(self, since_version: int = 0) -> Sequence[HistoryPoint]:
        """The charted figures of the last minutes' periods newer than
        ``since_version``, oldest first (see balloonist.daemon.history)."""
        ...

    def change_guest(self, name: str, change: GuestChange) -> None:
        """Validate now, apply at the next period; raise ConfigError naming the field
        (unknown guest, min above max, max above the guest's memory, shares < 1)."""
        ...

    def change_policy(self, *, tax_rate: float) -> None:
        """Same contract as change_guest, for the policy's parameters."""
        ...


__all__ = ["Controller", "GuestChange"]
