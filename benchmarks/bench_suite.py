"""The policy suite at full size: every policy on the default suite's generated hosts.

Runs ``balloonist suite``'s own code (generator, runner, statistics) on all cores and
writes ``benchmarks/results/suite.json``: per policy, throughput relative to each bound
(median, 10th percentile, worst), how often it is at least as good as each peer, the
sharing check, double paging; the issue's goals for the default policy, each with its
measured figure and whether it holds; every scenario where a policy beat a bound by
more than 1 % (a bound that is beaten is wrong); and the wall and CPU time of the run.

    python benchmarks/bench_suite.py [--count N] [--seed S] [--jobs J] [--page]

The goal is 200 scenarios x these policies in under 30 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

from _common import write_result
from balloonist.policy import DEFAULT_POLICY
from balloonist.suite.executors import ProcessPoolAdapter
from balloonist.suite.generator import GeneratorParams, generate_one
from balloonist.suite.goals import PEERS, beaten_bounds, default_policy_goals, goals_json
from balloonist.suite.page import write_suite_page
from balloonist.suite.runner import run_suite
from balloonist.suite.stats import BOUNDS, suite_stats, summary_json

PAGE = Path(__file__).resolve().parents[1] / "docs" / "experiments" / "suite"
#: The default, the peers it must match and both bounds. ``shares``, the previous
#: default, is left out of the timed run (``balloonist suite`` runs it by default).
POLICIES = (DEFAULT_POLICY, *PEERS, *BOUNDS)
WALL_GOAL_S = 30 * 60


def _cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--page", action="store_true", help=f"also write the suite's page into {PAGE}"
    )
    args = parser.parse_args()
    params = GeneratorParams()
    scenarios = [generate_one(args.seed, i, params) for i in range(args.count)]
    start_s, start_cpu_s = time.monotonic(), _cpu_s()

    def on_done(done: int, total: int) -> None:
        if done % 20 == 0 or done == total:
            elapsed = time.monotonic() - start_s
            print(f"{done}/{total} runs, {elapsed:.0f} s", file=sys.stderr, flush=True)

    records = run_suite(scenarios, POLICIES, ProcessPoolAdapter(args.jobs), on_done)
    wall_s, cpu_s = time.monotonic() - start_s, _cpu_s() - start_cpu_s
    stats = suite_stats(records, bounds=BOUNDS)
    goals = default_policy_goals(stats, DEFAULT_POLICY)
    beaten = beaten_bounds(records)
    figures = {
        "count": args.count,
        "seed": args.seed,
        "policies": list(POLICIES),
        "default_policy": DEFAULT_POLICY,
        "jobs": args.jobs,
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "wall_goal_s": WALL_GOAL_S,
        "goals": goals_json(goals),
        "bounds_beaten": [asdict(b) for b in beaten],
        "statistics": summary_json(stats),
    }
    path = write_result("suite", figures)
    print(
        f"{args.count} scenarios x {len(POLICIES)} policies: {wall_s:.0f} s wall, "
        f"{cpu_s:.0f} CPU s (goal {WALL_GOAL_S} s wall)"
    )
    for goal in goals:
        print(f"  {goal.line()}")
    print(f"  bounds beaten by > 1 %: {len(beaten)}")
    print(f"written to {path}")
    if args.page:
        meta = {
            "seed": args.seed,
            "count": args.count,
            "default_policy": DEFAULT_POLICY,
            "params": params,
            "wall_s": wall_s,
            "cpu_s": cpu_s,
            "jobs": args.jobs,
        }
        write_suite_page(PAGE, records, stats, goals, beaten, meta)
        print(f"page written to {PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
