"""The reference loop's drawing ahead changes only speed: the same run, to the page."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from balloonist.sim import engine as e
from balloonist.sim.guest_memory import GuestMemory
from balloonist.sim.result import SimResult
from balloonist.sim.runner import run_scenario
from balloonist.sim.scenario import Scenario, scenario_from_dict


def _host() -> Scenario:
    """Three guests whose working sets are large enough to be drawn ahead, on a host
    that must page them: the host's random victim search draws from the guests' random
    states mid-run, which restarts the loop's pipeline."""
    guests = [
        ("lru-zipf", "lru", {"kind": "zipf", "working_set": "320MiB", "skew": 0.8}),
        ("clock-uniform", "clock", {"kind": "uniform", "working_set": "300MiB"}),
        (
            "fifo-ramp",
            "fifo",
            {"kind": "zipf", "working_set": "340MiB", "skew": 1.1, "ramp_s": 6},
        ),
    ]
    return scenario_from_dict(
        {
            "host": {"memory": "640MiB", "swap": "1GiB"},
            "sim": {"duration_s": 12, "seed": 5},
            "costs": {"reference_s": 2e-6},
            "guests": [
                {"name": n, "memory": "384MiB", "replacement": r, "workload": w}
                for n, r, w in guests
            ],
        },
        where="test",
        default_name="draw-ahead",
    )


def _series(result: SimResult) -> dict[str, np.ndarray]:
    out = {}
    for g in result.guests:
        for field in dataclasses.fields(g):
            value = getattr(g, field.name)
            if isinstance(value, np.ndarray):
                out[f"{g.name}.{field.name}"] = value
    return out


def test_drawing_ahead_runs_the_same_references_as_drawing_one_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sc = _host()
    assert all(
        g.plan.phases[0].workload.working_set_pages >= e.DRAW_AHEAD_MIN_PAGES for g in sc.guests
    )
    ahead = run_scenario(sc, policy_name="host-swap")
    monkeypatch.setattr(GuestMemory, "draw_ahead_min_pages", 2**62)
    one_at_a_time = run_scenario(sc, policy_name="host-swap")

    # the host paged, so fault paths drew from the guests' random states
    assert sum(int(g.host_swap_outs.sum()) for g in ahead.guests) > 0
    a, b = _series(ahead), _series(one_at_a_time)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert ahead.throughput_refs_per_s == one_at_a_time.throughput_refs_per_s
