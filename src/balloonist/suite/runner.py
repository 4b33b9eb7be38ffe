"""Every policy on every generated scenario: the tasks, the worker, the order.

A task carries its scenario as the generator's dict (cheap to pickle, and validated
again in the worker by the same path), so a worker needs nothing but the task. A task
is one policy's run, except that a scenario's bounds run in one task: they value the
same workloads, so the miss-ratio curves one measures serve the other, and they decide
the same until the sharing rule binds, so they share their run up to there. Tasks are
submitted most expensive first, so the last ones to finish are short; results come
back in (scenario, policy) order whatever ran them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from balloonist.sim.names import ORACLE_NAMES
from balloonist.suite.executors import DoneCallback, Executor
from balloonist.suite.generator import GeneratedScenario
from balloonist.suite.records import RunRecord

if TYPE_CHECKING:
    from balloonist.sim.result import SimResult
    from balloonist.sim.scenario import Scenario

__all__ = ["SuiteTask", "make_tasks", "run_suite", "run_task"]


@dataclass(frozen=True)
class SuiteTask:
    scenario_index: int
    scenario: dict[str, Any]  # the generator's TOML-able dict
    policies: tuple[str, ...]  # one, or the scenario's bounds
    cost: float  # relative cost, for ordering only


def make_tasks(scenarios: Sequence[GeneratedScenario], policies: Sequence[str]) -> list[SuiteTask]:
    """Per scenario, one task per online policy and one for all its bounds; the most
    expensive first.

    Cost per run: the generator's reference estimate, plus a per-guest-period term for
    the scheduler's own work, which idle guests cost too.
    """
    bounds = tuple(p for p in policies if p in ORACLE_NAMES)
    groups = [(p,) for p in policies if p not in ORACLE_NAMES] + ([bounds] if bounds else [])
    tasks = [
        SuiteTask(
            scenario_index=g.index,
            scenario=g.data,
            policies=group,
            cost=len(group)
            * (g.estimated_refs + 1e5 * len(g.scenario.guests) * g.scenario.periods),
        )
        for g in scenarios
        for group in groups
    ]
    # Stable: equal costs keep the order above, so the order is reproducible.
    return sorted(tasks, key=lambda t: -t.cost)


def run_task(task: SuiteTask) -> tuple[RunRecord, ...]:
    """Simulate one task (in a worker): a record per policy, each with the CPU time
    its run took. A scenario's bounds run together (``run_bounds``), and share the
    CPU time evenly."""
    from balloonist.sim.runner import run_bounds, run_scenario
    from balloonist.sim.scenario import scenario_from_dict

    name = task.scenario["name"]
    scenario = scenario_from_dict(task.scenario, where=name, default_name=name)
    start_cpu_s = time.process_time()
    if all(p in ORACLE_NAMES for p in task.policies):
        results = run_bounds(scenario, task.policies)
    else:
        results = {p: run_scenario(scenario, policy_name=p) for p in task.policies}
    cpu_s = (time.process_time() - start_cpu_s) / len(task.policies)
    return tuple(_record(scenario, p, results[p], cpu_s) for p in task.policies)


def _record(scenario: Scenario, policy: str, result: SimResult, cpu_s: float) -> RunRecord:
    summary = result.summary()
    aggregate = summary["aggregate"]
    guests: dict[str, dict[str, Any]] = summary["guests"]
    return RunRecord(
        scenario=scenario.name,
        policy=policy,
        throughput_refs_per_s=float(aggregate["throughput_refs_per_s"]),
        guest_names=tuple(guests),
        guest_throughput_refs_per_s=tuple(
            float(g["throughput_refs_per_s"]) for g in guests.values()
        ),
        major_faults=int(aggregate["guest_major_faults"]),
        double_paging_events=int(aggregate["double_paging_events"]),
        host_swap_ins=int(aggregate["host_swap_ins"]),
        every_guest_ballooned=all(g.spec.balloon for g in scenario.guests),
        cpu_s=cpu_s,
    )


def run_suite(
    scenarios: Sequence[GeneratedScenario],
    policies: Sequence[str],
    executor: Executor,
    on_done: DoneCallback,
) -> list[RunRecord]:
    """Every policy on every scenario; records in scenario order, then ``policies`` order.

    ``on_done`` hears of runs, not tasks: (runs done, runs in all)."""
    tasks = make_tasks(scenarios, policies)
    total_runs = sum(len(t.policies) for t in tasks)
    runs_done = 0

    def task_done(index: int) -> None:
        nonlocal runs_done
        runs_done += len(tasks[index].policies)
        on_done(runs_done, total_runs)

    by_task = executor.map(run_task, tasks, task_done)
    index = {
        (task.scenario_index, record.policy): record
        for task, records in zip(tasks, by_task, strict=True)
        for record in records
    }
    return [index[(g.index, policy)] for g in scenarios for policy in policies]
