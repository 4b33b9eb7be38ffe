"""The oracle bounds every policy: on the shipped scenarios, the demo and hand-made hosts
with phase changes, no policy beats ``oracle`` by more than 1 % in aggregate throughput,
and ``oracle-fair`` is at least as good (within the same 1 %) as every policy that
keeps the sharing rule (in every period, each guest at 0.9x or more of its throughput
under ``static``).

If a policy beats the bound, the bound is wrong: find out why and fix the oracle.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from balloonist.policy.registry import POLICY_NAMES as ONLINE_POLICIES
from balloonist.sim.compare import run_policies
from balloonist.sim.oracle import FAIR_FRACTION
from balloonist.sim.result import SimResult
from balloonist.sim.scenario import Scenario, load_scenario, load_scenario_or_demo

ROOT = Path(__file__).resolve().parents[2]
HOSTS = sorted((ROOT / "scenarios").glob("*.toml")) + sorted(
    (Path(__file__).parent / "bound_hosts").glob("*.toml")
)
POLICIES = ONLINE_POLICIES  # every policy that runs without the future, default included
#: How far a policy may come out above the bound: the simulator's randomness.
SLACK = 0.01


def _throughput(result: SimResult) -> float:
    return float(result.summary()["aggregate"]["throughput_refs_per_s"])


def _keeps_the_sharing_rule(result: SimResult, static: SimResult) -> bool:
    """In every period, every guest makes at least 0.9x the references it makes under
    ``static`` in that period: the rule ``oracle-fair`` keeps, period by period."""
    return all(
        bool(np.all(ours.refs >= FAIR_FRACTION * theirs.refs))
        for ours, theirs in zip(result.guests, static.guests, strict=True)
    )


def _check(scenario: Scenario) -> None:
    # On every processor: the runs are seeded, so which process ran one does not
    # change its result (tests/test_compare.py), and this file is CI's longest.
    runs = run_policies(scenario, ["oracle", "oracle-fair", *POLICIES], jobs=os.cpu_count() or 1)
    oracle, fair = runs.pop("oracle"), runs.pop("oracle-fair")
    bound = _throughput(oracle)
    ratios = {name: _throughput(run) / bound for name, run in runs.items()}
    assert max(ratios.values()) <= 1.0 + SLACK, ratios
    fair_bound = _throughput(fair)
    for name, run in runs.items():
        if _keeps_the_sharing_rule(run, runs["static"]):
            assert _throughput(run) <= fair_bound * (1.0 + SLACK), (name, ratios)


@pytest.mark.slow
@pytest.mark.parametrize("path", HOSTS, ids=[p.stem for p in HOSTS])
def test_no_policy_beats_the_oracle(path: Path) -> None:
    _check(load_scenario(path))


@pytest.mark.slow
def test_no_policy_beats_the_oracle_on_the_demo() -> None:
    _check(load_scenario_or_demo(None))
