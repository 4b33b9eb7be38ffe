"""Processors on the simulated host: scenario keys, the CPU balloons following the
shares policy's targets, and the properties the CPU balloon must keep on any host."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balloonist.errors import ConfigError
from balloonist.policy.shares import SharesPolicy
from balloonist.scheduler import Scheduler
from balloonist.sim.machine import SimMachine
from balloonist.sim.runner import run_scenario
from balloonist.sim.scenario import Scenario, scenario_from_dict

PARALLEL = {"kind": "parallel", "threads": 4, "work_per_round_cpu_s": 0.005}


def cpu_scenario(*guests: dict[str, Any], host_cpus: int = 4, **extra: Any) -> dict[str, Any]:
    return {
        "host": {"memory": "1GiB", "cpus": host_cpus},
        "sim": {"duration_s": 20, "seed": 3},
        "costs": {"reference_s": 2e-5},
        "guests": [{"memory": "128MiB", "workload": {"kind": "idle"}, **g} for g in guests],
        **extra,
    }


def build(data: dict[str, Any]) -> Scenario:
    return scenario_from_dict(data, where="t.toml", default_name="t")


def test_the_cpu_balloons_follow_the_policy_and_fit_the_host() -> None:
    sc = build(
        cpu_scenario(
            {"name": "a", "cpus": 4, "cpu_workload": PARALLEL},
            {"name": "b", "cpus": 4, "cpu_workload": PARALLEL, "cpu_shares": 3000},
        )
    )
    result = run_scenario(sc)
    a, b = result.cpu("a"), result.cpu("b")
    # settled: online as granted, 1 and 3 processors by shares 1:3, all of the host
    assert (int(a.online_vcpus[-1]), int(b.online_vcpus[-1])) == (1, 3)
    assert (
        list(a.allocation_target_cpus[-5:]) == [1] * 5
        and list(b.allocation_target_cpus[-5:]) == [3] * 5
    )
    # the balloon moves one more vCPU per period than the last (1, then 2): a's three
    # reserved vCPUs take two periods
    assert list(a.online_vcpus[:3]) == [3, 1, 1]
    summary = result.summary()["cpu"]
    assert summary["spin_cpu_s_per_s"] < 0.05  # nothing spins once the balloons are in


def test_without_a_cpu_balloon_every_vcpu_stays_online_and_spins() -> None:
    sc = build(
        cpu_scenario(
            {"name": "a", "cpus": 4, "cpu_workload": PARALLEL, "cpu_balloon": False},
            {"name": "b", "cpus": 4, "cpu_workload": PARALLEL, "cpu_balloon": False},
        )
    )
    result = run_scenario(sc)
    assert {int(v) for c in result.cpus for v in c.online_vcpus} == {4}
    assert result.summary()["cpu"]["spin_cpu_s_per_s"] > 0.5


def test_a_scenario_reads_the_former_cpu_names() -> None:
    sc = build(cpu_scenario({"name": "a", "cpus": 4, "cpu_min": 2, "cpu_max": 3}))
    cpu = sc.guests[0].spec.cpu
    assert cpu is not None and (cpu.min_cpus, cpu.max_cpus) == (2, 3)


def test_guests_without_cpus_are_left_out_of_the_processors() -> None:
    sc = build(cpu_scenario({"name": "a", "cpus": 2}, {"name": "memory-only"}))
    result = run_scenario(sc)
    assert [c.name for c in result.cpus] == ["a"]
    assert result.summary()["cpu"]["host_cpus"] == 4
    no_cpus = build({**cpu_scenario({"name": "a"}), "host": {"memory": "1GiB"}})
    assert run_scenario(no_cpus).cpus == () and "cpu" not in run_scenario(no_cpus).summary()


@pytest.mark.parametrize(
    ("change", "where", "message"),
    [
        ({"host": {"memory": "1GiB"}}, "guests[0].cpus", "needs host.cpus"),
        ({"guests": [{"name": "a", "max_cpus": 2}]}, "guests[0].max_cpus", "needs cpus"),
        ({"guests": [{"name": "a", "cpus": 2, "min_cpus": 3}]}, "guests[0]", "min_cpus 3"),
        ({"guests": [{"name": "a", "cpus": 2, "max_cpus": 3}]}, "guests[0]", "max_cpus 3 is above"),
        (
            {"guests": [{"name": "a", "cpus": 2, "cpu_workload": {"kind": "bursty"}}]},
            "guests[0].cpu_workload",
            "duty is required",
        ),
        (
            {"guests": [{"name": "a", "cpus": 2, "cpu_workload": {"kind": "spin"}}]},
            "cpu_workload.kind",
            "unknown CPU workload kind 'spin'",
        ),
        ({"cpu": {"quantum_s": 0.3}}, "cpu.quantum_s", "not a whole number of CPU quanta"),
        ({"host": {"memory": "1GiB", "cpus": 0}}, "host.cpus", "greater than or equal to 1"),
    ],
)
def test_bad_cpu_keys_name_the_key(change: dict[str, Any], where: str, message: str) -> None:
    data = cpu_scenario({"name": "a", "cpus": 2})
    for key, value in change.items():
        if key == "guests":
            data["guests"] = [
                {"memory": "128MiB", "workload": {"kind": "idle"}, **g} for g in value
            ]
        else:
            data[key] = value
    with pytest.raises(ConfigError) as caught:
        build(data)
    text = str(caught.value)
    assert where in text and message in text, text


workloads = st.one_of(
    st.just({"kind": "idle"}),
    st.builds(lambda t: {"kind": "cpu-bound", "threads": t}, st.integers(1, 6)),
    st.builds(
        lambda t, d: {"kind": "bursty", "threads": t, "duty": d, "burst_s": 0.03},
        st.integers(1, 6),
        st.floats(0.1, 1.0),
    ),
    st.builds(
        lambda t: {"kind": "parallel", "threads": t, "work_per_round_cpu_s": 0.004},
        st.integers(1, 6),
    ),
)


@st.composite
def cpu_hosts(draw: st.DrawFn) -> dict[str, Any]:
    guests = []
    for i in range(draw(st.integers(1, 4))):
        vcpus = draw(st.integers(1, 6))
        guests.append(
            {
                "name": f"g{i}",
                "cpus": vcpus,
                "min_cpus": draw(st.integers(1, vcpus)),
                "cpu_shares": draw(st.sampled_from([500, 1000, 3000])),
                "cpu_balloon": draw(st.booleans()),
                "cpu_workload": draw(workloads),
            }
        )
    data = cpu_scenario(*guests, host_cpus=draw(st.integers(1, 8)))
    data["sim"]["duration_s"] = 8
    return data


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cpu_hosts())
def test_the_cpu_balloon_keeps_its_bounds_on_any_host(data: dict[str, Any]) -> None:
    sc = build(data)
    machine = SimMachine(sc)
    scheduler = Scheduler(machine, SharesPolicy(), period_s=sc.period_s)
    specs = {g.name: g.spec.cpu for g in sc.guests}
    assert sc.host_cpus is not None
    for _ in range(sc.periods):
        cycle = scheduler.step()
        granted = 0
        reserved_total = 0
        for t in cycle.decision.targets:
            spec = specs[t.name]
            assert spec is not None and t.cpu is not None
            assert spec.min_cpus <= t.cpu.allocation_cpus <= spec.limit_cpus
            granted += t.cpu.allocation_cpus
            reserved_total += spec.min_cpus
        # granted processors never exceed the host's, unless the reservations alone do
        assert granted <= max(sc.host_cpus, reserved_total)
        machine.advance(sc.period_s)
        for name, spec in specs.items():
            sample = machine.cpus.sample(name) if machine.cpus is not None else None
            assert spec is not None and sample is not None
            # never below its reservation, never every vCPU reserved
            assert sample.online_vcpus >= spec.min_cpus
            assert 0 <= sample.balloon_vcpus <= spec.vcpus - 1
            if not spec.balloon:
                assert sample.online_vcpus == spec.vcpus
        period = machine.cpus.last if machine.cpus is not None else None
        assert period is not None
        assert period.busy_cpu_s <= sc.host_cpus * sc.period_s + 1e-9


def test_the_summary_table_shows_the_processors() -> None:
    import io

    from rich.console import Console

    from balloonist.live import summary_table

    sc = build(cpu_scenario({"name": "a", "cpus": 4, "cpu_workload": PARALLEL}))
    out = io.StringIO()
    Console(file=out, width=120).print(summary_table(run_scenario(sc).summary()))
    text = out.getvalue()
    assert "processors: 4 shared (the CPU balloon)" in text
    processors = text[text.index("processors: 4 shared") :]
    row = next(line for line in processors.splitlines() if line.startswith("│ a "))
    assert row.split("│")[2].strip() == "4"  # vCPUs
