"""Processors through the shares policy: the memory policy's own equilibrium in whole
CPUs, the CPU balloon register that follows from it, and properties of the rounding."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balloonist.errors import ConfigError
from balloonist.model import CpuSample, CpuSpec, GuestSample, GuestSpec, GuestView, Snapshot
from balloonist.policy.shares import SharesPolicy, cpu_targets, equilibrium_units
from tests.policy.snapshots import guest, snapshot


def cpu_guest(
    name: str,
    *,
    vcpus: int = 4,
    demand: float | None = None,
    shares: int = 1000,
    min_cpus: int = 1,
    max_cpus: int | None = None,
    balloon: bool = True,
) -> GuestView:
    """A guest with all its vCPUs online, busy on ``demand`` of them (all, by default)."""
    view = guest(name)
    cpu = CpuSpec(vcpus, min_cpus=min_cpus, max_cpus=max_cpus, shares=shares, balloon=balloon)
    spec: GuestSpec = replace(view.spec, cpu=cpu)
    sample: GuestSample = replace(view.sample, cpu=CpuSample(vcpus, 0, 0, demand))
    busy = float(vcpus) if demand is None else demand
    return GuestView(spec, sample, view.working_set_bytes, busy)


def with_cpus(s: Snapshot, cpus: int) -> Snapshot:
    return replace(s, host=replace(s.host, cpus=cpus))


def cpus_of(s: Snapshot, tax_rate: float = 0.75) -> dict[str, tuple[int, int]]:
    return {
        name: (t.allocation_cpus, t.balloon_vcpus) for name, t in cpu_targets(s, tax_rate).items()
    }


def test_busy_equal_guests_split_every_processor() -> None:
    s = with_cpus(
        snapshot(cpu_guest("a", vcpus=8), cpu_guest("b", vcpus=8), cpu_guest("c", vcpus=8)), 8
    )
    # 8/3 each: floors give 2, 2, 2 and the two left over go to the first two (ties)
    assert cpus_of(s) == {"a": (3, 5), "b": (3, 5), "c": (2, 6)}


def test_shares_weigh_processors_as_they_weigh_memory() -> None:
    s = with_cpus(snapshot(cpu_guest("a", shares=2000), cpu_guest("b", shares=1000)), 6)
    # a wants 4 of 6 by shares, b 2: both are within their 4 vCPUs
    assert cpus_of(s) == {"a": (4, 0), "b": (2, 2)}


def test_idle_vcpus_are_taxed_and_go_to_the_busy_guest() -> None:
    s = with_cpus(snapshot(cpu_guest("busy"), cpu_guest("idle", demand=0.2)), 4)
    taxed = cpus_of(s, tax_rate=0.75)
    assert taxed == {"busy": (3, 1), "idle": (1, 3)}
    # no tax: shares alone, 2 each
    assert cpus_of(s, tax_rate=0.0) == {"busy": (2, 2), "idle": (2, 2)}


def test_reservations_and_limits_hold() -> None:
    s = with_cpus(
        snapshot(cpu_guest("small", min_cpus=3, demand=0.0), cpu_guest("capped", max_cpus=2)), 5
    )
    # small is idle but reserved 3; capped is busy on 4 but limited to 2
    assert cpus_of(s) == {"small": (3, 1), "capped": (2, 2)}


def test_more_guests_than_processors_keep_one_vcpu_each() -> None:
    s = with_cpus(snapshot(*(cpu_guest(f"g{i}") for i in range(5))), 4)
    assert set(cpus_of(s).values()) == {(1, 3)}  # reservations exceed the host: time-sliced


def test_a_guest_without_a_cpu_balloon_keeps_its_vcpus() -> None:
    s = with_cpus(snapshot(cpu_guest("a"), cpu_guest("b", balloon=False)), 4)
    assert cpus_of(s) == {"a": (2, 2), "b": (2, 0)}


def test_no_processors_shared_no_cpu_targets() -> None:
    s = snapshot(cpu_guest("a"), guest("memory-only"))
    assert cpu_targets(s, 0.75) == {}
    s = with_cpus(s, 4)
    assert set(cpu_targets(s, 0.75)) == {"a"}  # only guests with a CPU spec
    decision = SharesPolicy().decide(s)
    by_name = decision.by_name()
    assert by_name["memory-only"].cpu is None
    assert by_name["a"].cpu is not None and by_name["a"].cpu.allocation_cpus == 4


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (CpuSpec(0), "cpus must be at least 1"),
        (CpuSpec(4, min_cpus=0), "min_cpus must be at least 1"),
        (CpuSpec(4, max_cpus=5), "max_cpus 5 is above its 4 vCPUs"),
        (CpuSpec(4, min_cpus=3, max_cpus=2), "min_cpus 3 is above max_cpus 2"),
        (CpuSpec(4, shares=0), "cpu_shares must be positive"),
    ],
)
def test_a_bad_cpu_spec_is_refused(spec: CpuSpec, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GuestSpec("g", memory_bytes=1 << 30, cpu=spec)


claims = st.lists(
    st.tuples(
        st.integers(1, 16),  # vcpus
        st.floats(0.0, 16.0),  # demand
        st.integers(1, 8000),  # shares
        st.integers(1, 16),  # min (clipped to vcpus)
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=500, deadline=None)
@given(
    claims,
    st.integers(1, 64),
    st.sampled_from([0.0, 0.5, 0.75, 0.95]),
    st.floats(0.0, 1.0, exclude_max=True),
)
def test_whole_processors_within_bounds_and_none_wasted(
    guests: list[tuple[int, float, int, int]], host_cpus: int, tax: float, offset: float
) -> None:
    vcpus = np.array([g[0] for g in guests], dtype=np.int64)
    mins = np.minimum(np.array([g[3] for g in guests], dtype=np.int64), vcpus)
    got = equilibrium_units(
        np.array([g[2] for g in guests], dtype=np.float64),
        np.minimum(np.array([g[1] for g in guests]), vcpus),
        mins,
        vcpus,
        available_units=host_cpus,
        tax_rate=tax,
        rounding_offset=offset,
    )
    assert got.dtype == np.int64
    assert bool(np.all(got >= mins)) and bool(np.all(got <= vcpus))
    total, reserved, wanted = int(got.sum()), int(mins.sum()), int(vcpus.sum())
    if reserved >= host_cpus:
        assert got.tolist() == mins.tolist()
    elif wanted <= host_cpus:
        assert got.tolist() == vcpus.tolist()
    else:
        assert total == host_cpus  # rounding hands out every processor the floors left


def test_a_processor_the_shares_split_goes_to_each_in_turn() -> None:
    from balloonist.policy.shares import CPU_ROUNDING_ROUND_S

    guests = snapshot(cpu_guest("a"), cpu_guest("b"))
    rounds = 40
    got = [
        cpus_of(replace(with_cpus(guests, 3), time_s=r * CPU_ROUNDING_ROUND_S))
        for r in range(rounds)
    ]
    assert all(g["a"][0] + g["b"][0] == 3 for g in got)  # every processor, every round
    a_mean = sum(g["a"][0] for g in got) / rounds
    assert abs(a_mean - 1.5) <= 0.1  # 1.5 each over time, not 2 and 1 forever
    # within a round the answer holds still: no vCPU churn from one period to the next
    within = {
        cpus_of(replace(with_cpus(guests, 3), time_s=t))["a"]
        for t in (0.0, 1.0, CPU_ROUNDING_ROUND_S - 1.0)
    }
    assert len(within) == 1
