"""Hand-built snapshots for policy tests: guests whose balloon has reached its register."""

from __future__ import annotations

from balloonist.model import (
    Decision,
    GuestSample,
    GuestSpec,
    GuestView,
    HostSample,
    HostState,
    Snapshot,
)
from balloonist.units import MIB


def guest(
    name: str,
    *,
    memory_mib: int = 1000,
    working_set_mib: int = 0,
    shares: int = 1000,
    min_mib: int = 0,
    max_mib: int | None = None,
    balloon: bool = True,
    register_mib: int = 0,
    allocated_mib: int | None = None,
    free_mib: int | None = None,
) -> GuestView:
    """A guest whose balloon has reached its register (by default allocated = memory -
    register)."""
    spec = GuestSpec(
        name=name,
        memory_bytes=memory_mib * MIB,
        min_bytes=min_mib * MIB,
        max_bytes=None if max_mib is None else max_mib * MIB,
        shares=shares,
        balloon=balloon,
    )
    allocated = memory_mib - register_mib if allocated_mib is None else allocated_mib
    sample = GuestSample(
        name=name,
        allocated_bytes=allocated * MIB,
        balloon_bytes=register_mib * MIB,
        balloon_target_bytes=register_mib * MIB,
        free_bytes=None if free_mib is None else free_mib * MIB,
    )
    return GuestView(spec, sample, working_set_mib * MIB)


def snapshot(
    *guests: GuestView,
    host_mib: int = 1000,
    free_mib: int | None = None,
    state: HostState = HostState.SOFT,
    time_s: float = 0.0,
    period_s: float = 1.0,
) -> Snapshot:
    """A host of ``host_mib`` with 2 % free unless told (the SOFT state's range)."""
    host = HostSample(
        time_s=time_s,
        memory_bytes=host_mib * MIB,
        free_bytes=(host_mib // 50 if free_mib is None else free_mib) * MIB,
        swap_bytes=0,
        swap_used_bytes=0,
        state=state,
    )
    return Snapshot(time_s=time_s, period_s=period_s, host=host, guests=tuple(guests))


def allocations_mib(decision: Decision) -> list[float]:
    return [t.allocation_bytes / MIB for t in decision.targets]


def balloons_mib(decision: Decision) -> list[float]:
    return [t.balloon_bytes / MIB for t in decision.targets]
