"""Limit paging in the simulator: a guest whose scan is just past what its limit leaves
it ballooned is held at the limit by the host instead, works, and never crosses it."""

from __future__ import annotations

import numpy as np

from balloonist.sim.runner import run_scenario
from balloonist.sim.scenario import Scenario, scenario_from_dict
from balloonist.units import MIB


def _scenario() -> Scenario:
    """A 140 MiB LRU guest limited to 76 MiB, scanning 74 MiB: ballooned it keeps 60
    MiB of the scan past its kernel's 16 and misses every reference; beside it a
    guest that fits."""
    return scenario_from_dict(
        {
            "host": {"memory": "256MiB", "swap": "512MiB"},
            "sim": {"duration_s": 60.0, "seed": 3},
            "guests": [
                {
                    "name": "scan",
                    "memory": "140MiB",
                    "max": "76MiB",
                    "workload": {"kind": "scan", "working_set": "74MiB"},
                },
                {
                    "name": "fits",
                    "memory": "128MiB",
                    "workload": {"kind": "uniform", "working_set": "64MiB"},
                },
            ],
        },
        where="test",
        default_name="limit-paging",
    )


def test_a_guest_that_cannot_work_ballooned_under_its_limit_is_held_there_by_the_host() -> None:
    sc = _scenario()
    demand = run_scenario(sc, policy_name="demand")
    static = run_scenario(sc, policy_name="static")
    scan, fits = demand.guests
    assert scan.name == "scan"
    # the limit holds every period, held by the host once the balloon is gone
    assert int(scan.allocation_bytes.max()) <= 76 * MIB
    assert int(scan.balloon_target_bytes[-1]) == 0
    assert int(scan.host_swap_outs.sum()) > 0
    # and the scan works: ballooned (static) it misses every reference
    assert int(scan.refs[-10:].sum()) > 20 * int(static.guests[0].refs[-10:].sum())
    # its whole footprint fits its memory, so nothing is paged twice
    assert all(int(g.double_paging.sum()) == 0 for g in demand.guests)
    assert int(np.sum(fits.refs)) >= 0.99 * int(np.sum(static.guests[1].refs))
