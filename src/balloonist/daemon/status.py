"""What operators see of a running daemon: after every period the loop publishes a
:class:`Status`, built from the period's :class:`~balloonist.scheduler.Cycle` (a frozen
snapshot, so servers read it with no locking beyond swapping a reference).

Plain data and pure functions; :mod:`balloonist.daemon.history` keeps the last minutes
of them as compact points, :mod:`balloonist.daemon.control` is how servers reach them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from balloonist.daemon.counters import FailureCounter
from balloonist.daemon.ksm_control import KsmStatus
from balloonist.daemon.mechanisms import Freed
from balloonist.model import CpuTarget, GuestView, HostHeld, HostTruth
from balloonist.scheduler import Cycle


@dataclass(frozen=True)
class HostStatus:
    memory_bytes: int  # what the guests share (the budget, or less when the host is short)
    free_bytes: int
    swap_bytes: int
    swap_used_bytes: int
    state: str  # high, soft, hard, low
    cpus: int | None = None  # host processors the guests' vCPUs share, if shared
    #: The host's own count of the VMs' memory, where the backend reads it (real VMs).
    truth: HostTruth | None = None


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
    #: Failure counters of this guest (daemon/counters.py).
    counters: Mapping[FailureCounter, int] = field(default_factory=dict)
    #: What the host counts it holds (its QEMU process), if the backend can read it.
    host: HostHeld | None = None
    #: What it lacks of the available memory it must keep, as it reported this
    #: period (GuestSample.available_short_bytes); None if it does not report it.
    available_short_bytes: int | None = None


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
    #: Failure counters of the whole daemon, cumulative (daemon/counters.py): skipped
    #: cycles and uncooperative guests, then what the backend counts.
    counters: Mapping[FailureCounter, int] = field(default_factory=dict)
    #: The host's page sharing, where the daemon runs it (real VMs).
    ksm: KsmStatus | None = None
    #: What the host got back, by mechanism, where it counts what the VMs hold.
    freed: Freed | None = None

    def guest(self, name: str) -> GuestStatus | None:
        return next((g for g in self.guests if g.name == name), None)


def status_from_cycle(
    cycle: Cycle,
    *,
    version: int,
    policy: PolicyStatus,
    counters: Mapping[FailureCounter, int] | None = None,
    guest_counters: Mapping[str, Mapping[FailureCounter, int]] | None = None,
    ksm: KsmStatus | None = None,
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
                host=sample.host,
                available_short_bytes=sample.available_short_bytes,
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
            truth=host.truth,
        ),
        guests=tuple(guests),
        policy=policy,
        counters=dict(counters or {}),
        ksm=ksm,
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


__all__ = [
    "GuestCpuStatus",
    "GuestStatus",
    "HostStatus",
    "PolicyStatus",
    "Status",
    "status_from_cycle",
]
