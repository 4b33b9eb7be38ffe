"""Simulator speed: page references per wall-clock second on one core.

Goal (issue 2): >= 10 million references per second with 8 guests of 256 MiB.
The guests run a mix of uniform, zipf and scan workloads on an overcommitted host
under the `shares` policy, so faults, ballooning and swapping are all exercised,
not only hits. Compilation is excluded by a warm-up run.
"""

from __future__ import annotations

import time

from _common import write_result
from balloonist.sim.runner import run_scenario
from balloonist.sim.scenario import Scenario, scenario_from_dict

GOAL_REFS_PER_S = 10_000_000
KINDS = ["uniform", "zipf", "scan", "zipf", "uniform", "zipf", "uniform", "zipf"]


def scenario(duration_s: float) -> Scenario:
    guests = [
        {
            "name": f"g{i}",
            "memory": "256MiB",
            "workload": {"kind": kind, "working_set": "160MiB" if kind == "scan" else "200MiB"},
        }
        for i, kind in enumerate(KINDS)
    ]
    data = {
        "host": {"memory": "1536MiB", "swap": "2GiB"},
        "sim": {"duration_s": duration_s, "seed": 1},
        "policy": {"name": "shares"},
        "guests": guests,
    }
    return scenario_from_dict(data, where="bench_sim", default_name="bench-sim")


def main() -> None:
    run_scenario(scenario(2.0))  # compile and warm caches
    best = 0.0
    refs = 0
    wall = 0.0
    for _ in range(3):
        start = time.perf_counter()
        result = run_scenario(scenario(20.0))
        elapsed = time.perf_counter() - start
        total = sum(int(g.refs.sum()) for g in result.guests)
        rate = total / elapsed
        if rate > best:
            best, refs, wall = rate, total, elapsed
    print(f"simulator: {best / 1e6:.1f} M references/s ({refs} refs in {wall:.2f} s wall)")
    verdict = "met" if best >= GOAL_REFS_PER_S else "NOT met"
    print(f"goal: >= {GOAL_REFS_PER_S / 1e6:.0f} M/s -> {verdict}")
    path = write_result(
        "sim_throughput",
        {
            "guests": len(KINDS),
            "guest_memory_mib": 256,
            "simulated_s": 20.0,
            "references": refs,
            "wall_s": round(wall, 3),
            "refs_per_s": round(best),
            "goal_refs_per_s": GOAL_REFS_PER_S,
            "goal_met": best >= GOAL_REFS_PER_S,
            "best_of": 3,
        },
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
