"""What operators see of a running daemon, and how they steer it: the one seam between
the daemon's loop and everything that serves it (REST API, metrics, dashboard, CLI).

The loop publishes a :class:`Status` after every period, built from the period's
:class:`~balloonist.scheduler.Cycle`; servers read the newest one (a frozen snapshot,
so no locking beyond swapping a reference), and the last minutes of them as compact
points for charts (:mod:`balloonist.daemon.history`). Changes go the other way through
:class:`Controller`: they are validated at once (a bad one raises
:class:`~balloonist.errors.ConfigError` and changes nothing) and take effect at the
start of the next period, in the loop's thread.

Everything here is plain data and pure functions; the daemon implements ``Controller``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from balloonist.model import CpuTarget, GuestView
from balloonist.scheduler import Cycle

if TYPE_CHECKING:
    from balloonist.daemon.history import HistoryPoint


@dataclass(frozen=True)
class HostStatus:
    memory_bytes: int  # what the guests share (the budget, or less when the host is short)
    free_bytes: int
    swap_bytes: int
    swap_used_bytes: int
    state: str  # high, soft, hard, low
    cpus: int | None = None  # host processors the guests' vCPUs share, if shared


@dataclass(frozen=True)
class GuestCpuStatus:
    """A guest's processors (for a guest whose processors are shared)."""

    vcpus: int
    min_cpus: int
    max_cpus: int
    shares: int
    allocation_target_cpus: int  # processors the policy wants it to have
    online_vcpus: int  # what it has now
    balloon_vcpus: int  # held offline by its CPU balloon
    balloon_target_vcpus: int
    demand_vcpus: float  # the policy's estimate of its CPU demand


@dataclass(frozen=True)
class GuestStatus:
    name: str
    memory_bytes: int  # configured size
    min_bytes: int
    max_bytes: int
    shares: int
    allocation_target_bytes: int  # what the policy wants the guest to have
    allocated_bytes: int  # what it has now
    balloon_bytes: int
    balloon_target_bytes: int
    working_set_bytes: int  # the policy's estimate
    free_bytes: int | None
    major_faults: int
    cooperative: bool
    #: How fast the balloon's adaptive rate controller lets it inflate now; None if unknown.
    inflate_rate_bytes_per_s: float | None = None
    cpu: GuestCpuStatus | None = None
    #: Failure counters of this guest (see Status.counters for the names).
    counters: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicyStatus:
    name: str
    tax_rate: float


@dataclass(frozen=True)
class Status:
    """One period, as operators see it. ``version`` increases with every period."""

    version: int
    time_s: float
    period_s: float
    host: HostStatus
    guests: tuple[GuestStatus, ...]
    policy: PolicyStatus
    #: Failure counters of the whole daemon, cumulative (names in daemon/backend.py):
    #: cycles_skipped, uncooperative; QEMU: backend_errors_transient,
    #: backend_errors_fatal, stalls, agent_rejected; simulator: balloon_alloc_failures.
    counters: Mapping[str, int] = field(default_factory=dict)

    def guest(self, name: str) -> GuestStatus | None:
        return next((g for g in self.guests if g.name == name), None)


def status_from_cycle(
    cycle: Cycle,
    *,
    version: int,
    policy: PolicyStatus,
    counters: Mapping[str, int] | None = None,
    guest_counters: Mapping[str, Mapping[str, int]] | None = None,
) -> Status:
    snapshot = cycle.snapshot
    targets = cycle.decision.by_name()
    guests = []
    for view in snapshot.guests:
        spec, sample = view.spec, view.sample
        target = targets.get(spec.name)
        guests.append(
            GuestStatus(
                name=spec.name,
                memory_bytes=spec.memory_bytes,
                min_bytes=spec.min_bytes,
                max_bytes=spec.max_bytes if spec.max_bytes is not None else spec.memory_bytes,
                shares=spec.shares,
                allocation_target_bytes=(
                    target.allocation_bytes if target is not None else sample.allocated_bytes
                ),
                allocated_bytes=sample.allocated_bytes,
                balloon_bytes=sample.balloon_bytes,
                balloon_target_bytes=sample.balloon_target_bytes,
                working_set_bytes=view.working_set_bytes,
                free_bytes=sample.free_bytes,
                major_faults=sample.major_faults,
                cooperative=sample.cooperative,
                inflate_rate_bytes_per_s=sample.inflate_rate_bytes_per_s,
                cpu=_cpu_status(view, target.cpu if target is not None else None),
                counters=dict((guest_counters or {}).get(spec.name, {})),
            )
        )
    host = snapshot.host
    return Status(
        version=version,
        time_s=snapshot.time_s,
        period_s=snapshot.period_s,
        host=HostStatus(
            memory_bytes=host.memory_bytes,
            free_bytes=host.free_bytes,
            swap_bytes=host.swap_bytes,
            swap_used_bytes=host.swap_used_bytes,
            state=host.state.value,
            cpus=host.cpus,
        ),
        guests=tuple(guests),
        policy=policy,
        counters=dict(counters or {}),
    )


def _cpu_status(view: GuestView, target: CpuTarget | None) -> GuestCpuStatus | None:
    spec, sample = view.spec.cpu, view.sample.cpu
    if spec is None or sample is None:
        return None
    return GuestCpuStatus(
        vcpus=spec.vcpus,
        min_cpus=spec.min_cpus,
        max_cpus=spec.limit_cpus,
        shares=spec.shares,
        allocation_target_cpus=(
            target.allocation_cpus if target is not None else sample.online_vcpus
        ),
        online_vcpus=sample.online_vcpus,
        balloon_vcpus=sample.balloon_vcpus,
        balloon_target_vcpus=sample.balloon_target_vcpus,
        demand_vcpus=(
            view.cpu_demand_vcpus
            if view.cpu_demand_vcpus is not None
            else float(sample.online_vcpus)
        ),
    )


@dataclass(frozen=True)
class GuestChange:
    """A live change to one guest's spec; None leaves a field as it is."""

    min_bytes: int | None = None
    max_bytes: int | None = None
    shares: int | None = None
    #: Processors, for a guest whose processors are shared.
    cpu_min: int | None = None
    cpu_max: int | None = None
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


__all__ = [
    "Controller",
    "GuestChange",
    "GuestCpuStatus",
    "GuestStatus",
    "HostStatus",
    "PolicyStatus",
    "Status",
    "status_from_cycle",
]
