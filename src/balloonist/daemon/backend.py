"""What the daemon's one loop needs of whatever runs the guests: the ``Backend`` port.

A backend is the scheduler's :class:`~balloonist.scheduler.Hypervisor` plus what a
long-running daemon does around it: pick up guests added or removed between periods,
let a period's actions take effect, wait between periods, apply an operator's change
to a guest's spec, count failures, and say where each guest's balloon stands (for the
state file, :mod:`balloonist.daemon.statefile`) and resume from there after a restart.

Two adapters: :class:`~balloonist.daemon.qemu_backend.QemuBackend` (the VMs recorded
in a state directory, over QMP or the balloon agent) and
:class:`~balloonist.daemon.sim_backend.SimBackend` (a simulated host in accelerated
time). The loop itself is :class:`~balloonist.daemon.service.DaemonLoop`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Literal, Protocol

from balloonist.daemon.control import GuestChange
from balloonist.daemon.counters import Counts
from balloonist.daemon.ksm_control import KsmStatus
from balloonist.errors import ConfigError
from balloonist.model import CpuSpec, GuestSpec
from balloonist.scheduler import Hypervisor
from balloonist.units import PAGE_SIZE_BYTES, format_size

BackendKind = Literal["qemu", "libvirt", "sim"]


@dataclass(frozen=True)
class GuestState:
    """Where one guest's memory stands, as recorded in the state file."""

    allocated_bytes: int  # what it holds now, by the backend's measure
    balloon_bytes: int  # the balloon's actual size
    balloon_target_bytes: int | None  # the last target applied; None if none yet


@dataclass(frozen=True)
class ResumePoint:
    """What a restarted daemon resumes from (read from the state file)."""

    time_s: float | None  # the backend's own time (the simulator's), if it keeps one
    guests: Mapping[str, GuestState]


class Backend(Protocol):
    """The guests and their host, as the daemon's loop drives them."""

    @property
    def kind(self) -> BackendKind: ...

    @property
    def hypervisor(self) -> Hypervisor:
        """The scheduler's port onto the guests."""
        ...

    @property
    def period_s(self) -> float:
        """One period in the backend's own time."""
        ...

    @property
    def wall_period_s(self) -> float:
        """One period in wall-clock time (shorter than ``period_s`` when accelerated)."""
        ...

    @property
    def resumes_estimates(self) -> bool:
        """Whether working-set estimates saved before a restart still hold after it
        (true when the backend's clock resumes with it, as the simulator's does)."""
        ...

    def refresh(self) -> None:
        """Before a period: pick up guests added or removed since the last one."""
        ...

    def settle(self) -> None:
        """After a period's targets are applied: let them take effect (the simulator
        runs its guests for one period; real guests run on their own)."""
        ...

    def wait(self, seconds: float, stop: Callable[[], bool]) -> None:
        """Between periods: ``seconds`` of wall time, or until ``stop()``."""
        ...

    def close(self) -> None: ...

    def configured_specs(self) -> list[GuestSpec]:
        """Every managed guest's spec as configured (not as held when uncooperative)."""
        ...

    def capacity_bytes(self) -> int:
        """The memory the guests share at most: their reservations must fit in it."""
        ...

    def apply_change(self, name: str, change: GuestChange) -> None:
        """Apply a checked change to a guest's spec (in the loop's thread)."""
        ...

    def time_s(self) -> float | None:
        """The backend's own clock, if a restart should resume it; else None."""
        ...

    def guest_states(self) -> dict[str, GuestState]: ...

    def ksm(self) -> KsmStatus | None:
        """The host's page sharing as the last period left it; None where the
        backend has none (the simulator)."""
        ...

    def resume(self, point: ResumePoint) -> None:
        """Before the first period: continue from a saved state (see the state file)."""
        ...

    def counters(self) -> Counts:
        """Failure counters of the whole backend, cumulative."""
        ...

    def guest_counters(self) -> dict[str, Counts]: ...


def merge_changes(first: GuestChange | None, then: GuestChange) -> GuestChange:
    """``first`` followed by ``then``: the later value of each field wins."""
    if first is None:
        return then
    later = {k: v for k, v in dataclasses.asdict(then).items() if v is not None}
    return replace(first, **later)


def changed_spec(spec: GuestSpec, change: GuestChange) -> GuestSpec:
    """``spec`` with ``change`` applied; a bad change raises ConfigError naming the field
    (``min_bytes``, ``max_bytes``, ``shares``, ``min_cpus``, ``max_cpus`` or
    ``cpu_shares``) and changes nothing."""
    for field, value in (("min_bytes", change.min_bytes), ("max_bytes", change.max_bytes)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"must be a size in bytes, got {value!r}", where=field, field=field)
        if value % PAGE_SIZE_BYTES:
            raise ConfigError(
                f"{value} is not a whole number of 4KiB pages", where=field, field=field
            )
    if change.shares is not None and (
        isinstance(change.shares, bool) or not isinstance(change.shares, int) or change.shares < 1
    ):
        raise ConfigError(
            f"must be at least 1, got {change.shares!r}", where="shares", field="shares"
        )
    lo = spec.min_bytes if change.min_bytes is None else change.min_bytes
    hi = spec.limit_bytes if change.max_bytes is None else change.max_bytes
    if hi > spec.memory_bytes:
        raise ConfigError(
            f"max {format_size(hi)} is above the guest's memory {format_size(spec.memory_bytes)}",
            where="max_bytes",
            field="max_bytes",
        )
    if hi < PAGE_SIZE_BYTES:
        raise ConfigError("max must be at least one page", where="max_bytes", field="max_bytes")
    if lo > hi:
        named = "min_bytes" if change.min_bytes is not None else "max_bytes"
        raise ConfigError(
            f"min {format_size(lo)} is above max {format_size(hi)}", where=named, field=named
        )
    shares = spec.shares if change.shares is None else change.shares
    return replace(spec, min_bytes=lo, max_bytes=hi, shares=shares, cpu=_changed_cpu(spec, change))


def _changed_cpu(spec: GuestSpec, change: GuestChange) -> CpuSpec | None:
    given = {
        field: value
        for field, value in (
            ("min_cpus", change.min_cpus),
            ("max_cpus", change.max_cpus),
            ("cpu_shares", change.cpu_shares),
        )
        if value is not None
    }
    if not given:
        return spec.cpu
    field = next(iter(given))
    if spec.cpu is None:
        raise ConfigError("the guest's processors are not shared", where=field, field=field)
    for name, value in given.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(
                f"must be a whole number of at least 1, got {value!r}", where=name, field=name
            )
    cpu = replace(
        spec.cpu,
        min_cpus=given.get("min_cpus", spec.cpu.min_cpus),
        max_cpus=given.get("max_cpus", spec.cpu.limit_cpus),
        shares=given.get("cpu_shares", spec.cpu.shares),
    )
    try:
        cpu.check(f"guest {spec.name!r}")
    except ConfigError as exc:
        # Name the field the rule is about, if the change set it; else the one it set.
        named = exc.field if exc.field in given else field
        raise ConfigError(exc.message, where=named, field=named) from None
    return cpu


__all__ = [
    "Backend",
    "BackendKind",
    "GuestState",
    "ResumePoint",
    "changed_spec",
    "merge_changes",
]
