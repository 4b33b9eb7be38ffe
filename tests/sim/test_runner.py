"""The run's summary: its fields say what ran, whatever the scenario shares; the
oracle's run is the best of its schedules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from balloonist.policy import DEFAULT_POLICY
from balloonist.sim import runner
from balloonist.sim.curves import CurveBook
from balloonist.sim.instant import MoveModel
from balloonist.sim.runner import run_scenario
from balloonist.sim.scenario import load_scenario, scenario_from_dict
from balloonist.sim.valuation import HostPaging, ModeValues
from balloonist.suite.generator import GeneratorParams, generate_one

LIMITS_HOST = Path(__file__).parent / "bound_hosts" / "limits.toml"


def _scenario(*, cpus: bool, policy: str) -> dict[str, Any]:
    guest_cpus: dict[str, Any] = {"cpus": 2} if cpus else {}
    return {
        "name": "contract",
        "host": {"memory": "256MiB", "swap": "256MiB", **({"cpus": 2} if cpus else {})},
        "sim": {"duration_s": 3, "seed": 5},
        "policy": {"name": policy},
        "costs": {"reference_s": 1e-4},
        "guests": [
            {
                "name": name,
                "memory": "128MiB",
                "workload": {"kind": "uniform", "working_set": "32MiB"},
                **guest_cpus,
            }
            for name in ("first", "last")
        ],
    }


@pytest.mark.parametrize("cpus", [False, True], ids=["memory", "memory-and-cpus"])
@pytest.mark.parametrize("override", [None, "mom"])
def test_the_summary_names_the_scenario_policy_and_guests(cpus: bool, override: str | None) -> None:
    scenario = scenario_from_dict(
        _scenario(cpus=cpus, policy="static"), where="test", default_name="x"
    )
    summary = run_scenario(scenario, policy_name=override).summary()
    assert summary["scenario"] == "contract"
    assert summary["policy"] == (override or "static")
    assert summary["seed"] == 5
    assert summary["duration_s"] == 3.0
    assert set(summary["guests"]) == {"first", "last"}
    assert set(summary["aggregate"]) == {
        "throughput_refs_per_s",
        "guest_major_faults",
        "host_swap_ins",
        "host_swap_outs",
        "double_paging_events",
    }
    assert ("cpu" in summary) == cpus
    if cpus:
        assert set(summary["cpu"]["guests"]) == {"first", "last"}


@pytest.mark.parametrize("name", ["oracle", "oracle-fair"])
def test_the_oracle_keeps_the_best_of_its_schedules(name: str) -> None:
    # Guests whose max is below their working set: the schedules that may host-page do.
    scenario = load_scenario(LIMITS_HOST)
    schedules = runner._schedules(scenario, name, ModeValues(scenario.costs, CurveBook()))
    assert list(schedules) == [HostPaging.NEVER, HostPaging.CONFINED, HostPaging.ANYWHERE]
    runs = {
        scope: runner._simulate(scenario, policy, name, MoveModel.INSTANT, None, False)
        for scope, policy in schedules.items()
    }
    assert runs[HostPaging.CONFINED].summary()["aggregate"]["host_swap_outs"] > 0
    assert runs[HostPaging.ANYWHERE].summary()["aggregate"]["host_swap_outs"] > 0
    assert runs[HostPaging.NEVER].summary()["aggregate"]["host_swap_outs"] == 0
    best = max(r.throughput_refs_per_s for r in runs.values())
    result = run_scenario(scenario, policy_name=name)
    assert result.throughput_refs_per_s == best
    assert result.policy == name


@pytest.mark.slow
@pytest.mark.parametrize(
    ("seed", "index", "peer"), [(1, 57, DEFAULT_POLICY), (7, 27, "proxmox"), (7, 83, "mom")]
)
def test_the_oracle_bounds_a_peer_where_one_host_paging_scope_costs_it(
    seed: int, index: int, peer: str
) -> None:
    # Suite seed 1's scenario 57: a short zipf burst under a max ran worse host-paged
    # than the steady-state curve said, and every policy that ballooned beat the
    # schedule that host-paged by 1.3 %. Seed 7's scenario 27: a uniform set that fits
    # ballooned only by starving a scan; proxmox host-paged it and beat both other
    # schedules by 2.6 %. Scenario 83: host paging wherever it models higher took 5 %
    # off a scan's last seconds, and mom came out above that schedule.
    scenario = generate_one(seed, index, GeneratorParams()).scenario
    oracle = run_scenario(scenario, policy_name="oracle")
    assert run_scenario(scenario, policy_name=peer).throughput_refs_per_s <= (
        oracle.throughput_refs_per_s
    )
