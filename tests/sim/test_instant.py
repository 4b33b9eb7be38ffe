"""Instant moves: every balloon at its target after one period, free, invariants intact."""

from __future__ import annotations

from typing import Any

import pytest

from balloonist.model import Decision, GuestTarget, Mechanisms, Snapshot
from balloonist.scheduler import Scheduler
from balloonist.sim import engine as e
from balloonist.sim.instant import MoveModel
from balloonist.sim.invariants import check_guest
from balloonist.sim.machine import SimMachine
from balloonist.sim.runner import build_policy
from balloonist.sim.scenario import Scenario, scenario_from_dict
from balloonist.units import MIB, PAGE_SIZE_BYTES


class _Targets:
    """Allocations per guest (MiB), changed between periods by the test."""

    def __init__(self, allocation_mib: dict[str, int]) -> None:
        self.allocation_mib = allocation_mib

    @property
    def name(self) -> str:
        return "targets"

    def decide(self, snapshot: Snapshot) -> Decision:
        targets = tuple(
            GuestTarget(v.name, a * MIB, v.spec.memory_bytes - a * MIB)
            for v in snapshot.guests
            for a in [self.allocation_mib[v.name]]
        )
        return Decision(targets, Mechanisms(balloon=True, host_paging=False))


def _scenario(**guest: Any) -> Scenario:
    uniform = {"kind": "uniform", "working_set": "48MiB"}
    return scenario_from_dict(
        {
            "host": {"memory": "160MiB", "swap": "256MiB"},
            "guests": [
                {"name": "a", "memory": "64MiB", "kernel": "4MiB", "workload": uniform},
                {"name": "b", "memory": "64MiB", "kernel": "4MiB", "workload": uniform, **guest},
            ],
        },
        where="test",
        default_name="test",
    )


def _balloon_pages(machine: SimMachine) -> dict[str, int]:
    return {m.spec.name: int(m.st[e.S_BALLOON]) for m in machine.guests}


@pytest.mark.parametrize("balloon", [True, False])
def test_balloons_go_straight_to_target_and_back_for_free(balloon: bool) -> None:
    sc = _scenario(balloon=balloon)
    machine = SimMachine(sc, moves=MoveModel.INSTANT)
    policy = _Targets({"a": 64, "b": 64})
    scheduler = Scheduler(machine, policy, period_s=sc.period_s)
    for allocation_mib in (64, 20, 44, 8):  # fill, shrink hard, grow, shrink to the kernel
        policy.allocation_mib = {"a": 64, "b": allocation_mib}
        scheduler.step()
        machine.advance(sc.period_s)
        for m in machine.guests:
            check_guest(m)
        b = machine.guests[1]
        # the guest without a balloon driver gets one too: this is the bound's mode
        assert _balloon_pages(machine)["b"] == (64 - allocation_mib) * MIB // PAGE_SIZE_BYTES
        assert b.mapped_pages <= allocation_mib * MIB // PAGE_SIZE_BYTES
        # the guest was charged nothing for the balloon: its whole period ran references
        assert b.time_debt_s == pytest.approx(0.0, abs=sc.period_s / sc.slices_per_period)
    assert machine.drivers == [None, None]


def test_paced_moves_take_periods_and_time() -> None:
    sc = _scenario()
    machine = SimMachine(sc)  # the default: the balloon driver at its adaptive rate
    policy = _Targets({"a": 64, "b": 64})
    scheduler = Scheduler(machine, policy, period_s=sc.period_s)
    scheduler.step()
    machine.advance(sc.period_s)
    policy.allocation_mib = {"a": 64, "b": 8}
    scheduler.step()
    machine.advance(sc.period_s)
    assert _balloon_pages(machine)["b"] < 56 * MIB // PAGE_SIZE_BYTES


@pytest.mark.parametrize("name", ["oracle", "oracle-fair"])
def test_the_runner_builds_both_bounds(name: str) -> None:
    policy = build_policy(_scenario(), name)
    assert policy.name == name


def _jump(**guest: Any) -> Scenario:
    """Guest b's working set jumps to pages it never used, and never comes back."""
    workload = {
        "kind": "phases",
        "phases": [
            {"at_s": 0.0, "workload": {"kind": "zipf", "working_set": "32MiB"}},
            {
                "at_s": 3.0,
                "workload": {"kind": "uniform", "working_set": "40MiB", "offset": "32MiB"},
            },
        ],
    }
    return _scenario(workload=workload, **guest)


@pytest.mark.parametrize("moves", [MoveModel.INSTANT, MoveModel.PACED])
def test_the_bound_drops_what_the_plan_never_touches_again(moves: MoveModel) -> None:
    sc = _jump()
    machine = SimMachine(sc, moves=moves)
    scheduler = Scheduler(machine, _Targets({"a": 60, "b": 60}), period_s=sc.period_s)
    for _ in range(8):
        scheduler.step()
        machine.advance(sc.period_s)
        for m in machine.guests:
            check_guest(m)
    b = machine.guests[1]
    # 32 + 40 MiB of workload does not fit beside b's kernel in 60 MiB: a guest that
    # keeps its old working set must write some of it out; the bound, which knows it
    # is dead, frees it instead.
    if moves is MoveModel.INSTANT:
        assert int(b.st[e.S_GUEST_SWAP_OUT]) == 0
        assert int(b.st[e.S_RESIDENT]) == 40 * MIB // PAGE_SIZE_BYTES
    else:
        assert int(b.st[e.S_GUEST_SWAP_OUT]) > 0


def test_dead_ranges_are_what_no_later_phase_touches() -> None:
    plan = _jump().guests[1].plan
    pages = MIB // PAGE_SIZE_BYTES
    assert plan.dead_ranges(0) == []
    assert plan.dead_ranges(1) == [(0, 32 * pages)]
