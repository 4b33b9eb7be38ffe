"""Whole-system properties under every policy, on random small hosts (Hypothesis).

- allocations never exceed host memory, in any period;
- every allocation target stays within the guest's [min, max], and no guest ever holds
  more machine memory than its max (nor is ballooned below its min);
- no page is both pinned by a balloon and mapped (checked every period by check_guest);
- same seed, same result.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balloonist.sim.names import POLICY_NAMES
from balloonist.sim.runner import run_scenario
from balloonist.sim.scenario import Scenario, scenario_from_dict
from balloonist.units import MIB


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 4))
    guests: list[dict[str, Any]] = []
    reserved = 0
    for i in range(n):
        memory = draw(st.integers(32, 128))
        max_mib = draw(st.integers(16, memory))
        min_mib = draw(st.integers(0, max_mib // 2))
        reserved += min_mib
        kind = draw(st.sampled_from(["idle", "uniform", "zipf", "scan", "phases"]))
        ws = draw(st.integers(4, memory + 16))
        if kind == "phases":
            workload: dict[str, Any] = {
                "kind": "phases",
                "phases": [
                    {"at_s": 0, "workload": {"kind": "scan", "working_set": f"{ws}MiB"}},
                    {"at_s": 2, "workload": {"kind": "idle"}},
                    {"at_s": 4, "workload": {"kind": "zipf", "working_set": f"{ws}MiB"}},
                ],
            }
        else:
            workload = {"kind": kind, "working_set": f"{ws}MiB"}
        guests.append(
            {
                "name": f"g{i}",
                "memory": f"{memory}MiB",
                "min": f"{min_mib}MiB",
                "max": f"{max_mib}MiB",
                "kernel": "8MiB",
                "shares": draw(st.integers(1, 4000)),
                "balloon": draw(st.booleans()),
                "replacement": draw(st.sampled_from(["lru", "clock", "fifo"])),
                "workload": workload,
            }
        )
    host = draw(st.integers(max(64, reserved + 8 * n), 512))
    return {
        "host": {"memory": f"{host}MiB", "swap": "1GiB"},
        "sim": {
            "duration_s": 8,
            "seed": draw(st.integers(0, 2**31)),
            "slices_per_period": 2,
            "ws_sample_period_s": 2,
        },
        "policy": {"name": draw(st.sampled_from(POLICY_NAMES))},
        # few references per simulated second: these check accounting, not speed
        "costs": {"reference_s": 2e-4},
        "guests": guests,
    }


def load(data: dict[str, Any]) -> Scenario:
    return scenario_from_dict(data, where="property", default_name="property")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_every_policy_keeps_the_invariants(data: dict[str, Any]) -> None:
    sc = load(data)
    result = run_scenario(sc, check_every_period=True)  # raises on a broken guest invariant
    host = result.host_memory_bytes
    held = np.sum([g.allocation_bytes for g in result.guests], axis=0)
    assert np.all(held <= host)
    assert np.all(result.host_free_bytes == host - held)
    for g, spec in zip(result.guests, (s.spec for s in sc.guests), strict=True):
        assert np.all(g.target_bytes >= spec.min_bytes), g.name
        assert np.all(g.target_bytes <= spec.limit_bytes), g.name
        assert np.all(g.allocation_bytes <= max(spec.limit_bytes, 8 * MIB)), g.name
        assert np.all(g.balloon_bytes <= spec.memory_bytes - spec.min_bytes), g.name
        assert np.all(g.balloon_bytes % 4096 == 0)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_same_seed_same_result(data: dict[str, Any]) -> None:
    first = run_scenario(load(data))
    second = run_scenario(load(data))
    assert first.summary() == second.summary()
    for a, b in zip(first.guests, second.guests, strict=True):
        assert np.array_equal(a.refs, b.refs)
        assert np.array_equal(a.allocation_bytes, b.allocation_bytes)
