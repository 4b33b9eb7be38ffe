"""Snapshots for policy tests: hand-built ones (guests whose balloon has reached its
register) and drawn ones for the property tests."""

from __future__ import annotations

from hypothesis import strategies as st

from balloonist.model import (
    Decision,
    GuestSample,
    GuestSpec,
    GuestView,
    HostSample,
    HostState,
    Snapshot,
)
from balloonist.units import MIB, PAGE_SIZE_BYTES


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


@st.composite
def drawn_snapshots(
    draw: st.DrawFn, *, max_pages: int = 4096, settled: bool = True, timed: bool = False
) -> Snapshot:
    """1-8 guests of up to ``max_pages`` with any min, max, shares and register, on a
    host with room for their minimums. ``settled``: each balloon has reached its
    register; otherwise it may be anywhere, and the guest may report free memory.
    ``timed``: any period length and time, else time 0 of 1 s periods."""
    n = draw(st.integers(1, 8))
    views: list[GuestView] = []
    for i in range(n):
        memory = draw(st.integers(1, max_pages))
        limit = draw(st.integers(1, memory))
        minimum = draw(st.integers(0, limit))
        spec = GuestSpec(
            name=f"g{i}",
            memory_bytes=memory * PAGE_SIZE_BYTES,
            min_bytes=minimum * PAGE_SIZE_BYTES,
            max_bytes=limit * PAGE_SIZE_BYTES,
            shares=draw(st.integers(1, 1_000_000)),
            balloon=draw(st.booleans()),
        )
        register = draw(st.integers(0, memory)) * PAGE_SIZE_BYTES
        if settled:
            sample = GuestSample(spec.name, spec.memory_bytes - register, register, register)
        else:
            pages = st.integers(0, memory).map(lambda p: p * PAGE_SIZE_BYTES)
            actual = draw(st.one_of(st.just(register), pages))
            free = draw(st.none() | st.integers(0, memory * PAGE_SIZE_BYTES))
            sample = GuestSample(
                spec.name, spec.memory_bytes - actual, actual, register, free_bytes=free
            )
        working = draw(st.integers(0, 2 * memory * PAGE_SIZE_BYTES))
        views.append(GuestView(spec, sample, working))
    reserved = sum(v.spec.min_bytes for v in views) // PAGE_SIZE_BYTES
    host_pages = max(1, reserved + draw(st.integers(0, 8 * max_pages)))
    period_s, time_s = 1.0, 0.0
    if timed:
        period_s = draw(st.sampled_from([0.5, 1.0, 2.0, 5.0, 15.0]))
        time_s = draw(st.integers(0, 100)) * period_s
    host = HostSample(
        time_s=time_s,
        memory_bytes=host_pages * PAGE_SIZE_BYTES,
        free_bytes=draw(st.integers(0, host_pages)) * PAGE_SIZE_BYTES,
        swap_bytes=0,
        swap_used_bytes=0,
        state=draw(st.sampled_from(list(HostState))),
    )
    return Snapshot(time_s, period_s, host, tuple(views))
