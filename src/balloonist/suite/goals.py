"""What the default policy must reach on the suite, and whether the bound held (pure).

One place for the goals, so the benchmark that runs the whole suite
(``benchmarks/bench_suite.py``) and the test that runs a fixed slice of it
(``tests/suite/test_slice.py``) judge by the same rules:

- aggregate throughput relative to each bound: median >= 0.95, 10th percentile
  >= 0.85, worst >= 0.70;
- at least as good (within 1 %) as each of ``PEERS`` on >= 95 % of scenarios;
- the sharing check (no guest below 0.9x its ``static`` throughput) on >= 98 %;
- no double paging on a host where every guest has a balloon driver;
- and no policy above a bound by more than 1 % on any scenario: a bound that is
  beaten is not a bound.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

from balloonist.suite.generator import GeneratedScenario, GeneratorParams, generate_one
from balloonist.suite.records import RunRecord
from balloonist.suite.stats import BOUNDS, PolicyStats

__all__ = [
    "BOUND_SLACK",
    "PEERS",
    "BeatenBound",
    "Goal",
    "beaten_bounds",
    "default_policy_goals",
    "fixed_slice",
    "goals_json",
]

#: The peers the default must match (within 1 %) on 95 % of scenarios.
PEERS: Final = ("mom", "proxmox", "static", "host-swap")
#: A policy above a bound by more than this factor on a scenario: the bound is wrong.
BOUND_SLACK: Final = 1.01
MEDIAN_GOAL: Final = 0.95
P10_GOAL: Final = 0.85
WORST_GOAL: Final = 0.70
AT_LEAST_AS_GOOD_GOAL: Final = 0.95
SHARING_GOAL: Final = 0.98


@dataclass(frozen=True)
class Goal:
    name: str
    measured: float
    goal: float
    holds: bool

    def line(self) -> str:
        verdict = "ok" if self.holds else "MISSED"
        return f"{self.name}: {self.measured:.3f} (goal {self.goal:g}) {verdict}"


@dataclass(frozen=True)
class BeatenBound:
    scenario: str
    policy: str
    bound: str
    ratio: float


def _at_least(name: str, measured: float, goal: float) -> Goal:
    return Goal(name, measured, goal, measured >= goal)


def default_policy_goals(stats: Sequence[PolicyStats], policy: str) -> tuple[Goal, ...]:
    """The goals above for ``policy``, each as measured in ``stats``."""
    mine = next(s for s in stats if s.policy == policy)
    out: list[Goal] = []
    for rel in mine.relative:
        out.append(_at_least(f"median vs {rel.bound}", rel.median, MEDIAN_GOAL))
        out.append(_at_least(f"p10 vs {rel.bound}", rel.p10, P10_GOAL))
        out.append(_at_least(f"worst vs {rel.bound}", rel.worst, WORST_GOAL))
    for v in mine.versus:
        if v.peer in PEERS and v.at_least_as_good is not None:
            name = f"at least as good as {v.peer}"
            out.append(_at_least(name, v.at_least_as_good, AT_LEAST_AS_GOOD_GOAL))
    if mine.sharing_pass is not None and mine.sharing_scenarios:
        share = mine.sharing_pass / mine.sharing_scenarios
        out.append(_at_least("sharing", share, SHARING_GOAL))
    with_any = mine.double_paging_ballooned.scenarios_with_any
    out.append(Goal("hosts with double paging, all ballooned", with_any, 0, with_any == 0))
    return tuple(out)


def beaten_bounds(records: Iterable[RunRecord]) -> list[BeatenBound]:
    """Every (scenario, policy) where a policy that is not a bound beat ``oracle`` by
    more than ``BOUND_SLACK``."""
    table: dict[str, dict[str, RunRecord]] = {}
    for r in records:
        table.setdefault(r.scenario, {})[r.policy] = r
    out = []
    for scenario, runs in table.items():
        bound = runs.get("oracle")
        if bound is None or bound.throughput_refs_per_s <= 0:
            continue
        top = bound.throughput_refs_per_s
        for policy, r in runs.items():
            if policy not in BOUNDS and r.throughput_refs_per_s > BOUND_SLACK * top:
                out.append(BeatenBound(scenario, policy, "oracle", r.throughput_refs_per_s / top))
    return out


def fixed_slice(
    seed: int, *, count: int, size: int, params: GeneratorParams | None = None
) -> list[GeneratedScenario]:
    """A fixed, cheap slice of the first ``count`` scenarios of ``seed``: the scenarios
    are cut into ``size`` blocks in order, and each block gives its cheapest (by the
    generator's cost estimate). Spread over the whole suite, biased to small hosts."""
    if not 0 < size <= count:
        raise ValueError(f"need 0 < size <= count, got size {size} and count {count}")
    scenarios = [generate_one(seed, i, params) for i in range(count)]
    out = []
    for b in range(size):
        block = scenarios[b * count // size : (b + 1) * count // size]
        out.append(min(block, key=lambda g: (g.estimated_refs, g.index)))
    return out


def goals_json(goals: Iterable[Goal]) -> list[dict[str, Any]]:
    return [asdict(g) for g in goals]
