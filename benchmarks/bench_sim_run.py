"""Simulator cost per run: CPU seconds of one `balloonist simulate --json` process.

Each run is a fresh process, so start-up (imports, loading numba's compiled kernels
from its cache) is included, as it is for every run of a scenario suite. The figure
is the process's user + system CPU time, not wall time, so other work on the machine
does not count. Median of 3 per scenario and policy.

    python benchmarks/bench_sim_run.py                     # this tree, as "after"
    python benchmarks/bench_sim_run.py --label before --checkout /tmp/speed-base

Each label's figures are kept in ``results/sim_run.json`` beside the other label's,
so a tree measured before a change and one measured after end up in one record.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from _common import RESULTS, write_result

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("src/balloonist/scenarios/demo.toml", "scenarios/overcommit-mix.toml")
POLICIES = ("shares", "mom", "static", "host-swap")
REPEATS = 3
NAME = "sim_run"


def run_cpu_s(checkout: Path, scenario: str, policy: str) -> float:
    """CPU seconds (user + sys) of one simulate process run from ``checkout``."""
    env = {**os.environ, "PYTHONPATH": str(checkout / "src")}
    cmd = [sys.executable, "-m", "balloonist", "simulate", scenario, "--policy", policy, "--json"]
    proc = subprocess.Popen(
        cmd, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(proc.pid, 0)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"bench_sim_run: {' '.join(cmd)} failed in {checkout}: {stderr}")
    return usage.ru_utime + usage.ru_stime


def measure(checkout: Path, scenarios: list[str], policies: list[str]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for scenario in scenarios:
        name = Path(scenario).stem
        for policy in policies:
            runs = [run_cpu_s(checkout, scenario, policy) for _ in range(REPEATS)]
            median = statistics.median(runs)
            figures[f"{name}/{policy}"] = {
                "cpu_s": round(median, 2),
                "runs_cpu_s": [round(r, 2) for r in runs],
            }
            print(f"{name:16} {policy:10} {median:7.2f} CPU s  {runs}", flush=True)
    return figures


def previous() -> dict[str, Any]:
    path = RESULTS / f"{NAME}.json"
    if not path.exists():
        return {}
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def speedups(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    return {
        key: round(before[key]["cpu_s"] / after[key]["cpu_s"], 2)
        for key in after
        if key in before and after[key]["cpu_s"] > 0
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", choices=("before", "after"), default="after")
    parser.add_argument("--checkout", type=Path, default=ROOT, help="tree to measure")
    parser.add_argument("--scenario", action="append", help="default: demo, overcommit-mix")
    parser.add_argument("--policy", action="append", help="default: shares mom static host-swap")
    args = parser.parse_args()
    checkout: Path = args.checkout.resolve()
    figures = measure(checkout, args.scenario or list(SCENARIOS), args.policy or list(POLICIES))
    old = previous()
    record: dict[str, Any] = {
        "unit": "CPU s per run (user + sys), fresh process, start-up included",
        "median_of": REPEATS,
        "before": old.get("before", {}),
        "after": old.get("after", {}),
    }
    commit = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    record[args.label] = {"commit": commit, "runs": figures}
    record["speedup"] = speedups(record["before"].get("runs", {}), record["after"].get("runs", {}))
    path = write_result(NAME, record)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
