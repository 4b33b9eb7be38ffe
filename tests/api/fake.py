"""A fake daemon behind the Controller protocol: statuses built from control.py's
dataclasses, and changes validated with the daemon's rules, applied at ``advance()``
(the next period), as the real loop does. Every status it publishes goes into its
history, as the daemon's do."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import replace

from balloonist.daemon.control import GuestChange
from balloonist.daemon.counters import FailureCounter
from balloonist.daemon.history import History, HistoryPoint
from balloonist.daemon.status import GuestCpuStatus, GuestStatus, HostStatus, PolicyStatus, Status
from balloonist.errors import ConfigError
from balloonist.model import HostHeld
from balloonist.units import GIB, MIB, format_size


def make_guest(name: str, **overrides: object) -> GuestStatus:
    fields: dict[str, object] = {
        "name": name,
        "memory_bytes": 2 * GIB,
        "min_bytes": 256 * MIB,
        "max_bytes": 2 * GIB,
        "shares": 1000,
        "allocation_target_bytes": 1536 * MIB,
        "allocated_bytes": 1 * GIB,
        "balloon_bytes": 1 * GIB,
        "balloon_target_bytes": 512 * MIB,
        "working_set_bytes": 700 * MIB,
        "free_bytes": 300 * MIB,
        "major_faults": 12,
        "cooperative": True,
        "inflate_rate_bytes_per_s": 48.0 * MIB,
        "cpu": GuestCpuStatus(
            vcpus=4,
            min_cpus=1,
            max_cpus=4,
            shares=1000,
            allocation_target_cpus=3,
            online_vcpus=2,
            balloon_vcpus=2,
            balloon_target_vcpus=1,
            demand_vcpus=2.5,
        ),
        "counters": {FailureCounter.STALLS: 1},
        "host": HostHeld(
            held_bytes=900 * MIB,
            guest_ram_bytes=800 * MIB,
            ksm_merged_bytes=30 * MIB,
            ksm_saved_bytes=20 * MIB,
        ),
    }
    fields.update(overrides)
    return GuestStatus(**fields)  # type: ignore[arg-type]


def make_status(version: int = 1, guests: tuple[GuestStatus, ...] | None = None) -> Status:
    if guests is None:
        guests = (
            make_guest("web"),
            make_guest(
                "db",
                shares=2000,
                allocated_bytes=2 * GIB,
                balloon_bytes=0,
                balloon_target_bytes=0,
                cooperative=False,
                free_bytes=None,
                inflate_rate_bytes_per_s=None,
                cpu=None,
                counters={FailureCounter.STALLS: 3, FailureCounter.TRANSIENT_ERRORS: 2},
                # Its RAM not told apart; uncooperative, so the host pages it.
                host=HostHeld(held_bytes=GIB, cap_bytes=GIB, swapped_bytes=256 * MIB),
            ),
        )
    return Status(
        version=version,
        time_s=float(version),
        period_s=1.0,
        host=HostStatus(
            memory_bytes=6 * GIB,
            free_bytes=3 * GIB,
            swap_bytes=1 * GIB,
            swap_used_bytes=0,
            state="soft",
            cpus=8,
        ),
        guests=guests,
        policy=PolicyStatus(name="shares", tax_rate=0.75),
        counters={
            FailureCounter.TRANSIENT_ERRORS: 4,
            FailureCounter.STALLS: 2,
            FailureCounter.UNCOOPERATIVE: 1,
            FailureCounter.AGENT_REJECTED: 0,
        },
    )


class FakeController:
    """Implements balloonist.daemon.control.Controller over a status the test sets."""

    def __init__(self, status: Status | None = None) -> None:
        self._status = status
        self._history = History()
        if status is not None:
            self._history.record(status)
        self._lock = threading.Lock()
        self.guest_changes: list[tuple[str, GuestChange]] = []
        self.policy_changes: list[float] = []
        #: Runs at the start of the next change_guest: the daemon's world moving on
        #: between the status a request looked at and the change.
        self.before_next_change: Callable[[], None] | None = None

    def status(self) -> Status | None:
        return self._status

    def history(self, since_version: int = 0) -> Sequence[HistoryPoint]:
        return self._history.since(since_version)

    def publish(self, status: Status | None) -> None:
        """Make ``status`` the newest; a version above the last also joins the history
        (tests publish older or repeated versions to see what servers make of them)."""
        self._status = status
        points = self._history.since()
        if status is not None and (not points or status.version > points[-1].version):
            self._history.record(status)

    def change_guest(self, name: str, change: GuestChange) -> None:
        with self._lock:
            if self.before_next_change is not None:
                hook, self.before_next_change = self.before_next_change, None
                hook()
            status = self._status
            guest = status.guest(name) if status is not None else None
            if guest is None:
                raise ConfigError(f"unknown guest {name!r}", field="name")
            guest = self._pending(guest)
            where = f"guest {name!r}"
            lo = change.min_bytes if change.min_bytes is not None else guest.min_bytes
            hi = change.max_bytes if change.max_bytes is not None else guest.max_bytes
            if change.shares is not None and change.shares < 1:
                raise ConfigError(
                    f"shares must be positive, got {change.shares}", where=where, field="shares"
                )
            if hi > guest.memory_bytes:
                raise ConfigError(
                    f"max {format_size(hi)} is above memory {format_size(guest.memory_bytes)}",
                    where=where,
                    field="max_bytes",
                )
            if lo > hi:
                raise ConfigError(
                    f"min {format_size(lo)} is above max {format_size(hi)}",
                    where=where,
                    field="min_bytes",
                )
            cpu_given = [
                f for f in ("min_cpus", "max_cpus", "cpu_shares") if getattr(change, f) is not None
            ]
            if cpu_given and guest.cpu is None:
                raise ConfigError(
                    "the guest's processors are not shared", where=cpu_given[0], field=cpu_given[0]
                )
            if guest.cpu is not None:
                cpu_lo = change.min_cpus if change.min_cpus is not None else guest.cpu.min_cpus
                cpu_hi = change.max_cpus if change.max_cpus is not None else guest.cpu.max_cpus
                if cpu_lo > cpu_hi:
                    raise ConfigError(
                        f"min_cpus {cpu_lo} is above max_cpus {cpu_hi}",
                        where=where,
                        field="min_cpus",
                    )
            self.guest_changes.append((name, change))

    def change_policy(self, *, tax_rate: float) -> None:
        with self._lock:
            if not 0.0 <= tax_rate < 1.0:
                raise ConfigError(f"tax_rate must be in [0, 1), got {tax_rate}", field="tax_rate")
            self.policy_changes.append(tax_rate)

    def _pending(self, guest: GuestStatus) -> GuestStatus:
        for name, change in self.guest_changes:
            if name == guest.name:
                guest = replace(
                    guest,
                    min_bytes=change.min_bytes if change.min_bytes is not None else guest.min_bytes,
                    max_bytes=change.max_bytes if change.max_bytes is not None else guest.max_bytes,
                    shares=change.shares if change.shares is not None else guest.shares,
                )
        return guest

    def advance(self) -> Status:
        """The next period: pending changes applied, version + 1."""
        with self._lock:
            assert self._status is not None
            current = self._status
            guests = tuple(self._pending(g) for g in current.guests)
            policy = current.policy
            if self.policy_changes:
                policy = replace(policy, tax_rate=self.policy_changes[-1])
            self.guest_changes.clear()
            self.policy_changes.clear()
            self._status = replace(
                current, version=current.version + 1, time_s=current.time_s + 1, guests=guests
            )
            self._status = replace(self._status, policy=policy)
            self._history.record(self._status)
            return self._status
