"""The suite's statistics, from run records alone (pure).

Throughput is judged relative to the bounds named in ``BOUNDS``: ``oracle``, the true
upper bound, and ``oracle-fair``, the bound under the sharing rule (no guest below 0.9x
its ``static`` throughput); ratio = policy aggregate throughput / bound aggregate
throughput, per scenario. Scenarios where the bound did no work (throughput 0) have no ratio.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

import numpy as np

from balloonist.suite.records import RunRecord

__all__ = [
    "AT_LEAST_AS_GOOD",
    "BOUNDS",
    "SHARING_BASELINE",
    "SHARING_FLOOR",
    "DoublePaging",
    "PolicyStats",
    "Relative",
    "Versus",
    "ratios",
    "suite_stats",
    "summary_json",
]

BOUNDS: Final = ("oracle", "oracle-fair")
#: P is at least as good as Q on a scenario when P >= this x Q (noise, not a loss).
AT_LEAST_AS_GOOD: Final = 0.99
#: The sharing check: no guest below this fraction of its throughput under the baseline.
SHARING_BASELINE: Final = "static"
SHARING_FLOOR: Final = 0.9
#: A bound that completed less than one reference per second did no work: no ratio.
MIN_BOUND_REFS_PER_S: Final = 1.0


@dataclass(frozen=True)
class Relative:
    """A policy's throughput relative to one bound, over the scenarios with a ratio."""

    bound: str
    scenarios: int
    median: float
    p10: float
    worst: float
    worst_scenario: str


@dataclass(frozen=True)
class Versus:
    """One policy against one peer, scenario by scenario."""

    peer: str
    wins: int
    ties: int
    losses: int

    @property
    def at_least_as_good(self) -> float | None:
        """Fraction of scenarios where the policy is at least as good as the peer."""
        total = self.wins + self.ties + self.losses
        return (self.wins + self.ties) / total if total else None


@dataclass(frozen=True)
class DoublePaging:
    scenarios_with_any: int
    events: int
    scenarios: int  # scenarios counted


@dataclass(frozen=True)
class PolicyStats:
    policy: str
    scenarios: int
    relative: tuple[Relative, ...]  # one per bound present
    versus: tuple[Versus, ...]  # one per other policy
    sharing_pass: int | None  # scenarios where no guest fell below the floor; None: no baseline
    sharing_scenarios: int
    double_paging: DoublePaging  # every scenario
    double_paging_ballooned: DoublePaging  # scenarios where every guest has a balloon driver


def suite_stats(
    records: Iterable[RunRecord], bounds: Sequence[str] = BOUNDS
) -> tuple[PolicyStats, ...]:
    """Statistics per policy, in the order policies first appear in ``records``."""
    table: dict[str, dict[str, RunRecord]] = {}
    for r in records:
        table.setdefault(r.policy, {})[r.scenario] = r
    return tuple(
        _policy_stats(policy, table, [b for b in bounds if b in table]) for policy in table
    )


def _policy_stats(
    policy: str, table: dict[str, dict[str, RunRecord]], bounds: list[str]
) -> PolicyStats:
    mine = table[policy]
    relative = tuple(
        rel for rel in (_relative(mine, table[b], b) for b in bounds) if rel is not None
    )
    versus = tuple(_versus(mine, table[peer], peer) for peer in table if peer != policy)
    sharing_pass: int | None = None
    sharing_scenarios = 0
    if SHARING_BASELINE in table:
        base = table[SHARING_BASELINE]
        common = [s for s in mine if s in base]
        sharing_scenarios = len(common)
        sharing_pass = sum(_shares_fairly(mine[s], base[s]) for s in common)
    ballooned = [r for r in mine.values() if r.every_guest_ballooned]
    return PolicyStats(
        policy=policy,
        scenarios=len(mine),
        relative=relative,
        versus=versus,
        sharing_pass=sharing_pass,
        sharing_scenarios=sharing_scenarios,
        double_paging=_double_paging(mine.values()),
        double_paging_ballooned=_double_paging(ballooned),
    )


def _relative(
    mine: dict[str, RunRecord], bound: dict[str, RunRecord], name: str
) -> Relative | None:
    ratios = {
        s: r.throughput_refs_per_s / bound[s].throughput_refs_per_s
        for s, r in mine.items()
        if s in bound and bound[s].throughput_refs_per_s >= MIN_BOUND_REFS_PER_S
    }
    if not ratios:
        return None
    values = np.array(list(ratios.values()))
    worst = min(ratios, key=lambda s: (ratios[s], s))
    return Relative(
        bound=name,
        scenarios=len(ratios),
        median=float(np.median(values)),
        p10=float(np.percentile(values, 10)),
        worst=ratios[worst],
        worst_scenario=worst,
    )


def _versus(mine: dict[str, RunRecord], theirs: dict[str, RunRecord], peer: str) -> Versus:
    wins = ties = losses = 0
    for s, r in mine.items():
        if s not in theirs:
            continue
        p, q = r.throughput_refs_per_s, theirs[s].throughput_refs_per_s
        good, bad = p >= AT_LEAST_AS_GOOD * q, q >= AT_LEAST_AS_GOOD * p
        if good and bad:
            ties += 1
        elif good:
            wins += 1
        else:
            losses += 1
    return Versus(peer=peer, wins=wins, ties=ties, losses=losses)


def _shares_fairly(mine: RunRecord, base: RunRecord) -> bool:
    """No guest below SHARING_FLOOR x its baseline throughput (a baseline of 0 passes)."""
    got = mine.guest_throughput()
    return all(
        got.get(name, 0.0) >= SHARING_FLOOR * floor
        for name, floor in base.guest_throughput().items()
    )


def _double_paging(records: Iterable[RunRecord]) -> DoublePaging:
    events = [r.double_paging_events for r in records]
    return DoublePaging(
        scenarios_with_any=sum(e > 0 for e in events), events=sum(events), scenarios=len(events)
    )


def ratios(records: Iterable[RunRecord], bound: str) -> dict[str, list[float]]:
    """Per policy, its throughput / the bound's, on every scenario where the bound worked."""
    records = list(records)
    base = {
        r.scenario: r.throughput_refs_per_s
        for r in records
        if r.policy == bound and r.throughput_refs_per_s >= MIN_BOUND_REFS_PER_S
    }
    out: dict[str, list[float]] = {}
    for r in records:
        if r.scenario in base:
            out.setdefault(r.policy, []).append(r.throughput_refs_per_s / base[r.scenario])
    return out


def summary_json(stats: Sequence[PolicyStats]) -> dict[str, Any]:
    """The statistics as JSON (``summary.json``)."""
    out: dict[str, Any] = {
        "bounds": list(BOUNDS),
        "at_least_as_good_factor": AT_LEAST_AS_GOOD,
        "sharing": {"baseline": SHARING_BASELINE, "floor": SHARING_FLOOR},
        "policies": {},
    }
    for s in stats:
        data = asdict(s)
        data["relative"] = {r.bound: asdict(r) for r in s.relative}
        data["versus"] = {
            v.peer: {**asdict(v), "at_least_as_good": v.at_least_as_good} for v in s.versus
        }
        del data["policy"]
        out["policies"][s.policy] = data
    return out
