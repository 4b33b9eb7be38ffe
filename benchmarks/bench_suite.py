"""The policy suite at full size: every policy on the default suite's generated hosts.

Runs ``balloonist suite``'s own code (generator, runner, statistics) on all cores and
writes ``benchmarks/results/suite.json``: per policy, throughput relative to each bound
(median, 10th percentile, worst), how often it is at least as good as each peer, the
sharing check, double paging; the issue's goals for the default policy, each with its
measured figure and whether it holds; every scenario where a policy beat a bound by
more than 1 % (a bound that is beaten is wrong); and the wall and CPU time of the run.

    python benchmarks/bench_suite.py [--count N] [--seed S] [--jobs J] [--page]
        [--start I --add-records RECORDS.json] [--policies P,...]
        [--page-dir DIR] [--name NAME]

The goal is 200 scenarios x these policies in under 30 minutes on a 2-core machine.

A suite too long for one sitting runs in slices: ``--start 100 --count 100
--add-records docs/experiments/suite/records.json`` runs scenarios 100-199 and reports
the figures over those and the earlier slice's (same seed; a run is the same whatever
ran it, so the records of both are one suite's). ``--add-records`` may be given more
than once, and a slice may hold some policies only (records written with
``record_to_json`` under ``"records"``, with the slice's ``wall_s`` and ``cpu_s``);
``--count 0`` runs nothing and reports the slices given. Together they must hold each
(scenario, policy) once, and every policy for every scenario. Each slice's wall and
CPU time is reported, and their sums. A slice taken out of a run of more policies
has no wall time of its own: its file gives ``"wall_s": null`` (its ``cpu_s`` is
its runs' own), and the suite's wall time is then unknown, not guessed. ``balloonist
suite --report DIR`` writes ``DIR/records.json`` in this form.

A held-out suite (another seed, fewer policies) writes its figures under another
name and its page elsewhere, e.g. ``--seed 5 --count 100 --policies
demand,mom,proxmox,static,host-swap,oracle --name suite_heldout --page-dir
docs/experiments/heldout --page``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from _common import write_result
from balloonist.errors import ConfigError
from balloonist.policy import DEFAULT_POLICY
from balloonist.suite.executors import ProcessPoolAdapter
from balloonist.suite.generator import GeneratorParams, generate_one
from balloonist.suite.goals import PEERS, beaten_bounds, default_policy_goals, goals_json
from balloonist.suite.page import write_suite_page
from balloonist.suite.records import RunRecord, join_slices, record_from_json
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


def _earlier(
    paths: list[Path], seed: int
) -> tuple[list[tuple[str, list[RunRecord]]], list[dict[str, Any]]]:
    """The records of earlier slices, by file, and each slice's size and times."""
    parts: list[tuple[str, list[RunRecord]]] = []
    slices: list[dict[str, Any]] = []
    for path in paths:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("seed", seed) != seed:
            raise SystemExit(f"{path}: another suite (seed {data['seed']}, not {seed})")
        records = [record_from_json(r) for r in data["records"]]
        parts.append((str(path), records))
        slices.append(
            {
                "records_from": path.name,
                "scenarios": len({r.scenario for r in records}),
                "policies": sorted({r.policy for r in records}),
                "wall_s": None if data.get("wall_s") is None else float(data["wall_s"]),
                "cpu_s": float(data["cpu_s"]),
            }
        )
    return parts, slices


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--page", action="store_true", help="also write the suite's page (--page-dir)"
    )
    parser.add_argument("--page-dir", type=Path, default=PAGE, help=f"default: {PAGE}")
    parser.add_argument(
        "--policies",
        default=",".join(POLICIES),
        help="comma-separated; the default's peers and the oracle at least",
    )
    parser.add_argument("--name", default="suite", help="results/NAME.json (default: suite)")
    parser.add_argument("--start", type=int, default=0, help="index of the first scenario")
    parser.add_argument(
        "--add-records",
        type=Path,
        action="append",
        default=[],
        metavar="RECORDS",
        help="records of an earlier slice (repeatable): the figures cover them all",
    )
    return parser.parse_args()


def main() -> int:
    args = _arguments()
    policies = tuple(p for p in args.policies.split(",") if p)
    needed = {DEFAULT_POLICY, *PEERS, "oracle"}
    if not needed <= set(policies):
        raise SystemExit(f"--policies: must include {', '.join(sorted(needed - set(policies)))}")
    bounds = tuple(b for b in BOUNDS if b in policies)
    params = GeneratorParams()
    earlier, slices = _earlier(args.add_records, args.seed)
    first = args.start
    scenarios = [generate_one(args.seed, i, params) for i in range(first, first + args.count)]
    start_s, start_cpu_s = time.monotonic(), _cpu_s()

    def on_done(done: int, total: int) -> None:
        if done % 20 == 0 or done == total:
            elapsed = time.monotonic() - start_s
            print(f"{done}/{total} runs, {elapsed:.0f} s", file=sys.stderr, flush=True)

    fresh = run_suite(scenarios, policies, ProcessPoolAdapter(args.jobs), on_done)
    if scenarios:
        wall_slice_s, cpu_slice_s = time.monotonic() - start_s, _cpu_s() - start_cpu_s
        slices.append(
            {
                "start": first,
                "scenarios": args.count,
                "policies": list(policies),
                "wall_s": wall_slice_s,
                "cpu_s": cpu_slice_s,
            }
        )
    try:
        records = join_slices([*earlier, ("this run", fresh)], policies)
    except ConfigError as err:
        raise SystemExit(str(err)) from None
    count = len({r.scenario for r in records})
    walls = [s["wall_s"] for s in slices]
    wall_s = None if None in walls else sum(walls)
    cpu_s = sum(s["cpu_s"] for s in slices)
    # The wall-time goal is for the default suite: 200 hosts x the default policies.
    timed = wall_s is not None and count == 200 and set(policies) == set(POLICIES)
    wall_goal_s = WALL_GOAL_S if timed else None
    stats = suite_stats(records, bounds=bounds)
    goals = default_policy_goals(stats, DEFAULT_POLICY)
    beaten = beaten_bounds(records)
    figures = {
        "count": count,
        "slices": slices,
        "seed": args.seed,
        "policies": list(policies),
        "default_policy": DEFAULT_POLICY,
        "jobs": args.jobs,
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "wall_goal_s": wall_goal_s,
        "goals": goals_json(goals),
        "bounds_beaten": [asdict(b) for b in beaten],
        "statistics": summary_json(stats),
    }
    path = write_result(args.name, figures)
    wall = "wall time unknown (a slice has none)" if wall_s is None else f"{wall_s:.0f} s wall"
    print(
        f"{count} scenarios x {len(policies)} policies: {wall}, "
        f"{cpu_s:.0f} CPU s" + (f" (goal {wall_goal_s} s wall)" if wall_goal_s is not None else "")
    )
    for goal in goals:
        print(f"  {goal.line()}")
    print(f"  bounds beaten by > 1 %: {len(beaten)}")
    print(f"written to {path}")
    if args.page:
        meta = {
            "seed": args.seed,
            "count": count,
            "default_policy": DEFAULT_POLICY,
            "params": params,
            "wall_s": wall_s,
            "cpu_s": cpu_s,
            "jobs": args.jobs,
            "slices": slices,
        }
        write_suite_page(args.page_dir, records, stats, goals, beaten, meta)
        print(f"page written to {args.page_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
