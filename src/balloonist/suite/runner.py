"""Every policy on every generated scenario: the tasks, the worker, the order.

A task carries its scenario as the generator's dict (cheap to pickle, and validated
again in the worker by the same path), so a worker needs nothing but the task. Tasks
are submitted most expensive first, so the last ones to finish are short; results
come back in (scenario, policy) order whatever ran them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from balloonist.suite.executors import DoneCallback, Executor
from balloonist.suite.generator import GeneratedScenario
from balloonist.suite.records import RunRecord

__all__ = ["SuiteTask", "make_tasks", "run_suite", "run_task"]


@dataclass(frozen=True)
class SuiteTask:
    scenario_index: int
    scenario: dict[str, Any]  # the generator's TOML-able dict
    policy: str
    cost: float  # relative cost, for ordering only


def make_tasks(scenarios: Sequence[GeneratedScenario], policies: Sequence[str]) -> list[SuiteTask]:
    """One task per (scenario, policy), the most expensive first.

    Cost: the generator's reference estimate, plus a per-guest-period term for the
    scheduler's own work, which idle guests cost too.
    """
    tasks = [
        SuiteTask(
            scenario_index=g.index,
            scenario=g.data,
            policy=policy,
            cost=g.estimated_refs + 1e5 * len(g.scenario.guests) * g.scenario.periods,
        )
        for g in scenarios
        for policy in policies
    ]
    # Stable: equal costs keep (scenario, policy) order, so the order is reproducible.
    return sorted(tasks, key=lambda t: -t.cost)


def run_task(task: SuiteTask) -> RunRecord:
    """Simulate one task (in a worker); the CPU time it took is in the record."""
    from balloonist.sim.runner import run_scenario
    from balloonist.sim.scenario import scenario_from_dict

    start_cpu_s = time.process_time()
    name = task.scenario["name"]
    scenario = scenario_from_dict(task.scenario, where=name, default_name=name)
    summary = run_scenario(scenario, policy_name=task.policy).summary()
    aggregate = summary["aggregate"]
    guests: dict[str, dict[str, Any]] = summary["guests"]
    return RunRecord(
        scenario=name,
        policy=task.policy,
        throughput_refs_per_s=float(aggregate["throughput_refs_per_s"]),
        guest_names=tuple(guests),
        guest_throughput_refs_per_s=tuple(
            float(g["throughput_refs_per_s"]) for g in guests.values()
        ),
        major_faults=int(aggregate["guest_major_faults"]),
        double_paging_events=int(aggregate["double_paging_events"]),
        host_swap_ins=int(aggregate["host_swap_ins"]),
        every_guest_ballooned=all(g.spec.balloon for g in scenario.guests),
        cpu_s=time.process_time() - start_cpu_s,
    )


def run_suite(
    scenarios: Sequence[GeneratedScenario],
    policies: Sequence[str],
    executor: Executor,
    on_done: DoneCallback,
) -> list[RunRecord]:
    """Every policy on every scenario; records in scenario order, then ``policies`` order."""
    tasks = make_tasks(scenarios, policies)
    records = executor.map(run_task, tasks, on_done)
    rank = {p: i for i, p in enumerate(policies)}
    by_task = sorted(
        zip(tasks, records, strict=True),
        key=lambda pair: (pair[0].scenario_index, rank[pair[0].policy]),
    )
    return [record for _, record in by_task]
