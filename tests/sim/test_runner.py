"""The run's summary: its fields say what ran, whatever the scenario shares."""

from __future__ import annotations

from typing import Any

import pytest

from balloonist.sim.runner import run_scenario
from balloonist.sim.scenario import scenario_from_dict


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
