"""Simulator cost per run: CPU seconds of one `balloonist simulate --json` process.

Each run is a fresh process, so start-up (imports, loading numba's compiled kernels
from its cache) is included, as it is for every run of a scenario suite. The figure
is the process's user + system CPU time, not wall time. Other work on a shared
machine still slows a run through the caches it shares, so with ``--baseline`` the
two trees are run alternately, each repetition of one right after the other's, and
both see the same machine. Median of the repetitions per scenario and policy.

    python benchmarks/bench_sim_run.py --baseline /tmp/speed-base   # before and after
    python benchmarks/bench_sim_run.py --scenario scenarios/overcommit-mix.toml --repeats 1

Figures for scenarios not run this time are kept from ``results/sim_run.json``.
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


def commit_of(checkout: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def figure(runs: list[float]) -> dict[str, Any]:
    return {"cpu_s": round(statistics.median(runs), 2), "runs_cpu_s": [round(r, 2) for r in runs]}


def measure(
    trees: dict[str, Path], scenarios: list[str], policies: list[str], repeats: int
) -> dict[str, dict[str, Any]]:
    """Per label, per "scenario/policy": the median CPU seconds and every run's."""
    out: dict[str, dict[str, Any]] = {label: {} for label in trees}
    for scenario in scenarios:
        for policy in policies:
            key = f"{Path(scenario).stem}/{policy}"
            runs: dict[str, list[float]] = {label: [] for label in trees}
            for _ in range(repeats):
                for label, checkout in trees.items():
                    runs[label].append(run_cpu_s(checkout, scenario, policy))
            for label in trees:
                out[label][key] = figure(runs[label])
            line = "  ".join(f"{label} {out[label][key]['cpu_s']:6.2f}" for label in trees)
            print(f"{key:28} CPU s: {line}", flush=True)
    return out


def previous() -> dict[str, Any]:
    path = RESULTS / f"{NAME}.json"
    if not path.exists():
        return {}
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="checkout of the commit before (before)")
    parser.add_argument("--scenario", action="append", help="default: demo, overcommit-mix")
    parser.add_argument("--policy", action="append", help="default: shares mom static host-swap")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    trees = {"after": ROOT}
    if args.baseline is not None:
        trees = {"before": args.baseline.resolve(), **trees}
    scenarios = args.scenario or list(SCENARIOS)
    measured = measure(trees, scenarios, args.policy or list(POLICIES), args.repeats)
    old = previous()
    record: dict[str, Any] = {
        "unit": "CPU s per run (user + sys), fresh process, start-up included"
    }
    for label in ("before", "after"):
        runs = dict(old.get(label, {}).get("runs", {}))
        commit = old.get(label, {}).get("commit")
        if label in trees:
            runs.update(measured[label])
            commit = commit_of(trees[label])
        record[label] = {"commit": commit, "runs": runs}
    before, after = record["before"]["runs"], record["after"]["runs"]
    record["speedup"] = {
        key: round(before[key]["cpu_s"] / after[key]["cpu_s"], 2) for key in after if key in before
    }
    path = write_result(NAME, record)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
