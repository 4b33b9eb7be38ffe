"""Limit paging in the simulator: a guest whose scan is just past what its limit leaves
it ballooned is held at the limit by the host instead, works, and never crosses it."""

from __future__ import annotations

import numpy as np
from tests.fakes import HoldsAtLimit

from balloonist.policy.registry import make_policy
from balloonist.scheduler import Scheduler
from balloonist.sim import engine as e
from balloonist.sim.machine import SimMachine
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


def _refs_per_period(held_periods: int | None, periods: int) -> list[int]:
    """The held guest's references each period under ``demand``; held to its limit
    by the host's paging for the first ``held_periods`` (None: never)."""
    sc = scenario_from_dict(
        {
            "host": {"memory": "512MiB", "swap": "512MiB"},
            "sim": {"duration_s": float(periods), "seed": 5},
            "guests": [
                {
                    "name": "held",
                    "memory": "300MiB",
                    "max": "165MiB",
                    "replacement": "lru",
                    "workload": {"kind": "zipf", "working_set": "162MiB", "skew": 1.1},
                }
            ],
        },
        where="test",
        default_name="released",
    )
    machine = SimMachine(sc)
    policy = HoldsAtLimit(
        make_policy("demand", tax_rate=0.75), "held", 165 * MIB, holding=held_periods is not None
    )
    scheduler = Scheduler(machine, policy, period_s=sc.period_s)
    out, before = [], 0
    for k in range(periods):
        if held_periods is not None and k == held_periods:
            policy.holding = False
        scheduler.step()
        machine.advance(sc.period_s)
        refs = int(machine.guests[0].st[e.S_REFS])
        out.append(refs - before)
        before = refs
    return out


def test_a_guest_let_go_at_its_limit_brings_its_host_swapped_pages_back_and_works() -> None:
    # Held by the host, some of its pages sit in host swap; ballooned again at its
    # limit it must still fault them back (the host pages out another of its own, as
    # a cgroup's limit does), not wait for a frame its limit never gives it.
    released = _refs_per_period(20, 35)
    never = _refs_per_period(None, 35)
    assert sum(released[:20]) > 0
    # the ten periods after its balloon is back (about three), before any trial of
    # demand's own limit paging could hold it again
    assert sum(released[23:33]) >= 0.5 * sum(never[23:33])


def test_a_guest_that_cannot_work_ballooned_at_its_share_of_a_full_host_is_held_there() -> None:
    # No limits: a 140 MiB LRU guest scanning 74 MiB beside a zipf set with 3x its
    # shares, which leaves it less than its scan and kernel need. Ballooned at that
    # share (static) it misses every reference; the host holding it there instead
    # keeps the scan and pages the kernel's cold pages.
    sc = scenario_from_dict(
        {
            "host": {"memory": "256MiB", "swap": "512MiB"},
            "sim": {"duration_s": 60.0, "seed": 3},
            "guests": [
                {
                    "name": "scan",
                    "memory": "140MiB",
                    "workload": {"kind": "scan", "working_set": "74MiB"},
                },
                {
                    "name": "busy",
                    "memory": "256MiB",
                    "shares": 3000,
                    "workload": {"kind": "zipf", "working_set": "150MiB", "skew": 1.1},
                },
            ],
        },
        where="test",
        default_name="share-paging",
    )
    demand = run_scenario(sc, policy_name="demand")
    static = run_scenario(sc, policy_name="static")
    scan, busy = demand.guests
    assert int(scan.balloon_target_bytes[-1]) == 0
    assert int(scan.host_swap_outs.sum()) > 0
    assert int(scan.refs[-10:].sum()) > 20 * int(static.guests[0].refs[-10:].sum())
    assert all(int(g.double_paging.sum()) == 0 for g in demand.guests)
    assert int(np.sum(busy.refs)) >= 0.99 * int(np.sum(static.guests[1].refs))
