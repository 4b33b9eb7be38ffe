"""Several policies' runs of one scenario, simulated once for as long as they agree.

A run is a function of its decisions: the simulator draws every random number from
per-guest generators seeded by the scenario, never from the decision's history. And a
policy's decision is a function of the snapshots it has seen. So runs whose policies
decide the same in every period so far are the same run up to there, and one machine
serves them all. At the first period where their decisions differ, the run is copied
(after the scheduler's collect, before anything acts) and each group of policies that
still agree goes on in a copy of its own. The results are those of separate runs,
period for period; only the time to get them changes.

The bounds use it: ``oracle`` and ``oracle-fair`` decide the same wherever the sharing
rule does not bind, which on the suite's hosts is nearly everywhere.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from balloonist.model import Decision, Snapshot
from balloonist.policy import Policy
from balloonist.scheduler import Cycle, Scheduler
from balloonist.sim.instant import MoveModel
from balloonist.sim.machine import SimMachine
from balloonist.sim.recorder import Recorder
from balloonist.sim.result import Progress, SimResult
from balloonist.sim.scenario import Scenario

__all__ = ["ProgressCallback", "simulate_together"]

ProgressCallback = Callable[[Progress], None]


@dataclass
class _Branch:
    """One simulated run, and the policies whose decisions it has followed so far."""

    names: list[str]
    machine: SimMachine
    scheduler: Scheduler
    record: Recorder


def simulate_together(
    scenario: Scenario,
    policies: Mapping[str, Policy],
    moves: MoveModel,
    *,
    progress: ProgressCallback | None = None,
    check_every_period: bool = False,
) -> dict[str, SimResult]:
    """Each policy's run of ``scenario``, by name, as if each were simulated alone.

    ``progress`` hears of every period of the first policy's run.
    """
    if not policies:
        return {}
    first = next(iter(policies))
    machine = SimMachine(scenario, moves=moves)
    # The scheduler collects and keeps its averages; the policies decide here.
    scheduler = Scheduler(
        machine, policies[first], period_s=scenario.period_s, estimator=scenario.estimator
    )
    branches = [_Branch(list(policies), machine, scheduler, Recorder(scenario, machine))]
    # A copy shares what no run changes: the scenario and the policies themselves.
    shared: dict[int, Any] = {id(scenario): scenario}
    shared.update({id(p): p for p in policies.values()})
    for k in range(scenario.periods):
        for branch in list(branches):
            snapshot = branch.scheduler.collect()
            groups = _group_by_decision(branch.names, policies, snapshot)
            steps = [(branch, groups[0][0])]
            for decision, names in groups[1:]:
                steps.append((_fork(branch, names, shared), decision))
            branch.names = groups[0][1]
            for b, decision in steps:
                if b is not branch:
                    branches.append(b)
                _finish_period(b, k, Cycle(snapshot, decision), scenario, check_every_period)
        if progress is not None:
            lead = next(b for b in branches if first in b.names)
            progress(lead.record.progress(k, lead.scheduler.host_state))
    return {name: b.record.result(name) for b in branches for name in b.names}


def _group_by_decision(
    names: list[str], policies: Mapping[str, Policy], snapshot: Snapshot
) -> list[tuple[Decision, list[str]]]:
    """The policies' decisions on ``snapshot``, those that agree together, in order."""
    groups: list[tuple[Decision, list[str]]] = []
    for name in names:
        decision = policies[name].decide(snapshot)
        for same, members in groups:
            if same == decision:
                members.append(name)
                break
        else:
            groups.append((decision, [name]))
    return groups


def _fork(branch: _Branch, names: list[str], shared: dict[int, Any]) -> _Branch:
    """A copy of ``branch``'s run for ``names`` (one deep copy, so what the machine,
    scheduler and recorder share stays shared between the copies)."""
    machine, scheduler, record = copy.deepcopy(
        (branch.machine, branch.scheduler, branch.record), dict(shared)
    )
    return _Branch(names, machine, scheduler, record)


def _finish_period(
    branch: _Branch, k: int, cycle: Cycle, scenario: Scenario, check_every_period: bool
) -> None:
    """Act on period ``k``'s decision, run the period and record it."""
    branch.machine.apply(cycle.decision)
    branch.machine.advance(scenario.period_s)
    if check_every_period:
        from balloonist.sim.invariants import check_guest

        for m in branch.machine.guests:
            check_guest(m)
    branch.record.period(k, cycle, branch.scheduler.host_state)
