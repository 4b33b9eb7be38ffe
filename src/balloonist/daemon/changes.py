"""Operators' changes, queued between periods: checked when asked, taken by the loop.

Servers run in their own threads; the loop owns the guests. A change is validated at
once against the guests as the loop last saw them (plus the changes already queued),
so a bad one raises :class:`~balloonist.errors.ConfigError` naming its field and
changes nothing; a good one waits for the next period, when the loop takes the whole
queue at once (:meth:`ChangeQueue.take`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from balloonist.daemon.backend import changed_spec, merge_changes
from balloonist.daemon.control import GuestChange
from balloonist.errors import ConfigError
from balloonist.model import GuestSpec
from balloonist.units import format_size

log = logging.getLogger("balloonist.daemon")


@dataclass(frozen=True)
class Taken:
    """Everything queued since the last period."""

    guests: Mapping[str, GuestChange] = field(default_factory=dict)
    tax_rate: float | None = None


class ChangeQueue:
    """Thread-safe; :meth:`update` and :meth:`take` belong to the loop's thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._specs: dict[str, GuestSpec] = {}
        self._capacity_bytes = 0
        self._guests: dict[str, GuestChange] = {}
        self._tax_rate: float | None = None

    def update(self, specs: Mapping[str, GuestSpec], capacity_bytes: int) -> None:
        """The guests as configured now; queued changes of guests gone are dropped."""
        with self._lock:
            self._specs = dict(specs)
            self._capacity_bytes = capacity_bytes
            for gone in set(self._guests) - set(specs):
                log.warning("%s: no longer managed; its queued change is dropped", gone)
                del self._guests[gone]

    def guest(self, name: str, change: GuestChange) -> None:
        """Queue a change of one guest's spec, or raise ConfigError naming the field."""
        with self._lock:
            spec = self._specs.get(name)
            if spec is None:
                raise ConfigError(f"unknown guest {name!r}", where="name", field="name")
            merged = merge_changes(self._guests.get(name), change)
            updated = changed_spec(spec, merged)
            reserved = updated.min_bytes + sum(
                self._queued_spec(other).min_bytes for other in self._specs if other != name
            )
            if updated.min_bytes > spec.min_bytes and reserved > self._capacity_bytes:
                raise ConfigError(
                    f"the guests' reservations would add up to {format_size(reserved)}, more "
                    f"than the {format_size(self._capacity_bytes)} they share",
                    where="min_bytes",
                    field="min_bytes",
                )
            self._guests[name] = merged

    def tax_rate(self, tax_rate: float) -> None:
        """Queue a new tax rate for the policy, or raise ConfigError."""
        if (
            isinstance(tax_rate, bool)
            or not isinstance(tax_rate, int | float)
            or not 0.0 <= tax_rate < 1.0
        ):
            raise ConfigError(
                f"must be at least 0 and below 1, got {tax_rate!r}",
                where="tax_rate",
                field="tax_rate",
            )
        with self._lock:
            self._tax_rate = float(tax_rate)

    def take(self) -> Taken:
        """Everything queued, leaving the queue empty."""
        with self._lock:
            taken = Taken(self._guests, self._tax_rate)
            self._guests, self._tax_rate = {}, None
        return taken

    def _queued_spec(self, name: str) -> GuestSpec:
        change = self._guests.get(name)
        spec = self._specs[name]
        return spec if change is None else changed_spec(spec, change)


__all__ = ["ChangeQueue", "Taken"]
